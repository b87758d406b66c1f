"""The pod launcher against the emulated Kubernetes API (real kubernetes / kubernetes_asyncio clients over HTTPS):
the trigger's events for each way a pod ends, log following across a triggerer restart, and the operator's
create-or-reattach."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

import pytest

from airflow_provider_lora.core.launchers.pod import LOG_CURSOR_ANNOTATION, LogCursor
from airflow_provider_lora.kube import close_shared_clients
from airflow_provider_lora.triggers.lora import LoRATrainingTrigger


def cheap_pod(name: str, script: str) -> dict:
    """A stand-in training pod: a short Python program instead of the trainer."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "trainer", "image": "trainer", "command": ["python", "-c", script]}]}}


def create(cluster, pod: dict) -> None:
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    api.create_namespaced_pod("default", pod)


def first_event(trigger: LoRATrainingTrigger, timeout: float = 60) -> dict:
    async def run():
        try:
            async for event in trigger.run():
                return event.payload
        finally:
            await close_shared_clients()
    return asyncio.run(asyncio.wait_for(run(), timeout))


def trigger(cluster, name: str, **kwargs) -> LoRATrainingTrigger:
    return quiet(LoRATrainingTrigger(name=name, namespace="default", kubernetes_conn_id=None,
                                     config_file=str(cluster.kubeconfig), poll_interval=0.2, **kwargs))


def quiet(t: LoRATrainingTrigger) -> LoRATrainingTrigger:
    """Send the trigger's log to a plain stdlib logger that pytest's caplog sees (Airflow's goes to structlog)."""
    t._log = logging.getLogger("tests.trigger")
    return t


def shown_lines(caplog, name: str) -> list[str]:
    prefix = f"[{name}] "
    return [r.getMessage()[len(prefix):] for r in caplog.records if r.getMessage().startswith(prefix)]


def test_success_and_every_log_line_once(k8s_cluster, caplog):
    caplog.set_level(logging.INFO)
    create(k8s_cluster, cheap_pod("ok", "import time\nfor i in range(30):\n    print('line', i, flush=True)\n"
                                        "    time.sleep(0.01)"))
    event = first_event(trigger(k8s_cluster, "ok"))
    assert event["status"] == "success" and event["exit_code"] == 0
    assert shown_lines(caplog, "ok") == [f"line {i}" for i in range(30)]


def test_failure_carries_the_exit_code(k8s_cluster):
    create(k8s_cluster, cheap_pod("bad", "import sys; print('boom'); sys.exit(3)"))
    event = first_event(trigger(k8s_cluster, "bad"))
    assert event["status"] == "failed" and event["exit_code"] == 3 and "exit code 3" in event["description"]


@pytest.mark.parametrize("fault, params, reason", [
    ("oom", {"after_lines": 3}, "OOMKilled"),
    ("evict", {"after_lines": 3}, "Evicted"),
    ("node_lost", {"after_lines": 3, "not_ready_after": 0.1, "evict_after": 0.3}, "NodeLost"),
])
def test_each_way_a_running_pod_dies_has_its_reason(k8s_cluster, fault, params, reason):
    k8s_cluster.set_fault(fault, pod="dies", **params)
    create(k8s_cluster, cheap_pod("dies", "import time\nwhile True:\n    print('working', flush=True)\n"
                                          "    time.sleep(0.05)"))
    event = first_event(trigger(k8s_cluster, "dies"))
    assert event["status"] == "failed" and event["reason"] == reason, event


# A registry that does not answer: the pull may succeed later, unlike one of an image that does not exist.
REGISTRY_DOWN = ('rpc error: code = Unknown desc = failed to pull and unpack image "registry.example/trainer:1": '
                 'failed to resolve reference "registry.example/trainer:1": failed to do request: Head '
                 '"https://registry.example/v2/trainer/manifests/1": dial tcp 10.0.0.7:443: i/o timeout')


@pytest.mark.parametrize("fault, params, reason, event_text", [
    ("unschedulable", {}, "Unschedulable", "Insufficient nvidia.com/gpu"),
    ("image_pull_backoff", {"message": REGISTRY_DOWN}, "ImagePullBackOff", "Back-off pulling image"),
])
def test_a_pod_stuck_pending_past_startup_timeout_names_the_reason_and_events(k8s_cluster, fault, params, reason,
                                                                               event_text):
    k8s_cluster.set_fault(fault, pod="stuck", times=None, **params)
    create(k8s_cluster, cheap_pod("stuck", "print('never')"))
    event = first_event(trigger(k8s_cluster, "stuck", startup_timeout=1.5))
    assert event["status"] == "stuck" and reason in event["reason"] + event["description"], event
    assert event_text in event["description"]


