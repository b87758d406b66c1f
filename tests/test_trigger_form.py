"""The example DAG's trigger form in the real Airflow UI: a real api-server, scheduler and dag-processor
(tests/fixtures/airflow_services.py) serve dags/lora_finetune.py, and headless chromium (tests/browser/trigger_form.mjs,
playwright-core) opens the DAG page, clicks Trigger, reads every field of the form, changes lora_r and submits.

The run it creates is checked through the REST API and then marked failed; nothing trains: the default pool has no
slots while the test runs, so the run's task stays scheduled.

Needs /usr/bin/chromium and tests/browser/node_modules (``ci/install-browser.sh``); skipped without them.
``UPDATE_SCREENSHOTS=1`` also copies the form (LoRA section unfolded) to docs/images/trigger-form.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from urllib.parse import quote

import pytest

from airflow_provider_lora.core.spec import LoRASpec
from airflow_provider_lora.params import MINIMUM
from tests.browser_helpers import BROWSER_DIR, ROOT, needs_browser, png_size

pytestmark = [pytest.mark.slow, needs_browser]

DAG_FILE = ROOT / "dags" / "lora_finetune.py"
DAG_ID = "lora_finetune"
DOCS_SHOT = ROOT / "docs" / "images" / "trigger-form.png"
SECTIONS = {"Model", "Data", "LoRA", "Quantisation", "Training", "Resources", "Kubernetes", "Output"}
# What the DAG file reads from the environment when the dag-processor parses it: the same values as `make demo`.
EXAMPLE_ENV = {
    "LORA_EXAMPLE_LAUNCHER": "local",
    "LORA_EXAMPLE_DATASET": str(ROOT / "examples" / "data" / "records_train.jsonl"),
    "LORA_EXAMPLE_OUTPUT": str(ROOT / "runs"),
}


@pytest.fixture(scope="module", autouse=True)
def example_env():
    """Set before airflow_services starts (autouse fixtures come first in their scope): the services' environment
    is a copy of this process's, taken when they start."""
    saved = {name: os.environ.get(name) for name in EXAMPLE_ENV}
    os.environ.update(EXAMPLE_ENV)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def field_kind(schema: dict) -> str:
    """The control the form should show for a param's JSON schema."""
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    if "enum" in schema:
        return "select"
    if "boolean" in types:
        return "switch"
    if "integer" in types or "number" in types:
        return "number"
    return "text"


def ours(message: str) -> bool:
    """Whether a browser console error is about this DAG's form (Airflow's UI may log errors of its own)."""
    return bool(re.search(r"schema|\bparams?\b|" + "|".join(LoRASpec.model_fields), message, re.IGNORECASE))


