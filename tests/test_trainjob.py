"""launcher="trainjob": TrainJob manifests for the three Kubeflow Trainer API generations, what a TrainJob's state
means, and the operator against the emulated Trainer (tests/k8s/trainer_controller.py): a 2-node DDP training under
torchrun with the real trainer, and each failure mode ending the task with its own reason."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest

from airflow_provider_lora.core.launchers.pod import FAILED, PENDING, RUNNING, SUCCEEDED
from airflow_provider_lora.core.launchers.cluster import for_manifest
from airflow_provider_lora.core.launchers.trainjob import classify_trainjob, installed_trainer_version, rank0_pod
from airflow_provider_lora.core.render import (
    MAX_TRAINJOB_NAME, PodOptions, SecretRef, TaskIdentity, TrainJobOptions, render_trainjob, trainer_api_shape,
    trainjob_name,
)
from airflow_provider_lora.core.spec import LoRASpec
from tests.fixtures.airflow import local_trainer
from tests.trainer_helpers import FAST, arithmetic_rows, write_jsonl

GOLDEN = Path(__file__).parent / "golden"
IDENTITY = TaskIdentity(dag_id="finetune", task_id="train", run_id="manual__2026-01-01T00:00:00+00:00",
                        try_number=2)
SPEC = LoRASpec.parse(dict(base_model="Qwen/Qwen2.5-1.5B-Instruct", dataset="s3://data/chats.jsonl",
                           output_uri="s3://runs/finetune/run-1", resource_num_workers=2, resource_gpu_per_worker=4,
                           envs="NCCL_DEBUG=INFO", metadata_labels="team=nlp"))
IMAGE = "registry.example/lora-trainer:0.1.0"
OPTIONS = PodOptions(namespace="ml", image=IMAGE,
                     secret_env={"HF_TOKEN": SecretRef(name="hf", key="token")},
                     node_selector={"gpu": "h200"}, tolerations=({"key": "nvidia.com/gpu", "operator": "Exists"},),
                     pvc_claim_name="workspace")


@pytest.mark.parametrize("shape", ["v2.0", "v2.1", "v2.2"])
def test_golden_trainjob(shape):
    """The rendered TrainJob equals tests/golden/trainjob_<shape>.json (UPDATE_GOLDEN=1 rewrites them)."""
    rendered = render_trainjob(SPEC, OPTIONS, IDENTITY, TrainJobOptions(api_shape=shape))
    path = GOLDEN / f"trainjob_{shape.replace('.', '_')}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(json.dumps(rendered, indent=2, sort_keys=True) + "\n")
    assert rendered == json.loads(path.read_text())


@pytest.mark.parametrize("shape", ["v2.0", "v2.1", "v2.2"])
def test_every_shape_carries_the_same_workload(shape):
    job = render_trainjob(SPEC, OPTIONS, IDENTITY, TrainJobOptions(api_shape=shape))
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4  # explicit: "auto" means CPU count there
    assert trainer["command"][:3] == ["torchrun", "--nproc_per_node=4", "-m"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in trainer["env"]
    assert len(job["metadata"]["name"]) <= MAX_TRAINJOB_NAME and job["metadata"]["name"][0].isalpha()
    assert job["metadata"]["labels"]["team"] == "nlp"
    text = json.dumps(job)
    assert "lora-workspace" in text and "h200" in text and "nvidia.com/gpu" in text


def test_names_are_short_deterministic_and_distinct():
    long = TaskIdentity(dag_id="a" * 200, task_id="b" * 200, run_id="r")
    assert len(trainjob_name(long)) <= MAX_TRAINJOB_NAME
    assert trainjob_name(IDENTITY) == trainjob_name(IDENTITY.model_copy(update={"try_number": 3}))
    assert trainjob_name(IDENTITY) != trainjob_name(IDENTITY.model_copy(update={"run_id": "other"}))


@pytest.mark.parametrize("version, shape", [("v2.0.1", "v2.0"), ("2.1.0", "v2.1"), ("v2.2.0", "v2.2"),
                                            ("v2.3.0-rc.1", "v2.2")])
def test_installed_version_picks_the_shape(version, shape):
    assert trainer_api_shape(version) == shape


@pytest.mark.parametrize("options, shape, message", [
    (PodOptions(image=IMAGE, pod_template={"spec": {}}), "v2.2", "pod_template applies to launcher='pod' only"),
    (PodOptions(image=IMAGE, affinity={"nodeAffinity": {}}), "v2.0", "affinity and image_pull_secrets cannot be set"),
    (PodOptions(image=IMAGE, active_deadline_seconds=60), "v2.1",
     "active_deadline_seconds needs Kubeflow Trainer v2.2"),
])
def test_what_a_generation_cannot_carry_is_refused(options, shape, message):
    spec = LoRASpec.parse(dict(base_model="m", dataset="d", output_uri="s3://b/p"))
    with pytest.raises(ValueError, match=message):
        render_trainjob(spec, options, IDENTITY, TrainJobOptions(api_shape=shape))


def test_bad_versions_name_the_parameter():
    with pytest.raises(ValueError, match="kubeflow_trainer_version='1.9'"):
        trainer_api_shape("1.9")
    with pytest.raises(ValueError, match="trainer_api_version='v3'"):
        TrainJobOptions(api_shape="v3")


# ---- state -------------------------------------------------------------------------------------------------------

def _pod(index: int, phase: str, terminated: dict | None = None, created: str = "2026-01-01T00:00:00Z") -> dict:
    state = {"terminated": terminated} if terminated else {}
    return {"metadata": {"name": f"tj-node-0-{index}-x", "creationTimestamp": created,
                         "labels": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "status": {"phase": phase, "containerStatuses": [{"name": "node", "state": state}]}}


def _trainjob(*conditions: tuple[str, str, str]) -> dict:
    return {"status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m}
                                      for t, r, m in conditions]}}


def test_a_failed_trainjob_names_the_failed_node_and_its_reason():
    pods = [_pod(0, "Failed", {"exitCode": 1, "reason": "Error"}),
            _pod(1, "Failed", {"exitCode": 137, "reason": "OOMKilled"})]
    state = classify_trainjob(_trainjob(("Failed", "FailedJobs", "jobset failed")), pods)
    assert state.phase == FAILED and state.reason == "Error"  # rank order: node 0 first
    assert "node 1 (tj-node-0-1-x): OOMKilled (exit code 137)" in state.message
    only_oom = classify_trainjob(_trainjob(("Failed", "FailedJobs", "x")), [_pod(0, "Running"), pods[1]])
    assert only_oom.reason == "OOMKilled"


def test_a_trainjob_past_its_deadline_says_so_while_its_node_pods_are_being_deleted():
    # Trainer v2.2+ marks the TrainJob Failed (DeadlineExceeded) and deletes its JobSet: the pods still terminate.
    terminating = _pod(0, "Running")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    state = classify_trainjob(_trainjob(("Failed", "DeadlineExceeded", "TrainJob exceeded its activeDeadlineSeconds")),
                              [terminating, _pod(1, "Running")])
    assert (state.phase, state.reason) == (FAILED, "DeadlineExceeded")
    assert "activeDeadlineSeconds" in state.message


def test_trainjob_states():
    assert classify_trainjob(_trainjob(("Complete", "AllJobsCompleted", "")), []).phase == SUCCEEDED
    deadline = classify_trainjob(_trainjob(("Failed", "DeadlineExceeded", "past 60s")), [])
    assert (deadline.phase, deadline.reason) == (FAILED, "DeadlineExceeded")
    suspended = classify_trainjob(_trainjob(("Suspended", "Suspended", "queued")), [])
    assert (suspended.phase, suspended.reason) == (PENDING, "Suspended")
    assert classify_trainjob(_trainjob(), [_pod(0, "Running"), _pod(1, "Pending")]).phase == RUNNING
    assert classify_trainjob(_trainjob(), []).reason == "NoPods"


def test_rank0_pod_is_the_newest_live_pod_of_index_0():
    old, new = _pod(0, "Failed", created="2026-01-01T00:00:00Z"), _pod(0, "Running", created="2026-01-01T00:05:00Z")
    new["metadata"]["name"] = "tj-node-0-0-new"
    assert rank0_pod([_pod(1, "Running"), old, new])["metadata"]["name"] == "tj-node-0-0-new"
    assert rank0_pod([_pod(1, "Running")]) is None


# ---- against the emulated Kubeflow Trainer ------------------------------------------------------------------------

SAFE_ENV = ("PATH", "HOME", "LANG", "TMPDIR", "AIRFLOW_HOME")


@pytest.fixture
def cluster(k8s_cluster, monkeypatch):
    k8s_cluster.base_env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
    monkeypatch.setenv("AIRFLOW_CONN_K8S_EMU", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(k8s_cluster.kubeconfig)}}))
    return k8s_cluster


def _dag(dag_id: str, cluster, model_dir, *, workers: int = 2, **kwargs):
    """A DAG with one trainjob task; dataset and output on the workspace PVC (shared by the nodes, as an RWX
    volume is on a cluster)."""
    from airflow_provider_lora.compat import DAG
    from airflow_provider_lora.operators.lora import LoRATrainingOperator

    mount = str(cluster.root / "mnt" / "lora")  # under the cluster root, so the emulated pods see this path
    write_jsonl(cluster.root / "pvc" / "default" / "workspace" / "data" / "train.jsonl", arithmetic_rows(32))
    with DAG(dag_id, schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        LoRATrainingOperator(
            task_id="train", launcher="trainjob", kubernetes_conn_id="k8s_emu", poll_interval=0.3,
            startup_timeout=kwargs.pop("startup_timeout", 120), deferrable=kwargs.pop("deferrable", True),
            base_model=str(model_dir), dataset=f"{mount}/data/train.jsonl", output_uri=f"{mount}/runs/{dag_id}",
            pvc_claim_name="workspace", pvc_mount_path=mount, envs="HF_HUB_OFFLINE=1,HF_DATASETS_OFFLINE=1",
            resource_num_workers=workers, resource_gpu_per_worker=0, resource_cpu_per_worker="1",
            resource_memory_per_worker="4Gi", **{**FAST, "max_steps": 4, **kwargs})
    return dag, cluster.root / "pvc" / "default" / "workspace" / "runs" / dag_id


@pytest.mark.slow
@local_trainer  # its one-process baseline trains in this python
def test_two_nodes_train_with_ddp_and_match_a_one_process_run(cluster, airflow_db, tiny_model_dir, tmp_path):
    from tests.fixtures.airflow import run_dag_test
    from tests.trainer_helpers import history, train

    dag, published = _dag("lora_tj_ddp", cluster, tiny_model_dir, on_finish_action="keep_pod")
    run = run_dag_test(dag)
    assert run.state == "success"
    result = next(t for t in run.get_task_instances() if t.task_id == "train").xcom_pull(task_ids="train")
    assert result["summary"]["global_step"] == 4 and result["summary"]["batch"]["world_size"] == 2
    assert (published / "_COMPLETE").exists() and (published / "adapter" / "adapter_model.safetensors").exists()

    # Rank 0 alone writes: one metrics line per step, and only node 0 printed the result.
    assert [r["step"] for r in history(published) if "loss" in r] == [1, 2, 3, 4]
    pods = sorted(cluster.pods(), key=lambda p: p["metadata"]["name"])
    assert [p["status"]["phase"] for p in pods] == ["Succeeded", "Succeeded"]
    logs = [cluster.logs("default", p["metadata"]["name"]) for p in pods]
    assert "LORA_RESULT" in logs[0] and "LORA_RESULT" not in logs[1]
    assert "x 2 process(es)" in logs[0]  # one process group of two ranks

    # The same effective batch (8 rows a step) in one process learns the same way.
    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))
    train(tiny_model_dir, dataset, tmp_path / "single", max_steps=4)
    single = [r["loss"] for r in history(tmp_path / "single") if "loss" in r]
    ddp = [r["loss"] for r in history(published) if "loss" in r]
    # Tolerance: DistributedSampler and the one-process sampler draw the same rows per step only when their
    # permutations agree (they do: seeded alike); measured: identical losses in float32 on CPU.
    print("DDP vs one process, loss per step:", ddp, single)
    assert max(abs(a - b) / b for a, b in zip(ddp, single)) < 1e-3, (ddp, single)


@pytest.mark.slow
def test_one_node_oomkilled_fails_the_task_with_that_nodes_reason(cluster, airflow_db, tiny_model_dir, task_output):
    from tests.fixtures.airflow import run_dag_test

    cluster.set_fault("oom", pod="*-node-0-1-*", after_seconds=0)  # at its start: node 0 cannot train alone
    dag, published = _dag("lora_tj_oom", cluster, tiny_model_dir, on_finish_action="delete_pod")
    run = run_dag_test(dag)
    assert run.state == "failed"
    log = task_output()
    assert "training TrainJob" in log and "failed: " in log and "OOMKilled" in log and "node 1" in log
    assert not (published / "_COMPLETE").exists()
    assert cluster.trainjobs() == [] and _live(cluster) == []  # deleted with its pods


def test_a_trainjob_the_cluster_refuses_fails_before_training(cluster, airflow_db, tiny_model_dir, task_output):
    from tests.fixtures.airflow import run_dag_test

    dag, _ = _dag("lora_tj_refused", cluster, tiny_model_dir, trainer_runtime="no-such-runtime")
    run = run_dag_test(dag)
    assert run.state == "failed"
    log = task_output()
    assert "the cluster refused the TrainJob" in log and 'clustertrainingruntime.trainer.kubeflow.org ' \
                                                         '"no-such-runtime" not found' in log
    assert cluster.trainjobs() == [] and cluster.pods() == []


def test_a_field_the_installed_trainer_lacks_is_refused_not_dropped(tmp_path, monkeypatch, airflow_db,
                                                                    tiny_model_dir, task_output):
    """Asked to render for v2.2 on a v2.1 cluster, strict validation refuses runtimePatches instead of dropping
    the volumes and scheduling silently."""
    from tests.fixtures.airflow import run_dag_test
    from tests.k8s.emulator import Cluster

    with Cluster(tmp_path / "k8s", trainer_version="v2.1.0") as old:
        monkeypatch.setenv("AIRFLOW_CONN_K8S_EMU", json.dumps(
            {"conn_type": "kubernetes", "extra": {"kube_config_path": str(old.kubeconfig)}}))
        dag, _ = _dag("lora_tj_strict", old, tiny_model_dir, trainer_api_version="v2.2")
        run = run_dag_test(dag)
        assert run.state == "failed"
        assert 'strict decoding error: unknown field "spec.runtimePatches"' in task_output()
        assert old.trainjobs() == []


def test_node_pods_refused_by_pod_security_end_as_stuck_with_the_reason(tmp_path, monkeypatch, airflow_db,
                                                                        tiny_model_dir, task_output):
    """Trainer v2.1 with the upstream runtime in a restricted namespace: admission refuses the node pods (the
    overrides cannot carry a securityContext there); the task fails at startup_timeout naming the Job
    controller's FailedCreate and the profile, instead of a bare "stuck"."""
    from tests.fixtures.airflow import run_dag_test
    from tests.k8s.emulator import Cluster

    with Cluster(tmp_path / "k8s", trainer_version="v2.1.0") as old:
        old.label_namespace("default", {"pod-security.kubernetes.io/enforce": "restricted"})
        monkeypatch.setenv("AIRFLOW_CONN_K8S_EMU", json.dumps(
            {"conn_type": "kubernetes", "extra": {"kube_config_path": str(old.kubeconfig)}}))
        dag, _ = _dag("lora_tj_psa", old, tiny_model_dir, startup_timeout=2)
        run = run_dag_test(dag)
        assert run.state == "failed"
        log = task_output()
        assert "FailedCreate: Error creating: pods" in log and 'violates PodSecurity "restricted:latest"' in log
        assert old.pods() == []


