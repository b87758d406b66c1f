"""Faults, broken on purpose: each way a training pod or the Kubernetes API can fail, driven through the operator
(create or reattach -> wait with the trigger's loop -> collect -> clean up) against the emulated API server.

Each case ends with its own reason in the error the task log shows, leaves nothing running, and leaves no run marked
complete with missing files. The pod runs a cheap stand-in for the trainer (a short Python program); the real
trainer's runs are in test_operator_pod.py and, for resuming, below. Counts and findings: docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from airflow_provider_lora.compat import AirflowException
from airflow_provider_lora.core import render
from airflow_provider_lora.core.launchers import pod as pod_launcher
from airflow_provider_lora.kube import close_shared_clients
from airflow_provider_lora.operators.lora import LoRATrainingOperator
from tests.test_pod_launcher import REGISTRY_DOWN, cheap_pod, create, first_event, trigger

WORKING = "import time\nfor i in range(400):\n    print('working', i, flush=True)\n    time.sleep(0.05)"
RESULT = 'print("step 1"); print("LORA_RESULT " + __import__("json").dumps({"summary": {"global_step": 1}}))'


def oom_kill_once_logged(cluster, text: str, timeout: float = 300) -> threading.Thread:
    """A started thread that OOM-kills the first pod (the emulator's "oom" fault) once its log holds ``text``."""
    def kill() -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pods = cluster.pods()
            if pods and text in cluster.logs("default", pods[0]["metadata"]["name"]):
                cluster.set_fault("oom", pod=pods[0]["metadata"]["name"], after_seconds=0)
                return
            time.sleep(0.2)
    killer = threading.Thread(target=kill)
    killer.start()
    return killer


class StandInTI:
    """The TaskInstance attributes the operator reads (identity, try number) and XCom pushes it makes."""

    def __init__(self, try_number: int = 1, run_id: str = "r1", die_on_push: bool = False):
        self.dag_id, self.task_id, self.run_id, self.map_index = "reliability", "train", run_id, -1
        self.try_number, self.die_on_push, self.xcom = try_number, die_on_push, {}

    def xcom_push(self, key, value):
        if self.die_on_push:
            raise SystemExit("the worker died between creating the pod and deferring")
        self.xcom[key] = value


@pytest.fixture
def stand_in(monkeypatch, s3_endpoint):
    """The operator's pod runs `script` instead of the trainer (everything else as rendered)."""
    holder = {"script": WORKING}
    monkeypatch.setattr(render, "trainer_argv", lambda spec, nproc: ["python", "-c", holder["script"]])
    return holder


def operator(cluster, **kwargs) -> LoRATrainingOperator:
    settings = dict(
        task_id="train", launcher="pod", image="registry.example/lora-trainer:0.1.0", kubernetes_conn_id=None,
        config_file=str(cluster.kubeconfig), poll_interval=0.2, startup_timeout=60, deferrable=False, base_model="org/model", dataset="org/data",
        output_uri="s3://reliability/out", resource_gpu_per_worker=0, resource_cpu_per_worker="1",
        resource_memory_per_worker="1Gi")
    return LoRATrainingOperator(**{**settings, **kwargs})


def nothing_running(cluster) -> bool:
    """No pod of the cluster is pending or running (a kept failed pod is fine: its processes are gone)."""
    for p in cluster.pods():
        phase = p["status"].get("phase")
        frozen = bool(p["metadata"].get("deletionTimestamp"))  # Terminating on a lost node: nothing runs
        if phase in ("Pending", "Running") and not frozen:
            return False
    return all(c.proc is None or c.proc.returncode is not None
               for run in cluster._runs.values() for c in run.containers.values())


def fail_with(cluster, op, ti=None) -> str:
    with pytest.raises(AirflowException) as info:
        op.execute({"ti": ti or StandInTI()})
    return str(info.value)


# ---- a running pod dies ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault, params, expected", [
    ("oom", {"after_lines": 5}, ["OOMKilled", "exit code 137"]),
    ("evict", {"after_lines": 5}, ["Evicted", "low on resource: memory"]),
    ("node_lost", {"after_lines": 5, "not_ready_after": 0.1, "evict_after": 0.3}, ["NodeLost", "Taint manager"]),
])
def test_a_pod_that_dies_fails_the_task_with_its_reason_and_last_lines(k8s_cluster, stand_in, fault, params,
                                                                        expected):
    k8s_cluster.set_fault(fault, pod="lora-*", **params)
    message = fail_with(k8s_cluster, operator(k8s_cluster))
    for text in expected:
        assert text in message, message
    if fault != "node_lost":  # a lost node's log is gone with it; the reason still says why
        assert "working 3" in message  # the last log lines come with the reason
    assert nothing_running(k8s_cluster)
    assert len([r for r in k8s_cluster.request_log if r[0] == "POST" and r[1].endswith("/pods")]) == 1


