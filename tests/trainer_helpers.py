"""Small shared pieces for the trainer tests: a learnable dataset and a one-call training run on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from airflow_provider_lora.core.spec import LoRASpec

# Fast settings for the 5M-parameter tiny model: 8 rows per optimizer step, short sequences, float32 so numbers
# are the same on every CPU (bf16 is picked automatically only where the CPU has it).
FAST = dict(effective_batch_size=8, max_seq_len=64, max_tokens_per_gpu=256, num_epochs=1, learning_rate=2e-3,
            lr_warmup_steps=0, dtype="float32")


def arithmetic_rows(n: int = 48) -> list[dict[str, Any]]:
    """Chat rows of a task a tiny model learns within a few steps."""
    return [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a, b in ((i % 7, i % 5) for i in range(n))]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_spec(model_dir: Path, dataset: Path | str, output: Path | str, **overrides: Any) -> LoRASpec:
    return LoRASpec.parse({**FAST, "base_model": str(model_dir), "dataset": str(dataset), "output_uri": str(output),
                           **overrides})


def train(model_dir: Path, dataset: Path | str, output: Path | str, **overrides: Any):
    """Train in this process and return the trainer's Outcome (summary, model, tokenizer)."""
    from lora_trainer.train import run

    return run(make_spec(model_dir, dataset, output, **overrides))


def history(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def card_images(adapter_dir: Path) -> list[Path]:
    """The images the adapter's model card (README.md) links, resolved against the card's own directory, as a
    Markdown viewer (the Hugging Face Hub, a file browser) resolves them."""
    text = (Path(adapter_dir) / "README.md").read_text()
    return [(Path(adapter_dir) / target).resolve() for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)]
