"""Issue 14 through a real Airflow (tests/fixtures/airflow_services.py) and the emulated cluster: what stops a deferred
training and what must not. A user marking the task failed or successful through the REST API stops it (the real
triggerer calls the trigger's on_kill, which reads the task state through the execution API); a triggerer that loses
the trigger to another one (its heartbeat lapsed) does not; execution_timeout fails a deferred task and deletes its
pod. The pod runs a stand-in trainer (the DAG file replaces the trainer's command) that prints a line every half
second and then a result line: after ``lines`` lines, or as soon as the test creates the DAG's release file (a test
that needs the training to end lets it end once what it checks has happened, instead of a fixed wait)."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error

import pytest

from airflow_provider_lora.core.launchers.pod import LOG_CURSOR_ANNOTATION
from tests.fixtures.airflow import K8S_EMU, kube_connection_api
from tests.fixtures.airflow_services import running_airflow

pytestmark = pytest.mark.slow

SAFE_ENV = ("PATH", "HOME", "LANG", "TMPDIR")
# A triggerer that misses heartbeats for 8 s is taken as dead and its triggers go to another one (default 30 s).
FAST_TAKEOVER = {"AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "8",
                 "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1"}

DAG_FILE = '''\
"""Written by tests/test_real_airflow_kill.py."""
import datetime

from airflow.sdk import DAG

from airflow_provider_lora.core import render
from airflow_provider_lora.operators.lora import LoRATrainingOperator

SCRIPT = """
import json, os, time
for i in range({lines}):
    if os.path.exists({release!r}):
        break
    print("working", i, flush=True)
    time.sleep(0.5)
print("LORA_RESULT " + json.dumps({{"summary": {{"global_step": 1}}, "history": [], "artifacts": {{}}}}), flush=True)
"""
render.trainer_argv = lambda spec, nproc, torchrun=False: ["python", "-c", SCRIPT]  # the stand-in trainer

with DAG({dag_id!r}, schedule=None, start_date=datetime.datetime(2026, 1, 1), catchup=False):
    LoRATrainingOperator(
        task_id="train", launcher="pod", image="registry.example.com/lora/trainer:0.1", deferrable=True,
        kubernetes_conn_id="k8s_emu", poll_interval=0.5,
        startup_timeout=60, on_finish_action="keep_pod", base_model="org/model", dataset="org/data",
        output_uri={mount!r} + "/runs/{{{{ run_id }}}}", pvc_claim_name="workspace", pvc_mount_path={mount!r},
        resource_gpu_per_worker=0, resource_cpu_per_worker="1", resource_memory_per_worker="1Gi", retries=0,
        {extra}
    )
'''


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    with running_airflow(tmp_path_factory.mktemp("airflow_kill"), FAST_TAKEOVER) as services:
        yield services


@pytest.fixture
def dag(airflow, k8s_cluster):
    """start(dag_id, ...): write a DAG of the stand-in training and start a run; its run_id, once a triggerer follows
    the deferred task's pod (unless ``wait=False``)."""
    cluster = k8s_cluster
    cluster.base_env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
    try:
        airflow.api("POST", "/connections", kube_connection_api(cluster))
    except urllib.error.HTTPError as exc:  # made by an earlier test of this module, for its own cluster
        if exc.code != 409:
            raise
        airflow.api("PATCH", f"/connections/{K8S_EMU}", kube_connection_api(cluster))

    def start(dag_id: str, lines: int = 240, extra: str = "", wait: bool = True) -> str:
        (airflow.dags_folder / f"{dag_id}.py").write_text(DAG_FILE.format(
            dag_id=dag_id, lines=lines, mount=str(cluster.root / "mnt" / "lora"), extra=extra,
            release=str(release_file(airflow, dag_id))))
        airflow.wait_for_dag(dag_id)
        run_id = airflow.trigger_run(dag_id)
        if wait:
            # The trigger runs in a triggerer once it saved its log cursor on the pod.
            wait_for(lambda: airflow.task_instance(dag_id, run_id, "train")["state"] == "deferred"
                     and cluster.pods() and LOG_CURSOR_ANNOTATION in
                     (cluster.pods()[0]["metadata"].get("annotations") or {}),
                     f"{dag_id}: deferred, its pod followed by a triggerer", airflow)
        return run_id
    return start


def release_file(airflow, dag_id: str):
    """Once this file exists, the stand-in trainer of ``dag_id`` (every try) prints its result line and ends."""
    return airflow.home.parent / f"{dag_id}.release"


def wait_for(test, what: str, airflow, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not test():
        airflow.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} within {timeout:.0f}s\n" + "\n".join(airflow.tail(n) for n in airflow.procs))
        time.sleep(0.5)


def start_second_triggerer(airflow) -> None:
    """Start "triggerer2" and let it register and heartbeat. SQLite, which these services share, can answer
    "database is locked" to its first write on a busy machine, and the triggerer then exits: start it again."""
    for _ in range(3):
        airflow.start("triggerer2", "triggerer", "--skip-serve-logs")
        try:
            airflow.procs["triggerer2"].wait(timeout=10)
        except subprocess.TimeoutExpired:
            return  # running for 10 s: registered and heartbeating
    raise AssertionError(f"the second triggerer did not stay up\n{airflow.tail('triggerer2')}")


