"""The emulated API server refuses what a real one refuses, and everything we render passes the real rules.

Two defects reached users because the emulator accepted anything that parses: every unmapped task's pod carried
the label value "-1" (a real API server answers 422), and every TrainJob for Kubeflow Trainer v2.2+ named its
runtime patch's manager without a domain (the Trainer webhook answers 403). Each rule below has a test that a bad
object is refused with the real status code and message shape, so the emulator cannot silently go permissive
again; and every manifest we render (each pod variant, each Trainer generation, the node pods a TrainJob
produces) is created under the same rules.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from airflow_provider_lora.core.render import (
    PodOptions, SecretRef, TaskIdentity, TrainJobOptions, render_pod, render_trainjob,
)
from airflow_provider_lora.core.spec import LoRASpec
from tests.k8s.emulator import Cluster
from tests.k8s.trainer_controller import release_schemas
from tests.k8s.util import ApiError
from tests.k8s.validation import K8S_VERSION, pod_security_violations, validate_core

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "registry.example.com/ml/lora-trainer:0.2.0"
UNMAPPED = TaskIdentity(dag_id="fine_tune", task_id="train", run_id="scheduled__2026-12-01T00:00:00+00:00")
MAPPED = TaskIdentity(dag_id="fine_tune", task_id="train", run_id="scheduled__2026-12-01T00:00:00+00:00",
                      map_index=3)
BASE = dict(base_model="Qwen/Qwen2.5-1.5B-Instruct", dataset="s3://data/chats.jsonl", output_uri="s3://out/run-1")
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
# Every Kubeflow Trainer release whose schemas are in tests/k8s/schemas, with the TrainJob shape we render for it.
TRAINER_RELEASES = [("v2.0.1", "v2.0"), ("v2.1.0", "v2.1"), ("v2.2.0", "v2.2"), ("v2.3.0", "v2.2")]

# The pod options users combine: GPU, secrets, PVC, tolerations, affinity, init containers via pod_template.
POD_VARIANTS = {
    "cpu_defaults": (dict(BASE), PodOptions(image=IMAGE)),
    "gpu_secrets_scheduling": (
        dict(BASE, resource_gpu_per_worker=4, resource_cpu_per_worker="16", resource_memory_per_worker="128Gi",
             metadata_labels="team=nlp", metadata_annotations="owner=ml@example.com", envs="NCCL_DEBUG=INFO"),
        PodOptions(namespace="ml", image=IMAGE, image_pull_secrets=("regcred",), service_account_name="trainer",
                   secret_env={"HF_TOKEN": SecretRef(name="hf", key="token"),
                               "AWS_SECRET_ACCESS_KEY": SecretRef(name="s3", key="secret")},
                   node_selector={"nvidia.com/gpu.product": "NVIDIA-H200"},
                   tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
                   affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                       "nodeSelectorTerms": [{"matchExpressions": [
                           {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["us-east-1a"]}]}]}}},
                   active_deadline_seconds=86400, s3_endpoint_url="https://minio.example.com")),
    "pvc_output": (dict(BASE, dataset="/mnt/lora/data.jsonl", output_uri="/mnt/lora/runs/run-1"),
                   PodOptions(image=IMAGE, pvc_claim_name="workspace", image_pull_policy="IfNotPresent")),
    "own_volumes": (dict(BASE, dataset="/data/chats.jsonl", output_uri="/data/runs/run-1"),
                    PodOptions(image=IMAGE, volumes=({"name": "data", "persistentVolumeClaim": {"claimName": "d"}},),
                               volume_mounts=({"name": "data", "mountPath": "/data"},), shm_size=None)),
    "pod_template_init_container": (dict(BASE), PodOptions(image=IMAGE, pod_template={
        "metadata": {"labels": {"cost-center": "research"}},
        "spec": {"priorityClassName": "training", "initContainers": [{
            "name": "fetch", "image": "busybox:1.37", "command": ["true"],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}}]}})),
}


def _pod(variant: str, identity: TaskIdentity = UNMAPPED) -> dict:
    values, options = POD_VARIANTS[variant]
    return render_pod(LoRASpec.parse(values), options, identity)


def _trainjob(shape: str, identity: TaskIdentity = UNMAPPED, **options) -> dict:
    spec = LoRASpec.parse(dict(BASE, resource_num_workers=2, resource_gpu_per_worker=4, envs="NCCL_DEBUG=INFO",
                               metadata_labels="team=nlp"))
    pod_options = PodOptions(namespace="ml", image=IMAGE, secret_env={"HF_TOKEN": SecretRef(name="hf", key="token")},
                             node_selector={"gpu": "h200"}, pvc_claim_name="workspace",
                             tolerations=({"key": "nvidia.com/gpu", "operator": "Exists"},))
    return render_trainjob(spec, pod_options, identity, TrainJobOptions(api_shape=shape, **options))


def _refusal(call) -> tuple[int, dict]:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value.code, {"message": caught.value.message, "reason": caught.value.reason, **caught.value.details}


@pytest.fixture
def core(k8s_cluster):
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(k8s_cluster.kubeconfig), client_configuration=cfg)
    api = client.ApiClient(cfg)
    yield client.CoreV1Api(api)
    api.close()


def _create(core, pod: dict, namespace: str = "default", **query):
    """POST the pod with the real client; returns (status, headers, body) whatever the outcome."""
    pod = dict(pod, metadata=dict(pod["metadata"], namespace=namespace))
    try:
        resp = core.create_namespaced_pod(namespace, pod, _preload_content=False, **query)
        return resp.status, resp.headers, json.loads(resp.data)
    except ApiException as e:
        return e.status, e.headers, json.loads(e.body)


def _minimal_pod(name: str = "p", **spec) -> dict:
    container = {"name": "c", "image": "busybox:1.37", "command": ["true"]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


# ---- what we render passes every rule -----------------------------------------------------------------------

@pytest.mark.parametrize("version", [K8S_VERSION, "latest"])
@pytest.mark.parametrize("variant", list(POD_VARIANTS))
@pytest.mark.parametrize("identity", [UNMAPPED, MAPPED], ids=["unmapped", "mapped"])
def test_every_rendered_pod_is_valid_strictly_and_restricted(variant, identity, version):
    pod = _pod(variant, identity)
    assert validate_core(copy.deepcopy(pod), "Strict", version) == []
    assert pod_security_violations(pod["spec"], "restricted") == []


@pytest.mark.parametrize("path", sorted((ROOT / "tests" / "golden").glob("pod_*.json")), ids=lambda p: p.stem)
def test_every_golden_pod_is_valid_and_only_a_template_sidecar_breaks_the_restricted_profile(path):
    pod = json.loads(path.read_text())
    assert validate_core(copy.deepcopy(pod), "Strict") == []
    violations = pod_security_violations(pod["spec"], "restricted")
    if path.stem == "pod_pod_template":  # the user's template adds a sidecar with no securityContext
        assert violations and all('container "sidecar"' in v for v in violations), violations
    else:
        assert violations == []


@pytest.mark.parametrize(("release", "shape"), TRAINER_RELEASES)
def test_every_golden_trainjob_passes_its_release(tmp_path, release, shape):
    job = json.loads((ROOT / "tests" / "golden" / f"trainjob_{shape.replace('.', '_')}.json").read_text())
    with Cluster(tmp_path / "k8s", trainer_version=release) as cluster:
        assert len(cluster.node_pods_of(job, job["metadata"]["namespace"])) == job["spec"]["trainer"]["numNodes"]


def test_an_unmapped_task_has_no_map_index_label_and_a_mapped_one_has_its_index():
    assert "lora.airflow-provider/map_index" not in _pod("cpu_defaults", UNMAPPED)["metadata"]["labels"]
    assert _pod("cpu_defaults", MAPPED)["metadata"]["labels"]["lora.airflow-provider/map_index"] == "3"


def test_the_pod_mounts_no_service_account_token_unless_the_template_asks():
    assert _pod("cpu_defaults")["spec"]["automountServiceAccountToken"] is False
    spec = LoRASpec.parse(dict(BASE))
    asked = render_pod(spec, PodOptions(image=IMAGE, pod_template={"spec": {"automountServiceAccountToken": True}}),
                       UNMAPPED)
    assert asked["spec"]["automountServiceAccountToken"] is True


@pytest.mark.parametrize("variant", list(POD_VARIANTS))
def test_every_rendered_pod_is_created_in_a_restricted_namespace(k8s_cluster, core, variant):
    k8s_cluster.label_namespace("ml", RESTRICTED)
    status, headers, body = _create(core, _pod(variant), "ml", field_validation="Strict")
    assert status == 201, body
    assert "Warning" not in headers


@pytest.mark.parametrize(("release", "shape"), TRAINER_RELEASES)
def test_every_trainjob_generation_and_its_node_pods_pass_the_release_rules(tmp_path, release, shape):
    """Schema (strict), CEL rules, the webhook, then the node pods the runtime makes from our overrides."""
    with Cluster(tmp_path / "k8s", trainer_version=release) as cluster:
        for identity in (UNMAPPED, MAPPED):
            pods = cluster.node_pods_of(_trainjob(shape, identity), "ml")
            assert len(pods) == 2
            node = pods[0]["spec"]["containers"][0]
            assert node["image"] == IMAGE and node["resources"]["limits"]["nvidia.com/gpu"] == "4"
            assert {m["mountPath"] for m in node["volumeMounts"]} >= {"/dev/shm", "/mnt/lora"}


@pytest.mark.parametrize(("release", "shape"), TRAINER_RELEASES)
def test_our_cluster_training_runtime_is_accepted_and_its_pods_are_restricted(tmp_path, release, shape):
    """docs/clustertrainingruntime.yaml is created through the API on every release, and TrainJobs on it run
    node pods that a restricted namespace admits; on v2.0/v2.1 the upstream runtime's pods are refused there."""
    runtime = yaml.safe_load((ROOT / "docs" / "clustertrainingruntime.yaml").read_text())
    with Cluster(tmp_path / "k8s", trainer_version=release) as cluster:
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
        with client.ApiClient(cfg) as api:
            client.CustomObjectsApi(api).create_cluster_custom_object(
                "trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", runtime, field_validation="Strict")
        cluster.label_namespace("ml", RESTRICTED)
        ours = _trainjob(shape, runtime_name=runtime["metadata"]["name"])
        pods = cluster.node_pods_of(ours, "ml")
        assert all(p["spec"]["automountServiceAccountToken"] is False for p in pods)
        upstream = _trainjob(shape)
        if shape == "v2.2":  # the runtime patch carries the security contexts itself
            assert len(cluster.node_pods_of(upstream, "ml")) == 2
        else:
            code, status = _refusal(lambda: cluster.node_pods_of(upstream, "ml"))
            assert code == 403 and 'violates PodSecurity "restricted:latest"' in status["message"]


