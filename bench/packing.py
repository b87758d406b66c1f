"""Packing: share of real (non-pad) tokens and optimizer steps per epoch, with and without packing.

The dataset is generated chat rows whose prompt and answer lengths follow lognormal distributions (many short turns,
a long tail of long ones, as in real instruction data). The rows go through the trainer's own data path
(``lora_trainer.data.prepare``: chat template, assistant mask, truncation to max_seq_len) with the tiny offline
tokenizer of tests/fixtures/tiny_model.py, and the counts come from ``lora_trainer.data.packing_stats``, which packs
with trl's own packer (best-fit decreasing, what SFTTrainer uses with ``packing=True``). Counting needs no model and
no GPU. Without packing every micro-batch is padded to its longest row; with packing, micro-batches of packed
sequences are padded the same way (a conservative count: the trainer also sets padding_free on a GPU, which removes
that padding too).

    .venv/bin/python bench/packing.py [--rows 2000] [--max-seq-len 2048] [--effective-batch-size 16]
    .venv/bin/python bench/packing.py --quick

The last lines are the real-token shares and the ratio of optimizer steps per epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("the a river market garden window train house sky cat dog teacher farmer walks looks writes dreams talks "
         "runs paints every morning after lunch rain smile dinner sunday green blue open old young small").split()


def lognormal_rows(n: int, seed: int) -> list[dict]:
    """Chat rows; prompt words ~ lognormal(median 40), answer words ~ lognormal(median 90, wide tail)."""
    rng = random.Random(seed)

    def text(median: float, sigma: float) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.lognormvariate(math.log(median), sigma)))))

    return [{"messages": [{"role": "user", "content": text(40, 0.8)},
                          {"role": "assistant", "content": text(90, 1.0)}]} for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--effective-batch-size", type=int, default=16)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="200 rows (CI smoke)")
    args = parser.parse_args()
    if args.quick:
        args.rows = 200

    from airflow_provider_lora.core.spec import LoRASpec, plan_batches
    from lora_trainer import data as data_lib
    from tests.fixtures.tiny_model import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        dataset = Path(tmp) / "rows.jsonl"
        dataset.write_text("".join(json.dumps(r) + "\n" for r in lognormal_rows(args.rows, args.seed)))
        spec = LoRASpec.parse({"base_model": "tiny", "dataset": str(dataset), "output_uri": str(Path(tmp) / "out"),
                               "max_seq_len": args.max_seq_len, "effective_batch_size": args.effective_batch_size,
                               "max_tokens_per_gpu": args.max_tokens_per_gpu, "seed": args.seed})
        prepared = data_lib.prepare(spec, train_tokenizer(), is_main_process=True, wait_for_main=lambda: None,
                                    log=lambda message: None)
    plan = plan_batches(spec, world_size=1)
    lengths = [len(ids) for ids in prepared.train["input_ids"]]
    stats = data_lib.packing_stats(lengths, max_seq_len=spec.max_seq_len, micro_batch=plan.micro_batch)
    steps_unpacked = math.ceil(stats["rows"] / spec.effective_batch_size)
    steps_packed = math.ceil(stats["sequences_packed"] / spec.effective_batch_size)
    q = sorted(lengths)
    print(f"{stats['rows']} rows, tokens per row: median {q[len(q) // 2]}, p90 {q[int(0.9 * len(q))]}, max {q[-1]} "
          f"(max_seq_len {spec.max_seq_len}, {prepared.stats['truncated_rows']} truncated); "
          f"micro-batch {plan.micro_batch} x {plan.grad_accum} accumulation = effective batch "
          f"{spec.effective_batch_size}")
    print(f"without packing: {stats['rows']} sequences, {steps_unpacked} optimizer steps per epoch")
    print(f"with packing:    {stats['sequences_packed']} sequences, {steps_packed} optimizer steps per epoch")
    print(f"real-token share without packing: {stats['real_token_share_unpacked']:.1%}")
    print(f"real-token share with packing: {stats['real_token_share_packed']:.1%}")
    print(f"ratio optimizer steps per epoch without / with packing: {steps_unpacked / steps_packed:.2f}x")


if __name__ == "__main__":
    main()
