"""Airflow-side cost: the operator module and the example DAG against KubernetesPodOperator, in the same run.

- Import: each sample is a fresh interpreter that has already imported airflow.sdk (what any DAG file pays anyway)
  and then imports the module.
- DAG parse: each sample is a fresh interpreter that has already imported DagBag and then parses one DAG file with
  ``DagBag(dag_folder=file)``, as the DAG processor does: dags/lora_finetune.py (the example
  DAG, with its trigger form of every parameter) against a DAG file with one KubernetesPodOperator.
- Heavy modules: which of torch, transformers, datasets, unsloth, kfp, matplotlib, pandas are in sys.modules after
  the import or the parse (must be none).

The two sides alternate so machine noise hits both alike. Prints medians, and the ratios last.

    .venv/bin/python bench/import_cost.py [--samples 7]
    .venv/bin/python bench/import_cost.py --quick      # 2 samples (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

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
PARSE_PROBE = """
import sys, time, json
from airflow.dag_processing.dagbag import DagBag
start = time.perf_counter()
bag = DagBag(dag_folder={path!r})
elapsed = time.perf_counter() - start
assert bag.dags and not bag.import_errors, (sorted(bag.dags), bag.import_errors)
print(json.dumps({{"seconds": elapsed, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""
KPO_DAG = """
import datetime

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import DAG

with DAG(dag_id="kpo_example", schedule=None, start_date=datetime.datetime(2026, 1, 1), catchup=False) as dag:
    KubernetesPodOperator(task_id="train", name="train", image="python:3.11", cmds=["python", "-c", "print(1)"])
"""


def _probe(code: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode:
        raise SystemExit(f"probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sample(module: str) -> dict:
    return _probe(PROBE.format(module=module, heavy=HEAVY))


def parse_sample(path: Path, env: dict[str, str]) -> dict:
    return _probe(PARSE_PROBE.format(path=str(path), heavy=HEAVY), env)


def report(name: str, times: list[float], heavy: set[str], what: str) -> None:
    print(f"{name:24s} {what} median {statistics.median(times) * 1000:7.1f} ms over {len(times)} samples; "
          f"heavy modules imported: {sorted(heavy) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 samples (CI smoke)")
    args = parser.parse_args()
    if args.quick:
        args.samples = 2
    times: dict[str, list[float]] = {name: [] for name in MODULES}
    heavy: dict[str, set[str]] = {name: set() for name in MODULES}
    for _ in range(args.samples):
        for name, module in MODULES.items():
            result = sample(module)
            times[name].append(result["seconds"])
            heavy[name].update(result["heavy"])

    with tempfile.TemporaryDirectory(prefix="bench-parse-") as tmp:
        kpo_dag = Path(tmp) / "dags" / "kpo_example.py"
        kpo_dag.parent.mkdir()
        kpo_dag.write_text(KPO_DAG)
        # A private Airflow home: parsing reads the configuration, and nothing here should touch the user's.
        env = {**os.environ, "AIRFLOW_HOME": str(Path(tmp) / "airflow"),
               "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING"}
        dag_files = {"lora_finetune.py": REPO / "dags" / "lora_finetune.py", "kpo_example.py": kpo_dag}
        parse_times: dict[str, list[float]] = {name: [] for name in dag_files}
        parse_heavy: dict[str, set[str]] = {name: set() for name in dag_files}
        for _ in range(args.samples):
            for name, path in dag_files.items():
                result = parse_sample(path, env)
                parse_times[name].append(result["seconds"])
                parse_heavy[name].update(result["heavy"])

    for name in MODULES:
        report(name, times[name], heavy[name], "import")
    for name in dag_files:
        report(name, parse_times[name], parse_heavy[name], "DAG parse")
    ratio = statistics.median(times["LoRATrainingOperator"]) / statistics.median(times["KubernetesPodOperator"])
    parse_ratio = statistics.median(parse_times["lora_finetune.py"]) / statistics.median(parse_times["kpo_example.py"])
    print(f"ratio LoRATrainingOperator / KubernetesPodOperator import time: {ratio:.2f}x")
    print(f"ratio lora_finetune.py / kpo_example.py DAG parse time: {parse_ratio:.2f}x")


if __name__ == "__main__":
    main()
