"""Pod rendering: golden manifests for a handful of specs, and the properties every manifest must have."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from airflow_provider_lora.core.render import (
    PodOptions, SecretRef, TaskIdentity, pod_name, render_pod, safe_label_value,
)
from airflow_provider_lora.core.spec import LoRASpec

GOLDEN = Path(__file__).parent / "golden"
IMAGE = "registry.example/lora-trainer:0.1.0"
IDENTITY = TaskIdentity(dag_id="fine_tune", task_id="train", run_id="manual__2026-11-28T10:00:00+00:00",
                        try_number=2, deployment="prod")
BASE = dict(base_model="Qwen/Qwen2.5-1.5B-Instruct", dataset="s3://data/chats.jsonl", output_uri="s3://out/run-1")

CASES = {
    "gpu": (dict(BASE), PodOptions(image=IMAGE, namespace="ml",
                                   secret_env={"HF_TOKEN": SecretRef(name="hf", key="token")})),
    "multi_proc": (dict(BASE, resource_gpu_per_worker=4, resource_cpu_per_worker="16",
                        resource_memory_per_worker="128Gi", metadata_labels="team=nlp",
                        metadata_annotations="owner=ml@example.com"),
                   PodOptions(image=IMAGE, namespace="ml", image_pull_secrets=("regcred",),
                              service_account_name="trainer",
                              node_selector={"nvidia.com/gpu.product": "NVIDIA-H200"},
                              tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},))),
    "pvc_output": (dict(BASE, dataset="/data/chats.jsonl", output_uri="/data/runs/run-1", envs="HF_HUB_OFFLINE=1"),
                   PodOptions(image=IMAGE,
                              volumes=({"name": "data", "persistentVolumeClaim": {"claimName": "training-data"}},),
                              volume_mounts=({"name": "data", "mountPath": "/data"},))),
    "pod_template": (dict(BASE), PodOptions(image=IMAGE, pod_template={
        "metadata": {"labels": {"cost-center": "research"}},
        "spec": {"priorityClassName": "training", "containers": [
            {"name": "trainer", "env": [{"name": "NCCL_DEBUG", "value": "INFO"}]},
            {"name": "sidecar", "image": "busybox"}]}})),
}


def _render(case: str) -> dict:
    values, options = CASES[case]
    return render_pod(LoRASpec.parse(values), options, IDENTITY)


@pytest.mark.parametrize("case", list(CASES))
def test_golden_manifest(case):
    """The rendered pod equals tests/golden/pod_<case>.json (UPDATE_GOLDEN=1 rewrites them; review the diff)."""
    path = GOLDEN / f"pod_{case}.json"
    rendered = _render(case)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(json.dumps(rendered, indent=2, sort_keys=True) + "\n")
    assert rendered == json.loads(path.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_every_manifest_meets_the_restricted_profile_and_names_no_secret(case):
    pod = _render(case)
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "trainer")
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert not any("hostPath" in v for v in pod["spec"]["volumes"])
    for env in container["env"]:
        assert "value" in env or "secretKeyRef" in env["valueFrom"]
    assert isinstance(container["command"], list) and "sh" not in container["command"][:2]


def test_several_processes_run_under_torchrun_with_one_gpu_each():
    command = _render("multi_proc")["spec"]["containers"][0]["command"]
    assert command[:2] == ["torchrun", "--nproc_per_node=4"] and command[2:4] == ["-m", "lora_trainer"]
    limits = _render("multi_proc")["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "4"}


def test_template_merges_under_our_settings():
    pod = _render("pod_template")
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["trainer", "sidecar"]
    trainer = pod["spec"]["containers"][0]
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in trainer["env"] and trainer["command"][0] == "python"
    assert pod["spec"]["priorityClassName"] == "training" and pod["metadata"]["labels"]["cost-center"] == "research"


def test_a_retry_gets_the_same_name_and_another_deployment_another():
    retry = IDENTITY.model_copy(update={"try_number": 3})
    other = IDENTITY.model_copy(update={"deployment": "staging"})
    assert pod_name(retry) == pod_name(IDENTITY) != pod_name(other)


@given(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=300), st.text(max_size=300),
       st.integers(-1, 10**6))
def test_pod_names_are_dns_labels(dag_id, task_id, run_id, map_index):
    import re

    name = pod_name(TaskIdentity(dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=map_index))
    assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)


@given(st.text(max_size=300))
def test_label_values_are_valid_and_distinct_values_stay_distinct(value):
    import re

    label = safe_label_value(value)
    assert len(label) <= 63 and re.fullmatch(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", label)
    assert safe_label_value(value + "x") != label or value + "x" == value


def test_reserved_labels_and_env_clashes_are_rejected():
    with pytest.raises(ValueError, match="reserved"):
        render_pod(LoRASpec.parse(dict(BASE, metadata_labels="lora.airflow-provider/dag_id=x")),
                   PodOptions(image=IMAGE),
                   IDENTITY)
    with pytest.raises(ValueError, match="HF_HOME.*secret"):
        render_pod(LoRASpec.parse(dict(BASE, envs="HF_HOME=/x")),
                   PodOptions(image=IMAGE, secret_env={"HF_HOME": SecretRef(name="s", key="k")}), IDENTITY)
    with pytest.raises(ValueError, match="TrainJob|trainjob"):
        render_pod(LoRASpec.parse(dict(BASE, resource_num_workers=2)), PodOptions(image=IMAGE), IDENTITY)


def test_a_workspace_pvc_is_mounted_and_path_outputs_must_live_on_a_volume():
    spec = LoRASpec.parse(dict(BASE, dataset="/mnt/lora/data.jsonl", output_uri="/mnt/lora/runs/1"))
    pod = render_pod(spec, PodOptions(image=IMAGE, pvc_claim_name="workspace"), IDENTITY)
    assert {"name": "lora-workspace", "persistentVolumeClaim": {"claimName": "workspace"}} in pod["spec"]["volumes"]
    assert {"name": "lora-workspace", "mountPath": "/mnt/lora"} in pod["spec"]["containers"][0]["volumeMounts"]
    with pytest.raises(ValueError, match=r"output_uri='/mnt/lora/runs/1' is not on a mounted volume.*pvc_claim_name"):
        render_pod(spec, PodOptions(image=IMAGE), IDENTITY)
