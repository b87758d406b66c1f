"""The trainer's output contract: what it prints, the files it leaves behind, and what launchers read back.

The trainer (in its pod, under torchrun or in a subprocess) writes with these names; the Airflow operator, its
trigger, the launchers and the KFP component parse with them. Each concept is defined here once. This module
imports nothing, so the scheduler, triggerer and workers load it for free.
"""

from __future__ import annotations

# ---- lines the trainer prints ------------------------------------------------------------------------------------

# Every line meant for a person (progress, warnings, done); rank 0 only, so a torchrun log does not repeat it.
LOG_PREFIX = "[lora-trainer] "
# A known user error (bad data, bad model option, output taken or not writable) on stderr before exit code 2; the
# local launcher reports the text after it as the reason the run failed.
ERROR_PREFIX = LOG_PREFIX + "error: "
# The trainer's last stdout line: this prefix, then the result as one JSON object (RESULT_KEYS). Launchers find it
# in the pod log, so they need no access to the output location.
RESULT_PREFIX = "LORA_RESULT "
# ``lora-train --plan`` prints its plan (data, model, memory and time estimates; nothing trained) as one JSON object
# on a line after this prefix.
PLAN_PREFIX = "LORA_PLAN "

# ---- the result object (result line, XCom, trigger event, termination message) -----------------------------------

SUMMARY_KEY = "summary"  # summary.json's contents
HISTORY_KEY = "history"  # metrics.jsonl's rows, downsampled
ARTIFACTS_KEY = "artifacts"  # name -> URI of what was published (root, adapter, metrics, summary, charts, merged)
RESULT_KEYS = (SUMMARY_KEY, HISTORY_KEY, ARTIFACTS_KEY)

# ---- the Kubernetes termination message -----------------------------------------------------------------------------

# A pod's operator can read the termination message without pods/exec or log RBAC. The trainer writes to the file
# this variable names (the pod manifest sets it; tests point it at a temp file), else Kubernetes' default path.
TERMINATION_LOG_ENV = "LORA_TERMINATION_LOG"
TERMINATION_LOG = "/dev/termination-log"
# Kubernetes keeps the first 4096 bytes of a container's termination message; text past that is cut, so the trainer
# writes what fits, whole: SUMMARY_KEY with only these headline figures, and ARTIFACTS_KEY when it fits (no history).
TERMINATION_MESSAGE_BYTES = 4096
TERMINATION_SUMMARY_KEYS = ("final_loss", "min_loss", "final_eval_loss", "global_step", "train_runtime_seconds",
                            "tokens_per_second")

# ---- the run directory (local staging, a PVC, or what is published under output_uri) -----------------------------

ADAPTER_DIR = "adapter"  # the LoRA adapter and its tokenizer (peft's format)
MERGED_DIR = "merged"  # the base model with the adapter merged in, only with save_merged
METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step or eval (see core/results.py)
SUMMARY_FILE = "summary.json"  # the run's headline figures, settings, versions, spec and task
CHART_HTML = "loss_chart.html"
CHART_PNG = "loss_chart.png"
# Written last by a publish, listing every published file with its size: without it a location holds no complete
# run (missing, still running, or cut short mid-copy).
COMPLETE_MARKER = "_COMPLETE"
# Never published: the trainer's local checkpoints (transformers' checkpoint-N directories) and its staged dataset.
CHECKPOINTS_DIR = "checkpoints"
STAGED_DATA_DIR = "_data"
# Where checkpoints of an s3:// run are kept between tries (the pod's own disk goes away with the pod); each
# checkpoint-N copy there gets its own COMPLETE_MARKER, and the prefix is removed once the run is published.
REMOTE_CHECKPOINTS_DIR = "_checkpoints"
CHECKPOINT_METRICS_FILE = "lora_metrics.jsonl"  # the loss history up to a checkpoint, kept inside it for resuming

# ---- what a launcher hands the trainer ------------------------------------------------------------------------------

# The launching task instance as JSON; the trainer records it in summary.json as "task", so a retry of that task
# recognises the run it already published as its own.
TASK_ENV = "LORA_TASK"

# Data files the trainer reads, by suffix, with the `datasets` builder that reads each. A dataset file without one
# of these suffixes (a KFP artifact) is given one before the trainer sees it.
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# ---- running out of memory (docs/concepts.md, "Out-of-memory policy") -----------------------------------------------

# The trainer ran out of memory at micro-batch 1, with nothing left to halve: it prints OOM_ERROR and why on stderr
# and exits with OOM_EXIT_CODE, which no retry can fix (the operator does not retry it). Under torchrun it prints
# OOM_ERROR for any micro-batch (a rank cannot recover alone) and torchrun exits 1: the pod's log tail, its
# termination message, then carries OOM_ERROR, and the next try halves the micro-batch.
OOM_ERROR = ERROR_PREFIX + "out of memory: "
OOM_EXIT_CODE = 3
# What earlier tries' out-of-memory failures changed, as JSON {"micro_batch", "gradient_checkpointing",
# "adjustments"}: the operator sets it on a retry's trainer container; the trainer applies it.
OOM_SETTINGS_ENV = "LORA_OOM_SETTINGS"
# summary.json (and so the XCom summary): every change made after running out of memory, in order.
OOM_ADJUSTMENTS_KEY = "oom_adjustments"
