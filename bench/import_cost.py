"""Airflow-side import cost: the operator module against KubernetesPodOperator's, measured in the same run.

Each sample is a fresh interpreter that has already imported airflow.sdk (what any DAG file pays anyway) and then
imports the module; the two modules alternate so machine noise hits both alike. Prints medians and the ratio last.

    .venv/bin/python bench/import_cost.py [--samples 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

MODULES = {
    "LoRATrainingOperator": "airflow_provider_lora.operators.lora",
    "KubernetesPodOperator": "airflow.providers.cncf.kubernetes.operators.pod",
}
HEAVY = ("torch", "transformers", "datasets", "unsloth", "kfp", "matplotlib", "pandas")
PROBE = """
import sys, time, json, importlib
import airflow.sdk
start = time.perf_counter()
importlib.import_module({module!r})
elapsed = time.perf_counter() - start
print(json.dumps({{"seconds": elapsed, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def sample(module: str) -> dict:
    code = PROBE.format(module=module, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in MODULES}
    heavy: dict[str, set[str]] = {name: set() for name in MODULES}
    for _ in range(args.samples):
        for name, module in MODULES.items():
            result = sample(module)
            times[name].append(result["seconds"])
            heavy[name].update(result["heavy"])
    for name in MODULES:
        print(f"{name:24s} median {statistics.median(times[name]) * 1000:7.1f} ms over {args.samples} samples; "
              f"heavy modules imported: {sorted(heavy[name]) or 'none'}")
    ratio = statistics.median(times["LoRATrainingOperator"]) / statistics.median(times["KubernetesPodOperator"])
    print(f"ratio LoRATrainingOperator / KubernetesPodOperator import time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
