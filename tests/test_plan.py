"""``lora-train --plan``: the preflight plan's figures against facts computed independently here (the tokenizer's own
token counts, peft's parameter count), its refusal of a run that cannot fit, its JSON line, and that it trains and
writes nothing."""

from __future__ import annotations

import json
import math

import pytest

from airflow_provider_lora.core.contract import ERROR_PREFIX, PLAN_PREFIX
from tests.trainer_helpers import arithmetic_rows, make_spec, write_jsonl

pytest.importorskip("peft")

MAX_SEQ_LEN = 64
LONG_ANSWER = {"messages": [{"role": "user", "content": "Count."},
                            {"role": "assistant", "content": " ".join(str(i) for i in range(80))}]}
# The prompt alone is longer than max_seq_len: no answer token survives truncation, so the trainer drops the row.
LONG_PROMPT = {"messages": [{"role": "user", "content": " ".join(["word"] * 120)},
                            {"role": "assistant", "content": "ok"}]}
ROWS = arithmetic_rows(46) + [LONG_ANSWER, LONG_PROMPT]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "rows.jsonl", ROWS)


def _plan(tiny_model_dir, data, tmp_path, **overrides):
    from lora_trainer.plan import make_plan

    return make_plan(make_spec(tiny_model_dir, data, tmp_path / "out", **overrides), measure=False)


def _cli(capsys, tiny_model_dir, data, tmp_path, *extra):
    from lora_trainer.__main__ import main

    rc = main(["--plan", "--base-model", str(tiny_model_dir), "--dataset", str(data), "--output-uri",
               str(tmp_path / "out"), "--effective-batch-size", "8", "--max-seq-len", str(MAX_SEQ_LEN),
               "--max-tokens-per-gpu", "256", "--num-epochs", "2", "--dtype", "float32", *extra])
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith(PLAN_PREFIX)]
    return rc, (json.loads(lines[0][len(PLAN_PREFIX):]) if lines else None), out, err


