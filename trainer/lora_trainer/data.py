"""Data: find the rows, recognise their format, turn each into token ids and a loss mask.

Every row becomes ``input_ids`` plus ``assistant_masks`` (1 where the loss applies). trl's SFTTrainer takes such
pre-tokenised rows as they are and masks the labels with them, so loss-on-answers-only works with any chat template,
including the many that lack trl's ``{% generation %}`` markers (SmolLM2's among them).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.contract import DATA_FILE_BUILDERS
from airflow_provider_lora.core.spec import LoRASpec

# Used only when the tokenizer has no chat template of its own (ChatML, the most common open format).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "bot": "assistant", "system": "system", "tool": "tool"}
MAX_REPORTED_ROW_ERRORS = 5


class DataError(ValueError):
    """The dataset cannot be used as given; the message says which rows and why."""


@dataclass
class Example:
    """One training example in a format-independent shape: a conversation, or a text with a trainable suffix."""

    messages: list[dict[str, str]] | None = None
    prompt: str = ""  # text examples: the untrained part
    completion: str = ""  # text examples: the trained part


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, assistant_masks
    eval: Any | None
    stats: dict[str, Any]


# ---- finding the rows --------------------------------------------------------------------------------------------

def load_rows(uri: str, download_dir: Path | None = None) -> list[dict[str, Any]]:
    """Rows from a local file or directory, ``s3://bucket/key-or-prefix``, or a Hugging Face dataset id."""
    import datasets

    if storage.is_s3(uri):
        # Read through boto3 rather than datasets' s3 support: it honours AWS_ENDPOINT_URL and works with
        # HF_DATASETS_OFFLINE set (``load_dataset`` refuses s3:// then, and mutates the storage_options it gets).
        name = PurePosixPath(uri.rstrip("/")).name  # keeps the file's suffix, which names its type
        target = Path(download_dir or tempfile.mkdtemp(prefix="lora-data-")) / name
        local = storage.download(uri, target)
        return load_rows(str(local))
    path = Path(uri.removeprefix("file://"))
    if path.exists():
        files = _data_files(path)
        builder = DATA_FILE_BUILDERS[files[0].suffix]
        options = {}
        if builder == "csv":
            # CSV cells are text: otherwise pandas turns "42" into an int and an empty cell into NaN.
            import pandas as pd

            columns = pd.read_csv(files[0], nrows=0).columns
            options = {"features": datasets.Features({c: datasets.Value("string") for c in columns}),
                       "keep_default_na": False}
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
        return list(ds)
    if uri.startswith(("/", "./", "../", "file://")):
        raise DataError(f"dataset={uri!r}: no such file or directory")
    repo_id = uri.removeprefix("hf://")
    try:
        ds = datasets.load_dataset(repo_id, split="train", token=os.environ.get("HF_TOKEN") or None)
    except Exception as exc:  # the hub raises many types; the message matters
        raise DataError(f"dataset={uri!r}: could not load it as a Hugging Face dataset id ({exc}). A local path "
                        "must exist; an S3 object starts with s3://") from exc
    return list(ds)


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_FILE_BUILDERS)
        if not files:
            raise DataError(f"dataset={str(path)!r}: the directory holds no {', '.join(DATA_FILE_BUILDERS)} files")
    kinds = {DATA_FILE_BUILDERS.get(f.suffix) for f in files}
    if None in kinds:
        raise DataError(f"dataset={str(path)!r}: unsupported file type; accepted: {', '.join(DATA_FILE_BUILDERS)}")
    if len(kinds) > 1:
        raise DataError(f"dataset={str(path)!r}: mixes file types {sorted(kinds)}; use one type per dataset")
    return files


# ---- recognising the format --------------------------------------------------------------------------------------

def detect_format(row: dict[str, Any]) -> str:
    columns = set(row)
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "conversations"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise DataError(f"cannot recognise the dataset format from columns {sorted(columns)}: expected 'messages', "
                    "'conversations', 'instruction'+'output' (alpaca), 'prompt'+'completion' or 'text'; or set "
                    "dataset_format")


