"""The preflight plan (``lora-train --plan``): what a training run of this spec would see and need, without training.

It reads and tokenises the data exactly as the trainer does (data.py), reads the model's config and tokenizer (the
weights only for the optional throughput measurement), and prints:

- the dataset as the trainer sees it: rows, rows dropped and why, tokens per row, truncation, answer tokens, the
  batch plan and the optimizer steps;
- the model: parameters, trainable LoRA parameters for the targets and rank, layers, hidden size, vocabulary;
- an itemised estimate of peak memory per process, compared with the memory available, and the largest micro-batch
  that fits; a configuration that does not fit is refused (exit code 2) with what would fit;
- an estimated time per epoch from a throughput measured here, or marked "not measured".

Nothing is written: no adapter, no run directory, no processed-data cache. The plan is also printed as one JSON line
after PLAN_PREFIX (airflow_provider_lora.core.contract).

How the memory estimate is built (bench/memory_estimate.py compares it with measured peaks; docs/concepts.md has
the figures): every item is bytes per process at the longest micro-batch the data gives (rows padded to the longest
row of a micro-batch, or packed to max_seq_len):

- base weights at the training dtype, or 4/8-bit for the quantised linear layers (plus their quantisation scales);
- LoRA weights, their gradients and AdamW's two states, all float32 (16 bytes per trainable parameter);
- activations kept for the backward pass: per layer and token, the tensors a Llama-style block saves (inputs of the
  projections, q/k/v, the MLP's gate/up/product, RMSNorm's float32 copies); with gradient checkpointing only each
  layer's input, plus one layer's tensors while it is recomputed; on CPU times a fitted factor (backward transients,
  the allocator);
- logits: float32 logits, their log-softmax and gradient (micro_batch x seq_len x vocab x 4 bytes each) and the
  model-dtype copy; on CPU times a fitted share (their large buffers go back to the system when freed);
- runtime overhead: on CPU a fitted constant; on a GPU a share of the total (not measured here).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from airflow_provider_lora.core.contract import ERROR_PREFIX, LOG_PREFIX, PLAN_PREFIX
from airflow_provider_lora.core.spec import LoRASpec, optimizer_steps, plan_batches
from lora_trainer import data as data_lib
from lora_trainer import model as model_lib

GIB = 1024 ** 3
# Bytes per trainable LoRA parameter: float32 weight, float32 gradient, AdamW's two float32 states.
LORA_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8
# bitsandbytes 4-bit: two weights per byte, plus an absmax per block of 64 (float32, or 8-bit with double quant and
# a float32 second-level absmax per 256 blocks).
NF4_BYTES = 0.5
NF4_SCALE_BYTES = {False: 4 / 64, True: 1 / 64 + 4 / (64 * 256)}
INT8_BYTES = 1
# On CPU, peak RSS is not the sum of live tensors: glibc's allocator keeps the freed blocks of the many mid-sized
# activation tensors (below its mmap threshold) and reuses them imperfectly, while buffers above it (the logits of a
# large vocabulary) go back to the system as soon as they are freed. Fitted by bench/memory_estimate.py on a
# 2-core CPU (configurations without gradient checkpointing, as the trainer runs on CPU): the activations the
# forward pass saves (checked with torch's saved-tensor hooks) weigh 1.8x, the logits 0.05x (they do exist whole
# on CPU: unsloth's CPU path is plain transformers). The two are partly confounded in the two models measured.
# On a GPU (not measured) the activations count once and the logits whole, an upper bound: unsloth's fused
# cross-entropy computes them in chunks there.
CPU_ACTIVATION_SCALE = 1.8
CPU_LOGITS_SHARE = 0.05
# Runtime overhead: on CPU a fixed part (the training loop's objects, thread buffers; fitted: 54 MiB); on a GPU the
# CUDA caching allocator's fragmentation as a share of the rest (a guess: not measured here).
CPU_OVERHEAD_BYTES = 54 * 2 ** 20
GPU_OVERHEAD_SHARE = 0.10
# The CUDA context: outside max_memory_allocated, but it occupies the device.
GPU_CONTEXT_BYTES = int(0.5 * GIB)
# What the process holds before training on CPU (python, torch, unsloth, transformers, peft, trl, datasets
# imported; measured by the benchmark: 594 MiB): not in the per-process estimate (the benchmark measures peaks above
# it), but it must fit too.
CPU_PROCESS_BASELINE_BYTES = 600 * 2 ** 20
# The throughput measurement: one warm-up pass and this many timed forward/backward passes.
TIMED_PASSES = 2


class PlanError(ValueError):
    """The run as specified cannot fit the memory available; the message names the parameter, its value and what
    would fit."""


# ---- the data, as the trainer sees it --------------------------------------------------------------------------------

def _quiet(message: str) -> None:
    pass


def dataset_view(spec: LoRASpec, tokenizer: Any, world_size: int,
                 on_gpu: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The data figures, and the train rows the trainer would train on (input_ids, assistant_masks)."""
    import tempfile

    # The plan writes nothing: no processed-data cache (data_output_dir), and s3:// data is staged in a temp dir.
    spec_no_cache = spec.model_copy(update={"data_output_dir": None})
    with tempfile.TemporaryDirectory(prefix="lora-plan-") as staging:
        prepared = data_lib.prepare(spec_no_cache, tokenizer, is_main_process=True, wait_for_main=lambda: None,
                                    download_dir=Path(staging), log=_quiet)
    stats = prepared.stats
    # trl drops rows without a trained token; what is left is what an epoch goes through.
    train = [r for r in prepared.train if 1 in r["assistant_masks"]]
    lengths = sorted(len(r["input_ids"]) for r in train)
    batches = plan_batches(spec, world_size)
    per_epoch = optimizer_steps(spec.model_copy(update={"max_steps": None, "num_epochs": 1}), batches,
                                stats["train_rows"])
    packing = data_lib.packing_stats([len(r["input_ids"]) for r in train], spec.max_seq_len, batches.micro_batch)
    view = {
        "format": stats["format"], "rows": stats["rows"], "train_rows": stats["train_rows"],
        "eval_rows": stats["eval_rows"],
        "dropped_rows": stats["dropped_train_rows"] + stats["dropped_eval_rows"],
        "dropped_reason": "no trainable (answer) token left after truncation to max_seq_len" if
        stats["dropped_train_rows"] + stats["dropped_eval_rows"] else None,
        "truncated_rows": stats["truncated_rows"], "max_seq_len": spec.max_seq_len,
        "tokens_per_row": {"min": lengths[0], "median": statistics.median(lengths),
                           "p95": _percentile(lengths, 95), "max": lengths[-1]},
        "train_tokens": sum(lengths),
        "answer_tokens": sum(sum(r["assistant_masks"]) for r in train),
        "all_rows_tokens": stats["tokens"], "all_rows_answer_tokens": stats["trainable_tokens"],
        "micro_batch": batches.micro_batch, "gradient_accumulation": batches.grad_accum,
        "processes": world_size, "effective_batch_size": batches.effective_batch_size,
        "steps_per_epoch": per_epoch, "epochs": spec.num_epochs,
        "total_steps": optimizer_steps(spec, batches, stats["train_rows"]),
        "real_token_share_unpacked": round(packing["real_token_share_unpacked"], 4),
        "packing": {"requested": bool(spec.lora_sample_packing), "used": _packing_used(spec, on_gpu),
                    "real_token_share_packed": round(packing["real_token_share_packed"], 4),
                    "sequences_packed": packing["sequences_packed"]},
    }
    return view, train


