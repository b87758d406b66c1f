"""LoRATrainingOperator with launcher="pod" under dag.test(): the real trainer runs in an emulated pod (the
emulator's kubelet runs the container's argv as a local process), credentials arrive only through secretKeyRef,
the result comes back through the pod log, and a retry reattaches instead of starting a second training."""

from __future__ import annotations

import datetime
import json
import os

import pytest

from airflow_provider_lora.core.render import TaskIdentity, pod_name
from airflow_provider_lora.core.results import load_run_result
from airflow_provider_lora.operators.lora import LoRATrainingOperator
from tests.fixtures.airflow import run_dag_test
from tests.trainer_helpers import FAST, arithmetic_rows, write_jsonl

pytestmark = pytest.mark.slow
SAFE_ENV = ("PATH", "HOME", "LANG", "TMPDIR", "AIRFLOW_HOME")  # what the emulated pod inherits from the host


@pytest.fixture
def cluster(k8s_cluster, monkeypatch, s3_endpoint):
    # Pods see the host's PATH and little else: S3 keys must come from the secret, not from the test's env.
    k8s_cluster.base_env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
    k8s_cluster.create_secret("default", "s3-creds", {"id": "testing-key", "secret": "testing-secret"})
    monkeypatch.setenv("AIRFLOW_CONN_K8S_EMU", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(k8s_cluster.kubeconfig)}}))
    return k8s_cluster


def operator(tiny_model_dir, dataset, output_uri, endpoint, **kwargs) -> LoRATrainingOperator:
    return LoRATrainingOperator(
        task_id="train", launcher="pod", kubernetes_conn_id="k8s_emu", poll_interval=0.3, startup_timeout=60,
        base_model=str(tiny_model_dir), dataset=str(dataset), output_uri=output_uri,
        envs=f"AWS_ENDPOINT_URL={endpoint},AWS_DEFAULT_REGION=us-east-1,HF_HUB_OFFLINE=1,HF_DATASETS_OFFLINE=1",
        secret_env={"AWS_ACCESS_KEY_ID": "s3-creds/id", "AWS_SECRET_ACCESS_KEY": "s3-creds/secret"},
        resource_gpu_per_worker=0, resource_cpu_per_worker="2", resource_memory_per_worker="4Gi",
        **{**FAST, "max_steps": 4, **kwargs})


