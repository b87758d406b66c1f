"""Out-of-memory self-healing: the one rule both sides apply, and how a retry learns what the last try ran with.

The rule: halve the micro-batch and raise gradient accumulation so the effective batch (and so the learning
dynamics) stays the same, and turn gradient checkpointing on. The trainer applies it within its process when it
catches an out-of-memory error (lora_trainer/oom.py); the operator applies it to the next try when the kernel
killed the last one (OOMKilled, exit 137, cannot be caught), reading the failed pod that try left. No torch here:
the Airflow side imports this module. docs/concepts.md, "Out-of-memory policy".
"""

from __future__ import annotations

import json
from typing import Any

from airflow_provider_lora.core.contract import OOM_ERROR, OOM_EXIT_CODE, OOM_SETTINGS_ENV
from airflow_provider_lora.core.spec import BatchPlan, LoRASpec, plan_batches

# What to try when micro-batch 1 does not fit either.
ADVICE = ("load the model in 4-bit (lora_load_in_4bit=True), lower max_seq_len, use a smaller lora_r, or run on a "
          "GPU with more memory (on a pod: raise resource_memory_per_worker)")


class OutOfMemoryAtMicroBatch1(RuntimeError):
    """Out of memory with nothing left to halve."""


def fitted(plan: BatchPlan, micro_batch: int) -> BatchPlan:
    """``plan`` with the largest micro-batch of at most ``micro_batch`` that divides the per-process batch; the
    gradient accumulation makes up the rest, so the effective batch is unchanged."""
    per_process = plan.effective_batch_size // plan.world_size
    micro = max(d for d in range(1, max(1, min(micro_batch, per_process)) + 1) if per_process % d == 0)
    seq_len = plan.max_tokens_per_micro_batch // plan.micro_batch
    return plan.model_copy(update={"micro_batch": micro, "grad_accum": per_process // micro,
                                   "max_tokens_per_micro_batch": micro * seq_len})


def halved(plan: BatchPlan) -> BatchPlan | None:
    """``plan`` with at most half its micro-batch and the same effective batch; None at micro-batch 1."""
    return None if plan.micro_batch <= 1 else fitted(plan, plan.micro_batch // 2)


def adjustment(before: BatchPlan, after: BatchPlan, checkpointing: bool, why: str, where: str) -> dict[str, Any]:
    """One change, as summary.json records it (``where``: "in-process" or "retry (try N)")."""
    return {"micro_batch": {"from": before.micro_batch, "to": after.micro_batch},
            "grad_accum": {"from": before.grad_accum, "to": after.grad_accum},
            "gradient_checkpointing": {"from": checkpointing, "to": True},
            "effective_batch_size": after.effective_batch_size, "where": where, "why": why}


def describe(change: dict[str, Any]) -> str:
    mb, ga, gc = change["micro_batch"], change["grad_accum"], change["gradient_checkpointing"]
    return (f"out of memory ({change['why']}): {change['where']}, micro-batch {mb['from']} -> {mb['to']}, gradient "
            f"accumulation {ga['from']} -> {ga['to']} (effective batch {change['effective_batch_size']} kept)"
            + ("" if gc["from"] else ", gradient checkpointing on"))


def settings(plan: BatchPlan, adjustments: list[dict[str, Any]]) -> dict[str, Any]:
    """What OOM_SETTINGS_ENV carries to the next try."""
    return {"micro_batch": plan.micro_batch, "gradient_checkpointing": True, "adjustments": adjustments}


def read_settings(text: str | None) -> dict[str, Any] | None:
    """OOM_SETTINGS_ENV's value, or None when unset or not ours."""
    try:
        value = json.loads(text or "null")
    except ValueError:
        return None
    ok = isinstance(value, dict) and isinstance(value.get("micro_batch"), int) and value["micro_batch"] >= 1
    return value if ok else None


# ---- across tries: the operator reads the run the last try left ----------------------------------------------------

def was_out_of_memory(state: Any) -> bool:
    """Whether a failed run (its PodState) ran out of memory: killed by the kernel, or the trainer said so."""
    return (state.reason == "OOMKilled" or state.exit_code == OOM_EXIT_CODE
            or OOM_ERROR in (state.termination_message or ""))


def retry_settings(previous: dict[str, Any], state: Any, spec: LoRASpec, try_number: int) -> dict[str, Any] | None:
    """OOM_SETTINGS_ENV for try ``try_number``, from the run (Pod or TrainJob object, and its state) an earlier try
    left: the settings that run had, halved again when it ran out of memory; None when it had none and did not.
    The earlier values come from the object itself (its env, else the spec in its command), so each try halves
    the last. OutOfMemoryAtMicroBatch1 when it ran out of memory at micro-batch 1."""
    holder = _trainer_holder(previous)
    env = {e.get("name"): e.get("value") or "" for e in holder.get("env") or []}
    carried = read_settings(env.get(OOM_SETTINGS_ENV, "").replace("$$", "$"))  # as the operator escaped it
    if not was_out_of_memory(state):
        return carried  # failed for another reason: keep what got it this far
    base = plan_batches(_spec_in(holder) or spec, spec.procs_per_worker * spec.resource_num_workers)
    before = fitted(base, carried["micro_batch"]) if carried else base
    said = [line.split(OOM_ERROR, 1)[1] for line in (state.termination_message or "").splitlines()
            if OOM_ERROR in line]  # the trainer's own words, when it wrote them
    why = f"try {try_number - 1}: {state.describe()}" + "".join(f"; {text}" for text in said[-1:])
    after = halved(before)
    if after is None:
        raise OutOfMemoryAtMicroBatch1(
            f"try {try_number - 1} ran out of memory at micro-batch 1 ({state.describe()}; memory limit "
            f"{_memory_limit(previous) or 'unknown'}): nothing is left to halve. To fit, {ADVICE}")
    change = adjustment(before, after, bool(carried and carried.get("gradient_checkpointing")), why,
                        f"retry (try {try_number})")
    return settings(after, [*(carried or {}).get("adjustments", []), change])


def _trainer_holder(obj: dict[str, Any]) -> dict[str, Any]:
    """The part of a Pod or TrainJob with the trainer's env and command."""
    from airflow_provider_lora.core.render import TRAINER_CONTAINER

    body = obj.get("spec") or {}
    if obj.get("kind") == "TrainJob" or "trainer" in body:
        return body.get("trainer") or {}
    containers = body.get("containers") or []
    return next((c for c in containers if c.get("name") == TRAINER_CONTAINER), containers[0] if containers else {})


def _spec_in(holder: dict[str, Any]) -> LoRASpec | None:
    """The spec in a trainer's command (render.trainer_argv: ``--spec-json JSON``, '$' doubled), if readable."""
    argv = [*(holder.get("command") or []), *(holder.get("args") or [])]
    try:
        return LoRASpec.model_validate_json(argv[argv.index("--spec-json") + 1].replace("$$", "$"))
    except (ValueError, IndexError):
        return None


def _memory_limit(obj: dict[str, Any]) -> str | None:
    return ((_trainer_holder(obj).get("resources") or {}).get("limits") or {}).get("memory")