def test_dataset_figures_match_the_tokenizer(tiny_model_dir, data, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    full, answer = [], []
    for row in ROWS:
        messages = row["messages"]
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        prompt = tok.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
        full.append(len(ids))
        # The answer's tokens (and its <|im_end|> and newline) that survive truncation at max_seq_len.
        answer.append(max(0, min(len(ids), MAX_SEQ_LEN) - len(prompt)))
    trained = [(min(n, MAX_SEQ_LEN), a) for n, a in zip(full, answer) if a > 0]
    lengths = sorted(n for n, _ in trained)

    plan = _plan(tiny_model_dir, data, tmp_path, num_epochs=2)
    d = plan["dataset"]
    assert (d["rows"], d["train_rows"], d["dropped_rows"]) == (48, 47, 1)
    assert "truncation" in d["dropped_reason"]
    assert d["truncated_rows"] == sum(n > MAX_SEQ_LEN for n in full) == 2
    assert d["tokens_per_row"]["min"] == lengths[0] and d["tokens_per_row"]["max"] == lengths[-1] == MAX_SEQ_LEN
    assert d["tokens_per_row"]["median"] == lengths[len(lengths) // 2]
    assert d["train_tokens"] == sum(lengths)
    assert d["answer_tokens"] == sum(a for _, a in trained)
    # Batches: 8 rows per step within 256 tokens per micro-batch of 64-token rows: micro-batch 4 x accumulation 2.
    assert (d["micro_batch"], d["gradient_accumulation"]) == (4, 2)
    assert d["steps_per_epoch"] == math.ceil(47 / 4) // 2 and d["total_steps"] == 2 * d["steps_per_epoch"]


@pytest.mark.parametrize("r, targets", [(8, ""), (4, "q_proj,v_proj")])
def test_model_figures_match_peft(tiny_model_dir, data, tmp_path, r, targets):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plan = _plan(tiny_model_dir, data, tmp_path, lora_r=r, lora_target_modules=targets)
    m = plan["model"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = model.config
    assert (m["layers"], m["hidden_size"], m["vocab_size"]) == (config.num_hidden_layers, config.hidden_size,
                                                               config.vocab_size)
    assert m["total_parameters"] == model.num_parameters()
    peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=m["target_modules"], task_type="CAUSAL_LM"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert m["trainable_parameters"] == trainable
    if targets:
        assert m["target_modules"] == ["q_proj", "v_proj"]


def test_memory_items_add_up_and_scale(tiny_model_dir, data, tmp_path):
    plan = _plan(tiny_model_dir, data, tmp_path)
    mem, m = plan["memory"], plan["model"]
    assert mem["peak_bytes"] == sum(mem["items"].values())
    assert mem["items"]["base_weights"] == m["total_parameters"] * 4  # float32
    assert mem["items"]["optimizer_states"] == m["trainable_parameters"] * 8  # AdamW: two float32 states
    assert mem["seq_len"] == MAX_SEQ_LEN and mem["gradient_checkpointing"] is False  # CPU: the trainer's setting
    # 4-bit weights are smaller; a longer max_seq_len costs more activations.
    quantised = _plan(tiny_model_dir, data, tmp_path, lora_load_in_4bit=True)["memory"]["items"]
    assert quantised["base_weights"] < mem["items"]["base_weights"]
    longer = _plan(tiny_model_dir, data, tmp_path, max_seq_len=128, max_tokens_per_gpu=512)["memory"]["items"]
    assert longer["activations"] > mem["items"]["activations"] and longer["logits"] > mem["items"]["logits"]


def test_json_line_and_nothing_written(capsys, tiny_model_dir, data, tmp_path):
    cache = tmp_path / "processed"
    rc, plan, out, err = _cli(capsys, tiny_model_dir, data, tmp_path, "--data-output-dir", str(cache))
    assert rc == 0, err
    assert plan == json.loads(json.dumps(plan))  # JSON all the way down
    assert plan["dataset"]["total_steps"] == 2 * plan["dataset"]["steps_per_epoch"]
    assert plan["memory"]["fits"] is True and plan["memory"]["largest_micro_batch_that_fits"] == 8
    # Measured by default, and always labelled an estimate.
    assert plan["time"]["measured"] is True and plan["time"]["estimated_seconds_per_epoch"] > 0
    assert "estimate" in plan["time"]["note"] and "time (estimate)" in out
    # Nothing trained, nothing written: no output directory (so no adapter), no processed-data cache.
    assert not (tmp_path / "out").exists() and not cache.exists()
    assert "LORA_RESULT" not in out


def test_not_measured_is_said(capsys, tiny_model_dir, data, tmp_path):
    rc, plan, out, _ = _cli(capsys, tiny_model_dir, data, tmp_path, "--no-plan-measure")
    assert rc == 0 and plan["time"] == {"measured": False, "note": "not measured"}
    assert "time: not measured" in out


def test_refuses_when_micro_batch_one_cannot_fit(capsys, tiny_model_dir, data, tmp_path):
    rc, plan, _, err = _cli(capsys, tiny_model_dir, data, tmp_path, "--no-plan-measure", "--plan-memory-gib",
                            "0.001")
    assert rc == 2
    assert plan["memory"]["fits"] is False and plan["memory"]["largest_micro_batch_that_fits"] == 0
    assert f"{ERROR_PREFIX}even micro-batch 1 does not fit" in err
    assert f"max_seq_len={MAX_SEQ_LEN}" in err and "0.00 GiB available (--plan-memory-gib)" in err


def test_refuses_a_micro_batch_too_large_and_names_one_that_fits(capsys, tiny_model_dir, data, tmp_path):
    from lora_trainer import model as model_lib
    from lora_trainer.plan import GIB, estimate_memory

    spec = make_spec(tiny_model_dir, data, tmp_path / "out")
    plan = _plan(tiny_model_dir, data, tmp_path)
    mem = plan["memory"]

    def required(mb):
        items = estimate_memory(spec, plan["model"], model_lib.pick_dtype(spec), mb, mem["seq_len"], False, False)
        return sum(items.values()) + mem["process_baseline_bytes"]

    room = (required(2) + required(3)) / 2 / GIB  # fits micro-batch 2, not the planned 4
    rc, refused, _, err = _cli(capsys, tiny_model_dir, data, tmp_path, "--no-plan-measure", "--plan-memory-gib",
                               str(room))
    assert rc == 2 and refused["memory"]["largest_micro_batch_that_fits"] == 2
    assert f"{ERROR_PREFIX}max_tokens_per_gpu=256 gives micro-batch 4" in err
    assert f"set max_tokens_per_gpu={2 * MAX_SEQ_LEN} or less" in err


def test_memory_available_comes_from_the_spec_when_it_sets_it(capsys, tiny_model_dir, data, tmp_path):
    rc, plan, _, err = _cli(capsys, tiny_model_dir, data, tmp_path, "--no-plan-measure",
                            "--resource-memory-per-worker", "64Mi")
    assert rc == 2 and plan["memory"]["available_bytes"] == 64 * 2 ** 20
    assert plan["memory"]["available_source"].startswith("resource_memory_per_worker")
    assert "0.06 GiB available (resource_memory_per_worker" in err
    # Not set in the spec: this machine's memory, which the tiny model fits.
    rc, plan, _, _ = _cli(capsys, tiny_model_dir, data, tmp_path, "--no-plan-measure")
    assert rc == 0 and plan["memory"]["available_source"] == "this machine's available memory"



@pytest.fixture(scope="module")
def planned_and_trained(tiny_model_dir, tmp_path_factory):
    """The plan of a spec, and the summary of training that spec."""
    from tests.trainer_helpers import train

    tmp = tmp_path_factory.mktemp("plan-vs-train")
    rows = write_jsonl(tmp / "rows.jsonl", ROWS)
    plan = _plan(tiny_model_dir, rows, tmp, lora_r=4, eval_fraction=0.1)
    return plan, train(tiny_model_dir, rows, tmp / "out", lora_r=4, eval_fraction=0.1).summary


@pytest.mark.slow
def test_plan_agrees_with_what_the_trainer_then_does(planned_and_trained):
    plan, summary = planned_and_trained
    d, s = plan["dataset"], summary["data"]
    assert (d["rows"], d["train_rows"], d["eval_rows"], d["truncated_rows"]) == (
        s["rows"], s["train_rows"], s["eval_rows"], s["truncated_rows"])
    assert (d["all_rows_tokens"], d["all_rows_answer_tokens"]) == (s["tokens"], s["trainable_tokens"])
    assert plan["model"]["trainable_parameters"] == summary["trainable_parameters"]
    assert plan["model"]["target_modules"] == summary["lora"]["target_modules"]
    assert (d["micro_batch"], d["gradient_accumulation"]) == (summary["batch"]["micro_batch"],
                                                            summary["batch"]["grad_accum"])


@pytest.mark.slow
def test_planned_steps_are_the_steps_trained(planned_and_trained):
    plan, summary = planned_and_trained
    assert plan["dataset"]["total_steps"] == summary["global_step"]
