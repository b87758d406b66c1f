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
import socket
import time
import uuid

from aiohttp import web

from tests.k8s.util import ApiError, _json, _merge_patch, _now_s, label_selector

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
API_VERSION = f"{GROUP}/{VERSION}"
CONFIGMAP_NS, CONFIGMAP_NAME = "kubeflow-system", "kubeflow-trainer-public"
NODE_JOB = "node"

# Field schemas per Trainer generation: {field: sub-schema}; None means "any value" (a Kubernetes core type).
_CONTAINER_OVERRIDE = {"name": None, "env": None, "volumeMounts": None}
_POD_FIELDS = {"serviceAccountName": None, "nodeSelector": None, "tolerations": None, "volumes": None,
               "initContainers": _CONTAINER_OVERRIDE, "containers": _CONTAINER_OVERRIDE, "schedulingGates": None}
_TRAINER = {"image": None, "command": None, "args": None, "env": None, "numNodes": None, "resourcesPerNode": None,
            "numProcPerNode": None}
_COMMON = {"runtimeRef": {"name": None, "apiGroup": None, "kind": None}, "initializer": None, "trainer": _TRAINER,
           "suspend": None, "managedBy": None}
_POD_SPEC_PATCH = {**_POD_FIELDS, "affinity": None, "imagePullSecrets": None, "securityContext": None,
                   "containers": {**_CONTAINER_OVERRIDE, "securityContext": None},
                   "initContainers": {**_CONTAINER_OVERRIDE, "securityContext": None}}
SCHEMAS = {
    "v2.0": {**_COMMON, "labels": None, "annotations": None,
             "podSpecOverrides": {"targetJobs": {"name": None}, **_POD_FIELDS}},
    "v2.1": {**_COMMON, "labels": None, "annotations": None,
             "podTemplateOverrides": {"targetJobs": {"name": None}, "metadata": None,
                                      "spec": {**_POD_FIELDS, "affinity": None, "imagePullSecrets": None}}},
    "v2.2": {**_COMMON, "activeDeadlineSeconds": None, "runtimePatches": {
        "manager": None, "time": None, "trainingRuntimeSpec": {"template": {"metadata": None, "spec": {
            "replicatedJobs": {"name": None, "template": {"metadata": None, "spec": {"template": {
                "metadata": None, "spec": _POD_SPEC_PATCH}}}}}}}}},
}


