"""Through a real Airflow (tests/fixtures/airflow_services.py: api-server, scheduler with LocalExecutor, dag-processor,
triggerer, each its own process, every port on 127.0.0.1): a deferrable LoRATrainingOperator task trains the tiny
model in an emulated pod (tests/k8s/emulator.py), the real triggerer imports LoRATrainingTrigger from the installed
package and follows the pod, and the task resumes in another worker process.

dag.test() cannot show this: it runs the trigger inline in the test process (first event only, no cleanup).

On the same Airflow, headless chromium (tests/browser/task_instance.mjs) opens a finished run's task instance page:
its extra links, the "Loss chart" tab with the run's chart (its eval series and before/after answers), and the tab
on another task. ``UPDATE_SCREENSHOTS=1`` also copies the tab's screenshot to docs/images/loss-chart-tab.png."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import psutil
import pytest

from airflow_provider_lora.core import storage
from airflow_provider_lora.links import CHART_XCOM_KEY, TAB_URL_ROUTE
from tests.browser_helpers import BROWSER_DIR, ROOT, needs_browser, png_size
from tests.fixtures.airflow import kube_connection_api
from tests.trainer_helpers import FAST, arithmetic_rows, write_jsonl

pytestmark = pytest.mark.slow

TRIGGER_CLASSPATH = "airflow_provider_lora.triggers.lora.LoRATrainingTrigger"
SAFE_ENV = ("PATH", "HOME", "LANG", "TMPDIR")  # what the emulated pod inherits from the host
DAG_ID = "lora_real_airflow"
TASK_ID = "train"
MAX_STEPS = 2

DAG_FILE = '''\
"""Written by tests/test_real_airflow.py."""
import datetime

from airflow.sdk import DAG

from airflow_provider_lora.operators.lora import LoRATrainingOperator

with DAG({dag_id!r}, schedule=None, start_date=datetime.datetime(2026, 1, 1), catchup=False):
    LoRATrainingOperator(
        task_id={task_id!r}, launcher="pod", image="registry.example/lora-trainer:0.1.0", deferrable=True,
        kubernetes_conn_id="k8s_emu",
        poll_interval=0.5, startup_timeout=60, on_finish_action="keep_pod",
        base_model={base_model!r}, dataset={dataset!r}, output_uri={output_uri!r},
        pvc_claim_name="workspace", pvc_mount_path={mount!r},
        envs="HF_HUB_OFFLINE=1,HF_DATASETS_OFFLINE=1,TOKENIZERS_PARALLELISM=false",
        resource_gpu_per_worker=0, resource_cpu_per_worker="2", resource_memory_per_worker="4Gi",
        asset_alias="lora-adapters",
        **{spec!r},
    )
'''
CONSUMER_DAG = "lora_adapter_ready"  # dags/lora_adapter_ready.py: scheduled on the asset alias "lora-adapters"


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _running(pid: int | None) -> bool:
    """Whether ``pid`` is a live process (an exited one that its parent has not reaped yet is a zombie: not live;
    the LocalExecutor worker leaves the task process that deferred unreaped for a while)."""
    try:
        return bool(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _connected_to(processes: list[psutil.Process], port: int) -> set[int]:
    """The pids among ``processes`` with an open TCP connection to 127.0.0.1:``port``."""
    pids = set()
    for proc in processes:
        try:
            if any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
                   for c in proc.net_connections(kind="tcp")):
                pids.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


def _json_lines(text: str) -> list[dict]:
    out = []
    for raw in text.splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            pass
    return out


def test_deferred_task_resumes_in_another_process(airflow_services, k8s_cluster, tiny_model_dir, tmp_path):
    af, cluster = airflow_services, k8s_cluster
    cluster.base_env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
    af.api("POST", "/connections", kube_connection_api(cluster))
    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))
    # The output goes to a workspace PVC (the operator refuses a path on the pod's own filesystem); a mount path
    # under the cluster root is what the emulated pod sees as is.
    mount = str(cluster.root / "mnt" / "lora")
    (af.dags_folder / f"{DAG_ID}.py").write_text(DAG_FILE.format(
        dag_id=DAG_ID, task_id=TASK_ID, base_model=str(tiny_model_dir), dataset=str(dataset),
        output_uri=f"{mount}/runs/{{{{ run_id }}}}", mount=mount, spec={**FAST, "max_steps": MAX_STEPS}))
    shutil.copy(ROOT / "dags" / f"{CONSUMER_DAG}.py", af.dags_folder)
    af.wait_for_dag(DAG_ID)
    af.wait_for_dag(CONSUMER_DAG)

    run_id = af.trigger_run(DAG_ID)
    seen: list[dict] = []  # each change of the task instance's (state, pid, trigger, triggerer job)
    # Sampled while the trigger runs: which processes talk to the Kubernetes API (the trigger keeps its connection
    # open between polls), and whether the process that deferred still exists.
    k8s_clients: dict[str, set[int]] = {"triggerer": set(), "scheduler": set()}
    deferring_pid_alive: list[bool] = []

    def ti_state() -> dict:
        ti = af.task_instance(DAG_ID, run_id, TASK_ID)
        return {"state": ti["state"], "pid": ti.get("pid"), "trigger": (ti.get("trigger") or {}).get("classpath"),
                "triggerer_job": (ti.get("triggerer_job") or {}).get("id")}

    def watch() -> None:
        now = ti_state()
        if not seen or seen[-1] != now:
            seen.append(now)
        if now["state"] == "deferred" and now["triggerer_job"] is not None:
            sample = {name: _connected_to(_tree(af.procs[name].pid), cluster.port) for name in k8s_clients}
            alive = _running(now["pid"])
            if ti_state()["state"] == "deferred":  # still deferred after sampling: no resumed worker in the sample
                for name, pids in sample.items():
                    k8s_clients[name] |= pids
                deferring_pid_alive.append(alive)

    state = af.wait_for_run(DAG_ID, run_id, timeout=150, on_poll=watch, interval=0.3)
    watch()
    log_files = {p.name: p.read_text(errors="replace") for p in af.task_log_files(DAG_ID, run_id, TASK_ID)}
    context = f"states seen: {seen}\nlogs: {sorted(log_files)}\n{af.task_log(DAG_ID, run_id, TASK_ID)[-6000:]}"
    assert state == "success", context

    # The result came back through the resumed task's XCom.
    result = af.xcom(DAG_ID, run_id, TASK_ID)
    assert result["summary"]["global_step"] == MAX_STEPS, result
    assert [r["step"] for r in result["history"]] == list(range(1, MAX_STEPS + 1))
    # The pod published the run on the workspace PVC, marked complete (the marker lists every file and its size).
    root = result["artifacts"]["root"]
    assert root == f"{mount}/runs/{run_id}"
    marker = storage.read_marker(root)
    assert {"adapter/adapter_config.json", "metrics.jsonl", "summary.json", "loss_chart.html"} <= set(marker["files"])

    # The task deferred to OUR trigger, which one triggerer job ran; then the task succeeded.
    deferred = [s for s in seen if s["state"] == "deferred"]
    assert deferred, context
    assert seen[-1]["state"] == "success", context
    assert {s["trigger"] for s in deferred} == {TRIGGER_CLASSPATH}, context
    jobs = {s["triggerer_job"] for s in deferred} - {None}
    assert len(jobs) == 1, context
    job = jobs.pop()

    # Defer and resume in different processes: the task process that deferred (its pid stays on the task instance
    # while deferred) had exited whenever we looked while the trigger ran, and a new one (another pid) resumed.
    assert deferring_pid_alive and not any(deferring_pid_alive), context
    deferring_pid, resumed_pid = deferred[0]["pid"], seen[-1]["pid"]
    assert deferring_pid and resumed_pid and deferring_pid != resumed_pid, context
    # While deferred, the pod was followed from the triggerer's processes, and from no worker of the scheduler.
    assert k8s_clients["triggerer"], f"no triggerer process was connected to the Kubernetes API\n{context}"
    assert not k8s_clients["scheduler"], f"a worker talked to Kubernetes while the task was deferred\n{context}"
    assert af.procs["triggerer"].pid not in (deferring_pid, resumed_pid)

    # The worker's log: defer, then the resumed try's result. The triggerer's log of this task: our trigger's
    # lines, copied from the pod.
    worker_log = log_files.get("attempt=1.log", "")
    assert "Pausing task as DEFERRED" in worker_log, context
    assert f"after {MAX_STEPS} steps" in worker_log.split("Pausing task as DEFERRED", 1)[1], context
    trigger_log = log_files.get(f"attempt=1.log.trigger.{job}.log")
    assert trigger_log is not None, context
    events = _json_lines(trigger_log)
    pod_name = af.xcom(DAG_ID, run_id, TASK_ID, key="launched")["name"]
    copied = [e["event"] for e in events
              if e.get("logger") == TRIGGER_CLASSPATH and str(e.get("event")).startswith(f"[{pod_name}] ")]
    assert copied, context
    assert any("[lora-trainer] step" in line for line in copied), "\n".join(copied[-40:])
    # Every line of the pod's log, once, in order: nothing lost, nothing repeated.
    pod_lines = cluster.logs("default", pod_name).split("\n")
    assert pod_lines[-1] == ""
    assert copied == [f"[{pod_name}] {line}" for line in pod_lines[:-1]]
    # The triggerer's own records of this trigger, in the same file.
    name = f"{DAG_ID}/{run_id}/{TASK_ID}/-1/1"
    assert any(e["event"].startswith(f"trigger {name} (ID ") and e["event"].endswith(" starting") for e in events)
    assert any(e["event"] == "Trigger fired event" and e.get("name", "").startswith(name) for e in events)

    # The adapter's asset event, through the alias, scheduled the example that follows it, with the run's figures.
    consumer = _wait_for_first_run(af, CONSUMER_DAG)
    assert af.wait_for_run(CONSUMER_DAG, consumer, timeout=120) == "success", af.task_log(
        CONSUMER_DAG, consumer, "adapters_ready")[-4000:]
    [ready] = af.xcom(CONSUMER_DAG, consumer, "adapters_ready")
    assert ready["uri"] == Path(result["artifacts"]["adapter"]).as_uri() and ready["run"] == root
    assert ready["final_loss"] == result["summary"]["final_loss"] and ready["global_step"] == MAX_STEPS


def _wait_for_first_run(af, dag_id: str, timeout: float = 90) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = af.api("GET", f"/dags/{dag_id}/dagRuns")["dag_runs"]
        if runs:
            return runs[0]["dag_run_id"]
        time.sleep(0.5)
    raise TimeoutError(f"no run of {dag_id} within {timeout:.0f}s")


def test_every_service_listens_on_loopback_only(airflow_services):
    listening = []
    for name, proc in airflow_services.procs.items():
        for p in _tree(proc.pid):
            try:
                listening += [(name, p.pid, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN]
            except psutil.NoSuchProcess:
                pass
    assert listening, "the api-server listens somewhere"
    assert {ip for _, _, ip, _ in listening} == {"127.0.0.1"}, listening


# ---- the task instance page in the browser ----------------------------------------------------------------------

UI_DAG_ID = "lora_ui"
UI_STEPS = 8
UI_EVAL_STEPS = 2  # an eval every 2 steps after the one at step 0: 5 points of the eval series
UI_EVAL_FRACTION = 0.2
DOCS_SHOT = ROOT / "docs" / "images" / "loss-chart-tab.png"
UI_DAG_FILE = '''\
"""Written by tests/test_real_airflow.py."""
import datetime

from airflow.sdk import DAG, task

from airflow_provider_lora.operators.lora import LoRATrainingOperator

with DAG({dag_id!r}, schedule=None, start_date=datetime.datetime(2026, 1, 1), catchup=False):
    train = LoRATrainingOperator(
        task_id="train", launcher="local", base_model={base_model!r}, dataset={dataset!r},
        output_uri={output!r} + "/{{{{ run_id }}}}", **{spec!r},
    )

    @task
    def report():
        return "a task without a loss chart"

    train >> report()
'''


def _as_parsed(text: str) -> str:
    """Text as the HTML parser hands it to the DOM: CR and CRLF become LF, NUL the replacement character."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "\ufffd")


