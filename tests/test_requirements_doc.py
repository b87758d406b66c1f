"""docs/requirements.md states only what pyproject.toml declares and what CI installs or emulates: each "Needs" cell
equals the declared range, each "Tested with" version is a pin of .ci/constraints-*.txt or a set of
tests/test_managed_install.py, the emulated Kubernetes and Trainer versions are the emulator's."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "requirements.md").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / name).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            package, version = line.split("==")
            pins[package.strip().lower().replace("_", "-")] = version.split("+")[0].strip()
    return pins


CPU, AF2, KFP = _pins("constraints-cpu.txt"), _pins("constraints-airflow2.txt"), _pins("constraints-kfp.txt")


def _rows() -> dict[str, tuple[str, str]]:
    """First cell (its first word, the package or component) -> (Needs, Tested with), over every table."""
    rows = {}
    for line in DOC.splitlines():
        if not line.startswith("| ") or line.startswith("| Component") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, line
        key = cells[0].split(",")[0].split(" (")[0]
        rows.setdefault(key, (cells[1], cells[2]))  # Python appears twice: the Airflow side's row is checked
    return rows


def _declared() -> dict[str, str]:
    """package -> specifier, from the dependencies and every extra."""
    requirements = [*PYPROJECT["dependencies"],
                    *(r for extra in PYPROJECT["optional-dependencies"].values() for r in extra)]
    out = {}
    for text in requirements:
        req = Requirement(text)
        out.setdefault(req.name, ",".join(sorted(str(s) for s in req.specifier)))
    return out


def test_needs_are_the_declared_ranges():
    rows, declared = _rows(), _declared()
    assert rows["Python"][0] == f"`{PYPROJECT['requires-python']}`"
    checked = 0
    for name, (needs, _) in rows.items():
        if name in declared:
            spec = re.match(r"`([^`]+)`", needs)[1]
            assert ",".join(sorted(spec.split(","))) == declared[name], name
            checked += 1
    assert checked >= 10


def test_each_extra_named_exists():
    extras = set(PYPROJECT["optional-dependencies"])
    named = re.findall(r"extra `\[(\w+)\]`", DOC)
    assert "amazon" in named and set(named) <= extras
    assert Requirement(PYPROJECT["optional-dependencies"]["amazon"][0]).name == "apache-airflow-providers-amazon"


def test_tested_versions_are_what_ci_installs():
    rows = _rows()
    for name in ("apache-airflow-providers-common-compat", "pydantic", "apache-airflow-providers-amazon",
                 "torch", "transformers", "peft", "trl", "unsloth"):
        assert rows[name][1].split(" ")[0] == CPU[name], name
    airflow = rows["apache-airflow"][1]
    assert airflow.startswith(f"{CPU['apache-airflow']} (the whole suite); {AF2['apache-airflow']} (")
    cncf = rows["apache-airflow-providers-cncf-kubernetes"][1]
    assert cncf.startswith(f"{CPU['apache-airflow-providers-cncf-kubernetes']} ")
    assert AF2["apache-airflow-providers-cncf-kubernetes"] == CPU["apache-airflow-providers-cncf-kubernetes"]
    assert rows["kfp"][1] == KFP["kfp"]
    assert rows["kubernetes / kubernetes_asyncio"][1] == f"{CPU['kubernetes']} / {CPU['kubernetes-asyncio']}"


def test_the_install_check_sets_are_the_ones_tested():
    from tests.test_managed_install import MANAGED_SETS

    rows = _rows()
    for airflow, cncf in MANAGED_SETS:
        assert airflow in rows["apache-airflow"][1]
        assert cncf in rows["apache-airflow-providers-cncf-kubernetes"][1]
    # Every Airflow version the doc names is installed somewhere in CI.
    named = set(re.findall(r"\b\d+\.\d+\.\d+\b", rows["apache-airflow"][1]))
    assert named == {CPU["apache-airflow"], AF2["apache-airflow"], *(a for a, _ in MANAGED_SETS)}


def test_python_is_the_one_the_setup_and_the_image_use():
    assert _rows()["Python"][1] == "3.11"
    assert "Python 3.11" in (REPO / "README.md").read_text()
    assert "uv python install 3.11" in (REPO / "trainer" / "Dockerfile").read_text()


def test_cluster_versions_are_the_emulators():
    from tests.test_k8s_validation import TRAINER_RELEASES

    rows = _rows()
    trainer = rows["Kubeflow Trainer"][1]
    releases = [release for release, _ in TRAINER_RELEASES]
    assert re.findall(r"v\d+\.\d+\.\d+", trainer.split(";")[0]) == releases
    default = re.search(r'trainer_version: str \| None = "([^"]+)"',
                        (REPO / "tests" / "k8s" / "emulator.py").read_text())[1]
    assert trainer.endswith(f"run end to end on emulated {default}")
    assert "Kubernetes 1.33 schemas" in rows["Kubernetes"][1]
    assert "refuses what a real API server\n(1.33) refuses" in (REPO / "tests" / "k8s" / "emulator.py").read_text()


def test_the_driver_requirement_is_the_images():
    dockerfile = (REPO / "trainer" / "Dockerfile").read_text()
    cuda = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+\.\d+)", dockerfile, re.M)
    needs = _rows()["NVIDIA driver"][0]
    assert f"CUDA {cuda[1]} (driver 580 or newer)" in needs and f"CUDA {cuda[1]}.{cuda[2]} base" in needs
    assert "driver 580 or newer" in dockerfile


def test_the_readme_states_the_same_support():
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| [requirements](docs/requirements.md)"))
    python = PYPROJECT["requires-python"].removeprefix(">=")
    airflow = Requirement(next(d for d in PYPROJECT["dependencies"] if d.startswith("apache-airflow>"))).specifier
    assert f"Python {python}+" in row and f"Airflow {str(airflow).removeprefix('>=')}+" in row
    assert f"(tested: {CPU['apache-airflow']}, {AF2['apache-airflow']})" in row
