"""Pure functions from a LoRASpec (plus where and as whom to run) to what is launched: the trainer's argv and a
Pod manifest. No I/O, no clients: golden-tested.

The Pod name is deterministic (deployment, dag, task, run, map index), so a retry finds the pod an earlier try made
instead of starting a second training; the try that made it is a label.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from airflow_provider_lora.core.contract import TERMINATION_LOG, TERMINATION_LOG_ENV
from airflow_provider_lora.core.spec import LoRASpec

TRAINER_CONTAINER = "trainer"
LABEL_PREFIX = "lora.airflow-provider/"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "airflow-provider-lora"
# Who owns our TrainJob runtime patch. Kubeflow Trainer's webhook (v2.2.0 and later) requires a domain-prefixed
# path (validation.IsDomainPrefixedPath in pkg/runtime/framework/plugins/jobset/jobset.go), such as "acme.io/foo".
RUNTIME_PATCH_MANAGER = "lora.airflow-provider/operator"
IDENTITY_KEYS = ("dag_id", "task_id", "run_id", "map_index", "try_number")
TRY_NUMBER_LABEL = LABEL_PREFIX + "try_number"  # the try that created the run (its name is the same for every try)
PURPOSE_LABEL = LABEL_PREFIX + "purpose"  # "plan" on a dry run's pod
PLAN_SUFFIX = "-plan"
SHM_VOLUME = "lora-dshm"
# Where a pod's trainer stages an s3:// run (an emptyDir; local/PVC output is written in place).
WORK_DIR = "/tmp/lora-work"

_DNS_LABEL_CHARS = re.compile(r"[^a-z0-9-]+")
_LABEL_VALUE_OK = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
# An image reference ([registry[:port]/]lowercase/path[:tag][@sha256:digest]): anything else the kubelet leaves
# waiting with InvalidImageName, so it is refused before launching.
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(rf"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*(?::[0-9]+)?/)?{_IMAGE_COMPONENT}"
                             rf"(?:/{_IMAGE_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
                             r"(?:@sha256:[a-f0-9]{64})?\Z")


class SecretRef(BaseModel):
    """A key of a Kubernetes Secret, given to the container as an environment variable (never a literal)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    key: str

    @classmethod
    def parse(cls, value: Any, parameter: str) -> "SecretRef":
        """``"secret/key"``, ``{"name": ..., "key": ...}`` or a SecretRef, as users write it; ``parameter`` names
        the setting in the error."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, str) and value.count("/") == 1 and all(value.split("/")):
            secret, key = value.split("/")
            return cls(name=secret, key=key)
        raise ValueError(f"{parameter}={value!r} is not valid: give 'secret-name/key' or "
                         "{'name': ..., 'key': ...}")


class TaskIdentity(BaseModel):
    """Who launches the pod. ``deployment`` tells apart Airflow deployments that share a namespace."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    dag_id: str
    task_id: str
    run_id: str
    map_index: int = -1
    try_number: int = 1
    deployment: str = "default"


