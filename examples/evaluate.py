"""Exact-match evaluation on held-out chat rows: does the model answer exactly what the data says?

Plain transformers (+ peft for an adapter), no unsloth, so it checks that what the trainer saved loads anywhere.
Greedy decoding, the tokenizer's own chat template with the generation prompt, answers stripped and compared exactly.

    python examples/evaluate.py MODEL_DIR examples/data/records_heldout.jsonl [--adapter ADAPTER_DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def load_rows(path: str | Path) -> list[tuple[list[dict], str]]:
    """(prompt messages, expected answer) per row: the last message is the assistant's answer."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            messages = json.loads(line)["messages"]
            if messages[-1]["role"] != "assistant":
                raise ValueError(f"{path}: last message must be the assistant's answer: {line[:200]}")
            rows.append((messages[:-1], messages[-1]["content"]))
    return rows


def exact_match(
    model_dir: str | Path,
    heldout_path: str | Path,
    adapter_dir: str | Path | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 1,
) -> tuple[int, int, list[tuple[str, str, str]]]:
    """Return (n_correct, n_total, [(prompt, expected, got), ...]).

    batch_size 1 by default: with padding, batched greedy decoding can differ from one prompt at a time in rare
    near-ties, and an evaluation should not depend on how prompts were grouped. Larger batches are faster.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The adapter directory holds the tokenizer the trainer used (it may differ from the base's, e.g. a pad token).
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if _has_tokenizer(adapter_dir) else model_dir)
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so every prompt ends where generation starts
    # float32 pinned: the same answers on CPUs with and without native bf16.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)  # not merged: evaluate the adapter as saved
    model.eval()

    rows = load_rows(heldout_path)
    results = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for messages, _ in batch
        ]
        # The template already wrote every special token; do not let the tokenizer add a bos of its own.
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        for (messages, expected), ids in zip(batch, out[:, enc["input_ids"].shape[1] :]):
            got = tokenizer.decode(ids, skip_special_tokens=True).strip()
            results.append((messages[-1]["content"], expected, got))
    n_correct = sum(expected.strip() == got for _, expected, got in results)
    return n_correct, len(results), results


def _has_tokenizer(adapter_dir: str | Path | None) -> bool:
    return adapter_dir is not None and any(
        (Path(adapter_dir) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("heldout")
    parser.add_argument("--adapter")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    t0 = time.monotonic()
    n_correct, n_total, results = exact_match(
        args.model_dir, args.heldout, args.adapter, args.max_new_tokens, args.batch_size
    )
    for prompt, expected, got in results:
        mark = "OK  " if got == expected.strip() else "MISS"
        print(f"{mark} {prompt}\n     expected: {expected}\n     got:      {got!r}")
    print(f"exact match: {n_correct}/{n_total} ({time.monotonic() - t0:.1f} s)")


if __name__ == "__main__":
    main()