def to_examples(rows: list[dict[str, Any]], dataset_format: str) -> tuple[str, list[Example]]:
    """Convert rows to Examples. Every malformed row is an error naming its index; none is skipped."""
    if not rows:
        raise DataError("the dataset has no rows")
    fmt = detect_format(rows[0]) if dataset_format == "auto" else dataset_format
    convert = _CONVERTERS[fmt]
    examples, errors = [], []
    for index, row in enumerate(rows):
        try:
            examples.append(convert(row))
        except (KeyError, TypeError, ValueError) as exc:
            message = f"row {index}: {exc}"
            errors.append(message if not isinstance(exc, KeyError) else f"row {index}: missing column {exc}")
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ROW_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ROW_ERRORS} more" if len(errors) > MAX_REPORTED_ROW_ERRORS else ""
        raise DataError(f"{len(errors)} of {len(rows)} rows are not valid {fmt!r} rows:\n  {shown}{more}")
    return fmt, examples


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _conversation(turns: Any, role_key: str, content_key: str) -> Example:
    if not isinstance(turns, list) or not turns:
        raise ValueError("expected a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        role = turn.get(role_key, turn.get("role"))
        content = turn.get(content_key, turn.get("content"))
        if role not in ROLE_ALIASES:
            raise ValueError(f"turn {i} has role {role!r}; accepted: {', '.join(sorted(ROLE_ALIASES))}")
        messages.append({"role": ROLE_ALIASES[role], "content": _text(content, f"turn {i} content")})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("has no assistant turn to learn from")
    return Example(messages=messages)


def _from_messages(row: dict[str, Any]) -> Example:
    return _conversation(row["messages"], "role", "content")


def _from_conversations(row: dict[str, Any]) -> Example:
    return _conversation(row["conversations"], "from", "value")


def _from_alpaca(row: dict[str, Any]) -> Example:
    instruction = _text(row["instruction"], "instruction")
    extra = row.get("input") or ""
    user = f"{instruction}\n\n{_text(extra, 'input')}" if extra else instruction
    output = _text(row["output"], "output")
    if not output:
        raise ValueError("output is empty")
    return Example(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def _from_prompt_completion(row: dict[str, Any]) -> Example:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):  # trl's conversational prompt/completion
        return _conversation(prompt + completion, "role", "content")
    completion = _text(completion, "completion")
    if not completion:
        raise ValueError("completion is empty")
    return Example(prompt=_text(prompt, "prompt"), completion=completion)


def _from_text(row: dict[str, Any]) -> Example:
    text = _text(row["text"], "text")
    if not text.strip():
        raise ValueError("text is empty")
    return Example(completion=text)


_CONVERTERS = {"messages": _from_messages, "conversations": _from_conversations, "alpaca": _from_alpaca,
               "prompt_completion": _from_prompt_completion, "text": _from_text}


# ---- tokenising -------------------------------------------------------------------------------------------------

def ensure_chat_template(tokenizer: Any) -> bool:
    """Give the tokenizer the default template when it has none. Returns True when the default was applied."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def tokenize(example: Example, tokenizer: Any, max_seq_len: int, train_on_inputs: bool) -> dict[str, list[int]]:
    """Token ids and the loss mask for one example (before truncation)."""
    if example.messages is not None:
        text = tokenizer.apply_chat_template(example.messages, tokenize=False)
        spans = []
        for i, message in enumerate(example.messages):
            if message["role"] != "assistant":
                continue
            start = tokenizer.apply_chat_template(example.messages[:i], tokenize=False, add_generation_prompt=True)
            end = tokenizer.apply_chat_template(example.messages[: i + 1], tokenize=False)
            if not (text.startswith(start) and text.startswith(end)):
                raise DataError("the tokenizer's chat template renders a conversation differently from its prefix, "
                                "so the assistant turns cannot be located; set train_on_inputs=True to train on "
                                "every token")
            spans.append((len(start), len(end)))
        add_special = False  # the template writes its own special tokens
    else:
        eos = tokenizer.eos_token or ""
        text = example.prompt + example.completion + eos
        spans = [(len(example.prompt), len(text))]
        add_special = True
    encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if train_on_inputs:
        mask = [1] * len(ids)
    else:
        # A token is trained when its characters overlap an assistant span. Special tokens the tokenizer adds
        # itself have an empty (0, 0) range and are never trained.
        mask = [int(b > a and any(a < e and b > s for s, e in spans)) for a, b in offsets]
    return {"input_ids": ids, "assistant_masks": mask}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def prepare(spec: LoRASpec, tokenizer: Any, *, is_main_process: bool, wait_for_main: Any,
            download_dir: Path | None = None, log: Any = print) -> PreparedData:
    """Load, convert, tokenise, truncate and split the dataset, reusing ``data_output_dir`` only when its
    fingerprint (rows + tokenizer + the fields that shape the data) matches."""
    import datasets

    rows = load_rows(spec.dataset, download_dir)
    fmt, examples = to_examples(rows, spec.dataset_format)
    used_default_template = any(e.messages for e in examples) and ensure_chat_template(tokenizer)
    if used_default_template:
        log("the tokenizer has no chat template: using the default ChatML template")
    fingerprint = hashlib.sha256(json.dumps({
        "rows": [e.__dict__ for e in examples],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "fields": {k: getattr(spec, k) for k in ("max_seq_len", "train_on_inputs", "eval_fraction", "seed")},
    }, sort_keys=True).encode()).hexdigest()

    cache = Path(spec.data_output_dir) if spec.data_output_dir else None
    cache_hit = cache is not None and _cached_fingerprint(cache) == fingerprint
    if cache_hit:
        log(f"processed data: reusing {cache} (fingerprint {fingerprint[:12]} matches)")
        stats = json.loads((cache / "fingerprint.json").read_text())["stats"]
        splits = datasets.load_from_disk(str(cache / "data"))
        return PreparedData(splits["train"], splits.get("eval"), stats)

    def build() -> PreparedData:
        tokenized = [tokenize(e, tokenizer, spec.max_seq_len, spec.train_on_inputs) for e in examples]
        truncated = sum(len(t["input_ids"]) > spec.max_seq_len for t in tokenized)
        for t in tokenized:
            t["input_ids"] = t["input_ids"][: spec.max_seq_len]
            t["assistant_masks"] = t["assistant_masks"][: spec.max_seq_len]
        untrainable = sum(1 not in t["assistant_masks"] for t in tokenized)
        if untrainable == len(tokenized):
            raise DataError("after truncation to max_seq_len no row keeps a trainable token; raise max_seq_len")
        ds = datasets.Dataset.from_list(tokenized)
        eval_ds = None
        if spec.eval_fraction > 0:
            split = ds.train_test_split(test_size=max(1, round(len(ds) * spec.eval_fraction)), seed=spec.seed)
            ds, eval_ds = split["train"], split["test"]
        lengths = [len(t["input_ids"]) for t in tokenized]
        stats = {"format": fmt, "rows": len(rows), "train_rows": len(ds), "eval_rows": len(eval_ds or []),
                 "truncated_rows": truncated, "rows_without_trainable_tokens": untrainable,
                 "tokens": sum(lengths), "trainable_tokens": sum(sum(t["assistant_masks"]) for t in tokenized),
                 "max_row_tokens": max(lengths), "default_chat_template": bool(used_default_template),
                 "fingerprint": fingerprint}
        if truncated:
            log(f"WARNING: {truncated} of {len(rows)} rows are longer than max_seq_len={spec.max_seq_len} tokens "
                "and were truncated")
        if untrainable:
            log(f"WARNING: {untrainable} rows have no trainable token left after truncation")
        return PreparedData(ds, eval_ds, stats)

    if cache is None:
        return build()
    # Rank 0 builds and writes the cache; the other ranks wait, then read it.
    if is_main_process:
        prepared = build()
        _write_cache(cache, prepared, fingerprint)
        log(f"processed data: written to {cache} (fingerprint {fingerprint[:12]})")
        wait_for_main()
        return prepared
    wait_for_main()
    splits = datasets.load_from_disk(str(cache / "data"))
    stats = json.loads((cache / "fingerprint.json").read_text())["stats"]
    return PreparedData(splits["train"], splits.get("eval"), stats)


def _cached_fingerprint(cache: Path) -> str | None:
    try:
        return json.loads((cache / "fingerprint.json").read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def _write_cache(cache: Path, prepared: PreparedData, fingerprint: str) -> None:
    import shutil

    import datasets

    cache.mkdir(parents=True, exist_ok=True)
    # Remove the old fingerprint first: a crash mid-write then leaves a cache that is rebuilt, never reused.
    (cache / "fingerprint.json").unlink(missing_ok=True)
    shutil.rmtree(cache / "data", ignore_errors=True)
    splits = {"train": prepared.train} | ({"eval": prepared.eval} if prepared.eval is not None else {})
    datasets.DatasetDict(splits).save_to_disk(str(cache / "data"))
    (cache / "fingerprint.json").write_text(json.dumps({"fingerprint": fingerprint, "stats": prepared.stats}))


def packing_stats(lengths: list[int], max_seq_len: int, micro_batch: int) -> dict[str, float]:
    """Share of real (non-pad) tokens per micro-batch with and without packing, computed on lengths alone with
    trl's own packer (best-fit decreasing)."""
    import datasets
    from trl.data_utils import pack_dataset

    lengths = [min(n, max_seq_len) for n in lengths]
    real = sum(lengths)
    # Without packing each micro-batch pads to its longest row.
    padded = sum(max(lengths[i:i + micro_batch]) * len(lengths[i:i + micro_batch])
                 for i in range(0, len(lengths), micro_batch))
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    packed = pack_dataset(ds, seq_length=max_seq_len, strategy="bfd")
    packed_lengths = [len(x) for x in packed["input_ids"]]
    packed_padded = sum(max(packed_lengths[i:i + micro_batch]) * len(packed_lengths[i:i + micro_batch])
                        for i in range(0, len(packed_lengths), micro_batch))
    return {"rows": len(lengths), "sequences_packed": len(packed_lengths),
            "real_token_share_unpacked": real / padded, "real_token_share_packed": real / packed_padded}