@needs_browser
def test_the_task_instance_page_shows_the_chart_link_and_the_loss_chart_tab(airflow_services, tiny_model_dir,
                                                                            tmp_path):
    af = airflow_services
    # Questions pasted from an HTML page: their markup and entity must reach the tab's answers table as text.
    rows = [{"messages": [{"role": "user", "content": f"What is <b>{a} plus {b}</b>? (from R&amp;D)"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a, b in ((i % 7, i % 5) for i in range(round(FAST["effective_batch_size"] * UI_STEPS
                                                             / (1 - UI_EVAL_FRACTION))))]
    dataset = write_jsonl(tmp_path / "train.jsonl", rows)
    (af.dags_folder / f"{UI_DAG_ID}.py").write_text(UI_DAG_FILE.format(
        dag_id=UI_DAG_ID, base_model=str(tiny_model_dir), dataset=str(dataset), output=str(tmp_path / "out"),
        spec={**FAST, "max_steps": UI_STEPS, "eval_fraction": UI_EVAL_FRACTION, "eval_steps": UI_EVAL_STEPS,
              "sample_max_new_tokens": 12}))
    af.wait_for_dag(UI_DAG_ID)
    run_id = af.trigger_run(UI_DAG_ID)
    state = af.wait_for_run(UI_DAG_ID, run_id, timeout=400)
    assert state == "success", af.task_log(UI_DAG_ID, run_id, "train")[-6000:]

    # The run's real loss curve: the return value's history and the chart page the worker pushed for the tab.
    result = af.xcom(UI_DAG_ID, run_id, "train")
    losses = [row for row in result["history"] if "loss" in row]
    assert [row["step"] for row in losses] == list(range(1, UI_STEPS + 1))
    evals = [row for row in result["history"] if "eval_loss" in row]
    assert [row["step"] for row in evals] == list(range(0, UI_STEPS + 1, UI_EVAL_STEPS))
    samples = result["summary"]["samples"]
    assert len(samples) == 3 and all("<b>" in s["prompt"] and "R&amp;D" in s["prompt"] for s in samples)
    page = af.xcom(UI_DAG_ID, run_id, "train", key=CHART_XCOM_KEY)
    assert page == Path(result["artifacts"]["chart_html"]).read_text()
    # The links as the API gives them to the UI: no URL reaches a path on the worker, so no artifacts button.
    tab = f"/dags/{UI_DAG_ID}/runs/{quote(run_id, safe=':+')}/tasks/train/plugin/{TAB_URL_ROUTE}"
    links = af.api("GET", f"/dags/{UI_DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/train/links")
    assert links["extra_links"] == {"LoRA artifacts": None, "Loss chart": tab}

    proc = subprocess.run(["node", "task_instance.mjs", af.base_url, UI_DAG_ID, run_id, "train", "report",
                           str(tmp_path)], cwd=BROWSER_DIR, capture_output=True, text=True, timeout=180)
    lines = proc.stdout.strip().splitlines()
    seen = json.loads(lines[-1]) if lines else {}
    (tmp_path / "seen.json").write_text(json.dumps(seen, indent=2))
    assert proc.returncode == 0 and "error" not in seen, f"{seen.get('error')}\n{proc.stderr[-3000:]}"

    # Air-gapped, and no errors from any frame (the tab's chart page included).
    assert seen["blocked"] == [] and seen["console_errors"] == [] and seen["page_errors"] == []
    assert seen["http_errors"] == []
    assert [f for f in seen["failed"] if not f.endswith("net::ERR_ABORTED")] == []

    # Details tab: the "Loss chart" button, and the tab among the task instance's tabs.
    assert seen["extra_links"] == [{"text": "Loss chart", "href": tab, "target": "_self"}]
    assert "Loss chart" in seen["tabs"] and "Details" in seen["tabs"]
    # Clicking it opens the tab, whose iframe asks the plugin for this task instance's chart.
    assert seen["after_click"] in (tab, quote(tab, safe="/"))
    src = urlsplit(seen["iframe_src"])
    assert src.path == "losschart/chart"
    assert {k: v[0] for k, v in parse_qs(src.query).items()} == {
        "dag_id": UI_DAG_ID, "run_id": run_id, "task_id": "train", "map_index": "{MAP_INDEX}"}
    # The chart of this run: one SVG, a point per logged step, the smoothed line, the learning rate, a table row per
    # history row; the title names the model, r, alpha and dataset.
    chart = seen["chart"]
    assert chart["svg"] == 1 and chart["train_points"] == UI_STEPS
    assert chart["smooth_line"] == 1 and chart["lr_line"] == 1
    assert chart["table_steps"] == [str(row["step"]) for row in result["history"]]
    assert tiny_model_dir.name in chart["heading"] and "r=16" in chart["heading"] and "train.jsonl" in chart["heading"]
    # Hovering a point shows its values: the chart's script runs inside the tab.
    assert chart["tip_hidden_before"] is True
    assert seen["tooltip"][0].startswith("step 2 ")
    assert f"training loss {losses[1]['loss']:.4f}" in seen["tooltip"]
    # The eval series: in the legend, a marker per eval of the run; hovering the first shows its eval loss.
    assert "eval loss" in chart["legend"] and chart["eval_points"] == len(evals)
    assert seen["eval_tooltip"][0].startswith(f"step {evals[0]['step']} ")
    assert f"eval loss {evals[0]['eval_loss']:.4f}" in seen["eval_tooltip"]
    # The before/after answers of the run's summary, every row rendered, each text as the model wrote it (the
    # prompt's <b> and &amp; shown as typed, no element parsed out of them). The HTML parser turns a CR into a
    # newline: the tiny model's answers are arbitrary bytes.
    table = chart["samples"]
    assert table["heading"] == "Held-out prompts, before and after"
    assert table["headers"] == ["prompt", "expected", "base model", "with the adapter"]
    assert [row["cells"] for row in table["rows"]] == [
        [_as_parsed(s[k]) for k in ("prompt", "expected", "base", "with_adapter")] for s in samples]
    assert all(row["visible"] and row["box"]["height"] > 20 for row in table["rows"])
    assert table["elements_in_cells"] == []

    # Another task of the run: the tab answers, without a chart.
    assert "No loss chart for this task" in seen["other_task_text"] and seen["other_task_svg"] == 0

    for shot in ("details.png", "tab.png", "no_chart.png"):
        data = (tmp_path / shot).read_bytes()
        width, height = png_size(data)
        assert (width, height) == (1100, 900) and len(data) > 20_000, shot
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "tab.png", DOCS_SHOT)
