"""The cluster launch protocol (core/launchers/cluster.py), case by case, for a Pod and a TrainJob alike, against the
emulated API server: what create-or-reattach does for each state the run of this task execution can be in (absent,
running, succeeded, failed, created meanwhile by another try, API errors, refused), and how following it ends
(succeeded, failed, stuck pending, deleted meanwhile). Then the operator and the KFP component, which both launch
through it, shown to behave the same on the cases that differed before they shared it (retries and refusals).
"""

from __future__ import annotations

import json
import time

import pytest

from airflow_provider_lora.core.launchers import cluster
from airflow_provider_lora.core.launchers.pod import FAILED, SUCCEEDED
from airflow_provider_lora.core.render import PodOptions, TaskIdentity, TrainJobOptions, render_trainjob
from airflow_provider_lora.core.spec import LoRASpec
from tests.test_pod_launcher import cheap_pod

KINDS = ["pod", "trainjob"]
SLEEP = "import time; print('started', flush=True); time.sleep(300)"
QUICK = "print('done', flush=True)"
CRASH = "import sys; print('boom', flush=True); sys.exit(3)"


def _manifest(kind: str, name: str, script: str) -> dict:
    if kind == "pod":
        return cheap_pod(name, script)
    spec = LoRASpec.parse(dict(base_model="m", dataset="d", output_uri="s3://b/p", resource_num_workers=1,
                               resource_gpu_per_worker=0))
    manifest = render_trainjob(spec, PodOptions(image="busybox:1"), TaskIdentity(dag_id="d", task_id="t", run_id="r"),
                               TrainJobOptions())
    manifest["metadata"]["name"] = name
    manifest["spec"]["trainer"]["command"] = ["python", "-c", script]
    return manifest


@pytest.fixture
def api(k8s_cluster):
    from kubernetes import client, config

    return client.CoreV1Api(config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig)))


def _job(api, kind: str, name: str, script: str = SLEEP) -> cluster.LaunchedPod:
    return cluster.for_manifest(api, _manifest(kind, name, script))


