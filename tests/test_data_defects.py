"""Data defects users hit: tool calls, per-turn weights, dataset directories (save_to_disk, hidden paths,
compressed files), empty files, chat templates that refuse a conversation, splits that leave nothing to train or
evaluate, and a resume path that holds no checkpoint. Data-level tests use the tiny tokenizer; the command-line
cases (exit code 2 with one line) import the trainer (about 10 s) and are marked slow."""

from __future__ import annotations

import gzip
import io
import json
from contextlib import redirect_stderr
from copy import deepcopy

import pytest

from airflow_provider_lora.core.contract import ERROR_PREFIX
from lora_trainer import data as data_lib
from tests.trainer_helpers import arithmetic_rows, make_spec, write_jsonl

# ChatML that writes tool calls and tool results, the way tool-aware templates (Qwen's, Hermes') do.
TOOL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "<tool_call>{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma-style: no system role.
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + TOOL_TEMPLATE
)

TOOL_ROW = {"messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 21C"},
    {"role": "assistant", "content": "It is sunny in Paris."},
]}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tool_tokenizer(tokenizer):
    tok = deepcopy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def _trained_text(tokenizer, tokenized):
    return tokenizer.decode([i for i, m in zip(tokenized["input_ids"], tokenized["assistant_masks"]) if m])


def _prepare(tiny_model_dir, tokenizer, tmp_path, rows, **overrides):
    dataset = write_jsonl(tmp_path / "d.jsonl", rows)
    spec = make_spec(tiny_model_dir, dataset, tmp_path / "out", **overrides)
    logs = []
    prepared = data_lib.prepare(spec, tokenizer, is_main_process=True, wait_for_main=lambda: None, log=logs.append)
    return prepared, logs


# ---- 1. tool calls -------------------------------------------------------------------------------------------------

def test_tool_calls_reach_a_template_that_writes_them_and_are_trained(tool_tokenizer, tmp_path):
    # Read from a file: Arrow gives every turn every key (None where absent), plain rows must still work beside it.
    path = write_jsonl(tmp_path / "tools.jsonl", [TOOL_ROW] + arithmetic_rows(2))
    _, examples = data_lib.to_examples(data_lib.load_rows(str(path)), "auto")
    call_turn = examples[0].messages[1]
    assert call_turn["content"] == "" and call_turn["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert examples[0].messages[2] == {"role": "tool", "content": "sunny, 21C", "tool_call_id": "call_1",
                                       "name": "get_weather"}
    assert "tool_calls" not in examples[1].messages[1]
    trained = _trained_text(tool_tokenizer, data_lib.tokenize(examples[0], tool_tokenizer, 512, False))
    assert "get_weather" in trained and '"city": "Paris"' in trained and "It is sunny in Paris." in trained
    assert "sunny, 21C" not in trained and "Weather in Paris?" not in trained


def test_tool_calls_with_a_template_that_drops_them_are_refused_naming_the_row(tiny_model_dir, tokenizer, tmp_path):
    with pytest.raises(data_lib.DataError) as info:
        _prepare(tiny_model_dir, tokenizer, tmp_path, arithmetic_rows(2) + [TOOL_ROW])
    message = str(info.value)
    assert message.startswith("row 2: ") and "get_weather" in message and "tool calls" in message
    assert "\n" not in message


# ---- 2. per-turn weight --------------------------------------------------------------------------------------------

def test_weight_zero_assistant_turn_is_not_trained(tokenizer, tmp_path):
    row = {"messages": [{"role": "user", "content": "one"},
                        {"role": "assistant", "content": "first answer", "weight": 0},
                        {"role": "user", "content": "two"},
                        {"role": "assistant", "content": "second answer", "weight": 1}]}
    path = write_jsonl(tmp_path / "w.jsonl", [row] + arithmetic_rows(1))  # through Arrow: weight None elsewhere
    _, [example, plain] = data_lib.to_examples(data_lib.load_rows(str(path)), "auto")
    trained = _trained_text(tokenizer, data_lib.tokenize(example, tokenizer, 512, train_on_inputs=False))
    assert "second answer" in trained and "first answer" not in trained
    everything = _trained_text(tokenizer, data_lib.tokenize(example, tokenizer, 512, train_on_inputs=True))
    assert "one" in everything and "second answer" in everything and "first answer" not in everything
    assert "0 plus 0" in _trained_text(tokenizer, data_lib.tokenize(plain, tokenizer, 512, False))


