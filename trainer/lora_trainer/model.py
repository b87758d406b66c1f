"""Model: load the base model through unsloth and wrap it with a LoRA adapter.

Unquantised models load with unsloth's ``FastLanguageModel.from_pretrained``. Quantised ones (4-bit / 8-bit) load
with transformers and a ``BitsAndBytesConfig``, because unsloth silently drops a ``quantization_config`` and so would
ignore the quant type, compute dtype and double-quant settings (seen with unsloth 2026.10.9: fp4 / no double quant
/ fp32 compute came out nf4 / double quant / bf16); unsloth's ``get_peft_model`` then wraps
either one the same way.
"""

from __future__ import annotations

import os
from typing import Any

from airflow_provider_lora.core.spec import LoRASpec


class ModelError(ValueError):
    """The model or an option cannot be used on this machine; the message says why and what to change."""


def pick_dtype(spec: LoRASpec) -> Any:
    import torch

    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPU, bf16 only where the processor has native bf16 (it is slow when emulated).
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_hardware(spec: LoRASpec, dtype: Any) -> None:
    """Options that cannot work on this machine are rejected before the model loads."""
    import torch

    on_gpu = torch.cuda.is_available()
    if spec.use_liger and not on_gpu:
        raise ModelError("use_liger=True needs a CUDA GPU: Liger's kernels are Triton GPU kernels and none was "
                         "found; leave use_liger unset on CPU")
    if spec.use_liger:
        try:
            import liger_kernel  # noqa: F401
        except ImportError as exc:
            raise ModelError("use_liger=True but liger-kernel is not installed: pip install "
                             "'airflow-provider-lora[unsloth]'") from exc
    if dtype == torch.float16 and not on_gpu:
        raise ModelError("dtype='float16' is not supported for training on CPU; use 'auto', 'bfloat16' or 'float32'")


def load_model(spec: LoRASpec, dtype: Any) -> tuple[Any, Any]:
    """The base model and its tokenizer."""
    import torch
    from unsloth import FastLanguageModel

    token = os.environ.get("HF_TOKEN") or None
    if not (spec.lora_load_in_4bit or spec.lora_load_in_8bit):
        return FastLanguageModel.from_pretrained(
            spec.base_model, max_seq_length=spec.max_seq_len, dtype=dtype, load_in_4bit=False, load_in_8bit=False,
            full_finetuning=False, token=token, random_state=spec.seed,
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if spec.lora_load_in_4bit:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.lora_bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=getattr(torch, spec.lora_bnb_4bit_compute_dtype),
            bnb_4bit_use_double_quant=spec.lora_bnb_4bit_use_double_quant,
        )
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(spec.base_model, quantization_config=quant, dtype=dtype,
                                                 device_map=device_map, token=token)
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model, token=token)
    return model, tokenizer


def _projection_types() -> tuple:
    """The layer types LoRA can wrap: torch's Linear, transformers' Conv1D (the GPT-2 family's projections) and
    bitsandbytes' quantised Linear layers."""
    import torch
    from transformers.pytorch_utils import Conv1D

    types: tuple = (torch.nn.Linear, Conv1D)
    try:
        import bitsandbytes as bnb

        types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    return types


def projection_names(model: Any) -> list[str]:
    """Full names of every linear projection (Linear, Conv1D, bitsandbytes) except the output head."""
    types = _projection_types()
    output_head = model.get_output_embeddings()
    return [name for name, module in model.named_modules()
            if name and isinstance(module, types) and module is not output_head]


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every linear projection except the output head: LoRA's default targets."""
    return sorted({name.rsplit(".", 1)[-1] for name in projection_names(model)})


def _matches(target: str, name: str) -> bool:
    """peft's rule for a target given as a string list: the module's full name is the target or ends with
    '.' + target (so 'q_proj' and 'self_attn.q_proj' both name model.layers.0.self_attn.q_proj)."""
    return name == target or name.endswith("." + target)


def resolve_targets(model: Any, spec: LoRASpec) -> list[str]:
    """The target modules for ``spec``: its lora_target_modules, each of which must name a projection (peft's
    suffix match), or every projection's leaf name. A model with no projection LoRA can wrap is refused."""
    names = projection_names(model)
    available = linear_module_names(model)
    if not names:
        raise ModelError(f"base_model={spec.base_model!r}: no layer LoRA can wrap was found (it looks for "
                         "torch.nn.Linear, transformers' Conv1D and bitsandbytes Linear layers other than the output "
                         "head); use a model built from such projections")
    targets = spec.target_modules or available
    unknown = [t for t in targets if not any(_matches(t, n) for n in names)]
    if unknown:
        raise ModelError(f"lora_target_modules={spec.lora_target_modules!r}: {', '.join(unknown)} not found in "
                         f"{spec.base_model}; its linear projections are: {', '.join(available)} (a dotted name "
                         "such as 'self_attn.q_proj' matches the modules whose full name ends with it)")
    return targets


def add_lora(model: Any, spec: LoRASpec) -> tuple[Any, list[str]]:
    """Wrap ``model`` with LoRA. Returns the PEFT model and the target modules actually used."""
    import torch
    from unsloth import FastLanguageModel

    targets = resolve_targets(model, spec)
    peft_model = FastLanguageModel.get_peft_model(
        model,
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,
        use_rslora=spec.lora_use_rslora,
        use_dora=spec.lora_use_dora,
        bias="none",
        # unsloth's offloaded gradient checkpointing saves GPU memory; on CPU it would only cost time.
        use_gradient_checkpointing="unsloth" if torch.cuda.is_available() else False,
        random_state=spec.seed,
    )
    return peft_model, targets


def parameter_count(param: Any) -> int:
    """The parameters a tensor holds: bitsandbytes packs two 4-bit values per byte into a Params4bit, whose numel
    is half the real count (its quant_state keeps the original shape)."""
    if type(param).__name__ == "Params4bit":
        shape = getattr(getattr(param, "quant_state", None), "shape", None)
        if shape is not None:
            count = 1
            for dim in shape:
                count *= int(dim)
            return count
        return param.numel() * 2
    return param.numel()


def count_parameters(model: Any) -> tuple[int, int]:
    """Trainable and total parameters, counting 4-bit weights as parameters, not packed bytes."""
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    return trainable, total
