"""The preflight plan's memory estimate (``lora-train --plan``) against the peak a real training run reaches.

For each configuration (model, LoRA rank, dtype or 4-bit, micro-batch, gradient checkpointing) it builds the plan
in this process (lora_trainer.plan: the data as the trainer reads it, the model from its config) and trains the
same spec for a few optimizer steps with our trainer (``lora_trainer.train.run``) in a fresh subprocess, which
reports its peak:

- on CPU: the child's peak RSS (``ru_maxrss``) above its RSS once python, torch, unsloth, transformers, peft, trl and
  datasets are imported (the baseline the plan lists apart from its per-process estimate);
- on CUDA: ``torch.cuda.max_memory_allocated``.

Rows are long enough to be truncated at max_seq_len, so every micro-batch has the shape the plan assumes. The
trainer never checkpoints gradients on CPU (it only costs time there); the "checkpointing on" configurations turn it
on in the child (SFTConfig.gradient_checkpointing, non-reentrant) to measure that branch of the estimate.

    .venv/bin/python bench/memory_estimate.py            # every configuration (SmolLM2-135M only if converted)
    .venv/bin/python bench/memory_estimate.py --quick    # two tiny-model configurations (CI smoke)

The last line is the range of the ratios estimate / measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "trainer"))
SMOLLM2 = REPO / ".cache" / "SmolLM2-135M-Instruct"  # examples/smollm2.py converts it (make demo)
STEPS = 3  # the peak comes with the first optimizer step (AdamW's states); a few more show it holds

# name, model, max_seq_len, overrides of the spec, gradient checkpointing
CONFIGS = [
    ("tiny fp32 r8 mb1", "tiny", 512, dict(lora_r=8, effective_batch_size=1, dtype="float32"), False),
    ("tiny fp32 r8 mb8", "tiny", 512, dict(lora_r=8, effective_batch_size=8, dtype="float32"), False),
    ("tiny fp32 r64 mb8", "tiny", 512, dict(lora_r=64, effective_batch_size=8, dtype="float32"), False),
    ("tiny fp32 r8 mb8 ckpt", "tiny", 512, dict(lora_r=8, effective_batch_size=8, dtype="float32"), True),
    ("tiny bf16 r8 mb8", "tiny", 512, dict(lora_r=8, effective_batch_size=8, dtype="bfloat16"), False),
    ("tiny 4bit r8 mb8", "tiny", 512, dict(lora_r=8, effective_batch_size=8, dtype="float32",
                                           lora_load_in_4bit=True, lora_bnb_4bit_compute_dtype="float32"), False),
    ("smollm2 bf16 r8 mb1", "smollm2", 256, dict(lora_r=8, effective_batch_size=1, dtype="bfloat16"), False),
    ("smollm2 bf16 r64 mb8", "smollm2", 256, dict(lora_r=64, effective_batch_size=8, dtype="bfloat16"), False),
    ("smollm2 bf16 r8 mb8 ckpt", "smollm2", 256, dict(lora_r=8, effective_batch_size=8, dtype="bfloat16"), True),
    ("smollm2 fp32 r8 mb8", "smollm2", 256, dict(lora_r=8, effective_batch_size=8, dtype="float32"), False),
    ("smollm2 4bit r8 mb8", "smollm2", 256, dict(lora_r=8, effective_batch_size=8, dtype="bfloat16",
                                                 lora_load_in_4bit=True), False),
]
QUICK = ("tiny fp32 r8 mb1", "tiny fp32 r64 mb8")


def long_rows(n: int = 32) -> list[dict]:
    """Chat rows whose answers run past any max_seq_len used here (truncated, each keeps answer tokens)."""
    words = "the quick brown fox jumps over a lazy dog while seven bold wizards quietly vex a jumpy zebra".split()
    return [{"messages": [{"role": "user", "content": f"Write passage {i}."},
                          {"role": "assistant", "content": " ".join(words[(i + j) % len(words)] for j in range(900))}]}
            for i in range(n)]


def spec_values(model_dir: Path, dataset: Path, output: Path, seq_len: int, overrides: dict) -> dict:
    batch = overrides["effective_batch_size"]
    return {"base_model": str(model_dir), "dataset": str(dataset), "output_uri": str(output), "max_seq_len": seq_len,
            "max_tokens_per_gpu": batch * seq_len, "max_steps": STEPS, "learning_rate": 1e-4, "lr_warmup_steps": 0,
            "lora_sample_packing": False, **overrides}


# ---- child: train and report the peak ---------------------------------------------------------------------------

def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def child_main(spec_json: str, checkpointing: bool) -> None:
    import lora_trainer.train as train  # unsloth first, as the trainer imports it
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    from airflow_provider_lora.core.spec import LoRASpec

    if checkpointing:
        make_config = train._sft_config

        def with_checkpointing(*args, **kwargs):
            config = make_config(*args, **kwargs)
            config.gradient_checkpointing = True
            config.gradient_checkpointing_kwargs = {"use_reentrant": False}
            return config

        train._sft_config = with_checkpointing
    baseline = _rss()
    baseline_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outcome = train.run(LoRASpec.from_json(spec_json))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = {"baseline": baseline, "baseline_max": baseline_max, "peak_rss": peak,
              "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
              "steps": outcome.summary.get("global_step"),
              "checkpointing": bool(getattr(outcome.model.get_base_model(), "is_gradient_checkpointing", False))}
    print("RESULT " + json.dumps(result), flush=True)


def measure(values: dict, checkpointing: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--child", json.dumps(values)] + (["--checkpointing"] if checkpointing else [])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training run failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ---- parent ---------------------------------------------------------------------------------------------------------

def estimate(values: dict, checkpointing: bool) -> dict:
    """The plan's per-process peak for this spec, with the configuration's checkpointing setting."""
    import torch

    from airflow_provider_lora.core.spec import LoRASpec
    from lora_trainer import model as model_lib
    from lora_trainer.plan import estimate_memory, make_plan

    spec = LoRASpec.parse(values)
    plan = make_plan(spec, measure=False)
    mem = plan["memory"]
    items = estimate_memory(spec, plan["model"], model_lib.pick_dtype(spec), mem["micro_batch"], mem["seq_len"],
                            checkpointing, torch.cuda.is_available())
    return {"items": items, "peak": sum(items.values()), "seq_len": mem["seq_len"],
            "micro_batch": mem["micro_batch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two tiny-model configurations (CI smoke)")
    parser.add_argument("--only", help="run only the configurations whose name contains this text")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child, args.checkpointing)

    from tests.fixtures.tiny_model import build_tiny_model
    from tests.trainer_helpers import write_jsonl

    import torch

    configs = [c for c in CONFIGS if (not args.quick or c[0] in QUICK) and (not args.only or args.only in c[0])]
    if not SMOLLM2.exists():
        print(f"SmolLM2-135M not converted at {SMOLLM2} (make demo converts it): its configurations are skipped")
        configs = [c for c in configs if c[1] != "smollm2"]
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    measured = "max_memory_allocated" if torch.cuda.is_available() else "peak RSS above the baseline after imports"
    print(f"device: {device}; measured = {measured}; {STEPS} optimizer steps per run")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        tmp = Path(tmp)
        models = {"tiny": build_tiny_model(tmp / "tiny"), "smollm2": SMOLLM2}
        data = write_jsonl(tmp / "rows.jsonl", long_rows())
        print(f"{'configuration':26s} {'tokens':>10s} {'estimate MiB':>13s} {'measured MiB':>13s} {'ratio':>6s}  "
              f"{'s':>5s}")
        for i, (name, model, seq_len, overrides, checkpointing) in enumerate(configs):
            values = spec_values(models[model], data, tmp / f"out-{i}", seq_len, overrides)
            est = estimate(values, checkpointing)
            started = time.perf_counter()
            got = measure(values, checkpointing)
            measured = got["cuda_peak"] if got["cuda_peak"] is not None else got["peak_rss"] - got["baseline"]
            ratio = est["peak"] / measured
            rows.append({"name": name, "estimate": est, "measured": measured, "ratio": ratio, "child": got})
            print(f"{name:26s} {est['micro_batch']:>4d} x {est['seq_len']:<4d} {est['peak'] / 2**20:13,.0f} "
                  f"{measured / 2**20:13,.0f} {ratio:6.2f}  {time.perf_counter() - started:5.0f}", flush=True)
            if got["checkpointing"] != checkpointing:
                print(f"  (!) gradient checkpointing was {got['checkpointing']} in the run, {checkpointing} asked")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    ratios = [r["ratio"] for r in rows]
    inside = sum(0.8 <= r <= 1.25 for r in ratios)
    print(f"baseline after imports (not in the estimate): {min(r['child']['baseline'] for r in rows) / 2**20:,.0f}-"
          f"{max(r['child']['baseline'] for r in rows) / 2**20:,.0f} MiB")
    print(f"within 0.8-1.25x: {inside} of {len(ratios)}")
    print(f"ratio estimate / measured peak: min {min(ratios):.2f} max {max(ratios):.2f}")


if __name__ == "__main__":
    main()