def test_a_refused_node_pod_is_a_failed_create_event_and_no_pod(k8s_cluster):
    """What the Job controller reports when admission refuses its pods: the TrainJob stays without pods."""
    k8s_cluster.stop()
    with Cluster(k8s_cluster.root.parent / "k8s-v21", trainer_version="v2.1.0") as cluster:
        cluster.label_namespace("ml", RESTRICTED)
        job = _trainjob("v2.1")
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
        with client.ApiClient(cfg) as api:
            client.CustomObjectsApi(api).create_namespaced_custom_object(
                "trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", job, field_validation="Strict")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                events = client.CoreV1Api(api).list_namespaced_event("ml").items
                failed = [e for e in events if e.reason == "FailedCreate"]
                if failed:
                    break
                time.sleep(0.05)
        assert failed and failed[0].involved_object.kind == "Job"
        assert "violates PodSecurity" in failed[0].message
        assert cluster.pods("ml") == []


# ---- each rule refuses a bad object with the real status ----------------------------------------------------

def test_the_old_map_index_label_is_refused_with_a_422_and_a_cause(core):
    pod = _pod("cpu_defaults")
    pod["metadata"]["labels"]["lora.airflow-provider/map_index"] = "-1"
    status, _, body = _create(core, pod)
    assert status == 422 and body["reason"] == "Invalid" and body["kind"] == "Status"
    assert body["message"].startswith(f'Pod "{pod["metadata"]["name"]}" is invalid: metadata.labels: Invalid '
                                      'value: "-1": a valid label must be an empty string')
    assert body["details"]["causes"] == [{"reason": "FieldValueInvalid", "field": "metadata.labels",
                                          "message": body["message"].split("metadata.labels: ", 1)[1]}]