class PodOptions(BaseModel):
    """Where and as whom the training pod runs. Every field is a Kubernetes concept, spelled as the
    KubernetesPodOperator spells it; the operator takes each as a keyword argument of the same name (its reference,
    docs/operator.md, shows these descriptions) and the KFP component reads them from LORA_KFP_POD_OPTIONS."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    namespace: str = Field("default", description="the namespace the pod or TrainJob is created in")
    # No default: this project publishes no image, and a name nobody can pull only waits for a timeout.
    image: str = Field(description="the training image (built from trainer/Dockerfile and pushed where the "
                                   "cluster pulls from)")
    image_pull_policy: str | None = Field(None, description="``Always``, ``IfNotPresent`` or ``Never`` "
                                                            "(None: Kubernetes' default for the tag)")
    image_pull_secrets: tuple[str, ...] = Field((), description="names of Secrets holding registry credentials")
    service_account_name: str | None = Field(None, description="the pod's service account (None: the namespace's "
                                                               "default)")
    node_selector: dict[str, str] = Field(default_factory=dict, description="node labels the pod must match, "
                                                                            "e.g. a GPU type")
    tolerations: tuple[dict[str, Any], ...] = Field((), description="tolerations, as in a pod spec (e.g. of a "
                                                                    "GPU node pool's taint)")
    affinity: dict[str, Any] | None = Field(None, description="an affinity, as in a pod spec")
    volumes: tuple[dict[str, Any], ...] = Field((), description="more volumes, as in a pod spec")
    volume_mounts: tuple[dict[str, Any], ...] = Field((), description="mounts of those volumes in the training "
                                                                      "container")
    secret_env: dict[str, SecretRef] = Field(default_factory=dict, description="environment variables from "
                                             "Secrets: ENV_NAME -> secret key, e.g. HF_TOKEN")
    pvc_claim_name: str | None = Field(None, description="a PVC mounted as the workspace at ``pvc_mount_path``; put "
                                       "``dataset``, ``output_uri`` and ``data_output_dir`` under it. A path "
                                       "``output_uri`` must be on a mounted volume (this PVC or one in "
                                       "``volumes``), or the task fails before launching")
    pvc_mount_path: str = Field("/mnt/lora", description="where the workspace PVC is mounted")
    pod_template: dict[str, Any] | None = Field(None, description="a pod manifest our settings are merged over")
    s3_endpoint_url: str | None = Field(None, description="an S3-compatible endpoint (MinIO, Ceph, ...), e.g. "
                                        "``http://minio.minio:9000``: the trainer's AWS_ENDPOINT_URL (None: "
                                        "boto3's own)")
    shm_size: str | None = Field("16Gi", description="the size of /dev/shm (dataloader workers and NCCL use it); "
                                 "None: no size limit")
    active_deadline_seconds: int | None = Field(None, description="stop the training after this many seconds (a "
                                                "Pod's activeDeadlineSeconds; a TrainJob's needs Trainer v2.2+)")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(f"namespace={v!r} is not valid: a Kubernetes namespace is a DNS label (lowercase "
                             "letters, digits and '-', at most 63 characters)")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not IMAGE_REFERENCE.match(v):
            raise ValueError(f"image={v!r} is not valid: expected an image reference such as "
                             "'registry.example.com/team/trainer:1.0' (lowercase path, optional :tag or @sha256:...)")
        return v

    @field_validator("image_pull_policy")
    @classmethod
    def _policy(cls, v: str | None) -> str | None:
        if v is not None and v not in ("Always", "IfNotPresent", "Never"):
            raise ValueError(f"image_pull_policy={v!r} is not valid: accepted: Always, IfNotPresent, Never")
        return v

    @field_validator("secret_env")
    @classmethod
    def _secret_env(cls, v: dict[str, SecretRef]) -> dict[str, SecretRef]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"secret_env key {name!r} is not an environment variable name")
        return v


# ---- names and labels ---------------------------------------------------------------------------------------------

def _digest(*parts: Any, length: int = 10) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:length]


def pod_name(identity: TaskIdentity) -> str:
    """A DNS-1123 label (<= 63 chars), the same for every try of one task instance in one deployment."""
    return _task_object_name(identity, 63)


def _task_object_name(identity: TaskIdentity, limit: int) -> str:
    """``lora-<dag>-<task>-<digest>`` in at most ``limit`` characters; the digest keeps names unique."""
    digest = _digest(identity.deployment, identity.dag_id, identity.task_id, identity.run_id, identity.map_index)
    readable = _DNS_LABEL_CHARS.sub("-", f"{identity.dag_id}-{identity.task_id}".lower()).strip("-")
    readable = readable[: limit - len("lora--") - len(digest)].strip("-")
    return f"lora-{readable}-{digest}" if readable else f"lora-{digest}"


def safe_label_value(value: Any) -> str:
    """``value`` as a valid label value: as is when valid, otherwise cleaned and suffixed with a hash of the
    original (so distinct values stay distinct). The raw value also goes into an annotation."""
    text = str(value)
    if len(text) <= 63 and _LABEL_VALUE_OK.match(text):
        return text
    digest = _digest(text, length=8)
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[: 63 - 1 - len(digest)]
    cleaned = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)
    return f"{cleaned}-{digest}" if cleaned else digest


def identity_labels(identity: TaskIdentity) -> dict[str, str]:
    """Labels that find this task instance's pod (try_number excluded: a retry reattaches). An unmapped task
    (map_index -1) gets no map_index label, as with KubernetesPodOperator: a label value must begin and end with
    an alphanumeric character, so the API server refuses "-1"."""
    labels = {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PREFIX + "deployment": safe_label_value(identity.deployment),
        LABEL_PREFIX + "dag_id": safe_label_value(identity.dag_id),
        LABEL_PREFIX + "task_id": safe_label_value(identity.task_id),
        LABEL_PREFIX + "run_id": safe_label_value(identity.run_id),
    }
    if identity.map_index >= 0:
        labels[LABEL_PREFIX + "map_index"] = str(identity.map_index)
    return labels


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# ---- the trainer's command ------------------------------------------------------------------------------------------

def trainer_argv(spec: LoRASpec, nproc: int, torchrun: bool = False) -> list[str]:
    """The container command as an argv list (no shell): torchrun when a worker runs several processes, or when
    asked (a TrainJob's nodes must rendezvous even with one process each)."""
    launcher = ["torchrun", f"--nproc_per_node={nproc}"] if nproc > 1 or torchrun else ["python"]
    return launcher + ["-m", "lora_trainer", "--spec-json", spec_argument(spec), "--work-dir", WORK_DIR]


def spec_argument(spec: LoRASpec) -> str:
    """The spec as one command-line argument of a container. Kubernetes expands ``$(VAR)`` in a container's
    command and args (``$$`` is a literal ``$``): a user's string such as ``dataset="$(HF_TOKEN)"`` would
    otherwise become the secret's value, so every ``$`` is escaped."""
    return spec.model_dump_json().replace("$", "$$")


def plan_argv(spec: LoRASpec, memory_gib: float | None) -> list[str]:
    """The dry run's command: the trainer's preflight plan of ``spec`` (nothing trained or written), estimated for
    the device the training asks for. Throughput is not measured: the plan pod has no GPU, and a time measured on
    its CPU would say nothing of the training's."""
    device = "cuda" if spec.resource_gpu_per_worker else "cpu"
    argv = ["python", "-m", "lora_trainer", "--plan", "--no-plan-measure", "--plan-device", device, "--spec-json",
            spec_argument(spec), "--work-dir", WORK_DIR]
    return argv + (["--plan-memory-gib", f"{memory_gib:g}"] if memory_gib is not None else [])


# ---- the pod ---------------------------------------------------------------------------------------------------

RESTRICTED_POD_SECURITY = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def render_pod(spec: LoRASpec, options: PodOptions, identity: TaskIdentity) -> dict[str, Any]:
    """The training Pod for one worker (resource_num_workers > 1 is the TrainJob launcher's job)."""
    if spec.resource_num_workers != 1:
        raise ValueError(f"resource_num_workers={spec.resource_num_workers}: a Pod is one worker; use "
                         "launcher='trainjob' for several")
    workload = _Workload.of(spec, options, identity)
    container = {
        "name": TRAINER_CONTAINER,
        "image": options.image,
        "command": trainer_argv(spec, spec.procs_per_worker),
        "env": workload.env,
        "resources": workload.resources,
        "volumeMounts": workload.mounts,
        "securityContext": copy.deepcopy(RESTRICTED_CONTAINER_SECURITY),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if options.image_pull_policy:
        container["imagePullPolicy"] = options.image_pull_policy
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # The trainer never calls the Kubernetes API: no service-account token in the pod (a pod_template that
        # sets automountServiceAccountToken keeps its own value).
        "automountServiceAccountToken": False,
        "securityContext": copy.deepcopy(RESTRICTED_POD_SECURITY),
        "containers": [container],
        "volumes": workload.volumes,
        **workload.scheduling,
    }
    if options.active_deadline_seconds is not None:
        pod_spec["activeDeadlineSeconds"] = options.active_deadline_seconds
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name(identity), "namespace": options.namespace, "labels": workload.labels,
                     "annotations": workload.annotations},
        "spec": pod_spec,
    }
    if options.pod_template:
        template_spec = options.pod_template.get("spec") or {}
        if "automountServiceAccountToken" in template_spec:
            pod_spec["automountServiceAccountToken"] = template_spec["automountServiceAccountToken"]
        pod = merge_under(options.pod_template, pod)
    return pod


