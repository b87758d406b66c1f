"""The operator's OpenLineage facets: names by OpenLineage's naming spec, no output on a dry run, and no import of the
OpenLineage provider on the operator's own path (tests/test_results_delivery.py checks the events a real run emits
through the provider's listener)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from airflow_provider_lora.operators.lora import LoRATrainingOperator

pytest.importorskip("airflow.providers.openlineage", reason="the OpenLineage provider is a dev dependency")

from airflow_provider_lora.lineage import HUB, RUN_FACET, location  # noqa: E402


@pytest.mark.parametrize("where, kind, expected", [
    ("s3://bucket/data/train.jsonl", "dataset", ("s3://bucket", "data/train.jsonl")),
    ("s3://bucket/runs/7/adapter", "model", ("s3://bucket", "runs/7/adapter")),
    ("/mnt/pvc/data/train.jsonl", "dataset", ("file", "/mnt/pvc/data/train.jsonl")),
    ("file:///mnt/pvc/models/base", "model", ("file", "/mnt/pvc/models/base")),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "model", (HUB, "HuggingFaceTB/SmolLM2-135M-Instruct")),
    ("tatsu-lab/alpaca", "dataset", (HUB, "datasets/tatsu-lab/alpaca")),
    ("hf://tatsu-lab/alpaca", "dataset", (HUB, "datasets/tatsu-lab/alpaca")),
    ("hf://datasets/tatsu-lab/alpaca", "dataset", (HUB, "datasets/tatsu-lab/alpaca")),
])
def test_locations_are_named_as_openlineage_names_them(where, kind, expected):
    assert location(where, kind) == expected


def _operator(**kwargs):
    return LoRATrainingOperator(task_id="train", launcher="local", base_model="HuggingFaceTB/SmolLM2-135M",
                                dataset="s3://bucket/data/train.jsonl", output_uri="s3://bucket/runs/1", **kwargs)


def test_start_names_inputs_and_the_adapter_the_run_will_publish():
    lineage = _operator(lora_r=8, lora_use_dora=True).get_openlineage_facets_on_start()
    assert [(d.namespace, d.name) for d in lineage.inputs] == [
        ("s3://bucket", "data/train.jsonl"), (HUB, "HuggingFaceTB/SmolLM2-135M")]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [("s3://bucket", "runs/1/adapter")]
    facet = lineage.run_facets[RUN_FACET]
    assert (facet.method, facet.loraR, facet.figures) == ("LoRA+DoRA", 8, None)


def test_a_dry_run_reports_its_inputs_and_no_output():
    lineage = _operator(dry_run=True).get_openlineage_facets_on_complete(task_instance=None)
    assert len(lineage.inputs) == 2 and lineage.outputs == []
    assert lineage.run_facets[RUN_FACET].adapter is None


def test_complete_carries_the_published_adapter_and_the_run_figures():
    operator = _operator(lora_load_in_4bit=True)
    operator._result = {"summary": {"final_loss": 0.5, "min_eval_loss": 0.4, "best_eval_step": 20, "tokens": 9},
                        "artifacts": {"adapter": "s3://bucket/runs/1/adapter"}}
    facet = operator.get_openlineage_facets_on_complete(task_instance=None).run_facets[RUN_FACET]
    assert facet.method == "QLoRA"
    assert facet.figures == {"final_loss": 0.5, "min_eval_loss": 0.4, "best_eval_step": 20}


def test_the_operator_path_imports_no_openlineage():
    code = ("import sys; import airflow_provider_lora.operators.lora, airflow_provider_lora.triggers.lora; "
            "import json; print(json.dumps(sorted(m for m in sys.modules if m.startswith(('openlineage', 'airflow.providers.openlineage', "
            "'airflow_provider_lora.lineage')))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # Airflow's providers manager reads every installed provider's get_provider_info (and so its package): that
    # import is Airflow's, not ours, and happens with or without this operator.
    airflow_reads = ["airflow.providers.openlineage", "airflow.providers.openlineage.get_provider_info"]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert [m for m in imported if m not in airflow_reads] == []