# ---- a pod that never starts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault, params, expected", [
    ("unschedulable", {}, ["Unschedulable", "Insufficient nvidia.com/gpu", "startup_timeout=2s"]),
    ("image_pull_backoff", {"message": REGISTRY_DOWN}, ["ImagePullBackOff", "Back-off pulling image",
                                                        "startup_timeout=2s"]),
])
def test_a_pod_pending_past_startup_timeout_fails_and_is_deleted(k8s_cluster, stand_in, fault, params, expected):
    """Transient reasons (an autoscaler may add a node; a registry may come back) wait the whole startup_timeout.
    Then the pod is deleted whatever on_finish_action says: kept, it could start later with nobody watching."""
    k8s_cluster.set_fault(fault, pod="lora-*", times=None, **params)
    message = fail_with(k8s_cluster, operator(k8s_cluster, startup_timeout=2, on_finish_action="keep_pod"))
    for text in expected:
        assert text in message, message
    assert k8s_cluster.pods() == []


def test_an_invalid_image_fails_at_once_instead_of_waiting_the_startup_timeout(k8s_cluster):
    """InvalidImageName never clears: the trigger reports it on the first poll that sees it (startup_timeout is
    an hour here). The operator refuses such an image before launching; this pod comes from elsewhere."""
    bad = cheap_pod("badimage", "print('never')")
    bad["spec"]["containers"][0]["image"] = "Registry.Example/Team/Trainer"
    create(k8s_cluster, bad)
    event = first_event(trigger(k8s_cluster, "badimage", startup_timeout=3600), timeout=30)
    assert event["status"] == "stuck" and event["reason"] == "InvalidImageName", event
    assert "does not clear by waiting" in event["description"] and "invalid reference format" in event["description"]


def test_an_image_the_registry_does_not_have_fails_the_task_at_once_and_is_not_retried(k8s_cluster, stand_in):
    """ErrImagePull "not found" (a tag nobody pushed): the task fails on the first poll that sees it, not after
    startup_timeout (an hour here), spends no retry, and the pod is deleted."""
    from airflow_provider_lora.compat import AirflowFailException

    k8s_cluster.set_fault("image_pull_backoff", pod="lora-*", times=None, backoff_after=30)
    started = time.monotonic()
    with pytest.raises(AirflowFailException) as info:
        operator(k8s_cluster, startup_timeout=3600, image="registry.example/lora-trainer:no-such-tag").execute(
            {"ti": StandInTI()})
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert "ImageNotFound" in message and "registry.example/lora-trainer:no-such-tag: not found" in message, message
    assert "not retried" in message
    assert k8s_cluster.pods() == []


def test_a_missing_secret_fails_after_a_short_grace_not_the_startup_timeout(k8s_cluster, stand_in, monkeypatch):
    """CreateContainerConfigError (the secret key is missing) gets a grace for the secret to appear, then fails;
    the grace is 60 s, shortened here."""
    monkeypatch.setitem(pod_launcher.STUCK_WAITING_REASONS, "CreateContainerConfigError", 1.0)
    op = operator(k8s_cluster, startup_timeout=3600, hf_token_secret="no-such-secret/token")
    message = fail_with(k8s_cluster, op)
    assert "CreateContainerConfigError" in message and 'secret "no-such-secret" not found' in message, message
    assert "does not clear by waiting" in message
    assert k8s_cluster.pods() == []


def test_a_missing_secret_created_within_the_grace_lets_the_pod_start(k8s_cluster, stand_in, monkeypatch):
    monkeypatch.setitem(pod_launcher.STUCK_WAITING_REASONS, "CreateContainerConfigError", 30.0)
    stand_in["script"] = RESULT
    import threading

    threading.Timer(1.0, lambda: k8s_cluster.create_secret("default", "late-secret", {"token": "x"})).start()
    op = operator(k8s_cluster, startup_timeout=3600, hf_token_secret="late-secret/token", on_finish_action="keep_pod")
    result = op.execute({"ti": StandInTI()})
    assert result["summary"]["global_step"] == 1


