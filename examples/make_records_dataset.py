"""Write the synthetic "records -> JSON" task used by the demo: examples/data/records_{train,heldout}.jsonl.

    user:      Convert to JSON: name=Alice; age=31; city=Paris
    assistant: {"name": "Alice", "age": 31, "city": "Paris"}

Why this task: SmolLM2-135M-Instruct gets it almost right out of the box but never exactly (it pretty-prints, quotes
numbers or adds an explanation), and a LoRA learns the exact format in about 30 steps on CPU, so "before" and "after"
are visibly different by exact match. Keys (2-4 of 10, in random order), names and numbers vary; numbers must come
out unquoted, strings quoted, in the order given, on one line, and then the answer must stop.

Deterministic (seeded): running it again rewrites identical files. Held-out prompts never occur in the train set.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261128
N_TRAIN = 200
N_HELDOUT = 10
OUT_DIR = Path(__file__).parent / "data"

NAMES = [
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Karl", "Lena", "Mallory",
    "Nina", "Oscar", "Peggy", "Quinn", "Rosa", "Sam", "Trent", "Uma", "Victor", "Wendy", "Xavier", "Yara", "Zoe",
]  # fmt: skip
CITIES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Oslo", "Vienna", "Lisbon", "Dublin", "Prague", "Tokyo", "Lima",
    "Cairo", "Toronto", "Sydney", "Nairobi", "Seoul", "Quito", "Athens", "Warsaw",
]  # fmt: skip
COUNTRIES = ["France", "Spain", "Italy", "Norway", "Japan", "Peru", "Egypt", "Canada", "Kenya", "Chile", "Greece"]
JOBS = ["teacher", "engineer", "nurse", "baker", "pilot", "farmer", "lawyer", "painter", "chemist", "plumber"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "teal"]
PETS = ["cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "horse"]

# key -> value generator; ints are written without quotes in JSON, which is the part the base model gets wrong.
FIELDS = {
    "name": lambda r: r.choice(NAMES),
    "age": lambda r: r.randint(18, 90),
    "city": lambda r: r.choice(CITIES),
    "country": lambda r: r.choice(COUNTRIES),
    "job": lambda r: r.choice(JOBS),
    "color": lambda r: r.choice(COLORS),
    "id": lambda r: r.randint(1000, 9999),
    "score": lambda r: r.randint(0, 100),
    "year": lambda r: r.randint(1950, 2025),
    "pet": lambda r: r.choice(PETS),
}


def make_row(rng: random.Random) -> dict:
    keys = rng.sample(sorted(FIELDS), rng.randint(2, 4))
    if "name" not in keys and rng.random() < 0.7:  # most records are about someone, like real ones
        keys[rng.randrange(len(keys))] = "name"
    record = {key: FIELDS[key](rng) for key in keys}
    prompt = "Convert to JSON: " + "; ".join(f"{k}={v}" for k, v in record.items())
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": json.dumps(record)},  # {"k": "v", "n": 1}: json's default spacing
        ]
    }


def make_rows(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < N_TRAIN + N_HELDOUT:
        row = make_row(rng)
        prompt = row["messages"][0]["content"]
        if prompt not in seen:  # unique prompts, so held-out rows never appear in train
            seen.add(prompt)
            rows.append(row)
    return rows[:N_TRAIN], rows[N_TRAIN:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    train, heldout = make_rows()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT_DIR / "records_train.jsonl", train)
    write_jsonl(OUT_DIR / "records_heldout.jsonl", heldout)
    print(f"wrote {len(train)} train and {len(heldout)} held-out rows to {OUT_DIR}")


if __name__ == "__main__":
    main()
