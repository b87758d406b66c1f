"""Out-of-memory errors inside the trainer's process: recognising them, freeing memory, and saying what was known.

The rule applied after one (half the micro-batch, same effective batch, gradient checkpointing on) is shared with
the operator: airflow_provider_lora/core/oom.py.
"""

from __future__ import annotations

import gc
import resource
from typing import Any

import torch
from accelerate.utils.memory import should_reduce_batch_size


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), MemoryError, or an allocator's RuntimeError that accelerate recognises as
    out of memory (CUDA/XPU/MPS/HPU, and the CPU allocator's "can't allocate memory")."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, Exception) and should_reduce_batch_size(exc))


def free_memory() -> None:
    """Release what the failed step held (its tensors go with the trainer and the traceback, already dropped)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_report(exc: BaseException) -> str:
    """What is known about the memory the run needed: the allocator's own words, and the peak seen."""
    said = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        peak = (f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated of the GPU's "
                f"{total / 2**30:.2f} GiB")
    else:
        peak = f"process peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident"
    return f"{said}; {peak}"


def trainable_state(model: Any) -> dict[str, Any]:
    """A copy of the trainable (LoRA) weights: a restart from step 0 begins from them, not from half-trained ones."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore(model: Any, state: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(state[name])