@pytest.mark.parametrize(("change", "field", "reason"), [
    (lambda p: p["metadata"].update(name="Bad_Name"), "metadata.name", "FieldValueInvalid"),
    (lambda p: p["metadata"].update(labels={"a/b/c": "x"}), "metadata.labels", "FieldValueInvalid"),
    (lambda p: p["metadata"].update(labels={"team": "x" * 64}), "metadata.labels", "FieldValueInvalid"),
    (lambda p: p["metadata"].update(annotations={"big": "x" * (256 * 1024)}), "metadata.annotations",
     "FieldValueTooLong"),
    (lambda p: p["spec"]["containers"][0].update(resources={"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}),
     "spec.containers[0].resources.requests", "FieldValueInvalid"),
    (lambda p: p["spec"]["containers"][0].update(resources={"requests": {"nvidia.com/gpu": "1"},
                                                            "limits": {"nvidia.com/gpu": "2"}}),
     "spec.containers[0].resources.requests[nvidia.com/gpu]", "FieldValueInvalid"),
    (lambda p: p["spec"]["containers"][0].update(resources={"requests": {"nvidia.com/gpu": "1"}}),
     "spec.containers[0].resources.limits", "FieldValueRequired"),
    (lambda p: p["spec"]["containers"][0].update(resources={"limits": {"nvidia.com/gpu": "0.5"}}),
     "spec.containers[0].resources.limits[nvidia.com/gpu]", "FieldValueInvalid"),
    (lambda p: p["spec"]["containers"][0].update(volumeMounts=[{"name": "absent", "mountPath": "/x"}]),
     "spec.containers[0].volumeMounts[0].name", "FieldValueNotFound"),
    (lambda p: p["spec"].update(volumes=[{"name": "v", "emptyDir": {}}]) or p["spec"]["containers"][0].update(
        volumeMounts=[{"name": "v", "mountPath": "/x"}, {"name": "v", "mountPath": "/x"}]),
     "spec.containers[0].volumeMounts[1].mountPath", "FieldValueInvalid"),
    (lambda p: p["spec"].update(volumes=[{"name": "v", "emptyDir": {}}, {"name": "v", "emptyDir": {}}]),
     "spec.volumes[1].name", "FieldValueDuplicate"),
    (lambda p: p["spec"]["containers"].append(dict(p["spec"]["containers"][0])), "spec.containers[1].name",
     "FieldValueDuplicate"),
    (lambda p: p["spec"]["containers"][0].update(name="Trainer"), "spec.containers[0].name", "FieldValueInvalid"),
    (lambda p: p["spec"]["containers"][0].update(env=[{"name": "A=B", "value": "1"}]), "spec.containers[0].env[0].name",
     "FieldValueInvalid"),
    (lambda p: p["spec"]["containers"][0].pop("image"), "spec.containers[0].image", "FieldValueRequired"),
    (lambda p: p["spec"].update(restartPolicy="Sometimes"), "spec.restartPolicy", "FieldValueNotSupported"),
    (lambda p: p["spec"].update(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}]),
     "spec.tolerations[0].operator", "FieldValueInvalid"),
    (lambda p: p["spec"].update(tolerations=[{"key": "k", "effect": "Sometimes"}]), "spec.tolerations[0].effect",
     "FieldValueNotSupported"),
    (lambda p: p["spec"].update(nodeSelector={"gpu": "-h200"}), "spec.nodeSelector", "FieldValueInvalid"),
    (lambda p: p["spec"].update(activeDeadlineSeconds=0), "spec.activeDeadlineSeconds", "FieldValueInvalid"),
], ids=["name", "label-key", "label-value-length", "annotation-size", "request-above-limit", "gpu-request-not-limit",
        "gpu-without-limit", "gpu-fraction", "mount-without-volume", "mount-path-twice", "volume-twice",
        "container-twice", "container-name", "env-name", "image-required", "restart-policy", "toleration-value",
        "toleration-effect", "node-selector-value", "deadline"])
