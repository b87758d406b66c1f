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


def test_troubleshooting_quotes_the_batch_message_the_spec_raises():
    """docs/troubleshooting.md quotes errors users search for: the quote must be what the code says."""
    import re

    import pytest

    doc = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
    quote = re.search(r"`(effective_batch_size=E is not divisible by [^`]*)`", doc)[1]
    with pytest.raises(ValueError) as caught:
        LoRASpec.parse(dict(base_model="m", dataset="d", effective_batch_size=3, resource_num_workers=2))
    expected = quote.replace("=E", "=3").replace("(W workers x P processes)", "(2 workers x 1 processes)")
    assert expected in str(caught.value)


def test_the_rbac_rules_in_kubernetes_md_are_the_shipped_role():
    """kubernetes.md shows the Role in two parts (pod launcher, then what the TrainJob launcher adds); together
    they are exactly docs/rbac.yaml's Role, under the same name, and security.md lists the same pod verbs."""
    import re

    import yaml

    docs_dir = Path(__file__).resolve().parents[1] / "docs"
    role = next(d for d in yaml.safe_load_all((docs_dir / "rbac.yaml").read_text()) if d["kind"] == "Role")
    page = (docs_dir / "kubernetes.md").read_text()
    section = page.split("## RBAC for the Airflow worker and triggerer", 1)[1].split("\n## ", 1)[0]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    shown_rules = blocks[0]["rules"] + blocks[1]

    def triples(rules):
        return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
                for v in rule["verbs"]}
    assert blocks[0]["metadata"]["name"] == role["metadata"]["name"]
    assert triples(shown_rules) == triples(role["rules"])
    pod_verbs = {v for g, r, v in triples(role["rules"]) if (g, r) == ("", "pods")}
    security = (docs_dir / "security.md").read_text()
    assert all(f"`{verb}`" in security.split("on pods")[0][-120:] for verb in pod_verbs)


def test_concepts_names_the_xcom_keys_the_operator_pushes():
    from airflow_provider_lora.links import CHART_XCOM_KEY
    from airflow_provider_lora.operators.lora import XCOM_LAUNCHED, XCOM_PLAN

    page = (Path(__file__).resolve().parents[1] / "docs" / "concepts.md").read_text()
    table = page.split("\n### In XCom\n\n", 1)[1].split("\n\n", 1)[0]
    keys = {line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:]}
    assert keys == {"return_value", CHART_XCOM_KEY, XCOM_LAUNCHED, XCOM_PLAN}