def test_the_installed_version_is_detected(tmp_path, monkeypatch):
    """No trainer_api_version: the v2.0 cluster's ConfigMap picks podSpecOverrides, which it accepts."""
    from airflow_provider_lora import kube
    from airflow_provider_lora.kube import ClusterRef
    from tests.k8s.emulator import Cluster

    with Cluster(tmp_path / "k8s", trainer_version="v2.0.1") as old:
        api = kube.sync_core_api(ClusterRef(config_file=str(old.kubeconfig)))
        assert installed_trainer_version(api) == "v2.0.1"
        spec = LoRASpec.parse(dict(base_model="m", dataset="d", output_uri="s3://b/p", resource_num_workers=2,
                                   resource_gpu_per_worker=0))
        manifest = render_trainjob(spec, PodOptions(image="busybox:1"), IDENTITY,
                                   TrainJobOptions(api_shape=trainer_api_shape("v2.0.1")))
        assert for_manifest(api, manifest).create()  # strict: it would fail on any field v2.0 lacks
        stored = old.trainjobs()[0]
        assert stored["spec"]["podSpecOverrides"][0]["targetJobs"] == [{"name": "node"}]
    with Cluster(tmp_path / "k8s2", trainer_version=None) as bare:
        assert installed_trainer_version(kube.sync_core_api(ClusterRef(config_file=str(bare.kubeconfig)))) \
            is None