def test_an_image_the_registry_does_not_have_fails_at_once_instead_of_waiting_the_startup_timeout(k8s_cluster):
    """The kubelet's pull was answered "not found" (the emulator words it as containerd does): no waiting helps, so
    the trigger reports it on the poll that sees it, not after startup_timeout (an hour here)."""
    k8s_cluster.set_fault("image_pull_backoff", pod="missing", times=None, backoff_after=30)
    create(k8s_cluster, cheap_pod("missing", "print('never')"))
    started = time.monotonic()
    event = first_event(trigger(k8s_cluster, "missing", startup_timeout=3600), timeout=30)
    assert time.monotonic() - started < 10
    assert event["status"] == "stuck" and event["reason"] == "ImageNotFound", event
    assert "ErrImagePull" in event["description"] and ": not found" in event["description"]
    assert "does not clear by waiting" in event["description"]


def test_api_errors_are_retried_then_reported(k8s_cluster):
    create(k8s_cluster, cheap_pod("flaky", "print('done')"))
    k8s_cluster.set_fault("api_error", path=r"/pods/flaky$", status=500, times=2)
    assert first_event(trigger(k8s_cluster, "flaky"))["status"] == "success"
    k8s_cluster.set_fault("api_error", path=r"/pods/flaky$", status=500, times=None)
    event = first_event(trigger(k8s_cluster, "flaky"))
    assert event["status"] == "error" and "5 Kubernetes API calls in a row failed" in event["description"]


def test_too_many_requests_honours_retry_after(k8s_cluster):
    create(k8s_cluster, cheap_pod("busy", "print('done')"))
    k8s_cluster.set_fault("api_error", path=r"/pods/busy$", status=429, times=1)
    assert first_event(trigger(k8s_cluster, "busy"))["status"] == "success"


def test_a_restarted_trigger_continues_the_log_without_repeats_or_gaps(k8s_cluster, caplog):
    caplog.set_level(logging.INFO)
    script = ("import time\nfor i in range(40):\n    print('line', i, flush=True)\n    time.sleep(0.1)")
    create(k8s_cluster, cheap_pod("long", script))
    first = trigger(k8s_cluster, "long", log_interval=0.2)  # lines shown while it runs, not only at its end

    async def run_until_some_lines_are_shown():
        async def consume():
            async for _ in first.run():
                pass
        task = asyncio.ensure_future(consume())
        for _ in range(300):  # at most 30 s on a loaded machine
            await asyncio.sleep(0.1)
            if len(shown_lines(caplog, "long")) >= 3:
                break
        task.cancel()  # the triggerer dies mid-run
        await asyncio.gather(task, return_exceptions=True)
        await close_shared_clients()
    asyncio.run(run_until_some_lines_are_shown())
    before = shown_lines(caplog, "long")
    assert 0 < len(before) < 40
    cursor = LogCursor.decode(k8s_cluster.get_pod("default", "long")["metadata"]["annotations"][LOG_CURSOR_ANNOTATION])
    assert cursor.timestamp
    classpath, kwargs = first.serialize()
    event = first_event(quiet(LoRATrainingTrigger(**kwargs)))  # a new triggerer, from serialize()
    assert event["status"] == "success"
    assert shown_lines(caplog, "long") == [f"line {i}" for i in range(40)]


def test_the_sync_client_and_kubectl_see_the_same_pod(k8s_cluster):
    import shutil
    import subprocess

    create(k8s_cluster, cheap_pod("seen", "print('hello from the pod')"))
    k8s_cluster.wait_for_pod("default", "seen")
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(["kubectl", "--kubeconfig", str(k8s_cluster.kubeconfig), "logs", "seen"],
                         capture_output=True, text=True, check=True).stdout
    assert "hello from the pod" in out


def test_a_pod_deleted_by_someone_else_fails_with_reason_deleted(k8s_cluster):
    import threading

    from kubernetes import client, config

    create(k8s_cluster, cheap_pod("gone", "import time\nwhile True:\n    print('x', flush=True)\n    time.sleep(0.05)"))
    k8s_cluster.wait_for_pod("default", "gone", until="Running")
    api = client.CoreV1Api(config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig)))
    threading.Timer(0.5, lambda: api.delete_namespaced_pod("gone", "default", grace_period_seconds=0)).start()
    event = first_event(trigger(k8s_cluster, "gone"))
    assert event["status"] == "failed" and event["reason"] == "Deleted", event


def test_the_result_falls_back_to_the_termination_message(k8s_cluster):
    """A succeeded pod whose log no longer holds the result line: the operator takes the headline result the
    trainer wrote to the termination message (no history), instead of failing."""
    from airflow_provider_lora.operators.lora import LoRATrainingOperator

    script = ("import json, os\n"
              "open(os.environ['LORA_TERMINATION_LOG'], 'w').write(json.dumps({'summary': {'global_step': 7}, "
              "'artifacts': {'root': 's3://b/run'}}))\nprint('log without a result line')")
    create(k8s_cluster, cheap_pod("term", script))
    k8s_cluster.wait_for_pod("default", "term")
    task = LoRATrainingOperator(task_id="t", kubernetes_conn_id=None, config_file=str(k8s_cluster.kubeconfig),
                                on_finish_action="keep_pod")
    result = task.execute_complete({}, {"status": "success", "name": "term", "namespace": "default", "launcher": "pod", "log_pod": "term"})
    assert result == {"summary": {"global_step": 7}, "history": [], "artifacts": {"root": "s3://b/run"}}