@pytest.mark.parametrize("deferrable", [True, False])
def test_dag_test_trains_in_a_pod_and_returns_the_result(cluster, airflow_db, tiny_model_dir, tmp_path,
                                                         s3_endpoint, s3_bucket, deferrable):
    from airflow_provider_lora.compat import DAG

    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))
    output = f"s3://{s3_bucket}/runs/{{{{ run_id }}}}"
    with DAG(f"lora_pod_{deferrable}", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        operator(tiny_model_dir, dataset, output, s3_endpoint, deferrable=deferrable,
                 on_finish_action="delete_pod")
    run = run_dag_test(dag)
    assert run.state == "success"
    ti = next(t for t in run.get_task_instances() if t.task_id == "train")
    result = ti.xcom_pull(task_ids="train")
    assert result["summary"]["global_step"] == 4
    assert result["summary"]["final_loss"] < result["summary"]["first_loss"]
    assert [r["step"] for r in result["history"]] == [1, 2, 3, 4]
    assert result["artifacts"]["adapter"] == f"s3://{s3_bucket}/runs/{run.run_id}/adapter"
    published = load_run_result(result["artifacts"]["root"])  # what the pod uploaded is complete
    assert published.summary["global_step"] == 4
    # The run records the task instance that launched it: a retry of that task recognises it as its own.
    assert published.summary["task"] == {"dag_id": dag.dag_id, "task_id": "train", "run_id": run.run_id,
                                         "map_index": -1, "deployment": "default"}
    assert ti.xcom_pull(task_ids="train", key="launched")["name"].startswith("lora-")
    assert cluster.pods() == []  # on_finish_action="delete_pod"
    creates = [r for r in cluster.request_log if r[0] == "POST" and r[1].endswith("/pods")]
    assert len(creates) == 1


def test_a_retry_reattaches_to_the_running_pod_of_an_earlier_try(cluster, airflow_db, tiny_model_dir, tmp_path,
                                                                 s3_endpoint, s3_bucket):
    """The worker died after creating the pod: the next try finds it by name and waits for it."""
    from airflow_provider_lora.compat import DAG

    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))
    with DAG("lora_pod_reattach", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        task = operator(tiny_model_dir, dataset, f"s3://{s3_bucket}/runs/reattach", s3_endpoint, deferrable=True,
                        on_finish_action="keep_pod")

    # What try 1 would have created before its worker died: the same manifest, for the run id dag.test will use.
    when = datetime.datetime(2026, 2, 3, tzinfo=datetime.timezone.utc)
    run_id = f"manual__{when.isoformat()}"
    from airflow_provider_lora.core.render import render_pod

    identity = TaskIdentity(dag_id=dag.dag_id, task_id="train", run_id=run_id, try_number=1,
                            deployment=task.deployment)
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    api.create_namespaced_pod("default", render_pod(task._spec(), task._options(), identity))

    run = run_dag_test(dag, logical_date=when, run_after=when)
    assert run.run_id == run_id
    assert run.state == "success"
    creates = [r for r in cluster.request_log if r[0] == "POST" and r[1].endswith("/pods")]
    assert len(creates) == 1  # only the one "try 1" made
    pods = cluster.pods()
    assert [p["metadata"]["name"] for p in pods] == [pod_name(identity)]
    assert pods[0]["metadata"]["labels"]["lora.airflow-provider/try_number"] == "1"


def test_a_failed_pod_fails_the_task_with_the_reason_and_last_lines(cluster, airflow_db, tiny_model_dir, tmp_path,
                                                                    s3_endpoint, s3_bucket):
    from airflow_provider_lora.compat import DAG

    with DAG("lora_pod_fails", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        operator(tiny_model_dir, tmp_path / "missing.jsonl", f"s3://{s3_bucket}/runs/x", s3_endpoint,
                 deferrable=True)
    run = run_dag_test(dag)
    assert run.state == "failed"
    pods = cluster.pods()
    # delete_succeeded_pod (the default) keeps a failed pod to inspect; its log names the cause.
    assert len(pods) == 1 and pods[0]["status"]["phase"] == "Failed"
    assert "no such file or directory" in cluster.logs("default", pods[0]["metadata"]["name"])


def test_kubectl_reads_a_training_pod_while_it_runs(cluster, tiny_model_dir, tmp_path, s3_endpoint, s3_bucket):
    """Fidelity: the real kubectl sees our rendered pod running the real trainer, as it would on a cluster."""
    import shutil
    import subprocess

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    from kubernetes import client, config

    from airflow_provider_lora.core.render import render_pod

    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))
    # Far more steps than the checks below need: the pod is still running when kubectl looks; the cluster fixture's
    # teardown kills it (no need to wait for the training to end).
    task = operator(tiny_model_dir, dataset, f"s3://{s3_bucket}/runs/kubectl", s3_endpoint, max_steps=1000)
    identity = TaskIdentity(dag_id="kubectl_check", task_id="train", run_id="r1")
    pod = render_pod(task._spec(), task._options(), identity)
    name = pod["metadata"]["name"]
    client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig))).create_namespaced_pod(
        "default", pod)
    cluster.wait_for_pod("default", name, until=lambda p: "[lora-trainer] step" in cluster.logs("default", name),
                         timeout=120)

    def kubectl(*args: str) -> str:
        return subprocess.run(["kubectl", "--kubeconfig", str(cluster.kubeconfig), "--cache-dir",
                               str(tmp_path / "kubectl-cache"), *args], capture_output=True, text=True,
                              check=True).stdout

    wide = kubectl("get", "pods", "-o", "wide")
    assert name in wide and "Running" in wide
    assert "[lora-trainer] step" in kubectl("logs", name)
    described = kubectl("describe", "pod", name)
    assert "lora.airflow-provider/dag_id=kubectl_check" in described and "nvidia.com/gpu" not in described
    assert "s3-creds" in described and "testing-secret" not in described  # a reference, never the value
    assert cluster.get_pod("default", name)["status"]["phase"] == "Running"  # all of the above saw it running


def test_dataset_and_output_on_a_workspace_pvc(cluster, airflow_db, tiny_model_dir, tmp_path, s3_endpoint):
    """The PVC outlives the pod: the dataset placed on it is read, and the run published on it is complete."""
    from airflow_provider_lora.compat import DAG

    mount = str(cluster.root / "mnt" / "lora")  # under the cluster root, so the emulated pod sees this path
    claim_dir = cluster.root / "pvc" / "default" / "workspace"
    write_jsonl(claim_dir / "data" / "train.jsonl", arithmetic_rows(32))
    with DAG("lora_pod_pvc", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        operator(tiny_model_dir, f"{mount}/data/train.jsonl", f"{mount}/runs/{{{{ run_id }}}}", s3_endpoint,
                 pvc_claim_name="workspace", pvc_mount_path=mount, on_finish_action="delete_pod")
    run = run_dag_test(dag)
    assert run.state == "success"
    published = claim_dir / "runs" / run.run_id
    assert (published / "_COMPLETE").exists() and (published / "adapter" / "adapter_model.safetensors").exists()
    assert cluster.pods() == []
