"""What train_model does inside its KFP task: inputs -> LoRASpec -> launcher -> the run -> KFP output artifacts.

Runs in the KFP task's environment (the training image: kfp, this package and the trainer, no Airflow). The seed's
``training_*`` inputs are LoRASpec fields with a prefix; everything the seed has no input for comes from the task's
environment (docs/kfp.md):

- ``LORA_KFP_LAUNCHER``: ``trainjob`` (the default, as the seed), ``pod`` or ``local`` (training in the task's own
  pod; ``in-task`` is accepted as another name for it).
- ``LORA_KFP_SPEC``: JSON object of the LoRASpec fields beyond the seed's (dataset, save_merged, max_steps, ...).
- ``LORA_KFP_DRY_RUN``: ``true`` runs the preflight plan (data, model, memory estimate) where the training would
  run, without a GPU, and writes it to output_metrics and output_loss_chart instead of training;
  ``LORA_KFP_PLAN_MEMORY_GIB`` states the accelerator memory per process it compares its estimate with.
- ``LORA_KFP_POD_OPTIONS``, ``LORA_KFP_HF_TOKEN_SECRET``, ``KUBERNETES_SERVER_URL``...: where and how a pod or
  TrainJob is launched (see cluster.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.contract import DATA_FILE_BUILDERS
from airflow_provider_lora.core.launchers.local import LOCAL_LAUNCHER
from airflow_provider_lora.core.results import RunResult, load_run_result
from airflow_provider_lora.core.spec import (DATA, LORA, QUANT, TRAINING, LoRASpec, SpecError, format_key_values,
                                             parse_key_values, seed_parameter_names)

PREFIX = "training_"
STATUS = "training completed"
LAUNCHERS = ("trainjob", "pod", LOCAL_LAUNCHER)
OTHER_NAMES = {"in-task": LOCAL_LAUNCHER}  # the name the KFP docs used first
DEFAULT_LAUNCHER = "trainjob"
ENV_LAUNCHER = "LORA_KFP_LAUNCHER"
ENV_SPEC = "LORA_KFP_SPEC"
ENV_DRY_RUN = "LORA_KFP_DRY_RUN"
ENV_PLAN_MEMORY = "LORA_KFP_PLAN_MEMORY_GIB"
DRY_RUN_STATUS = "dry run: plan written"
RUNS_DIR = "lora-runs"  # under pvc_path: one directory per task execution
DATA_DIR = "lora-data"  # under pvc_path: the dataset staged for that execution, copied fresh every time
HYPERPARAMETER_SECTIONS = (LORA, QUANT, TRAINING, DATA)
# A dataset artifact is often a file without a suffix; the trainer picks its reader by suffix.
_PARQUET_MAGIC = b"PAR1"


# ---- inputs -> LoRASpec ---------------------------------------------------------------------------------------------

def spec_field(input_name: str) -> str | None:
    """The LoRASpec field a component input sets (``training_lora_r`` -> ``lora_r``), None for the others."""
    return input_name[len(PREFIX):] if input_name.startswith(PREFIX) else None


def spec_values(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The component's ``training_*`` inputs as LoRASpec values (the operator takes the same names unprefixed)."""
    return {spec_field(name): value for name, value in inputs.items() if spec_field(name)}


def json_object_setting(env: Mapping[str, str], variable: str, of: str, example: str) -> dict[str, Any]:
    """The JSON object in environment variable ``variable`` ({} when unset); a clear error naming it otherwise."""
    text = env.get(variable, "").strip()
    try:
        value = json.loads(text) if text else {}
    except ValueError as exc:
        raise ValueError(f"{variable} is not valid JSON ({exc}); expected an object of {of} such as {example}") \
            from None
    if not isinstance(value, dict):
        raise ValueError(f"{variable} must be a JSON object of {of}, got {type(value).__name__}")
    return value


def extra_spec_values(env: Mapping[str, str]) -> dict[str, Any]:
    """LORA_KFP_SPEC: LoRASpec fields the seed has no input for. A seed field there is an error (it has an input)."""
    values = json_object_setting(env, ENV_SPEC, "LoRASpec fields", '{"max_steps": 100, "save_merged": true}')
    seed = set(seed_parameter_names())
    accepted = [n for n in LoRASpec.model_fields if n not in seed]
    for name in values:
        if name in seed:
            raise ValueError(f"{ENV_SPEC} sets {name!r}, which is the component input {PREFIX}{name}: set it there")
        if name not in LoRASpec.model_fields:
            raise ValueError(f"{ENV_SPEC} sets {name!r}, which is not a LoRASpec field; accepted: "
                             f"{', '.join(accepted)}")
    return values


