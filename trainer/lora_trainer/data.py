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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.contract import DATA_FILE_BUILDERS
from airflow_provider_lora.core.spec import LoRASpec

# Used only when the tokenizer has no chat template of its own (ChatML, the most common open format). A base
# model's eos is rarely <|im_end|>: the template then writes the eos after each assistant turn's <|im_end|>, so
# the eos is trained (it lies in the assistant's span) and generation stops after an answer.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>"
    "{% if message['role'] == 'assistant' and eos_token and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}"
    "\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "bot": "assistant", "system": "system", "tool": "tool"}
MAX_REPORTED_ROW_ERRORS = 5


class DataError(ValueError):
    """The dataset cannot be used as given; the message says which rows and why."""


@dataclass
class Example:
    """One training example in a format-independent shape: a conversation, or a text with a trainable suffix."""

    messages: list[dict[str, Any]] | None = None
    prompt: str = ""  # text examples: the untrained part
    completion: str = ""  # text examples: the trained part
    untrained_turns: list[int] = field(default_factory=list)  # assistant turns with weight 0 (never trained)


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, assistant_masks
    eval: Any | None
    stats: dict[str, Any]


# ---- finding the rows --------------------------------------------------------------------------------------------

def load_rows(uri: str, download_dir: Path | None = None, log: Any = None) -> list[dict[str, Any]]:
    """Rows from a local file or directory, ``s3://bucket/key-or-prefix``, or a Hugging Face dataset id. Each
    file read is logged with its row count."""
    import datasets

    log = log or (lambda message: None)
    if storage.is_s3(uri):
        # Read through boto3 rather than datasets' s3 support: it honours AWS_ENDPOINT_URL and works with
        # HF_DATASETS_OFFLINE set (``load_dataset`` refuses s3:// then, and mutates the storage_options it gets).
        name = PurePosixPath(uri.rstrip("/")).name  # keeps the file's suffix, which names its type
        target = Path(download_dir or tempfile.mkdtemp(prefix="lora-data-")) / name
        local = storage.download(uri, target)
        return load_rows(str(local), log=log)
    path = Path(uri.removeprefix("file://"))
    if path.exists():
        if path.is_dir() and _is_saved_dataset(path):
            return _load_saved_dataset(path, log)
        files = _data_files(path)
        rows: list[dict[str, Any]] = []
        for file in files:
            file_rows = _read_file(file)
            log(f"data: read {len(file_rows)} rows from {file}")
            rows.extend(file_rows)
        if not rows:
            raise DataError(f"dataset={uri!r}: the dataset has no rows (its files are empty)")
        return rows
    if uri.startswith(("/", "./", "../", "file://")):
        raise DataError(f"dataset={uri!r}: no such file or directory")
    repo_id = uri.removeprefix("hf://")
    try:
        ds = datasets.load_dataset(repo_id, split="train", token=os.environ.get("HF_TOKEN") or None)
    except Exception as exc:  # the hub raises many types; the message matters
        raise DataError(f"dataset={uri!r}: could not load it as a Hugging Face dataset id ({exc}). A local path "
                        "must exist; an S3 object starts with s3://") from exc
    log(f"data: read {len(ds)} rows from the Hugging Face dataset {repo_id}")
    return list(ds)


# Compressed text files datasets reads as they are (by their inner suffix: rows.jsonl.gz is JSON lines).
COMPRESSED_SUFFIXES = (".gz",)
COMPRESSIBLE = tuple(s for s, builder in DATA_FILE_BUILDERS.items() if builder in ("json", "csv"))


def _file_type(path: Path) -> str | None:
    """The DATA_FILE_BUILDERS suffix of a data file (``.jsonl`` for rows.jsonl.gz), or None."""
    suffix = path.suffix
    if suffix in COMPRESSED_SUFFIXES:
        inner = Path(path.stem).suffix
        return inner if inner in COMPRESSIBLE else None
    return suffix if suffix in DATA_FILE_BUILDERS else None


def _accepted() -> str:
    return ", ".join([*DATA_FILE_BUILDERS, *(s + c for s in COMPRESSIBLE for c in COMPRESSED_SUFFIXES)])


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if _file_type(path) is None:
            raise DataError(f"dataset={str(path)!r}: unsupported file type; accepted: {_accepted()}")
        return [path]
    # Hidden paths (.ipynb_checkpoints/, .git/, editor swap files) are never data.
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p, path) and _file_type(p))
    if not files:
        raise DataError(f"dataset={str(path)!r}: the directory holds no {_accepted()} files")
    kinds = {DATA_FILE_BUILDERS[_file_type(f)] for f in files}
    if len(kinds) > 1:
        raise DataError(f"dataset={str(path)!r}: mixes file types {sorted(kinds)}; use one type per dataset")
    return files


