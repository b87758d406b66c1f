"""The dry run (issue 16): the trainer's preflight plan run where the training would run, before any GPU is
reserved. On this machine (the local launcher), and in a pod on the emulated cluster: the training's own pod
without a GPU request, which prints the plan, is read back and deleted, and refuses a run that cannot fit."""

from __future__ import annotations

import json

import pytest

from airflow_provider_lora.core.launchers import cluster
from airflow_provider_lora.core.launchers.local import plan_local
from airflow_provider_lora.core.launchers.pod import PlanRefused
from airflow_provider_lora.core.render import PodOptions, TaskIdentity, pod_name, render_plan_pod
from tests.trainer_helpers import arithmetic_rows, make_spec, write_jsonl

pytest.importorskip("peft")

IDENTITY = TaskIdentity(dag_id="dry", task_id="train", run_id="r1")


@pytest.fixture
def gpu_spec(tiny_model_dir, tmp_path):
    """A two-node, two-GPU-per-node training of the tiny model: what the plan is about, not what its pod asks."""
    data = write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(24))
    return make_spec(tiny_model_dir, data, "s3://bucket/runs/r1", resource_num_workers=2,
                     resource_gpu_per_worker=2, resource_memory_per_worker="2Gi", resource_cpu_per_worker="1",
                     effective_batch_size=8, max_tokens_per_gpu=256, max_seq_len=64)


def _spec_argument(command: list[str]) -> dict:
    return json.loads(command[command.index("--spec-json") + 1].replace("$$", "$"))


def test_the_plan_pod_is_the_training_pod_without_a_gpu_running_the_plan_of_the_real_spec(gpu_spec):
    pod = render_plan_pod(gpu_spec, PodOptions(image="registry.example.com/lora:1"), IDENTITY, memory_gib=80)
    [container] = pod["spec"]["containers"]
    assert pod["metadata"]["name"] == pod_name(IDENTITY)[: 63 - len("-plan")] + "-plan"
    assert pod["metadata"]["labels"]["lora.airflow-provider/purpose"] == "plan"
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert container["command"][:5] == ["python", "-m", "lora_trainer", "--plan", "--no-plan-measure"]
    assert container["command"][-2:] == ["--plan-memory-gib", "80"]
    planned = _spec_argument(container["command"])
    assert (planned["resource_num_workers"], planned["resource_gpu_per_worker"]) == (2, 2)


def test_a_local_dry_run_returns_the_plan_and_trains_nothing(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(24))
    spec = make_spec(tiny_model_dir, data, tmp_path / "out", effective_batch_size=4, max_tokens_per_gpu=256,
                     max_seq_len=64)
    lines: list[str] = []
    plan = plan_local(spec, on_line=lines.append, memory_gib=8)
    assert plan["dataset"]["rows"] == 24 and plan["memory"]["fits"] is True
    assert plan["memory"]["available_bytes"] == 8 * 1024 ** 3
    assert plan["time"]["measured"] is True  # here is where a local training would run
    assert any(line.startswith("[lora-trainer] plan") for line in lines)
    assert not (tmp_path / "out").exists()


def test_a_local_dry_run_refuses_a_run_that_cannot_fit_and_still_gives_the_plan(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(24))
    spec = make_spec(tiny_model_dir, data, tmp_path / "out", max_seq_len=64)
    with pytest.raises(PlanRefused, match="does not fit|micro-batch") as refused:
        plan_local(spec, on_line=lambda line: None, memory_gib=0.001)
    assert refused.value.plan is not None and refused.value.plan["memory"]["fits"] is False


@pytest.fixture
def core(k8s_cluster):
    from kubernetes import client, config

    return client.CoreV1Api(config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig)))


def _plan_job(core, spec, memory_gib):
    return cluster.for_manifest(core, render_plan_pod(spec, PodOptions(image="registry.example.com/lora:1"),
                                                      IDENTITY, memory_gib))


def test_a_dry_run_on_the_cluster_runs_one_cpu_pod_reads_the_plan_and_leaves_nothing(k8s_cluster, core, gpu_spec):
    lines: list[str] = []
    plan = cluster.run_plan(_plan_job(core, gpu_spec, 80), 0.2, 120, lines.append)
    assert plan["dataset"]["rows"] == 24 and plan["dataset"]["processes"] == 4  # 2 nodes x 2 GPUs
    assert plan["memory"]["available_bytes"] == 80 * 1024 ** 3 and plan["memory"]["fits"] is True
    assert plan["time"]["measured"] is False
    creates = [r for r in k8s_cluster.request_log if r[0] == "POST"]
    assert len(creates) == 1 and creates[0][1].endswith("/pods")
    assert k8s_cluster.pods() == []