def _percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile."""
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _packing_used(spec: LoRASpec, on_gpu: bool) -> bool:
    # As the trainer decides it (train._check_machine): packing needs FlashAttention on a GPU.
    return bool(spec.lora_sample_packing and on_gpu)


# ---- the model, from its config ------------------------------------------------------------------------------------

def model_view(spec: LoRASpec) -> dict[str, Any]:
    """Parameter counts and shapes from the config, on an empty (meta-device) model: no weights are read."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(spec.base_model, token=os.environ.get("HF_TOKEN") or None)
    except Exception as exc:  # a missing path, no network, a gated model: the message says which
        raise model_lib.ModelError(f"base_model={spec.base_model!r}: cannot read its config ({exc})") from exc
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # from_config leaves tied embeddings as two parameters on the meta device
    targets = model_lib.resolve_targets(model, spec)
    modules = dict(model.named_modules())
    projections = model_lib.projection_names(model)
    lora = quantised = wrapped = 0
    for name in projections:
        weight = modules[name].weight
        # Linear weights are (out, in); transformers' Conv1D keeps (in, out): either way r x (in + out) per module.
        out_features, in_features = weight.shape if isinstance(modules[name], torch.nn.Linear) else weight.shape[::-1]
        quantised += weight.numel()
        if any(model_lib._matches(t, name) for t in targets):
            lora += spec.lora_r * (in_features + out_features) + (out_features if spec.lora_use_dora else 0)
            wrapped += 1
    _, total = model_lib.count_parameters(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {
        "model_type": config.model_type, "total_parameters": total, "trainable_parameters": lora,
        "target_modules": targets, "lora_r": spec.lora_r, "projection_parameters": quantised,
        "lora_rank_per_layer": spec.lora_r * wrapped // text.num_hidden_layers,
        "layers": text.num_hidden_layers, "hidden_size": text.hidden_size,
        "intermediate_size": getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        "attention_heads": heads, "kv_dim": (getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        "vocab_size": text.vocab_size, "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


# ---- memory ----------------------------------------------------------------------------------------------------------

def _dtype_bytes(dtype: Any) -> int:
    return dtype.itemsize


def weight_bytes(spec: LoRASpec, model: dict[str, Any], dtype: Any) -> int:
    """The base model's weights: the linear projections at 4/8 bits when quantised, everything else at dtype."""
    other = model["total_parameters"] - model["projection_parameters"]
    if spec.lora_load_in_4bit:
        per_weight = NF4_BYTES + NF4_SCALE_BYTES[bool(spec.lora_bnb_4bit_use_double_quant)]
    elif spec.lora_load_in_8bit:
        per_weight = INT8_BYTES
    else:
        per_weight = _dtype_bytes(dtype)
    return int(model["projection_parameters"] * per_weight + other * _dtype_bytes(dtype))


def _activations(model: dict[str, Any], tokens: int, act_bytes: int, checkpointing: bool, on_gpu: bool) -> int:
    """What the forward pass keeps for the backward pass, for ``tokens`` tokens in the micro-batch."""
    h, kv, i = model["hidden_size"], model["kv_dim"], model["intermediate_size"]
    # One Llama-style layer, per token (checked against torch's saved-tensor hooks on the tiny model: within 10%,
    # linear in tokens; CPU attention keeps no seq_len x seq_len matrix): each RMSNorm's float32 copy, normalised
    # and output tensors; rotated q and k, v and the attention output; the MLP's gate, up, silu(gate) and product;
    # each LoRA module's rank-r intermediate.
    per_token = 2 * (4 * h + 2 * act_bytes * h) + act_bytes * (2 * h + 2 * kv + 4 * i + model["lora_rank_per_layer"])
    layer = per_token * tokens
    scale = 1.0 if on_gpu else CPU_ACTIVATION_SCALE
    if not checkpointing:
        return int(scale * layer * model["layers"])
    # Checkpointing keeps each layer's input and recomputes one layer at a time during the backward pass.
    return int(scale * (model["layers"] * tokens * h * act_bytes + layer))


def estimate_memory(spec: LoRASpec, model: dict[str, Any], dtype: Any, micro_batch: int, seq_len: int,
                    checkpointing: bool, on_gpu: bool) -> dict[str, int]:
    """Itemised peak bytes per process for a micro-batch of ``micro_batch`` rows of ``seq_len`` tokens."""
    import torch

    tokens = micro_batch * seq_len
    # 4-bit layers compute in their compute dtype; that is the activations' dtype.
    compute = getattr(torch, spec.lora_bnb_4bit_compute_dtype) if spec.lora_load_in_4bit else dtype
    act_bytes = _dtype_bytes(compute)
    trainable = model["trainable_parameters"]
    items = {
        "base_weights": weight_bytes(spec, model, dtype),
        "lora_weights": trainable * LORA_BYTES,
        "lora_gradients": trainable * GRAD_BYTES,
        "optimizer_states": trainable * ADAM_BYTES,
        "activations": _activations(model, tokens, act_bytes, checkpointing, on_gpu),
        # float32 logits, their log-softmax and gradient, and the model-dtype logits the head writes first.
        "logits": int((1.0 if on_gpu else CPU_LOGITS_SHARE) * tokens * model["vocab_size"] * (3 * 4 + act_bytes)),
    }
    subtotal = sum(items.values())
    items["runtime_overhead"] = int(GPU_OVERHEAD_SHARE * subtotal) if on_gpu else CPU_OVERHEAD_BYTES
    return items


def available_memory(spec: LoRASpec, memory_gib: float | None, on_gpu: bool) -> tuple[int | None, str]:
    """Bytes available per process (None: unknown), and where the figure comes from."""
    if memory_gib is not None:
        return int(memory_gib * GIB), "--plan-memory-gib"
    if on_gpu and not _on_gpu():
        return None, "unknown: the plan is for a GPU and none is here; give --plan-memory-gib (plan_memory_gib)"
    if on_gpu:
        import torch

        return torch.cuda.get_device_properties(0).total_memory, "this machine's GPU 0"
    if "resource_memory_per_worker" in spec.model_fields_set:
        return _quantity_bytes(spec.resource_memory_per_worker) // spec.procs_per_worker, \
            "resource_memory_per_worker / processes per worker"
    return _machine_memory(), "this machine's available memory"


def _quantity_bytes(value: str) -> int:
    """A Kubernetes quantity (validated by LoRASpec) in bytes."""
    units = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60,
             "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15, "E": 10 ** 18, "m": 1e-3}
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * units[suffix])
    return int(float(value))


def _machine_memory() -> int:
    """MemAvailable, bounded by the cgroup's memory limit in a container."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit.isdigit():
            available = min(available or 2 ** 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available if available is not None else 2 ** 62


# ---- time ------------------------------------------------------------------------------------------------------------

def measure_throughput(spec: LoRASpec, dtype: Any, tokenizer: Any, rows: list[dict[str, Any]], micro_batch: int,
                       targets: list[str], checkpointing: bool) -> dict[str, Any]:
    """Tokens per second of forward/backward passes of the real model with LoRA on one micro-batch of the data
    (padded as the trainer pads), measured here. Quantised models are measured unquantised (said so)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = "cuda" if _on_gpu() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=dtype,
                                                 token=os.environ.get("HF_TOKEN") or None).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, target_modules=targets,
                                             lora_dropout=spec.lora_dropout, bias="none", task_type="CAUSAL_LM"))
    batch_rows = rows[:micro_batch]
    width = max(len(r["input_ids"]) for r in batch_rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch_rows], device=device)
    attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch_rows],
                             device=device)
    labels = torch.tensor([[t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]
                           + [-100] * (width - len(r["input_ids"])) for r in batch_rows], device=device)
    model.train()

    def step() -> None:
        # Mixed precision as the trainer runs it (bf16/fp16 autocast); without it peft computes LoRA in float32.
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()

    step()  # warm-up: first-call allocations and kernel selection
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(TIMED_PASSES):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / TIMED_PASSES
    return {"measured": True, "padded_tokens_per_second": round(len(batch_rows) * width / seconds, 1),
            "micro_batch_shape": [len(batch_rows), width], "seconds_per_pass": round(seconds, 4),
            "device": device, "quantised_measured_unquantised": bool(spec.lora_load_in_4bit or spec.lora_load_in_8bit),
            "gradient_checkpointing": checkpointing}