def shape_of(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    return f"v{major}.{min(int(minor), 2)}"


def _unknown(value, schema, path: str) -> list[str]:
    """Paths of fields in ``value`` that ``schema`` does not know; prunes them from ``value`` in place."""
    if schema is None:
        return []
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _unknown(item, schema, f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    found = []
    for key in list(value):
        if key not in schema:
            found.append(f"{path}.{key}")
            del value[key]
        else:
            found += _unknown(value[key], schema[key], f"{path}.{key}")
    return found


class TrainerController:
    """Mixed into `Cluster`; uses its store, kubelet, events, faults and task helpers."""

    trainer_version: str | None = "v2.2.0"
    cluster_training_runtimes: set[str] = {"torch-distributed"}

    def _trainer_setup(self, router: web.UrlDispatcher) -> None:
        self._store.setdefault(PLURAL, {})
        if not self.trainer_version:
            return
        base = f"/apis/{GROUP}/{VERSION}"
        router.add_get(base, self._trainer_resources)
        router.add_get(f"{base}/{PLURAL}", self._trainjob_list_all)
        router.add_route("*", f"{base}/namespaces/{{ns}}/{PLURAL}", self._trainjob_collection)
        router.add_route("*", f"{base}/namespaces/{{ns}}/{PLURAL}/{{name}}", self._trainjob_item)
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
             "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}]})

    async def _trainjob_list_all(self, request):
        return self._trainjob_list(request, None)

    def _trainjob_list(self, request, ns: str | None):
        match = label_selector(request.query.get("labelSelector", ""))
        spaces = [ns] if ns else sorted(self._store[PLURAL])
        items = [o for n in spaces for _, o in sorted(self._store[PLURAL].get(n, {}).items()) if match(o)]
        return _json({"kind": "TrainJobList", "apiVersion": API_VERSION,
                      "metadata": {"resourceVersion": str(self._rv_now)}, "items": items})

    async def _trainjob_collection(self, request):
        ns = request.match_info["ns"]
        if request.method == "GET":
            return self._trainjob_list(request, ns)
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
        obj = await self._body(request)
        if not isinstance(obj, dict) or obj.get("kind") != "TrainJob" or obj.get("apiVersion") != API_VERSION:
            raise ApiError(400, f"the object provided is not a TrainJob of {API_VERSION}")
        md = obj.setdefault("metadata", {})
        name = md.get("name") or ""
        if md.get("namespace", ns) != ns:
            raise ApiError(400, "the namespace of the provided object does not match the namespace sent on the "
                                "request")
        unknown = _unknown(obj.setdefault("spec", {}), SCHEMAS[shape_of(self.trainer_version)], "spec")
        if unknown and request.query.get("fieldValidation") == "Strict":
            raise ApiError(422, f'TrainJob.{GROUP} "{name}" is invalid: strict decoding error: ' +
                           ", ".join(f'unknown field "{p}"' for p in unknown), name=name, kind=PLURAL)
        if len(name) > 63 or not name[:1].isalpha():
            raise ApiError(422, f'TrainJob.{GROUP} "{name}" is invalid: metadata.name: must be a DNS-1035 label '
                                "of at most 63 characters", name=name, kind=PLURAL)
        self._check_trainjob(obj)
        if name in self._store[PLURAL].get(ns, {}):
            raise ApiError(409, f'{PLURAL}.{GROUP} "{name}" already exists', name=name, kind=PLURAL)
        md.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now_s(), generation=1)
        obj["status"] = {}
        self._put(PLURAL, obj)
        self._spawn(self._reconcile_trainjob(obj))
        return _json(obj, 201)

    def _check_trainjob(self, obj: dict) -> None:
        """The validating webhook's checks that tests meet."""
        spec, name = obj["spec"], obj["metadata"].get("name", "")
        ref = spec.get("runtimeRef") or {}
        if ref.get("kind", "ClusterTrainingRuntime") == "ClusterTrainingRuntime" and \
                ref.get("name") not in self.cluster_training_runtimes:
            raise ApiError(400, 'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request: '
                                f'spec.runtimeRef: Invalid value: "{ref.get("name")}": ClusterTrainingRuntime.'
                                f'{GROUP} "{ref.get("name")}" not found', name=name, kind=PLURAL)
        procs = (spec.get("trainer") or {}).get("numProcPerNode")
        if shape_of(self.trainer_version) == "v2.2" and procs is not None and not isinstance(procs, int):
            raise ApiError(422, f'TrainJob.{GROUP} "{name}" is invalid: spec.trainer.numProcPerNode: Invalid '
                                f'value: "string": must be of type integer', name=name, kind=PLURAL)

    async def _trainjob_item(self, request):
        ns, name = request.match_info["ns"], request.match_info["name"]
        obj = self._get(PLURAL, ns, name)
        if request.method == "GET":
            return _json(obj)
        if request.method == "DELETE":
            del self._store[PLURAL][ns][name]
            self._bump(obj)
            obj["metadata"]["deletionTimestamp"] = _now_s()
            for pod in self._node_pods(obj):  # owner references: the garbage collector deletes the pods
                if not pod["metadata"].get("deletionTimestamp"):
                    self._delete_pod(pod, pod["spec"].get("terminationGracePeriodSeconds", 30))
            return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                          "details": {"name": name, "group": GROUP, "kind": PLURAL,
                                      "uid": obj["metadata"]["uid"]}})
        if request.method == "PATCH":
            patch = await self._body(request)
            _merge_patch(obj.setdefault("spec", {}), (patch or {}).get("spec") or {})
            if (patch or {}).get("metadata"):
                _merge_patch(obj["metadata"], {k: v for k, v in patch["metadata"].items()
                                               if k in ("labels", "annotations")})
            self._bump(obj)
            return _json(obj)
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
                started = time.monotonic()
                self._create_node_pods(trainjob)
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
                self._stop_nodes(pods)
                self._set_condition(trainjob, "Failed", "True", "DeadlineExceeded",
                                    f"TrainJob exceeded its activeDeadlineSeconds of {deadline}s")
                return
            await asyncio.sleep(0.1)

    def _stop_nodes(self, pods: list[dict]) -> None:
        for pod in pods:
            if pod["status"].get("phase") in ("Pending", "Running") and not pod["metadata"].get("deletionTimestamp"):
                self._delete_pod(pod, 5)

    def _create_node_pods(self, trainjob: dict) -> None:
        """The JobSet's Indexed Job "node": one pod per node, torch runtime env, the version's customisation."""
        md, spec = trainjob["metadata"], trainjob["spec"]
        trainer = spec.get("trainer") or {}
        shape = shape_of(self.trainer_version)
        pod_md, pod_spec, container = {"labels": {}, "annotations": {}}, {}, {"env": [], "volumeMounts": []}
        if shape in ("v2.0", "v2.1"):
            pod_md["labels"].update(spec.get("labels") or {})
            pod_md["annotations"].update(spec.get("annotations") or {})
        overrides = []
        if shape == "v2.0":
            overrides = [(None, o) for o in spec.get("podSpecOverrides") or []]
        elif shape == "v2.1":
            overrides = [(o.get("metadata"), o.get("spec") or {}) for o in spec.get("podTemplateOverrides") or []]
        else:
            for patch in spec.get("runtimePatches") or []:
                jobs = (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}).get(
                    "replicatedJobs") or []
                overrides += [(job["template"]["spec"]["template"].get("metadata"),
                               job["template"]["spec"]["template"].get("spec") or {})
                              for job in jobs if job.get("name") == NODE_JOB]
        for metadata, override in overrides:
            if shape != "v2.2" and NODE_JOB not in [t.get("name") for t in override.get("targetJobs") or []]:
                continue
            for key in ("labels", "annotations"):
                pod_md[key].update((metadata or {}).get(key) or {})
            for key, value in override.items():
                if key == "containers":
                    for c in value:
                        if c.get("name") == NODE_JOB:
                            container["env"] += c.get("env") or []
                            container["volumeMounts"] += c.get("volumeMounts") or []
                            if c.get("securityContext"):
                                container["securityContext"] = c["securityContext"]
                elif key not in ("targetJobs", "initContainers"):
                    pod_spec[key] = value
        with socket.socket() as s:  # rank 0's rendezvous port; every emulated node is this machine
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        nodes = trainer.get("numNodes", 1)
        procs = trainer.get("numProcPerNode", "auto")
        for index in range(nodes):
            name = f"{md['name']}-{NODE_JOB}-0-{index}-{uuid.uuid4().hex[:5]}"
            env = [{"name": "PET_NNODES", "value": str(nodes)},
                   {"name": "PET_NPROC_PER_NODE", "value": str(procs)},
                   {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                       "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                   {"name": "PET_MASTER_ADDR", "value": "127.0.0.1"},
                   {"name": "PET_MASTER_PORT", "value": str(port)},
                   *(trainer.get("env") or []), *container["env"]]
            pod = {
                "kind": "Pod", "apiVersion": "v1",
                "metadata": {
                    "name": name, "namespace": md["namespace"], "uid": str(uuid.uuid4()),
                    "creationTimestamp": _now_s(),
                    "labels": {**pod_md["labels"], "jobset.sigs.k8s.io/jobset-name": md["name"],
                               "jobset.sigs.k8s.io/replicatedjob-name": NODE_JOB,
                               "jobset.sigs.k8s.io/job-index": "0",
                               "batch.kubernetes.io/job-completion-index": str(index),
                               "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"},
                    "annotations": {**pod_md["annotations"], "batch.kubernetes.io/job-completion-index": str(index)},
                    "ownerReferences": [{"apiVersion": API_VERSION, "kind": "TrainJob", "name": md["name"],
                                         "uid": md["uid"], "controller": False}],
                },
                "spec": {
                    **copy.deepcopy(pod_spec), "restartPolicy": "Never",
                    "containers": [{
                        "name": NODE_JOB, "image": trainer.get("image", "emulated/torch-runtime:latest"),
                        **({"command": trainer["command"]} if trainer.get("command") else {}),
                        **({"args": trainer["args"]} if trainer.get("args") else {}),
                        "env": env, "resources": copy.deepcopy(trainer.get("resourcesPerNode") or {}),
                        "volumeMounts": copy.deepcopy(container["volumeMounts"]),
                        **({"securityContext": container["securityContext"]}
                           if "securityContext" in container else {}),
                    }],
                },
            }
            self._pod_defaults(pod)
            self._put("pods", pod)
            self._start_pod(pod)
