"""MLflow tracking (the mlflow extra): the spec's checks, and a tiny training run logged to a real ``mlflow server``
(SQLite backend, local artifact store) on 127.0.0.1, read back through MLflow's own client."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from airflow_provider_lora.core.spec import MLFLOW_DEFAULT_EXPERIMENT, LoRASpec, SpecError
from tests.fixtures.airflow_services import free_port
from tests.trainer_helpers import arithmetic_rows, history, make_spec, write_jsonl



# ---- the spec -------------------------------------------------------------------------------------------------------

def _errors(**values) -> list[str]:
    with pytest.raises(SpecError) as caught:
        LoRASpec.parse(values)
    return caught.value.errors


def test_tracking_is_off_by_default():
    spec = LoRASpec.parse({})
    assert spec.mlflow_tracking_uri is None and spec.mlflow_experiment is None


@pytest.mark.parametrize("uri", ["http://mlflow.mlflow:5000", "https://mlflow.example/prefix", "databricks",
                                 "databricks://profile", "file:///mnt/pvc/mlruns"])
def test_accepted_tracking_uris(uri):
    assert LoRASpec.parse({"mlflow_tracking_uri": uri}).mlflow_tracking_uri == uri


def test_an_empty_form_field_means_no_tracking():
    spec = LoRASpec.parse({"mlflow_tracking_uri": "", "mlflow_experiment": ""})
    assert spec.mlflow_tracking_uri is None and spec.mlflow_experiment is None


@pytest.mark.parametrize("uri", ["http://alice:s3cr3t@mlflow:5000", "https://token-s3cr3t@mlflow.example"])
def test_credentials_in_the_uri_are_refused_without_echoing_them(uri):
    [error] = _errors(mlflow_tracking_uri=uri)
    assert error.startswith("mlflow_tracking_uri=") and "credentials" in error
    assert "secret_env={'MLFLOW_TRACKING_TOKEN'" in error and "MLFLOW_TRACKING_USERNAME" in error
    assert "s3cr3t" not in error and "***@" in error


@pytest.mark.parametrize("uri, reason", [
    ("sqlite:///tmp/mlflow.db", "sqlite:// is not a scheme"),
    ("postgresql://db/mlflow", "postgresql:// is not a scheme"),
    ("mlflow.mlflow:5000", "mlflow.mlflow:// is not a scheme"),
    ("mlruns", "a URI without a scheme"),
    ("file://relative/dir", "file:///absolute/dir"),
    ("http://:5000", "needs a host"),
    ("http://mlflow:port", "is not a URI"),
    (" http://mlflow:5000", "whitespace"),
])
def test_uris_mlflow_cannot_track_to_are_refused(uri, reason):
    [error] = _errors(mlflow_tracking_uri=uri)
    assert error.startswith(f"mlflow_tracking_uri={uri!r} is not valid:") and reason in error
    assert "accepted" in error or reason in ("needs a host", "is not a URI", "whitespace", "file:///absolute/dir")


def test_credentials_in_envs_tracking_uri_are_refused_too():
    [error] = _errors(envs="MLFLOW_TRACKING_URI=http://alice:s3cr3t@mlflow:5000")
    assert "MLFLOW_TRACKING_URI" in error and "credentials" in error and "s3cr3t" not in error
    assert LoRASpec.parse({"envs": "MLFLOW_TRACKING_URI=http://mlflow:5000"}).env_vars["MLFLOW_TRACKING_URI"]


def test_experiment_name_is_checked():
    [error] = _errors(mlflow_experiment="bad\nname")
    assert error.startswith("mlflow_experiment='bad\\nname' is not valid")
    assert LoRASpec.parse({"mlflow_experiment": "support-bot"}).mlflow_experiment == "support-bot"


def test_settings_come_from_the_spec_then_the_environment(monkeypatch):
    from lora_trainer import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert tracking.settings(LoRASpec.parse({})) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "env-experiment")
    assert tracking.settings(LoRASpec.parse({}))[:2] == ("http://from-env:5000", "env-experiment")
    spec = LoRASpec.parse({"mlflow_tracking_uri": "http://from-spec:5000", "mlflow_experiment": "spec-experiment"})
    assert tracking.settings(spec) == ("http://from-spec:5000", "spec-experiment", "mlflow_tracking_uri")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    assert tracking.settings(spec.model_copy(update={"mlflow_experiment": None}))[1] == MLFLOW_DEFAULT_EXPERIMENT


# ---- before training: mlflow missing, server down --------------------------------------------------------------------

def test_missing_mlflow_fails_before_anything_loads(monkeypatch):
    from lora_trainer import tracking

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError, as without the extra
    spec = LoRASpec.parse({"mlflow_tracking_uri": "http://127.0.0.1:9"})
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.connect(spec, is_main_process=True, log=print)
    assert "mlflow_tracking_uri='http://127.0.0.1:9'" in str(caught.value)
    assert "airflow-provider-lora[mlflow]" in str(caught.value)
    # Other ranks log nothing and need no mlflow.
    assert tracking.connect(spec, is_main_process=False, log=print) is None


def test_unreachable_server_fails_early_with_the_uri(monkeypatch):
    from lora_trainer import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default retries take minutes
    spec = LoRASpec.parse({"mlflow_tracking_uri": f"http://127.0.0.1:{free_port()}"})
    started = time.monotonic()
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.connect(spec, is_main_process=True, log=print)
    message = str(caught.value)
    assert message.startswith(f"mlflow_tracking_uri={spec.mlflow_tracking_uri!r}: the MLflow tracking server")
    assert "reachable" in message and "MLFLOW_TRACKING_TOKEN" in message
    assert time.monotonic() - started < 60


def test_the_trainer_stops_before_loading_with_exit_code_2(monkeypatch, tiny_model_dir, tmp_path, capsys):
    """Through the CLI's entry: one error line, no traceback, nothing trained or written."""
    from airflow_provider_lora.core.contract import ERROR_PREFIX
    from lora_trainer.train import main_entry

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))
    output = tmp_path / "run"
    spec = make_spec(tiny_model_dir, data, output, mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert main_entry(spec) == 2
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith(ERROR_PREFIX)]
    assert "mlflow_tracking_uri=" in line and "reachable from the trainer" in line
    assert not (output / "metrics.jsonl").exists() and not (output / "adapter").exists()


