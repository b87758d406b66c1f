"""Export: summary.json, the loss chart, the optional merged model, and publishing the run to output_uri.

Called on rank 0 only.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from airflow_provider_lora.core import results, storage
from airflow_provider_lora.core.contract import (ADAPTER_DIR, CHART_HTML, CHART_PNG, CHECKPOINTS_DIR, STAGED_DATA_DIR,
                                                 SUMMARY_FILE, TASK_ENV)
from airflow_provider_lora.core.spec import LoRASpec

VERSIONED_PACKAGES = ("torch", "transformers", "peft", "trl", "unsloth", "datasets", "bitsandbytes")


def summarize(spec: LoRASpec, *, run_dir: Path, train_output: Any, history: list[dict[str, Any]],
              data_stats: dict[str, Any], plan: Any, dtype: Any, targets: list[str], trainable: int, total: int,
              packing: dict[str, Any], resumed_from: str | None, wall_seconds: float) -> dict[str, Any]:
    import torch

    losses = [r["loss"] for r in history if r.get("loss") is not None]
    all_evals = [r for r in history if r.get("eval_loss") is not None]
    # The adapter's held-out figures: evaluations after training started (step 0 is the base model's).
    eval_rows = [r for r in all_evals if r["step"] > 0]
    evals = [r["eval_loss"] for r in eval_rows]
    best_eval = min(eval_rows, key=lambda r: r["eval_loss"], default=None)
    metrics = train_output.metrics
    runtime = metrics.get("train_runtime") or 0.0
    tokens = next((r["num_tokens"] for r in reversed(history) if r.get("num_tokens") is not None), None)
    if torch.cuda.is_available():
        peak_memory = torch.cuda.max_memory_allocated()
        memory_kind = "cuda_max_allocated"
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        memory_kind = "process_max_rss"
    return {
        "base_model": spec.base_model,
        "dataset": spec.dataset,
        "final_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "first_loss": losses[0] if losses else None,
        # The held-out loss at step 0, before training: the base model's (the adapter starts as a no-op).
        "base_eval_loss": next((r["eval_loss"] for r in all_evals if r["step"] == 0), None),
        "final_eval_loss": evals[-1] if evals else None,
        "min_eval_loss": min(evals) if evals else None,
        # Where the held-out loss was lowest: past it, more steps fitted the training rows, not the task.
        "best_eval_step": best_eval["step"] if best_eval else None,
        "best_eval_epoch": best_eval.get("epoch") if best_eval else None,
        **checkpoint_figures(spec, run_dir / CHECKPOINTS_DIR, eval_rows),
        "global_step": train_output.global_step,
        "epochs": metrics.get("epoch"),
        "tokens": tokens,
        "train_runtime_seconds": runtime,
        "tokens_per_second": round(tokens / runtime, 1) if tokens and runtime else None,
        "samples_per_second": metrics.get("train_samples_per_second"),
        "wall_seconds": round(wall_seconds, 1),
        "peak_memory_bytes": peak_memory,
        "peak_memory_kind": memory_kind,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "lora": {"r": spec.lora_r, "alpha": spec.lora_alpha, "dropout": spec.lora_dropout, "target_modules": targets,
                 "rslora": spec.lora_use_rslora, "dora": spec.lora_use_dora},
        "quantisation": _quantisation(spec),
        "batch": plan.model_dump(),
        "packing": packing,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "resumed_from": resumed_from,
        "data": data_stats,
        "versions": _versions(),
        "spec": redacted_spec(spec),
        "task": launching_task(),
    }


redacted_spec = results.redacted_spec


def launching_task() -> dict[str, Any] | None:
    """The task instance that launched this run (the launcher sets TASK_ENV), so that a retry of that task
    recognises the run as its own instead of refusing the output it already published."""
    try:
        task = json.loads(os.environ.get(TASK_ENV) or "null")
    except ValueError:
        return None
    return task if isinstance(task, dict) else None


CHECKPOINT_STATE = "trainer_state.json"  # transformers writes it last into a checkpoint-<step> directory


def _checkpoint_step(path: Path) -> int | None:
    """The step of a transformers checkpoint-<step> directory (None for another name)."""
    step = path.name.removeprefix("checkpoint-")
    return int(step) if step.isdigit() else None


def complete_checkpoints(directory: Path) -> list[Path]:
    """The checkpoint-<step> directories in ``directory`` that were written to the end, oldest first. One without
    CHECKPOINT_STATE was cut short (the pod was killed while saving it): resuming from it fails in transformers."""
    found = [path for path in directory.glob("checkpoint-*")
             if _checkpoint_step(path) is not None and (path / CHECKPOINT_STATE).is_file()]
    return sorted(found, key=_checkpoint_step)


def checkpoint_figures(spec: LoRASpec, checkpoint_dir: Path, eval_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """With checkpoint_at_epoch: each checkpoint the run saved, oldest first, with the held-out loss measured at its
    step (None where no evaluation fell on it), and the name of the one with the lowest: the one to go back to
    when later epochs fitted the training rows, not the task."""
    if not spec.checkpoint_at_epoch:
        return {"saved_checkpoints": None, "best_eval_checkpoint": None}
    at_step = {row["step"]: row["eval_loss"] for row in eval_rows}
    saved = []
    for path in complete_checkpoints(checkpoint_dir):
        step = _checkpoint_step(path)
        saved.append({"name": path.name, "step": step, "eval_loss": at_step.get(step)})
    best = min((c for c in saved if c["eval_loss"] is not None), key=lambda c: c["eval_loss"], default=None)
    return {"saved_checkpoints": saved, "best_eval_checkpoint": best["name"] if best else None}


def _quantisation(spec: LoRASpec) -> dict[str, Any] | None:
    if spec.lora_load_in_4bit:
        return {"bits": 4, "quant_type": spec.lora_bnb_4bit_quant_type,
                "compute_dtype": spec.lora_bnb_4bit_compute_dtype,
                "double_quant": spec.lora_bnb_4bit_use_double_quant}
    if spec.lora_load_in_8bit:
        return {"bits": 8}
    return None


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def save_merged(model: Any, tokenizer: Any, path: Path) -> None:
    """The base model with the adapter merged in, 16-bit, loadable without peft."""
    model.save_pretrained_merged(str(path), tokenizer, save_method="merged_16bit")


def _short(uri: str) -> str:
    """A title-sized name: a Hugging Face id as is, the last part of a path or an s3:// key."""
    if "://" not in uri and not uri.startswith(("/", ".")) and uri.count("/") <= 1:
        return uri
    return uri.rstrip("/").rsplit("/", 1)[-1]


