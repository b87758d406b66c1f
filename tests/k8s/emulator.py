"""An emulated Kubernetes API server (core/v1) whose kubelet runs containers as local processes.

No kube-apiserver can run on these machines, so tests point the REAL clients (`kubernetes`, `kubernetes_asyncio`,
`kubectl`) at this server: HTTPS with its own CA, a bearer token, a kubeconfig. It refuses what a real API server
(1.33) refuses, with the real status codes and messages: schemas, names, labels, quantities, fieldValidation,
Pod Security admission (validation.py), and Kubeflow Trainer's CRDs and webhook (trainer_controller.py). It runs
in a background thread with its own event loop, so sync and async tests can both use it. Each request costs a dict look-up, no history scan.

How a pod runs (differences from a cluster, on purpose):
- Every container's `command` + `args` is run as a local process, argv exactly as given (no shell), after
  `$(VAR)` expansion as Kubernetes does. `python`/`python3` become `sys.executable` ($LORA_TEST_PYTHON if set: the
  Airflow 2.11 suite's venv has no torch, its pods run the main venv's); another bare name that exists next to it
  (torchrun, accelerate, ...) becomes that file, so the test venv's tools run. A container
  without `command` cannot run (there is no image entrypoint): it ends with StartError, exit code 128.
- Environment: the host's environment (or `base_env`), then what Kubernetes injects (HOSTNAME,
  KUBERNETES_SERVICE_*), then the container's `envFrom`/`env` (value, secretKeyRef, configMapKeyRef, fieldRef).
- Volumes: each volumeMount's mountPath P is backed by a host directory D: emptyDir (and unknown kinds) per pod,
  persistentVolumeClaim per (namespace, claimName) shared by all pods (so a PVC persists between pods), hostPath as
  is, secret/configMap volumes as files. The process gets `EMULATOR_MOUNT_MAP` = JSON {P: D}. When P lies under the
  cluster's root directory, P is also made a symlink to D, so a real program can use P unchanged: render pods
  with mount paths under that root (two running pods with different emptyDirs at one such path: the last wins).
- terminationMessagePath is a per-container file passed as `LORA_TERMINATION_LOG` (wins over the pod's env); its
  first 4096 bytes become `state.terminated.message` (FallbackToLogsOnError: the log tail when it is empty).
- stdout and stderr lines are stored with their arrival time (ns) and served by pods/log like the kubelet does.
- Containers run once (as with restartPolicy Never); initContainers and probes are ignored.
- An image that is no valid reference waits with InvalidImageName (and events), as the kubelet leaves it.
- DeleteOptions.preconditions (uid, resourceVersion) as kube-apiserver checks them: 409 Conflict on a mismatch.
- RBAC (opt-in): `cluster.rbac_rules = role["rules"]` checks every API request against a Role's rules and answers
  403 Forbidden outside them; `cluster.denied` lists the refused requests. A list with `watch=1` is verb "watch".

Watches (pods, secrets, configmaps, events, TrainJobs; one namespace or all), as kube-apiserver serves them from
its watch cache (k8s.io/apiserver pkg/storage/cacher: watch_cache.go, cache_watcher.go; and the Kubernetes API
concepts page, "Efficient detection of changes" and "Watch bookmarks",
https://kubernetes.io/docs/reference/using-api/api-concepts/):
- Every change of a stored object is recorded once (`_bump`): ADDED, MODIFIED, DELETED with a snapshot of the object
  at its new resourceVersion. A resource keeps its last `watch_cache_size` changes (the watch cache's window);
  `compact()` forgets them all at once, as an etcd compaction past them would.
- `?watch=1` answers 200 with a chunked stream of JSON lines {"type", "object"}. resourceVersion unset or "0": the
  current objects as ADDED, then every change; resourceVersion V: every change after V, in order (V in the future:
  those after V). V older than the window: one ERROR event carrying a 410 Expired Status, "too old resource
  version: V (oldest-1)", then the end of the stream: the cacher's errWatcher answers so once the request has
  been accepted. A list with resourceVersionMatch=Exact and such a V is refused with a plain 410 Expired ("The
  resourceVersion for the provided list is too old.", etcd3 store's interpretListError); an Exact V in the window
  answers the state at V. Lists carry the current resourceVersion.
- label and field selectors filter the events as the cacheWatcher does: an object that starts matching is sent as
  ADDED, one that stops matching as DELETED (its previous content at the change's resourceVersion).
- allowWatchBookmarks=true: a BOOKMARK (the kind, apiVersion and metadata.resourceVersion only) every
  `watch_bookmark_interval` seconds (the cacher's bookmarkFrequency: a minute) when nothing else is pending.
- timeoutSeconds ends the stream cleanly after that long; without it, kube-apiserver's default: a random time
  between `watch_min_request_timeout` (--min-request-timeout, 1800 s) and twice that.
- Left out: sendInitialEvents (streaming lists), Table watches, ending watchers too slow to keep up.
- Short-lived tokens (opt-in): `Cluster(token_lifetime=SECONDS)` writes a kubeconfig whose user is a kubeconfig
  `exec` credential plugin (exec_credential.py, like `aws eks get-token`) issuing tokens valid that long; the server
  then accepts only unexpired tokens that plugin issued and answers 401 Unauthorized (a Status, as kube-apiserver)
  to anything else. `token_expiry_in_credential=False` leaves expirationTimestamp out of the ExecCredential.

Faults (`Cluster.set_fault(kind, pod="glob", times=1, **params)`; `times=None` means every time):
- oom (after_seconds | after_lines, container): SIGKILL, terminated reason OOMKilled, exit 137, phase Failed.
- evict (after_seconds | after_lines, message): kubelet eviction, phase Failed, reason Evicted, DisruptionTarget.
- node_lost (after_seconds | after_lines, not_ready_after, evict_after, gc_after): what Kubernetes 1.32 does.
  The processes die with the node; the pod's status is frozen (phase stays Running, no kubelet to report);
  the node lifecycle controller sets condition Ready False and a NodeNotReady event; after the pod's
  node.kubernetes.io/unreachable tolerationSeconds (300 by default, `evict_after` overrides) the taint-eviction
  controller adds DisruptionTarget (DeletionByTaintManager) and deletes the pod gracefully, which leaves it
  Terminating (deletionTimestamp set) since no kubelet confirms; `gc_after` (None: never) then emulates PodGC once
  the node object is gone: phase Failed, DisruptionTarget DeletionByPodGC, object removed. Logs answer 500
  (kubelet unreachable). The old status.reason "NodeLost" is no longer set by 1.27+ controllers.
- unschedulable (message): stays Pending, PodScheduled False Unschedulable, FailedScheduling event.
- image_pull_backoff (message, backoff_after): Pending, waiting ErrImagePull then ImagePullBackOff, events.
- api_error (path regex, method, status 500|429|503): next `times` matching requests fail; 429 has Retry-After: 1.
- api_timeout (path, method, seconds): next matching requests hang `seconds`, then are answered.
- log_stream_drop (after_lines, mode "eof"|"reset"): a follow log stream ends (cleanly or abruptly) after N lines.
- watch_drop (path, method, after_events, mode "eof"|"reset"): the next `times` matching watches end (cleanly, or
  without the final chunk) after N events (bookmarks not counted; default 1), as a load balancer or an apiserver
  restart ends them.
Pod faults match the pod name with a glob (`pod="lora-*"`); api faults match request.path with a regex.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import datetime as dt
import fnmatch
import itertools
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from tests.k8s.exec_credential import verify as verify_token
from tests.k8s.kubelet import Kubelet, _PodRun
from tests.k8s.trainer_controller import PLURAL as TRAINJOBS
from tests.k8s.trainer_controller import TrainerController
from tests.k8s.util import (FAULTS, HOST_IP, KINDS, RUNTIME_FAULTS, ApiError, _age, _flag, _int, _json, _make_tls,
                            _merge_patch, _nano, _now_s, check_preconditions, field_selector, label_selector)
from tests.k8s.validation import (check_pod_security, invalid, metadata_errors, unknown_field_warnings,
                                  validate_core)

# The namespaces of a new cluster (as `kind create cluster` makes it), and Kubeflow Trainer's, which the emulated
# controller runs in. Tests that launch elsewhere create theirs (Cluster.create_namespace), as a user would.
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease", "kubeflow-system")


class Cluster(TrainerController, Kubelet):
    """One emulated cluster: API server + scheduler + kubelet of one node. Start on construction; `stop()` ends it."""

    def __init__(self, root: str | os.PathLike, *, schedule_delay: float = 0.1, base_env: dict | None = None,
                 token: str | None = None, trainer_version: str | None = "v2.2.0",
                 token_lifetime: float | None = None, token_expiry_in_credential: bool = True):
        self.root = Path(root).resolve()
        self.trainer_version = trainer_version  # Kubeflow Trainer installed (trainer_controller.py); None: not
        self.root.mkdir(parents=True, exist_ok=True)
        self.schedule_delay = schedule_delay
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.token = token or uuid.uuid4().hex
        # Opt-in short-lived tokens (`token_lifetime` seconds): the kubeconfig gets them from an exec credential
        # plugin (exec_credential.py), as EKS and GKE kubeconfigs do, instead of the fixed `token`, which is then
        # refused. `auth_log` records each authentication: (token, "ok" | "expired" | "invalid").
        self.token_lifetime = token_lifetime
        self.auth_log: list[tuple[str, str]] = []
        self.request_log: list[tuple[str, str, dict]] = []
        # Opt-in RBAC: set to a Role's `rules` and every API request is checked against them (403 otherwise, as
        # the API server answers); `denied` records each refused (verb, group, resource, namespace).
        self.rbac_rules: list[dict] | None = None
        self.denied: list[tuple[str, str, str, str]] = []
        self._store: dict[str, dict[str, dict[str, dict]]] = {r: {} for r in KINDS}  # resource -> ns -> name -> obj
        # Watches (see the module docstring). `_history[res]`: its kept changes (rv, type, object, previous
        # object), oldest first; `_latest`: each object's last snapshot, the "previous object" of its next change.
        self.watch_cache_size = 1000  # changes kept per resource
        self.watch_bookmark_interval = 60.0
        self.watch_min_request_timeout = 1800.0
        self._history: dict[str, collections.deque] = {}
        self._latest: dict[tuple[str, str, str], dict] = {}
        self._evicted: dict[str, int] = {}  # resource -> the newest version it no longer has all changes after
        self._compacted = 0
        self._watchers: dict[str, set[asyncio.Queue]] = {}
        self._runs: dict[tuple[str, str], _PodRun] = {}
        self._faults: list[dict] = []
        self._namespace_labels: dict[str, dict[str, str]] = {}
        # Namespaces that exist: a create in any other is refused, as NamespaceLifecycle admission refuses it.
        self._existing_namespaces = set(INITIAL_NAMESPACES)
        self._tasks: set[asyncio.Task] = set()
        self._pumps: set[asyncio.Task] = set()  # output readers: let them finish on stop
        self._rv, self._rv_now, self._ips, self._event_ns = itertools.count(1), 0, itertools.count(2), 0
        self.ca_file, self._ssl = _make_tls(self.root)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = self.root / "kubeconfig"
        user = {"token": self.token}
        if token_lifetime is not None:
            self._token_key = os.urandom(32)
            key_file = self.root / "token-signing.key"
            key_file.write_bytes(self._token_key)
            key_file.chmod(0o600)
            self.issued_tokens_file = self.root / "issued-tokens.log"  # one line per token the plugin issued
            args = [str(Path(__file__).with_name("exec_credential.py")), "--key-file", str(key_file),
                    "--lifetime", str(token_lifetime), "--log", str(self.issued_tokens_file)]
            user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                             "args": args + ([] if token_expiry_in_credential else ["--no-expiration-timestamp"]),
                             "interactiveMode": "Never"}}
        self.kubeconfig.write_text(json.dumps({  # JSON is YAML
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url,
                                                         "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "emulator", "user": user}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                         "namespace": "default"}}]}, indent=1))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="k8s-emulator", daemon=True)
        self._thread.start()
        self._call_async(self._serve())

    # ----- test helpers (any thread; the state itself is only touched on the emulator's loop) -----

    def _call_async(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call(self, fn: Callable, *args, **kwargs):
        async def run():
            return fn(*args, **kwargs)
        return self._call_async(run())

    def pods(self, namespace: str | None = None) -> list[dict]:
        return self._call(lambda: json.loads(json.dumps(
            [p for ns, pods in sorted(self._store["pods"].items()) if namespace in (None, ns)
             for _, p in sorted(pods.items())])))

    def get_pod(self, namespace: str, name: str) -> dict | None:
        return self._call(lambda: json.loads(json.dumps(self._store["pods"].get(namespace, {}).get(name))))

    def logs(self, namespace: str, name: str, container: str | None = None) -> str:
        def read():
            run = self._runs[(namespace, name)]
            return b"".join(run.containers[container or next(iter(run.containers))].lines).decode(errors="replace")
        return self._call(read)

    def wait_for_pod(self, namespace: str, name: str, until: Callable[[dict], bool] | str | tuple = ("Succeeded",
                     "Failed"), timeout: float = 30.0) -> dict:
        """Poll until `until(pod)` holds, or until the phase is `until` (a phase or a tuple of them); return the pod."""
        if not callable(until):
            phases = (until,) if isinstance(until, str) else tuple(until)
            until = lambda p: p["status"].get("phase") in phases  # noqa: E731
        deadline = time.monotonic() + timeout
        while True:
            pod = self.get_pod(namespace, name)
            if pod is not None and until(pod):
                return pod
            if time.monotonic() > deadline:
                raise TimeoutError(f"pod {namespace}/{name}: {pod and pod.get('status')}")
            time.sleep(0.02)

    def create_secret(self, namespace: str, name: str, data: dict[str, str | bytes], type: str = "Opaque") -> None:
        enc = {k: base64.b64encode(v.encode() if isinstance(v, str) else v).decode() for k, v in data.items()}
        obj = {"kind": "Secret", "apiVersion": "v1", "type": type, "data": enc,
               "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                            "creationTimestamp": _now_s()}}
        self._call(self._put, "secrets", obj)

    def add_event(self, namespace: str, name: str, reason: str, message: str, *, type: str = "Normal",
                  kind: str = "Pod", component: str = "kubelet") -> None:
        def add():
            obj = self._store.get(kind.lower() + "s", {}).get(namespace, {}).get(name) or {
                "kind": kind, "metadata": {"name": name, "namespace": namespace, "uid": ""}}
            self._event(obj, type, reason, message, component)
        self._call(add)

    def set_fault(self, kind: str, *, pod: str = "*", times: int | None = 1, **params) -> None:
        if kind not in FAULTS or set(params) - FAULTS[kind]:
            raise ValueError(f"unknown fault {kind!r} or parameter in {sorted(params)}; see FAULTS")
        fault = {"kind": kind, "pod": pod, "times": times, **params}
        if "path" in FAULTS[kind]:
            fault["path"] = re.compile(params.get("path", ".*"))
        self._call(self._add_fault, fault)

    def clear_faults(self) -> None:
        self._call(self._faults.clear)

    def compact(self) -> None:
        """Test helper: forget every kept change, as an etcd compaction at the current version (and a watch cache
        window that has moved past it): a watch from any older version gets 410 Expired."""
        def run():
            for history in self._history.values():
                history.clear()
            self._compacted = self._rv_now
        self._call(run)

    def stop(self) -> None:
        if self._loop.is_running():
            self._call_async(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- server plumbing -----

    async def _serve(self):
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 2**20)
        r = app.router
        for path, handler in [("/version", self._version), ("/api", self._api), ("/apis", self._apis),
                              ("/api/v1", self._resources), ("/api/v1/namespaces", self._namespaces),
                              ("/api/v1/namespaces/{ns}", self._namespace),
                              ("/api/v1/namespaces/{ns}/pods/{name}/log", self._pod_log),
                              ("/api/v1/{res}", self._list_all)]:
            r.add_get(path, handler)
        self._trainer_setup(r)
        r.add_route("*", "/api/v1/namespaces/{ns}/{res}", self._collection)
        r.add_route("*", "/api/v1/namespaces/{ns}/{res}/{name}", self._item)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock, ssl_context=self._ssl).start()

    async def _shutdown(self):
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(None)  # end the watches
        for run in self._runs.values():
            run.removed = True
            run.kill()
            self._touch(run)
        for task in self._tasks - self._pumps:
            task.cancel()
        pending = {t for t in self._pumps if not t.done()}
        if pending:
            await asyncio.wait(pending, timeout=5)
        for task in list(self._tasks):
            task.cancel()
        for handler in self._runner.server.connections if self._runner.server else []:
            if handler.transport:  # no TLS goodbye with clients that may be gone: drop the connection
                handler.transport.abort()
        await self._runner.cleanup()
        self._sock.close()
        await asyncio.sleep(0.05)  # let the aborted connections' callbacks run before the loop stops

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._pumps.discard)
        return task

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        self.request_log.append((request.method, request.path, dict(request.query)))
        try:
            self._authenticate(request)
            if self.rbac_rules is not None:
                self._authorize(request)
            fault = self._take_fault(("api_error", "api_timeout"), request=request)
            if fault and fault["kind"] == "api_timeout":
                await asyncio.sleep(fault.get("seconds", 5.0))
            elif fault and fault.get("status") == 429:  # what API priority and fairness answers
                raise ApiError(429, "Too many requests, please try again later.", headers={"Retry-After": "1"},
                               retryAfterSeconds=1)
            elif fault:
                raise ApiError(fault.get("status", 500), "Internal error occurred: injected fault")
            return await handler(request)
        except ApiError as e:
            return e.response()
        except web.HTTPNotFound:
            return ApiError(404, "the server could not find the requested resource").response()
        except web.HTTPMethodNotAllowed:
            return ApiError(405, "the server does not allow this method on the requested resource").response()

    def _authenticate(self, request: web.Request):
        """The bearer token must be the fixed token or, with `token_lifetime`, an unexpired one the exec plugin
        issued; otherwise 401 with the body kube-apiserver sends (it never says why)."""
        header = request.headers.get("Authorization", "")
        token = header[len("Bearer "):] if header.startswith("Bearer ") else ""
        if self.token_lifetime is None:
            verdict = "ok" if token == self.token else "invalid"
        else:
            verdict = verify_token(self._token_key, token)
            self.auth_log.append((token, verdict))
        if verdict != "ok":
            raise ApiError(401, "Unauthorized")

    _RESOURCE_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/(?P<ns>[^/]+))?"
                                r"/(?P<res>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$")

    def _authorize(self, request: web.Request):
        """RBAC as the API server applies a Role: verb + apiGroup + resource[/subresource]; discovery is open."""
        m = self._RESOURCE_PATH.match(request.path)
        if m is None:
            return  # /version, /api, /apis, /api/v1: discovery, open to every authenticated user
        ns, res, name, sub = m["ns"] or "", m["res"], m["name"], m["sub"]
        group = m["group"] or ""
        verb = {"POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update"}.get(request.method)
        if verb is None:
            verb = "get" if name else ("watch" if _flag(request.query, "watch") else "list")
        resource = f"{res}/{sub}" if sub else res
        for rule in self.rbac_rules or []:
            if (set(rule.get("apiGroups", [])) & {group, "*"} and set(rule.get("resources", [])) & {resource, "*"}
                    and set(rule.get("verbs", [])) & {verb, "*"}):
                return
        self.denied.append((verb, group, resource, ns))
        raise ApiError(403, f'{resource} is forbidden: User "emulator" cannot {verb} resource "{resource}" in API '
                            f'group "{group}" in the namespace "{ns}"', reason="Forbidden", kind=res)

    def _take_fault(self, kinds, pod: str | None = None, request: web.Request | None = None) -> dict | None:
        """The first armed fault of these kinds that matches; it is used up after `times` matches."""
        for fault in self._faults:
            if fault["kind"] not in kinds:
                continue
            if request is not None and not (fault["path"].search(request.path) and
                                            fault.get("method", request.method) == request.method):
                continue
            if pod is not None and not fnmatch.fnmatchcase(pod, fault["pod"]):
                continue
            if fault["times"] is not None:
                fault["times"] -= 1
                if fault["times"] <= 0:
                    self._faults.remove(fault)
            return fault
        return None

    def _add_fault(self, fault: dict):
        self._faults.append(fault)
        if fault["kind"] in RUNTIME_FAULTS:  # pods already running are hit too
            for (_, name), run in list(self._runs.items()):
                if run.started and not run.frozen and not run.removed and \
                        not all(c.done for c in run.containers.values()) and \
                        self._take_fault((fault["kind"],), pod=name) is not None:
                    self._spawn(self._runtime_fault(run, fault))

    # ----- store -----

    _WATCHED = {**{kind: res for res, kind in KINDS.items()}, "TrainJob": TRAINJOBS}  # kind -> resource

    def _bump(self, obj: dict, change: str = "MODIFIED"):
        """A new resourceVersion for a change of `obj` (already stored, or already removed for DELETED)."""
        self._rv_now = next(self._rv)
        obj["metadata"]["resourceVersion"] = str(self._rv_now)
        self._record(change, obj)

    def _put(self, resource: str, obj: dict):
        md = obj["metadata"]
        objects = self._store[resource].setdefault(md["namespace"], {})
        change = "MODIFIED" if md["name"] in objects else "ADDED"
        objects[md["name"]] = obj
        self._bump(obj, change)

    def _record(self, change: str, obj: dict):
        """Keep the change in its resource's history and hand it to that resource's watches."""
        md, res = obj["metadata"], self._WATCHED.get(obj.get("kind"))
        ns = md.get("namespace", "")
        if res is None or change == "MODIFIED" and self._store[res].get(ns, {}).get(md["name"]) is not obj:
            return  # not watchable, or a stale copy of an object already gone: no change any reader could see
        key, snapshot = (res, ns, md["name"]), json.loads(json.dumps(obj))
        prev = self._latest.pop(key, None) if change == "DELETED" else self._latest.get(key)
        if change != "DELETED":
            self._latest[key] = snapshot
        entry = (self._rv_now, change, snapshot, prev)
        history = self._history.setdefault(res, collections.deque())
        history.append(entry)
        while len(history) > self.watch_cache_size:
            history.popleft()
            self._evicted[res] = history[0][0] - 1 if history else self._rv_now
        for queue in self._watchers.get(res, ()):
            queue.put_nowait(entry)

    def _horizon(self, res: str) -> int:
        """The oldest version a watch of `res` can start from: every change after it is kept (watch_cache.go's
        `oldest-1`)."""
        return max(self._compacted, self._evicted.get(res, 0))

    def _get(self, resource: str, ns: str, name: str) -> dict:
        obj = self._store[resource].get(ns, {}).get(name)
        if obj is None:
            raise ApiError(404, f'{resource} "{name}" not found', name=name, kind=resource)
        return obj

    @staticmethod
    def _resource(request: web.Request) -> str:
        res = request.match_info["res"]
        if res not in KINDS:
            raise ApiError(404, "the server could not find the requested resource")
        return res

    # ----- discovery -----

    async def _version(self, request):
        return _json({"major": "1", "minor": "33", "gitVersion": "v1.33.0-emulator", "gitCommit": "emulator",
                      "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.4",
                      "compiler": "gc", "platform": "linux/amd64"})

    async def _api(self, request):
        return _json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}]})

    async def _apis(self, request):
        return _json({"kind": "APIGroupList", "apiVersion": "v1", "groups": self.api_groups()})

    async def _resources(self, request):
        def res(name, kind, verbs, short=(), namespaced=True):
            return {"name": name, "singularName": "" if "/" in name else kind.lower(), "namespaced": namespaced,
                    "kind": kind, "verbs": verbs, **({"shortNames": list(short)} if short else {})}
        crud = ["create", "delete", "get", "list", "patch", "watch"]
        return _json({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            {**res("pods", "Pod", crud, ["po"]), "categories": ["all"]}, res("pods/log", "Pod", ["get"]),
            res("events", "Event", crud, ["ev"]), res("secrets", "Secret", crud),
            res("configmaps", "ConfigMap", crud, ["cm"]),
            res("namespaces", "Namespace", ["get", "list"], ["ns"], namespaced=False)]})

    def namespace_labels(self, ns: str) -> dict[str, str]:
        """The namespace's labels (Pod Security admission reads them), set by `label_namespace`."""
        return {"kubernetes.io/metadata.name": ns, **self._namespace_labels.get(ns, {})}

    def create_namespace(self, ns: str) -> None:
        """Test helper: the namespace exists from now on (those of a new cluster: INITIAL_NAMESPACES)."""
        self._call(lambda: self._existing_namespaces.add(ns))

    def label_namespace(self, ns: str, labels: dict[str, str]) -> None:
        """Test helper: e.g. {"pod-security.kubernetes.io/enforce": "restricted"} makes admission enforce it
        (the namespace is created if it does not exist)."""
        self.create_namespace(ns)
        self._call(lambda: self._namespace_labels.setdefault(ns, {}).update(labels))

    def require_namespace(self, ns: str) -> None:
        """Kubernetes' NamespaceLifecycle admission (k8s.io/apiserver, pkg/admission/plugin/namespace/lifecycle/
        admission.go): an object is created only in a namespace that exists; otherwise the namespace lookup's own
        404 NotFound, `namespaces "<ns>" not found`."""
        if ns not in self._existing_namespaces:
            raise ApiError(404, f'namespaces "{ns}" not found', name=ns, kind="namespaces")

    def _namespace_obj(self, ns: str) -> dict:
        return {"kind": "Namespace", "apiVersion": "v1", "metadata": {
            "name": ns, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, ns)), "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": self.namespace_labels(ns)}, "status": {"phase": "Active"}}

    async def _namespaces(self, request):
        names = self._existing_namespaces
        return _json({"kind": "NamespaceList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv_now)},
                      "items": [self._namespace_obj(n) for n in sorted(names)]})

    async def _namespace(self, request):
        self.require_namespace(request.match_info["ns"])
        return _json(self._namespace_obj(request.match_info["ns"]))

    # ----- CRUD -----

    async def _list_all(self, request):
        return await self._list(request, self._resource(request), None)

    async def _collection(self, request):
        res, ns = self._resource(request), request.match_info["ns"]
        if request.method == "GET":
            return await self._list(request, res, ns)
        if request.method == "POST":
            return await self._create(request, res, ns)
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])

    async def _item(self, request):
        res, ns, name = self._resource(request), request.match_info["ns"], request.match_info["name"]
        if request.method == "GET":
            obj = self._get(res, ns, name)
            return _json(self._table([obj]) if res == "pods" and "as=Table" in request.headers.get("Accept", "")
                         else obj)
        if request.method == "DELETE":
            return await self._delete(request, res, ns, name)
        if request.method == "PATCH":
            return await self._patch(request, res, ns, name)
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "DELETE", "PATCH"])

    async def _list(self, request, res: str, ns: str | None, kind: str | None = None, api_version: str = "v1"):
        """A list of the collection (`ns` None: every namespace) or, with ?watch, a watch of it."""
        q, kind = request.query, kind or KINDS[res]
        by_label = label_selector(q.get("labelSelector", ""))
        by_field = field_selector(res, q.get("fieldSelector", ""))
        match = lambda obj: by_label(obj) and by_field(obj)  # noqa: E731
        if _flag(q, "watch"):
            return await self._watch(request, res, ns, match, kind, api_version)
        at = None
        if q.get("resourceVersionMatch") == "Exact" and (at := self._since(q)) is not None and \
                at < self._horizon(res):  # as the etcd3 store answers a read at a compacted revision
            raise ApiError(410, "The resourceVersion for the provided list is too old.", reason="Expired")
        items = self._objects(res, ns, match, at)
        if res == "pods" and "as=Table" in request.headers.get("Accept", ""):
            return _json(self._table(items))
        return _json({"kind": kind + "List", "apiVersion": api_version,
                      "metadata": {"resourceVersion": str(at or self._rv_now)}, "items": items})

    @staticmethod
    def _since(q) -> int | None:
        """The request's resourceVersion; None when unset or "0" (any version: the current state)."""
        text = q.get("resourceVersion", "")
        if text in ("", "0"):
            return None
        if not text.isdigit():
            raise ApiError(400, f'invalid resource version "{text}"')
        return int(text)

    def _objects(self, res: str, ns: str | None, match: Callable[[dict], bool], at: int | None = None) -> list[dict]:
        """The matching objects in (ns, name) order: as they are, or as they were at version `at` (the kept
        changes after it undone)."""
        spaces = [ns] if ns else list(self._store[res])
        objs = {(n, name): o for n in spaces for name, o in self._store[res].get(n, {}).items()}
        for rv, _, obj, prev in reversed(self._history.get(res, ()) if at is not None else ()):
            if rv <= at:
                break
            key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            if ns not in (None, key[0]):
                continue
            if prev is None:
                objs.pop(key, None)
            else:
                objs[key] = prev
        return [o for _, o in sorted(objs.items()) if match(o)]

    async def _watch(self, request, res: str, ns: str | None, match: Callable[[dict], bool], kind: str,
                     api_version: str):
        """A watch as kube-apiserver's cacher serves it (module docstring): the backlog (current objects, or the
        kept changes after the requested version) and then each change as it is recorded, from a queue this
        watch registers in the same step, so no change falls between the two."""
        q, loop = request.query, asyncio.get_running_loop()
        since, horizon = self._since(q), self._horizon(res)
        floor = self._rv_now if since is None else since  # changes up to this one are in the backlog (or unwanted)
        if since is None:  # the watch cache's getIntervalFromStore: the current objects as ADDED
            backlog = collections.deque((0, "ADDED", o, None) for o in json.loads(json.dumps(
                self._objects(res, ns, match))))
        elif since >= horizon:
            history = self._history.get(res, collections.deque())
            start = bisect.bisect_right(history, since, key=lambda entry: entry[0])
            backlog = collections.deque(itertools.islice(history, start, None))
        else:
            backlog = None
        # handlers/watch.go: timeoutSeconds, else a random time in [min-request-timeout, 2 x min-request-timeout)
        timeout = _int(q, "timeoutSeconds") or self.watch_min_request_timeout * (1 + random.random())
        deadline = loop.time() + timeout
        interval = self.watch_bookmark_interval if _flag(q, "allowWatchBookmarks") else math.inf
        next_bookmark = loop.time() + interval
        drop = self._take_fault(("watch_drop",), request=request)
        limit = drop.get("after_events", 1) if drop else math.inf
        queue: asyncio.Queue = asyncio.Queue()
        watchers = self._watchers.setdefault(res, set())
        watchers.add(queue)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()

        async def send(etype: str, obj: dict):
            await resp.write(json.dumps({"type": etype, "object": obj}, separators=(",", ":")).encode() + b"\n")

        def visible(obj: dict | None) -> bool:
            return obj is not None and ns in (None, obj["metadata"].get("namespace")) and match(obj)

        sent = 0
        try:
            await resp.prepare(request)
            if backlog is None:  # 200, then the Status as an ERROR event (the cacher's errWatcher)
                await send("ERROR", ApiError(410, f"too old resource version: {since} ({horizon})",
                                             reason="Expired").status())
            while backlog is not None and sent < limit:
                now = loop.time()
                if now >= deadline:
                    break
                if now >= next_bookmark and not backlog and queue.empty():  # all changes up to now are sent
                    await send("BOOKMARK", {"kind": kind, "apiVersion": api_version,
                                            "metadata": {"resourceVersion": str(max(self._rv_now, floor))}})
                    next_bookmark = now + interval
                    continue
                if backlog:
                    entry = backlog.popleft()
                else:
                    try:
                        entry = await asyncio.wait_for(queue.get(), min(deadline, next_bookmark) - now)
                    except asyncio.TimeoutError:
                        continue
                if entry is None or request.transport is None:
                    break  # the server stops, or the client has gone (noticed at the next change)
                if entry[0] and entry[0] <= floor:
                    continue
                if event := self._watch_event(entry, visible):
                    await send(*event)
                    sent += 1
            if sent >= limit and drop.get("mode") == "reset":  # no final chunk: the client sees a broken stream
                request.transport.close()
                return resp
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):  # the client went away
            pass
        finally:
            watchers.discard(queue)
        return resp

    @staticmethod
    def _watch_event(entry: tuple, visible: Callable[[dict | None], bool]) -> tuple[str, dict] | None:
        """What a watch with these selectors sees of a change (cache_watcher.go's convertToWatchEvent)."""
        rv, change, obj, prev = entry
        now_in, was_in = change != "DELETED" and visible(obj), visible(prev)
        if now_in:
            return ("MODIFIED" if was_in else "ADDED"), obj
        if not was_in:
            return None
        if change == "DELETED":
            return "DELETED", obj
        return "DELETED", {**prev, "metadata": {**prev["metadata"], "resourceVersion": str(rv)}}

    async def _body(self, request) -> Any:
        try:
            return json.loads(await request.read())
        except ValueError as e:
            raise ApiError(400, f"invalid JSON body: {e}") from None

    async def _create(self, request, res: str, ns: str):
        kind, obj = KINDS[res], await self._body(request)
        if not isinstance(obj, dict) or obj.get("kind", kind) != kind:
            raise ApiError(400, f"the object provided is not a {kind}")
        md = obj.setdefault("metadata", {})
        if md.get("namespace", ns) != ns:
            raise ApiError(400, "the namespace of the provided object does not match the namespace sent on the "
                                "request")
        self.require_namespace(ns)  # admission runs before validation
        if not md.get("name") and md.get("generateName"):
            md["name"] = md["generateName"] + uuid.uuid4().hex[:5]
        obj.update(kind=kind, apiVersion="v1")
        dropped = validate_core(obj, request.query.get("fieldValidation"))
        name = md["name"]
        if res == "pods":
            check_pod_security(obj, self.namespace_labels(ns))
        if name in self._store[res].get(ns, {}):
            raise ApiError(409, f'{res} "{name}" already exists', name=name, kind=res)
        md.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now_s())
        if res == "pods":
            self._pod_defaults(obj)
        elif res == "secrets":
            obj.setdefault("type", "Opaque")
            for k, v in (obj.pop("stringData", None) or {}).items():
                obj.setdefault("data", {})[k] = base64.b64encode(v.encode()).decode()
        if request.query.get("dryRun"):
            return _json(obj, 201, unknown_field_warnings(dropped))
        self._put(res, obj)
        if res == "pods":
            self._start_pod(obj)
        return _json(obj, 201, unknown_field_warnings(dropped))

    def _start_pod(self, pod: dict):
        """Hand a stored pod to the kubelet (API creates and controllers' creates alike)."""
        md = pod["metadata"]
        run = self._runs[(md["namespace"], md["name"])] = _PodRun(
            pod, self.root / "pods" / md["namespace"] / f"{md['name']}-{md['uid'][:8]}")
        self._spawn(self._run_pod(run))

    def _pod_defaults(self, pod: dict):
        """What the API server's defaulting and admission add (validation.py has already checked the pod)."""
        spec = pod.setdefault("spec", {})
        for c in spec["containers"]:
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            c.setdefault("imagePullPolicy", "Always" if ":" not in c["image"].rsplit("/", 1)[-1] or
                         c["image"].endswith(":latest") else "IfNotPresent")
            c.setdefault("resources", {})
        for key, value in [("restartPolicy", "Always"), ("terminationGracePeriodSeconds", 30),
                           ("dnsPolicy", "ClusterFirst"), ("schedulerName", "default-scheduler"),
                           ("serviceAccountName", "default"), ("securityContext", {}), ("priority", 0),
                           ("enableServiceLinks", True)]:
            spec.setdefault(key, value)
        tolerations = spec.setdefault("tolerations", [])
        for taint in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):  # DefaultTolerationSeconds
            if not any(t.get("key") == taint for t in tolerations):
                tolerations.append({"key": taint, "operator": "Exists", "effect": "NoExecute",
                                    "tolerationSeconds": 300})
        res = [c["resources"] for c in spec["containers"]]
        qos = "BestEffort" if not any(r.get("requests") or r.get("limits") for r in res) else "Guaranteed" if all(
            r.get("limits") and r.get("requests", r["limits"]) == r["limits"] for r in res) else "Burstable"
        pod["status"] = {"phase": "Pending", "qosClass": qos}

    async def _delete(self, request, res: str, ns: str, name: str):
        obj = self._get(res, ns, name)
        opts = ((await self._body(request)) if request.can_read_body else None) or {}
        check_preconditions(obj, opts.get("preconditions"), res, name)
        if res != "pods":
            del self._store[res][ns][name]
            self._bump(obj, "DELETED")
            return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                          "details": {"name": name, "kind": res, "uid": obj["metadata"]["uid"]}})
        grace = _int(request.query, "gracePeriodSeconds")
        grace = grace if grace is not None else opts.get("gracePeriodSeconds")
        grace = obj["spec"]["terminationGracePeriodSeconds"] if grace is None else grace
        return _json(self._delete_pod(obj, grace))

    def _delete_pod(self, obj: dict, grace: float) -> dict:
        """Delete a stored pod as the API server and kubelet do (API deletes and controllers' alike)."""
        run = self._runs[(obj["metadata"]["namespace"], obj["metadata"]["name"])]
        alive = any(c.proc and not c.done for c in run.containers.values())
        if grace > 0 and (alive or run.frozen):  # graceful: the object stays, Terminating, until the kubelet is done
            if "deletionTimestamp" not in obj["metadata"]:
                obj["metadata"].update(deletionTimestamp=_now_s(), deletionGracePeriodSeconds=grace)
                self._bump(obj)
                if not run.frozen:
                    self._spawn(self._terminate(run, grace))
            return obj
        obj["metadata"].setdefault("deletionTimestamp", _now_s())
        obj["metadata"]["deletionGracePeriodSeconds"] = 0
        self._remove(run)
        run.kill()
        return obj

    def _remove(self, run: _PodRun):
        md = run.pod["metadata"]
        if self._store["pods"].get(md["namespace"], {}).get(md["name"]) is run.pod:
            del self._store["pods"][md["namespace"]][md["name"]]
            self._bump(run.pod, "DELETED")
        if self._runs.get((md["namespace"], md["name"])) is run:
            del self._runs[(md["namespace"], md["name"])]
        run.removed = True
        self._touch(run)

    async def _patch(self, request, res: str, ns: str, name: str):
        if request.content_type not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            raise ApiError(415, "the body of the request was in an unknown format - accepted media types include: "
                                "application/merge-patch+json, application/strategic-merge-patch+json")
        obj, patch = self._get(res, ns, name), await self._body(request)
        if res == "pods" and set(patch) - {"metadata", "kind", "apiVersion"}:  # a pod's spec is (nearly) immutable
            raise ApiError(422, f'Pod "{name}" is invalid: spec: Forbidden: pod updates may not change fields '
                                f"other than metadata.labels and metadata.annotations (emulator)")
        # Of the metadata, labels and annotations change (any object); the rest is the server's.
        metadata = {k: v for k, v in (patch.get("metadata") or {}).items() if k in ("labels", "annotations")}
        patch = {**patch, "metadata": metadata} if metadata else {k: v for k, v in patch.items() if k != "metadata"}
        patched = json.loads(json.dumps(obj))
        _merge_patch(patched, patch)
        errors = metadata_errors(patched["metadata"])
        if errors:
            raise invalid(KINDS[res], name, errors, resource=res)
        _merge_patch(obj, patch)
        self._bump(obj)
        return _json(obj)

    def _table(self, pods: list[dict]) -> dict:
        """Server-side printing for `kubectl get pods` (NAME READY STATUS RESTARTS AGE, -o wide: IP NODE)."""
        def status(pod):
            st = pod["status"]
            text = st.get("reason") or st.get("phase", "Pending")
            for cs in st.get("containerStatuses") or []:
                state = cs.get("state", {})
                if (state.get("waiting") or {}).get("reason") or (state.get("terminated") or {}).get("reason"):
                    text = (state.get("waiting") or state.get("terminated"))["reason"]
            return "Terminating" if pod["metadata"].get("deletionTimestamp") else text

        def ready(pod):
            return sum(cs.get("ready", False) for cs in pod["status"].get("containerStatuses") or [])
        cols = [("Name", 0), ("Ready", 0), ("Status", 0), ("Restarts", 0), ("Age", 0), ("IP", 1), ("Node", 1)]
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(self._rv_now)},
                "columnDefinitions": [{"name": n, "type": "string", "format": "name" if n == "Name" else "",
                                       "description": n, "priority": p} for n, p in cols],
                "rows": [{"cells": [p["metadata"]["name"], f"{ready(p)}/{len(p['spec']['containers'])}", status(p), 0,
                                    _age(p["metadata"]["creationTimestamp"]), p["status"].get("podIP", "<none>"),
                                    p["spec"].get("nodeName", "<none>")], "object": p} for p in pods]}

    # ----- pods/log -----

    async def _pod_log(self, request):
        ns, name, q = request.match_info["ns"], request.match_info["name"], request.query
        pod, run = self._get("pods", ns, name), self._runs[(ns, name)]
        names = list(run.containers)
        cname = q.get("container") or (names[0] if len(names) == 1 else None)
        if cname is None:
            raise ApiError(400, f"a container name must be specified for pod {name}, choose one of: "
                                f"[{' '.join(names)}]")
        if cname not in run.containers:
            raise ApiError(400, f"container {cname} is not valid for pod {name}")
        if _flag(q, "previous"):
            raise ApiError(400, f'previous terminated container "{cname}" in pod "{name}" not found')
        if "sinceTime" in q and "sinceSeconds" in q:
            raise ApiError(422, "PodLogOptions \"\" is invalid: : Forbidden: at most one of `sinceTime` or "
                                "`sinceSeconds` may be specified")
        if not pod["spec"].get("nodeName"):  # the API server streams nothing for an unscheduled pod
            return web.Response(body=b"", content_type="text/plain")
        if run.frozen:
            raise ApiError(500, f'Get "https://{HOST_IP}:10250/containerLogs/{ns}/{name}/{cname}": dial tcp '
                                f"{HOST_IP}:10250: connect: no route to host")
        c = run.containers[cname]
        if c.proc is None and not c.done:  # the kubelet's wording
            why = {"ErrImagePull": "image can't be pulled", "ImagePullBackOff": "trying and failing to pull image"}
            raise ApiError(400, f'container "{cname}" in pod "{name}" is waiting to start: '
                                f"{why.get(c.waiting, c.waiting)}")
        since = None
        if "sinceTime" in q:  # the API server passes sinceTime on to the kubelet in whole seconds
            m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", q["sinceTime"], re.I)
            if not m:
                raise ApiError(400, f"parsing time {q['sinceTime']!r} as RFC3339 failed")
            zone = "+00:00" if m[3].upper() == "Z" else m[3]
            since = int(dt.datetime.fromisoformat(m[1] + zone).timestamp()) * 10**9
        elif "sinceSeconds" in q:
            since = time.time_ns() - _int(q, "sinceSeconds") * 10**9
        tail, limit = _int(q, "tailLines"), _int(q, "limitBytes")
        start = 0 if tail is None else max(0, len(c.lines) - tail)  # the kubelet finds the tail, then filters since
        if since is not None:
            start = max(start, bisect.bisect_left(c.stamps, since))
        stamp = _flag(q, "timestamps")

        def chunk(i: int) -> bytes:
            return _nano(c.stamps[i]).encode() + b" " + c.lines[i] if stamp else c.lines[i]

        if not _flag(q, "follow"):
            body = b"".join(chunk(i) for i in range(start, len(c.lines)))
            return web.Response(body=body[:limit] if limit else body, content_type="text/plain")
        drop = self._take_fault(("log_stream_drop",), pod=name)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        i, sent, cut = start, 0, False
        try:
            while True:
                changed = run.changed  # taken before reading: a line added meanwhile sets it
                while i < len(c.lines) and not cut:
                    data = chunk(i)[: (limit - sent) if limit else None]
                    i += 1
                    await resp.write(data)
                    sent += len(data)
                    cut = bool(limit and sent >= limit) or bool(drop and i - start >= drop.get("after_lines", 1))
                if cut or c.done or run.removed or run.frozen:
                    break
                await changed.wait()
            if drop and cut and drop.get("mode") == "reset":  # no final chunk: the client sees a broken stream
                request.transport.close()
                return resp
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):  # the client went away
            pass
        return resp