# ---- a real server (tests/fixtures/mlflow.py) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tiny_model_dir, tmp_path_factory):
    """Two epochs of the tiny model with an eval every 3 steps, logged to the server."""
    from lora_trainer.train import run

    data = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", arithmetic_rows())
    output = tmp_path_factory.mktemp("tracked") / "run"
    spec = make_spec(tiny_model_dir, data, output, num_epochs=2, eval_fraction=0.25, eval_steps=3, lora_r=4,
                     lora_alpha=8, sample_prompts=0, mlflow_tracking_uri=mlflow_server,
                     mlflow_experiment="lora-tests")
    environment_before = os.environ.get("MLFLOW_TRACKING_URI")
    outcome = run(spec)
    assert os.environ.get("MLFLOW_TRACKING_URI") == environment_before  # mlflow.set_tracking_uri's write undone
    return output, outcome


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.mark.slow
def test_summary_names_the_run(tracked_run, mlflow_server):
    output, outcome = tracked_run
    written = json.loads((output / "summary.json").read_text())["mlflow"]
    assert written == outcome.summary["mlflow"]
    run = _client(mlflow_server).get_run(written["run_id"])
    experiment = _client(mlflow_server).get_experiment(run.info.experiment_id)
    assert (written["experiment_id"], written["experiment"], written["tracking_uri"]) == (
        experiment.experiment_id, "lora-tests", mlflow_server)
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_parameters_are_logged(tracked_run, mlflow_server):
    output, outcome = tracked_run
    params = _client(mlflow_server).get_run(outcome.summary["mlflow"]["run_id"]).data.params
    # TrainingArguments, through transformers' MLflowCallback
    assert float(params["learning_rate"]) == 2e-3 and int(params["num_train_epochs"]) == 2
    assert int(params["per_device_train_batch_size"]) == outcome.summary["batch"]["micro_batch"]
    # the spec, and what the trainer decided
    assert params["spec.lora_r"] == "4" and params["spec.lora_alpha"] == "8" and params["spec.eval_steps"] == "3"
    assert params["spec.mlflow_experiment"] == "lora-tests"
    assert params["lora.target_modules"] == ",".join(outcome.summary["lora"]["target_modules"])
    assert int(params["batch.grad_accum"]) == outcome.summary["batch"]["grad_accum"]