def test_each_pod_rule_answers_422_invalid_with_its_field(core, change, field, reason):
    pod = _minimal_pod()
    change(pod)
    status, _, body = _create(core, pod)
    assert (status, body["reason"], body["code"]) == (422, "Invalid", 422), body
    assert body["message"].startswith(f'Pod "{pod["metadata"]["name"]}" is invalid: ')
    assert {"field": field, "reason": reason} in [{k: c[k] for k in ("field", "reason")}
                                                  for c in body["details"]["causes"]]


@pytest.mark.parametrize(("change", "text"), [
    (lambda p: p["spec"]["containers"][0].update(resources={"limits": {"cpu": "lots"}}),
     "quantities must match the regular expression"),
    (lambda p: p["spec"]["containers"][0].update(image=5), "json: cannot unmarshal integer into Go struct field "
                                                           "spec.containers[0].image of type string"),
])
def test_a_body_that_does_not_decode_answers_400(core, change, text):
    pod = _minimal_pod()
    change(pod)
    status, _, body = _create(core, pod)
    assert (status, body["reason"]) == (400, "BadRequest")
    assert body["message"].startswith('Pod in version "v1" cannot be handled as a Pod: ') and text in body["message"]


def test_unknown_fields_follow_field_validation(k8s_cluster, core):
    """Strict: 400 naming each field; Warn (the default): created without them, a Warning header per field;
    Ignore: dropped silently."""
    def pod(name):
        p = _minimal_pod(name)
        p["spec"]["podSpecOverrides"] = {"x": 1}
        p["spec"]["containers"][0]["securityContex"] = {}
        return p
    status, _, body = _create(core, pod("strict"), field_validation="Strict")
    assert status == 400 and body["message"] == (
        'Pod in version "v1" cannot be handled as a Pod: strict decoding error: unknown field '
        '"spec.containers[0].securityContex", unknown field "spec.podSpecOverrides"')
    for level, warned in ((None, True), ("Warn", True), ("Ignore", False)):
        name = f"level-{(level or 'default').lower()}"
        status, headers, body = _create(core, pod(name), **({"field_validation": level} if level else {}))
        assert status == 201
        assert "podSpecOverrides" not in body["spec"] and "securityContex" not in body["spec"]["containers"][0]
        assert ('unknown field \\"spec.podSpecOverrides\\"' in headers.get("Warning", "")) is warned