@pytest.mark.parametrize("weight, fragment", [(0.5, "weight 0.5"), ("1", "weight '1'"), (2, "weight 2")])
def test_weight_other_than_0_or_1_is_refused_naming_the_row(weight, fragment):
    good = arithmetic_rows(1)[0]
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": weight}]}
    with pytest.raises(data_lib.DataError, match=rf"row 1: turn 1 has {fragment}; .*must be 0 .* or 1"):
        data_lib.to_examples([good, bad], "messages")


def test_a_row_whose_every_assistant_turn_has_weight_zero_is_refused():
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}
    with pytest.raises(data_lib.DataError, match="row 0: every assistant turn has weight 0"):
        data_lib.to_examples([bad], "messages")


# ---- 3. dataset directories and compressed files ------------------------------------------------------------------

def test_a_save_to_disk_directory_loads_with_load_from_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list(arithmetic_rows(5)).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(arithmetic_rows(3))}).save_to_disk(
        str(tmp_path / "saved_dict"))
    logs = []
    rows = data_lib.load_rows(str(tmp_path / "saved"), log=logs.append)
    assert rows == arithmetic_rows(5)
    assert len(data_lib.load_rows(str(tmp_path / "saved_dict"))) == 3
    assert any("5 rows" in line and "saved" in line for line in logs)


def test_hidden_paths_in_a_directory_are_skipped(tmp_path):
    write_jsonl(tmp_path / "d/a.jsonl", arithmetic_rows(3))
    write_jsonl(tmp_path / "d/.ipynb_checkpoints/a-checkpoint.jsonl", arithmetic_rows(4))
    write_jsonl(tmp_path / "d/.hidden.jsonl", [{"broken": 1}])
    assert len(data_lib.load_rows(str(tmp_path / "d"))) == 3


def _gzip(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write(text)
    return path


def test_compressed_files_load_alone_and_in_a_directory(tmp_path):
    rows = arithmetic_rows(3)
    jsonl = _gzip(tmp_path / "a.jsonl.gz", "".join(json.dumps(r) + "\n" for r in rows))
    js = _gzip(tmp_path / "b.json.gz", json.dumps(rows))
    csv = _gzip(tmp_path / "c.csv.gz", "instruction,output\nSay 1,1\nSay 2,2\n")
    assert data_lib.load_rows(str(jsonl)) == rows and data_lib.load_rows(str(js)) == rows
    assert [r["output"] for r in data_lib.load_rows(str(csv))] == ["1", "2"]
    _gzip(tmp_path / "dir/part-0.jsonl.gz", "".join(json.dumps(r) + "\n" for r in rows))
    write_jsonl(tmp_path / "dir/part-1.jsonl", arithmetic_rows(2))
    logs = []
    assert len(data_lib.load_rows(str(tmp_path / "dir"), log=logs.append)) == 5
    assert any("read 3 rows from" in line and "part-0.jsonl.gz" in line for line in logs)
    assert any("read 2 rows from" in line and "part-1.jsonl" in line for line in logs)


# ---- 4. empty files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("e.jsonl", "  \n\n \n"), ("e.json", "\n"),
                                        ("e.csv", ""), ("e.jsonl.gz", None)])
def test_an_empty_file_is_the_no_rows_data_error(tmp_path, name, text):
    path = tmp_path / name
    if text is None:
        _gzip(path, " \n")
    else:
        path.write_text(text)
    with pytest.raises(data_lib.DataError, match="the dataset has no rows"):
        data_lib.load_rows(str(path))


