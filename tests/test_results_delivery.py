"""What a finished run hands back, and where it lands, with every results feature on at once: held-out evaluation
every few steps, before/after answers, the model card, the adapter's asset event, OpenLineage events (the real
listener of apache-airflow-providers-openlineage, writing through its file transport) and MLflow tracking (a real
`mlflow server`, read back through its client).

The DAG runs by dag.test() in a subprocess: the OpenLineage listener is a plugin that Airflow registers only when a
transport is configured at start, which this test process (shared with other tests) is not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser_helpers import ROOT
from tests.fixtures.airflow import airflow3_only, local_trainer
from tests.trainer_helpers import FAST, arithmetic_rows, write_jsonl

pytest.importorskip("airflow.providers.openlineage", reason="the OpenLineage provider is a dev dependency")

DAG_ID = "lora_results_delivery"
ALIAS = "lora-adapters"
NAMESPACE = "lora-tests"  # the OpenLineage job namespace the run reports under
EXPERIMENT = "lora-results-delivery"  # the MLflow experiment

DAG_SCRIPT = '''\
import datetime, json, sys

from airflow_provider_lora.compat import DAG
from airflow_provider_lora.operators.lora import LoRATrainingOperator
from tests.fixtures.airflow import run_and_pull

with DAG({dag_id!r}, schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
    LoRATrainingOperator(task_id="train", launcher="local", asset_alias={alias!r}, **{kwargs!r})
run, ti, result = run_and_pull(dag)

from airflow.models.asset import AssetEvent
from airflow.utils.session import create_session
with create_session() as session:
    events = [{{"uri": e.uri, "extra": e.extra}} for e in session.query(AssetEvent).all()
              if e.source_dag_id == {dag_id!r} and e.source_run_id == run.run_id]
with open(sys.argv[1], "w") as out:  # not stdout: the OpenLineage listener logs there after the run
    json.dump({{"result": result, "events": events, "run_id": run.run_id}}, out)
'''


def _lineage_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@airflow3_only
@local_trainer
def test_a_run_with_every_results_feature_on(airflow_db, tiny_model_dir, mlflow_server, tmp_path):
    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(40))
    kwargs = {**FAST, "base_model": str(tiny_model_dir), "dataset": str(dataset),
              "output_uri": str(tmp_path / "out") + "/{{ run_id }}",  # START already names the rendered location
              "max_steps": 6, "eval_fraction": 0.25, "eval_steps": 2, "sample_prompts": 2,
              "sample_max_new_tokens": 6, "mlflow_tracking_uri": mlflow_server, "mlflow_experiment": EXPERIMENT}
    script = tmp_path / "run_dag.py"
    script.write_text(DAG_SCRIPT.format(dag_id=DAG_ID, alias=ALIAS, kwargs=kwargs))
    lineage_file = tmp_path / "openlineage.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
               {"type": "file", "log_file_path": str(lineage_file), "append": True}),
           "AIRFLOW__OPENLINEAGE__NAMESPACE": NAMESPACE}
    ran_file = tmp_path / "ran.json"
    done = subprocess.run([sys.executable, str(script), str(ran_file)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ran = json.loads(ran_file.read_text())
    result, summary = ran["result"], ran["result"]["summary"]
    adapter, output = Path(result["artifacts"]["adapter"]), Path(result["artifacts"]["root"])
    assert ran["run_id"] in str(output)

    # 1. Held-out evaluation before training (the base model's, step 0) and every 2 steps: in the history, the
    # summary (best step) and the XCom return value.
    evals = [row for row in result["history"] if "eval_loss" in row]
    assert [row["step"] for row in evals] == [0, 2, 4, 6]
    assert summary["base_eval_loss"] == evals[0]["eval_loss"] > summary["final_eval_loss"]
    best = min(evals[1:], key=lambda row: row["eval_loss"])
    assert summary["min_eval_loss"] == best["eval_loss"] and summary["best_eval_step"] == best["step"]
    assert summary["final_eval_loss"] == evals[-1]["eval_loss"]

    # 2. Before/after answers: two held-out prompts, each answered by the base model and with the adapter.
    samples = summary["samples"]
    assert len(samples) == 2
    for sample in samples:
        assert sample["prompt"] and sample["expected"] and isinstance(sample["base"], str)
        assert isinstance(sample["with_adapter"], str)
    chart_page = (output / "loss_chart.html").read_text()
    assert "eval loss" in chart_page and samples[0]["expected"] in chart_page

    # 3. The model card in the adapter directory, loadable by huggingface_hub, with the figures.
    from huggingface_hub import ModelCard

    card = ModelCard.load(adapter / "README.md")
    assert card.data.base_model == str(tiny_model_dir) and card.data.library_name == "peft"
    assert f"{summary['final_eval_loss']:.4f}" in card.text

    # 4. The adapter's asset event, with the run's figures.
    assert [event["uri"] for event in ran["events"]] == [adapter.as_uri()]
    extra = ran["events"][0]["extra"]
    assert extra["final_eval_loss"] == summary["final_eval_loss"] and extra["global_step"] == 6

    # 5. OpenLineage: the task's START and COMPLETE events name the dataset and base model as inputs and the adapter
    # as output; the COMPLETE event carries the run's figures.
    task_events = [e for e in _lineage_events(lineage_file) if e["job"]["name"] == f"{DAG_ID}.train"]
    by_type = {e["eventType"]: e for e in task_events}
    assert {"START", "COMPLETE"} <= set(by_type), [e["eventType"] for e in task_events]
    for event in (by_type["START"], by_type["COMPLETE"]):
        assert event["job"]["namespace"] == NAMESPACE
        assert {(d["namespace"], d["name"]) for d in event["inputs"]} == {
            ("file", str(dataset)), ("file", str(tiny_model_dir))}
        assert [(d["namespace"], d["name"]) for d in event["outputs"]] == [("file", str(adapter))]
    facet = by_type["COMPLETE"]["run"]["facets"]["loraTraining"]
    assert facet["method"] == "LoRA" and facet["loraR"] == kwargs.get("lora_r", 16)
    assert facet["figures"]["final_loss"] == summary["final_loss"]
    assert facet["figures"]["min_eval_loss"] == summary["min_eval_loss"]
    assert facet["figures"]["best_eval_step"] == summary["best_eval_step"]
    assert facet["adapter"] == str(adapter)
    assert "figures" not in by_type["START"]["run"]["facets"]["loraTraining"]  # nothing measured yet

    # 6. MLflow: the run named in the summary (and so in XCom), read back through MLflow's client: the spec's
    # parameters, every logged step, each evaluation, the final figures, the adapter with its model card and the chart.
    from mlflow import MlflowClient

    tracked = summary["mlflow"]
    assert (tracked["experiment"], tracked["tracking_uri"]) == (EXPERIMENT, mlflow_server)
    client = MlflowClient(tracking_uri=mlflow_server)
    mlflow_run = client.get_run(tracked["run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == f"{DAG_ID}.train"
    assert mlflow_run.data.tags["airflow.run_id"] == ran["run_id"]
    assert mlflow_run.data.params["spec.eval_steps"] == "2" and mlflow_run.data.params["spec.sample_prompts"] == "2"
    losses = sorted(client.get_metric_history(tracked["run_id"], "loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [row["step"] for row in result["history"] if "loss" in row]
    eval_losses = sorted(client.get_metric_history(tracked["run_id"], "eval_loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in eval_losses] == [(row["step"], pytest.approx(row["eval_loss"])) for row in evals]
    assert mlflow_run.data.metrics["best_eval_step"] == summary["best_eval_step"]
    assert {"adapter/README.md", "adapter/loss_chart.png", "adapter/adapter_model.safetensors"} <= {
        a.path for a in client.list_artifacts(tracked["run_id"], "adapter")}
    assert "loss_chart.png" in {a.path for a in client.list_artifacts(tracked["run_id"])}
