"""Every file in dags/ parses; the pod and trainjob examples (dags/lora_finetune_pod.py, dags/lora_finetune_trainjob.py)
run as a user configures them, through Airflow Variables (here AIRFLOW_VAR_* environment variables) and the trigger
form's run conf, on the emulated cluster: the real trainer in the pods, S3 on moto, then the downstream task reads the
adapter back through the return value's artifact keys."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import boto3
import pytest

from tests.fixtures.airflow import connect, dag_bag, pull, run_dag_test

DAGS = Path(__file__).resolve().parents[1] / "dags"
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "records_train.jsonl"
IMAGE = "registry.example/team/lora-trainer:0.1.0"


def test_every_dag_file_parses_into_a_dag():
    bag = dag_bag(str(DAGS))
    assert bag.import_errors == {}
    files = sorted(p.name for p in DAGS.glob("*.py"))
    assert {"lora_finetune.py", "lora_finetune_pod.py", "lora_finetune_trainjob.py"} <= set(files)
    assert sorted({Path(d.fileloc).name for d in bag.dags.values()}) == files  # no file without a DAG


def test_cluster_examples_do_not_parse_without_an_image(monkeypatch):
    # Neither the lora_image Variable nor [lora] image: the operator refuses at parse time, saying what to set.
    monkeypatch.delenv("AIRFLOW__LORA__IMAGE", raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_LORA_IMAGE", raising=False)
    errors = dag_bag(str(DAGS)).import_errors
    assert sorted(Path(f).name for f in errors) == ["lora_finetune_pod.py", "lora_finetune_trainjob.py"]
    for message in errors.values():
        assert "image=None is not valid" in message and "[lora] image" in message
    monkeypatch.setenv("AIRFLOW_VAR_LORA_IMAGE", IMAGE)
    assert dag_bag(str(DAGS)).import_errors == {}


def _configure(monkeypatch, cluster, bucket: str) -> str:
    """The deployment's Variables and connection, as a user sets them (environment variables here); the dataset
    uploaded to the bucket. Returns its URI."""
    variables = {
        "LORA_IMAGE": IMAGE,
        "LORA_KUBERNETES_CONN_ID": "gpu_cluster",
        "LORA_NAMESPACE": "ml",
        "LORA_OUTPUT_PREFIX": f"s3://{bucket}/lora",
        "LORA_GPU_NODE_SELECTOR": json.dumps({"cloud.google.com/gke-accelerator": "nvidia-l4"}),
    }
    for name, value in variables.items():
        monkeypatch.setenv(f"AIRFLOW_VAR_{name}", value)
    cluster.create_namespace("ml")
    connect(monkeypatch, cluster, "gpu_cluster")
    boto3.client("s3").upload_file(str(DATA), bucket, "lora/datasets/train.jsonl")
    return f"s3://{bucket}/lora/datasets/train.jsonl"


def _spy(monkeypatch) -> list[dict]:
    """Record each manifest the operator creates (the pod or TrainJob is deleted once it succeeded)."""
    from airflow_provider_lora.core.launchers.cluster import LaunchedPod

    created: list[dict] = []
    original = LaunchedPod.create

    def spy(job):
        created.append(copy.deepcopy(job.manifest))
        return original(job)

    monkeypatch.setattr(LaunchedPod, "create", spy)
    return created


# Small and fast on CPU: the example's GPU defaults overridden in the run conf, as a user would in the form.
RUN_CONF = {"max_steps": 3, "lora_r": 4, "resource_gpu_per_worker": 0, "resource_memory_per_worker": "4Gi",
            "dtype": "float32", "max_seq_len": 128, "effective_batch_size": 4, "max_tokens_per_gpu": 512,
            "checkpoint_at_epoch": False}


def _check_run(run, bucket: str, dag_id: str, model_dir: Path, steps: int) -> dict:
    """The run succeeded and the downstream task read the adapter's config from artifacts["adapter"]."""
    assert run.state == "success"
    result = pull(run, "train")
    root = f"s3://{bucket}/lora/{dag_id}/{run.run_id}"
    assert result["artifacts"]["root"] == root
    assert set(result["artifacts"]) == {"root", "adapter", "metrics", "summary", "chart_html", "chart_png"}
    registered = pull(run, "register_adapter")
    assert registered == {"adapter": f"{root}/adapter", "base_model": str(model_dir), "lora_r": 4,
                          "final_loss": result["summary"]["final_loss"], "global_step": steps,
                          "loss_chart": f"{root}/loss_chart.png", "merged": None}
    return result