@pytest.mark.slow
def test_every_logged_step_is_a_metric(tracked_run, mlflow_server):
    output, outcome = tracked_run
    client, run_id = _client(mlflow_server), outcome.summary["mlflow"]["run_id"]
    rows = history(output)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert len(train_rows) == outcome.summary["global_step"] and len(eval_rows) >= 2
    losses = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in losses] == [(r["step"], pytest.approx(r["loss"])) for r in train_rows]
    evals = sorted(client.get_metric_history(run_id, "eval_loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in evals] == [(r["step"], pytest.approx(r["eval_loss"])) for r in eval_rows]
    rates = sorted(client.get_metric_history(run_id, "learning_rate"), key=lambda m: m.step)
    assert [m.value for m in rates] == [pytest.approx(r["learning_rate"]) for r in train_rows]


@pytest.mark.slow
def test_final_figures_are_metrics(tracked_run, mlflow_server):
    output, outcome = tracked_run
    metrics = _client(mlflow_server).get_run(outcome.summary["mlflow"]["run_id"]).data.metrics
    summary = outcome.summary
    for name in ("final_loss", "min_loss", "first_loss", "final_eval_loss", "min_eval_loss", "best_eval_step",
                 "global_step", "trainable_parameters"):
        assert metrics[name] == pytest.approx(summary[name]), name
    assert metrics["final_eval_loss"] < metrics["first_loss"]


@pytest.mark.slow
def test_adapter_chart_and_summary_are_artifacts(tracked_run, mlflow_server, tmp_path):
    import mlflow.artifacts

    output, outcome = tracked_run
    run_id = outcome.summary["mlflow"]["run_id"]
    client = _client(mlflow_server)
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"adapter", "loss_chart.png", "loss_chart.html", "summary.json", "metrics.jsonl"} <= top
    adapter = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter
    # Downloaded through the server: the same bytes as the published run.
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter",
                                                     dst_path=str(tmp_path), tracking_uri=mlflow_server))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (local / name).read_bytes() == (output / "adapter" / name).read_bytes()
    chart = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="loss_chart.png",
                                                     dst_path=str(tmp_path), tracking_uri=mlflow_server))
    assert chart.read_bytes() == (output / "loss_chart.png").read_bytes()
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_failed_training_marks_the_run_failed(mlflow_server, tiny_model_dir, tmp_path, monkeypatch):
    """A run that fails after tracking started says FAILED in MLflow instead of staying RUNNING."""
    from lora_trainer import train as train_module

    def fail(*args, **kwargs):
        raise RuntimeError("training broke")

    monkeypatch.setattr(train_module, "_train", fail)
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))
    spec = make_spec(tiny_model_dir, data, tmp_path / "run", mlflow_tracking_uri=mlflow_server,
                     mlflow_experiment="lora-tests-failed")
    with pytest.raises(RuntimeError, match="training broke"):
        train_module.run(spec)
    client = _client(mlflow_server)
    experiment = client.get_experiment_by_name("lora-tests-failed")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.params["spec.mlflow_experiment"] == "lora-tests-failed"

