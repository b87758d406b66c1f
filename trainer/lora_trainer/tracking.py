"""MLflow tracking (the ``mlflow`` extra), on rank 0 only.

When a tracking URI is configured (spec ``mlflow_tracking_uri``, else the MLFLOW_TRACKING_URI environment variable),
the run is logged to MLflow: transformers' own MLflowCallback logs the TrainingArguments, the model config and
every logged step (loss, grad_norm, learning_rate, eval_loss, ...); this module adds the spec's parameters, the
final figures of summary.json as metrics, and the adapter, the chart, summary.json and metrics.jsonl as artifacts.
Credentials come from MLflow's own environment variables (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME and
_PASSWORD), which pods get from Kubernetes Secrets (secret_env), never from the spec.

mlflow is imported here only, and only when tracking is on: without the extra, an untracked run never needs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from airflow_provider_lora.core.contract import ADAPTER_DIR, CHART_HTML, CHART_PNG, METRICS_FILE, SUMMARY_FILE
from airflow_provider_lora.core.spec import MLFLOW_CREDENTIALS_HINT, MLFLOW_DEFAULT_EXPERIMENT, LoRASpec, redact_uri
from lora_trainer.export import launching_task

SUMMARY_KEY = "mlflow"  # summary.json[SUMMARY_KEY]: {"run_id", "experiment_id", "experiment", "tracking_uri"}
# summary.json figures logged as metrics at the end (the per-step ones come from MLflowCallback).
FINAL_METRICS = ("final_loss", "min_loss", "first_loss", "base_eval_loss", "final_eval_loss", "min_eval_loss",
                 "best_eval_step", "global_step", "epochs", "tokens", "train_runtime_seconds", "tokens_per_second",
                 "wall_seconds", "peak_memory_bytes", "trainable_parameters", "total_parameters")
URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variable, read when the spec sets no URI
SPEC_PARAM_PREFIX = "spec."  # the spec's fields, apart from TrainingArguments' own names the callback logs


class TrackingError(RuntimeError):
    """Tracking is configured but cannot work: mlflow is not installed, or the server cannot be reached."""


def settings(spec: LoRASpec) -> tuple[str, str, str] | None:
    """(tracking URI, experiment name, where the URI came from), or None when tracking is off."""
    if spec.mlflow_tracking_uri:
        uri, source = spec.mlflow_tracking_uri, "mlflow_tracking_uri"
    elif os.environ.get(URI_ENV):
        uri, source = os.environ[URI_ENV], f"the {URI_ENV} environment variable"
    else:
        return None
    experiment = spec.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_DEFAULT_EXPERIMENT
    return uri, experiment, source


class Tracker:
    """One MLflow run: connected (experiment set) before the model loads, started before training, ended after the
    run is published (FINISHED) or when anything fails (FAILED)."""

    def __init__(self, mlflow: Any, uri: str, experiment: Any, log: Callable[[str], None],
                 environment_before: str | None):
        self.mlflow, self.uri, self.experiment, self.log = mlflow, uri, experiment, log
        self.environment_before = environment_before  # MLFLOW_TRACKING_URI before connect(), put back at the end
        self.run_id: str | None = None

    def start(self, spec: LoRASpec) -> None:
        task = launching_task() or {}
        name = (f"{task['dag_id']}.{task['task_id']}" if task.get("dag_id") and task.get("task_id")
                else Path(spec.output_uri.rstrip("/")).name or None)
        tags = {"airflow_provider_lora.output_uri": spec.output_uri, "airflow_provider_lora.base_model":
                spec.base_model, **{f"airflow.{k}": str(v) for k, v in task.items() if v is not None}}
        run = self.mlflow.start_run(experiment_id=self.experiment.experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        self.mlflow.log_params({SPEC_PARAM_PREFIX + k: _param(v) for k, v in _spec_params(spec).items()})
        self.log(f"MLflow: run {self.run_id} in experiment {self.experiment.name!r} at {redact_uri(self.uri)}")

    def callback(self) -> Any:
        """transformers' MLflowCallback, made once: it logs into the run started above (it starts its own only when
        none is active) and, made once, keeps that run across the in-process retries after running out of
        memory without logging the changed batch arguments again (MLflow refuses to change a parameter)."""
        from transformers.integrations import MLflowCallback

        return MLflowCallback()

    def reference(self) -> dict[str, Any]:
        """Where downstream tasks find the run (summary.json's "mlflow" key)."""
        return {"run_id": self.run_id, "experiment_id": self.experiment.experiment_id,
                "experiment": self.experiment.name, "tracking_uri": redact_uri(self.uri)}

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        """The final figures as metrics, the run's files as artifacts, then the run ends. The run is already
        published: a tracking failure here is said loudly but does not fail the training."""
        try:
            step = summary.get("global_step") or 0
            metrics = {k: float(summary[k]) for k in FINAL_METRICS
                       if isinstance(summary.get(k), (int, float)) and not isinstance(summary.get(k), bool)}
            self.mlflow.log_metrics(metrics, step=step)
            batch = summary.get("batch") or {}
            self.mlflow.log_params({f"batch.{k}": v for k, v in batch.items()} | {
                "lora.target_modules": _param(",".join((summary.get("lora") or {}).get("target_modules") or [])),
                "dtype": summary.get("dtype"), "device": summary.get("device")})
            self.mlflow.log_artifacts(str(run_dir / ADAPTER_DIR), artifact_path=ADAPTER_DIR)
            for name in (CHART_PNG, CHART_HTML, SUMMARY_FILE, METRICS_FILE):
                if (run_dir / name).exists():
                    self.mlflow.log_artifact(str(run_dir / name))
            self.mlflow.flush_async_logging()  # MLflowCallback logs asynchronously
            self.mlflow.end_run("FINISHED")
            self.log(f"MLflow: logged run {self.run_id} (metrics, adapter, chart, summary)")
        except Exception as exc:
            self.log(f"WARNING: MLflow: the run is trained and published, but logging it to {redact_uri(self.uri)} "
                     f"failed ({type(exc).__name__}: {exc}); MLflow run {self.run_id} is marked FAILED")
            self.end("FAILED")
        finally:
            _restore_environment(self.environment_before)

    def end(self, status: str) -> None:
        """End the run (if one was started) with ``status``; never raises, the caller is already failing."""
        try:
            if self.mlflow.active_run() is not None:
                self.mlflow.flush_async_logging()
                self.mlflow.end_run(status)
        except Exception as exc:
            self.log(f"WARNING: MLflow: could not end run {self.run_id} ({type(exc).__name__}: {exc})")
        finally:
            _restore_environment(self.environment_before)


def connect(spec: LoRASpec, is_main_process: bool, log: Callable[[str], None]) -> Tracker | None:
    """Before anything loads: mlflow is installed and the server answers (the experiment is looked up, and
    created when missing), so a wrong URI fails in seconds rather than after hours of training. None when tracking
    is off, and on ranks other than 0 (they log nothing)."""
    found = settings(spec)
    if found is None or not is_main_process:
        return None
    uri, name, source = found
    try:
        import mlflow
    except ImportError as exc:
        raise TrackingError(f"MLflow tracking is set ({source}={redact_uri(uri)!r}) but mlflow is not installed "
                            f"here ({exc}): install the extra airflow-provider-lora[mlflow] in the training image, "
                            "or leave mlflow_tracking_uri unset") from None
    environment_before = os.environ.get(URI_ENV)
    mlflow.set_tracking_uri(uri)  # also sets URI_ENV, for subprocesses; put back when the run ends
    try:
        experiment = mlflow.set_experiment(name)
    except Exception as exc:
        _restore_environment(environment_before)
        raise TrackingError(
            f"{source}={redact_uri(uri)!r}: the MLflow tracking server did not accept experiment {name!r} "
            f"({type(exc).__name__}: {str(exc)[:300]}); check that the server runs and is reachable from the trainer, "
            f"the URI, and the credentials: {MLFLOW_CREDENTIALS_HINT}") from None
    log(f"MLflow: tracking to {redact_uri(uri)}, experiment {name!r} (id {experiment.experiment_id})")
    return Tracker(mlflow, uri, experiment, log, environment_before)


def _restore_environment(value: str | None) -> None:
    """Put MLFLOW_TRACKING_URI back as it was before connect(): mlflow.set_tracking_uri writes it into os.environ,
    where a later run in the same process (or a subprocess it starts) would take it for its own setting."""
    if value is None:
        os.environ.pop(URI_ENV, None)
    else:
        os.environ[URI_ENV] = value


def _spec_params(spec: LoRASpec) -> dict[str, Any]:
    """The spec's fields as parameters: unset ones left out, envs by name only (values may be private)."""
    values = {k: v for k, v in spec.model_dump().items() if v is not None and v != ""}
    if "envs" in values:
        values["envs"] = ",".join(spec.env_vars)
    if values.get("mlflow_tracking_uri"):
        values["mlflow_tracking_uri"] = redact_uri(values["mlflow_tracking_uri"])
    return values


def _param(value: Any) -> str:
    # MLflow keeps at most 6000 characters of a parameter (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]