def _as_input_names(message: str) -> str:
    """A SpecError line names the spec field; a KFP user knows it as the training_* input."""
    for name in seed_parameter_names():
        if message.startswith((f"{name}=", f"{name} ", f"{name}:")):
            return PREFIX + message
    return message


def parse_spec(values: dict[str, Any]) -> LoRASpec:
    try:
        return LoRASpec.parse(values)
    except SpecError as exc:
        raise ValueError("invalid train_model inputs:\n  " + "\n  ".join(_as_input_names(e) for e in exc.errors)) \
            from None


def choose_launcher(env: Mapping[str, str]) -> str:
    launcher = env.get(ENV_LAUNCHER, "").strip() or DEFAULT_LAUNCHER
    launcher = OTHER_NAMES.get(launcher, launcher)
    if launcher not in LAUNCHERS:
        raise ValueError(f"{ENV_LAUNCHER}={launcher!r} is not valid: accepted: {', '.join(LAUNCHERS)}")
    return launcher


def check_base_model(base_model: str) -> None:
    if base_model.startswith("oci://"):
        raise ValueError(f"training_base_model={base_model!r}: oci:// models (modelcars) are not supported by this "
                         "component yet; give a Hugging Face id, a path on the workspace (pvc_path) or a mounted "
                         "volume, or an s3:// model directory copied to the workspace first")


def dry_run_setting(env: Mapping[str, str]) -> tuple[bool, float | None]:
    """LORA_KFP_DRY_RUN (true/false) and LORA_KFP_PLAN_MEMORY_GIB (a number of GiB > 0), each checked."""
    text = env.get(ENV_DRY_RUN, "").strip().lower()
    if text not in ("", "true", "false", "1", "0"):
        raise ValueError(f"{ENV_DRY_RUN}={env[ENV_DRY_RUN]!r} is not valid: give true or false")
    memory_text = env.get(ENV_PLAN_MEMORY, "").strip()
    try:
        memory = float(memory_text) if memory_text else None
    except ValueError:
        memory = -1.0
    if memory is not None and not memory > 0:
        raise ValueError(f"{ENV_PLAN_MEMORY}={memory_text!r} is not valid: give the accelerator memory per process "
                         "in GiB, such as 80")
    return text in ("true", "1"), memory


def plan_metrics(plan: dict[str, Any]) -> dict[str, float]:
    """The plan's numbers, one level deep, as ``<section>_<name>`` (booleans as 0/1)."""
    out: dict[str, float] = {}
    for section, values in plan.items():
        for name, value in (values.items() if isinstance(values, dict) else ()):
            if isinstance(value, (bool, int, float)) and value == value:
                out[f"{section}_{name}"] = float(value)
    return out


def write_plan_outputs(plan: dict[str, Any], output_metrics: Any, output_page: Any) -> None:
    """A dry run's outputs: the plan's numbers as metrics, the whole plan as a page (the loss chart's output)."""
    import html

    for name, value in plan_metrics(plan).items():
        output_metrics.log_metric(name, value)
    page = Path(output_page.path)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("<!doctype html><meta charset=utf-8><title>LoRA preflight plan</title><h1>Preflight plan "
                    "(nothing trained; every figure of memory and time is an estimate)</h1><pre>"
                    + html.escape(json.dumps(plan, indent=2)) + "</pre>", encoding="utf-8")


def run_key(output_model: Any) -> str:
    """One key per task execution: KFP gives every execution its own output artifact URI. A retry of the same
    execution gets the same key, so it finds the run (or pod) an earlier try made."""
    return hashlib.sha256(output_model.uri.encode()).hexdigest()[:16]


# ---- the dataset -----------------------------------------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"