def deletes(cluster) -> list:
    return [r for r in cluster.request_log if r[0] == "DELETE"]


@pytest.mark.parametrize("new_state", ["failed", "success"])
def test_marking_a_deferred_task_failed_or_successful_deletes_its_pod(airflow, k8s_cluster, dag, new_state):
    """The user's action through the REST API: the real triggerer cancels the trigger and calls on_kill, which
    finds the task no longer deferred and deletes the pod."""
    dag_id = f"lora_mark_{new_state}"
    run_id = dag(dag_id)
    airflow.api("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/train", {"new_state": new_state})
    wait_for(lambda: not k8s_cluster.pods(), "the pod deleted", airflow, timeout=90)
    assert len(deletes(k8s_cluster)) == 1
    assert f"the task is now {new_state}" in airflow.task_log(dag_id, run_id, "train")


def test_clearing_a_deferred_task_stops_its_training_and_the_next_try_starts_a_new_one(airflow, k8s_cluster, dag):
    """Clear (the UI's and the REST API's). The triggerer cancels try 1's trigger and calls its on_kill; the
    scheduler starts try 2, often before that call (seen in 2 of 3 CI runs). Whichever comes first stops try 1's
    training: on_kill deletes the pod, or try 2 replaces it (a run handed to another try's trigger is never
    adopted); try 2 trains in its own pod and succeeds. Before: try 2 could adopt try 1's pod, which on_kill then
    kept (the stopped training finished) or deleted under try 2 (it failed with "Deleted")."""
    dag_id = "lora_clear"
    run_id = dag(dag_id, lines=40)
    airflow.api("POST", f"/dags/{dag_id}/clearTaskInstances", {
        "dry_run": False, "only_failed": False, "task_ids": ["train"], "dag_run_id": run_id})
    release = release_file(airflow, dag_id)

    def release_once_a_pod_is_deleted() -> None:  # try 1's: then try 2's pod need not print its 40 lines
        if not release.exists() and deletes(k8s_cluster):
            release.touch()

    state = airflow.wait_for_run(dag_id, run_id, timeout=180, on_poll=release_once_a_pod_is_deleted)
    log = airflow.task_log(dag_id, run_id, "train")
    assert state == "success", log[-6000:]
    stopped_by_on_kill = "deleted pod" in log and "the task is now" in log
    stopped_by_try_2 = "handed to the trigger of try 1" in log and "replacing it" in log
    assert stopped_by_on_kill or stopped_by_try_2, log[-6000:]
    assert len(deletes(k8s_cluster)) >= 1, log[-6000:]
    [pod] = k8s_cluster.pods()
    assert pod["metadata"]["labels"]["lora.airflow-provider/try_number"] == "2"


def test_a_triggerer_that_loses_the_trigger_to_another_leaves_the_training_running(airflow, k8s_cluster, dag):
    """Two triggerers. The one following the training stops answering (SIGSTOP) past the health threshold, the other
    takes the trigger over; woken again, the first cancels the trigger it no longer owns through the same path as a
    user's action, on_kill. Before: on_kill deleted the pod and the task failed with "Deleted". Now the task is
    still deferred, nothing is deleted, and the training finishes under the second triggerer."""
    dag_id = "lora_takeover"
    run_id = dag(dag_id, lines=360)  # three minutes at most: it ends once the first triggerer called on_kill
    first = airflow.task_instance(dag_id, run_id, "train")["triggerer_job"]["id"]
    start_second_triggerer(airflow)
    with airflow.paused("triggerer"):
        wait_for(lambda: (airflow.task_instance(dag_id, run_id, "train").get("triggerer_job") or {}).get("id")
                 not in (None, first), "taken over by the second triggerer", airflow, timeout=90)
    # Woken, the first triggerer cancels the trigger it lost and calls on_kill while the pod still runs; then the
    # training may end.
    wait_for(lambda: "the task is still deferred" in airflow.task_log(dag_id, run_id, "train"),
             "on_kill called by the first triggerer", airflow, timeout=90)
    release_file(airflow, dag_id).touch()
    state = airflow.wait_for_run(dag_id, run_id, timeout=240)
    log = airflow.task_log(dag_id, run_id, "train")
    assert state == "success", log[-6000:]
    assert deletes(k8s_cluster) == [], log[-6000:]
    # The first triggerer did call on_kill, and kept the pod.
    assert "the task is still deferred" in log, log[-6000:]
    assert airflow.xcom(dag_id, run_id, "train")["summary"]["global_step"] == 1


def test_execution_timeout_fails_the_deferred_task_and_deletes_its_pod(airflow, k8s_cluster, dag):
    """Before: the task stayed deferred past execution_timeout, and the pod ran on."""
    dag_id = "lora_timeout"
    run_id = dag(dag_id, extra="execution_timeout=datetime.timedelta(seconds=25),", wait=False)
    state = airflow.wait_for_run(dag_id, run_id, timeout=120)
    log = airflow.task_log(dag_id, run_id, "train")
    assert state == "failed", log[-6000:]
    assert "execution_timeout" in log and "AirflowTaskTimeout" in log, log[-6000:]
    wait_for(lambda: not k8s_cluster.pods(), "the pod deleted", airflow, timeout=60)