def test_a_suspended_trainjob_past_the_startup_timeout_fails_as_stuck(cluster, airflow_db, tiny_model_dir, task_output):
    """Kueue (or a user) keeps it suspended: the task stops waiting at startup_timeout and says why."""
    from tests.fixtures.airflow import run_dag_test

    dag, _ = _dag("lora_tj_suspended", cluster, tiny_model_dir, startup_timeout=2)
    _suspend_on_create(cluster)
    run = run_dag_test(dag)
    assert run.state == "failed"
    log = task_output()
    assert "stuck" in log and "Suspended" in log and "startup_timeout=2s" in log
    assert cluster.trainjobs() == []  # a run that never started is deleted: it must not start later unwatched


def test_resources_that_cannot_be_created_end_as_stuck_with_the_event(cluster, airflow_db, tiny_model_dir, task_output):
    from tests.fixtures.airflow import run_dag_test

    cluster.set_fault("trainjob_creation_failed", pod="lora-*", times=None,
                      message='admission webhook "jobset" denied the request: quota exceeded')
    dag, _ = _dag("lora_tj_nojobset", cluster, tiny_model_dir, startup_timeout=2)
    run = run_dag_test(dag)
    assert run.state == "failed"
    log = task_output()
    assert "TrainJobResourcesCreationFailed" in log and "quota exceeded" in log


