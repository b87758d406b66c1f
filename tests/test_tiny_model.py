"""The tiny model fixture is what every training test stands on: check it loads like a hub model everywhere."""

import importlib.util
import json

import pytest

from tests.fixtures.tiny_model import IM_END, build_tiny_model, train_tokenizer

SAMPLES = [
    "The cat walks to the market every morning.",
    'Convert to JSON: name=Alice; age=31; city=Paris\n{"name": "Alice", "age": 31, "city": "Paris"}',
    "Unseen text: Zoë paid 12,50 € in Kraków 日本語 \t tabs and  double  spaces!",
    "<|im_start|>user\nhi<|im_end|>\n",
]
MESSAGES = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]


def test_auto_tokenizer_keeps_the_trained_ids(tiny_model_dir):
    from transformers import AutoTokenizer

    trained = train_tokenizer()
    loaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert 512 <= len(loaded) <= 1000
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert loaded.pad_token_id != loaded.eos_token_id
    for text in SAMPLES:
        ids = loaded(text)["input_ids"]
        assert ids == trained(text)["input_ids"]
        assert loaded.decode(ids) == text  # byte-level: lossless, no unknown tokens
    # No bos/eos is added on encode (like SmolLM2): the chat template places the markers.
    assert loaded("hi")["input_ids"] == trained("hi", add_special_tokens=False)["input_ids"]


def test_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n"
    prompt = tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IM_END)) == 2


def test_model_loads_and_generates(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (256, 4, 4, 2)
    assert cfg.tie_word_embeddings is False and cfg.vocab_size == len(tok)
    assert (cfg.eos_token_id, cfg.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape != attn.q_proj.weight.shape  # GQA
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()

    batch = tok(SAMPLES[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    prompt = tok("hi", return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert prompt["input_ids"].shape[1] < gen.shape[1] <= prompt["input_ids"].shape[1] + 4


def test_build_is_deterministic(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert json.loads((again / "tokenizer.json").read_text()) == json.loads(
        (tiny_model_dir / "tokenizer.json").read_text()
    )


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="unsloth not installed")
def test_unsloth_loads_it_on_cpu(tiny_model_dir):
    # In process: conftest imports unsloth before anything imports transformers, as unsloth requires.
    import torch
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(
        str(tiny_model_dir), max_seq_length=256, dtype=torch.float32, load_in_4bit=False
    )
    assert model.dtype == torch.float32 and tok.eos_token == IM_END
    assert tok("the cat")["input_ids"] == train_tokenizer()("the cat")["input_ids"]
    model = FastLanguageModel.get_peft_model(
        model,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    assert type(model).__name__ == "PeftModelForCausalLM"
    # r * (in + out) summed over q, k, v, o (256->256, 256->128 x2, 256->256) and the MLP (256<->512 x3), 4 layers
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * 32768
