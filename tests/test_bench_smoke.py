"""Smoke runs of the benchmarks in bench/: each script's --quick mode (gpu.sh: --tiny) exits 0 and prints its ratio
line(s) with a finite number. Benchmarks are not timed tests: no speed is asserted here, only that each one runs from
this checkout and reports. The figures themselves are in docs/performance.md."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
NUMBER = r"([-+0-9.eE]+|nan|inf)"


def run_bench(argv: list[str], tmp_path: Path, timeout: float = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PY": PYTHON, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{output[-4000:]}"
    return proc.stdout


def ratio(stdout: str, label: str) -> float:
    """The number on the line that starts with ``label`` (e.g. 'ratio ... :'), which must be finite."""
    match = re.search(re.escape(label) + r"\s*" + NUMBER, stdout)
    assert match, f"no line {label!r} in the output:\n{stdout[-3000:]}"
    value = float(match.group(1))
    assert math.isfinite(value) and value > 0, f"{label} {value} is not a finite positive number"
    return value


def test_import_cost_quick(tmp_path):
    out = run_bench([PYTHON, "bench/import_cost.py", "--quick"], tmp_path)
    ratio(out, "ratio LoRATrainingOperator / KubernetesPodOperator import time:")
    ratio(out, "ratio lora_finetune.py / kpo_example.py DAG parse time:")
    # Not a speed: the Airflow side must not import ML libraries, at import or at DAG parse.
    ours = [line for line in out.splitlines() if line.startswith(("LoRATrainingOperator", "lora_finetune.py"))]
    assert len(ours) == 2 and all(line.endswith("heavy modules imported: none") for line in ours), out


def test_packing_quick(tmp_path):
    out = run_bench([PYTHON, "bench/packing.py", "--quick"], tmp_path)
    packed = ratio(out, "real-token share with packing:")
    unpacked = ratio(out, "real-token share without packing:")
    assert packed <= 100 and unpacked <= 100
    ratio(out, "ratio optimizer steps per epoch without / with packing:")


@pytest.mark.slow
def test_triggerer_load_quick(tmp_path):
    out = run_bench([PYTHON, "bench/triggerer_load.py", "--quick"], tmp_path)
    ratio(out, "ratio KubernetesPodTrigger / LoRATrainingTrigger CPU s per trigger-minute at 10 pods:")
    ratio(out, "ratio LoRATrainingTrigger(watch=False) / LoRATrainingTrigger requests per second at 10 pods:")
    ratio(out, "ratio KubernetesPodTrigger / LoRATrainingTrigger(watch=False) CPU s per 1,000 polls at 10 pods:")


@pytest.mark.slow
def test_trainer_throughput_quick(tmp_path):
    out = run_bench([PYTHON, "bench/trainer_throughput.py", "--quick", "--out", str(tmp_path / "out")], tmp_path)
    ratio(out, "ratio ours / baseline tokens/s:")
    ratio(out, "ratio ours / baseline peak RSS:")
    assert (tmp_path / "out" / "trainer_loss_curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_gpu_script_tiny_on_cpu(tmp_path):
    out = run_bench(["bash", "bench/gpu.sh", "--tiny"], tmp_path)
    ratio(out, "ratio unsloth / transformers+peft tokens/s:")


@pytest.mark.slow
def test_memory_estimate_quick(tmp_path):
    out = run_bench([PYTHON, "bench/memory_estimate.py", "--quick"], tmp_path)
    ratio(out, "ratio estimate / measured peak: min")
    assert re.search(r"within 0\.8-1\.25x: \d+ of 2\n", out), out[-3000:]  # both quick configurations ran
