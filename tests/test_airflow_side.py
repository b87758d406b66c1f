"""The Airflow side stays light and discoverable: no ML library at import, the provider is found by Airflow,
the trigger serializes to exactly its constructor's arguments."""

from __future__ import annotations

import json
import subprocess
import sys

from airflow_provider_lora.triggers.lora import LoRATrainingTrigger

HEAVY = ("torch", "transformers", "datasets", "unsloth", "kfp", "matplotlib", "pandas", "peft", "trl", "mlflow")


def test_importing_the_operator_and_trigger_imports_no_heavy_library():
    # The spec names mlflow_tracking_uri, but only the trainer imports mlflow (lora_trainer/tracking.py).
    code = ("import sys, json; import airflow_provider_lora.operators.lora, airflow_provider_lora.triggers.lora, "
            "airflow_provider_lora.params, airflow_provider_lora.core.spec, airflow_provider_lora.core.render, "
            "airflow_provider_lora.plugins.loss_chart; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_provider_is_discovered_by_airflow():
    from airflow.providers_manager import ProvidersManager

    providers = ProvidersManager().providers
    assert "airflow-provider-lora" in providers
    info = providers["airflow-provider-lora"].data
    assert info["triggers"][0]["python-modules"] == ["airflow_provider_lora.triggers.lora"]


def test_trigger_serialize_mirrors_init():
    kwargs = dict(name="lora-x-1", namespace="ml", launcher="pod", kubernetes_conn_id="k8s", config_file="/k/config",
                  cluster_context="ctx", in_cluster=False, poll_interval=2.5, startup_timeout=60.0,
                  stream_logs=False, deadline=1767225600.0, log_interval=30.0, watch=False)
    classpath, serialized = LoRATrainingTrigger(**kwargs).serialize()
    assert classpath == "airflow_provider_lora.triggers.lora.LoRATrainingTrigger"
    assert serialized == kwargs
    assert json.loads(json.dumps(serialized)) == serialized  # JSON-like values only
    assert LoRATrainingTrigger(**serialized).serialize() == (classpath, serialized)


def test_a_trigger_serialized_by_the_version_before_the_shared_watch_still_runs():
    """A task deferred before an upgrade is resumed from its stored kwargs: those of 0.1.0 before log_interval and
    watch existed must still build the trigger (with the new defaults: the shared watch, 30 s log reads)."""
    stored = dict(name="lora-x-1", namespace="ml", launcher="pod", kubernetes_conn_id="k8s", config_file=None,
                  cluster_context=None, in_cluster=None, poll_interval=10.0, startup_timeout=600.0,
                  stream_logs=True, deadline=None)
    trigger = LoRATrainingTrigger(**stored)
    assert trigger.watch is True and trigger.log_interval is None
    assert trigger.serialize()[1] == {**stored, "log_interval": None, "watch": True}


def test_the_example_dag_has_a_form_field_for_every_spec_parameter(airflow_db):
    # airflow_db: Airflow 2.11 reads the metadata database when it parses a DAG scheduled on a dataset alias
    # (dags/lora_adapter_ready.py), as a deployment's dag processor does.
    from pathlib import Path

    from airflow_provider_lora.core.spec import LoRASpec
    from tests.fixtures.airflow import dag_bag

    bag = dag_bag(str(Path(__file__).resolve().parents[1] / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["lora_finetune"]
    assert set(dag.params) == set(LoRASpec.model_fields)
    for name, param in dag.params.items():
        param.resolve()  # every default passes its own schema
        assert param.schema.get("section") and param.description, name
    assert dag.params.get_param("lr_scheduler").schema["enum"][-1] is None  # nullable choices stay optional
    task = dag.task_dict["train"]
    assert task.lora_r == "{{ params.lora_r }}" and dag.render_template_as_native_obj is True


def test_the_trigger_survives_the_metadata_database(airflow_db, tmp_path):
    """What Airflow does with a deferred task's trigger (3.x and 2.11): store classpath and kwargs (encrypted) in the
    database; the triggerer, another process, imports the class from the installed package and builds it again."""
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session

    trigger = LoRATrainingTrigger(name="lora-x-1", namespace="ml", kubernetes_conn_id="k8s", poll_interval=2.5)
    with create_session() as session:
        row = Trigger.from_object(trigger)
        session.add(row)
        session.flush()
        trigger_id = row.id
    code = ("import importlib, json; from airflow.models.trigger import Trigger; "
            "from airflow.utils.session import create_session\n"
            "with create_session() as session:\n"
            f"    row = session.get(Trigger, {trigger_id})\n"
            "    module, _, name = row.classpath.rpartition('.')\n"
            "    print(json.dumps(getattr(importlib.import_module(module), name)(**row.kwargs).serialize()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    classpath, kwargs = json.loads(done.stdout.strip().splitlines()[-1])
    assert (classpath, kwargs) == trigger.serialize()