def _suffix_for(path: Path) -> str:
    """A reader suffix for a data file that has none (KFP names artifacts without one)."""
    if path.suffix in DATA_FILE_BUILDERS:
        return path.suffix
    inner = Path(path.stem).suffix
    if path.suffix == ".gz" and DATA_FILE_BUILDERS.get(inner) in ("json", "csv"):
        return inner + ".gz"  # rows.jsonl.gz: the trainer reads it compressed, by its inner suffix
    with path.open("rb") as f:
        head = f.read(4096)
    if head.startswith(_GZIP_MAGIC):  # a compressed artifact without a suffix: look inside
        import gzip
        import zlib

        try:
            with gzip.open(path, "rb") as f:
                inside = f.read(4096).lstrip()[:1]
        except (OSError, EOFError, zlib.error):
            inside = b""
        if inside in (b"[", b"{"):
            return (".json" if inside == b"[" else ".jsonl") + ".gz"
    if head.startswith(_PARQUET_MAGIC):
        return ".parquet"
    first = head.lstrip()[:1]
    if first == b"[":
        return ".json"
    if first == b"{":
        return ".jsonl"
    raise ValueError(f"dataset artifact {path}: cannot tell its format (no suffix, not parquet or JSON); accepted: "
                     f"{', '.join(DATA_FILE_BUILDERS)} (name the file with its suffix, or give a directory of such "
                     "files)")


def stage_dataset(dataset: Any, extras: dict[str, Any], stage_dir: Path) -> str:
    """The ``dataset`` value for the spec: the artifact copied fresh into ``stage_dir`` (on the workspace, so a
    launched pod reads it; copied every time, so a stale copy is never reused), or LORA_KFP_SPEC's dataset URI."""
    if dataset is None:
        uri = extras.get("dataset") or ""
        if not uri:
            raise ValueError(f"no training data: connect the dataset input (a Dataset artifact, file or directory) or "
                             f"set {ENV_SPEC}='{{\"dataset\": \"s3://bucket/train.jsonl\"}}' (s3://, a Hugging Face "
                             "dataset id, or a path on the workspace)")
        return uri
    if extras.get("dataset"):
        raise ValueError(f"the dataset input and {ENV_SPEC}'s dataset are both set: give one")
    src = Path(dataset.path)
    if not src.exists():
        if storage.is_s3(dataset.uri):
            return dataset.uri  # the trainer reads s3:// itself
        raise FileNotFoundError(f"dataset artifact {dataset.uri}: no local copy at {src}")
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    if src.is_dir():
        return str(storage.download(str(src), stage_dir / "data"))
    dest = stage_dir / ("data" + _suffix_for(src))
    shutil.copyfile(src, dest)
    return str(dest)


# ---- the run -> KFP outputs ----------------------------------------------------------------------------------------

def metrics_of(result: RunResult, spec: LoRASpec) -> dict[str, float]:
    """Every numeric summary value (losses, steps, tokens, tokens/s, runtime, parameters, memory), the batch plan,
    and the hyperparameters (LoRA, quantisation, training and data fields of the spec; booleans as 0/1)."""
    out: dict[str, float] = {}

    def number(value: Any) -> float | None:
        if isinstance(value, bool):
            return float(value)
        if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
            return float(value)
        return None

    for name, value in result.summary.items():
        if not isinstance(value, bool) and number(value) is not None:
            out[name] = number(value)
    for name, value in (result.summary.get("batch") or {}).items():
        if number(value) is not None and name not in out:
            out[name] = number(value)
    for name, field in LoRASpec.model_fields.items():
        section = (field.json_schema_extra or {}).get("section")
        value = number(getattr(spec, name))
        if section in HYPERPARAMETER_SECTIONS and value is not None and name not in out:
            out[name] = value
    return out


def model_metadata(result: RunResult, spec: LoRASpec) -> dict[str, Any]:
    lora = result.summary.get("lora") or {}
    return {
        "base_model": spec.base_model,
        "lora_r": spec.lora_r,
        "lora_alpha": spec.lora_alpha,
        "target_modules": lora.get("target_modules") or spec.target_modules,
        "artifacts": dict(result.artifacts),
        "merged": "merged" in result.artifacts,
        "framework": "peft",
    }


def write_outputs(result: RunResult, spec: LoRASpec, output_model: Any, output_metrics: Any,
                  output_loss_chart: Any) -> None:
    """The adapter (and merged model) into output_model, the metrics, and the run's loss chart page."""
    model_dir = Path(output_model.path)
    for name in ("adapter", "merged"):
        if name in result.artifacts:
            storage.download(result.artifacts[name], model_dir / name)
    output_model.metadata.update(model_metadata(result, spec))
    for name, value in metrics_of(result, spec).items():
        output_metrics.log_metric(name, value)
    chart = Path(output_loss_chart.path)
    chart.parent.mkdir(parents=True, exist_ok=True)
    chart.write_text(storage.read_text(result.artifacts["chart_html"]), encoding="utf-8")