# ---- the Kubernetes API misbehaves ------------------------------------------------------------------------------

def test_api_timeouts_are_retried_then_reported_with_what_failed(k8s_cluster, monkeypatch):
    from airflow_provider_lora import kube

    monkeypatch.setattr(kube, "API_TIMEOUT_SECONDS", 0.5)
    # Two seconds of work, not WORKING's twenty: the faults hit the trigger's reads of the pod whatever its phase,
    # and the first event only comes once the pod ended.
    create(k8s_cluster, cheap_pod("slow", WORKING.replace("range(400)", "range(40)")))
    k8s_cluster.set_fault("api_timeout", path=r"/pods/slow$", seconds=3, times=2)
    assert first_event(trigger(k8s_cluster, "slow"), timeout=120)["status"] == "success"  # two misses: survived
    k8s_cluster.set_fault("api_timeout", path=r"/pods/slow$", seconds=3, times=None)
    event = first_event(trigger(k8s_cluster, "slow"), timeout=60)
    assert event["status"] == "error" and "5 Kubernetes API calls in a row failed" in event["description"]
    assert "TimeoutError" in event["description"], event


# Create retries, refusals, a 409 race and replacing a failed run: tests/test_launch_protocol.py (Pod and TrainJob,
# operator and KFP component alike).

def test_the_log_read_failing_mid_run_loses_and_repeats_no_line(k8s_cluster, caplog):
    """The trigger reads logs by cursor (sinceTime), not by one long stream, so a cut or failed read is
    followed by a read from the same cursor."""
    import logging

    from tests.test_pod_launcher import shown_lines

    caplog.set_level(logging.INFO)
    script = "import time\nfor i in range(30):\n    print('line', i, flush=True)\n    time.sleep(0.05)"
    create(k8s_cluster, cheap_pod("cut", script))
    k8s_cluster.wait_for_pod("default", "cut", until=lambda p: "line 5" in k8s_cluster.logs("default", "cut"))
    k8s_cluster.set_fault("api_error", path=r"/pods/cut/log$", status=500, times=3)
    k8s_cluster.set_fault("api_timeout", path=r"/pods/cut/log$", seconds=1, times=1)
    assert first_event(trigger(k8s_cluster, "cut"))["status"] == "success"
    assert shown_lines(caplog, "cut") == [f"line {i}" for i in range(30)]


# ---- the worker or the task goes away ------------------------------------------------------------------------------

def test_a_worker_killed_between_create_and_defer_is_reattached_never_duplicated(k8s_cluster, stand_in):
    stand_in["script"] = "import time; time.sleep(1.5); " + RESULT
    with pytest.raises(SystemExit):
        operator(k8s_cluster, deferrable=True).execute({"ti": StandInTI(try_number=1, die_on_push=True)})
    assert len(k8s_cluster.pods()) == 1
    ti = StandInTI(try_number=2)
    result = operator(k8s_cluster, on_finish_action="keep_pod").execute({"ti": ti})
    assert result["summary"]["global_step"] == 1
    creates = [r for r in k8s_cluster.request_log if r[0] == "POST" and r[1].endswith("/pods")]
    assert len(creates) == 1  # try 2 found try 1's pod by name
    [pod] = k8s_cluster.pods()
    assert pod["metadata"]["labels"]["lora.airflow-provider/try_number"] == "1"
    assert pod["metadata"]["name"] in json.dumps(ti.xcom)  # its identity is pushed before waiting


