"""The provider installs beside a managed Airflow's pinned set (MWAA, Cloud Composer, Astronomer).

Managed services install user requirements under the constraints of their environment: nothing already installed may
move. Each case builds a venv holding one Airflow 3 release and its cncf-kubernetes provider, freezes it as the
"managed" pins, then runs ``pip install .`` (with our dependencies) constrained by that freeze, and checks that
pip check passes, nothing pinned moved, no ML library came along, and Airflow itself discovers the provider.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]

# (Airflow, cncf-kubernetes): the set CI uses, and older Airflow 3 lines, as managed services lag behind.
MANAGED_SETS = [("3.3.2", "10.25.0"), ("3.1.8", "10.12.4"), ("3.0.6", "10.7.0")]
HEAVY = {"torch", "transformers", "datasets", "unsloth", "unsloth-zoo", "peft", "trl", "kfp", "bitsandbytes"}


def test_base_dependencies_are_loose_ranges_without_ml_libraries():
    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    names = {d.name for d in deps}
    assert {"apache-airflow", "apache-airflow-providers-cncf-kubernetes"} <= names
    assert not names & HEAVY
    for dep in deps:
        operators = {spec.operator for spec in dep.specifier}
        assert operators and not operators & {"==", "===", "~="}, f"{dep}: use a range, not a pin"


def _freeze(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                         check=True).stdout
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out)}


@pytest.mark.slow
@pytest.mark.parametrize(("airflow", "cncf"), MANAGED_SETS)
def test_installs_beside_a_pinned_airflow(tmp_path, airflow, cncf):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", AIRFLOW_HOME=str(tmp_path / "airflow-home"),
               AIRFLOW__CORE__LOAD_EXAMPLES="False")

    def run(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(python), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=timeout)
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    # The managed environment: one Airflow release and its cncf provider, resolved by pip, then frozen. No bytecode
    # compiled at install (--no-compile: what gets installed is the same; that step was half of each case's time).
    run("-m", "pip", "install", "-q", "--no-compile", f"apache-airflow=={airflow}",
        f"apache-airflow-providers-cncf-kubernetes=={cncf}")
    managed = _freeze(python)
    pins = tmp_path / "managed-constraints.txt"
    pins.write_text("".join(f"{name}=={version}\n" for name, version in managed.items()))

    # What a user's requirements line does there: install the provider with its dependencies, under the pins.
    run("-m", "pip", "install", "-q", "--no-compile", "-c", str(pins), str(REPO))
    run("-m", "pip", "check")
    after = _freeze(python)
    assert {n: v for n, v in managed.items() if after.get(n) != v} == {}, "the provider moved a managed pin"
    assert set(after) - set(managed) == {"airflow-provider-lora"}
    assert not set(after) & HEAVY

    # Airflow finds the provider through its entry point; the operator, trigger and plugin import; no ML imports.
    code = (
        "import sys\n"
        "from airflow.providers_manager import ProvidersManager\n"
        "pm = ProvidersManager(); pm.initialize_providers_list()\n"
        "info = pm.providers['airflow-provider-lora']\n"
        "from airflow_provider_lora.operators.lora import LoRATrainingOperator\n"
        "from airflow_provider_lora.triggers.lora import LoRATrainingTrigger\n"
        "from airflow_provider_lora.plugins.loss_chart import LoRAPlugin\n"
        "from importlib.metadata import entry_points\n"
        "plugins = [e.value for e in entry_points(group='airflow.plugins')]\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'datasets', 'unsloth', "
        "'kfp', 'peft', 'trl'})\n"
        "print(info.version, info.data['package-name'], plugins, heavy)\n"
    )
    out = run("-c", code).stdout.strip().splitlines()[-1]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert out == f"{version} airflow-provider-lora ['airflow_provider_lora.plugins.loss_chart:LoRAPlugin'] []", out
