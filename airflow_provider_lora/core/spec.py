"""LoRASpec: the one definition of every fine-tuning parameter.

Every caller (operator kwargs, the UI trigger form, the KFP component, the trainer CLI, the docs table) derives its
parameters from the fields below. The first block mirrors the seed KFP component's ``training_*`` inputs, without the
prefix and with the seed's defaults; where the seed documents an effective default for an Optional ("default: 2e-4"),
validation fills it in, so downstream code never re-defaults anything.

This module imports neither airflow nor kfp nor any ML library: it runs on the Airflow scheduler, in the KFP launcher
and in the training image alike.
"""

from __future__ import annotations

import difflib
import json
import operator
import re
from typing import Any, Literal, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Section of each field, used to group the trigger form and the docs table.
SECTIONS = MODEL, DATA, LORA, QUANT, TRAINING, RESOURCES, KUBERNETES, OUTPUT = (
    "Model", "Data", "LoRA", "Quantisation", "Training", "Resources", "Kubernetes", "Output",
)

# transformers SchedulerType values that need no extra kwargs (a test checks they exist in transformers).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
FSDP_STRATEGIES = ("FULL_SHARD", "HYBRID_SHARD", "NO_SHARD")
DATASET_FORMATS = ("auto", "messages", "conversations", "alpaca", "prompt_completion", "text")
# Closed choices of the plain-string seed parameters (the seed types them as str).
CHOICES: dict[str, tuple[str, ...]] = {
    "lora_bnb_4bit_quant_type": QUANT_TYPES,
    "lora_bnb_4bit_compute_dtype": COMPUTE_DTYPES,
    "lr_scheduler": LR_SCHEDULERS,
    "fsdp_sharding_strategy": FSDP_STRATEGIES,
}
# Choices a field names but refuses, with the reason (the message says it; the trigger form does not offer them).
REFUSED_CHOICES: dict[str, dict[str, str]] = {
    "fsdp_sharding_strategy": dict.fromkeys(
        ("FULL_SHARD", "HYBRID_SHARD"),
        "unsloth's LoRA path trains with plain data parallelism (DDP), not FSDP; use NO_SHARD or leave it unset"),
}
# What each closed choice accepts: CHOICES less REFUSED_CHOICES.
ACCEPTED_CHOICES: dict[str, tuple[str, ...]] = {
    name: tuple(c for c in choices if c not in REFUSED_CHOICES.get(name, {})) for name, choices in CHOICES.items()
}

# Numeric bounds, kept in each field's metadata under their JSON Schema keywords (the trigger form copies them):
# keyword -> (how the message writes it, the test a valid value passes).
BOUND_KEYWORDS: dict[str, tuple[str, Any]] = {
    "minimum": (">=", operator.ge),
    "exclusiveMinimum": (">", operator.gt),
    "maximum": ("<=", operator.le),
    "exclusiveMaximum": ("<", operator.lt),
}
# What a bounded field's message says after its bounds.
_BOUND_HINTS = {
    "learning_rate": " (typical LoRA: 1e-4 to 5e-4)",
    "max_steps": ", or unset to train num_epochs",
}

# Effective defaults of the seed's Optional parameters ("default: 2e-4" in its table, training_hub's defaults
# elsewhere). Filled in by validation; the seed's signature keeps None.
EFFECTIVE_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "lr_warmup_steps": 10,
    "checkpoint_at_epoch": False,
    "num_epochs": 3,
    "lora_use_rslora": False,
    "lora_use_dora": False,
    "lora_load_in_4bit": False,
    "lora_load_in_8bit": False,
    "lora_sample_packing": True,
    "seed": 42,
    "use_liger": False,
    "lr_scheduler": "linear",
}
# Filled in only when 4-bit loading is on; set without it they are an error (they would be ignored).
EFFECTIVE_4BIT_DEFAULTS: dict[str, Any] = {
    "lora_bnb_4bit_quant_type": "nf4",
    "lora_bnb_4bit_compute_dtype": "bfloat16",
    "lora_bnb_4bit_use_double_quant": True,
}

# Anchored with \Z, not $: "$" also matches before a trailing newline ("4\n" is no quantity).
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)\Z")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?)\Z")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
# Words in an environment variable name that mark a secret (TOKENIZERS_PARALLELISM is fine: whole words only).
SECRET_NAME_PARTS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "KEY", "APIKEY"}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
# Variables that change which code the trainer runs: not settable through envs.
RESERVED_ENV_NAMES = {"LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                      "PYTHONINSPECT", "PYTHONUSERBASE", "BASH_ENV", "ENV"}
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)([numkMGTPE]|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?[0-9]+)?\Z")