def test_trigger_form_in_the_airflow_ui(airflow_services, tmp_path):
    af = airflow_services
    assert all(af.env.get(name) == value for name, value in EXAMPLE_ENV.items())
    shutil.copyfile(DAG_FILE, af.dags_folder / DAG_FILE.name)
    af.wait_for_dag(DAG_ID)
    params = af.api("GET", f"/dags/{DAG_ID}/details")["params"]
    assert set(params) == set(LoRASpec.model_fields)  # a param for every spec field

    # No task may run: no slots in the default pool (restored below).
    af.api("PATCH", "/pools/default_pool?update_mask=slots", {"name": "default_pool", "slots": 0})
    try:
        proc = subprocess.run(["node", "trigger_form.mjs", af.base_url, DAG_ID, str(tmp_path), '{"lora_r": "8"}'],
                              cwd=BROWSER_DIR, capture_output=True, text=True, timeout=150)
        lines = proc.stdout.strip().splitlines()
        seen = json.loads(lines[-1]) if lines else {}
        (tmp_path / "seen.json").write_text(json.dumps(seen, indent=2))
        assert proc.returncode == 0 and "error" not in seen, f"{seen.get('error')}\n{proc.stderr[-3000:]}"
        run_id = (seen.get("post") or {}).get("answer", {}).get("dag_run_id")
        if run_id:
            af.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}", {"state": "failed"})
    finally:
        af.api("PATCH", "/pools/default_pool?update_mask=slots", {"name": "default_pool", "slots": 128})

    # Air-gapped, and nothing logged about our form (Airflow's own errors are kept in seen.json, not failed on).
    # Requests the UI still had in flight when the browser closed end as net::ERR_ABORTED.
    assert seen["blocked"] == []
    assert [f for f in seen["failed"] if not f.endswith("net::ERR_ABORTED")] == []
    assert [e for e in seen["console_errors"] + seen["page_errors"] + seen["http_errors"] if ours(e)] == []

    # Sections: one per spec section, plus Airflow's own "Advanced Options" (the raw conf); none flagged in error
    # with the defaults, so the form submits as it opens.
    titles = [s["title"] for s in seen["sections"]]
    assert set(titles) == SECTIONS | {"Advanced Options"}, titles
    empty_required = [n for n, f in seen["fields"].items() if f["required"] and f["value"] == ""]
    assert [s["title"] for s in seen["sections"] if s["flagged"]] == [], f"required but empty: {empty_required}"
    assert seen["submit_enabled_initial"] is True

    # Every spec field has its field, in its section, with the control its type calls for, its description, its
    # default, required unless it may be left empty, and its minimum.
    fields = seen["fields"]
    assert set(fields) == set(LoRASpec.model_fields)
    for name, param in params.items():
        schema, field = param["schema"], fields[name]
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert field["section"] == schema["section"], name
        assert field["kind"] == field_kind(schema), name
        assert field["description"] == LoRASpec.model_fields[name].description, name
        assert field["label"] == name.replace("_", " "), name
        assert field["required"] is ("null" not in types), name
        if name in MINIMUM:
            assert field["min"] == str(MINIMUM[name]), name
        value = param["value"]
        if field["kind"] == "switch":
            assert field["value"] is bool(value), name
        elif field["kind"] == "select":
            assert field["value"] == ("__null__" if value is None else str(value)), name
        elif value is None:
            assert field["value"] == "", name
        elif isinstance(value, float):
            assert float(field["value"]) == value, name
        else:
            assert field["value"] == str(value), name
    # A sample, spelled out.
    lora_r = fields["lora_r"]
    assert (lora_r["value"], lora_r["kind"], lora_r["section"], lora_r["required"]) == ("16", "number", "LoRA", True)
    assert fields["learning_rate"]["value"] == "0.001" and fields["learning_rate"]["required"] is False
    assert fields["seed"]["value"] == "" and fields["seed"]["required"] is False
    assert fields["base_model"]["value"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert fields["dataset"]["value"] == EXAMPLE_ENV["LORA_EXAMPLE_DATASET"]
    assert fields["resource_gpu_per_worker"]["value"] == "0"  # the local launcher's CPU default
    assert fields["dataset_format"]["kind"] == "select" and fields["dataset_format"]["shown"] == "auto"
    assert seen["options"]["dataset_format"] == ["auto", "messages", "conversations", "alpaca", "prompt_completion",
                                                 "text"]
    # Optional choices offer every value and a way back to the default (None).
    assert seen["options"]["lr_scheduler"][:7] == ["linear", "cosine", "cosine_with_restarts", "polynomial",
                                                   "constant", "constant_with_warmup", "inverse_sqrt"]
    assert len(seen["options"]["lr_scheduler"]) == 8
    assert seen["options"]["lora_bnb_4bit_quant_type"][:2] == ["nf4", "fp4"]
    assert seen["options"]["dtype"] == ["auto", "bfloat16", "float16", "float32"]

    # Submitted with lora_r changed: the UI posted the form as the run's conf, and the run has it.
    assert seen["submit_enabled"] is True
    assert seen["post"]["status"] == 200 and seen["toast"] is True
    expected = {name: param["value"] for name, param in params.items()} | {"lora_r": 8}
    assert seen["post"]["body"]["conf"] == expected
    run = af.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}")
    assert run["conf"] == expected and type(run["conf"]["lora_r"]) is int
    assert run["run_type"] == "manual" and run["triggered_by"] == "ui"
    assert run["state"] == "failed"  # marked so above; its task never ran
    ti = af.task_instance(DAG_ID, run_id, "train")
    assert ti["pid"] is None and ti["queued_when"] is None, ti
    assert af.task_log_files(DAG_ID, run_id, "train") == []

    # Screenshots: the page as the form opens, and the dialog with a section unfolded.
    for shot in ("form.png", "LoRA.png", "Training.png", "Model.png"):
        data = (tmp_path / shot).read_bytes()
        width, height = png_size(data)
        assert width >= 800 and height >= 700 and len(data) > 20_000, shot
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "LoRA.png", DOCS_SHOT)