def render_plan_pod(spec: LoRASpec, options: PodOptions, identity: TaskIdentity,
                    memory_gib: float | None = None) -> dict[str, Any]:
    """The dry run's pod: the training's own pod for one worker (image, service account, secrets, volumes,
    scheduling) without a GPU request, running the plan of the real ``spec`` (every worker and GPU it asks for).
    An image that does not pull, a missing Secret, data or a model the pod cannot read fail there in seconds, on a
    CPU node, before any GPU is reserved. ``memory_gib``: the accelerator memory per process to plan against."""
    one_cpu_worker = spec.model_copy(update={"resource_num_workers": 1, "resource_gpu_per_worker": 0,
                                             "resource_num_procs_per_worker": "1"})
    pod = render_pod(one_cpu_worker, options, identity)
    pod["metadata"]["name"] = plan_pod_name(identity)
    pod["metadata"]["labels"][PURPOSE_LABEL] = "plan"
    [trainer] = [c for c in pod["spec"]["containers"] if c["name"] == TRAINER_CONTAINER]
    trainer["command"] = plan_argv(spec, memory_gib)
    return pod


def plan_pod_name(identity: TaskIdentity) -> str:
    """The dry run's pod: its own name, so it never meets the training's pod."""
    return _task_object_name(identity, 63 - len(PLAN_SUFFIX)) + PLAN_SUFFIX