# ---- the plan --------------------------------------------------------------------------------------------------------

def make_plan(spec: LoRASpec, memory_gib: float | None = None, measure: bool = True,
              device: str | None = None) -> dict[str, Any]:
    """The plan as a JSON-serialisable dict; raises PlanError (after the plan is built: ``exc.plan``) when the run
    does not fit. ``device`` ("cuda" or "cpu"): what the training runs on, default this machine's; a dry run plans
    a GPU training on a CPU node (its dtype then bfloat16 unless the spec says, its time not measured)."""
    import torch
    from transformers import AutoTokenizer

    if not spec.dataset:
        raise data_lib.DataError("dataset is empty: give a local path, s3://bucket/key or a Hugging Face dataset id")
    on_gpu = _on_gpu() if device is None else device == "cuda"
    elsewhere = on_gpu != _on_gpu()  # planned for another device than this one
    dtype = model_lib.pick_dtype(spec)
    if elsewhere and spec.dtype == "auto":
        dtype = torch.bfloat16 if on_gpu else torch.float32
    if not elsewhere:
        model_lib.check_hardware(spec, dtype)
    world_size = int(os.environ.get("WORLD_SIZE", spec.world_size))
    model = model_view(spec)  # first: a wrong base_model fails before the data is tokenised
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model, token=os.environ.get("HF_TOKEN") or None)
    if tokenizer.pad_token is None:  # as the trainer does
        tokenizer.pad_token = tokenizer.eos_token
    dataset, train_rows = dataset_view(spec, tokenizer, world_size, on_gpu)

    # The longest micro-batch: packed sequences fill max_seq_len; otherwise rows pad to the longest in the batch.
    seq_len = spec.max_seq_len if dataset["packing"]["used"] else dataset["tokens_per_row"]["max"]
    checkpointing = on_gpu  # as the trainer sets it (train._sft_config): it only costs time on CPU
    micro_batch = dataset["micro_batch"]
    items = estimate_memory(spec, model, dtype, micro_batch, seq_len, checkpointing, on_gpu)
    available, source = available_memory(spec, memory_gib, on_gpu)
    baseline = GPU_CONTEXT_BYTES if on_gpu else CPU_PROCESS_BASELINE_BYTES

    def required(mb: int, length: int = seq_len) -> int:
        return sum(estimate_memory(spec, model, dtype, mb, length, checkpointing, on_gpu).values()) + baseline

    per_process = dataset["effective_batch_size"] // world_size
    fitting = [mb for mb in range(1, per_process + 1) if available is not None and required(mb) <= available]
    memory = {
        "device": "cuda" if on_gpu else "cpu", "dtype": str(dtype).removeprefix("torch."),
        "quantisation": "4-bit" if spec.lora_load_in_4bit else "8-bit" if spec.lora_load_in_8bit else None,
        "gradient_checkpointing": checkpointing, "micro_batch": micro_batch, "seq_len": seq_len,
        "items": items, "peak_bytes": sum(items.values()),
        "process_baseline_bytes": baseline,
        "process_baseline_note": "CUDA context" if on_gpu else "python + torch + unsloth + trl imported",
        "required_bytes": sum(items.values()) + baseline,
        "available_bytes": available, "available_source": source,
        "largest_micro_batch_that_fits": (max(fitting) if fitting else 0) if available is not None else None,
        "fits": required(micro_batch) <= available if available is not None else None,
        "note": "estimate" + ("" if on_gpu else "; on CPU, peak RSS above the process's baseline"),
    }
    timing: dict[str, Any] = {"measured": False, "note": "not measured" + (
        f" (the training runs on {'a GPU' if on_gpu else 'CPU'}, not on this machine's device)" if elsewhere else "")}
    if measure and not elsewhere:
        timing = measure_throughput(spec, dtype, tokenizer, train_rows, micro_batch, model["target_modules"],
                                    checkpointing)
        padded_tokens = dataset["train_tokens"] / dataset["real_token_share_unpacked"]
        if dataset["packing"]["used"]:
            padded_tokens = dataset["train_tokens"] / dataset["packing"]["real_token_share_packed"]
        epoch = padded_tokens / world_size / timing["padded_tokens_per_second"]
        total = epoch * spec.max_steps / dataset["steps_per_epoch"] if spec.max_steps else epoch * spec.num_epochs
        timing.update({"estimated_seconds_per_epoch": round(epoch, 1), "estimated_seconds_total": round(total, 1),
                       "note": "estimate: padded tokens per epoch / tokens per second of a few forward/backward "
                               "passes measured here (optimizer steps, evaluation and loading not counted)"})
    prompts = min(spec.sample_prompts, dataset["eval_rows"])
    samples = {"prompts": prompts, "max_new_tokens": spec.sample_max_new_tokens,
               "generated_tokens_at_most": 2 * prompts * spec.sample_max_new_tokens,
               "note": "after training: each held-out prompt answered by the base model and by the adapter"}
    plan = {"dataset": dataset, "model": model, "memory": memory, "time": timing, "samples": samples}
    if memory["fits"] is False:
        raise _refusal(spec, plan, required, available)
    return plan


