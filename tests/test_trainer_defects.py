"""Model and reporting defects: GPT-2's Conv1D projections as LoRA targets, dotted target names (peft's suffix
match), a model with nothing to wrap, the eos of a base model trained under the default ChatML template, rows that
trl drops, 4-bit parameter counts, data errors before the model loads, warmup longer than the run, and the
tokenizer saved with the adapter. Unit-level tests use tiny models built here; the training runs are marked slow."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_trainer import data as data_lib
from lora_trainer import model as model_lib
from tests.fixtures.tiny_model import ENDOFTEXT, train_tokenizer
from tests.trainer_helpers import arithmetic_rows, make_spec, write_jsonl


def build_tiny_gpt2(path: Path) -> Path:
    """A tiny GPT-2 (Conv1D projections, tied head) whose tokenizer has no chat template and ends text with
    <|endoftext|>, as the GPT-2 family's base models do."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer()
    tokenizer.chat_template = None
    tokenizer.eos_token = tokenizer.bos_token = ENDOFTEXT
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


# ---- A. Conv1D projections; a model with nothing to wrap ----------------------------------------------------------

def test_gpt2_conv1d_projections_are_found_and_wrapped(gpt2_dir, tmp_path):
    import peft

    model = _load(gpt2_dir)
    assert model_lib.linear_module_names(model) == ["c_attn", "c_fc", "c_proj"]  # Conv1D; the tied head is not
    spec = make_spec(gpt2_dir, tmp_path / "d.jsonl", tmp_path / "out")
    targets = model_lib.resolve_targets(model, spec)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))
    assert sum("lora_A" in n for n, _ in wrapped.named_parameters()) == 2 * 4  # 2 layers x (c_attn, 2 c_proj, c_fc)


def test_a_model_without_a_projection_is_refused_by_name(tmp_path):
    import torch

    class NoProjections(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10)

        def get_output_embeddings(self):
            return self.head

    spec = make_spec("/models/odd", tmp_path / "d.jsonl", tmp_path / "out")
    with pytest.raises(model_lib.ModelError, match=r"base_model='/models/odd': no layer LoRA can wrap was found"):
        model_lib.resolve_targets(NoProjections(), spec)


# ---- B. dotted target names -----------------------------------------------------------------------------------------

def test_dotted_target_names_match_as_peft_matches_them(tiny_model_dir, tmp_path):
    import peft

    model = _load(tiny_model_dir)
    spec = make_spec(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "out",
                     lora_target_modules="self_attn.q_proj,mlp.up_proj,v_proj")
    targets = model_lib.resolve_targets(model, spec)
    assert targets == ["self_attn.q_proj", "mlp.up_proj", "v_proj"]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))
    wrapped_names = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in wrapped.named_parameters()
                     if "lora_A" in n}
    assert wrapped_names == {"q_proj", "up_proj", "v_proj"}
    # A suffix matches at a '.' only: 'attn.q_proj' is not 'self_attn.q_proj'.
    bad = make_spec(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "out", lora_target_modules="attn.q_proj")
    with pytest.raises(model_lib.ModelError, match=r"lora_target_modules='attn.q_proj': attn.q_proj not found"):
        model_lib.resolve_targets(_load(tiny_model_dir), bad)


# ---- H. 4-bit parameter counts --------------------------------------------------------------------------------------

def test_4bit_weights_count_as_parameters_not_packed_bytes():
    import bitsandbytes as bnb
    import torch

    class FourBit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # A 16x8 weight packed two values per byte: 64 uint8 elements, as bitsandbytes stores it.
            self.weight = bnb.nn.Params4bit(torch.zeros(64, 1, dtype=torch.uint8), requires_grad=False)
            self.lora = torch.nn.Parameter(torch.zeros(3, 8))

    assert model_lib.count_parameters(FourBit()) == (24, 128 + 24)


# ---- C. the eos under the default ChatML template ------------------------------------------------------------------

def test_the_default_template_trains_the_eos_after_each_assistant_turn(gpt2_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    assert tokenizer.chat_template is None and tokenizer.eos_token == ENDOFTEXT
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]}]
    spec = make_spec(gpt2_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out")
    logs = []
    prepared = data_lib.prepare(spec, tokenizer, is_main_process=True, wait_for_main=lambda: None, log=logs.append)
    ids, mask = prepared.train["input_ids"][0], prepared.train["assistant_masks"][0]
    trained_eos = [i for i, (t, m) in enumerate(zip(ids, mask)) if t == tokenizer.eos_token_id and m]
    assert len(trained_eos) == 2  # one after each answer
    assert tokenizer.decode(ids[:trained_eos[0] + 1]).endswith("Hello.<|im_end|><|endoftext|>")
    assert any(f"the tokenizer's eos '{ENDOFTEXT}' is written and trained after each assistant turn" in line
               for line in logs)


# ---- F. rows trl drops -------------------------------------------------------------------------------------------

def test_rows_without_a_trained_token_are_not_counted_as_trained(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_row = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    spec = make_spec(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(6) + [long_row] * 2),
                     tmp_path / "out")
    logs = []
    prepared = data_lib.prepare(spec, tokenizer, is_main_process=True, wait_for_main=lambda: None, log=logs.append)
    assert prepared.stats["train_rows"] == 6 and prepared.stats["dropped_train_rows"] == 2
    assert any("6 train rows are trained (2 dropped)" in line for line in logs)


# ---- G, D, I: a run of the trainer ---------------------------------------------------------------------------------

def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded: the data checks should have stopped the run before")


@pytest.mark.slow
def test_row_errors_exit_2_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    from tests.test_data_defects import _run_cli

    monkeypatch.setattr("lora_trainer.model.load_model", _no_model)
    rows = arithmetic_rows(3) + [{"messages": [{"role": "user", "content": "no answer"}]}]
    dataset = write_jsonl(tmp_path / "d.jsonl", rows)
    code, err = _run_cli(["--base-model", str(tiny_model_dir), "--dataset", str(dataset), "--output-uri",
                          str(tmp_path / "out")])
    assert code == 2 and "row 3: has no assistant turn to learn from" in err


@pytest.mark.slow
def test_a_short_run_warns_of_its_warmup_and_saves_the_base_tokenizer_settings(tiny_model_dir, tmp_path, capsys):
    import json

    from tests.trainer_helpers import train

    dataset = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(16))
    train(tiny_model_dir, dataset, tmp_path / "out", lr_warmup_steps=10, num_epochs=1)  # 2 steps of 8 rows
    out = capsys.readouterr().out
    assert "plan: 2 optimizer step(s), warmup 10" in out
    assert "WARNING: lr_warmup_steps=10 is at least the run's 2 optimizer step(s)" in out
    base = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    saved = json.loads((tmp_path / "out/adapter/tokenizer_config.json").read_text())
    assert (saved.get("model_max_length"), saved.get("padding_side")) == \
        (base.get("model_max_length"), base.get("padding_side"))


@pytest.mark.slow
def test_a_gpt2_model_trains_with_lora_on_its_conv1d_projections(gpt2_dir, tmp_path):
    from tests.trainer_helpers import train

    outcome = train(gpt2_dir, write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(16)), tmp_path / "out")
    assert outcome.summary["lora"]["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert outcome.summary["global_step"] == 2 and outcome.summary["trainable_parameters"] > 0
    assert (tmp_path / "out/adapter/adapter_model.safetensors").exists()