class _Workload(BaseModel):
    """What a Pod and a TrainJob's node pods share: env (secrets by reference), resources, volumes, scheduling,
    labels and annotations. One place, so the two launchers cannot drift apart."""

    env: list[dict[str, Any]]
    resources: dict[str, dict[str, str]]
    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]
    scheduling: dict[str, Any]  # serviceAccountName, imagePullSecrets, nodeSelector, tolerations, affinity
    labels: dict[str, str]
    annotations: dict[str, str]

    @classmethod
    def of(cls, spec: LoRASpec, options: PodOptions, identity: TaskIdentity) -> "_Workload":
        for field, keys in (("metadata_labels", spec.labels), ("metadata_annotations", spec.annotations)):
            for key in keys:  # the operator's identity labels and log cursor annotation are not the user's
                if key.startswith(LABEL_PREFIX) or key == LABEL_MANAGED_BY:
                    raise ValueError(f"{field} key {key!r} is reserved for the operator's own labels and "
                                     "annotations")
        volumes, mounts = [dict(v) for v in options.volumes], [dict(m) for m in options.volume_mounts]
        if options.pvc_claim_name:
            volumes.append({"name": "lora-workspace",
                            "persistentVolumeClaim": {"claimName": options.pvc_claim_name}})
            mounts.append({"name": "lora-workspace", "mountPath": options.pvc_mount_path})
        _check_output_persists(spec.output_uri, [m["mountPath"] for m in mounts])
        clash = sorted(set(spec.env_vars) & set(options.secret_env))
        if clash:
            raise ValueError(f"envs sets {', '.join(clash)}, which also comes from a secret; set it in one place")
        env = [{"name": k, "value": v} for k, v in spec.env_vars.items()]
        env += [{"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
                for name, ref in sorted(options.secret_env.items())]
        if options.s3_endpoint_url:  # boto3 (the trainer's uploads, its dataset reads) reads it from the env
            if "AWS_ENDPOINT_URL" in {*spec.env_vars, *options.secret_env}:
                raise ValueError("s3_endpoint_url and envs/secret_env both set AWS_ENDPOINT_URL; set it in one place")
            env.append({"name": "AWS_ENDPOINT_URL", "value": options.s3_endpoint_url})
        env.append({"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG})
        resources = {"cpu": spec.resource_cpu_per_worker, "memory": spec.resource_memory_per_worker}
        if spec.resource_gpu_per_worker:
            resources["nvidia.com/gpu"] = str(spec.resource_gpu_per_worker)
        shm = {"medium": "Memory"} | ({"sizeLimit": options.shm_size} if options.shm_size else {})
        scheduling = {
            "serviceAccountName": options.service_account_name,
            "imagePullSecrets": [{"name": n} for n in options.image_pull_secrets] or None,
            "nodeSelector": dict(options.node_selector) or None,
            "tolerations": [dict(t) for t in options.tolerations] or None,
            "affinity": options.affinity,
        }
        return cls(
            env=env,
            resources={"requests": dict(resources), "limits": dict(resources)},
            volumes=[{"name": SHM_VOLUME, "emptyDir": shm}, {"name": "lora-work", "emptyDir": {}}, *volumes],
            mounts=[{"name": SHM_VOLUME, "mountPath": "/dev/shm"}, {"name": "lora-work", "mountPath": WORK_DIR},
                    *mounts],
            scheduling={k: v for k, v in scheduling.items() if v is not None},
            labels={**spec.labels, **identity_labels(identity),
                    TRY_NUMBER_LABEL: str(identity.try_number)},
            annotations={**spec.annotations,
                         **{LABEL_PREFIX + k: str(getattr(identity, k)) for k in IDENTITY_KEYS}},
        )


# ---- the TrainJob (Kubeflow Trainer) ----------------------------------------------------------------------------

TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
TRAINJOB_NODE_JOB = "node"  # the torch runtime's replicated job; its container is named "node" too
# The TrainJob field that customises the node pods changed with every Trainer release: v2.0 podSpecOverrides,
# v2.1 podTemplateOverrides, v2.2+ runtimePatches (the CRDs at those tags of kubeflow/trainer).
TRAINER_API_SHAPES = ("v2.0", "v2.1", "v2.2")
MAX_TRAINJOB_NAME = 48


def trainer_api_shape(version: str) -> str:
    """The TrainJob shape of an installed Trainer version ("v2.1.0", "2.3.0-rc.1", "v2.2"): v2.0, v2.1 or v2.2
    (v2.2 and later)."""
    match = re.match(r"^v?(\d+)\.(\d+)", str(version).strip())
    if not match or int(match[1]) != 2:
        raise ValueError(f"kubeflow_trainer_version={version!r} is not a Kubeflow Trainer 2.x version; accepted: "
                         "v2.0, v2.1, v2.2 or later (or set trainer_api_version)")
    return f"v2.{min(int(match[2]), 2)}"


class TrainJobOptions(BaseModel):
    """What only a TrainJob has: the runtime it runs on and the Trainer API generation to render for."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    runtime_name: str = "torch-distributed"
    runtime_kind: str = "ClusterTrainingRuntime"  # or TrainingRuntime (namespaced)
    api_shape: str = "v2.2"

    @field_validator("runtime_kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in ("ClusterTrainingRuntime", "TrainingRuntime"):
            raise ValueError(f"runtime_kind={v!r} is not valid: accepted: ClusterTrainingRuntime, TrainingRuntime")
        return v

    @field_validator("api_shape")
    @classmethod
    def _shape(cls, v: str) -> str:
        if v not in TRAINER_API_SHAPES:
            raise ValueError(f"trainer_api_version={v!r} is not valid: accepted: {', '.join(TRAINER_API_SHAPES)}")
        return v


def trainjob_name(identity: TaskIdentity) -> str:
    """<= 48 characters (JobSet derives pod and service names from it), starts with a letter, and is the same
    for every try of one task instance in one deployment."""
    return _task_object_name(identity, MAX_TRAINJOB_NAME)


def render_trainjob(spec: LoRASpec, options: PodOptions, identity: TaskIdentity,
                    trainjob: TrainJobOptions) -> dict[str, Any]:
    """The TrainJob for ``spec.resource_num_workers`` nodes x ``procs_per_worker`` processes. Kubeflow's torch
    runtime injects only PET_* variables (nodes, rank, master address), so the command is torchrun, which reads
    them; every node runs the same argv."""
    if options.pod_template:
        raise ValueError("pod_template applies to launcher='pod' only; a TrainJob's pods come from its runtime "
                         f"({trainjob.runtime_kind} {trainjob.runtime_name!r}): customise them there")
    if options.image_pull_policy:
        raise ValueError("image_pull_policy applies to launcher='pod' only: a TrainJob takes it from its runtime")
    shape = trainjob.api_shape
    if shape == "v2.0" and (options.affinity or options.image_pull_secrets):
        raise ValueError("affinity and image_pull_secrets cannot be set on a Kubeflow Trainer v2.0 TrainJob "
                         "(its podSpecOverrides has no such field); set them in the runtime, or upgrade Trainer")
    if options.active_deadline_seconds is not None and shape != "v2.2":
        raise ValueError(f"active_deadline_seconds needs Kubeflow Trainer v2.2 or later (this one: {shape})")
    workload = _Workload.of(spec, options, identity)
    node_container = {"name": TRAINJOB_NODE_JOB, "volumeMounts": workload.mounts}
    trainer = {
        "image": options.image,
        "command": trainer_argv(spec, spec.procs_per_worker, torchrun=True),
        "env": workload.env,
        "numNodes": spec.resource_num_workers,
        # Always explicit: "auto" on a node without GPUs means one process per CPU core in the torch runtime.
        "numProcPerNode": spec.procs_per_worker,
        "resourcesPerNode": workload.resources,
    }
    body: dict[str, Any] = {
        "runtimeRef": {"name": trainjob.runtime_name, "apiGroup": TRAINJOB_GROUP, "kind": trainjob.runtime_kind},
        "trainer": trainer,
    }
    pod_metadata = {"labels": workload.labels, "annotations": workload.annotations}
    pod_overrides = {"volumes": workload.volumes, **workload.scheduling}
    if shape == "v2.0":
        body.update(labels=workload.labels, annotations=workload.annotations, podSpecOverrides=[{
            "targetJobs": [{"name": TRAINJOB_NODE_JOB}], **pod_overrides, "containers": [node_container]}])
    elif shape == "v2.1":
        body.update(labels=workload.labels, annotations=workload.annotations, podTemplateOverrides=[{
            "targetJobs": [{"name": TRAINJOB_NODE_JOB}], "metadata": pod_metadata,
            "spec": {**pod_overrides, "containers": [node_container]}}])
    else:
        # v2.2+: a runtime patch can also carry the restricted security contexts the older shapes cannot.
        pod_spec = {**pod_overrides, "securityContext": copy.deepcopy(RESTRICTED_POD_SECURITY),
                    "containers": [{**node_container,
                                    "securityContext": copy.deepcopy(RESTRICTED_CONTAINER_SECURITY)}]}
        body["runtimePatches"] = [{"manager": RUNTIME_PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": TRAINJOB_NODE_JOB, "template": {"spec": {"template": {
                "metadata": pod_metadata, "spec": pod_spec}}}}]}}}}]
        if options.active_deadline_seconds is not None:
            body["activeDeadlineSeconds"] = options.active_deadline_seconds
    return {
        "apiVersion": f"{TRAINJOB_GROUP}/{TRAINJOB_VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": trainjob_name(identity), "namespace": options.namespace, "labels": workload.labels,
                     "annotations": workload.annotations},
        "spec": body,
    }


def _check_output_persists(output_uri: str, mount_paths: list[str]) -> None:
    """A path output must lie on a mounted volume: the container's own filesystem goes away with the pod."""
    if output_uri.startswith("s3://") or not output_uri:
        return
    if not any(output_uri == m or output_uri.startswith(m.rstrip("/") + "/") for m in mount_paths):
        raise ValueError(f"output_uri={output_uri!r} is not on a mounted volume, so the run would be lost when the "
                         "pod ends; set pvc_claim_name (and put output_uri under pvc_mount_path), mount a volume "
                         "that holds it, or use s3://")


def merge_under(template: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``ours`` over ``template``: our values win; lists of named items (containers, volumes, env,
    volumeMounts) merge by name; other lists are concatenated (template first)."""
    merged = copy.deepcopy(template)
    for key, value in ours.items():
        base = merged.get(key)
        if isinstance(base, dict) and isinstance(value, dict):
            merged[key] = merge_under(base, value)
        elif isinstance(base, list) and isinstance(value, list):
            merged[key] = _merge_lists(base, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merge_lists(base: list[Any], ours: list[Any]) -> list[Any]:
    if all(isinstance(x, dict) and "name" in x for x in base + ours):
        by_name = {x["name"]: copy.deepcopy(x) for x in base}
        for item in ours:
            by_name[item["name"]] = merge_under(by_name.get(item["name"], {}), item)
        return list(by_name.values())
    return copy.deepcopy(base) + [x for x in copy.deepcopy(ours) if x not in base]

