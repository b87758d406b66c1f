"""The bundled trainer on a tiny model built offline: it learns, saves what it learned, and every seed parameter
has its effect (or is rejected with a reason)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.results import load_run_result
from tests.trainer_helpers import arithmetic_rows, card_images, history, make_spec, train, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", arithmetic_rows())


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, dataset, tmp_path_factory):
    """Two epochs with an eval split and a checkpoint per epoch; the other tests read its outputs."""
    output = tmp_path_factory.mktemp("base") / "run"
    outcome = train(tiny_model_dir, dataset, output, num_epochs=2, eval_fraction=0.25, checkpoint_at_epoch=True)
    return output, outcome


def _logits(model, tokenizer, text="What is 3 plus 4?"):
    batch = tokenizer(text, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def _peft_model(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir)


# ---- it learns, and says so -------------------------------------------------------------------------------------

def test_loss_falls_and_every_step_is_recorded(base_run):
    output, outcome = base_run
    rows = history(output)
    train_rows = [r for r in rows if "loss" in r]
    summary = outcome.summary
    assert [r["step"] for r in train_rows] == list(range(1, summary["global_step"] + 1))
    assert summary["final_loss"] < 0.8 * summary["first_loss"]
    assert summary["min_loss"] <= summary["final_loss"]
    assert all(r["learning_rate"] is not None and r["grad_norm"] is not None for r in train_rows)
    assert train_rows[-1]["num_tokens"] > train_rows[0]["num_tokens"] > 0


def test_eval_split_gives_eval_loss_before_training_and_each_epoch(base_run):
    output, outcome = base_run
    before, *evals = [r for r in history(output) if "eval_loss" in r]
    assert before["step"] == 0 and [r["epoch"] for r in evals] == [1.0, 2.0]
    # Step 0 is the base model's held-out loss, kept apart from the adapter's figures.
    assert outcome.summary["base_eval_loss"] == before["eval_loss"]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert (outcome.summary["best_eval_step"], outcome.summary["best_eval_epoch"]) == (best["step"], best["epoch"])
    assert outcome.summary["data"]["eval_rows"] == 12 and outcome.summary["data"]["train_rows"] == 36
    assert outcome.summary["final_eval_loss"] == evals[-1]["eval_loss"] < evals[0]["eval_loss"] < before["eval_loss"]
    card = (output / "adapter/README.md").read_text()
    assert f"| held-out loss of the base model | {before['eval_loss']} |" in card


def test_published_run_is_complete_and_readable(base_run):
    output, outcome = base_run
    result = load_run_result(str(output))
    assert result.summary["global_step"] == outcome.summary["global_step"]
    marker = json.loads((output / storage.COMPLETE_MARKER).read_text())
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
                 "metrics.jsonl", "summary.json", "loss_chart.html", "loss_chart.png"):
        assert marker["files"][name] == (output / name).stat().st_size
    assert not any(name.startswith("checkpoints/") for name in marker["files"])
    assert (output / "loss_chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_adapter_has_a_model_card_the_hub_classes_load(base_run, tiny_model_dir, dataset):
    """Issue 17: README.md in the adapter directory, written and read back with huggingface_hub's classes; peft's
    empty template text is gone, its metadata kept."""
    from huggingface_hub import ModelCard

    output, outcome = base_run
    summary = outcome.summary
    card = ModelCard.load(output / "adapter" / "README.md")
    assert card.data.base_model == str(tiny_model_dir) and card.data.library_name == "peft"
    assert card.data.datasets == [str(dataset)] and {"lora", "peft"} <= set(card.data.tags)
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_value) == ("loss", summary["final_eval_loss"])
    assert f"| final training loss | {summary['final_loss']} |" in card.text
    assert f"| target modules | {', '.join(summary['lora']['target_modules'])} |" in card.text
    assert f"transformers {summary['versions']['transformers']}" in card.text
    # The chart beside the card, so the link resolves in the run directory and wherever the adapter goes alone.
    assert card_images(output / "adapter") == [(output / "adapter" / "loss_chart.png").resolve()]
    assert (output / "adapter" / "loss_chart.png").read_bytes() == (output / "loss_chart.png").read_bytes()
    assert "More Information Needed" not in card.text
    assert "## Held-out prompts, before and after" in card.text
    assert "adapter/README.md" in json.loads((output / storage.COMPLETE_MARKER).read_text())["files"]


def test_the_model_cards_chart_link_resolves_in_the_kfp_model_artifact(base_run, tiny_model_dir, dataset, tmp_path):
    """KFP's model output holds adapter/ without the run around it: the card's chart must travel inside it."""
    from types import SimpleNamespace

    from airflow_provider_lora.kfp import runtime

    output, _ = base_run
    spec = make_spec(tiny_model_dir, dataset, output, num_epochs=2, eval_fraction=0.25, checkpoint_at_epoch=True)
    outputs = [SimpleNamespace(path=str(tmp_path / name), uri=f"minio://mlpipeline/run/{name}", metadata={},
                               log_metric=lambda *_: None) for name in ("model", "metrics", "chart")]
    runtime.write_outputs(load_run_result(str(output)), spec, *outputs)
    model = tmp_path / "model"
    [image] = card_images(model / "adapter")
    assert image.is_relative_to(model / "adapter") and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.read_bytes() == (output / "loss_chart.png").read_bytes()


def test_held_out_prompts_are_answered_before_and_after_training(base_run):
    """Issue 17: the first sample_prompts rows of the eval split, in the summary and under the chart."""
    output, outcome = base_run
    samples = outcome.summary["samples"]
    assert len(samples) == 3 and all(set(s) == {"prompt", "expected", "base", "with_adapter"} for s in samples)
    assert all(s["prompt"] and s["expected"] for s in samples)
    page = (output / "loss_chart.html").read_text()
    assert "Held-out prompts, before and after" in page and page.count("<tr><td><pre>") == 3


def test_before_and_after_are_the_base_models_and_the_adapters_greedy_answers(tiny_model_dir):
    """Each answer is what that model generates greedily from the prompt's tokens: the base model's with the
    adapter disabled, the adapter's with it on (its B matrices made non-zero so the two differ)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from airflow_provider_lora.core.spec import LoRASpec
    from lora_trainer.answers import before_and_after

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    answer = tokenizer("5<|im_end|>", add_special_tokens=False)["input_ids"]
    rows = Dataset.from_dict({"input_ids": [prompt + answer], "assistant_masks": [[0] * len(prompt) + [1] * len(answer)]})
    spec = LoRASpec.parse({"sample_prompts": 1, "sample_max_new_tokens": 5})
    [sample] = before_and_after(spec, model, tokenizer, rows)

    def greedy(m) -> str:
        ids = torch.tensor([prompt])
        out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                         pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
    with torch.no_grad():
        assert sample["with_adapter"] == greedy(model)
        with model.disable_adapter():
            assert sample["base"] == greedy(model)
    # The prompt as the user wrote it: the template's framing (role names, a default system prompt) left out.
    assert sample["expected"] == "5" and sample["prompt"] == "What is 2 plus 3?"