MODEL_CARD = "README.md"  # where the Hugging Face Hub (and peft's save_pretrained) keep a model card
CARD_TAGS = ("lora", "peft", "airflow-provider-lora")


def write_model_card(adapter_dir: Path, spec: LoRASpec, summary: dict[str, Any]) -> Path:
    """The adapter's model card (README.md), with huggingface_hub's classes: the Hub's metadata (base_model,
    library_name peft, tags, datasets as given: a Hub id or a URI, eval results), then what a person needs to judge
    and reuse the adapter: the results, the parameters that matter, the framework versions and the loss chart.
    peft's own card (its metadata and tags) is kept and completed; its empty template text is replaced."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    path = adapter_dir / MODEL_CARD
    data = ModelCard.load(path).data if path.exists() else ModelCardData()
    data.base_model = spec.base_model
    data.library_name = "peft"
    data.datasets = [spec.dataset]
    data.tags = sorted(set(data.tags or ()) | set(CARD_TAGS))
    data.pipeline_tag = data.pipeline_tag or "text-generation"
    data.model_name = f"{_short(spec.base_model)}-lora-r{spec.lora_r}"
    if summary.get("final_eval_loss") is not None:  # the held-out split's loss: the figure to compare runs by
        data.eval_results = [EvalResult(task_type="text-generation", dataset_type=spec.dataset,
                                        dataset_name=_short(spec.dataset), dataset_split="held-out "
                                        f"{spec.eval_fraction:g}", metric_type="loss",
                                        metric_value=summary["final_eval_loss"])]
    lora = summary["lora"]
    batch = summary.get("batch") or {}
    rows = [("base model", spec.base_model), ("dataset", spec.dataset),
            ("LoRA", f"r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}"
                     + (", rsLoRA" if lora.get("rslora") else "") + (", DoRA" if lora.get("dora") else "")),
            ("target modules", ", ".join(lora["target_modules"])),
            ("quantisation", f"{summary['quantisation']['bits']}-bit" if summary.get("quantisation") else "none"),
            ("dtype", summary.get("dtype")), ("learning rate", spec.learning_rate),
            ("epochs / steps", f"{summary.get('epochs')} / {summary.get('global_step')}"),
            ("effective batch", batch.get("effective_batch_size", spec.effective_batch_size)),
            ("max sequence length", spec.max_seq_len), ("seed", spec.seed)]
    results_rows = [(name, summary.get(key)) for name, key in (
        ("final training loss", "final_loss"), ("lowest training loss", "min_loss"),
        ("held-out loss of the base model", "base_eval_loss"),
        ("final held-out loss", "final_eval_loss"), ("lowest held-out loss", "min_eval_loss"),
        ("checkpoint with the lowest held-out loss", "best_eval_checkpoint"),
        ("tokens trained", "tokens"), ("training time (s)", "train_runtime_seconds"),
        ("trainable parameters", "trainable_parameters")) if summary.get(key) is not None]
    versions = ", ".join(f"{name} {version}" for name, version in (summary.get("versions") or {}).items())
    samples = [("| " + " | ".join(_cell(s[k]) for k in ("prompt", "expected", "base", "with_adapter")) + " |")
               for s in summary.get("samples") or []]
    answers = (["## Held-out prompts, before and after", "",
                f"Greedy, at most {spec.sample_max_new_tokens} new tokens.", "",
                "| prompt | expected | base model | with the adapter |", "|---|---|---|---|", *samples, ""]
               if samples else [])
    text = "\n".join([
        f"# {data.model_name}", "",
        f"A LoRA adapter for `{spec.base_model}`, fine-tuned on `{spec.dataset}` with airflow-provider-lora. Load it "
        "with peft: `PeftModel.from_pretrained(base_model, \"<this directory>\")`.", "",
        "## Results", "", _table(results_rows), "",
        f"![training loss]({CHART_PNG})", "",  # beside the card: finish() copies the chart into the adapter
        *answers,
        "## Training", "", _table(rows), "",
        "## Framework versions", "", versions, ""])
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")
    card.save(path)
    return path


def _cell(text: str) -> str:
    """Text as one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "<br>")


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(["| | |", "|---|---|", *cells])


def finish(spec: LoRASpec, run_dir: Path, summary: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, str]:
    """Write summary.json, the chart and the adapter's model card, then publish the run (the completion marker goes
    last)."""
    quant = summary["quantisation"]
    bits = f" · {quant['bits']}-bit" if quant else ""
    title = f"{_short(spec.base_model)} · LoRA r={spec.lora_r} α={spec.lora_alpha}{bits} · {_short(spec.dataset)}"
    results.draw_loss_chart(history, title=title, png_path=run_dir / CHART_PNG, html_path=run_dir / CHART_HTML,
                            samples=summary.get("samples"))
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    # The card links the chart beside it, so the adapter directory carries its own copy: the link then resolves
    # wherever the directory goes alone (KFP's model artifact, a Hugging Face Hub upload), not only in the run.
    shutil.copyfile(run_dir / CHART_PNG, run_dir / ADAPTER_DIR / CHART_PNG)
    write_model_card(run_dir / ADAPTER_DIR, spec, summary)
    artifacts = storage.publish_run(run_dir, spec.output_uri, overwrite=spec.overwrite_output,
                                    exclude=(CHECKPOINTS_DIR, STAGED_DATA_DIR))
    return artifacts