def test_killing_a_deferred_task_deletes_its_pod(k8s_cluster, stand_in):
    from airflow.exceptions import TaskDeferred

    op = operator(k8s_cluster, deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": StandInTI()})
    name = deferred.value.trigger.name
    k8s_cluster.wait_for_pod("default", name, until="Running")

    async def kill():
        try:
            await deferred.value.trigger.on_kill()  # the triggerer's side (Airflow 3.3+)
        finally:
            await close_shared_clients()
    asyncio.run(kill())
    deadline = time.monotonic() + 60
    while k8s_cluster.pods() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert k8s_cluster.pods() == [] and nothing_running(k8s_cluster)


def test_killing_a_task_waiting_in_the_worker_deletes_its_pod(k8s_cluster, stand_in):
    import threading

    op = operator(k8s_cluster)
    threading.Timer(1.5, op.on_kill).start()  # what the worker does on a kill or clear
    message = fail_with(k8s_cluster, op)
    assert "Deleted" in message and "HTTP response headers" not in message, message
    deadline = time.monotonic() + 60
    while k8s_cluster.pods() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert k8s_cluster.pods() == [] and nothing_running(k8s_cluster)


# ---- S3 goes away during the upload ------------------------------------------------------------------------------------

def test_an_s3_outage_during_upload_leaves_no_run_marked_complete(tmp_path):
    """A real S3 endpoint (moto's server) stops answering part way through publishing: the publish fails, and the
    location holds no _COMPLETE marker, so nothing reads it as a finished run; once S3 is back, a retry
    publishes it whole."""
    import boto3
    from botocore.config import Config
    from moto.server import ThreadedMotoServer

    from airflow_provider_lora.core import storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                      region_name="us-east-1", config=Config(retries={"max_attempts": 2, "mode": "standard"},
                                                             connect_timeout=1, read_timeout=2))
    s3.create_bucket(Bucket="runs")
    run = tmp_path / "run"
    for rel in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl",
                "summary.json", "loss_chart.html", "loss_chart.png"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"x" * 2048)

    uploads = {"n": 0}

    def outage_after_two(**kwargs):  # botocore's event hook: S3 goes down after two objects
        uploads["n"] += 1
        if uploads["n"] == 3:
            server.stop()

    s3.meta.events.register("before-call.s3.PutObject", outage_after_two)
    try:
        with pytest.raises(Exception) as info:
            storage.publish_run(run, "s3://runs/job", client=s3)
        assert "Could not connect" in str(info.value) or "Connection" in type(info.value).__name__, info.value
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # S3 is back, data lost
        server.start()
        s3.meta.events.unregister("before-call.s3.PutObject", outage_after_two)
        s3.create_bucket(Bucket="runs")
        assert not storage.is_complete("s3://runs/job", client=s3)
        storage.publish_run(run, "s3://runs/job", client=s3)
        marker = storage.read_marker("s3://runs/job", client=s3)
        assert len(marker["files"]) == 6
    finally:
        server.stop()


def test_an_s3_outage_keeps_files_already_sent_unmarked(tmp_path, s3_endpoint, s3_bucket):
    """The same outage against the session's S3, with the files already sent still there: they are not a run."""
    import boto3

    from airflow_provider_lora.core import storage

    run = tmp_path / "run"
    for rel in ("adapter/adapter_model.safetensors", "metrics.jsonl", "summary.json"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"y" * 1024)
    s3 = storage.s3_client()
    sent = {"n": 0}

    def fail_from_third(**kwargs):  # a blip would be retried (RETRIES); this outage lasts
        sent["n"] += 1
        if sent["n"] >= 3:
            from botocore.exceptions import EndpointConnectionError

            raise EndpointConnectionError(endpoint_url=s3_endpoint)

    s3.meta.events.register("before-send.s3.PutObject", fail_from_third)
    with pytest.raises(Exception, match="Could not connect"):
        storage.publish_run(run, f"s3://{s3_bucket}/job", client=s3)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys and f"job/{storage.COMPLETE_MARKER}" not in keys
    with pytest.raises(storage.IncompleteRunError):
        storage.read_marker(f"s3://{s3_bucket}/job")


def test_a_result_line_longer_than_16_kib_is_read_back_whole(k8s_cluster, stand_in):
    """The runtime cuts log lines into 16 KiB parts, and a timestamped log glues each part's timestamp to the
    previous part; 500 history rows make a result line of about 50 KiB. (Before the fix: JSONDecodeError, and a
    successful training failed the task.)"""
    history = [{"step": i, "loss": 1 / (i + 1), "grad_norm": 0.5, "learning_rate": 2e-4, "epoch": i / 500}
               for i in range(1, 501)]
    stand_in["script"] = ("import json; print('LORA_RESULT ' + json.dumps({'summary': {'global_step': 500}, "
                          f"'history': {history!r}, 'artifacts': {{}}}}))")
    result = operator(k8s_cluster, on_finish_action="keep_pod").execute({"ti": StandInTI()})
    assert result["history"] == history
    name = k8s_cluster.pods()[0]["metadata"]["name"]
    assert len(k8s_cluster.logs("default", name)) > 3 * 16384