def test_saved_adapter_reloads_with_plain_peft_and_gives_the_same_logits(base_run, tiny_model_dir):
    output, outcome = base_run
    reloaded = _peft_model(tiny_model_dir, output / "adapter")
    torch.testing.assert_close(_logits(reloaded, outcome.tokenizer), _logits(outcome.model, outcome.tokenizer),
                               atol=1e-4, rtol=1e-4)


def test_eval_steps_evaluates_every_that_many_steps(tiny_model_dir, dataset, tmp_path):
    """Issue 17: an interval in steps instead of once per epoch; the best held-out step is in the summary."""
    output = tmp_path / "run"
    outcome = train(tiny_model_dir, dataset, output, max_steps=6, eval_fraction=0.25, eval_steps=2)
    evals = [r for r in history(output) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]  # step 0: the base model, before training
    best = min(evals[1:], key=lambda r: r["eval_loss"])
    assert outcome.summary["best_eval_step"] == best["step"] and outcome.summary["min_eval_loss"] == best["eval_loss"]


def test_num_epochs_and_checkpoint_at_epoch(base_run):
    output, outcome = base_run
    steps_per_epoch = math.ceil(36 / 8)
    assert outcome.summary["global_step"] == 2 * steps_per_epoch
    checkpoints = sorted((p.name for p in (output / "checkpoints").glob("checkpoint-*")), key=len)
    assert checkpoints == [f"checkpoint-{steps_per_epoch}", f"checkpoint-{2 * steps_per_epoch}"]
    # The summary lists them with the held-out loss at their step (evaluated each epoch) and names the lowest.
    eval_at = {row["step"]: row["eval_loss"] for row in history(output) if "eval_loss" in row}
    listed = outcome.summary["saved_checkpoints"]
    assert [(c["name"], c["step"], c["eval_loss"]) for c in listed] == [
        (name, int(name.split("-")[1]), eval_at[int(name.split("-")[1])]) for name in checkpoints]
    best = min(listed, key=lambda c: c["eval_loss"])
    assert outcome.summary["best_eval_checkpoint"] == best["name"]
    assert best["step"] == outcome.summary["best_eval_step"]  # every evaluation fell on a checkpoint here
    assert f"| checkpoint with the lowest held-out loss | {best['name']} |" in (output / "adapter/README.md").read_text()


