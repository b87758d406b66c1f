"""Every code example in README.md and docs/*.md is exercised, so the docs cannot drift from the code.

How each fenced block is checked (the marker is an HTML comment on the line right before the fence):

- ``python``: executed, each block in a fresh interpreter (a block importing kfp in .venv-kfp, where kfp lives). With ``<!-- docs-test: parse-only: REASON -->`` (a block
  that needs a cluster, a GPU or a DAG around it) it is only compiled. Either way every keyword argument given to
  ``LoRATrainingOperator(...)`` / ``LoRATrainingTrigger(...)`` must exist in its signature, and literal values of
  spec fields must pass ``LoRASpec`` validation.
- ``bash``: with ``<!-- docs-test: run -->`` the block runs in a temporary copy of the checkout's tracked files
  (the venv first on PATH);
  otherwise each command is checked: ``make T`` must be a target (``make -n``), ``lora-train``/``python -m
  lora_trainer`` flags must parse into a valid spec, ``pip install`` arguments must be valid requirements or
  existing paths (extras must exist), files named by ``-f``/``--file`` must exist, and any other program must be
  on PATH or one of EXTERNAL_TOOLS (programs of a cluster or a cloud, absent here on purpose).
- ``yaml``: parsed (every document); Kubernetes RBAC rules name only known verbs.
- ``pip-requirements``: every line is a valid requirement; our distribution's line admits the current version.
- no language, or ``text``: output or a layout, shown as is.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

MARKER = re.compile(r"^<!-- docs-test: (?P<mode>[a-z-]+)(?:: (?P<reason>.+?))? -->$")
MODES = {"python": {"parse-only"}, "bash": {"run"}, "yaml": set(), "pip-requirements": set()}
# Programs the docs tell users to run against their own cluster, cloud or registry; none is installed here.
EXTERNAL_TOOLS = {"docker", "kubectl", "gcloud", "aws", "astro", "helm"}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mode: str | None
    reason: str | None

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})([\w-]*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        out.append(Block(path, i + 1, fence.group(2), "\n".join(lines[i + 1:end]) + "\n",
                         marker and marker.group("mode"), marker and marker.group("reason")))
        i = end + 1
    return out


ALL_BLOCKS = [b for path in DOC_FILES for b in blocks_of(path)]


def _blocks(lang: str) -> list:
    return [pytest.param(b, id=str(b)) for b in ALL_BLOCKS if b.lang == lang]


# ---- markers ------------------------------------------------------------------------------------------------------

def test_every_marker_is_known_has_a_reason_and_precedes_a_fence():
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if "docs-test:" not in line:
                continue
            m = MARKER.match(line.strip())
            assert m, f"{path.name}:{n + 1}: malformed marker {line!r}"
            assert n + 1 < len(lines) and lines[n + 1].startswith("```"), f"{path.name}:{n + 1}: not before a fence"
            lang = lines[n + 1].strip("`").strip()
            assert m.group("mode") in MODES.get(lang, set()), f"{path.name}:{n + 1}: {m.group('mode')} for {lang}"
            if m.group("mode") == "parse-only":
                assert m.group("reason"), f"{path.name}:{n + 1}: say why the block cannot run"


def test_every_block_has_a_checked_language():
    # A fence without a language (or ``text``) shows output or a layout, not code to run.
    unchecked = [str(b) for b in ALL_BLOCKS if b.lang not in MODES and b.lang not in ("", "text")]
    assert not unchecked, f"fences in a language this test does not check: {unchecked}"
    assert len(ALL_BLOCKS) >= 10  # the parser found the docs' blocks


# ---- python -------------------------------------------------------------------------------------------------------

def _accepted_kwargs(callee: str) -> set[str]:
    from airflow_provider_lora.compat import BaseOperator
    from airflow_provider_lora.operators.lora import LoRATrainingOperator
    from airflow_provider_lora.triggers.lora import LoRATrainingTrigger

    if callee == "LoRATrainingTrigger":
        return set(inspect.signature(LoRATrainingTrigger.__init__).parameters) - {"self"}
    own = set(inspect.signature(LoRATrainingOperator.__init__).parameters)
    base = set(inspect.signature(BaseOperator.__init__).parameters)
    return (own | base) - {"self", "kwargs", "args"}


def check_calls(code: str, where: str) -> int:
    """Keyword arguments of operator/trigger calls exist; literal spec values validate. Returns calls checked."""
    from airflow_provider_lora.core.spec import LoRASpec, SpecError

    checked = 0
    for node in ast.walk(ast.parse(code)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if name not in ("LoRATrainingOperator", "LoRATrainingTrigger"):
            continue
        checked += 1
        accepted = _accepted_kwargs(name)
        unknown = [kw.arg for kw in node.keywords if kw.arg is not None and kw.arg not in accepted]
        assert not unknown, f"{where}: {name} has no parameter {unknown}"
        literals = {}
        for kw in node.keywords:
            if kw.arg in LoRASpec.model_fields:
                try:
                    value = ast.literal_eval(kw.value)
                except ValueError:
                    continue
                if not (isinstance(value, str) and "{{" in value):
                    literals[kw.arg] = value
        try:
            LoRASpec.parse(literals)
        except SpecError as exc:
            raise AssertionError(f"{where}: {exc}") from None
    return checked


KFP_PYTHON = REPO / ".venv-kfp" / "bin" / "python"


def imports_kfp(code: str) -> bool:
    for node in ast.walk(ast.parse(code)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "kfp" or n.startswith("kfp.") for n in names):
            return True
    return False


@pytest.mark.parametrize("block", _blocks("python"))
def test_python_block(block, tmp_path):
    compile(block.code, str(block), "exec")
    check_calls(block.code, str(block))
    if block.mode == "parse-only":
        return
    python = sys.executable
    if imports_kfp(block.code):  # kfp never shares the Airflow venv (kubernetes<31): run it in .venv-kfp
        if not KFP_PYTHON.exists():
            if os.environ.get("CI"):
                pytest.fail(".venv-kfp is missing in CI: `make test` builds it (target .venv-kfp/.installed)")
            pytest.skip(".venv-kfp is missing: `make .venv-kfp/.installed` builds it")
        python = str(KFP_PYTHON)
    # A fresh interpreter, as a user's: nothing imported by the test session leaks in.
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow-home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    proc = subprocess.run([python, "-c", block.code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{block}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_check_calls_catches_a_wrong_kwarg_and_a_bad_value():
    with pytest.raises(AssertionError, match="no parameter"):
        check_calls("LoRATrainingOperator(task_id='t', training_lora_r=8)", "x")
    with pytest.raises(AssertionError, match="lora_r"):
        check_calls("LoRATrainingOperator(task_id='t', lora_r=0)", "x")
    assert check_calls("op = LoRATrainingOperator(..., lora_r=8, dataset='{{ params.d }}')", "x") == 1


# ---- bash ---------------------------------------------------------------------------------------------------------

def _commands(code: str) -> list[list[str]]:
    """Shell commands of a block: continuation lines joined, comments dropped, split on && ; |."""
    text = code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        for part in re.split(r"&&|;|\|", line):
            words = shlex.split(part, comments=True)
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words = words[1:]  # VAR=value prefixes
            if words:
                out.append(words)
    return out


def _extras() -> set[str]:
    return set(PYPROJECT["project"]["optional-dependencies"])


def check_command(words: list[str], where: str) -> None:
    program = words[0]
    if program == "make":
        for target in [w for w in words[1:] if not w.startswith("-") and "=" not in w]:
            proc = subprocess.run(["make", "-n", "-C", str(REPO), target], capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 0, f"{where}: make {target}: {proc.stderr}"
        return
    if program == "lora-train" or words[:3] == ["python", "-m", "lora_trainer"]:
        from airflow_provider_lora.core.spec import SpecError
        from lora_trainer.__main__ import build_parser, spec_from_args

        args = words[1:] if program == "lora-train" else words[3:]
        try:
            spec_from_args(build_parser().parse_args(args))
        except SystemExit as exc:
            raise AssertionError(f"{where}: {' '.join(words)}: exits {exc.code}") from None
        except SpecError as exc:
            raise AssertionError(f"{where}: {' '.join(words)}: {exc}") from None
        assert (VENV_BIN / "lora-train").exists() or program != "lora-train", f"{where}: no lora-train script"
        return
    if program == "pip" or words[:3] == ["python", "-m", "pip"]:
        args = words[1:] if program == "pip" else words[3:]
        assert args[0] == "install", f"{where}: {words}"
        for arg in args[1:]:
            if arg.startswith("-"):
                continue
            if arg.startswith((".", "/")) or Path(arg).exists():
                path, _, extras = arg.partition("[")
                assert (REPO / path).exists(), f"{where}: {arg}: no such path"
                assert set(extras.rstrip("]").split(",")) - {""} <= _extras(), f"{where}: {arg}: unknown extra"
                continue
            req = Requirement(arg)
            if req.name == PYPROJECT["project"]["name"]:
                assert req.extras <= _extras(), f"{where}: {arg}: unknown extra"
        return
    for flag in ("-f", "--file"):
        if flag in words:
            target = words[words.index(flag) + 1]
            assert (REPO / target).exists() or target.startswith(("http", "-")) or "/" not in target, \
                f"{where}: {target} does not exist"
    if program in EXTERNAL_TOOLS:
        return
    assert shutil.which(program, path=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"), \
        f"{where}: {program} is not on PATH"


@pytest.mark.parametrize("block", _blocks("bash"))
def test_bash_block(block, tmp_path):
    if block.mode == "run":
        # In a copy of the checkout's tracked files, as a user runs it from a clone.
        checkout = tmp_path / "checkout"
        for name in subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True,
                                   check=True).stdout.split("\0"):
            if name and (REPO / name).is_file():
                (checkout / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, checkout / name)
        env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
               "AIRFLOW_HOME": str(tmp_path / "airflow-home")}
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{block}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return
    commands = _commands(block.code)
    assert commands, f"{block}: no command"
    for words in commands:
        check_command(words, str(block))


def test_check_command_catches_mistakes(tmp_path):
    for bad in (["make", "no-such-target"], ["lora-train", "--lora-rank", "8"], ["lora-train", "--lora-r", "0"],
                ["pip", "install", "airflow-provider-lora[nosuchextra]"], ["no-such-program-here"],
                ["docker", "build", "-f", "trainer/NoSuchDockerfile", "."]):
        with pytest.raises(AssertionError):
            check_command(bad, "x")
    check_command(["make", "-n", "test"], "x")
    check_command(["lora-train", "--lora-r", "8", "--num-epochs", "1"], "x")


# ---- yaml and requirements -------------------------------------------------------------------------------------------

RBAC_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}


@pytest.mark.parametrize("block", _blocks("yaml"))
def test_yaml_block(block):
    docs = [d for d in yaml.safe_load_all(block.code) if d is not None]
    assert docs, f"{block}: empty"
    for doc in docs:
        for rule in doc.get("rules", []) if isinstance(doc, dict) else []:
            assert set(rule["verbs"]) <= RBAC_VERBS, f"{block}: {rule['verbs']}"


@pytest.mark.parametrize("block", _blocks("pip-requirements"))
def test_requirements_block(block):
    version = PYPROJECT["project"]["version"]
    reqs = [Requirement(line) for line in (ln.split("#")[0].strip() for ln in block.code.splitlines()) if line]
    assert reqs, f"{block}: empty"
    ours = [r for r in reqs if r.name == PYPROJECT["project"]["name"]]
    for req in ours:
        assert req.specifier.contains(version), f"{block}: {req} excludes version {version}"
        assert req.extras <= _extras(), f"{block}: {req}"
        if req.url:  # a direct reference names the wheel `pip wheel .` builds for this version
            assert req.url.endswith(f"/airflow_provider_lora-{version}-py3-none-any.whl"), f"{block}: {req.url}"


# ---- the KFP migration table -------------------------------------------------------------------------------------

# The seed component's inputs that are not training_* parameters (its Inputs table), and the environment variables
# its README documents.
KFP_ONLY_INPUTS = {"pvc_path", "output_model", "output_metrics", "output_loss_chart", "dataset", "kubernetes_config"}
KFP_ENVIRONMENT = {"HF_TOKEN", "KUBERNETES_SERVER_URL", "KUBERNETES_AUTH_TOKEN", "OCI_PULL_SECRET_MODEL_DOWNLOAD"}


def migration_rows() -> list[tuple[list[str], list[str]]]:
    """(KFP names, operator kwargs written ``name=``) for each row of the mapping table."""
    text = (REPO / "docs" / "migrating-from-kfp.md").read_text(encoding="utf-8")
    section = text.split("## Name mapping", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    out = []
    for row in rows:
        kfp_cell, op_cell = [c.strip() for c in row.strip("|").split(" | ")][:2]
        out.append((re.findall(r"`([A-Za-z_0-9]+)`", kfp_cell), re.findall(r"`([a-z_0-9]+)=`", op_cell)))
    return out


def test_migration_table_maps_every_kfp_input_by_the_spec():
    from airflow_provider_lora.core.spec import seed_parameter_names

    rows = migration_rows()
    kfp_names = [n for names, _ in rows for n in names]
    assert len(kfp_names) == len(set(kfp_names)), "a KFP input listed twice"
    seed = seed_parameter_names()
    assert set(kfp_names) == {f"training_{n}" for n in seed} | KFP_ONLY_INPUTS | KFP_ENVIRONMENT
    accepted = _accepted_kwargs("LoRATrainingOperator")
    for names, kwargs in rows:
        if names == ["OCI_PULL_SECRET_MODEL_DOWNLOAD"]:  # oci:// models are refused, so nothing maps to it
            assert kwargs == [], kwargs
            continue
        assert kwargs, f"{names}: no operator argument"
        assert set(kwargs) <= accepted, f"{names}: {set(kwargs) - accepted} are not operator arguments"
        if names[0].startswith("training_"):
            # The rule the operator keeps: the seed's name without its prefix, a LoRASpec field.
            assert kwargs == [names[0].removeprefix("training_")], (names, kwargs)
    # Training rows in the seed's (and LoRASpec's) order.
    assert [n for n in kfp_names if n.startswith("training_")] == [f"training_{n}" for n in seed]