def _is_blank(path: Path) -> bool:
    """True when the file (decompressed) holds nothing but whitespace; reads only as far as the first character."""
    import gzip

    opener = gzip.open if path.suffix in COMPRESSED_SUFFIXES else open
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return False
    except (OSError, EOFError) as exc:
        raise DataError(f"dataset file {str(path)!r}: cannot be read ({exc})") from exc
    return True


def _read_file(path: Path) -> list[dict[str, Any]]:
    """The rows of one data file; an empty (or whitespace-only) file has none."""
    import datasets

    suffix = _file_type(path)
    builder = DATA_FILE_BUILDERS[suffix]
    if path.stat().st_size == 0 or (builder != "parquet" and _is_blank(path)):
        return []
    options = {}
    try:
        if builder == "csv":
            # CSV cells are text: otherwise pandas turns "42" into an int and an empty cell into NaN.
            import pandas as pd

            columns = pd.read_csv(path, nrows=0).columns
            options = {"features": datasets.Features({c: datasets.Value("string") for c in columns}),
                       "keep_default_na": False}
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", **options)
    except Exception as exc:  # pandas, pyarrow and datasets raise many types; the message matters
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"dataset file {str(path)!r}: cannot be read as {suffix} ({reason})") from exc
    return list(ds)


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by ``datasets``' save_to_disk (a Dataset, or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or \
        ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _load_saved_dataset(path: Path, log: Any) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"dataset={str(path)!r}: a datasets save_to_disk directory that cannot be loaded "
                        f"({exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"dataset={str(path)!r}: a saved DatasetDict without a 'train' split (it has "
                            f"{sorted(ds)})")
        ds = ds["train"]
    log(f"data: read {len(ds)} rows from the saved dataset {path} (datasets.load_from_disk)")
    rows = list(ds)
    if not rows:
        raise DataError(f"dataset={str(path)!r}: the dataset has no rows")
    return rows


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
        # One line (the command line's error is one line): the first rows' reasons, then how many more.
        shown = "; ".join(errors[:MAX_REPORTED_ROW_ERRORS])
        extra = len(errors) - MAX_REPORTED_ROW_ERRORS
        more = f"; ... and {extra} more" if extra > 0 else ""
        raise DataError(f"{len(errors)} of {len(rows)} rows are not valid {fmt!r} rows: {shown}{more}")
    return fmt, examples


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _conversation(turns: Any, role_key: str, content_key: str) -> Example:
    """A conversation. Tool calls (OpenAI's shape: an assistant turn's ``tool_calls``, ``tool`` turns with
    ``tool_call_id``/``name``) are passed to the chat template as given; an assistant turn's ``weight`` 0 keeps it
    out of the loss (OpenAI's fine-tuning format)."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("expected a non-empty list of turns")
    messages, untrained = [], []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        role = turn.get(role_key, turn.get("role"))
        content = turn.get(content_key, turn.get("content"))
        if role not in ROLE_ALIASES:
            raise ValueError(f"turn {i} has role {role!r}; accepted: {', '.join(sorted(ROLE_ALIASES))}")
        role = ROLE_ALIASES[role]
        # Files read through Arrow give every turn every key seen in the file: None means absent.
        tool_calls = turn.get("tool_calls")
        if tool_calls is not None and role != "assistant":
            raise ValueError(f"turn {i} has tool_calls but role {role!r}; only assistant turns call tools")
        if tool_calls is not None:
            if not isinstance(tool_calls, list) or not all(isinstance(c, dict) for c in tool_calls):
                raise ValueError(f"turn {i} tool_calls must be a list of objects")
            if content is None:  # OpenAI writes content: null on a turn that only calls tools
                content = ""
        message: dict[str, Any] = {"role": role, "content": _text(content, f"turn {i} content")}
        if tool_calls:
            message["tool_calls"] = [_tool_call(c) for c in tool_calls]
        for key in ("tool_call_id", "name"):
            if turn.get(key) is not None:
                message[key] = _text(turn[key], f"turn {i} {key}")
        weight = turn.get("weight")
        if weight is not None and role == "assistant":
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
                raise ValueError(f"turn {i} has weight {weight!r}; an assistant turn's weight must be 0 (not "
                                 "trained) or 1 (trained)")
            if weight == 0:
                untrained.append(i)
        messages.append(message)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise ValueError("has no assistant turn to learn from")
    if all(i in untrained for i in assistant):
        raise ValueError("every assistant turn has weight 0: nothing to learn from")
    return Example(messages=messages, untrained_turns=untrained)


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """One tool call with Arrow's absent keys (None) dropped and JSON-string arguments (OpenAI's shape) parsed:
    chat templates write ``arguments | tojson``, which would quote a string a second time."""
    call = {k: v for k, v in call.items() if v is not None}
    function = call.get("function")
    if isinstance(function, dict):
        function = {k: v for k, v in function.items() if v is not None}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                function["arguments"] = parsed
        call["function"] = function
    return call


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
    untrained_spans = []  # assistant turns with weight 0: never trained, even with train_on_inputs
    if example.messages is not None:
        text = _render(tokenizer, example.messages)
        spans = []
        for i, message in enumerate(example.messages):
            if message["role"] != "assistant":
                continue
            start = _render(tokenizer, example.messages[:i], add_generation_prompt=True)
            end = _render(tokenizer, example.messages[: i + 1])
            if not (text.startswith(start) and text.startswith(end)):
                raise DataError("the tokenizer's chat template renders a conversation differently from its prefix, "
                                "so the assistant turns cannot be located; set train_on_inputs=True to train on "
                                "every token")
            if message.get("tool_calls"):
                _check_tool_calls_rendered(message, text[len(start):len(end)], i)
            (untrained_spans if i in example.untrained_turns else spans).append((len(start), len(end)))
        add_special = False  # the template writes its own special tokens
    else:
        eos = tokenizer.eos_token or ""
        text = example.prompt + example.completion + eos
        spans = [(len(example.prompt), len(text))]
        add_special = True
    encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]

    def overlaps(a: int, b: int, ranges: list[tuple[int, int]]) -> bool:
        return b > a and any(a < e and b > s for s, e in ranges)

    if train_on_inputs:
        mask = [int(not overlaps(a, b, untrained_spans)) for a, b in offsets]
    else:
        # A token is trained when its characters overlap an assistant span. Special tokens the tokenizer adds
        # itself have an empty (0, 0) range and are never trained.
        mask = [int(overlaps(a, b, spans)) for a, b in offsets]
    return {"input_ids": ids, "assistant_masks": mask}


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The chat template's text; a template that refuses the conversation (``raise_exception``) is a DataError."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as exc:
        hint = ("fold the system prompt into the first user turn (this template has no system role)"
                if "system" in str(exc).lower() else
                "rewrite the conversation into a shape the model's template accepts")
        raise DataError(f"the chat template refuses the conversation: {exc!s}; {hint}") from exc


def _check_tool_calls_rendered(message: dict[str, Any], rendered: str, turn: int) -> None:
    """A template without tool support renders a tool-calling turn as an empty answer: refuse that."""
    for call in message["tool_calls"]:
        function = call.get("function") if isinstance(call.get("function"), dict) else call
        name = function.get("name")
        if not isinstance(name, str) or name not in rendered:
            raise DataError(f"turn {turn} calls the tool {name!r}, but the tokenizer's chat template does not "
                            "write tool calls (the rendered turn lacks the call), so it would be trained as an "
                            "empty answer; use a model whose chat template supports tool calls, or drop the rows "
                            "with tool calls")


def _tokenize_all(examples: list[Example], tokenizer: Any, max_seq_len: int,
                  train_on_inputs: bool) -> list[dict[str, list[int]]]:
    """Every example tokenised; a row its chat template cannot handle is an error naming the row (and how many
    others fail), on one line."""
    tokenized, errors = [], []
    for index, example in enumerate(examples):
        try:
            tokenized.append(tokenize(example, tokenizer, max_seq_len, train_on_inputs))
        except DataError as exc:
            errors.append(f"row {index}: {exc}")
    if errors:
        more = f" (and {len(errors) - 1} more of {len(examples)} rows)" if len(errors) > 1 else ""
        raise DataError(errors[0] + more)
    return tokenized


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token])
    return hashlib.sha256((body + extra).encode()).hexdigest()


@dataclass
class CheckedRows:
    """The rows as read and converted, before any tokenizer or model is needed."""

    rows: list[dict[str, Any]]
    format: str
    examples: list[Example]


def read_and_check(spec: LoRASpec, download_dir: Path | None = None, log: Any = print) -> CheckedRows:
    """Read the rows and check what needs no tokenizer: every row's shape, and room for an eval split. Run before
    the model loads, so a data mistake fails in seconds."""
    rows = load_rows(spec.dataset, download_dir, log=log)
    fmt, examples = to_examples(rows, spec.dataset_format)
    if spec.eval_fraction > 0 and max(1, round(len(rows) * spec.eval_fraction)) >= len(rows):
        raise DataError(f"eval_fraction={spec.eval_fraction}: the dataset has {len(rows)} row(s), too few to hold "
                        f"out {max(1, round(len(rows) * spec.eval_fraction))} for evaluation and still train on some; "
                        "add rows or set eval_fraction=0")
    return CheckedRows(rows, fmt, examples)


def prepare(spec: LoRASpec, tokenizer: Any, *, is_main_process: bool, wait_for_main: Any,
            download_dir: Path | None = None, log: Any = print, checked: CheckedRows | None = None) -> PreparedData:
    """Load, convert, tokenise, truncate and split the dataset, reusing ``data_output_dir`` only when its
    fingerprint (rows + tokenizer + the fields that shape the data) matches. ``checked``: the rows already read
    by :func:`read_and_check`."""
    import datasets

    checked = checked or read_and_check(spec, download_dir, log=log)
    rows, fmt, examples = checked.rows, checked.format, checked.examples
    used_default_template = any(e.messages for e in examples) and ensure_chat_template(tokenizer)
    if used_default_template:
        eos = tokenizer.eos_token
        log("the tokenizer has no chat template: using the default ChatML template" + (
            f"; its turns end with <|im_end|>, so the tokenizer's eos {eos!r} is written and trained after each "
            "assistant turn (generation stops at it)" if eos and eos != "<|im_end|>" else ""))
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
        tokenized = _tokenize_all(examples, tokenizer, spec.max_seq_len, spec.train_on_inputs)
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
            n_eval = max(1, round(len(ds) * spec.eval_fraction))
            if n_eval >= len(ds):
                raise DataError(f"eval_fraction={spec.eval_fraction}: the dataset has {len(ds)} row(s), too few to "
                                f"hold out {n_eval} for evaluation and still train on some; add rows or set "
                                "eval_fraction=0")
            split = ds.train_test_split(test_size=n_eval, seed=spec.seed)
            ds, eval_ds = split["train"], split["test"]
            _check_split(ds, "train", "no train row keeps a trainable token (the rows that do went to the eval "
                         "split); add rows, raise max_seq_len or set eval_fraction=0")
            _check_split(eval_ds, "eval", "the eval split is empty of trainable tokens, so it gives no eval loss; "
                         "add rows, raise max_seq_len or set eval_fraction=0")
        lengths = [len(t["input_ids"]) for t in tokenized]
        # trl drops rows without a trained token: count what is trained, and say what is dropped.
        train_rows, eval_rows = _trained_rows(ds), _trained_rows(eval_ds) if eval_ds is not None else 0
        dropped_train, dropped_eval = len(ds) - train_rows, len(eval_ds or []) - eval_rows
        stats = {"format": fmt, "rows": len(rows), "train_rows": train_rows, "eval_rows": eval_rows,
                 "dropped_train_rows": dropped_train, "dropped_eval_rows": dropped_eval,
                 "truncated_rows": truncated, "rows_without_trainable_tokens": untrainable,
                 "tokens": sum(lengths), "trainable_tokens": sum(sum(t["assistant_masks"]) for t in tokenized),
                 "max_row_tokens": max(lengths), "default_chat_template": bool(used_default_template),
                 "fingerprint": fingerprint}
        if truncated:
            log(f"WARNING: {truncated} of {len(rows)} rows are longer than max_seq_len={spec.max_seq_len} tokens "
                "and were truncated")
        if untrainable:
            log(f"WARNING: {untrainable} rows have no trainable token left after truncation and are dropped: "
                f"{train_rows} train rows are trained ({dropped_train} dropped), {eval_rows} eval rows evaluated "
                f"({dropped_eval} dropped)")
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


def _trained_rows(split: Any) -> int:
    """Rows with at least one trained token (the others carry no loss and are dropped by trl)."""
    return sum(1 in mask for mask in split["assistant_masks"])


def _check_split(split: Any, name: str, message: str) -> None:
    """A split must have rows with at least one trainable token between them."""
    if not any(1 in mask for mask in split["assistant_masks"]):
        raise DataError(f"after the split, the {name} split ({len(split)} rows): {message}")


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
