"""Kubeflow Trainer (plus the JobSet controller under it), emulated inside the test API server.

What it serves and does, after Kubeflow Trainer's own Go types and controllers (v2.0, v2.1, v2.2+):
- `trainer.kubeflow.org/v1alpha1` `trainjobs` (create, get, list, delete, merge patch), discovery, and the
  `kubeflow-system/kubeflow-trainer-public` ConfigMap with `kubeflow_trainer_version` (`Cluster(trainer_version=)`;
  None: Trainer is not installed and the group answers 404).
- The API server's pruning: fields the installed version's schema lacks are dropped silently, or rejected (422,
  "strict decoding error: unknown field ...") when the request asks `fieldValidation=Strict`.
- The validating webhook: a runtimeRef to a ClusterTrainingRuntime that does not exist is refused (400).
- The torch runtime: `numNodes` pods from one Indexed Job "node", named `<trainjob>-node-0-<index>-<random>`,
  with JobSet labels, the completion index label/annotation, and the PET_* variables torchrun reads (the master
  address is 127.0.0.1: every emulated node is this machine; the port is free per TrainJob). The trainer's
  command, env, resources and the version's pod customisation (podSpecOverrides / podTemplateOverrides /
  runtimePatches: volumes, mounts, env, labels, scheduling, security contexts) are applied to the pods.
- Status: `jobsStatus` (active, ready, succeeded, failed); Complete when every node pod succeeded; Failed
  (reason FailedJobs) when one fails, after the other nodes are stopped, as JobSet's failure policy does;
  Suspended while `spec.suspend` is true; Failed with DeadlineExceeded past `activeDeadlineSeconds` (v2.2+).
- Deleting a TrainJob deletes its pods (owner references).
- Fault `trainjob_creation_failed` (pod=<trainjob name glob>, message, times): the controller cannot create the
  JobSet: a Warning event TrainJobResourcesCreationFailed per attempt, no condition, no pods (what Trainer does).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import gzip
import json
import socket
import time
import uuid
from pathlib import Path

from aiohttp import web

from tests.k8s.util import ApiError, _json, _merge_patch, _now_s, check_preconditions
from tests.k8s.validation import (FieldError, check_pod_security, dns1035_label, domain_prefixed_path,
                                  unknown_field_warnings, validate_core, validate_custom)

GROUP, VERSION, PLURAL, RUNTIMES = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "clustertrainingruntimes"
API_VERSION = f"{GROUP}/{VERSION}"
CONFIGMAP_NS, CONFIGMAP_NAME = "kubeflow-system", "kubeflow-trainer-public"
NODE_JOB = "node"

# Schemas of each Trainer release (tests/k8s/schemas/README.md): a minor version uses its release's file.
_SCHEMA_FILES = {"v2.0": "v2.0.1", "v2.1": "v2.1.0", "v2.2": "v2.2.0", "v2.3": "v2.3.0"}
# torchrun's variables the torch plugin injects; a TrainJob may not set them (constants.TorchRunReservedEnvNames).
TORCH_RESERVED_ENV = ("PET_MASTER_ADDR", "PET_MASTER_PORT", "PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE")
RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
WEBHOOK = 'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request: '


def shape_of(version: str) -> str:
    """The TrainJob shape (pod customisation field) of a Trainer version: v2.0, v2.1, or v2.2 for v2.2+."""
    major, minor = version.lstrip("v").split(".")[:2]
    return f"v{major}.{min(int(minor), 2)}"


@functools.lru_cache(maxsize=None)
def release_schemas(version: str) -> dict:
    """The CRD schemas and upstream torch-distributed runtime of the Trainer release ``version`` belongs to."""
    major, minor = version.lstrip("v").split(".")[:2]
    tag = _SCHEMA_FILES[f"v{major}.{min(int(minor), 3)}"]
    with gzip.open(Path(__file__).parent / "schemas" / f"kubeflow-trainer-{tag}.json.gz") as f:
        return json.load(f)


def _pod_template(job: dict) -> dict:
    """A replicated job's pod template (metadata and spec), as JobSet nests it."""
    template = ((job.get("template") or {}).get("spec") or {}).get("template") or {}
    return {"metadata": template.get("metadata") or {}, "spec": template.get("spec") or {}}


def _aggregate(errors: list[FieldError]) -> str:
    return str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"


