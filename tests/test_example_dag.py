"""The example DAG (dags/lora_finetune.py) as a user runs it against a cluster: parsed from its file with
LORA_EXAMPLE_LAUNCHER=pod, triggered with run conf over the form's defaults, under dag.test(). The pod runs the
real trainer in the emulated cluster and publishes to S3 (moto). Runs on Airflow 3 and in the 2.11 suite."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from airflow_provider_lora.core.results import load_run_result
from tests.fixtures.airflow import AIRFLOW_3, connect, dag_bag, run_and_pull

pytestmark = pytest.mark.slow
DAGS = Path(__file__).resolve().parents[1] / "dags"


def asset_events() -> list[tuple[str, dict]]:
    """(URI, extra) of every asset event in the metadata database (dataset events on Airflow 2.11)."""
    from sqlalchemy import select

    from airflow.utils.session import create_session

    if AIRFLOW_3:
        from airflow.models.asset import AssetEvent as Event
    else:
        from airflow.models.dataset import DatasetEvent as Event
    with create_session() as session:
        return [((e.asset if AIRFLOW_3 else e.dataset).uri, e.extra) for e in session.scalars(select(Event))]


def test_the_example_dag_trains_in_a_pod_with_the_run_conf(k8s_cluster, airflow_db, tiny_model_dir, s3_endpoint,
                                                            s3_bucket, monkeypatch):
    # What the DAG file reads when it is parsed, and the connection its operator uses (kubernetes_default).
    monkeypatch.setenv("LORA_EXAMPLE_LAUNCHER", "pod")
    monkeypatch.setenv("LORA_EXAMPLE_BASE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("LORA_EXAMPLE_OUTPUT", f"s3://{s3_bucket}/runs")
    connect(monkeypatch, k8s_cluster, "kubernetes_default")
    bag = dag_bag(str(DAGS))
    assert bag.import_errors == {}
    dag = bag.dags["lora_finetune"]
    assert dag.params["resource_gpu_per_worker"] == 1  # a GPU pod by default with the pod launcher

    # The pod inherits the host's environment (the emulator's default), so it reaches moto with the test's keys.
    conf = {"max_steps": 3, "lora_r": 4, "resource_gpu_per_worker": 0, "resource_cpu_per_worker": "2",
            "resource_memory_per_worker": "4Gi", "dtype": "float32"}
    run, ti, result = run_and_pull(dag, run_conf=conf)
    assert result["summary"]["global_step"] == 3
    assert result["artifacts"]["root"] == f"s3://{s3_bucket}/runs/{run.run_id}"  # output_uri was templated
    published = load_run_result(result["artifacts"]["root"])
    assert published.summary["global_step"] == 3
    # The trainer got the run conf over the DAG's own defaults, typed (render_template_as_native_obj).
    spec = published.summary["spec"]
    assert published.summary["lora"]["r"] == 4 and spec["max_steps"] == 3 and spec["dtype"] == "float32"
    assert spec["max_seq_len"] == 256 and spec["learning_rate"] == 1e-3 and spec["effective_batch_size"] == 4
    assert spec["dataset"].endswith("examples/data/records_train.jsonl")
    assert len([r for r in k8s_cluster.request_log if r[0] == "POST" and r[1].endswith("/pods")]) == 1
    assert k8s_cluster.pods() == []  # the default on_finish_action deletes a succeeded pod

    # The adapter's asset event, through the example's asset alias (a dataset event on 2.11), with the figures.
    [(uri, extra)] = asset_events()
    assert uri == result["artifacts"]["adapter"] and extra["adapter"] == uri
    assert extra["final_loss"] == result["summary"]["final_loss"] and extra["global_step"] == 3

    # The LoRA artifacts link as each version computes it. Airflow 3: the worker stored it when the try ended ("" for
    # S3 behind a custom endpoint, as here). 2.11: the webserver asks the deserialized task, whose link reads the
    # return value from the database; without the custom endpoint it is the S3 console at the run's prefix.
    if AIRFLOW_3:
        assert ti.xcom_pull(task_ids="train", key="_link_LoRAArtifactsLink") == ""
    else:
        from airflow.serialization.serialized_objects import SerializedDAG

        task = SerializedDAG.from_dict(SerializedDAG.to_dict(dag)).get_task("train")
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        assert task.get_extra_links(ti, "LoRA artifacts") == (
            f"https://console.aws.amazon.com/s3/buckets/{s3_bucket}?prefix={quote(f'runs/{run.run_id}/', safe='/')}")
        assert task.get_extra_links(ti, "Loss chart") == ""  # no tab before Airflow 3.1