# ---- the component -----------------------------------------------------------------------------------------------

def run_component(inputs: dict[str, Any], *, env: Mapping[str, str] | None = None,
                  log: Callable[[str], None] = print) -> str:
    """The body of train_model: validate everything, launch, collect, write the outputs."""
    env = os.environ if env is None else env
    launcher = choose_launcher(env)
    dry_run, plan_memory_gib = dry_run_setting(env)
    extras = extra_spec_values(env)
    values = spec_values(inputs)
    check_base_model(values.get("base_model") or "")
    pvc_path = inputs.get("pvc_path") or ""
    if not pvc_path or not Path(pvc_path).is_dir():
        raise ValueError(f"pvc_path={pvc_path!r} is not a directory: pass dsl.WORKSPACE_PATH_PLACEHOLDER (and a "
                         "workspace in the pipeline's PipelineConfig) or a mounted PVC path")
    launch = None
    if launcher != LOCAL_LAUNCHER:
        from airflow_provider_lora.kfp.cluster import launch_settings

        launch = launch_settings(env, inputs.get("kubernetes_config"), pvc_path, log)
        values["envs"] = _with_task_env(values.get("envs") or "", launch.envs)
    key = run_key(inputs["output_model"])
    values["output_uri"] = extras.pop("output_uri", None) or str(Path(pvc_path) / RUNS_DIR / key)
    values["dataset"] = stage_dataset(inputs.get("dataset"), extras, Path(pvc_path) / DATA_DIR / key)
    extras.pop("dataset", None)
    spec = parse_spec({**values, **extras})
    log(f"[train_model] launcher={launcher} base_model={spec.base_model} dataset={spec.dataset} "
        f"output={spec.output_uri}")

    if dry_run:
        if launcher == LOCAL_LAUNCHER:
            from airflow_provider_lora.core.launchers.local import plan_local

            plan = plan_local(spec, on_line=log, memory_gib=plan_memory_gib)
        else:
            from airflow_provider_lora.kfp.cluster import plan_on_cluster

            plan = plan_on_cluster(spec, launch, key=key, env=env, memory_gib=plan_memory_gib, log=log)
        write_plan_outputs(plan, inputs["output_metrics"], inputs["output_loss_chart"])
        log(f"[train_model] dry run: the plan fits ({plan['memory']['required_bytes'] / 2 ** 30:.2f} GiB estimated "
            f"of {plan['memory']['available_bytes'] / 2 ** 30:.2f} GiB); nothing was trained")
        return DRY_RUN_STATUS
    if storage.is_complete(spec.output_uri) and not spec.overwrite_output:
        # A retry after the training finished: collect what the earlier try published instead of training again.
        log(f"[train_model] {spec.output_uri} already holds this execution's completed run: collecting it")
        result = load_run_result(spec.output_uri)
    elif launcher == LOCAL_LAUNCHER:
        result = _train_in_task(spec, log)
    else:
        from airflow_provider_lora.kfp.cluster import train_on_cluster

        result = train_on_cluster(spec, launcher, launch, key=key, env=env, log=log)
    write_outputs(result, spec, inputs["output_model"], inputs["output_metrics"], inputs["output_loss_chart"])
    summary = result.summary
    log(f"[train_model] done: final loss {summary.get('final_loss')} (min {summary.get('min_loss')}) after "
        f"{summary.get('global_step')} steps; artifacts {json.dumps(result.artifacts)}")
    return STATUS


def _with_task_env(envs: str, task_env: dict[str, str]) -> str:
    """training_envs plus the task's own (passed-through) literal env; one variable set in both is an error."""
    if not task_env:
        return envs
    try:
        ours = parse_key_values(envs, "training_envs")
    except ValueError as exc:  # envs may hold something private: never echo it
        raise ValueError(str(exc).replace(repr(envs), "(value not shown)")) from None
    clash = sorted(set(ours) & set(task_env))
    if clash:
        raise ValueError(f"training_envs and the task's env (kubernetes_config) both set {', '.join(clash)}: set it "
                         "in one place")
    return format_key_values({**task_env, **ours})


def _train_in_task(spec: LoRASpec, log: Callable[[str], None]) -> RunResult:
    """Train in this task's own pod (it has the GPU), as the Airflow operator's local launcher does."""
    from airflow_provider_lora.core.launchers.local import TrainingFailed, run_local

    try:
        return run_local(spec, on_line=log)
    except TrainingFailed as exc:
        raise RuntimeError(str(exc)) from None
