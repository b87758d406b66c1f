"""The training recipe, read top to bottom in :func:`run`: check -> load -> train -> export.

Runs as one process or under torchrun (rank and world size come from the environment). Rank 0 alone writes
shared files: metrics, the adapter, the summary, the chart and the published run. What it prints and leaves behind
is the output contract (airflow_provider_lora.core.contract), which the launchers read back.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# unsloth patches transformers/trl/peft on import and must come first; without it trl's SFTTrainer crashes on CPU
# when triton is installed (trl 1.15: "RuntimeError: 0 active drivers" from its fused LM-head kernel).
import unsloth  # noqa: F401  isort: skip

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.contract import (ADAPTER_DIR, CHECKPOINT_METRICS_FILE, CHECKPOINTS_DIR,
                                                 COMPLETE_MARKER, ERROR_PREFIX, LOG_PREFIX, MERGED_DIR, METRICS_FILE,
                                                 OOM_ADJUSTMENTS_KEY, OOM_ERROR, OOM_EXIT_CODE, OOM_SETTINGS_ENV,
                                                 REMOTE_CHECKPOINTS_DIR, RESULT_PREFIX, STAGED_DATA_DIR,
                                                 SUMMARY_FILE, TERMINATION_LOG, TERMINATION_LOG_ENV)
from airflow_provider_lora.core import oom as oom_rule
from airflow_provider_lora.core.results import RunResult, is_own_run, load_run_result, termination_message
from airflow_provider_lora.core.spec import BatchPlan, LoRASpec, optimizer_steps, plan_batches, warmup_warning
from lora_trainer import data as data_lib
from lora_trainer import export
from lora_trainer import model as model_lib
from lora_trainer import oom as oom_lib
from lora_trainer import tracking


def log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{LOG_PREFIX}{message}", flush=True)


@dataclass
class Outcome:
    """What a run leaves in memory: the summary (rank 0; empty elsewhere), and the trained model for callers that
    keep using it in-process (tests, notebooks)."""

    summary: dict[str, Any]
    model: Any
    tokenizer: Any


def run(spec: LoRASpec, work_dir: str | Path | None = None) -> Outcome:
    """Train ``spec`` and publish the run to ``spec.output_uri``."""
    from accelerate import PartialState

    # Joins the process group under torchrun (gloo on CPU); a no-op for one process.
    state = PartialState(cpu=not torch.cuda.is_available())
    started = time.time()

    # 1. check: everything that needs no model, so a mistake fails before minutes of loading
    _check_spec(spec)
    own = _check_output(spec, state)
    if own is not None:  # a retry whose earlier try already published this run
        _hand_back(own)
        return Outcome(own.summary, None, None)
    tracker = tracking.connect(spec, state.is_main_process, log)  # MLflow (rank 0): installed and reachable
    try:
        run_dir = _run_dir(spec, work_dir)
        setup = _check_machine(spec, state)
        checked = _check_data(spec, run_dir)
        # 2. load: the model, the data, the LoRA adapter
        loaded = _load(spec, setup, state, run_dir, checked)
        if tracker is not None:
            tracker.start(spec)
        # 3. train
        trained = _train(spec, setup, loaded, state, run_dir, tracker)
        # 4. export (rank 0): summary, adapter, merged model, the published run, the result line
        summary = _export(spec, trained.setup, loaded, trained, run_dir, started, tracker)
    except BaseException as exc:  # the MLflow run says the training failed (or was stopped) instead of running on
        if tracker is not None:  # (before start(), end() only puts the environment back)
            tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    outcome = Outcome(summary or {}, loaded.model, loaded.tokenizer)
    # The trainer's DDP wrapper holds the process group: free it while the group is alive. Freed after _close's
    # destroy_process_group, gloo's destructor hung joining its threads (rank 1 under torchrun on CPU, twice in CI).
    del trained, loaded
    gc.collect()
    _close(state)
    return outcome


# ---- 1. check ------------------------------------------------------------------------------------------------------

@dataclass
class _Setup:
    """What the checks decided about this machine before anything loads."""

    dtype: Any  # a torch.dtype
    plan: BatchPlan
    on_gpu: bool
    packing_used: bool
    packing_note: str
    gradient_checkpointing: bool
    oom_adjustments: list[dict[str, Any]]  # what running out of memory changed (earlier tries', then this one's)


def _check_spec(spec: LoRASpec) -> None:
    """The spec names a dataset, an output and, where they are paths, ones that exist here."""
    if not spec.dataset:
        raise data_lib.DataError("dataset is empty: give a local path, s3://bucket/key or a Hugging Face dataset id")
    if not spec.output_uri:
        raise ValueError("output_uri is empty: give a local/PVC directory or s3://bucket/prefix")
    for name, value, error in (("base_model", spec.base_model, model_lib.ModelError),
                               ("dataset", spec.dataset, data_lib.DataError)):
        # A path (not a hub id or s3://) must exist here, where the trainer runs: say so before loading anything.
        if value.startswith(("/", "./", "~", "file://")) and \
                not Path(value.removeprefix("file://")).expanduser().exists():
            raise error(f"{name}={value!r}: no such file or directory")
    _check_resume_path(spec)


class CheckpointError(ValueError):
    """resume_from_checkpoint names something that is not a checkpoint."""


def _check_resume_path(spec: LoRASpec) -> None:
    """A resume_from_checkpoint path must be a checkpoint (transformers' checkpoint-N directory): refused before the
    model and data load. 'latest' is looked up at the start of training."""
    value = spec.resume_from_checkpoint
    if value is None or value == "latest":
        return
    path = Path(value.removeprefix("file://")).expanduser()
    if (path / export.CHECKPOINT_STATE).is_file():
        return
    if not path.exists():
        reason = "no such file or directory"
    elif not path.is_dir():
        reason = "a file, not a checkpoint directory"
    else:
        inner = export.complete_checkpoints(path)
        reason = f"holds no checkpoint (no {export.CHECKPOINT_STATE})" + (
            f"; it holds checkpoint directories, the newest being {str(inner[-1])!r}" if inner else "")
    raise CheckpointError(f"resume_from_checkpoint={value!r}: {reason}; give a checkpoint-N directory, or 'latest'")


def _check_output(spec: LoRASpec, state: Any) -> RunResult | None:
    """Rank 0: the output can be written and holds no completed run, or holds this task's own run (returned)."""
    if not state.is_main_process:
        return None
    storage.check_writable(spec.output_uri)  # first: a missing bucket or no access, said as such
    try:
        storage.check_output_available(spec.output_uri, overwrite=spec.overwrite_output)
    except storage.OutputExistsError:
        # A retry of the task whose earlier try published this run (same spec and task): hand that run back
        # instead of refusing it. One process only: under torchrun the other ranks would wait for this one.
        own = _own_published_run(spec) if state.num_processes == 1 else None
        if own is None:
            raise
        log(f"{spec.output_uri} already holds this task's own run (an earlier try published it): returning it")
        return own
    return None


def _check_machine(spec: LoRASpec, state: Any) -> _Setup:
    """dtype, hardware options, the batch plan and packing for this machine, logged."""
    dtype = model_lib.pick_dtype(spec)
    model_lib.check_hardware(spec, dtype)
    plan = plan_batches(spec, state.num_processes)
    on_gpu = torch.cuda.is_available()
    # Packing keeps packed examples apart only with FlashAttention's varlen kernels; on CPU they would attend to
    # each other (seen with unsloth 2026.10.9 forced to pack on CPU: logits off by up to 1.07), so it is off there,
    # said loudly and recorded in summary.json.
    packing_used = bool(spec.lora_sample_packing and on_gpu)
    packing_note = ("on" if packing_used else "off: packing needs FlashAttention on a GPU; on CPU packed examples "
                    "would attend to each other" if spec.lora_sample_packing else "off (lora_sample_packing=False)")
    log(f"device: {'cuda x ' + str(torch.cuda.device_count()) if on_gpu else 'cpu'}, dtype {str(dtype)[6:]}, "
        f"{state.num_processes} process(es)")
    # trl's default (on) saves GPU memory; on CPU it only recomputes activations (bench/: 1.5x slower there).
    checkpointing, adjustments = on_gpu, []
    carried = oom_rule.read_settings(os.environ.get(OOM_SETTINGS_ENV))
    if carried is not None:  # an earlier try ran out of memory: the operator passes on what it changed
        plan = oom_rule.fitted(plan, carried["micro_batch"])
        checkpointing = checkpointing or bool(carried.get("gradient_checkpointing"))
        adjustments = list(carried.get("adjustments") or [])
        for change in adjustments:
            log(oom_rule.describe(change))
    log(plan.describe())
    # After halving, a micro-batch below what max_tokens_per_gpu allows is the point, not a mistake to warn of.
    if (batch_warning := plan.warning(spec)) is not None and carried is None:
        log(f"WARNING: {batch_warning}")
    if spec.lora_sample_packing and not packing_used:
        log(f"WARNING: sample packing requested but {packing_note}")
    return _Setup(dtype, plan, on_gpu, packing_used, packing_note, checkpointing, adjustments)


def _check_data(spec: LoRASpec, run_dir: Path) -> _CheckedData:
    """The rows read and their shapes checked, and the base tokenizer's own settings read (a tokenizer loads in
    moments), all before the model loads."""
    from transformers import AutoTokenizer

    rows = data_lib.read_and_check(spec, run_dir / STAGED_DATA_DIR, log=log)
    try:
        base = AutoTokenizer.from_pretrained(spec.base_model, token=os.environ.get("HF_TOKEN") or None)
        settings = {"model_max_length": base.model_max_length, "padding_side": base.padding_side}
    except Exception as exc:  # the model load that follows says what is wrong with the model
        log(f"the base tokenizer could not be read before the model ({type(exc).__name__}); the tokenizer saved "
            "with the adapter keeps the loader's settings")
        settings = {}
    return _CheckedData(rows, settings)


@dataclass
class _CheckedData:
    rows: data_lib.CheckedRows
    tokenizer_settings: dict[str, Any]  # the base tokenizer's model_max_length and padding_side


# ---- 2. load -------------------------------------------------------------------------------------------------------

@dataclass
class _Loaded:
    model: Any  # the base model with its LoRA adapter
    tokenizer: Any
    data: data_lib.PreparedData
    targets: list[str]  # the modules the adapter wraps
    trainable: int
    total: int
    tokenizer_settings: dict[str, Any]  # the base tokenizer's, restored in what is saved with the adapter


def _load(spec: LoRASpec, setup: _Setup, state: Any, run_dir: Path, checked: _CheckedData) -> _Loaded:
    """The base model and tokenizer, the tokenised data, then the LoRA adapter on the model."""
    model, tokenizer = model_lib.load_model(spec, setup.dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prepared = data_lib.prepare(spec, tokenizer, is_main_process=state.is_main_process,
                                wait_for_main=state.wait_for_everyone, download_dir=run_dir / STAGED_DATA_DIR,
                                log=log, checked=checked.rows)
    stats = prepared.stats
    dropped = stats.get("dropped_train_rows", 0) + stats.get("dropped_eval_rows", 0)
    log(f"data: {stats['rows']} rows ({stats['format']}), {stats['train_rows']} train / {stats['eval_rows']} eval "
        f"trained{f' ({dropped} dropped: no trainable token)' if dropped else ''}, {stats['trainable_tokens']} of "
        f"{stats['tokens']} tokens trained")
    steps = optimizer_steps(spec, setup.plan, stats["train_rows"])
    log(f"plan: {steps} optimizer step(s), warmup {spec.lr_warmup_steps}, learning rate {spec.learning_rate:g} "
        f"({spec.lr_scheduler})")
    if (warning := warmup_warning(spec, steps)) is not None:
        log(f"WARNING: {warning}")
    model, targets = model_lib.add_lora(model, spec)
    trainable, total = model_lib.count_parameters(model)
    log(f"LoRA r={spec.lora_r} alpha={spec.lora_alpha} on {', '.join(targets)}: {trainable:,} trainable of "
        f"{total:,} parameters")
    return _Loaded(model, tokenizer, prepared, targets, trainable, total, checked.tokenizer_settings)


# ---- 3. train ------------------------------------------------------------------------------------------------------

@dataclass
class _Trained:
    trainer: Any  # trl's SFTTrainer
    output: Any  # its TrainOutput
    metrics: MetricsCallback  # holds the rows of metrics.jsonl, in memory
    resumed_from: str | None  # the checkpoint the training resumed from
    remote_checkpoints: str | None  # where an s3:// run keeps its checkpoints between tries
    setup: _Setup  # as training ended: with what running out of memory changed


def _train(spec: LoRASpec, setup: _Setup, loaded: _Loaded, state: Any, run_dir: Path,
           tracker: tracking.Tracker | None = None) -> _Trained:
    """Train with trl's SFTTrainer, resuming from a checkpoint when asked; metrics.jsonl grows as it goes. Out of
    memory, one process goes on with half the micro-batch (_after_out_of_memory)."""
    from trl import SFTTrainer

    checkpoint_dir = run_dir / CHECKPOINTS_DIR
    metrics_path = run_dir / METRICS_FILE
    remote_checkpoints = _sync_remote_checkpoints(spec, state, checkpoint_dir, metrics_path)
    callback = MetricsCallback(metrics_path, append=spec.resume_from_checkpoint is not None)
    callbacks = [callback] + ([CheckpointUpload(remote_checkpoints, metrics_path)] if remote_checkpoints else [])
    if tracker is not None:  # one callback for every try below (report_to stays "none": it would make new ones)
        callbacks.append(tracker.callback())
    resume_from = _resume_checkpoint(spec, checkpoint_dir)
    initial = oom_lib.trainable_state(loaded.model) if state.num_processes == 1 else None
    # The held-out loss before the first step: the base model's (a new LoRA adapter changes nothing until it has
    # trained), the figure the trained adapter is compared with. Once per run: not on a resumed run, whose history
    # has it, nor on the tries after running out of memory.
    eval_on_start = loaded.data.eval is not None and resume_from is None
    while True:
        config = _sft_config(spec, setup, loaded, state, checkpoint_dir, eval_on_start)
        eval_on_start = False
        trainer = SFTTrainer(model=loaded.model, args=config, train_dataset=loaded.data.train,
                             eval_dataset=loaded.data.eval, processing_class=loaded.tokenizer, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # our progress lines replace its raw dicts
        try:
            output = trainer.train(resume_from_checkpoint=resume_from)
            return _Trained(trainer, output, callback, resume_from, remote_checkpoints, setup)
        except Exception as exc:
            if not oom_lib.is_out_of_memory(exc):
                raise
            report = oom_lib.memory_report(exc)
        # Out of the except block, so the traceback (and the step's tensors it holds) can be freed.
        del trainer
        loaded.model.zero_grad(set_to_none=True)  # a failed step's partial gradients must not reach the next one
        setup = _after_out_of_memory(setup, state, report)
        # This run's newest checkpoint, else the one it started from (given, or fetched from an earlier try).
        resume_from = _latest_checkpoint(checkpoint_dir) or resume_from
        if resume_from is None:
            oom_lib.restore(loaded.model, initial)  # step 0 again, from the adapter's initial weights
        log(f"continuing from {resume_from}" if resume_from else "no checkpoint yet: training again from step 0")


def _after_out_of_memory(setup: _Setup, state: Any, report: str) -> _Setup:
    """The setup to go on with after running out of memory (core/oom.py's rule: half the micro-batch, same
    effective batch, gradient checkpointing on), recorded and logged. Under torchrun a rank cannot recover alone
    (the others wait in collectives): it says so and fails, and the task's next try halves instead."""
    oom_lib.free_memory()
    if state.num_processes > 1:
        message = (f"{OOM_ERROR}rank {state.process_index} at micro-batch {setup.plan.micro_batch} ({report}); "
                   f"with {state.num_processes} processes this try cannot go on, the task's next try halves the "
                   "micro-batch")
        print(message, file=sys.stderr, flush=True)
        # torchrun's own error report would push this line out of the log tail Kubernetes keeps as the pod's
        # termination message, where the operator's next try looks for it.
        _write_termination(message)
        raise SystemExit(1)
    smaller = oom_rule.halved(setup.plan)
    if smaller is None:
        raise oom_rule.OutOfMemoryAtMicroBatch1(
            f"at micro-batch 1 ({report}): nothing is left to halve. To fit, {oom_rule.ADVICE}")
    change = oom_rule.adjustment(setup.plan, smaller, setup.gradient_checkpointing, report, "in-process")
    log(oom_rule.describe(change))
    return dataclasses.replace(setup, plan=smaller, gradient_checkpointing=True,
                               oom_adjustments=[*setup.oom_adjustments, change])


def _sft_config(spec: LoRASpec, setup: _Setup, loaded: _Loaded, state: Any, checkpoint_dir: Path,
                eval_on_start: bool = False) -> Any:
    """trl's SFTConfig for this spec, batch plan and machine."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=setup.plan.micro_batch,
        per_device_eval_batch_size=setup.plan.micro_batch,
        gradient_accumulation_steps=setup.plan.grad_accum,
        num_train_epochs=spec.num_epochs,
        max_steps=spec.max_steps or -1,
        learning_rate=spec.learning_rate,
        warmup_steps=spec.lr_warmup_steps,
        lr_scheduler_type=spec.lr_scheduler,
        # training_hub's recipe constants (the seed's backend), kept so results compare.
        weight_decay=0.01,
        max_grad_norm=0.3,
        optim="adamw_torch",
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=setup.dtype == torch.bfloat16,
        fp16=setup.dtype == torch.float16,
        use_cpu=not setup.on_gpu,
        gradient_checkpointing=setup.gradient_checkpointing,
        # Non-reentrant: the reentrant form computes no gradient when the inputs are frozen, as LoRA's are. (On a
        # GPU unsloth's own checkpointing replaces it.)
        gradient_checkpointing_kwargs=None if setup.on_gpu else {"use_reentrant": False},
        max_length=spec.max_seq_len,
        packing=setup.packing_used,
        padding_free=setup.packing_used,
        use_liger_kernel=bool(spec.use_liger),
        logging_steps=1,
        logging_first_step=True,
        eval_strategy="no" if loaded.data.eval is None else "steps" if spec.eval_steps else "epoch",
        eval_steps=spec.eval_steps,
        eval_on_start=eval_on_start,
        save_strategy="epoch" if spec.checkpoint_at_epoch else "no",
        save_only_model=False,
        report_to="none",
        disable_tqdm=True,
        dataset_num_proc=None,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False if state.num_processes > 1 else None,
    )


def _sync_remote_checkpoints(spec: LoRASpec, state: Any, checkpoint_dir: Path, metrics_path: Path) -> str | None:
    """For s3:// output, ``{output_uri}/_checkpoints``, where checkpoints outlive the pod: a resuming try fetches
    the newest complete one (rank 0, the others wait); a fresh run deletes those of an earlier run at this output,
    so its own retries never resume from them. None for local/PVC output, whose checkpoints stay in place."""
    remote = storage.join(spec.output_uri, REMOTE_CHECKPOINTS_DIR) if storage.is_s3(spec.output_uri) else None
    if remote and state.is_main_process:
        if spec.resume_from_checkpoint is not None:
            _fetch_remote_checkpoint(remote, checkpoint_dir, metrics_path)
        else:
            storage.remove_tree(remote)
    state.wait_for_everyone()
    return remote


# ---- 4. export -----------------------------------------------------------------------------------------------------

def _export(spec: LoRASpec, setup: _Setup, loaded: _Loaded, trained: _Trained, run_dir: Path,
            started: float, tracker: tracking.Tracker | None = None) -> dict[str, Any] | None:
    """Rank 0 writes the summary, the adapter (saved by every rank: a collective under DDP) and the merged model,
    publishes the run and hands back its result; returns the summary (None on other ranks)."""
    trainer, rows = trained.trainer, trained.metrics.rows
    summary = None
    if trainer.is_world_process_zero():
        summary = export.summarize(
            spec, run_dir=run_dir, train_output=trained.output, history=rows, data_stats=loaded.data.stats,
            plan=setup.plan, dtype=setup.dtype, targets=loaded.targets, trainable=loaded.trainable,
            total=loaded.total,
            packing={"requested": bool(spec.lora_sample_packing), "used": setup.packing_used,
                     "note": setup.packing_note},
            resumed_from=trained.resumed_from, wall_seconds=time.time() - started,
        )
        summary["gradient_checkpointing"] = setup.gradient_checkpointing
        summary[OOM_ADJUSTMENTS_KEY] = setup.oom_adjustments
        summary["samples"] = _samples(spec, trainer.model, loaded)
        if tracker is not None:  # written into summary.json below, so downstream tasks find the run
            summary[tracking.SUMMARY_KEY] = tracker.reference()
    trainer.save_model(str(run_dir / ADAPTER_DIR))  # collective under DDP; writes on rank 0 only
    if trainer.is_world_process_zero():
        # The loader sets its own model_max_length (max_seq_len) and padding side: save the base tokenizer's.
        for name, value in loaded.tokenizer_settings.items():
            setattr(loaded.tokenizer, name, value)
        loaded.tokenizer.save_pretrained(str(run_dir / ADAPTER_DIR))
        if spec.save_merged:
            export.save_merged(loaded.model, loaded.tokenizer, run_dir / MERGED_DIR)
        artifacts = export.finish(spec, run_dir, summary, rows)
        log(f"done: final loss {summary['final_loss']}, {summary['global_step']} steps in "
            f"{summary['train_runtime_seconds']:.1f}s; artifacts at {spec.output_uri}")
        if trained.remote_checkpoints:  # the run is published: its checkpoints have served their purpose
            storage.remove_tree(trained.remote_checkpoints)
        if tracker is not None:
            tracker.finish(summary, run_dir)
        _hand_back(RunResult(summary, rows, artifacts))
    return summary


def _samples(spec: LoRASpec, model: Any, loaded: _Loaded) -> list[dict[str, str]]:
    """Held-out prompts answered before and after (answers.py); never fails the run."""
    from lora_trainer.answers import before_and_after

    if spec.sample_prompts and loaded.data.eval is None:
        log("no held-out prompts to answer before and after: set eval_fraction to see them")
        return []
    try:
        samples = before_and_after(spec, model, loaded.tokenizer, loaded.data.eval)
    except Exception as exc:  # the run is trained and saved either way
        log(f"warning: could not answer the held-out prompts ({type(exc).__name__}: {exc})")
        return []
    for sample in samples:
        log(f"held-out prompt: {sample['prompt'][-120:]!r}; expected {sample['expected'][:120]!r}; base model "
            f"{sample['base'][:120]!r}; with the adapter {sample['with_adapter'][:120]!r}")
    return samples


def _hand_back(result: RunResult) -> None:
    """The result for the launcher: one line it can find in the pod log without access to the output location,
    and the pod's termination message."""
    print(RESULT_PREFIX + json.dumps(result.to_xcom()), flush=True)
    _write_termination_message(result)


def _close(state: Any) -> None:
    state.wait_for_everyone()
    if state.num_processes > 1:
        # Without this about one run in six crashes at exit under torchrun on CPU ("terminate called without an
        # active exception").
        torch.distributed.destroy_process_group()


# ---- helpers -------------------------------------------------------------------------------------------------------

def _run_dir(spec: LoRASpec, work_dir: str | Path | None) -> Path:
    """Local output is written in place (a PVC keeps checkpoints for a retry); S3 output is staged locally."""
    if not storage.is_s3(spec.output_uri):
        path = Path(spec.output_uri)
    elif work_dir is not None:
        path = Path(work_dir)
    else:
        # Named after the output so every rank of a torchrun job on this node stages in the same place.
        digest = hashlib.sha256(spec.output_uri.encode()).hexdigest()[:16]
        path = Path(os.environ.get("LORA_WORK_DIR") or tempfile.gettempdir()) / f"lora-run-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    if not spec.resume_from_checkpoint and int(os.environ.get("RANK", "0")) == 0:
        # A fresh run never mixes with files of an earlier one (the output check above already refused to replace
        # a completed run unless asked to).
        for stale in (CHECKPOINTS_DIR, ADAPTER_DIR, MERGED_DIR, METRICS_FILE, SUMMARY_FILE, COMPLETE_MARKER):
            target = path / stale
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    return path


def _resume_checkpoint(spec: LoRASpec, checkpoint_dir: Path) -> str | None:
    if spec.resume_from_checkpoint is None:
        return None
    if spec.resume_from_checkpoint != "latest":
        path = Path(spec.resume_from_checkpoint.removeprefix("file://")).expanduser()  # checked by _check_spec
        log(f"resuming from {path}")
        return str(path)
    latest = _latest_checkpoint(checkpoint_dir)
    log(f"resuming from {latest}" if latest else
        f"resume_from_checkpoint='latest': no checkpoint in {checkpoint_dir} yet, starting at step 0")
    return latest


def _latest_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest checkpoint written to the end: a try killed while saving leaves a newer one cut short."""
    checkpoints = export.complete_checkpoints(checkpoint_dir)
    return str(checkpoints[-1]) if checkpoints else None


class CheckpointUpload(TrainerCallback):
    """Rank 0 copies each new checkpoint (with the loss history so far) to ``{output_uri}/_checkpoints/``. Each
    copy gets its own _COMPLETE marker last, so a copy cut short by a failure is never resumed from."""

    def __init__(self, remote: str, metrics_path: Path):
        self.remote, self.metrics_path = remote, metrics_path

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.metrics_path.exists():
            shutil.copyfile(self.metrics_path, local / CHECKPOINT_METRICS_FILE)
        storage.publish_run(local, storage.join(self.remote, local.name), overwrite=True)
        log(f"checkpoint {local.name} copied to {self.remote}")


def _fetch_remote_checkpoint(remote: str, checkpoint_dir: Path, metrics_path: Path) -> None:
    """Bring the newest complete checkpoint of an earlier try (and its loss history) back for resuming."""
    names = [n for n in storage.completed_children(remote) if n.startswith("checkpoint-")]
    if not names or any(checkpoint_dir.glob("checkpoint-*")):
        return
    newest = max(names, key=lambda n: int(n.rsplit("-", 1)[-1]))
    target = storage.download(storage.join(remote, newest), checkpoint_dir / newest)
    if (target / CHECKPOINT_METRICS_FILE).exists():
        shutil.copyfile(target / CHECKPOINT_METRICS_FILE, metrics_path)
    log(f"fetched {newest} of an earlier try from {remote}")


def _own_published_run(spec: LoRASpec) -> RunResult | None:
    """The run at ``spec.output_uri`` when the task instance that launched this process (TASK_ENV) published it
    from the same spec."""
    task = export.launching_task()
    if task is None:
        return None
    try:
        run = load_run_result(spec.output_uri)
    except Exception:  # unreadable: not recognisably ours, so the usual refusal stands
        return None
    return run if is_own_run(run.summary, spec, task) else None


def _write_termination_message(result: RunResult) -> None:
    """In a Kubernetes pod, a short result in the termination message lets the operator read it without
    pods/exec or log RBAC (Kubernetes keeps 4 KiB of it, so only headline figures go there, as whole JSON)."""
    _write_termination(termination_message(result.to_xcom()))


def _write_termination(text: str) -> None:
    path = Path(os.environ.get(TERMINATION_LOG_ENV, TERMINATION_LOG))
    if not path.parent.exists() or not os.access(path.parent, os.W_OK):
        return
    try:
        path.write_text(text)
    except OSError:
        pass


class MetricsCallback(TrainerCallback):
    """Writes one metrics.jsonl line per logging step and a progress line a person can follow in pod logs."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if append and path.exists():
            self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.started = time.time()
        self.last_time = self.started
        self.last_tokens: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last_time = time.time()
        # When resuming, rows logged after the checkpoint are logged again: drop the old ones so no step repeats.
        kept = [r for r in self.rows if r["step"] <= state.global_step]
        if state.is_world_process_zero and len(kept) != len(self.rows):
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.rows = kept

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        elapsed = now - self.started
        if "eval_loss" in logs:
            row = {"step": state.global_step, "epoch": logs.get("epoch", state.epoch), "eval_loss": logs["eval_loss"],
                   "elapsed_seconds": round(elapsed, 3)}
            print(f"{LOG_PREFIX}eval at step {state.global_step}: eval loss {logs['eval_loss']:.4f}", flush=True)
        elif "loss" in logs:
            tokens = logs.get("num_tokens")
            rate = None
            if tokens is not None and self.last_tokens is not None and now > self.last_time:
                rate = (tokens - self.last_tokens) / (now - self.last_time)
            self.last_tokens, self.last_time = tokens, now
            row = {"step": state.global_step, "epoch": logs.get("epoch", state.epoch), "loss": logs["loss"],
                   "grad_norm": logs.get("grad_norm"), "learning_rate": logs.get("learning_rate"),
                   "tokens_per_second": None if rate is None else round(rate, 1), "num_tokens": tokens,
                   "elapsed_seconds": round(elapsed, 3)}
            done = state.global_step / max(1, state.max_steps)
            eta = elapsed / done - elapsed if done else 0
            print(f"{LOG_PREFIX}step {state.global_step}/{state.max_steps} | epoch {row['epoch']:.2f} | "
                  f"loss {row['loss']:.4f} | lr {row['learning_rate']:.2e} | "
                  f"{'-' if rate is None else f'{rate:,.0f}'} tok/s | elapsed {_hms(elapsed)} | eta {_hms(eta)}",
                  flush=True)
        else:
            return
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def main_entry(spec: LoRASpec, work_dir: str | None = None) -> int:
    """Run and map known user errors to exit code 2 with a one-line reason (no traceback)."""
    try:
        run(spec, work_dir)
    except (data_lib.DataError, model_lib.ModelError, CheckpointError, storage.OutputExistsError,
            storage.OutputNotWritableError, tracking.TrackingError) as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr, flush=True)
        return 2
    except oom_rule.OutOfMemoryAtMicroBatch1 as exc:
        print(f"{OOM_ERROR}{exc}", file=sys.stderr, flush=True)
        return OOM_EXIT_CODE
    return 0