# Where MLflow can track to from a training pod: a tracking server (http/https), Databricks, or a directory
# (file://, such as a PVC). Database URIs (sqlite://, postgresql://) need the full mlflow server package, which the
# trainer's mlflow-skinny lacks, and would put a database password in the manifest.
MLFLOW_SCHEMES = ("http", "https", "databricks", "file")
MLFLOW_DEFAULT_EXPERIMENT = "airflow-provider-lora"
MLFLOW_CREDENTIALS_HINT = ("give credentials from a Kubernetes Secret instead: secret_env={'MLFLOW_TRACKING_TOKEN': "
                           "'secret-name/key'} (or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)")


def _untidy(text: str) -> bool:
    """Whitespace at either end, or a control character: never meant in a name, path or URI."""
    return text != text.strip() or any(ch < " " or ch == "\x7f" for ch in text)


def redact_uri(uri: str) -> str:
    """``uri`` with any user:password@ replaced by ***@, for messages and logs."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1***@", uri)


def check_tracking_uri(uri: str) -> str | None:
    """Why ``uri`` cannot be an MLflow tracking URI for the trainer, or None when it can."""
    if _untidy(uri):
        return "must not contain whitespace at either end or control characters"
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018  raises on a port that is not a number
    except ValueError as exc:
        return f"is not a URI ({exc})"
    if parts.username is not None or parts.password is not None:
        return ("carries credentials (user:password@), which would be written into the pod manifest in clear "
                f"text; {MLFLOW_CREDENTIALS_HINT}")
    scheme = "databricks" if uri == "databricks" else parts.scheme.lower()  # MLflow's own spelling, no "://"
    if scheme not in MLFLOW_SCHEMES:
        return (f"{scheme + ':// is not a scheme' if scheme else 'a URI without a scheme is not one'} the trainer can "
                "track to; accepted: an MLflow tracking server as http://host:port or https://host, "
                "databricks[://profile], or file:///absolute/dir (such as a PVC path)")
    if scheme in ("http", "https") and not parts.hostname:
        return f"{scheme}:// needs a host, such as {scheme}://mlflow.example:5000"
    if scheme == "file" and (parts.netloc or not parts.path.startswith("/")):
        return "a file URI is file:///absolute/dir (three slashes, an absolute path on the training pod)"
    return None


# Fields that name a place (hub id, path, s3:// URI): no '..' segment, no control characters.
LOCATION_FIELDS = ("base_model", "dataset", "output_uri", "data_output_dir", "resume_from_checkpoint")


class SpecError(ValueError):
    """A parameter has a value that cannot be accepted. The message names the parameter, the value and what is
    accepted; ``errors`` holds one such message per bad parameter."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid LoRA training parameters:\n  " + "\n  ".join(errors))


