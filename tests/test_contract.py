"""The trainer's output contract lives in one module (airflow_provider_lora.core.contract): the trainer writes with
its names and the launchers read with them, so neither side can drift from the other."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from airflow_provider_lora.core import contract, results, storage
from airflow_provider_lora.core.launchers import pod

ROOT = Path(__file__).resolve().parents[1]
TRAINER_FILES = sorted((ROOT / "trainer" / "lora_trainer").glob("*.py"))


def contract_strings() -> dict[str, str]:
    """Every string the contract defines at module level, and each data-file suffix (the builder names beside them
    are the `datasets` loaders' own, which the trainer may spell out)."""
    found = {name: value for name, value in vars(contract).items() if name.isupper() and isinstance(value, str)}
    found |= {f"DATA_FILE_BUILDERS[{suffix!r}]": suffix for suffix in contract.DATA_FILE_BUILDERS}
    return found


def string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in a file, f-string parts included; docstrings left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings)


def contract_copies(path: Path) -> list[str]:
    """Literal copies of contract values in ``path``. Prefixes count at the start of a literal too, which catches
    f"[lora-trainer] ..." as well as "[lora-trainer] "."""
    strings = contract_strings()
    prefixes = {name: value for name, value in strings.items() if name.endswith("_PREFIX")}
    copies = []
    for line, text in string_literals(path):
        copies += [f"{path.name}:{line}: {text!r} is contract.{name}" for name, value in strings.items()
                   if text == value]
        copies += [f"{path.name}:{line}: {text!r} starts with contract.{name}" for name, value in prefixes.items()
                   if text != value and text.startswith(value)]
    return copies


def test_the_trainer_spells_out_no_contract_string():
    """A literal copy of a contract value in the trainer (a file name, an env variable, a line prefix) would let the
    two sides drift: it must use the contract's name."""
    assert TRAINER_FILES
    copies = [copy for path in TRAINER_FILES for copy in contract_copies(path)]
    assert not copies, "\n".join(copies)


def test_the_check_finds_a_planted_copy(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(f'"""A docstring may say {contract.COMPLETE_MARKER}."""\n'
                       f'MARKER = {contract.COMPLETE_MARKER!r}\n'
                       f'print(f"{contract.LOG_PREFIX}step {{1}}")\n'
                       f'SUFFIX = ".parquet"\n')
    assert contract_copies(planted) == [
        "planted.py:2: '_COMPLETE' is contract.COMPLETE_MARKER",
        "planted.py:3: '[lora-trainer] step ' starts with contract.LOG_PREFIX",
        "planted.py:4: '.parquet' is contract.DATA_FILE_BUILDERS['.parquet']",
    ]


def test_the_trainer_imports_nothing_from_the_launchers():
    """The trainer runs in the training image with no Airflow or Kubernetes client: the launchers are not its."""
    offenders = []
    for path in TRAINER_FILES:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names
                          if name.startswith("airflow_provider_lora.core.launchers")]
    assert not offenders, "\n".join(offenders)


def test_the_old_homes_of_contract_names_still_answer_with_the_contract_values():
    assert pod.RESULT_PREFIX is contract.RESULT_PREFIX
    assert storage.COMPLETE_MARKER is contract.COMPLETE_MARKER
    assert storage.SUMMARY_FILE is contract.SUMMARY_FILE and storage.METRICS_FILE is contract.METRICS_FILE
    assert results.TERMINATION_MESSAGE_BYTES == contract.TERMINATION_MESSAGE_BYTES


def test_the_termination_message_has_the_contract_keys():
    message = results.termination_message({"summary": {"global_step": 3}, "artifacts": {"root": "/out"}})
    assert set(json.loads(message)) == {contract.SUMMARY_KEY, contract.ARTIFACTS_KEY}
    assert set(results.RunResult({}).to_xcom()) == set(contract.RESULT_KEYS)


def test_the_contract_imports_only_the_standard_library():
    """It is imported on the Airflow side (scheduler, triggerer): nothing heavy may come with it."""
    code = ("import sys; before = set(sys.modules); import airflow_provider_lora.core.contract; "
            "print(sorted(m for m in set(sys.modules) - before if not m.startswith('airflow_provider_lora')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