def _suspend_on_create(cluster) -> None:
    """Make the emulated API server suspend every new TrainJob, as Kueue's webhook does."""
    original = cluster._trainjob_webhook

    def check_and_suspend(obj, old=None):
        original(obj, old)
        if old is None:
            obj["spec"]["suspend"] = True
    cluster._trainjob_webhook = check_and_suspend


def _live(cluster) -> list[dict]:
    return [p for p in cluster.pods() if p["status"].get("phase") in ("Pending", "Running")]


@pytest.fixture
def task_output(caplog, capfd):
    """What the task printed and logged under dag.test(), as one text."""
    import logging

    caplog.set_level(logging.INFO)
    return lambda: caplog.text + "".join(capfd.readouterr())


def _sleeping_trainjob(cluster, name: str = "lora-sleeper") -> dict:
    """A TrainJob whose nodes only sleep: for what needs a running TrainJob but no training."""
    spec = LoRASpec.parse(dict(base_model="m", dataset="d", output_uri="s3://b/p", resource_num_workers=2,
                               resource_gpu_per_worker=0))
    manifest = render_trainjob(spec, PodOptions(image="busybox:1"), IDENTITY, TrainJobOptions())
    manifest["metadata"]["name"] = name
    manifest["spec"]["trainer"]["command"] = ["sleep", "300"]
    from airflow_provider_lora import kube
    from airflow_provider_lora.kube import ClusterRef

    assert for_manifest(kube.sync_core_api(ClusterRef(config_file=str(cluster.kubeconfig))), manifest).create()
    _wait_until(lambda: [p["status"]["phase"] for p in cluster.pods()] == ["Running", "Running"],
                "the node pods did not start")
    return manifest


