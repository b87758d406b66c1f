"""TrainJob launcher: what a Kubeflow Trainer TrainJob's state means, read from the TrainJob and its node pods.

A TrainJob (trainer.kubeflow.org/v1alpha1) has only the conditions Suspended, Complete and Failed; whether it runs
is read from ``status.jobsStatus`` or its pods. The pods carry JobSet labels; the pod of completion index 0 runs
node rank 0, whose log holds the trainer's result line, so that pod is the one whose log is followed. Like the pod
launcher, everything here works on plain dicts (the API's JSON).
"""

from __future__ import annotations

import json
from typing import Any

from airflow_provider_lora.core.launchers.pod import FAILED, PENDING, RUNNING, SUCCEEDED, PodState, classify_pod
from airflow_provider_lora.core.render import TRAINJOB_NODE_JOB

JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# Where an installed Kubeflow Trainer says its version (a ConfigMap readable by every authenticated user).
TRAINER_VERSION_CONFIGMAP = ("kubeflow-system", "kubeflow-trainer-public", "kubeflow_trainer_version")
# The controller's Warning event when it cannot create the JobSet (bad runtime patch, quota, webhook...).
CREATION_FAILED_EVENT = "TrainJobResourcesCreationFailed"


def node_job_name(trainjob_name: str) -> str:
    """The JobSet's Job that makes the node pods (`<jobset>-<replicated job>-<job index>`): where the Job
    controller reports pods it could not create (FailedCreate: admission refused them, quota...)."""
    return f"{trainjob_name}-{TRAINJOB_NODE_JOB}-0"


def node_pod_selector(trainjob_name: str) -> str:
    return f"{JOBSET_NAME_LABEL}={trainjob_name},{REPLICATED_JOB_LABEL}={TRAINJOB_NODE_JOB}"


def node_rank(pod: dict[str, Any]) -> int:
    """The node rank of a node pod (its Indexed Job completion index; -1 when unlabelled)."""
    value = ((pod.get("metadata") or {}).get("labels") or {}).get(COMPLETION_INDEX_LABEL, "")
    return int(value) if value.isdigit() else -1


def rank0_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The live pod of node rank 0 (the newest one if the JobSet restarted it), whose log holds the result."""
    candidates = [p for p in pods if node_rank(p) == 0 and not (p.get("metadata") or {}).get("deletionTimestamp")]
    candidates = candidates or [p for p in pods if node_rank(p) == 0]
    return max(candidates, key=lambda p: p["metadata"].get("creationTimestamp", ""), default=None)


def _condition(trainjob: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in (trainjob.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def failed_nodes(pods: list[dict[str, Any]]) -> list[tuple[int, str, PodState]]:
    """(rank, pod name, state) of every failed node pod, rank order."""
    failed = [(node_rank(p), p["metadata"]["name"], classify_pod(p)) for p in pods]
    return sorted((f for f in failed if f[2].phase == FAILED), key=lambda f: f[0])


def classify_trainjob(trainjob: dict[str, Any], pods: list[dict[str, Any]]) -> PodState:
    """The TrainJob's state in the pod launcher's terms. A failure names the failed node(s) and their own reason
    (OOMKilled, Evicted, NodeLost, exit code) rather than JobSet's summary."""
    if _condition(trainjob, "Complete"):
        return PodState(SUCCEEDED, "Completed")
    failed = _condition(trainjob, "Failed")
    if failed:
        # Node pods that are only being deleted are the controller's doing once the TrainJob failed (past its
        # activeDeadlineSeconds it deletes the JobSet): the TrainJob's own reason is the cause then.
        nodes = [node for node in failed_nodes(pods) if node[2].reason != "Deleted"]
        if nodes:
            rank, _, first = nodes[0]
            details = "; ".join(f"node {r} ({name}): {state.describe()}" for r, name, state in nodes)
            return PodState(FAILED, first.reason, details, first.exit_code, first.termination_message)
        return PodState(FAILED, failed.get("reason") or "Failed", failed.get("message") or "")
    suspended = _condition(trainjob, "Suspended")
    if suspended:
        return PodState(PENDING, "Suspended", suspended.get("message") or "the TrainJob is suspended")
    states = [classify_pod(p) for p in pods]
    if any(s.phase in (RUNNING, SUCCEEDED) for s in states):
        return PodState(RUNNING)
    waiting = next((s for s in states if s.phase == PENDING and s.reason), None)
    if waiting:
        return PodState(PENDING, waiting.reason, waiting.message, stuck=waiting.stuck)
    return PodState(PENDING, "" if pods else "NoPods", "" if pods else "no node pods yet")


def installed_trainer_version(core_api: Any) -> str | None:
    """``kubeflow_trainer_version`` from Kubeflow Trainer's public ConfigMap (a ready CoreV1Api of the
    ``kubernetes`` client); None when it is not there or not readable."""
    from kubernetes.client.exceptions import ApiException

    namespace, name, key = TRAINER_VERSION_CONFIGMAP
    try:
        response = core_api.read_namespaced_config_map(name, namespace, _preload_content=False)
    except ApiException as exc:
        if exc.status in (403, 404):
            return None
        raise
    return (json.loads(response.data).get("data") or {}).get(key)