class TrainerController:
    """Mixed into `Cluster`; uses its store, kubelet, events, faults and task helpers."""

    trainer_version: str | None = "v2.2.0"

    def _trainer_setup(self, router: web.UrlDispatcher) -> None:
        self._store.setdefault(PLURAL, {})
        self._store.setdefault(RUNTIMES, {})
        if not self.trainer_version:
            return
        base = f"/apis/{GROUP}/{VERSION}"
        router.add_get(base, self._trainer_resources)
        router.add_get(f"{base}/{PLURAL}", self._trainjob_list_all)
        router.add_route("*", f"{base}/namespaces/{{ns}}/{PLURAL}", self._trainjob_collection)
        router.add_route("*", f"{base}/namespaces/{{ns}}/{PLURAL}/{{name}}", self._trainjob_item)
        router.add_route("*", f"{base}/{RUNTIMES}", self._runtime_collection)
        router.add_route("*", f"{base}/{RUNTIMES}/{{name}}", self._runtime_item)
        # Trainer's install ships the torch-distributed runtime of its release.
        upstream = copy.deepcopy(release_schemas(self.trainer_version)["torch-distributed"]["object"])
        self._store_runtime(upstream)
        self._put("configmaps", {
            "kind": "ConfigMap", "apiVersion": "v1", "data": {"kubeflow_trainer_version": self.trainer_version},
            "metadata": {"name": CONFIGMAP_NAME, "namespace": CONFIGMAP_NS, "uid": str(uuid.uuid4()),
                         "creationTimestamp": _now_s()}})

    def trainjobs(self, namespace: str = "default") -> list[dict]:
        """Test helper: a copy of the stored TrainJobs."""
        return self._call(lambda: copy.deepcopy(list(self._store[PLURAL].get(namespace, {}).values())))

    def api_groups(self) -> list[dict]:
        if not self.trainer_version:
            return []
        version = {"groupVersion": API_VERSION, "version": VERSION}
        return [{"name": GROUP, "versions": [version], "preferredVersion": version}]

    async def _trainer_resources(self, request):
        return _json({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": API_VERSION, "resources": [
            {"name": PLURAL, "singularName": "trainjob", "namespaced": True, "kind": "TrainJob",
             "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]},
            {"name": RUNTIMES, "singularName": "clustertrainingruntime", "namespaced": False,
             "kind": "ClusterTrainingRuntime", "verbs": ["create", "delete", "get", "list"]}]})

    async def _trainjob_list_all(self, request):
        return await self._list(request, PLURAL, None, "TrainJob", API_VERSION)

    async def _trainjob_collection(self, request):
        ns = request.match_info["ns"]
        if request.method == "GET":  # a list or a watch (emulator.py)
            return await self._list(request, PLURAL, ns, "TrainJob", API_VERSION)
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
        obj = await self._body(request)
        if not isinstance(obj, dict) or obj.get("kind") != "TrainJob" or obj.get("apiVersion") != API_VERSION:
            raise ApiError(400, f"the object provided is not a TrainJob of {API_VERSION}")
        md = obj.setdefault("metadata", {})
        if md.get("namespace", ns) != ns:
            raise ApiError(400, "the namespace of the provided object does not match the namespace sent on the "
                                "request")
        self.require_namespace(ns)  # admission runs before validation
        schema = release_schemas(self.trainer_version)["TrainJob"]["openAPIV3Schema"]
        dropped = validate_custom(obj, schema, kind="TrainJob", group=GROUP, plural=PLURAL,
                                  field_validation=request.query.get("fieldValidation"))
        self._trainjob_webhook(obj)
        name = md["name"]
        if name in self._store[PLURAL].get(ns, {}):
            raise ApiError(409, f'{PLURAL}.{GROUP} "{name}" already exists', name=name, kind=PLURAL)
        md.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now_s(), generation=1)
        obj["status"] = {}
        self._put(PLURAL, obj)
        self._spawn(self._reconcile_trainjob(obj))
        return _json(obj, 201, unknown_field_warnings(dropped))

    def _trainjob_webhook(self, obj: dict, old: dict | None = None) -> None:
        """The validating webhook of the installed release (failurePolicy Fail): pkg/webhooks/trainjob_webhook.go
        and the plugins' Validate (pkg/runtime/framework/plugins/{jobset,torch}) at v2.0.1, v2.1.0, v2.2.0, v2.3.0.
        Denials answer 403 with the field errors, as controller-runtime's admission.Denied does."""
        spec, name, shape = obj["spec"], obj["metadata"]["name"], shape_of(self.trainer_version)
        errors: list[FieldError] = []
        if shape == "v2.0":  # later releases check this in the CRD's CEL rules instead
            errors += [FieldError("Invalid", "metadata.name", name, m) for m in dns1035_label(name)]
        ref = spec.get("runtimeRef") or {}
        runtime = self._store[RUNTIMES].get("", {}).get(ref.get("name")) if ref.get("kind") != "TrainingRuntime" \
            else None
        if runtime is None:
            kind = (ref.get("kind") or "ClusterTrainingRuntime").lower()
            errors.append(FieldError("Invalid", "spec.RuntimeRef", "object", f'{kind}.{GROUP} "{ref.get("name")}" '
                                     "not found: specified clusterTrainingRuntime must be created before the "
                                     "TrainJob is created"))
            raise ApiError(403, WEBHOOK + _aggregate(errors), reason="Forbidden")
        containers = {job["name"]: {c["name"] for c in _pod_template(job)["spec"].get("containers") or []} |
                      {c["name"] for c in _pod_template(job)["spec"].get("initContainers") or []}
                      for job in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
        procs = (spec.get("trainer") or {}).get("numProcPerNode")
        if shape != "v2.2" and isinstance(procs, str) and procs not in ("auto", "cpu", "gpu"):  # torch.go, v2.0/v2.1
            errors.append(FieldError("Invalid", "spec.trainer.numProcPerNode", procs,
                                     "must have an int value or [auto cpu gpu]"))
        reserved = sorted({e.get("name") for e in (spec.get("trainer") or {}).get("env") or []}
                          & set(TORCH_RESERVED_ENV))
        if reserved and "torch" in (runtime["spec"].get("mlPolicy") or {}):
            errors.append(FieldError("Invalid", "spec.trainer.env", "array", "must not have reserved envs, invalid "
                                     f"envs configured: [{' '.join(reserved)}]"))
        field, overrides = {"v2.0": ("spec.podSpecOverrides", [(o.get("targetJobs") or [], o) for o in
                                                             spec.get("podSpecOverrides") or []]),
                            "v2.1": ("spec.podTemplateOverrides", [(o.get("targetJobs") or [], o.get("spec") or {})
                                                                   for o in spec.get("podTemplateOverrides") or []]),
                            "v2.2": ("spec.runtimePatches", [])}[shape]
        seen_targets: set[str] = set()
        for patch in spec.get("runtimePatches") or [] if shape == "v2.2" else []:
            errors += [FieldError("Invalid", "spec.runtimePatches.manager", patch.get("manager", ""), m)
                       for m in domain_prefixed_path(patch.get("manager", ""))]
            jobs = ((((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {})
                    .get("replicatedJobs") or [])
            overrides += [([{"name": j.get("name")}], _pod_template(j)["spec"]) for j in jobs]
        for targets, pod_spec in overrides:
            for target in targets:
                job = target.get("name")
                if shape == "v2.0" and job in seen_targets:
                    errors.append(FieldError("Duplicate", field, job))
                seen_targets.add(job)
                if job not in containers:
                    what = "replicated job" if shape == "v2.2" else "targetJob"
                    errors.append(FieldError("Invalid", field, "array", f"must not have {what} that doesn't exist "
                                             "in the runtime job template"))
                    continue
                for group, label in (("initContainers", "initContainer"), ("containers", "container")):
                    for c in pod_spec.get(group) or []:
                        if c.get("name") not in containers[job]:
                            errors.append(FieldError("Invalid", field, "array", f"must not have {label} that "
                                                     f"doesn't exist in the runtime job {job}"))
                        elif group == "containers" and c.get("env") and c["name"] in (
                                "dataset-initializer", "model-initializer", NODE_JOB):
                            errors.append(FieldError("Invalid", field, "array", "must not have envs for the "
                                                     "dataset-initializer, model-initializer, node containers"))
        key = field.split(".")[1]
        if old is not None and spec.get(key) != old["spec"].get(key):
            # jobset.go's check*Immutability: overrides change only while the TrainJob is suspended (from v2.3
            # suspended before or after the update)
            since_v23 = release_schemas(self.trainer_version)["source"]["tag"] >= "v2.3"
            suspended = spec.get("suspend") or (since_v23 and old["spec"].get("suspend"))
            if not suspended:
                errors.append(FieldError("Forbidden", field, detail=f"{key[0].upper() + key[1:]} can only be "
                                         "modified when the TrainJob is suspended" +
                                         (" before or after the update" if since_v23 else "")))
        if errors:
            raise ApiError(403, WEBHOOK + _aggregate(errors), reason="Forbidden")

    # ----- ClusterTrainingRuntimes (cluster-scoped) -------------------------------------------------------------

    def _store_runtime(self, obj: dict) -> None:
        obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now_s(), generation=1)
        obj["metadata"].pop("namespace", None)
        self._bump(obj)
        self._store[RUNTIMES].setdefault("", {})[obj["metadata"]["name"]] = obj

    def cluster_training_runtimes(self) -> list[str]:
        """Test helper: the names of the installed ClusterTrainingRuntimes."""
        return self._call(lambda: sorted(self._store[RUNTIMES].get("", {})))

    def delete_cluster_training_runtime(self, name: str) -> None:
        self._call(lambda: self._store[RUNTIMES].get("", {}).pop(name))

    async def _runtime_collection(self, request):
        if request.method == "GET":
            return _json({"kind": "ClusterTrainingRuntimeList", "apiVersion": API_VERSION,
                          "metadata": {"resourceVersion": str(self._rv_now)},
                          "items": list(self._store[RUNTIMES].get("", {}).values())})
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
        obj = await self._body(request)
        if not isinstance(obj, dict) or obj.get("kind") != "ClusterTrainingRuntime" or \
                obj.get("apiVersion") != API_VERSION:
            raise ApiError(400, f"the object provided is not a ClusterTrainingRuntime of {API_VERSION}")
        obj.setdefault("metadata", {})
        schema = release_schemas(self.trainer_version)["ClusterTrainingRuntime"]["openAPIV3Schema"]
        dropped = validate_custom(obj, schema, kind="ClusterTrainingRuntime", group=GROUP, plural=RUNTIMES,
                                  field_validation=request.query.get("fieldValidation"))
        self._runtime_webhook(obj)
        name = obj["metadata"]["name"]
        if name in self._store[RUNTIMES].get("", {}):
            raise ApiError(409, f'{RUNTIMES}.{GROUP} "{name}" already exists', name=name, kind=RUNTIMES)
        self._store_runtime(obj)
        return _json(obj, 201, unknown_field_warnings(dropped))

    async def _runtime_item(self, request):
        name = request.match_info["name"]
        obj = self._store[RUNTIMES].get("", {}).get(name)
        if obj is None:
            raise ApiError(404, f'{RUNTIMES}.{GROUP} "{name}" not found', name=name, kind=RUNTIMES)
        if request.method == "GET":
            return _json(obj)
        if request.method == "DELETE":
            del self._store[RUNTIMES][""][name]
            return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "DELETE"])

    @staticmethod
    def _runtime_webhook(obj: dict) -> None:
        """pkg/webhooks/clustertrainingruntime_webhook.go: an ancestor job (trainer, initializers) runs one
        replica and has its container ("node" for the trainer)."""
        errors: list[FieldError] = []
        expected = {"trainer": NODE_JOB, "model-initializer": "model-initializer",
                    "dataset-initializer": "dataset-initializer"}
        for i, job in enumerate(obj["spec"]["template"]["spec"].get("replicatedJobs") or []):
            ancestor = (((job.get("template") or {}).get("metadata") or {}).get("labels") or {}).get(
                "trainer.kubeflow.org/trainjob-ancestor-step")
            if ancestor not in expected:
                continue
            path = f"spec.template.spec.replicatedJobs[{i}]"
            if job.get("replicas", 1) != 1:
                errors.append(FieldError("Invalid", f"{path}.replicas", job.get("replicas"), "always must be 1"))
            if expected[ancestor] not in [c.get("name") for c in _pod_template(job)["spec"].get("containers") or []]:
                errors.append(FieldError("Invalid", f"{path}.template.spec.template.spec.containers", "array",
                                         f"must contain the required container for the ancestor: {ancestor}"))
        if errors:
            raise ApiError(403, 'admission webhook "validator.clustertrainingruntime.trainer.kubeflow.org" denied '
                                "the request: " + _aggregate(errors), reason="Forbidden")

    async def _trainjob_item(self, request):
        ns, name = request.match_info["ns"], request.match_info["name"]
        obj = self._get(PLURAL, ns, name)
        if request.method == "GET":
            return _json(obj)
        if request.method == "DELETE":
            options = ((await self._body(request)) if request.can_read_body else None) or {}
            check_preconditions(obj, options.get("preconditions"), f"{PLURAL}.{GROUP}", name)
            del self._store[PLURAL][ns][name]
            obj["metadata"]["deletionTimestamp"] = _now_s()
            self._bump(obj, "DELETED")  # after the timestamp: watches see the object as it was deleted
            for pod in self._node_pods(obj):  # owner references: the garbage collector deletes the pods
                if not pod["metadata"].get("deletionTimestamp"):
                    self._delete_pod(pod, pod["spec"].get("terminationGracePeriodSeconds", 30))
            return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                          "details": {"name": name, "group": GROUP, "kind": PLURAL,
                                      "uid": obj["metadata"]["uid"]}})
        if request.method == "PATCH":  # a merge patch of spec, labels and annotations, validated as an update
            patch = await self._body(request)
            updated = copy.deepcopy(obj)
            _merge_patch(updated.setdefault("spec", {}), (patch or {}).get("spec") or {})
            _merge_patch(updated["metadata"], {k: v for k, v in ((patch or {}).get("metadata") or {}).items()
                                               if k in ("labels", "annotations")})
            schema = release_schemas(self.trainer_version)["TrainJob"]["openAPIV3Schema"]
            status = updated.pop("status", None)
            dropped = validate_custom(updated, schema, kind="TrainJob", group=GROUP, plural=PLURAL,
                                      field_validation=request.query.get("fieldValidation"),
                                      old={k: v for k, v in obj.items() if k != "status"})
            self._trainjob_webhook(updated, old=obj)
            obj["spec"], obj["metadata"], obj["status"] = updated["spec"], updated["metadata"], status
            self._bump(obj)
            return _json(obj, 200, unknown_field_warnings(dropped))
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "DELETE", "PATCH"])

    # ----- the controller --------------------------------------------------------------------------------------

    def _node_pods(self, trainjob: dict) -> list[dict]:
        md = trainjob["metadata"]
        return [p for p in self._store["pods"].get(md["namespace"], {}).values()
                if (p["metadata"].get("labels") or {}).get("jobset.sigs.k8s.io/jobset-name") == md["name"]
                and any(o.get("uid") == md["uid"] for o in p["metadata"].get("ownerReferences") or [])]

    def _set_condition(self, trainjob: dict, kind: str, status: str, reason: str, message: str) -> None:
        conditions = trainjob["status"].setdefault("conditions", [])
        current = next((c for c in conditions if c["type"] == kind), None)
        if current and (current["status"], current["reason"]) == (status, reason):
            return
        new = {"type": kind, "status": status, "reason": reason, "message": message,
               "lastTransitionTime": _now_s(), "observedGeneration": trainjob["metadata"].get("generation", 1)}
        if current:
            current.update(new)
        else:
            conditions.append(new)
        self._bump(trainjob)

    def _gone(self, trainjob: dict) -> bool:
        md = trainjob["metadata"]
        return self._store[PLURAL].get(md["namespace"], {}).get(md["name"]) is not trainjob

    async def _reconcile_trainjob(self, trainjob: dict) -> None:
        md, spec = trainjob["metadata"], trainjob["spec"]
        await asyncio.sleep(self.schedule_delay)
        started = None
        while not self._gone(trainjob):
            if spec.get("suspend"):
                self._set_condition(trainjob, "Suspended", "True", "Suspended", "TrainJob is suspended")
                await asyncio.sleep(0.1)
                continue
            if any(c["type"] == "Suspended" and c["status"] == "True"
                   for c in trainjob["status"].get("conditions", [])):
                self._set_condition(trainjob, "Suspended", "False", "Resumed", "TrainJob is resumed")
            if fault := self._take_fault(("trainjob_creation_failed",), pod=md["name"]):
                self._event(trainjob, "Warning", "TrainJobResourcesCreationFailed",
                            "TrainJob resources reconciliation failed: " + fault.get(
                                "message", 'JobSet.jobset.x-k8s.io "' + md["name"] + '" is invalid: injected fault'),
                            component="trainjob-controller")
                await asyncio.sleep(0.5)
                continue
            if started is None:
                if not self._create_node_pods(trainjob):  # the Job controller retries with a backoff
                    await asyncio.sleep(2)
                    continue
                started = time.monotonic()
            pods = self._node_pods(trainjob)
            phases = [p["status"].get("phase") for p in pods]
            ready = sum(1 for p in pods if any(c.get("type") == "Ready" and c.get("status") == "True"
                                               for c in p["status"].get("conditions") or []))
            status = {"name": NODE_JOB, "active": phases.count("Pending") + phases.count("Running"),
                      "ready": ready, "succeeded": phases.count("Succeeded"), "failed": phases.count("Failed"),
                      "suspended": 0}
            if trainjob["status"].get("jobsStatus") != [status]:
                trainjob["status"]["jobsStatus"] = [status]
                self._bump(trainjob)
            deadline = spec.get("activeDeadlineSeconds")
            if status["failed"]:
                self._stop_nodes(pods)
                self._set_condition(trainjob, "Failed", "True", "FailedJobs",
                                    "jobset failed due to reaching max restarts")
                return
            if status["succeeded"] == (spec.get("trainer") or {}).get("numNodes", 1):
                self._set_condition(trainjob, "Complete", "True", "AllJobsCompleted",
                                    "jobset completed successfully")
                return
            if deadline and time.monotonic() - started > deadline:
                # As Trainer v2.2's controller: the TrainJob is marked Failed first, then its JobSet (and so the
                # pods, which terminate meanwhile) deleted.
                self._set_condition(trainjob, "Failed", "True", "DeadlineExceeded",
                                    f"TrainJob exceeded its activeDeadlineSeconds of {deadline}s")
                self._stop_nodes(pods)
                return
            await asyncio.sleep(0.1)

    def _stop_nodes(self, pods: list[dict]) -> None:
        for pod in pods:
            if pod["status"].get("phase") in ("Pending", "Running") and not pod["metadata"].get("deletionTimestamp"):
                self._delete_pod(pod, 5)

    def _create_node_pods(self, trainjob: dict) -> bool:
        """Create the node pods. Each meets the same API validation and Pod Security admission as any other pod:
        a refused pod is a FailedCreate event (what the Job controller reports) and no pod. Returns whether the
        pods were made."""
        md = trainjob["metadata"]
        pods = self._node_pod_manifests(trainjob)
        for pod in pods:
            try:
                validate_core(pod, "Strict")
                check_pod_security(pod, self.namespace_labels(md["namespace"]))
            except ApiError as e:
                self._event({"kind": "Job", "apiVersion": "batch/v1", "metadata": {
                    "name": f"{md['name']}-{NODE_JOB}-0", "namespace": md["namespace"], "uid": ""}},
                    "Warning", "FailedCreate", f"Error creating: {e.message}", component="job-controller")
                return False
        for pod in pods:
            pod["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now_s())
            self._pod_defaults(pod)
            self._put("pods", pod)
            self._start_pod(pod)
        return True

    def node_pods_of(self, trainjob: dict, namespace: str = "default") -> list[dict]:
        """Test helper: what creating ``trainjob`` would do, without running anything: the API server's schema
        and CEL checks and the webhook (raising their ApiError), then the node pods the runtime makes, each
        validated as a pod (ApiError when one would be refused)."""
        def check():
            obj = copy.deepcopy(trainjob)
            obj.setdefault("metadata", {}).setdefault("namespace", namespace)
            schema = release_schemas(self.trainer_version)["TrainJob"]["openAPIV3Schema"]
            validate_custom(obj, schema, kind="TrainJob", group=GROUP, plural=PLURAL, field_validation="Strict")
            self._trainjob_webhook(obj)
            obj["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
            pods = self._node_pod_manifests(obj)
            for pod in pods:
                validate_core(pod, "Strict")
                check_pod_security(pod, self.namespace_labels(namespace))
            return pods
        return self._call(check)

    def _node_pod_manifests(self, trainjob: dict) -> list[dict]:
        """The JobSet's Indexed Job "node": one pod per node from the runtime's pod template, the trainer's image,
        command, env and resources, the torch runtime's PET_* env, and the version's customisation merged in."""
        md, spec = trainjob["metadata"], trainjob["spec"]
        trainer = spec.get("trainer") or {}
        shape = shape_of(self.trainer_version)
        runtime = self._store[RUNTIMES][""][spec["runtimeRef"]["name"]]
        job = next(j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == NODE_JOB)
        template = copy.deepcopy(_pod_template(job))
        pod_md = {"labels": dict(template["metadata"].get("labels") or {}),
                  "annotations": dict(template["metadata"].get("annotations") or {})}
        pod_spec = template["spec"]
        if shape in ("v2.0", "v2.1"):
            pod_md["labels"].update(spec.get("labels") or {})
            pod_md["annotations"].update(spec.get("annotations") or {})
        overrides = []  # (the jobs it targets, pod metadata, pod spec fields)
        if shape == "v2.0":
            overrides = [(o.get("targetJobs"), None, o) for o in spec.get("podSpecOverrides") or []]
        elif shape == "v2.1":
            overrides = [(o.get("targetJobs"), o.get("metadata"), o.get("spec") or {})
                         for o in spec.get("podTemplateOverrides") or []]
        else:
            for patch in spec.get("runtimePatches") or []:
                jobs = (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}).get(
                    "replicatedJobs") or []
                overrides += [([{"name": j.get("name")}], _pod_template(j)["metadata"], _pod_template(j)["spec"])
                              for j in jobs]
        node = next(c for c in pod_spec["containers"] if c["name"] == NODE_JOB)
        for targets, metadata, override in overrides:
            if NODE_JOB not in [t.get("name") for t in targets or []]:
                continue
            for key in ("labels", "annotations"):
                pod_md[key].update((metadata or {}).get(key) or {})
            for key, value in override.items():
                if key == "containers":
                    for c in value:
                        if c.get("name") == NODE_JOB:
                            node["volumeMounts"] = (node.get("volumeMounts") or []) + (c.get("volumeMounts") or [])
                            if c.get("securityContext"):
                                node["securityContext"] = c["securityContext"]
                elif key not in ("targetJobs", "initContainers"):
                    pod_spec[key] = value
        with socket.socket() as s:  # rank 0's rendezvous port; every emulated node is this machine
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        nodes = trainer.get("numNodes") or (runtime["spec"].get("mlPolicy") or {}).get("numNodes", 1)
        procs = trainer.get("numProcPerNode", "auto")
        for key in ("image", "command", "args"):
            if trainer.get(key):
                node[key] = trainer[key]
        if trainer.get("resourcesPerNode"):
            node["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
        pods = []
        for index in range(nodes):
            hostname = f"{md['name']}-{NODE_JOB}-0-{index}"
            env = [{"name": "PET_NNODES", "value": str(nodes)},
                   {"name": "PET_NPROC_PER_NODE", "value": str(procs)},
                   {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                       "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                   # the torch plugin's master address: node 0's DNS name through the JobSet's headless service
                   {"name": "PET_MASTER_ADDR", "value": f"{md['name']}-{NODE_JOB}-0-0.{md['name']}"},
                   {"name": "PET_MASTER_PORT", "value": str(port)},
                   *(node.get("env") or []), *(trainer.get("env") or [])]
            pod_node = {**copy.deepcopy(node), "env": env}
            pod = {
                "kind": "Pod", "apiVersion": "v1",
                "metadata": {
                    "name": f"{hostname}-{uuid.uuid4().hex[:5]}", "namespace": md["namespace"],
                    "labels": {**pod_md["labels"], "jobset.sigs.k8s.io/jobset-name": md["name"],
                               "jobset.sigs.k8s.io/replicatedjob-name": NODE_JOB,
                               "jobset.sigs.k8s.io/job-index": "0",
                               "batch.kubernetes.io/job-completion-index": str(index)},
                    "annotations": {**pod_md["annotations"], "batch.kubernetes.io/job-completion-index": str(index)},
                    "ownerReferences": [{"apiVersion": API_VERSION, "kind": "TrainJob", "name": md["name"],
                                         "uid": md["uid"], "controller": False}],
                },
                # JobSet names each pod's host after its job and index, under the JobSet's headless service
                "spec": {**copy.deepcopy(pod_spec), "restartPolicy": "Never", "hostname": hostname,
                         "subdomain": md["name"],
                         "containers": [pod_node if c["name"] == NODE_JOB else c for c in pod_spec["containers"]]},
            }
            pods.append(pod)
        return pods