def test_a_gpu_training_planned_without_its_memory_is_estimated_for_the_gpu_but_not_judged(k8s_cluster, core,
                                                                                          gpu_spec):
    """The plan pod has no GPU to ask: the estimate is the GPU's (bfloat16, gradient checkpointing, as the trainer
    runs there), and without plan_memory_gib the plan says it cannot tell whether it fits, rather than comparing
    with the pod's RAM."""
    plan = cluster.run_plan(_plan_job(core, gpu_spec, None), 0.2, 120, lambda line: None)
    memory = plan["memory"]
    assert (memory["device"], memory["dtype"], memory["gradient_checkpointing"]) == ("cuda", "float32", True)
    assert memory["fits"] is None and memory["available_bytes"] is None
    assert "give --plan-memory-gib" in memory["available_source"]
    assert plan["time"]["measured"] is False and "not on this machine" in plan["time"]["note"]


def test_a_dry_run_on_the_cluster_refuses_a_run_that_cannot_fit(k8s_cluster, core, gpu_spec):
    with pytest.raises(PlanRefused) as refused:
        cluster.run_plan(_plan_job(core, gpu_spec, 0.001), 0.2, 120, lambda line: None)
    assert "fit" in str(refused.value) and refused.value.plan["memory"]["fits"] is False
    assert k8s_cluster.pods() == []


def test_a_dry_run_whose_pod_cannot_start_fails_in_seconds_and_leaves_nothing(k8s_cluster, core, gpu_spec):
    """A missing Secret: the pod waits with CreateContainerConfigError, which the startup verdict stops (after
    startup_timeout, here 1 s, or that reason's own 60 s grace, whichever comes first)."""
    options = PodOptions(image="registry.example.com/lora:1", secret_env={"HF_TOKEN": {"name": "absent-secret", "key": "token"}})
    job = cluster.for_manifest(core, render_plan_pod(gpu_spec, options, IDENTITY, 80))
    with pytest.raises(RuntimeError, match="CreateContainerConfigError"):
        cluster.run_plan(job, 0.2, 1, lambda line: None)
    assert k8s_cluster.pods() == []


# ---- the operator ------------------------------------------------------------------------------------------------

class PlanTI:
    """The TaskInstance attributes a dry run reads, and the XComs it pushes."""
    dag_id, task_id, run_id, map_index, try_number = "dry", "train", "r1", -1, 1

    def __init__(self):
        self.xcom: dict = {}

    def xcom_push(self, key, value):
        self.xcom[key] = value


def test_the_operators_local_dry_run_returns_and_pushes_the_plan(tiny_model_dir, tmp_path):
    from airflow_provider_lora.operators.lora import LoRATrainingOperator

    data = write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(24))
    op = LoRATrainingOperator(task_id="train", launcher="local", dry_run="True", plan_memory_gib="16",
                              base_model=str(tiny_model_dir), dataset=str(data), output_uri=str(tmp_path / "out"),
                              max_seq_len=64, max_tokens_per_gpu=256, effective_batch_size=4, dtype="float32")
    ti = PlanTI()
    result = op.execute({"ti": ti})
    assert result["dry_run"] is True and result["plan"] == ti.xcom["plan"]
    assert result["plan"]["memory"]["available_bytes"] == 16 * 1024 ** 3
    assert not (tmp_path / "out").exists()


def test_the_operators_dry_run_that_cannot_fit_fails_without_retry_and_still_pushes_the_plan(
        k8s_cluster, tiny_model_dir, tmp_path, monkeypatch):
    from airflow_provider_lora.compat import AirflowFailException
    from airflow_provider_lora.operators.lora import LoRATrainingOperator
    from tests.fixtures.airflow import K8S_EMU, connect

    connect(monkeypatch, k8s_cluster, K8S_EMU)
    data = write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(24))
    op = LoRATrainingOperator(task_id="train", launcher="pod", kubernetes_conn_id=K8S_EMU, dry_run=True,
                              plan_memory_gib=0.001, image="registry.example.com/lora:1", poll_interval=0.2,
                              base_model=str(tiny_model_dir), dataset=str(data), output_uri="s3://bucket/runs/x",
                              max_seq_len=64, resource_gpu_per_worker=1)
    ti = PlanTI()
    with pytest.raises(AirflowFailException, match="dry run: the training would not run as asked: .*fit"):
        op.execute({"ti": ti})
    assert ti.xcom["plan"]["memory"]["fits"] is False
    assert k8s_cluster.pods() == []


@pytest.mark.parametrize("arguments, message", [
    ({"dry_run": "maybe"}, r"dry_run='maybe' is not valid: give True or False"),
    ({"plan_memory_gib": 0}, r"plan_memory_gib=0 is not valid: give the accelerator memory per process in GiB"),
    ({"plan_memory_gib": "lots"}, r"plan_memory_gib='lots' is not valid"),
])
def test_bad_dry_run_arguments_fail_when_the_dag_is_parsed(arguments, message):
    from airflow_provider_lora.operators.lora import LoRATrainingOperator

    with pytest.raises(ValueError, match=message):
        LoRATrainingOperator(task_id="train", launcher="local", base_model="org/m", dataset="org/d",
                             output_uri="s3://b/p", **arguments)