def test_pod_security_admission_refuses_what_the_profile_forbids(k8s_cluster, core):
    k8s_cluster.label_namespace("locked", RESTRICTED)
    status, _, body = _create(core, _minimal_pod("loose"), "locked")
    assert (status, body["reason"]) == (403, "Forbidden")
    assert body["message"].startswith('pods "loose" is forbidden: violates PodSecurity "restricted:latest": '
                                      'allowPrivilegeEscalation != false (container "c" must set '
                                      "securityContext.allowPrivilegeEscalation=false)")
    for part in ("unrestricted capabilities", "runAsNonRoot != true", "seccompProfile"):
        assert part in body["message"]
    host = _pod("cpu_defaults")
    host["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/var/run"}})
    status, _, body = _create(core, host, "locked")
    assert status == 403 and 'hostPath volumes (volumes "host")' in body["message"]
    k8s_cluster.label_namespace("base", {"pod-security.kubernetes.io/enforce": "baseline"})
    assert _create(core, _minimal_pod("plain"), "base")[0] == 201  # baseline allows what restricted refuses
    privileged = _minimal_pod("priv")
    privileged["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    status, _, body = _create(core, privileged, "base")
    assert status == 403 and 'violates PodSecurity "baseline:latest": privileged' in body["message"]


def test_a_label_patch_is_validated_too(k8s_cluster, core):
    assert _create(core, _pod("cpu_defaults"))[0] == 201
    name = _pod("cpu_defaults")["metadata"]["name"]
    with pytest.raises(ApiException) as caught:
        core.patch_namespaced_pod(name, "default", {"metadata": {"labels": {"x": "-1"}}})
    assert caught.value.status == 422


# ---- Kubeflow Trainer: CRD schema, CEL rules, webhook ----------------------------------------------------------

def test_the_schemas_record_their_release_and_commit():
    for release, _ in TRAINER_RELEASES:
        source = release_schemas(release)["source"]
        assert source["tag"] == release and len(source["commit"]) == 40
        assert source["repository"] == "https://github.com/kubeflow/trainer"


@pytest.mark.parametrize("release", ["v2.2.0", "v2.3.0"])
def test_a_runtime_patch_manager_without_a_domain_is_denied_by_the_webhook(tmp_path, release):
    job = _trainjob("v2.2")
    job["spec"]["runtimePatches"][0]["manager"] = "airflow-provider-lora"  # what we used to send
    with Cluster(tmp_path / "k8s", trainer_version=release) as cluster:
        code, status = _refusal(lambda: cluster.node_pods_of(job, "ml"))
    assert (code, status["reason"]) == (403, "Forbidden")
    assert status["message"] == ('admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request: '
                                 'spec.runtimePatches.manager: Invalid value: "airflow-provider-lora": must be a '
                                 'domain-prefixed path (such as "acme.io/foo")')


@pytest.mark.parametrize(("release", "shape", "change", "code", "text"), [
    ("v2.2.0", "v2.2", lambda j: j["metadata"]["labels"].update({"m": "-1"}), 422,
     'metadata.labels: Invalid value: "-1"'),
    ("v2.1.0", "v2.1", lambda j: j["metadata"].update(name="9-lives"), 422,
     '<nil>: Invalid value: "object": metadata.name must match RFC 1035 DNS label format'),
    ("v2.0.1", "v2.0", lambda j: j["metadata"].update(name="9-lives"), 403,
     'metadata.name: Invalid value: "9-lives": a DNS-1035 label must consist of lower case'),
    ("v2.2.0", "v2.2", lambda j: j["spec"].update(managedBy="me.example/ctl"), 422,
     "spec.managedBy: Invalid value: \"me.example/ctl\": ManagedBy must be trainer.kubeflow.org/trainjob-controller"),
    ("v2.1.0", "v2.1", lambda j: j["spec"]["trainer"].update(numProcPerNode="many"), 403,
     'spec.trainer.numProcPerNode: Invalid value: "many": must have an int value or [auto cpu gpu]'),
    ("v2.2.0", "v2.2", lambda j: j["spec"]["trainer"].update(numNodes="2"), 422,
     "spec.trainer.numNodes in body must be of type integer"),
    ("v2.2.0", "v2.2", lambda j: j["spec"]["trainer"]["env"].append({"name": "PET_MASTER_ADDR", "value": "x"}), 403,
     "spec.trainer.env: Invalid value: \"array\": must not have reserved envs, invalid envs configured: "
     "[PET_MASTER_ADDR]"),
    ("v2.2.0", "v2.2", lambda j: j["spec"].update(runtimeRef=dict(j["spec"]["runtimeRef"], name="absent")), 403,
     'clustertrainingruntime.trainer.kubeflow.org "absent" not found'),
    ("v2.2.0", "v2.2", lambda j: j["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0].update(
            env=[{"name": "X", "value": "1"}]), 403,
     "must not have envs for the dataset-initializer, model-initializer, node containers"),
    ("v2.1.0", "v2.1", lambda j: j["spec"]["podTemplateOverrides"][0]["spec"]["containers"].append(
        {"name": "sidecar"}), 403, "must not have container that doesn't exist in the runtime job node"),
    ("v2.1.0", "v2.1", lambda j: j["spec"]["podTemplateOverrides"][0]["targetJobs"].append({"name": "launcher"}),
     403, "must not have targetJob that doesn't exist in the runtime job template"),
    ("v2.0.1", "v2.0", lambda j: j["spec"]["podSpecOverrides"][0]["targetJobs"].append({"name": "node"}), 403,
     'spec.podSpecOverrides: Duplicate value: "node"'),
], ids=["label", "cel-name", "webhook-name-v2.0", "cel-managed-by", "webhook-num-proc", "type", "reserved-env",
        "runtime", "node-env", "unknown-container", "unknown-job", "duplicate-target"])
def test_each_trainer_rule_refuses_with_the_real_status(tmp_path, release, shape, change, code, text):
    job = _trainjob(shape)
    change(job)
    with Cluster(tmp_path / "k8s", trainer_version=release) as cluster:
        got, status = _refusal(lambda: cluster.node_pods_of(job, "ml"))
    assert got == code and text in status["message"], status
    assert status["reason"] == {403: "Forbidden", 422: "Invalid"}[code]


@pytest.mark.parametrize(("release", "shape", "field"), [
    ("v2.1.0", "v2.2", "spec.runtimePatches"), ("v2.2.0", "v2.1", "spec.podTemplateOverrides"),
    ("v2.0.1", "v2.1", "spec.podTemplateOverrides"), ("v2.2.0", "v2.0", "spec.podSpecOverrides")])
def test_a_generation_mismatch_is_refused_under_strict_field_validation(tmp_path, release, shape, field):
    """The API server drops fields a release's CRD lacks; Strict makes that a 400 instead of a silent loss."""
    with Cluster(tmp_path / "k8s", trainer_version=release) as cluster:
        code, status = _refusal(lambda: cluster.node_pods_of(_trainjob(shape), "ml"))
    assert code == 400 and "strict decoding error" in status["message"] and f'"{field}"' in status["message"]


@pytest.mark.parametrize("release", ["v2.1.0", "v2.2.0", "v2.3.0"])
def test_a_trainjob_update_is_validated_as_an_update(tmp_path, release):
    """Patches go through the schema, the CEL transition rules (immutable fields) and the webhook's rule that
    pod overrides change only while suspended."""
    shape = "v2.1" if release == "v2.1.0" else "v2.2"
    job = _trainjob(shape)
    job["spec"]["suspend"] = True
    job["spec"]["trainer"]["command"] = ["sleep", "30"]  # only the API is under test
    overrides = "podTemplateOverrides" if shape == "v2.1" else "runtimePatches"
    with Cluster(tmp_path / "k8s", trainer_version=release) as cluster:
        cluster.create_namespace("ml")
        cluster.create_secret("ml", "hf", {"token": "x"})
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
        with client.ApiClient(cfg) as api:
            custom = client.CustomObjectsApi(api)
            name = job["metadata"]["name"]
            custom.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", job)

            def patch(body):
                return custom.patch_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs",
                                                             name, body)
            changed = copy.deepcopy(job["spec"][overrides])
            (changed[0]["spec"] if shape == "v2.1" else changed[0]["trainingRuntimeSpec"]["template"]["spec"][
                "replicatedJobs"][0]["template"]["spec"]["template"]["spec"])["nodeSelector"] = {"gpu": "b200"}
            assert patch({"spec": {overrides: changed}})["spec"][overrides] == changed  # suspended: allowed
            assert patch({"spec": {"suspend": False}})["spec"]["suspend"] is False
            with pytest.raises(ApiException) as caught:
                patch({"spec": {overrides: job["spec"][overrides]}})
            assert caught.value.status == 403 and "can only be modified when the TrainJob is suspended" in \
                caught.value.body
            with pytest.raises(ApiException) as caught:
                patch({"spec": {"runtimeRef": {"name": "other", "apiGroup": "trainer.kubeflow.org",
                                               "kind": "ClusterTrainingRuntime"}}})
            assert caught.value.status == 422 and "immutable" in caught.value.body
            with pytest.raises(ApiException) as caught:
                patch({"metadata": {"labels": {"x": "-1"}}})
            assert caught.value.status == 422 and "metadata.labels" in caught.value.body


