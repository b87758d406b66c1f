"""A successful training must never end failed (issue 14): the result survives the pod, the log and the termination
message; on_kill stops a training only when its task really ended; execution_timeout holds while deferred; inputs
the pod cannot start with are refused before launching. Each case runs the operator and trigger against the
emulated API server with a stand-in trainer (tests/test_reliability_faults.py); findings: docs/reliability.md."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time

import pytest

from airflow_provider_lora.compat import AirflowException, AirflowFailException
from airflow_provider_lora.core import results, storage
from airflow_provider_lora.kube import close_shared_clients
from airflow_provider_lora.triggers import lora as trigger_module
from tests.test_pod_launcher import cheap_pod, create, first_event, quiet, shown_lines, trigger
from tests.test_reliability_faults import (  # noqa: F401  (stand_in is a fixture)
    RESULT, WORKING, StandInTI, nothing_running, operator, stand_in,
)

RESULT_LINE = {"summary": {"global_step": 3, "final_loss": 0.5},
               "history": [{"step": i, "loss": 1 / i} for i in range(1, 4)], "artifacts": {"root": "s3://b/run"}}


def posts(cluster) -> list:
    return [r for r in cluster.request_log if r[0] == "POST" and r[1].endswith("/pods")]


def deferred(op, ti=None):
    """execute() up to the deferral: (the trigger, TaskDeferred)."""
    from airflow.sdk.exceptions import TaskDeferred

    with pytest.raises(TaskDeferred) as info:
        op.execute({"ti": ti or StandInTI()})
    return quiet(info.value.trigger), info.value


def delete_now(cluster, name: str) -> None:
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    api.delete_namespaced_pod(name, "default", grace_period_seconds=0)
    deadline = time.monotonic() + 30
    while cluster.get_pod("default", name) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.get_pod("default", name) is None


def publish(tmp_path, output_uri: str, summary: dict, steps: int = 3) -> None:
    run = tmp_path / "published"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1 / i}) + "\n"
                                               for i in range(1, steps + 1)))
    storage.publish_run(run, output_uri)


# ---- 1. the result travels with the run, not the pod ------------------------------------------------------------

def test_a_pod_gone_when_the_task_resumes_still_gives_the_result(k8s_cluster, stand_in, capfd):
    """The pod was garbage-collected (or another worker of this try deleted it) before the task resumed. Before:
    `(404) pods ... not found` failed a finished training, and the log said it deleted the pod."""
    stand_in["script"] = f"print('LORA_RESULT ' + {json.dumps(json.dumps(RESULT_LINE))})"
    op = operator(k8s_cluster, deferrable=True)  # on_finish_action: delete_succeeded_pod
    trig, _ = deferred(op)
    event = first_event(trig)
    assert event["status"] == "success"
    delete_now(k8s_cluster, trig.name)
    capfd.readouterr()
    result = op.execute_complete({}, event)
    assert result == RESULT_LINE and event["result"] == RESULT_LINE  # carried by the trigger's event
    logged = capfd.readouterr().out
    assert "is already gone: nothing to delete" in logged and "deleted pod" not in logged, logged


def test_a_result_the_event_lacks_comes_from_the_published_run(k8s_cluster, stand_in, s3_bucket, tmp_path):
    """A restarted triggerer whose cursor was past the result line, and the pod gone: the run published at
    output_uri (its _COMPLETE marker, summary and metrics, read with the worker's S3 client) is the result."""
    output = f"s3://{s3_bucket}/runs/gone"
    stand_in["script"] = "print('trained, result line not seen')"
    op = operator(k8s_cluster, deferrable=True, output_uri=output)
    trig, _ = deferred(op)
    event = first_event(trig)
    assert event["status"] == "success" and event.get("result") is None
    publish(tmp_path, output, {"global_step": 3, "final_loss": 0.25})
    delete_now(k8s_cluster, trig.name)
    result = op.execute_complete({}, event)
    assert result["summary"] == {"global_step": 3, "final_loss": 0.25}
    assert [r["step"] for r in result["history"]] == [1, 2, 3]
    assert result["artifacts"]["adapter"] == f"{output}/adapter"


def test_a_retry_returns_its_own_published_run_and_refuses_anothers(k8s_cluster, stand_in, s3_bucket, tmp_path):
    """Try 1 published and then failed (its pod gone before it collected): try 2 finds the run at output_uri with
    its own spec and task identity and returns it, launching nothing. Before: `_COMPLETE is present`, failed for
    good. A run of another task instance at the same output is still refused."""
    from lora_trainer.export import redacted_spec

    output = f"s3://{s3_bucket}/runs/own"
    op = operator(k8s_cluster, output_uri=output, checkpoint_at_epoch=True)
    task = {"dag_id": "reliability", "task_id": "train", "run_id": "r1", "map_index": -1,
            "deployment": op.deployment}
    # What the trainer records: the spec (env values redacted) and the task instance from the pod's LORA_TASK.
    publish(tmp_path, output, {"global_step": 3, "spec": redacted_spec(op._spec()), "task": task})
    result = op.execute({"ti": StandInTI(try_number=2)})
    assert result["summary"]["global_step"] == 3 and len(result["history"]) == 3
    assert posts(k8s_cluster) == [] and k8s_cluster.pods() == []

    with pytest.raises(AirflowFailException, match="already holds a completed run"):
        operator(k8s_cluster, output_uri=output).execute({"ti": StandInTI(run_id="another-run")})
    with pytest.raises(AirflowFailException, match="already holds a completed run"):  # same task, other spec
        operator(k8s_cluster, output_uri=output, lora_r=4).execute({"ti": StandInTI(try_number=2)})
    assert posts(k8s_cluster) == []


def test_the_trainer_of_a_retry_returns_its_own_run_published_on_a_path(tmp_path, monkeypatch, capsys):
    """A path output (a PVC) the worker cannot see: the retry's pod starts, and the trainer finds the run its
    task's earlier try published there. Before: it refused the output (exit code 2, `_COMPLETE is present`)."""
    from lora_trainer import train
    from lora_trainer.export import redacted_spec

    from airflow_provider_lora.core.spec import LoRASpec

    output = str(tmp_path / "out")
    spec = LoRASpec.parse({"base_model": "org/model", "dataset": "org/data", "output_uri": output,
                           "checkpoint_at_epoch": True})
    task = {"dag_id": "d", "task_id": "train", "run_id": "r1", "map_index": -1, "deployment": "default"}
    publish(tmp_path, output, {"global_step": 3, "spec": redacted_spec(spec), "task": task})
    monkeypatch.setenv("LORA_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monkeypatch.setenv("LORA_TASK", json.dumps({**task, "run_id": "another-run"}))
    with pytest.raises(storage.OutputExistsError):
        train.run(spec)
    monkeypatch.setenv("LORA_TASK", json.dumps(task))
    outcome = train.run(spec.model_copy(update={"resume_from_checkpoint": "latest"}))  # what a retry runs
    assert outcome.summary["global_step"] == 3 and outcome.model is None  # no model was loaded
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("LORA_RESULT "))
    assert json.loads(line.removeprefix("LORA_RESULT "))["summary"]["global_step"] == 3


def test_the_pod_carries_the_task_identity_for_the_trainer_to_record(k8s_cluster, stand_in):
    stand_in["script"] = "import os; print('TASK ' + os.environ['LORA_TASK']); " + RESULT
    op = operator(k8s_cluster, on_finish_action="keep_pod")
    op.execute({"ti": StandInTI(run_id="manual__$(HF_TOKEN)")})
    [pod] = k8s_cluster.pods()
    line = next(x for x in k8s_cluster.logs("default", pod["metadata"]["name"]).splitlines() if "TASK " in x)
    assert json.loads(line.split("TASK ", 1)[1]) == {
        "dag_id": "reliability", "task_id": "train", "run_id": "manual__$(HF_TOKEN)", "map_index": -1,
        "deployment": op.deployment}  # '$' kept as typed: Kubernetes' $(VAR) expansion does not reach it


# ---- 4. the result survives ordinary log behaviour ----------------------------------------------------------------

def test_a_result_line_followed_by_many_lines_is_not_lost(k8s_cluster, stand_in):
    """Other ranks' warnings at exit: hundreds of lines after the result line. Before: the operator read back the
    last 20 lines only, and the finished training failed."""
    stand_in["script"] = (f"print('LORA_RESULT ' + {json.dumps(json.dumps(RESULT_LINE))})\n"
                          "for i in range(400):\n    print('rank 1 warning at exit', i)")
    result = operator(k8s_cluster, on_finish_action="keep_pod").execute({"ti": StandInTI()})
    assert result == RESULT_LINE


def test_the_termination_message_stays_whole_json_with_a_long_output_uri(k8s_cluster, stand_in, tmp_path,
                                                                         monkeypatch):
    """The trainer's termination message with a 5,000-character output URI. Before: its JSON text was cut at
    4,000 characters, invalid, and a finished training whose log had lost the result line failed."""
    from lora_trainer.train import _write_termination_message

    root = "s3://bucket/" + "deep/" * 1000
    artifacts = storage.artifact_uris(root, [])
    monkeypatch.setenv("LORA_TERMINATION_LOG", str(tmp_path / "termination-log"))
    _write_termination_message(results.RunResult({"global_step": 9, "final_loss": 0.125}, [], artifacts))
    text = (tmp_path / "termination-log").read_text()
    assert len(text.encode()) <= 4096  # what Kubernetes keeps
    assert json.loads(text)["summary"]["global_step"] == 9

    # The operator reads it back from the pod (no result line in the log) and rebuilds the artifact URIs.
    stand_in["script"] = f"import os; open(os.environ['LORA_TERMINATION_LOG'], 'w').write({text!r})"
    result = operator(k8s_cluster, on_finish_action="keep_pod", output_uri=root.rstrip("/")).execute(
        {"ti": StandInTI()})
    assert result["summary"]["global_step"] == 9 and result["history"] == []
    assert result["artifacts"]["adapter"] == root.rstrip("/") + "/adapter"


def test_the_event_carries_at_most_500_history_rows():
    line = {"summary": {}, "history": [{"step": i, "loss": 1.0} for i in range(1, 2001)], "artifacts": {}}
    bounded = results.bounded_result(line)
    assert len(bounded["history"]) == 500 and bounded["history"][-1]["step"] == 2000


# ---- 2. on_kill stops the training only when the task really ended ---------------------------------------------------

class TriggererTI:
    """What a triggerer sets as trigger.task_instance (the fields task_state reads)."""
    dag_id, task_id, run_id, map_index, try_number = "reliability", "train", "r1", -1, 1


def kill(trig) -> None:
    async def go():
        try:
            await trig.on_kill()
        finally:
            await close_shared_clients()
    asyncio.run(go())


@pytest.mark.parametrize("state, deletes", [
    ("deferred", False),  # another triggerer took the trigger over: the training goes on
    ("failed", True), ("success", True), (None, True), ("up_for_retry", True),  # mark failed / success, clear
    (RuntimeError("execution API unreachable"), False),  # unknown: keep it rather than kill a healthy run
])
def test_on_kill_deletes_only_when_the_task_is_no_longer_deferred(k8s_cluster, stand_in, monkeypatch, state,
                                                                   deletes):
    """The triggerer calls on_kill for a user's action and for a trigger it merely no longer owns (heartbeat lapsed,
    its "event loop appears deadlocked" check). Before: the pod was deleted in every case. The task state is
    faked here (what GetTaskStates answers through the triggerer's comms); test_real_airflow.py runs the real one."""
    asked = []

    async def fake_state(ti):
        asked.append((ti.dag_id, ti.task_id, ti.run_id, ti.map_index))
        if isinstance(state, Exception):
            raise state
        return state

    monkeypatch.setattr(trigger_module, "task_state", fake_state)
    trig, _ = deferred(operator(k8s_cluster, deferrable=True))
    trig.task_instance = TriggererTI()
    k8s_cluster.wait_for_pod("default", trig.name, until="Running")
    kill(trig)
    assert asked == [("reliability", "train", "r1", -1)]
    if deletes:
        deadline = time.monotonic() + 60
        while k8s_cluster.pods() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert k8s_cluster.pods() == [] and nothing_running(k8s_cluster)
    else:
        assert [p["status"]["phase"] for p in k8s_cluster.pods()] == ["Running"]
        assert not [r for r in k8s_cluster.request_log if r[0] == "DELETE"]


@pytest.mark.parametrize("state_seen_by_on_kill", ["scheduled", "deferred"])
def test_after_a_clear_the_next_try_replaces_the_run_and_the_cleared_tries_on_kill_leaves_it(
        k8s_cluster, stand_in, monkeypatch, state_seen_by_on_kill):
    """The race a real Airflow 3.3 showed (a clear on an active DAG): try 2 starts before the triggerer calls try
    1's on_kill. Try 2 does not adopt the training its user stopped: it replaces it. Try 1's on_kill, whatever state
    it then reads (try 2 not yet deferred, or deferred), leaves try 2's run alone. Before: try 2 adopted try 1's pod
    and on_kill either kept it (the stopped training finished) or deleted it under try 2 (try 2 failed)."""
    async def state_now(ti):
        return state_seen_by_on_kill

    monkeypatch.setattr(trigger_module, "task_state", state_now)
    from airflow_provider_lora.core.launchers import cluster as launch_protocol

    monkeypatch.setattr(launch_protocol, "HANDOVER_SECONDS", 1.0)  # try 1's trigger is not running here
    first, _ = deferred(operator(k8s_cluster, deferrable=True), StandInTI(try_number=1))
    first.task_instance = TriggererTI()  # try 1
    k8s_cluster.wait_for_pod("default", first.name, until="Running")
    first_uid = k8s_cluster.pods()[0]["metadata"]["uid"]
    second, _ = deferred(operator(k8s_cluster, deferrable=True), StandInTI(try_number=2))
    assert second.name == first.name  # the same name for every try
    [pod] = k8s_cluster.pods()
    assert pod["metadata"]["uid"] != first_uid
    assert pod["metadata"]["labels"]["lora.airflow-provider/try_number"] == "2"
    assert pod["metadata"]["annotations"]["lora.airflow-provider/deferred-by-try"] == "2"
    kill(first)
    assert [p["metadata"]["uid"] for p in k8s_cluster.pods()] == [pod["metadata"]["uid"]]
    assert len([r for r in k8s_cluster.request_log if r[0] == "DELETE"]) == 1  # try 2's, of try 1's pod


def test_on_kill_after_the_trigger_fired_its_event_deletes_nothing(k8s_cluster, stand_in, monkeypatch):
    """The event is out: the task resumes with it (and collects the result from the pod if it must)."""
    async def ended(ti):
        return "scheduled"

    monkeypatch.setattr(trigger_module, "task_state", ended)
    stand_in["script"] = RESULT
    trig, _ = deferred(operator(k8s_cluster, deferrable=True))
    trig.task_instance = TriggererTI()

    async def fire_then_kill():
        try:
            async for event in trig.run():
                assert event.payload["status"] == "success"
                break
            await trig.on_kill()
        finally:
            await close_shared_clients()
    asyncio.run(fire_then_kill())
    assert len(k8s_cluster.pods()) == 1
    assert not [r for r in k8s_cluster.request_log if r[0] == "DELETE"]


def test_task_state_asks_the_execution_api_for_this_task_instance(monkeypatch):
    """The message the trigger sends through the triggerer's comms, and how it reads a mapped task's answer."""
    from airflow.sdk.execution_time import task_runner
    from airflow.sdk.execution_time.comms import TaskStatesResult

    sent = []

    class Comms:
        async def asend(self, msg):
            sent.append(msg)
            return TaskStatesResult(task_states={"r1": {"train_3": "deferred"}})

    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", Comms(), raising=False)
    ti = TriggererTI()
    ti.map_index = 3
    assert asyncio.run(trigger_module.task_state(ti)) == "deferred"
    assert sent[0].type == "GetTaskStates" and sent[0].task_ids == ["train"] and sent[0].map_index == 3


def test_a_deleted_pod_says_so_not_that_no_pod_ever_started(k8s_cluster, stand_in):
    """Before: "Deleted: ... (no pod ever started)", though the pod had run."""
    op = operator(k8s_cluster, deferrable=True)
    trig, _ = deferred(op)
    k8s_cluster.wait_for_pod("default", trig.name, until="Running")
    delete_now(k8s_cluster, trig.name)
    event = first_event(trig)
    event["log_pod"] = None  # a trigger that never saw the pod (it was gone at the first poll)
    with pytest.raises(AirflowException) as info:
        op.execute_complete({}, event)
    assert "Deleted" in str(info.value) and "no pod ever started" not in str(info.value)
    assert "deleted before its log was read" in str(info.value)


# ---- 3. execution_timeout holds while deferred ----------------------------------------------------------------

def test_execution_timeout_fails_a_deferred_task_and_deletes_the_pod(k8s_cluster, stand_in):
    """Airflow does not enforce execution_timeout while a task is deferred. Before: the task stayed deferred and
    succeeded after the training ended. Now the trigger fires a timeout event at the try's start +
    execution_timeout, the task fails with the reason and the pod is deleted (even with keep_pod)."""
    from airflow.sdk.exceptions import AirflowTaskTimeout

    ti = StandInTI()
    ti.start_date = datetime.datetime.now(datetime.timezone.utc)
    op = operator(k8s_cluster, deferrable=True, execution_timeout=datetime.timedelta(seconds=3),
                  on_finish_action="keep_pod")
    trig, deferral = deferred(op, ti)
    assert trig.deadline == pytest.approx(ti.start_date.timestamp() + 3)
    assert deferral.timeout > datetime.timedelta(seconds=3)  # the padded backstop
    event = first_event(trig)
    assert event["status"] == "timeout" and "execution_timeout" in event["description"], event
    with pytest.raises(AirflowTaskTimeout, match="execution_timeout"):
        op.execute_complete({}, event)
    deadline = time.monotonic() + 60
    while k8s_cluster.pods() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert k8s_cluster.pods() == [] and nothing_running(k8s_cluster)


# ---- 5. limits before launch ---------------------------------------------------------------------------------

def test_an_envs_value_too_large_for_the_kernel_is_refused_before_launching(k8s_cluster, stand_in):
    """One 200 KB envs value. Before: a 201,049-character argument; the pod failed with `StartError (exit code
    128)` and nothing else, and the task retried the same pod."""
    op = operator(k8s_cluster, envs="BIG=" + "x" * 200_000)
    with pytest.raises(AirflowFailException) as info:
        op.execute({"ti": StandInTI()})
    message = str(info.value)
    assert "envs" in message and "MAX_ARG_STRLEN" in message and "131,072" in message, message
    assert "xxxx" not in message  # the value is never echoed
    assert posts(k8s_cluster) == []


def test_the_kfp_launch_refuses_an_envs_value_too_large_before_launching(k8s_cluster, tmp_path):
    """The KFP component's own launch path (kfp/cluster.py) checks the same limits."""
    from airflow_provider_lora.core.spec import LoRASpec
    from airflow_provider_lora.kfp.cluster import launch_settings, train_on_cluster

    workspace = str(tmp_path / "ws")
    env = {"KUBERNETES_SERVER_URL": k8s_cluster.url, "KUBERNETES_AUTH_TOKEN": k8s_cluster.token,
           "KUBERNETES_CA_CERT": str(k8s_cluster.ca_file), "LORA_KFP_TRAINING_IMAGE": "registry.example/t:1",
           "LORA_KFP_POD_OPTIONS": json.dumps({"volumes": [{"name": "ws", "hostPath": {"path": workspace}}],
                                                "volume_mounts": [{"name": "ws", "mountPath": workspace}]})}
    launch = launch_settings(env, None, workspace)
    spec = LoRASpec.parse({"base_model": "org/model", "dataset": "org/data", "output_uri": workspace + "/run",
                           "envs": "BIG=" + "x" * 200_000})
    with pytest.raises(ValueError, match=r"envs .*MAX_ARG_STRLEN"):
        train_on_cluster(spec, "pod", launch, key="k1", env=env, log=lambda line: None)
    assert posts(k8s_cluster) == []


def test_annotations_over_256_kib_are_refused_before_launching(k8s_cluster, stand_in):
    op = operator(k8s_cluster, metadata_annotations=",".join(f"note{i}={'y' * 1000}" for i in range(300)))
    with pytest.raises(AirflowFailException, match=r"metadata_annotations: .*262,144"):
        op.execute({"ti": StandInTI()})
    assert posts(k8s_cluster) == []


def test_a_pod_that_cannot_start_shows_why_and_is_not_retried(k8s_cluster, stand_in, monkeypatch):
    """A command line the kernel refuses (past a limit this operator does not know of): the container's terminated
    message says why, and the failure is final (a retry would start the same pod)."""
    from airflow_provider_lora.operators import lora as operator_module

    monkeypatch.setattr(operator_module, "check_manifest", lambda manifest, spec: None)
    op = operator(k8s_cluster, envs="BIG=" + "x" * 200_000)
    with pytest.raises(AirflowFailException) as info:
        op.execute({"ti": StandInTI()})
    message = str(info.value)
    assert "StartError" in message and "Argument list too long" in message, message
    assert "not retried" in message


@pytest.mark.parametrize("field", ["base_model", "dataset", "output_uri"])
def test_a_template_that_rendered_none_is_refused_for_a_required_field(k8s_cluster, stand_in, field):
    """`{{ dag_run.conf.get('model') }}` with the key missing renders to the string 'None'. Before: accepted as a
    hub id, and a pod launched."""
    op = operator(k8s_cluster)
    setattr(op, field, "None")  # what rendering the template left
    with pytest.raises(AirflowFailException, match=f"{field}='None' is not valid: a template rendered to None"):
        op.execute({"ti": StandInTI()})
    assert posts(k8s_cluster) == []


# ---- cases that already held, kept tested ---------------------------------------------------------------------

def test_two_triggers_on_one_pod_each_show_every_line_once(k8s_cluster, caplog):
    """Two trigger runs on one pod (two triggerers during a takeover): each copies every line once."""
    caplog.set_level(logging.INFO)
    script = "import time\nfor i in range(20):\n    print('line', i, flush=True)\n    time.sleep(0.05)"
    create(k8s_cluster, cheap_pod("twice", script))
    first, second = trigger(k8s_cluster, "twice"), trigger(k8s_cluster, "twice")
    first._log, second._log = logging.getLogger("tests.trigger.a"), logging.getLogger("tests.trigger.b")

    async def both():
        async def one(t):
            async for event in t.run():
                return event.payload
        try:
            return await asyncio.gather(one(first), one(second))
        finally:
            await close_shared_clients()
    events = asyncio.run(asyncio.wait_for(both(), 60))
    assert [e["status"] for e in events] == ["success", "success"]
    for name in ("tests.trigger.a", "tests.trigger.b"):
        lines = [r.getMessage().removeprefix("[twice] ") for r in caplog.records if r.name == name
                 and r.getMessage().startswith("[twice] ")]
        assert lines == [f"line {i}" for i in range(20)], name


def test_a_trigger_started_after_startup_timeout_with_a_running_pod_is_not_stuck(k8s_cluster, caplog):
    caplog.set_level(logging.INFO)
    script = "import time\ntime.sleep(2.5)\nprint('done', flush=True)"
    create(k8s_cluster, cheap_pod("late", script))
    k8s_cluster.wait_for_pod("default", "late", until="Running")
    time.sleep(1.5)  # the pod is older than startup_timeout when the trigger starts
    event = first_event(trigger(k8s_cluster, "late", startup_timeout=1))
    assert event["status"] == "success", event
    assert shown_lines(caplog, "late") == ["done"]