def _scheduling(spec: dict) -> None:
    """What the example sets for GPU nodes and S3 access, as rendered: the Variables' values, no keys."""
    assert spec["serviceAccountName"] == "lora-trainer"
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def _no_aws_keys(manifest: dict) -> None:
    # The pods reach moto with the test's keys only because the emulated kubelet passes on the host's environment;
    # the manifest itself names no AWS credential (on EKS they come from the ServiceAccount's role).
    assert "AWS_ACCESS_KEY_ID" not in json.dumps(manifest) and "AWS_SECRET_ACCESS_KEY" not in json.dumps(manifest)


@pytest.mark.slow
def test_the_pod_example_runs_on_the_emulated_cluster(k8s_cluster, airflow_db, tiny_model_dir, s3_endpoint,
                                                      s3_bucket, monkeypatch):
    dataset = _configure(monkeypatch, k8s_cluster, s3_bucket)
    created = _spy(monkeypatch)
    bag = dag_bag(str(DAGS))
    assert bag.import_errors == {}
    dag = bag.dags["lora_finetune_pod"]
    assert dag.params["dataset"] == dataset  # the form's default from the lora_output_prefix Variable

    run = run_dag_test(dag, run_conf={**RUN_CONF, "base_model": str(tiny_model_dir), "resource_cpu_per_worker": "2"})
    _check_run(run, s3_bucket, "lora_finetune_pod", tiny_model_dir, steps=3)
    [pod] = created
    assert pod["metadata"]["namespace"] == "ml"
    assert pod["spec"]["containers"][0]["image"] == IMAGE
    _scheduling(pod["spec"])
    _no_aws_keys(pod)
    assert k8s_cluster.pods() == []  # deleted once it succeeded (on_finish_action's default)


@pytest.mark.slow
def test_a_dry_run_of_the_pod_example_plans_in_one_cpu_pod_and_leaves_nothing(k8s_cluster, airflow_db,
                                                                              tiny_model_dir, s3_endpoint, s3_bucket,
                                                                              monkeypatch):
    """Issue 16's "done when": the form's Dry run switch; the example's GPU settings stay as they are (1 GPU, 24Gi):
    the plan pod asks for no GPU, the plan is about the GPU run, and the downstream task is skipped."""
    _configure(monkeypatch, k8s_cluster, s3_bucket)
    created = _spy(monkeypatch)
    dag = dag_bag(str(DAGS)).dags["lora_finetune_pod"]
    run = run_dag_test(dag, run_conf={"base_model": str(tiny_model_dir), "max_seq_len": 128, "dtype": "float32",
                                      "dry_run": True, "plan_memory_gib": 24})
    assert run.state == "success"
    result = pull(run, "train")
    plan = result["plan"]
    assert result["dry_run"] is True and plan == pull(run, "train", key="plan")
    assert plan["dataset"]["rows"] > 0 and plan["memory"]["fits"] is True
    assert plan["memory"]["available_bytes"] == 24 * 2 ** 30
    [training] = plan["manifests"]  # what a real run would create: the GPU pod, secrets as references only
    assert training["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    _no_aws_keys(training)
    [pod] = created  # the only object created: the plan pod, without a GPU
    assert pod["metadata"]["name"].endswith("-plan") and "--plan" in pod["spec"]["containers"][0]["command"]
    assert "nvidia.com/gpu" not in json.dumps(pod["spec"]["containers"][0]["resources"])
    _scheduling(pod["spec"])  # where the training would run
    assert k8s_cluster.pods() == []
    assert next(t for t in run.get_task_instances() if t.task_id == "register_adapter").state == "skipped"


@pytest.mark.slow
def test_the_trainjob_example_runs_on_the_emulated_cluster(k8s_cluster, airflow_db, tiny_model_dir, s3_endpoint,
                                                           s3_bucket, monkeypatch):
    _configure(monkeypatch, k8s_cluster, s3_bucket)
    created = _spy(monkeypatch)
    dag = dag_bag(str(DAGS)).dags["lora_finetune_trainjob"]

    # Two nodes (the example's default), one process each on CPU.
    run = run_dag_test(dag, run_conf={**RUN_CONF, "base_model": str(tiny_model_dir), "resource_cpu_per_worker": "1"})
    result = _check_run(run, s3_bucket, "lora_finetune_trainjob", tiny_model_dir, steps=3)
    assert result["summary"]["batch"]["world_size"] == 2
    [trainjob] = created
    assert trainjob["metadata"]["namespace"] == "ml" and trainjob["spec"]["trainer"]["numNodes"] == 2
    assert trainjob["spec"]["trainer"]["image"] == IMAGE
    assert trainjob["spec"]["runtimeRef"]["name"] == "torch-distributed"
    _no_aws_keys(trainjob)
    text = json.dumps(trainjob)
    for value in ('"serviceAccountName": "lora-trainer"', '"cloud.google.com/gke-accelerator": "nvidia-l4"',
                  '"key": "nvidia.com/gpu"'):
        assert value in text  # carried by the Trainer generation's override/patch (v2.2 in the emulator)
    assert k8s_cluster.pods() == []
