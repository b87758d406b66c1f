"""Trainer throughput on CPU: our trainer (lora_trainer, unsloth path) against plain transformers + peft.

Both train LoRA on the same tiny offline Llama (tests/fixtures/tiny_model.py), the same rows, seed, hyperparameters
and effective batch, for the same number of optimizer steps. The settings come from one LoRASpec (the one
tests/trainer_helpers.py builds), which our trainer runs as it always does (``lora_trainer.train.run``) and the
baseline translates into the textbook recipe: ``peft.get_peft_model`` + ``transformers.Trainer``, labels -100 on
the prompt (loss on the answer, like our assistant mask), LoRA on the same linear layers, the same optimizer,
schedule, weight decay, clipping, dtype and gradient-checkpointing setting.

Why not trl's SFTTrainer as the baseline: trl 1.15 always routes the loss through its fused LM head, a Triton kernel,
so without unsloth (which swaps that kernel for its own) it cannot train on a CPU at all when triton is installed
("RuntimeError: 0 active drivers"). Our trainer uses SFTTrainer through unsloth.

Runs alternate (ours, baseline, ours, baseline, ...), each in a fresh subprocess with OMP_NUM_THREADS=1. Figures:

- tokens/s: tokens trained (non-pad input tokens: trl's ``num_tokens``, transformers' ``num_input_tokens_seen``)
  over the training loop's runtime (``train_runtime``; model loading and imports excluded); also per CPU second of
  the training loop (less disturbed by other jobs on a shared machine), and the process's end-to-end wall time.
- peak RSS: ``ru_maxrss`` of the child, from os.wait4.
- the loss curves side by side (table here, PNG in --out).

    .venv/bin/python bench/trainer_throughput.py [--steps 40] [--alternations 2] [--out runs/bench]
    .venv/bin/python bench/trainer_throughput.py --quick      # 1 alternation of 3 steps (CI smoke)

The last lines are the ratios ours / baseline (tokens/s: higher is better; peak RSS: lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMPLS = ("ours", "baseline")


# ---- children -----------------------------------------------------------------------------------------------------

TRAIN_CPU: dict[str, float] = {}


def clock_training_cpu() -> None:
    """Record this process's CPU seconds between the training loop's begin and end callbacks (every Trainer
    subclass calls them). On a shared machine CPU time moves much less than wall time when other jobs compete."""
    from transformers.trainer_callback import CallbackHandler

    begin, end = CallbackHandler.on_train_begin, CallbackHandler.on_train_end

    def on_train_begin(self, *args, **kwargs):
        TRAIN_CPU["begin"] = time.process_time()
        return begin(self, *args, **kwargs)

    def on_train_end(self, *args, **kwargs):
        TRAIN_CPU["end"] = time.process_time()
        return end(self, *args, **kwargs)

    CallbackHandler.on_train_begin, CallbackHandler.on_train_end = on_train_begin, on_train_end


def child_ours(model_dir: Path, dataset: Path, out: Path, steps: int) -> dict:
    from tests.trainer_helpers import history, train

    outcome = train(model_dir, dataset, out, max_steps=steps)
    rows = [r for r in history(out) if "loss" in r]
    model = outcome.model.get_base_model()
    return {"tokens": rows[-1]["num_tokens"], "train_runtime": outcome.summary["train_runtime_seconds"],
            "losses": [[r["step"], r["loss"]] for r in rows],
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False))}


def child_baseline(model_dir: Path, dataset: Path, out: Path, steps: int, gradient_checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)

    from airflow_provider_lora.core.spec import plan_batches
    from tests.trainer_helpers import make_spec

    spec = make_spec(model_dir, dataset, out, max_steps=steps)
    plan = plan_batches(spec, 1)
    set_seed(spec.seed)  # before get_peft_model, so the LoRA weights start the same in every run
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, spec.dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    head = model.get_output_embeddings()
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and m is not head})  # what our trainer targets by default
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                                             target_modules=targets, bias="none", task_type="CAUSAL_LM"))

    def encode(messages: list[dict]) -> dict:
        # The textbook completion-only recipe: the chat template's text, labels -100 up to the answer.
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][: spec.max_seq_len]
        labels = ([-100] * len(prompt_ids) + ids[len(prompt_ids):])[: len(ids)]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    rows = [json.loads(line)["messages"] for line in dataset.read_text().splitlines()]
    train_ds = Dataset.from_list([encode(m) for m in rows])
    config = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=plan.micro_batch, gradient_accumulation_steps=plan.grad_accum,
        max_steps=steps, learning_rate=spec.learning_rate, warmup_steps=spec.lr_warmup_steps,
        lr_scheduler_type=spec.lr_scheduler, weight_decay=0.01, max_grad_norm=0.3, optim="adamw_torch",
        seed=spec.seed, data_seed=spec.seed, bf16=False, fp16=False, use_cpu=True, logging_steps=1,
        report_to="none", disable_tqdm=True, save_strategy="no", include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=config, train_dataset=train_ds,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    output = trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return {"tokens": trainer.state.num_input_tokens_seen, "train_runtime": output.metrics["train_runtime"],
            "losses": [[r["step"], r["loss"]] for r in logs], "gradient_checkpointing": gradient_checkpointing}


def child_main(args: argparse.Namespace) -> None:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{args.child}-"))
    clock_training_cpu()
    if args.child == "ours":
        result = child_ours(args.model, args.data, out, args.steps)
    else:
        result = child_baseline(args.model, args.data, out, args.steps, args.gradient_checkpointing)
    result["train_cpu"] = TRAIN_CPU["end"] - TRAIN_CPU["begin"]
    print("RESULT " + json.dumps(result), flush=True)


# ---- parent -------------------------------------------------------------------------------------------------------

def run_child(impl: str, model: Path, data: Path, steps: int, gradient_checkpointing: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--child", impl, "--model", str(model), "--data", str(data),
           "--steps", str(steps)] + (["--gradient-checkpointing"] if gradient_checkpointing else [])
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{impl} run failed (exit {proc.returncode}):\n{text[-4000:]}")
    result = json.loads(next(l for l in text.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    # ru_maxrss is in KiB on Linux.
    return {**result, "impl": impl, "wall": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            "tokens_per_s": result["tokens"] / result["train_runtime"],
            "tokens_per_cpu_s": result["tokens"] / result["train_cpu"]}


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for impl, style in zip(IMPLS, ("-o", "--s")):
        steps, losses = zip(*runs[impl]["losses"])
        ax.plot(steps, losses, style, markersize=3, label=f"{impl}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA on the tiny model: our trainer vs transformers + peft")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--alternations", type=int, default=2, help="ours+baseline pairs")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="where the loss-curve PNG goes")
    parser.add_argument("--quick", action="store_true", help="1 alternation of 3 steps (CI smoke)")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    if args.quick:
        args.steps, args.alternations, args.rows = 3, 1, 48

    from tests.fixtures.tiny_model import build_tiny_model
    from tests.trainer_helpers import FAST, arithmetic_rows, write_jsonl

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        model = build_tiny_model(Path(tmp) / "model")
        data = write_jsonl(Path(tmp) / "rows.jsonl", arithmetic_rows(args.rows))
        runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
        gradient_checkpointing = False
        for i in range(args.alternations):
            for impl in IMPLS:
                # The baseline copies the gradient-checkpointing setting our trainer ended up with, so the two
                # trade memory for time alike.
                result = run_child(impl, model, data, args.steps, gradient_checkpointing)
                if impl == "ours":
                    gradient_checkpointing = result["gradient_checkpointing"]
                runs[impl].append(result)
                print(f"run {i + 1} {impl:8s}: {result['tokens']} tokens in {result['train_runtime']:.2f} s of "
                      f"training = {result['tokens_per_s']:,.0f} tokens/s "
                      f"({result['tokens_per_cpu_s']:,.0f} per CPU second); process {result['wall']:.1f} s; peak RSS "
                      f"{result['peak_rss_mib']:,.0f} MiB; final loss {result['losses'][-1][1]:.4f}", flush=True)

    first = {impl: runs[impl][0] for impl in IMPLS}
    print(f"\nsettings: {FAST}, max_steps {args.steps}, seed 0, {args.rows} rows; gradient checkpointing "
          f"{'on' if gradient_checkpointing else 'off'} in both")
    print(f"{'step':>5} {'loss ours':>10} {'loss baseline':>14}")
    baseline_losses = dict(map(tuple, first["baseline"]["losses"]))
    for step, loss in first["ours"]["losses"]:
        other = baseline_losses.get(step)
        print(f"{step:5d} {loss:10.4f} {'-' if other is None else f'{other:14.4f}':>14}")
    for impl in IMPLS:
        finals = sorted({round(r["losses"][-1][1], 6) for r in runs[impl]})
        print(f"{impl}: final loss over {len(runs[impl])} run(s): {finals}")
    png = args.out / "trainer_loss_curves.png"
    plot(first, png)
    print(f"loss curves: {png}")

    med = {impl: {k: statistics.median(r[k] for r in runs[impl]) for k in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mib", "wall")}
           for impl in IMPLS}
    print(f"ratio ours / baseline process wall time: {med['ours']['wall'] / med['baseline']['wall']:.2f}x")
    print(f"ratio ours / baseline tokens per CPU second: "
          f"{med['ours']['tokens_per_cpu_s'] / med['baseline']['tokens_per_cpu_s']:.2f}x")
    print(f"ratio ours / baseline tokens/s: {med['ours']['tokens_per_s'] / med['baseline']['tokens_per_s']:.2f}x")
    print(f"ratio ours / baseline peak RSS: {med['ours']['peak_rss_mib'] / med['baseline']['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