def _wait_until(test, what: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.1)


def test_killing_the_deferred_task_deletes_the_trainjob_and_its_pods(cluster):
    """Airflow 3.3+ calls the trigger's on_kill when a deferred task is killed or cleared."""
    import asyncio

    from airflow_provider_lora.kube import close_shared_clients
    from airflow_provider_lora.triggers.lora import LoRATrainingTrigger

    _sleeping_trainjob(cluster)
    trigger = LoRATrainingTrigger(name="lora-sleeper", namespace="default", launcher="trainjob",
                                  config_file=str(cluster.kubeconfig), kubernetes_conn_id=None)

    async def kill():
        try:
            await trigger.on_kill()
        finally:
            await close_shared_clients()
    asyncio.run(kill())
    assert cluster.trainjobs() == []
    _wait_until(lambda: cluster.pods() == [], "the node pods were not deleted with their TrainJob")


def test_the_trigger_follows_rank_0_and_reports_a_running_trainjob_that_is_then_deleted(cluster):
    """Deleted by someone else mid-run: the task ends with reason Deleted, not a hang."""
    import asyncio

    from airflow_provider_lora.kube import close_shared_clients
    from airflow_provider_lora.triggers.lora import LoRATrainingTrigger

    _sleeping_trainjob(cluster)
    trigger = LoRATrainingTrigger(name="lora-sleeper", namespace="default", launcher="trainjob",
                                  config_file=str(cluster.kubeconfig), kubernetes_conn_id=None, poll_interval=0.2)

    async def first_event():
        try:
            events = trigger.run()
            waiting = asyncio.ensure_future(events.__anext__())
            await asyncio.sleep(1.0)
            assert not waiting.done()  # running: no event yet
            import subprocess
            subprocess.run(["kubectl", "--kubeconfig", str(cluster.kubeconfig), "--cache-dir",
                            str(cluster.root / "kubectl-cache"), "delete", "trainjobs.trainer.kubeflow.org",
                            "lora-sleeper", "--wait=false"], check=True, capture_output=True)
            return (await waiting).payload
        finally:
            await close_shared_clients()
    event = asyncio.run(first_event())
    assert (event["status"], event["reason"], event["launcher"]) == ("failed", "Deleted", "trainjob")
    assert event["log_pod"].startswith("lora-sleeper-node-0-0-")


