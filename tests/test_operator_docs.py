"""docs/operator.md is generated from LoRATrainingOperator's signature and docstring and must not drift from them."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from airflow_provider_lora.core.spec import LoRASpec
from airflow_provider_lora.operators import reference
from airflow_provider_lora.operators.lora import LoRATrainingOperator

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "operator.md"


def test_committed_page_is_current():
    assert reference.DOC_PATH == DOC
    assert DOC.read_text(encoding="utf-8") == reference.document(), \
        f"docs/operator.md is stale: run {reference.COMMAND}"


def _rows() -> dict[str, list[str]]:
    rows = {}
    for line in reference.argument_table().splitlines()[2:]:
        cells = [c.strip() for c in line.replace("\\|", "\x00").strip().strip("|").split("|")]
        assert len(cells) == 5, line  # no stray pipe split a row
        rows[cells[0].strip("`")] = [c.replace("\x00", "|") for c in cells]
    return rows


def test_every_operator_argument_but_the_spec_fields_has_a_documented_row():
    own = [n for n in inspect.signature(LoRATrainingOperator.__init__).parameters
           if n not in ("self", "kwargs") and n not in LoRASpec.model_fields]
    rows = _rows()
    assert list(rows) == own
    assert {"launcher", "image", "namespace", "node_selector", "tolerations", "volumes", "secret_env",
            "startup_timeout", "on_finish_action", "aws_conn_id", "trainer_runtime"} <= set(rows)
    assert not set(rows) & set(LoRASpec.model_fields)
    undocumented = [name for name, cells in rows.items() if not cells[4]]
    assert undocumented == [], "document these in the operator's docstring (:param name: ...)"


def test_every_docstring_entry_names_a_real_argument():
    # A :param for an argument that was renamed or removed would document something that does not exist.
    params = set(inspect.signature(LoRATrainingOperator.__init__).parameters)
    assert set(reference.param_docs()) - params == set()


def test_defaults_and_types_come_from_the_signature():
    rows = _rows()
    signature = inspect.signature(LoRATrainingOperator.__init__).parameters
    assert rows["launcher"][1:3] == ["`str`", "`'pod'`"]
    assert rows["on_finish_action"][2] == f"`{signature['on_finish_action'].default!r}`"
    assert rows["startup_timeout"][2] == "`600.0`"
    assert rows["trainer_runtime"][2] == "`'torch-distributed'`"
    assert rows["pvc_mount_path"][2] == "`'/mnt/lora'`"
    assert rows["kubernetes_conn_id"][1] == "`str | None`"  # the | survived markdown escaping


def test_a_default_read_from_the_configuration_names_the_option_not_this_machines_value():
    # deferrable's default is conf.getboolean("operators", "default_deferrable", fallback=False) at import time.
    assert _rows()["deferrable"][2] == "`[operators] default_deferrable` (unset: `False`)"


def test_templated_column_follows_template_fields():
    rows = _rows()
    for name, cells in rows.items():
        assert (cells[3] == "yes") == (name in LoRATrainingOperator.template_fields), name


def test_grouped_and_nested_entries_are_found():
    docs = reference.param_docs()
    assert docs["cluster_context"] == docs["config_file"]  # ":param config_file, cluster_context, in_cluster: ..."
    assert "`[operators] default_deferrable`" in docs["deferrable"]  # rst ``x`` became markdown `x`
    assert _rows()["trainer_runtime_kind"][4] == "See `trainer_runtime`."


def test_every_pod_option_is_an_argument_described_where_podoptions_defines_it():
    from airflow_provider_lora.core.render import PodOptions
    from airflow_provider_lora.operators.lora import POD_FIELDS

    rows = _rows()
    assert set(POD_FIELDS) | {"image", "secret_env", "pod_template"} == set(PodOptions.model_fields)
    for name in POD_FIELDS:
        field = PodOptions.model_fields[name]
        assert field.description and rows[name][4] == field.description.replace("``", "`") + ".", name
        assert rows[name][2] == f"`{field.get_default(call_default_factory=True)!r}`", name


def test_return_value_keys_are_what_the_code_publishes():
    from airflow_provider_lora.core.storage import artifact_uris

    table = reference.return_value_table()
    keys = [line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:]]
    assert keys == ["root", "adapter", "metrics", "summary", "chart_html", "chart_png", "merged"]
    assert keys == list(artifact_uris("s3://b/r", ["merged/x"]))
    assert "merged" not in artifact_uris("s3://b/r", ["adapter/x"])  # hence the note on its row


def test_check_mode(tmp_path, capsys):
    out = tmp_path / "operator.md"
    assert reference.main(["--check", "--output", str(out)]) == 1
    assert reference.main(["--output", str(out)]) == 0
    assert reference.main(["--check", "--output", str(out)]) == 0
    out.write_text(reference.document().replace("`'pod'`", "`'local'`"), encoding="utf-8")
    assert reference.main(["--check", "--output", str(out)]) == 1
    assert "stale" in capsys.readouterr().err


def test_module_check_runs_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "airflow_provider_lora.operators.reference", "--check"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
