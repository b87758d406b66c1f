"""Before / after: a few held-out prompts answered by the base model and by the trained adapter, after training.

The rows are the first of the eval split (``eval_fraction``), as the trainer tokenised them: the prompt is every
token before the first answer token, the expected answer the first answer turn. The prompt is shown without the
chat template's framing of a user turn (a default system prompt, role headers), as the user wrote it. Each prompt
is answered twice, greedily and at most ``sample_max_new_tokens`` tokens: with the adapter, and with it disabled
(peft's ``disable_adapter``), which is the base model. A failure here never fails the run: the answers are a courtesy.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_lora.core.spec import LoRASpec


def before_and_after(spec: LoRASpec, model: Any, tokenizer: Any, eval_rows: Any) -> list[dict[str, str]]:
    """``[{"prompt", "expected", "base", "with_adapter"}]`` for up to ``spec.sample_prompts`` held-out rows."""
    import torch

    if not spec.sample_prompts or eval_rows is None:
        return []
    rows = eval_rows.select(range(min(spec.sample_prompts, len(eval_rows))))
    before, after = _user_turn_framing(tokenizer)
    model.eval()
    samples = []
    for ids, mask in zip(rows["input_ids"], rows["assistant_masks"]):
        if 1 not in mask:
            continue
        start = mask.index(1)
        end = start + next((i for i, m in enumerate(mask[start:]) if not m), len(mask) - start)
        prompt = torch.tensor([ids[:start]], device=model.device)

        def answer() -> str:
            with torch.no_grad():
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=spec.sample_max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
            return tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()

        adapter = answer()
        with model.disable_adapter():
            base = answer()
        samples.append({"prompt": _unframed(tokenizer.decode(ids[:start], skip_special_tokens=True), before, after),
                        "expected": tokenizer.decode(ids[start:end], skip_special_tokens=True).strip(),
                        "base": base, "with_adapter": adapter})
    return samples


# A user turn's text that no real prompt contains: where it lands in the rendered template splits the framing.
_MARKER = "lora-sample-prompt-marker"


def _user_turn_framing(tokenizer: Any) -> tuple[str, str]:
    """What the chat template writes before and after a lone user turn's text (ready for the answer), decoded as
    the prompts are: SmolLM2's template, say, adds a default system prompt and the role names. ``("", "")`` when
    the tokenizer has no template or the marker does not survive it."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}], tokenize=False,
                                             add_generation_prompt=True)
        decoded = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    except Exception:  # no chat template, or one that refuses a lone user turn: show the prompt as decoded
        return "", ""
    before, found, after = decoded.partition(_MARKER)
    return (before.strip(), after.strip()) if found else ("", "")


def _unframed(prompt: str, before: str, after: str) -> str:
    """``prompt`` without the template's framing, where it has exactly that framing (a multi-turn prompt keeps its
    earlier turns as rendered)."""
    text = prompt.strip()
    if before and text.startswith(before):
        text = text[len(before):]
    if after and text.endswith(after):
        text = text[:-len(after)]
    return text.strip()
