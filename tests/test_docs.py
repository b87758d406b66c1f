"""docs/parameters.md is generated from LoRASpec and must not drift from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from airflow_provider_lora.core import docs
from airflow_provider_lora.core.spec import LoRASpec, seed_parameter_names

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "parameters.md"


def test_committed_doc_is_current():
    assert docs.DOC_PATH == DOC
    assert DOC.read_text(encoding="utf-8") == docs.document(), \
        "docs/parameters.md is stale: run python -m airflow_provider_lora.core.docs"
    assert docs.parameter_table() in DOC.read_text(encoding="utf-8")


def test_doc_says_it_is_generated():
    text = DOC.read_text(encoding="utf-8")
    assert text.startswith("# ")
    assert "python -m airflow_provider_lora.core.docs" in text


def test_every_field_has_a_row():
    table = docs.parameter_table()
    rows = [line for line in table.splitlines()[2:] if line.startswith("| `")]
    assert [row.split("|")[1].strip().strip("`") for row in rows] == list(LoRASpec.model_fields)
    for row in rows:
        assert len(row.replace("\\|", "").split("|")) == 9, row  # 7 cells, no stray pipe
    text = DOC.read_text(encoding="utf-8")
    for name in LoRASpec.model_fields:
        assert f"| `{name}` |" in text
    for name in seed_parameter_names():
        assert f"`training_{name}`" in text


def _row(name: str) -> list[str]:
    line = next(line for line in docs.parameter_table().splitlines() if line.startswith(f"| `{name}` |"))
    return [cell.strip() for cell in line.strip().strip("|").split(" | ")]


def test_row_contents():
    assert _row("learning_rate") == ["`learning_rate`", "`Optional[float]`", "`None`", "`0.0002`", "Training",
                                     "`training_learning_rate`", "Learning rate (default: 2e-4)."]
    assert _row("resource_cpu_per_worker")[1:4] == ["`str`", '`"4"`', ""]
    assert _row("lora_bnb_4bit_quant_type")[3] == '`"nf4"` with `lora_load_in_4bit`'
    assert _row("dataset")[5] == ""  # not a seed parameter
    assert _row("dataset_format")[1].startswith("`Literal['auto', ")
    assert "\\\\," in _row("envs")[6]  # a literal backslash survives markdown


def test_seed_types_spelled_as_the_seed_does():
    # The seed's table writes `int`, `Optional[bool]`...; so does ours for the seed's parameters.
    for name in seed_parameter_names():
        assert _row(name)[1].strip("`") in {"str", "int", "float", "bool", "Optional[str]", "Optional[int]",
                                             "Optional[float]", "Optional[bool]"}


def test_main_writes_and_checks(tmp_path, capsys):
    out = tmp_path / "parameters.md"
    assert docs.main(["--check", "--output", str(out)]) == 1  # missing
    assert docs.main(["--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == docs.document()
    assert docs.main(["--check", "--output", str(out)]) == 0
    out.write_text(docs.document().replace("LoRA rank", "LoRA rank!"), encoding="utf-8")
    assert docs.main(["--check", "--output", str(out)]) == 1
    assert "stale" in capsys.readouterr().err


def test_module_runs_and_imports_only_the_spec():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, airflow_provider_lora.core.docs as d; d.parameter_table(); "
         "print(sorted({m.split('.')[0] for m in sys.modules} & "
         "{'airflow', 'torch', 'transformers', 'kfp', 'datasets', 'peft', 'unsloth', 'boto3', 'kubernetes'}))"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    proc = subprocess.run([sys.executable, "-m", "airflow_provider_lora.core.docs", "--check"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