def test_packing_is_off_on_cpu_and_recorded(base_run):
    packing = base_run[1].summary["packing"]
    assert packing["requested"] is True and packing["used"] is False
    assert "FlashAttention" in packing["note"]


def test_refuses_to_overwrite_a_completed_run(base_run, tiny_model_dir, dataset):
    output, _ = base_run
    from lora_trainer.train import run

    with pytest.raises(storage.OutputExistsError, match="overwrite_output"):
        run(make_spec(tiny_model_dir, dataset, output))


# ---- export -----------------------------------------------------------------------------------------------------

def test_merged_model_matches_the_adapter(tiny_model_dir, dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "run"
    outcome = train(tiny_model_dir, dataset, output, max_steps=3, save_merged=True)
    merged = AutoModelForCausalLM.from_pretrained(output / "merged", dtype=torch.float32)
    adapter = _peft_model(tiny_model_dir, output / "adapter")
    merged_logits, adapter_logits = _logits(merged, outcome.tokenizer), _logits(adapter, outcome.tokenizer)
    assert (merged_logits.argmax(-1) == adapter_logits.argmax(-1)).all()
    # merged_16bit rounds the weights to 16 bits, so agreement is to 16-bit precision.
    assert (merged_logits - adapter_logits).abs().max() < 0.05
    assert "merged" in load_run_result(str(output)).artifacts


# ---- LoRA parameters ----------------------------------------------------------------------------------------------

def test_lora_shape_and_config_follow_the_spec(tiny_model_dir, dataset, tmp_path):
    from safetensors.torch import load_file

    output = tmp_path / "run"
    train(tiny_model_dir, dataset, output, max_steps=1, lora_r=4, lora_alpha=8, lora_dropout=0.1,
          lora_target_modules="q_proj,v_proj", lora_use_rslora=True)
    config = json.loads((output / "adapter/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (4, 8, 0.1, True)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    weights = load_file(output / "adapter/adapter_model.safetensors")
    a_shapes = {k: v.shape for k, v in weights.items() if "lora_A" in k}
    assert a_shapes and all(shape[0] == 4 for shape in a_shapes.values())
    assert all(".q_proj." in k or ".v_proj." in k for k in weights)


def test_dora_adds_magnitude_vectors(tiny_model_dir, dataset, tmp_path):
    from safetensors.torch import load_file

    output = tmp_path / "run"
    train(tiny_model_dir, dataset, output, max_steps=1, lora_use_dora=True, lora_target_modules="q_proj")
    assert json.loads((output / "adapter/adapter_config.json").read_text())["use_dora"] is True
    assert any("lora_magnitude_vector" in k for k in load_file(output / "adapter/adapter_model.safetensors"))


def test_unknown_target_module_is_rejected_with_the_available_ones(tiny_model_dir, dataset, tmp_path):
    from lora_trainer.model import ModelError

    with pytest.raises(ModelError, match=r"qkv_proj.*not found.*q_proj"):
        train(tiny_model_dir, dataset, tmp_path / "run", max_steps=1, lora_target_modules="qkv_proj")


# ---- quantisation ------------------------------------------------------------------------------------------------

def test_4bit_honours_every_bnb_option(tiny_model_dir, dataset, tmp_path):
    import bitsandbytes as bnb

    outcome = train(tiny_model_dir, dataset, tmp_path / "run", max_steps=2, lora_load_in_4bit=True,
                    lora_bnb_4bit_quant_type="fp4", lora_bnb_4bit_use_double_quant=False,
                    lora_bnb_4bit_compute_dtype="float32")
    layers = [m for m in outcome.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    assert {m.weight.quant_type for m in layers} == {"fp4"}
    assert {m.compute_dtype for m in layers} == {torch.float32}
    assert not any(m.weight.quant_state.nested for m in layers)
    assert outcome.summary["quantisation"] == {"bits": 4, "quant_type": "fp4", "compute_dtype": "float32",
                                               "double_quant": False}


def test_4bit_defaults_are_nf4_with_double_quant(tiny_model_dir, dataset, tmp_path):
    import bitsandbytes as bnb

    outcome = train(tiny_model_dir, dataset, tmp_path / "run", max_steps=1, lora_load_in_4bit=True)
    layers = [m for m in outcome.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert {m.weight.quant_type for m in layers} == {"nf4"}
    assert all(m.weight.quant_state.nested for m in layers)


def test_8bit_loads_8bit_layers(tiny_model_dir, dataset, tmp_path):
    import bitsandbytes as bnb

    outcome = train(tiny_model_dir, dataset, tmp_path / "run", max_steps=2, lora_load_in_8bit=True)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in outcome.model.modules())
    assert outcome.summary["quantisation"] == {"bits": 8}
    assert math.isfinite(outcome.summary["final_loss"])


# ---- optimisation schedule ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant_with_warmup"])
def test_learning_rate_warmup_and_scheduler_follow_transformers(tiny_model_dir, dataset, tmp_path, scheduler):
    from transformers import get_scheduler

    steps, warmup, lr = 6, 2, 1e-3
    output = tmp_path / "run"
    train(tiny_model_dir, dataset, output, max_steps=steps, lr_warmup_steps=warmup, learning_rate=lr,
          lr_scheduler=scheduler)
    logged = [r["learning_rate"] for r in history(output) if "loss" in r]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    reference = get_scheduler(scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    expected = []
    for _ in range(steps):  # the rate logged at step k is the one used for step k
        expected.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    assert logged == pytest.approx(expected, rel=1e-6)
    assert logged[0] == 0.0 and logged[warmup] == pytest.approx(lr)


def test_same_seed_same_losses_other_seed_other_losses(tiny_model_dir, dataset, tmp_path):
    def losses(seed, name):
        train(tiny_model_dir, dataset, tmp_path / name, max_steps=3, seed=seed, lora_dropout=0.1)
        return [r["loss"] for r in history(tmp_path / name) if "loss" in r]

    first = losses(7, "a")
    assert losses(7, "b") == first
    assert losses(8, "c") != first


def test_batch_plan_holds_effective_batch_within_the_token_cap(tiny_model_dir, dataset, tmp_path):
    outcome = train(tiny_model_dir, dataset, tmp_path / "run", max_steps=1, effective_batch_size=12,
                    max_seq_len=64, max_tokens_per_gpu=256)
    batch = outcome.summary["batch"]
    assert (batch["micro_batch"], batch["grad_accum"], batch["world_size"]) == (4, 3, 1)


def test_resume_continues_the_step_count(tiny_model_dir, dataset, tmp_path):
    output = tmp_path / "run"
    first = train(tiny_model_dir, dataset, output, num_epochs=1, checkpoint_at_epoch=True)
    steps = first.summary["global_step"]
    second = train(tiny_model_dir, dataset, output, num_epochs=2, checkpoint_at_epoch=True,
                   resume_from_checkpoint="latest", overwrite_output=True)
    assert second.summary["resumed_from"].endswith(f"checkpoint-{steps}")
    assert second.summary["global_step"] == 2 * steps
    logged = [r["step"] for r in history(output) if "loss" in r]
    assert logged == list(range(1, 2 * steps + 1))  # the first epoch's rows kept, none repeated


def test_resume_skips_a_checkpoint_cut_short(tiny_model_dir, dataset, tmp_path):
    """A pod killed while saving leaves a newer checkpoint directory without trainer_state.json (transformers writes
    it last); 'latest' resumes from the newest complete one instead of failing in transformers ("Can't find a valid
    checkpoint"), and the summary does not list the cut one."""
    output = tmp_path / "run"
    first = train(tiny_model_dir, dataset, output, num_epochs=1, checkpoint_at_epoch=True)
    steps = first.summary["global_step"]
    cut = output / "checkpoints" / f"checkpoint-{steps + 1}"
    cut.mkdir()
    (cut / "adapter_model.safetensors").write_bytes(b"\0" * 64)  # what the kill left: the weights, half written
    second = train(tiny_model_dir, dataset, output, num_epochs=2, checkpoint_at_epoch=True,
                   resume_from_checkpoint="latest", overwrite_output=True)
    assert second.summary["resumed_from"].endswith(f"checkpoint-{steps}")
    assert second.summary["global_step"] == 2 * steps
    assert [c["name"] for c in second.summary["saved_checkpoints"]] == [
        f"checkpoint-{steps}", f"checkpoint-{2 * steps}"]


def test_liger_on_cpu_is_rejected_before_loading(tiny_model_dir, dataset, tmp_path):
    from lora_trainer.model import ModelError

    with pytest.raises(ModelError, match="use_liger=True needs a CUDA GPU"):
        train(tiny_model_dir, dataset, tmp_path / "run", max_steps=1, use_liger=True)