def _bad(name: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not valid: {accepted}")


# ---- KEY=VAL,KEY=VAL strings (envs, labels, annotations) --------------------------------------------------------
# A backslash escapes the next character, so a value may hold "\," "\=" or "\\".

def parse_key_values(text: str, name: str = "value") -> dict[str, str]:
    """Parse ``KEY=VAL,KEY=VAL`` into a dict. ``\\,``, ``\\=`` and ``\\\\`` put a literal comma, equals sign or
    backslash in a key or value. Whitespace around keys is ignored; values are kept as written."""
    pairs: dict[str, str] = {}
    if text is None or text.strip() == "":
        return pairs
    items: list[list[str]] = [[""]]  # each item: [key-or-whole, value?]
    escaped = False
    for ch in text:
        if escaped:
            items[-1][-1] += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            items.append([""])
        elif ch == "=" and len(items[-1]) == 1:
            items[-1].append("")
        else:
            items[-1][-1] += ch
    if escaped:
        raise _bad(name, text, "ends with a lone backslash; write \\\\ for a literal backslash")
    for item in items:
        if len(item) == 1 and item[0].strip() == "":
            raise _bad(name, text, "has an empty item; expected KEY=VAL,KEY=VAL (escape a literal comma as \\,)")
        if len(item) == 1:
            raise _bad(name, text, f"item {item[0]!r} has no '='; expected KEY=VAL,KEY=VAL")
        key, value = item[0].strip(), item[1]
        if not key:
            raise _bad(name, text, "has an item with an empty key; expected KEY=VAL,KEY=VAL")
        if key in pairs:
            raise _bad(name, text, f"sets {key!r} twice")
        pairs[key] = value
    return pairs


def format_key_values(pairs: dict[str, str]) -> str:
    """The inverse of :func:`parse_key_values`."""

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")

    return ",".join(f"{esc(k)}={esc(v)}" for k, v in pairs.items())


def check_label_key(key: str) -> bool:
    """Kubernetes label/annotation key: optional DNS subdomain prefix + '/' + name of <= 63 characters."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return bool(_LABEL_NAME.match(name))


def check_quantity(value: str) -> bool:
    """Kubernetes resource quantity such as "4", "500m", "32Gi", "1.5"."""
    return bool(_QUANTITY.match(value))


def _field(default: Any, description: str, section: str, *, seed: bool = False, cluster_only: bool = False,
           bounds: dict[str, float] | None = None, **kwargs: Any) -> Any:
    """A spec field. ``cluster_only``: it acts on the Pod or TrainJob (resources, pod metadata); a local run in the
    worker has nothing to apply it to. ``bounds``: JSON Schema keywords of :data:`BOUND_KEYWORDS` that a value
    (when set) must pass, e.g. ``{"minimum": 1}``."""
    unknown = set(bounds or {}) - set(BOUND_KEYWORDS)
    if unknown:
        raise TypeError(f"unknown bound keyword(s): {', '.join(sorted(unknown))}")
    extra = {"section": section, "seed": seed, **({"cluster_only": True} if cluster_only else {}), **(bounds or {})}
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def bounds(name: str) -> dict[str, float]:
    """The numeric bounds of a LoRASpec field, as JSON Schema keywords (empty for an unbounded field)."""
    extra = LoRASpec.model_fields[name].json_schema_extra or {}
    return {keyword: extra[keyword] for keyword in BOUND_KEYWORDS if keyword in extra}


class LoRASpec(BaseModel):
    """Every parameter of one LoRA fine-tune. Build it with :func:`LoRASpec.parse` (or the constructor) and it is
    valid, with every effective default filled in."""

    # Numbers given for string fields (resource_cpu_per_worker=4, a natively rendered template) become strings.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    # ---- the seed component's training_* inputs (names without the prefix, same defaults, same order) ----------
    base_model: str = _field("Qwen/Qwen2.5-1.5B-Instruct", "Base model (HuggingFace ID or local path).", MODEL,
                             seed=True)
    effective_batch_size: int = _field(128, "Effective batch size per optimizer step.", TRAINING, seed=True,
                                       bounds={"minimum": 1})
    max_tokens_per_gpu: int = _field(32000, "Max tokens per GPU (memory cap): bounds the micro-batch.", TRAINING,
                                     seed=True, bounds={"minimum": 1})
    max_seq_len: int = _field(8192, "Max sequence length in tokens; longer examples are truncated.", TRAINING,
                              seed=True, bounds={"minimum": 1})
    learning_rate: Optional[float] = _field(None, "Learning rate (default: 2e-4).", TRAINING, seed=True,
                                            bounds={"exclusiveMinimum": 0, "exclusiveMaximum": 1})
    lr_warmup_steps: Optional[int] = _field(None, "Learning rate warmup steps (default: 10).", TRAINING, seed=True,
                                            bounds={"minimum": 0})
    checkpoint_at_epoch: Optional[bool] = _field(None, "Save checkpoint at each epoch (default: false).", TRAINING,
                                                 seed=True)
    num_epochs: Optional[int] = _field(None, "Number of training epochs (default: 3).", TRAINING, seed=True,
                                       bounds={"minimum": 1})
    data_output_dir: Optional[str] = _field(
        None, "Directory for processed training data; reused only when its fingerprint matches.", DATA, seed=True)
    envs: str = _field("", "Environment overrides as KEY=VAL,KEY=VAL (\\, and \\= escape).", KUBERNETES, seed=True)
    resource_cpu_per_worker: str = _field("4", "CPU cores per worker.", RESOURCES, seed=True, cluster_only=True)
    resource_gpu_per_worker: int = _field(1, "GPUs per worker.", RESOURCES, seed=True, cluster_only=True,
                                          bounds={"minimum": 0})
    resource_memory_per_worker: str = _field("32Gi", "Memory per worker (e.g., 32Gi).", RESOURCES, seed=True,
                                             cluster_only=True)
    resource_num_procs_per_worker: str = _field("auto", "Processes per worker (auto or int).", RESOURCES, seed=True)
    resource_num_workers: int = _field(1, "Number of training pods.", RESOURCES, seed=True, cluster_only=True,
                                       bounds={"minimum": 1})
    metadata_labels: str = _field("", "Pod labels as key=value,key=value.", KUBERNETES, seed=True,
                                  cluster_only=True)
    metadata_annotations: str = _field("", "Pod annotations as key=value,key=value.", KUBERNETES, seed=True,
                                       cluster_only=True)
    lora_r: int = _field(16, "LoRA rank (controls model capacity).", LORA, seed=True, bounds={"minimum": 1})
    lora_alpha: int = _field(32, "LoRA scaling factor.", LORA, seed=True, bounds={"exclusiveMinimum": 0})
    lora_dropout: float = _field(0.0, "Dropout rate for LoRA layers.", LORA, seed=True,
                                 bounds={"minimum": 0, "exclusiveMaximum": 1})
    lora_target_modules: str = _field(
        "", "Comma-separated list of modules to apply LoRA (empty = every linear projection except the LM head).",
        LORA, seed=True)
    lora_use_rslora: Optional[bool] = _field(None, "Use Rank-Stabilized LoRA variant (default: false).", LORA,
                                             seed=True)
    lora_use_dora: Optional[bool] = _field(None, "Use Weight-Decomposed LoRA (DoRA) (default: false).", LORA,
                                           seed=True)
    lora_load_in_4bit: Optional[bool] = _field(None, "Enable 4-bit quantization (QLoRA) (default: false).", QUANT,
                                               seed=True)
    lora_load_in_8bit: Optional[bool] = _field(None, "Enable 8-bit quantization (default: false).", QUANT, seed=True)
    lora_bnb_4bit_quant_type: Optional[str] = _field(
        None, "4-bit quantization type: nf4 or fp4 (default with 4-bit: nf4).", QUANT, seed=True)
    lora_bnb_4bit_compute_dtype: Optional[str] = _field(
        None, "4-bit compute dtype: bfloat16, float16 or float32 (default with 4-bit: bfloat16).", QUANT, seed=True)
    lora_bnb_4bit_use_double_quant: Optional[bool] = _field(
        None, "Enable double quantization (default with 4-bit: true).", QUANT, seed=True)
    lora_sample_packing: Optional[bool] = _field(
        None, "Pack multiple samples per sequence (default: true; needs FlashAttention, so off on CPU, said loudly).",
        TRAINING, seed=True)
    seed: Optional[int] = _field(None, "Random seed for reproducibility (default: 42).", TRAINING, seed=True,
                                 bounds={"minimum": 0})
    use_liger: Optional[bool] = _field(None, "Enable Liger kernel optimizations (CUDA only) (default: false).",
                                       TRAINING, seed=True)
    lr_scheduler: Optional[str] = _field(
        None, "LR scheduler type: " + ", ".join(LR_SCHEDULERS) + " (default: linear).", TRAINING, seed=True)
    fsdp_sharding_strategy: Optional[str] = _field(
        None, "FSDP sharding strategy. NO_SHARD (plain data parallel, what LoRA with unsloth runs) is accepted; "
        "FULL_SHARD and HYBRID_SHARD are rejected: unsloth's LoRA path does not run under FSDP.", RESOURCES, seed=True)

    # ---- what the trainer needs beyond the seed ---------------------------------------------------------------
    dataset: str = _field("", "Training data: a local file or directory (PVC path), s3://bucket/key, a Hugging Face "
                          "dataset id or hf://id. JSONL, JSON, parquet or CSV files, gzip-compressed .jsonl.gz, "
                          ".json.gz or .csv.gz, or a directory written by datasets' save_to_disk (its train split).",
                          DATA)
    dataset_format: Literal[DATASET_FORMATS] = _field(  # type: ignore[valid-type]
        "auto", "Row format: auto, messages, conversations, alpaca, prompt_completion or text.", DATA)
    eval_fraction: float = _field(0.0, "Share of rows held out for evaluation loss (0 = none, < 0.5).", DATA,
                                  bounds={"minimum": 0, "exclusiveMaximum": 0.5})
    eval_steps: Optional[int] = _field(None, "Evaluate on the held-out rows every this many optimizer steps "
                                       "(default: at the end of each epoch); needs eval_fraction > 0.", DATA,
                                       bounds={"minimum": 1})
    sample_prompts: int = _field(3, "After training, this many held-out prompts (the first rows of the eval_fraction "
                                 "split) are answered by the base model and by the adapter, greedy, side by side in "
                                 "summary.json, the chart page and the model card (0 = none; no eval split: none).",
                                 DATA, bounds={"minimum": 0, "maximum": 20})
    sample_max_new_tokens: int = _field(64, "The longest answer sample_prompts generates, in tokens.", DATA,
                                        bounds={"minimum": 1, "maximum": 1024})
    train_on_inputs: bool = _field(False, "Compute loss on prompt tokens too (default: assistant/completion tokens "
                                   "only).", DATA)
    output_uri: str = _field("", "Where the run's artifacts go: a local/PVC path or s3://bucket/prefix.", OUTPUT)
    overwrite_output: bool = _field(False, "Replace a completed run already at output_uri (otherwise an error).",
                                    OUTPUT)
    save_merged: bool = _field(False, "Also save the base model merged with the adapter in 16-bit.", OUTPUT)
    resume_from_checkpoint: Optional[str] = _field(
        None, "Resume training: 'latest' (the newest checkpoint of this run) or a checkpoint directory.", TRAINING)
    max_steps: Optional[int] = _field(None, "Stop after this many optimizer steps (overrides num_epochs).", TRAINING,
                                      bounds={"minimum": 1})
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _field(
        "auto", "Training dtype: auto picks bfloat16 where the hardware has it, else float16 on GPU / float32 on "
        "CPU.", TRAINING)
    mlflow_tracking_uri: Optional[str] = _field(
        None, "MLflow tracking server to log the run to (parameters, per-step metrics, eval loss, the adapter and "
        "the chart), such as http://mlflow.mlflow:5000; needs the mlflow extra in the training image. Default: the "
        "trainer's MLFLOW_TRACKING_URI environment variable, else no tracking. No credentials in the URI: give "
        "MLFLOW_TRACKING_TOKEN (or _USERNAME/_PASSWORD) through secret_env.", OUTPUT)
    mlflow_experiment: Optional[str] = _field(
        None, "MLflow experiment the run is logged under, created when missing (default: the trainer's "
        f"MLFLOW_EXPERIMENT_NAME environment variable, else {MLFLOW_DEFAULT_EXPERIMENT}).", OUTPUT)

    # ---- validation ---------------------------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _fill_effective_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        flag = data.get("lora_load_in_4bit")
        if isinstance(flag, str):  # as pydantic reads it: "false", "0", "no", "off" are False
            flag = flag.strip().lower() in ("1", "true", "t", "yes", "y", "on")
        if flag:
            for name, value in EFFECTIVE_4BIT_DEFAULTS.items():
                if data.get(name) is None:
                    data[name] = value
        for name, value in EFFECTIVE_DEFAULTS.items():
            if data.get(name) is None:
                data[name] = value
        return data

    @field_validator("*")
    @classmethod
    def _within_bounds(cls, v: Any, info: Any) -> Any:
        limits = bounds(info.field_name)
        if v is None or not limits:
            return v
        if not all(test(v, limits[k]) for k, (_, test) in BOUND_KEYWORDS.items() if k in limits):
            kind = "an integer" if isinstance(v, int) else "a number"
            text = " and ".join(f"{sign} {limits[k]}" for k, (sign, _) in BOUND_KEYWORDS.items() if k in limits)
            raise _bad(info.field_name, v, f"must be {kind} {text}{_BOUND_HINTS.get(info.field_name, '')}")
        return v

    @field_validator("lora_target_modules")
    @classmethod
    def _targets(cls, v: str) -> str:
        names = [n.strip() for n in v.split(",")] if v.strip() else []
        for n in names:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", n):
                raise _bad("lora_target_modules", v, "must be comma-separated module names such as "
                           "'q_proj,v_proj' (letters, digits, '_' and '.'), or empty for every linear projection")
        return ",".join(names)

    @field_validator(*CHOICES)
    @classmethod
    def _one_of(cls, v: Optional[str], info: Any) -> Optional[str]:
        accepted = CHOICES[info.field_name]
        if v is not None and v not in accepted:
            raise _bad(info.field_name, v, f"accepted: {', '.join(accepted)}")
        return v

    @field_validator(*REFUSED_CHOICES)
    @classmethod
    def _refused(cls, v: Optional[str], info: Any) -> Optional[str]:
        reason = REFUSED_CHOICES[info.field_name].get(v) if v is not None else None
        if reason:
            raise _bad(info.field_name, v, reason)
        return v

    @field_validator("resource_cpu_per_worker", "resource_memory_per_worker")
    @classmethod
    def _quantity(cls, v: str, info: Any) -> str:
        if not check_quantity(v) or float(_QUANTITY.match(v).group(1)) == 0:
            raise _bad(info.field_name, v, "must be a positive Kubernetes quantity such as '4', '500m', '32Gi'")
        return v

    @field_validator("resource_num_procs_per_worker")
    @classmethod
    def _procs(cls, v: str) -> str:
        if v != "auto" and not (v.isascii() and v.isdigit() and int(v) >= 1):
            raise _bad("resource_num_procs_per_worker", v, "must be 'auto' (one per GPU) or an integer >= 1")
        return v

    @field_validator("envs")
    @classmethod
    def _envs(cls, v: str) -> str:
        # Messages name the variable, never echo the value: envs may hold something private.
        try:
            names = parse_key_values(v, "envs")
        except ValueError as exc:
            raise ValueError(str(exc).replace(repr(v), "(value not shown)")) from None
        for key in names:
            if not _ENV_NAME.match(key):
                raise ValueError(f"envs: {key!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
            if key in RESERVED_ENV_NAMES:
                raise ValueError(f"envs: {key!r} is not accepted: it changes which code the trainer runs (build "
                                 "such settings into the training image instead)")
            if SECRET_NAME_PARTS & set(key.upper().split("_")):
                raise ValueError(f"envs: {key!r} looks like a secret; envs values are written into the pod "
                                 "manifest in clear text. Give it from a Kubernetes Secret instead (operator: "
                                 "hf_token_secret= or secret_env={...: 'secret-name/key'})")
        uri = names.get("MLFLOW_TRACKING_URI")
        if uri and (reason := check_tracking_uri(uri)):
            raise ValueError(f"envs: MLFLOW_TRACKING_URI={redact_uri(uri)!r} is not valid: {reason}")
        return v

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _tracking_uri(cls, v: Optional[str]) -> Optional[str]:
        if v is None or v == "":  # the trigger form sends "" for an empty field
            return None
        reason = check_tracking_uri(v)
        if reason:
            raise _bad("mlflow_tracking_uri", redact_uri(v), reason)
        return v

    @field_validator("mlflow_experiment")
    @classmethod
    def _experiment(cls, v: Optional[str]) -> Optional[str]:
        if v is None or v == "":
            return None
        if _untidy(v):
            raise _bad("mlflow_experiment", v, "an experiment name without control characters or whitespace at "
                                               "either end, such as 'support-bot-lora'")
        return v

    @field_validator("metadata_labels")
    @classmethod
    def _labels(cls, v: str) -> str:
        for key, value in parse_key_values(v, "metadata_labels").items():
            if not check_label_key(key):
                raise _bad("metadata_labels", v, f"{key!r} is not a Kubernetes label key ([prefix/]name, name <= 63 "
                           "characters of alphanumerics, '-', '_', '.')")
            if not _LABEL_VALUE.match(value):
                raise _bad("metadata_labels", v, f"{value!r} (for {key!r}) is not a Kubernetes label value (<= 63 "
                           "characters of alphanumerics, '-', '_', '.', starting and ending alphanumeric)")
        return v

    @field_validator("metadata_annotations")
    @classmethod
    def _annotations(cls, v: str) -> str:
        for key in parse_key_values(v, "metadata_annotations"):
            if not check_label_key(key):
                raise _bad("metadata_annotations", v, f"{key!r} is not a Kubernetes annotation key")
        return v

    @field_validator(*LOCATION_FIELDS)
    @classmethod
    def _location(cls, v: Optional[str], info: Any) -> Optional[str]:
        # These strings become paths, S3 keys and hub ids inside the training container.
        if v is None or v.strip() == "":
            if info.field_name == "base_model":
                raise _bad("base_model", v, "give a Hugging Face model id (org/name) or a local/PVC model directory")
            return v
        if _untidy(v):
            raise _bad(info.field_name, v, "must not contain control characters or leading/trailing whitespace")
        if info.field_name == "base_model" and v.startswith("oci://"):
            raise _bad("base_model", v, "oci:// models (modelcars) are not supported; give a Hugging Face model id "
                                        "(org/name) or a local/PVC model directory")
        if v.startswith("s3://") and not v[len("s3://"):].split("/")[0]:
            raise _bad(info.field_name, v, "an S3 location is s3://bucket/key-or-prefix; the bucket is missing")
        if ".." in re.split(r"[/\\]", v):
            raise _bad(info.field_name, v, "a '..' segment could reach outside the intended directory or bucket "
                       "prefix; give the path without '..'")
        return v

    @field_validator("resume_from_checkpoint")
    @classmethod
    def _resume(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v.strip() == "":
            return None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "LoRASpec":
        if self.lora_load_in_4bit and self.lora_load_in_8bit:
            raise ValueError("lora_load_in_4bit=True and lora_load_in_8bit=True together are not valid: choose one")
        if not self.lora_load_in_4bit:
            for name in EFFECTIVE_4BIT_DEFAULTS:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}={getattr(self, name)!r} is only used with 4-bit loading; set "
                                     f"lora_load_in_4bit=True or leave {name} unset")
        if self.max_seq_len > self.max_tokens_per_gpu:
            raise ValueError(f"max_seq_len={self.max_seq_len} is larger than max_tokens_per_gpu="
                             f"{self.max_tokens_per_gpu}: one sequence must fit the per-GPU token cap; lower "
                             "max_seq_len or raise max_tokens_per_gpu")
        if self.effective_batch_size % self.world_size:
            raise ValueError(f"effective_batch_size={self.effective_batch_size} is not divisible by the number of "
                             f"training processes ({self.resource_num_workers} workers x {self.procs_per_worker} "
                             "processes): choose a multiple of it so every optimizer step sees exactly that batch")
        if self.eval_steps is not None and not self.eval_fraction:
            raise ValueError(f"eval_steps={self.eval_steps} needs held-out rows to evaluate: set eval_fraction "
                             "(such as 0.1) or leave eval_steps unset")
        if self.save_merged and (self.lora_load_in_4bit or self.lora_load_in_8bit):
            raise ValueError("save_merged=True with a quantised base model is not valid: merging into 4/8-bit "
                             "weights loses the adapter's precision; train unquantised to export a merged model")
        return self

    # ---- constructors and conversions ---------------------------------------------------------------------------

    @classmethod
    def parse(cls, values: dict[str, Any]) -> "LoRASpec":
        """Validate ``values``; on failure raise :class:`SpecError` with one readable message per bad parameter."""
        if not isinstance(values, dict):
            raise SpecError([f"expected a mapping of parameter names to values, got {type(values).__name__} "
                             f"{values!r:.80}"])
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SpecError([_describe(e) for e in exc.errors()]) from None

    @classmethod
    def from_json(cls, text: str) -> "LoRASpec":
        return cls.parse(json.loads(text))

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @property
    def procs_per_worker(self) -> int:
        """Training processes per worker: one per GPU for "auto" (one on a CPU-only worker)."""
        if self.resource_num_procs_per_worker == "auto":
            return max(1, self.resource_gpu_per_worker)
        return int(self.resource_num_procs_per_worker)

    @property
    def world_size(self) -> int:
        return self.resource_num_workers * self.procs_per_worker

    # Parsed views of the string-encoded seed parameters.
    @property
    def env_vars(self) -> dict[str, str]:
        return parse_key_values(self.envs, "envs")

    @property
    def labels(self) -> dict[str, str]:
        return parse_key_values(self.metadata_labels, "metadata_labels")

    @property
    def annotations(self) -> dict[str, str]:
        return parse_key_values(self.metadata_annotations, "metadata_annotations")

    @property
    def target_modules(self) -> list[str]:
        return self.lora_target_modules.split(",") if self.lora_target_modules else []


def _describe(error: dict[str, Any]) -> str:
    """One line per pydantic error that names the parameter, the value and what is accepted."""
    loc = ".".join(str(p) for p in error.get("loc", ()))
    msg = error.get("msg", "")
    msg = msg.removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        close = difflib.get_close_matches(loc, LoRASpec.model_fields, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see LoRASpec.model_fields for the accepted names"
        return f"{loc}={error.get('input')!r}: unknown parameter; {hint}"
    if loc and not msg.startswith(loc):
        return f"{loc}={error.get('input')!r} is not valid: {msg}"
    return msg


def seed_parameter_names() -> list[str]:
    """The spec names of the seed component's training_* inputs, in the seed's order."""
    return [n for n, f in LoRASpec.model_fields.items() if (f.json_schema_extra or {}).get("seed")]


class BatchPlan(BaseModel):
    """How the effective batch is split: micro_batch x grad_accum x world_size == effective_batch_size."""

    micro_batch: int
    grad_accum: int
    world_size: int
    effective_batch_size: int
    max_tokens_per_micro_batch: int

    def describe(self) -> str:
        return (f"effective batch {self.effective_batch_size} = micro-batch {self.micro_batch} x gradient "
                f"accumulation {self.grad_accum} x {self.world_size} process(es); at most "
                f"{self.max_tokens_per_micro_batch} tokens per micro-batch")

    def warning(self, spec: LoRASpec) -> str | None:
        """Said when the micro-batch is at most half of what max_tokens_per_gpu allows only because it must divide
        the per-process batch (a prime effective batch runs one row at a time), with the nearest batch sizes that
        would not be."""
        per_process = self.effective_batch_size // self.world_size
        fits = min(max(1, spec.max_tokens_per_gpu // spec.max_seq_len), per_process)
        if self.micro_batch * 2 > fits:  # within half of what fits: not worth a warning
            return None
        step = fits * self.world_size
        lower, upper = self.effective_batch_size // step * step, -(-self.effective_batch_size // step) * step
        choices = " or ".join(str(n) for n in dict.fromkeys((lower, upper)) if n > 0)
        return (f"effective_batch_size={self.effective_batch_size} gives {per_process} rows per process, which "
                f"only micro-batches of {self.micro_batch} divide, so it runs as micro-batch {self.micro_batch} x "
                f"gradient accumulation {self.grad_accum} though max_tokens_per_gpu allows micro-batches of {fits} "
                f"(slower); choose a multiple of {step}, such as {choices}")


def plan_batches(spec: LoRASpec, world_size: int) -> BatchPlan:
    """The largest micro-batch that divides the per-process batch and keeps micro_batch x max_seq_len within
    max_tokens_per_gpu (every sequence is padded or packed to at most max_seq_len tokens)."""
    if spec.effective_batch_size % world_size:
        raise SpecError([f"effective_batch_size={spec.effective_batch_size} is not divisible by the world size "
                         f"{world_size}: choose a multiple of {world_size}"])
    per_process = spec.effective_batch_size // world_size
    cap = max(1, spec.max_tokens_per_gpu // spec.max_seq_len)
    micro = max(d for d in range(1, min(cap, per_process) + 1) if per_process % d == 0)
    return BatchPlan(micro_batch=micro, grad_accum=per_process // micro, world_size=world_size,
                     effective_batch_size=spec.effective_batch_size,
                     max_tokens_per_micro_batch=micro * spec.max_seq_len)


def optimizer_steps(spec: LoRASpec, plan: BatchPlan, train_rows: int) -> int:
    """The optimizer steps a run of ``train_rows`` rows takes, or max_steps when set. transformers' count
    (Trainer.set_initial_training_values, 5.x): micro-batches per epoch over the accumulation, the last partial
    accumulation counting as a step, at least one per epoch."""
    if spec.max_steps:
        return spec.max_steps
    micro_batches = -(-train_rows // (plan.micro_batch * plan.world_size))
    return max(1, -(-micro_batches // plan.grad_accum)) * int(spec.num_epochs)


def warmup_warning(spec: LoRASpec, steps: int) -> str | None:
    """Said when lr_warmup_steps covers the whole run: the learning rate then never reaches learning_rate."""
    warmup = spec.lr_warmup_steps or 0
    if warmup < steps or steps <= 0:
        return None
    peak = spec.learning_rate * steps / warmup
    return (f"lr_warmup_steps={warmup} is at least the run's {steps} optimizer step(s): the learning rate only "
            f"climbs to {peak:.2e} of learning_rate={spec.learning_rate:g} and the run barely trains; set "
            f"lr_warmup_steps to a fraction of the run, such as {max(0, steps // 10)}, or add rows or epochs")
