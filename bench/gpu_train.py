"""GPU benchmark steps, called by bench/gpu.sh: unsloth against transformers + peft (SDPA) on a Qwen2.5-1.5B-shaped
model initialised at random from its config (no hub access needed), LoRA r=16 on all linear layers, seq 2048,
bf16, packed rows (every row is max_seq_len real tokens, as packing makes them; bench/packing.py counts how close
real data gets).

    gpu_train.py build  --dir D [--tiny]                 write the random-init model + a tokenizer to D
    gpu_train.py train  --dir D --impl hf|unsloth --result R.json [--tiny]
    gpu_train.py report R1.json R2.json                  table and ratios (unsloth / hf)

Each ``train`` runs in its own process: importing unsloth patches transformers' model classes process-wide, so the
baseline must never share a process with it. Both sides run the same loop (forward with labels, backward, fused
AdamW on the LoRA weights) on the same token ids, after warm-up steps that are not timed. Gradient checkpointing:
unsloth's offloaded one on the unsloth side, transformers' (non-reentrant) on the baseline; ``--no-baseline-gc``
turns the latter off.

MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 6 N + 12 L d s (PaLM's convention; N = weights of all
linear layers including the output head, L layers, d hidden size, s sequence length) and the H200's dense bf16 peak
of 989 TFLOPS (NVIDIA's datasheet figure without sparsity). 6 N counts the weight-gradient matmuls that LoRA skips
for frozen weights, so this is the usual model-FLOPs figure, not the hardware's.

``--tiny`` (a small config, seq 128, a few steps, CPU when there is no GPU) checks the whole path on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H200_BF16_DENSE_FLOPS = 989e12

# Qwen2.5-1.5B's config.json (architecture fields), written out so no hub access is needed.
QWEN25_15B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True, attention_dropout=0.0, use_sliding_window=False,
    bos_token_id=151643, eos_token_id=151643,
)
TINY = dict(QWEN25_15B, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
            eos_token_id=2)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def settings(tiny: bool) -> dict:
    if tiny:
        return {"config": TINY, "seq": 128, "micro_batch": 2, "warmup": 1, "steps": 3}
    return {"config": QWEN25_15B, "seq": 2048, "micro_batch": 8, "warmup": 5, "steps": 20}


def build(directory: Path, tiny: bool) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.fixtures.tiny_model import train_tokenizer

    config = Qwen2Config(**{k: v for k, v in settings(tiny)["config"].items() if k != "model_type"})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    # unsloth loads a tokenizer with the model; token ids come from the benchmark itself, so a small one does.
    train_tokenizer().save_pretrained(directory)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Qwen2 ({config.hidden_size} "
          f"hidden, {config.num_hidden_layers} layers) in {directory}", flush=True)


def load(impl: str, directory: Path, seq: int, dtype, baseline_gc: bool):
    import torch

    on_gpu = torch.cuda.is_available()
    if impl == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(str(directory), max_seq_length=seq, dtype=dtype,
                                                     load_in_4bit=False, load_in_8bit=False)
        model = FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
            use_gradient_checkpointing="unsloth" if on_gpu else False, random_state=0)
        return model, "unsloth offloaded" if on_gpu else "off"
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, attn_implementation="sdpa")
    model.to("cuda" if on_gpu else "cpu")
    if baseline_gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    return model, "transformers non-reentrant" if baseline_gc else "off"


def train(impl: str, directory: Path, result_path: Path, tiny: bool, baseline_gc: bool) -> None:
    import torch

    if impl == "hf" and "unsloth" in sys.modules:
        raise SystemExit("the baseline must run without unsloth imported")
    s = settings(tiny)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not tiny:
        raise SystemExit("no CUDA GPU found: the full benchmark needs one (use --tiny to check the path on CPU)")
    dtype = torch.bfloat16 if on_gpu else torch.float32  # bf16 matmuls on a CPU are emulated on most CPUs
    device = "cuda" if on_gpu else "cpu"
    model, checkpointing = load(impl, directory, s["seq"], dtype, baseline_gc)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, fused=on_gpu)
    generator = torch.Generator().manual_seed(0)
    vocab = s["config"]["vocab_size"]
    batches = [torch.randint(3, vocab, (s["micro_batch"], s["seq"]), generator=generator).to(device)
               for _ in range(4)]
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    losses = []
    for step in range(s["warmup"] + s["steps"]):
        if step == s["warmup"]:
            sync()
            started = time.perf_counter()
        ids = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    sync()
    elapsed = time.perf_counter() - started
    tokens = s["steps"] * s["micro_batch"] * s["seq"]
    cfg = s["config"]
    # Every matmul weight: the projections (peft's base layers), the LoRA factors, and the (tied) output head.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    flops_per_token = 6 * linear + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * s["seq"]
    result = {
        "impl": impl, "device": torch.cuda.get_device_name() if on_gpu else "cpu", "dtype": str(dtype)[6:],
        "gradient_checkpointing": checkpointing, "seq": s["seq"], "micro_batch": s["micro_batch"],
        "steps_timed": s["steps"], "tokens_per_s": tokens / elapsed, "seconds_per_step": elapsed / s["steps"],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "flops_per_token": flops_per_token,
        "mfu": tokens / elapsed * flops_per_token / H200_BF16_DENSE_FLOPS if on_gpu else None,
        "first_loss": losses[0], "last_loss": losses[-1],
    }
    result_path.write_text(json.dumps(result))
    print(json.dumps(result), flush=True)


def report(paths: list[Path]) -> None:
    results = {r["impl"]: r for r in (json.loads(p.read_text()) for p in paths)}
    if set(results) != {"hf", "unsloth"}:
        raise SystemExit(f"report needs one hf and one unsloth result, got {sorted(results)}")
    hf, us = results["hf"], results["unsloth"]
    print(f"device {us['device']}, {us['dtype']}, seq {us['seq']}, micro-batch {us['micro_batch']}, "
          f"{us['steps_timed']} timed steps; MFU against {H200_BF16_DENSE_FLOPS / 1e12:.0f} TFLOPS (H200 bf16 dense)")

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    for name, r in (("transformers+peft (SDPA)", hf), ("unsloth", us)):
        print(f"{name:25s} {r['tokens_per_s']:12,.0f} tokens/s  peak {fmt(r['peak_memory_gib'], '6.1f')} GiB  "
              f"MFU {fmt(r['mfu'] and 100 * r['mfu'], '5.1f')}%  loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}  "
              f"(gradient checkpointing: {r['gradient_checkpointing']})")
    print(f"ratio unsloth / transformers+peft tokens/s: {us['tokens_per_s'] / hf['tokens_per_s']:.2f}x")
    if us["peak_memory_gib"] and hf["peak_memory_gib"]:
        print(f"ratio unsloth / transformers+peft peak GPU memory: {us['peak_memory_gib'] / hf['peak_memory_gib']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build")
    p_build.add_argument("--dir", type=Path, required=True)
    p_build.add_argument("--tiny", action="store_true")
    p_train = sub.add_parser("train")
    p_train.add_argument("--dir", type=Path, required=True)
    p_train.add_argument("--impl", choices=("hf", "unsloth"), required=True)
    p_train.add_argument("--result", type=Path, required=True)
    p_train.add_argument("--tiny", action="store_true")
    p_train.add_argument("--no-baseline-gc", action="store_true")
    p_report = sub.add_parser("report")
    p_report.add_argument("results", type=Path, nargs=2)
    args = parser.parse_args()
    if args.command == "build":
        build(args.dir, args.tiny)
    elif args.command == "train":
        train(args.impl, args.dir, args.result, args.tiny, not args.no_baseline_gc)
    else:
        report(args.results)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