def _wait_for(job: cluster.LaunchedPod, phase: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = job.read()
        if obj is not None and job.observe(obj)[0].phase == phase:
            return
        time.sleep(0.2)
    raise AssertionError(f"{job} did not become {phase} within {timeout}s")


def _creates(k8s_cluster) -> list:
    return [r for r in k8s_cluster.request_log if r[0] == "POST"]


def _deletes(k8s_cluster) -> list:
    return [r for r in k8s_cluster.request_log if r[0] == "DELETE"]


# ---- create or reattach ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_absent_is_created(k8s_cluster, api, kind):
    lines: list[str] = []
    job = _job(api, kind, "absent")
    assert cluster.create_or_reattach(job, lines.append, 2) is None
    assert lines == [f"created {job}"] and len(_creates(k8s_cluster)) == 1
    _wait_for(job, "running")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("script, phase", [(SLEEP, "running"), (QUICK, SUCCEEDED)])
def test_a_running_or_succeeded_run_is_reattached_never_duplicated(k8s_cluster, api, kind, script, phase):
    earlier = _job(api, kind, "earlier", script)
    assert earlier.create()
    _wait_for(earlier, phase)
    lines: list[str] = []
    assert cluster.create_or_reattach(_job(api, kind, "earlier", script), lines.append, 2) is None
    assert len(lines) == 1 and lines[0].startswith(f"reattaching to {earlier} ({phase}")
    assert len(_creates(k8s_cluster)) == 1 and _deletes(k8s_cluster) == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_run_is_deleted_and_replaced(k8s_cluster, api, kind):
    earlier = _job(api, kind, "retry", CRASH)
    assert earlier.create()
    _wait_for(earlier, FAILED)
    lines: list[str] = []
    job = _job(api, kind, "retry", QUICK)
    assert cluster.create_or_reattach(job, lines.append, 2) is None
    assert f"{job} (failed" in lines[0] and "replacing it" in lines[0] and lines[1] == f"created {job}"
    assert len(_deletes(k8s_cluster)) == 1 and len(_creates(k8s_cluster)) == 2
    state, _ = cluster.follow(job, 0.2, 60, lambda line: None)
    assert state.phase == SUCCEEDED


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_handed_to_an_earlier_tries_trigger_is_replaced_not_adopted(k8s_cluster, api, kind, monkeypatch):
    """A deferred task ends only with its trigger's event (the same try resumes) or by a clear, a mark or a
    timeout. Before: after a clear on an active DAG, try 2 could adopt try 1's running training, which try 1's
    on_kill then deleted under it (seen with a real Airflow 3.3 scheduler and triggerer)."""
    monkeypatch.setattr(cluster, "HANDOVER_SECONDS", 1.0)  # no trigger here to delete it first
    earlier = _job(api, kind, "cleared")
    assert earlier.create()
    _wait_for(earlier, "running")
    earlier.mark_deferred(1)
    uid = earlier.read()["metadata"]["uid"]
    lines: list[str] = []
    job = _job(api, kind, "cleared", QUICK)
    assert cluster.create_or_reattach(job, lines.append, 2) is None
    assert lines[0].startswith(f"{job} (running") and "handed to the trigger of try 1" in lines[0], lines
    assert lines[1:] == [f"created {job}"]
    assert len(_deletes(k8s_cluster)) == 1 and job.read()["metadata"]["uid"] != uid
    assert cluster.follow(job, 0.2, 60, lambda line: None)[0].phase == SUCCEEDED


@pytest.mark.parametrize("kind", KINDS)
def test_the_try_that_handed_its_run_to_its_trigger_reattaches_to_it(k8s_cluster, api, kind):
    earlier = _job(api, kind, "same-try")
    assert earlier.create()
    earlier.mark_deferred(3)
    lines: list[str] = []
    assert cluster.create_or_reattach(_job(api, kind, "same-try"), lines.append, 3) is None
    assert len(lines) == 1 and lines[0].startswith(f"reattaching to {earlier}") and _deletes(k8s_cluster) == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_delete_for_a_replaced_run_deletes_nothing(k8s_cluster, api, kind):
    """The uid precondition: a delete meant for the run that was read does not hit the one created since under
    the same name (the API server answers 409 Conflict, "Precondition failed: UID in precondition")."""
    first = _job(api, kind, "renamed")
    assert first.create()
    stale_uid = first.read()["metadata"]["uid"]
    assert first.delete()
    first.wait_until_gone()
    second = _job(api, kind, "renamed")
    assert second.create()
    assert second.delete(uid=stale_uid) is False
    assert second.read()["metadata"]["uid"] != stale_uid


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_created_meanwhile_by_another_try_is_reattached(k8s_cluster, api, kind, monkeypatch):
    """Two tries racing (a zombie worker and its retry): the object appears between our read and our create; the
    create answers 409 and that is a reattach, not an error."""
    other = _job(api, kind, "race")
    assert other.create()
    job = _job(api, kind, "race")
    monkeypatch.setattr(job, "read", lambda: None)  # our read came before the other try's create
    lines: list[str] = []
    assert cluster.create_or_reattach(job, lines.append, 2) is None
    assert lines == [f"{job} was created meanwhile (by another try of this task): reattaching"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [500, 429, 503])  # 429 comes with Retry-After: 1
def test_server_errors_on_create_are_retried(k8s_cluster, api, kind, status):
    k8s_cluster.set_fault("api_error", path=r"/(pods|trainjobs)$", method="POST", status=status, times=2)
    job = _job(api, kind, "flaky")
    assert cluster.create_or_reattach(job, lambda line: None, 1) is None
    assert len(_creates(k8s_cluster)) == 3  # two refusals, then created
    assert job.read() is not None


@pytest.mark.parametrize("kind", KINDS)
def test_an_api_that_keeps_failing_is_reported_after_the_attempts(k8s_cluster, api, kind):
    k8s_cluster.set_fault("api_error", path=r"/(pods|trainjobs)$", method="POST", status=500, times=None)
    job = _job(api, kind, "down")
    with pytest.raises(cluster.KubernetesApiError) as info:
        cluster.create_or_reattach(job, lambda line: None, 1)
    message = str(info.value)  # what failed, how often, and the API's own words: not the raw response dump
    assert f"create {job}: the Kubernetes API failed {cluster.SYNC_ATTEMPTS} times; last: (500)" in message
    assert "injected fault" in message and "HTTP response headers" not in message, message
    assert len(_creates(k8s_cluster)) == cluster.SYNC_ATTEMPTS and job.read() is None


@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_create_is_not_retried(k8s_cluster, api, kind):
    job = _job(api, kind, "refused")
    job.manifest["metadata"]["labels"] = {"map_index": "-1"}  # a label value must begin alphanumeric: 422
    with pytest.raises(cluster.LaunchRefused, match=r"the cluster refused the (pod|TrainJob): \(422\)"):
        cluster.create_or_reattach(job, lambda line: None, 1)
    assert len(_creates(k8s_cluster)) == 1 and job.read() is None


# ---- following the run -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_following_ends_with_the_failure_and_its_logs(k8s_cluster, api, kind):
    job = _job(api, kind, "crash", CRASH)
    assert job.create()
    lines: list[str] = []
    state, log_pod = cluster.follow(job, 0.2, 60, lines.append)
    assert state.phase == FAILED and state.exit_code == 3 and "boom" in lines
    logs = job.failure_logs(log_pod)
    assert f"last {cluster.FAILURE_LOG_LINES} log lines of {log_pod}" in logs and "boom" in logs


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_stuck_pending_is_judged_by_the_shared_verdict(k8s_cluster, api, kind):
    """An image the registry does not have never starts: not worth startup_timeout (here 600 s) of waiting."""
    k8s_cluster.set_fault("image_pull_backoff", times=None, backoff_after=30)  # answered "not found"
    job = _job(api, kind, "stuck")
    assert job.create()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="ImageNotFound does not clear by waiting"):
        cluster.follow(job, 0.2, 600, lambda line: None)
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_deleted_while_followed_is_reported_gone(k8s_cluster, api, kind):
    job = _job(api, kind, "gone")
    assert job.create()
    _wait_for(job, "running")
    assert job.delete()
    job.wait_until_gone()
    assert not job.delete()  # gone: nothing to delete
    with pytest.raises(RuntimeError, match="disappeared"):
        cluster.follow(job, 0.2, 60, lambda line: None)