def test_a_runtime_with_two_trainer_replicas_is_denied(tmp_path):
    runtime = yaml.safe_load((ROOT / "docs" / "clustertrainingruntime.yaml").read_text())
    runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["replicas"] = 2
    with Cluster(tmp_path / "k8s", trainer_version="v2.2.0") as cluster:
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
        with client.ApiClient(cfg) as api, pytest.raises(ApiException) as caught:
            client.CustomObjectsApi(api).create_cluster_custom_object(
                "trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", runtime)
    assert caught.value.status == 403
    assert "spec.template.spec.replicatedJobs[0].replicas: Invalid value: 2: always must be 1" in caught.value.body


# ---- the torch runtime's rendezvous -----------------------------------------------------------------------------

def test_node_pods_rendezvous_through_node_zero_dns_name(tmp_path):
    """PET_MASTER_ADDR is `<trainjob>-node-0-0.<trainjob>` as the real torch plugin sets it, and that name (and
    only the JobSet's names) resolves inside the node pods, so a dependency on 127.0.0.1 shows."""
    probe = ("import os, socket; addr = os.environ['PET_MASTER_ADDR']; print('master', addr, "
             "socket.gethostbyname(addr)); print('host', os.environ['HOSTNAME'])\n"
             "try:\n    socket.gethostbyname('not-a-node.elsewhere')\nexcept OSError:\n    print('unknown refused')")
    job = _trainjob("v2.2")
    job["metadata"]["namespace"] = "default"
    job["spec"]["trainer"].update(command=["python", "-c", probe], numProcPerNode=1)
    job["spec"]["trainer"]["resourcesPerNode"] = {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}}
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_spec = patch["template"]["spec"]["template"]["spec"]
    pod_spec["volumes"] = [v for v in pod_spec["volumes"] if "persistentVolumeClaim" not in v]
    pod_spec["containers"][0]["volumeMounts"] = [m for m in pod_spec["containers"][0]["volumeMounts"]
                                                 if m["mountPath"] != "/mnt/lora"]
    with Cluster(tmp_path / "k8s", trainer_version="v2.2.0") as cluster:
        cluster.create_secret("default", "hf", {"token": "not-a-real-token"})
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
        with client.ApiClient(cfg) as api:
            client.CustomObjectsApi(api).create_namespaced_custom_object(
                "trainer.kubeflow.org", "v1alpha1", "default", "trainjobs", job, field_validation="Strict")
        name = job["metadata"]["name"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pods = cluster.pods("default")
            if len(pods) == 2 and all(p["status"].get("phase") in ("Succeeded", "Failed") for p in pods):
                break
            time.sleep(0.05)
        logs = {p["spec"]["hostname"]: cluster.logs("default", p["metadata"]["name"]) for p in pods}
    for index in (0, 1):
        log = logs[f"{name}-node-0-{index}"]
        assert f"master {name}-node-0-0.{name} 127.0.0.1" in log, log
        assert f"host {name}-node-0-{index}" in log and "unknown refused" in log


def test_a_namespace_that_does_not_exist_is_refused_as_namespace_lifecycle_refuses_it(k8s_cluster, core):
    """Kubernetes' NamespaceLifecycle admission: 404 `namespaces "<ns>" not found`, for pods and TrainJobs alike;
    the test helper Cluster.create_namespace makes it exist."""
    status, _, body = _create(core, _pod("cpu_defaults"), "nowhere")
    assert (status, body["reason"], body["message"]) == (404, "NotFound", 'namespaces "nowhere" not found')
    trainjob = _trainjob("v2.2")
    trainjob["metadata"]["namespace"] = "nowhere"
    with pytest.raises(ApiException) as info:
        client.CustomObjectsApi(core.api_client).create_namespaced_custom_object(
            "trainer.kubeflow.org", "v1alpha1", "nowhere", "trainjobs", trainjob)
    assert info.value.status == 404 and json.loads(info.value.body)["message"] == 'namespaces "nowhere" not found'
    k8s_cluster.create_namespace("nowhere")
    assert _create(core, _pod("cpu_defaults"), "nowhere")[0] == 201