def test_active_deadline_fails_the_task_with_deadline_exceeded(cluster, airflow_db, tiny_model_dir, task_output):
    from tests.fixtures.airflow import run_dag_test

    dag, published = _dag("lora_tj_deadline", cluster, tiny_model_dir, workers=1, active_deadline_seconds=1)
    run = run_dag_test(dag)
    assert run.state == "failed"
    log = task_output()
    assert "DeadlineExceeded" in log and "activeDeadlineSeconds of 1s" in log
    assert not (published / "_COMPLETE").exists()


@pytest.mark.slow
def test_a_retry_reattaches_to_the_trainjob_of_an_earlier_try(cluster, airflow_db, tiny_model_dir):
    """The worker died after creating the TrainJob: the next try finds it by name and waits for it."""
    from airflow_provider_lora import kube
    from airflow_provider_lora.core.render import trainjob_name
    from airflow_provider_lora.kube import ClusterRef
    from tests.fixtures.airflow import run_dag_test

    dag, published = _dag("lora_tj_reattach", cluster, tiny_model_dir, workers=1, on_finish_action="keep_pod",
                          trainer_api_version="v2.2")
    task = dag.get_task("train")
    when = datetime.datetime(2026, 2, 3, tzinfo=datetime.timezone.utc)
    identity = TaskIdentity(dag_id=dag.dag_id, task_id="train", run_id=f"manual__{when.isoformat()}",
                            try_number=1, deployment=task.deployment)
    api = kube.sync_core_api(ClusterRef(config_file=str(cluster.kubeconfig)))
    assert for_manifest(api, render_trainjob(task._spec(), task._options(), identity, TrainJobOptions())).create()

    run = run_dag_test(dag, logical_date=when, run_after=when)
    assert run.state == "success"
    creates = [r for r in cluster.request_log if r[0] == "POST" and r[1].endswith("/trainjobs")]
    assert len(creates) == 1  # only the one "try 1" made
    jobs = cluster.trainjobs()
    assert [j["metadata"]["name"] for j in jobs] == [trainjob_name(identity)]
    assert jobs[0]["metadata"]["labels"]["lora.airflow-provider/try_number"] == "1"
    assert (published / "_COMPLETE").exists()