def test_the_startup_verdict_counts_from_the_runs_creation():
    from airflow_provider_lora.core.launchers.pod import PodState

    missing_secret = PodState("pending", "CreateContainerConfigError", 'secret "hf" not found', stuck=True)
    assert cluster.startup_verdict(missing_secret, waited=30, startup_timeout=600) is None  # may still be created
    assert "does not clear by waiting" in cluster.startup_verdict(missing_secret, waited=61, startup_timeout=600)
    unschedulable = PodState("pending", "Unschedulable", "0/3 nodes")
    assert cluster.startup_verdict(unschedulable, waited=599, startup_timeout=600) is None
    assert cluster.startup_verdict(unschedulable, waited=601, startup_timeout=600) == "startup_timeout=600s"
    assert cluster.startup_verdict(PodState("running"), waited=10_000, startup_timeout=600) is None


# ---- the operator and the KFP component launch the same way ---------------------------------------------------

def _operator_launch(k8s_cluster, kind: str) -> str:
    from airflow_provider_lora.compat import AirflowException
    from airflow_provider_lora.operators.lora import LoRATrainingOperator
    from tests.test_reliability_faults import StandInTI

    op = LoRATrainingOperator(
        task_id="train", launcher=kind, image="registry.example/lora-trainer:0.1.0", kubernetes_conn_id=None,
        config_file=str(k8s_cluster.kubeconfig), namespace="no-such-namespace", deferrable=False,
        base_model="org/model", dataset="org/data", output_uri="s3://protocol/out", resource_gpu_per_worker=0,
        trainer_api_version="v2.2")
    with pytest.raises((AirflowException, cluster.KubernetesApiError)) as info:
        op.execute({"ti": StandInTI()})
    return str(info.value)


def _kfp_launch(k8s_cluster, kind: str, tmp_path) -> str:
    from airflow_provider_lora.kfp.cluster import launch_settings, train_on_cluster

    env = {"KUBERNETES_SERVER_URL": k8s_cluster.url, "KUBERNETES_AUTH_TOKEN": k8s_cluster.token,
           "KUBERNETES_CA_CERT": str(k8s_cluster.ca_file), "LORA_KFP_TRAINING_IMAGE": "registry.example/t:1",
           "LORA_KFP_TRAINER_API_VERSION": "v2.2",
           "LORA_KFP_POD_OPTIONS": json.dumps({"namespace": "no-such-namespace"})}
    spec = LoRASpec.parse({"base_model": "org/model", "dataset": "org/data", "output_uri": "s3://protocol/out",
                           "resource_gpu_per_worker": 0})
    with pytest.raises((ValueError, cluster.KubernetesApiError)) as info:
        train_on_cluster(spec, kind, launch_settings(env, None, str(tmp_path)), key="k1", env=env,
                         log=lambda line: None)
    return str(info.value)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("caller", ["operator", "kfp"])
def test_both_callers_retry_server_errors_then_take_a_refusal_as_final(k8s_cluster, kind, caller, tmp_path,
                                                                        s3_endpoint):
    """Before the protocol had one owner, the KFP path neither retried a 5xx nor told a refusal apart."""
    k8s_cluster.set_fault("api_error", path=r"/(pods|trainjobs)$", method="POST", status=503, times=2)
    message = (_operator_launch(k8s_cluster, kind) if caller == "operator" else
               _kfp_launch(k8s_cluster, kind, tmp_path))
    assert f"the cluster refused the {'pod' if kind == 'pod' else 'TrainJob'}: (404)" in message, message
    assert "no-such-namespace" in message
    assert len(_creates(k8s_cluster)) == 3  # two 503s retried, then the refusal, not retried