def _refusal(spec: LoRASpec, plan: dict[str, Any], required: Any, available: int) -> PlanError:
    """Why the run does not fit, naming the parameter to change, its value, and a value that fits."""
    memory, dataset = plan["memory"], plan["dataset"]
    need = f"{required(memory['micro_batch']) / GIB:.2f} GiB estimated"
    have = f"{available / GIB:.2f} GiB available ({memory['available_source']})"
    fits = memory["largest_micro_batch_that_fits"]
    if fits:
        message = (f"max_tokens_per_gpu={spec.max_tokens_per_gpu} gives micro-batch {memory['micro_batch']} at "
                   f"max_seq_len={spec.max_seq_len}: {need}, {have}; micro-batch {fits} fits: set "
                   f"max_tokens_per_gpu={fits * spec.max_seq_len} or less")
    else:
        lengths = [n for n in range(memory["seq_len"] - 1, 0, -max(1, memory["seq_len"] // 64))
                   if required(1, n) <= available]
        shorter = (f"max_seq_len={lengths[0]} would fit at micro-batch 1" if lengths else
                   "no sequence length fits at micro-batch 1")
        quant = "" if spec.lora_load_in_4bit else "; or lora_load_in_4bit=True to shrink the base weights"
        message = (f"even micro-batch 1 does not fit: max_seq_len={spec.max_seq_len} (longest row "
                   f"{dataset['tokens_per_row']['max']} tokens) needs {required(1) / GIB:.2f} GiB, {have}; "
                   f"{shorter}{quant}; or give the run more memory")
    error = PlanError(message)
    error.plan = plan  # type: ignore[attr-defined]
    return error


def describe(plan: dict[str, Any]) -> str:
    """The plan for a person."""
    d, m, mem, t = plan["dataset"], plan["model"], plan["memory"], plan["time"]
    tpr = d["tokens_per_row"]
    lines = [
        "plan (nothing is trained or written)",
        f"data: {d['rows']} rows ({d['format']}), {d['train_rows']} train / {d['eval_rows']} eval; "
        f"{d['dropped_rows']} dropped" + (f" ({d['dropped_reason']})" if d["dropped_rows"] else "") +
        f"; {d['truncated_rows']} truncated at max_seq_len={d['max_seq_len']}",
        f"tokens per train row after the chat template: min {tpr['min']}, median {tpr['median']:g}, p95 {tpr['p95']}, "
        f"max {tpr['max']}; {d['train_tokens']:,} train tokens, {d['answer_tokens']:,} answer tokens carry the loss",
        f"padding: {d['real_token_share_unpacked']:.1%} real tokens unpacked; packing "
        f"{'on' if d['packing']['used'] else 'off'}" + (f" ({d['packing']['real_token_share_packed']:.1%} real tokens "
                                                        "packed)" if d["packing"]["requested"] else ""),
        f"batches: micro-batch {d['micro_batch']} x gradient accumulation {d['gradient_accumulation']} x "
        f"{d['processes']} process(es) = {d['effective_batch_size']}; {d['steps_per_epoch']} optimizer steps per "
        f"epoch, {d['total_steps']} in total",
        f"model: {m['model_type']}, {m['total_parameters']:,} parameters, {m['layers']} layers, hidden "
        f"{m['hidden_size']}, vocabulary {m['vocab_size']:,}; LoRA r={m['lora_r']} on "
        f"{', '.join(m['target_modules'])}: "
        f"{m['trainable_parameters']:,} trainable",
        f"memory estimate per process ({mem['device']}, {mem['dtype']}"
        + (f", {mem['quantisation']}" if mem["quantisation"] else "")
        + f", gradient checkpointing {'on' if mem['gradient_checkpointing'] else 'off'}, micro-batch "
          f"{mem['micro_batch']} x {mem['seq_len']} tokens):",
    ]
    lines += [f"  {name.replace('_', ' '):18s} {value / GIB:8.3f} GiB" for name, value in mem["items"].items()]
    need = (f"  {'peak':18s} {mem['peak_bytes'] / GIB:8.3f} GiB (+ {mem['process_baseline_bytes'] / GIB:.2f} GiB "
            f"{mem['process_baseline_note']}) = {mem['required_bytes'] / GIB:.2f} GiB")
    if mem["available_bytes"] is None:
        lines.append(f"{need}; memory available {mem['available_source']}")
    else:
        lines.append(f"{need} of {mem['available_bytes'] / GIB:.2f} GiB available ({mem['available_source']}): "
                     f"{'fits' if mem['fits'] else 'DOES NOT FIT'}; the largest micro-batch that fits is "
                     f"{mem['largest_micro_batch_that_fits']}")
    if t["measured"]:
        lines.append(f"time (estimate): {t['estimated_seconds_per_epoch']:,.0f} s per epoch, "
                     f"{t['estimated_seconds_total']:,.0f} s in total, at {t['padded_tokens_per_second']:,.0f} "
                     f"tokens/s measured here ({t['device']}, micro-batch {t['micro_batch_shape'][0]} x "
                     f"{t['micro_batch_shape'][1]})" + (" unquantised" if t["quantised_measured_unquantised"] else ""))
    else:
        lines.append("time: not measured")
    return "\n".join(lines)


def main_entry(spec: LoRASpec, memory_gib: float | None = None, measure: bool = True,
               device: str | None = None) -> int:
    """Print the plan and its JSON line; exit 2 on a known user error or a run that does not fit."""
    try:
        plan = make_plan(spec, memory_gib, measure, device)
    except PlanError as exc:
        _print(exc.plan)  # type: ignore[attr-defined]
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr, flush=True)
        return 2
    except (data_lib.DataError, model_lib.ModelError) as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr, flush=True)
        return 2
    _print(plan)
    return 0


def _print(plan: dict[str, Any]) -> None:
    for line in describe(plan).splitlines():
        print(f"{LOG_PREFIX}{line}", flush=True)
    print(PLAN_PREFIX + json.dumps(plan), flush=True)
