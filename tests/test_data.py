"""Data preparation on its own (no training): formats, file types, loss masks, bad rows, the processed-data cache
and the packer's statistics."""

from __future__ import annotations

import json

import pytest

from lora_trainer import data as data_lib
from tests.trainer_helpers import arithmetic_rows, make_spec, write_jsonl

ROWS_BY_FORMAT = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                              {"role": "assistant", "content": "Hello!"}]},
    "conversations": {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]},
    "alpaca": {"instruction": "Greet", "input": "Hi there", "output": "Hello!"},
    "prompt_completion": {"prompt": "Hi there. Answer:", "completion": " Hello!"},
    "text": {"text": "Hello! This whole text is trained."},
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _trained_text(tokenizer, tokenized):
    ids = [i for i, m in zip(tokenized["input_ids"], tokenized["assistant_masks"]) if m]
    return tokenizer.decode(ids)


@pytest.mark.parametrize("fmt", list(ROWS_BY_FORMAT))
def test_each_format_is_detected_and_trains_only_the_answer(tokenizer, fmt):
    detected, [example] = data_lib.to_examples([ROWS_BY_FORMAT[fmt]], "auto")
    assert detected == fmt
    tokenized = data_lib.tokenize(example, tokenizer, 512, train_on_inputs=False)
    trained = _trained_text(tokenizer, tokenized)
    if fmt == "text":
        assert trained.startswith("Hello! This whole text is trained.")
    else:
        assert "Hello!" in trained and "Hi there" not in trained
        assert sum(tokenized["assistant_masks"]) < len(tokenized["input_ids"])


def test_every_assistant_turn_of_a_multi_turn_chat_is_trained(tokenizer):
    row = {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first answer"},
                        {"role": "user", "content": "two"}, {"role": "assistant", "content": "second answer"}]}
    _, [example] = data_lib.to_examples([row], "messages")
    trained = _trained_text(tokenizer, data_lib.tokenize(example, tokenizer, 512, train_on_inputs=False))
    assert "first answer" in trained and "second answer" in trained
    assert "one" not in trained.replace("first", "") and "two" not in trained


def test_train_on_inputs_trains_every_token(tokenizer):
    _, [example] = data_lib.to_examples([ROWS_BY_FORMAT["messages"]], "auto")
    tokenized = data_lib.tokenize(example, tokenizer, 512, train_on_inputs=True)
    assert all(tokenized["assistant_masks"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_file_types_load(tmp_path, suffix):
    import pandas as pd

    rows = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(5)]
    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame(rows)
    {".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".json": lambda: path.write_text(json.dumps(rows)),
     ".parquet": lambda: frame.to_parquet(path),
     ".csv": lambda: frame.to_csv(path, index=False)}[suffix]()
    loaded = data_lib.load_rows(str(path))
    assert [r["output"] for r in loaded] == ["0", "1", "2", "3", "4"]
    assert data_lib.to_examples(loaded, "auto")[1][0].messages[0]["content"] == "Say 0"  # empty input stays empty


def test_a_directory_of_files_loads_them_all(tmp_path):
    write_jsonl(tmp_path / "d/a.jsonl", arithmetic_rows(3))
    write_jsonl(tmp_path / "d/b.jsonl", arithmetic_rows(4))
    assert len(data_lib.load_rows(str(tmp_path / "d"))) == 7


@pytest.mark.parametrize("row, message", [
    ({"messages": "hello"}, "row 1: expected a non-empty list of turns"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "row 1: has no assistant turn"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "row 1: turn 0 has role 'wizard'"),
    ({"messages": [{"role": "assistant", "content": 5}]}, "row 1: turn 0 content must be a string"),
    ({"text": "no messages column"}, "row 1: missing column 'messages'"),
])
def test_a_malformed_row_is_an_error_naming_its_index(row, message):
    good = ROWS_BY_FORMAT["messages"]
    with pytest.raises(data_lib.DataError) as info:
        data_lib.to_examples([good, row, good], "messages")
    assert message in str(info.value) and "1 of 3 rows" in str(info.value)


def test_unrecognised_columns_name_the_accepted_formats():
    with pytest.raises(data_lib.DataError, match=r"\['answer', 'question'\].*'messages'.*dataset_format"):
        data_lib.to_examples([{"question": "q", "answer": "a"}], "auto")


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(data_lib.DataError, match="no such file or directory"):
        data_lib.load_rows(str(tmp_path / "nope.jsonl"))


def test_default_chat_template_when_the_tokenizer_has_none(tokenizer):
    from copy import deepcopy

    bare = deepcopy(tokenizer)
    bare.chat_template = None
    assert data_lib.ensure_chat_template(bare) is True
    assert bare.chat_template == data_lib.DEFAULT_CHAT_TEMPLATE
    assert data_lib.ensure_chat_template(tokenizer) is False


def test_truncation_is_counted(tiny_model_dir, tokenizer, tmp_path):
    long_row = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    dataset = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(4) + [long_row])
    spec = make_spec(tiny_model_dir, dataset, tmp_path / "out")  # max_seq_len 64
    logs = []
    prepared = data_lib.prepare(spec, tokenizer, is_main_process=True, wait_for_main=lambda: None, log=logs.append)
    assert prepared.stats["truncated_rows"] == 1
    assert prepared.stats["rows_without_trainable_tokens"] == 1  # the answer was cut off
    assert max(len(x) for x in prepared.train["input_ids"]) == 64
    assert any("truncated" in line for line in logs)


def test_processed_data_is_reused_only_when_the_fingerprint_matches(tiny_model_dir, tokenizer, tmp_path):
    dataset = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(6))
    cache = tmp_path / "processed"

    def prepare(**overrides):
        spec = make_spec(tiny_model_dir, dataset, tmp_path / "out", data_output_dir=str(cache), **overrides)
        logs = []
        prepared = data_lib.prepare(spec, tokenizer, is_main_process=True, wait_for_main=lambda: None,
                                    log=logs.append)
        return prepared, " ".join(logs)

    first, log1 = prepare()
    assert "written to" in log1 and (cache / "fingerprint.json").exists()
    again, log2 = prepare()
    assert "reusing" in log2 and again.train["input_ids"] == first.train["input_ids"]
    _, log3 = prepare(max_seq_len=48, max_tokens_per_gpu=256)  # a field that shapes the data changed
    assert "written to" in log3
    write_jsonl(dataset, arithmetic_rows(7))  # the data changed
    changed, log4 = prepare(max_seq_len=48, max_tokens_per_gpu=256)
    assert "written to" in log4 and len(changed.train) == 7


def test_packer_statistics_on_lengths_alone():
    import random

    rnd = random.Random(0)
    # A realistic spread: many short chat turns, some long documents.
    lengths = [int(rnd.lognormvariate(5.0, 0.9)) + 8 for _ in range(400)]
    stats = data_lib.packing_stats(lengths, max_seq_len=1024, micro_batch=4)
    assert stats["real_token_share_packed"] >= 0.95
    assert stats["real_token_share_unpacked"] < stats["real_token_share_packed"]
    assert stats["sequences_packed"] < stats["rows"]
