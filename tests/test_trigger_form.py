"""The example DAG's trigger form in the real Airflow UI: a real api-server, scheduler and dag-processor
(tests/fixtures/airflow_services.py) serve dags/lora_finetune.py, and headless chromium (tests/browser/trigger_form.mjs,
playwright-core) opens the DAG page, clicks Trigger, reads every field of the form, sets the base model (the tiny test
model: the hub is unreachable here), lora_r and max_steps, and submits.

The run it creates is checked through the REST API, and then fine-tunes with the values from the form (the local
launcher, in the real Airflow's worker): the result and the loss chart come back as XCom.

Needs /usr/bin/chromium and tests/browser/node_modules (``.ci/install-browser.sh``); skipped without them.
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
from airflow_provider_lora.links import CHART_XCOM_KEY
from tests.browser_helpers import BROWSER_DIR, ROOT, needs_browser, png_size

pytestmark = [pytest.mark.slow, needs_browser]

DAG_FILE = ROOT / "dags" / "lora_finetune.py"
DAG_ID = "lora_finetune"
DOCS_SHOT = ROOT / "docs" / "images" / "trigger-form.png"
SECTIONS = {"Model", "Data", "LoRA", "Quantisation", "Training", "Resources", "Kubernetes", "Output"}
# What the DAG file reads from the environment when the dag-processor parses it: the same values as `make demo`
# (runs go to a temporary directory instead of the repository's runs/).
EXAMPLE_ENV = {
    "LORA_EXAMPLE_LAUNCHER": "local",
    "LORA_EXAMPLE_DATASET": str(ROOT / "examples" / "data" / "records_train.jsonl"),
}
FORM_STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def example_env(tmp_path_factory):
    """Set before airflow_services starts (autouse fixtures come first in their scope): the services' environment
    is a copy of this process's, taken when they start."""
    env = {**EXAMPLE_ENV, "LORA_EXAMPLE_OUTPUT": str(tmp_path_factory.mktemp("runs"))}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield env
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


def test_trigger_form_in_the_airflow_ui(airflow_services, example_env, tiny_model_dir, tmp_path):
    af = airflow_services
    assert all(af.env.get(name) == value for name, value in example_env.items())
    shutil.copyfile(DAG_FILE, af.dags_folder / DAG_FILE.name)
    af.wait_for_dag(DAG_ID)
    params = af.api("GET", f"/dags/{DAG_ID}/details")["params"]
    assert set(params) == set(LoRASpec.model_fields)  # a param for every spec field

    changes = {"base_model": str(tiny_model_dir), "lora_r": "8", "max_steps": str(FORM_STEPS)}
    proc = subprocess.run(["node", "trigger_form.mjs", af.base_url, DAG_ID, str(tmp_path), json.dumps(changes)],
                          cwd=BROWSER_DIR, capture_output=True, text=True, timeout=150)
    lines = proc.stdout.strip().splitlines()
    seen = json.loads(lines[-1]) if lines else {}
    (tmp_path / "seen.json").write_text(json.dumps(seen, indent=2))
    assert proc.returncode == 0 and "error" not in seen, f"{seen.get('error')}\n{proc.stderr[-3000:]}"
    run_id = (seen.get("post") or {}).get("answer", {}).get("dag_run_id")

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
        assert field["description"] == param["description"], name
        assert field["label"] == schema["title"], name
        assert field["required"] is ("null" not in types), name
        if "minimum" in schema:
            assert field["min"] == str(schema["minimum"]), name
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

    # Submitted with three fields changed: the UI posted the form as the run's conf, and the run has it.
    assert seen["submit_enabled"] is True
    assert seen["post"]["status"] == 200 and seen["toast"] is True
    expected = {name: param["value"] for name, param in params.items()} | {
        "base_model": str(tiny_model_dir), "lora_r": 8, "max_steps": FORM_STEPS}
    assert seen["post"]["body"]["conf"] == expected
    run = af.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}")
    assert run["conf"] == expected and type(run["conf"]["lora_r"]) is int
    assert run["run_type"] == "manual" and run["triggered_by"] == "ui"

    # The run fine-tunes with the form's values (the trainer records the spec it ran), and the loss chart comes back.
    state = af.wait_for_run(DAG_ID, run_id, timeout=400)
    assert state == "success", af.task_log(DAG_ID, run_id, "train")[-6000:]
    result = af.xcom(DAG_ID, run_id, "train")
    ran = result["summary"]["spec"]
    assert (ran["base_model"], ran["lora_r"], ran["max_steps"]) == (str(tiny_model_dir), 8, FORM_STEPS)
    assert ran["dataset"] == EXAMPLE_ENV["LORA_EXAMPLE_DATASET"]
    assert result["artifacts"]["root"] == f"{example_env['LORA_EXAMPLE_OUTPUT']}/{run_id}"
    assert [row["step"] for row in result["history"] if "loss" in row] == list(range(1, FORM_STEPS + 1))
    assert af.xcom(DAG_ID, run_id, "train", key=CHART_XCOM_KEY).startswith("<!DOCTYPE html>")

    # Screenshots: the page as the form opens, and the dialog with a section unfolded.
    for shot in ("form.png", "LoRA.png", "Training.png", "Model.png"):
        data = (tmp_path / shot).read_bytes()
        width, height = png_size(data)
        assert width >= 800 and height >= 700 and len(data) > 20_000, shot
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "LoRA.png", DOCS_SHOT)