def test_a_directory_of_empty_files_is_the_no_rows_data_error(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a.jsonl").write_text("")
    (tmp_path / "d/b.jsonl").write_text("\n")
    with pytest.raises(data_lib.DataError, match="the dataset has no rows"):
        data_lib.load_rows(str(tmp_path / "d"))


# ---- 5. chat templates that refuse ------------------------------------------------------------------------------

def test_a_template_that_refuses_a_system_turn_is_a_data_error_naming_the_row(tiny_model_dir, tokenizer, tmp_path):
    tok = deepcopy(tokenizer)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    rows = arithmetic_rows(2) + [{"messages": [{"role": "system", "content": "Be brief."}] +
                                  arithmetic_rows(1)[0]["messages"]}]
    with pytest.raises(data_lib.DataError) as info:
        _prepare(tiny_model_dir, tok, tmp_path, rows)
    message = str(info.value)
    assert message.startswith("row 2: ") and "System role not supported" in message
    assert "fold the system prompt into the first user turn" in message


# ---- 7. splits -----------------------------------------------------------------------------------------------------

def test_eval_fraction_on_a_one_row_dataset_is_a_clear_error(tiny_model_dir, tokenizer, tmp_path):
    with pytest.raises(data_lib.DataError, match=r"eval_fraction=0.1: the dataset has 1 row\(s\), too few"):
        _prepare(tiny_model_dir, tokenizer, tmp_path, arithmetic_rows(1), eval_fraction=0.1)


def test_a_split_left_without_trainable_tokens_is_a_clear_error(tiny_model_dir, tokenizer, tmp_path):
    # One row keeps its answer within max_seq_len, two lose it to truncation: with one row held out, either the
    # train split or the eval split has nothing to learn from or measure.
    long_row = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    rows = arithmetic_rows(1) + [long_row, long_row]
    messages = set()
    for seed in range(8):
        with pytest.raises(data_lib.DataError) as info:
            _prepare(tiny_model_dir, tokenizer, tmp_path, rows, eval_fraction=0.34, seed=seed)
        messages.add(str(info.value).split(":")[0])
    assert messages == {"after the split, the train split (2 rows)", "after the split, the eval split (1 rows)"}


# ---- exit code 2 from the command line, one line ------------------------------------------------------------------

def _run_cli(argv):
    from lora_trainer.__main__ import main

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    # The error is one line after the prefix (other stderr lines are progress bars of the model's loading).
    errors = [line for line in err.getvalue().splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, err.getvalue()
    return code, errors[0]


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded: the checks should have stopped the run before")


@pytest.mark.slow
def test_a_resume_path_without_a_checkpoint_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("lora_trainer.model.load_model", _no_model)
    dataset = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(4))
    (tmp_path / "runs/checkpoint-3").mkdir(parents=True)
    (tmp_path / "runs/checkpoint-3/trainer_state.json").write_text("{}")
    for resume, reason in ((tmp_path / "nope", "no such file or directory"),
                           (tmp_path / "runs", "holds no checkpoint (no trainer_state.json); it holds checkpoint "
                                               "directories, the newest being")):
        code, err = _run_cli(["--base-model", str(tiny_model_dir), "--dataset", str(dataset), "--output-uri",
                              str(tmp_path / "out"), "--resume-from-checkpoint", str(resume)])
        assert code == 2, err
        assert f"resume_from_checkpoint={str(resume)!r}: {reason}" in err 


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty_file", "tool_calls_dropped", "eval_split_of_one_row"])
def test_data_errors_exit_2_with_one_line(tiny_model_dir, tmp_path, case):
    dataset = tmp_path / "d.jsonl"
    extra = []
    if case == "empty_file":
        dataset.write_text("\n")
        expected = "the dataset has no rows"
    elif case == "tool_calls_dropped":
        write_jsonl(dataset, [TOOL_ROW])
        expected = "row 0: turn 1 calls the tool 'get_weather'"
    else:
        write_jsonl(dataset, arithmetic_rows(1))
        extra = ["--eval-fraction", "0.2"]
        expected = "eval_fraction=0.2: the dataset has 1 row(s)"
    code, err = _run_cli(["--base-model", str(tiny_model_dir), "--dataset", str(dataset), "--output-uri",
                          str(tmp_path / "out"), "--max-seq-len", "64", "--max-tokens-per-gpu", "256",
                          "--effective-batch-size", "8", *extra])
    assert code == 2, err
    assert expected in err  and "Traceback" not in err
