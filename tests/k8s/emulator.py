"""An emulated Kubernetes API server (core/v1) whose kubelet runs containers as local processes.

No kube-apiserver can run on these machines, so tests point the REAL clients (`kubernetes`, `kubernetes_asyncio`,
`kubectl`) at this server: HTTPS with its own CA, a bearer token, a kubeconfig. It runs in a background thread with
its own event loop, so sync and async tests can both use it. Each request costs a dict look-up, no history scan.

How a pod runs (differences from a cluster, on purpose):
- Every container's `command` + `args` is run as a local process, argv exactly as given (no shell), after
  `$(VAR)` expansion as Kubernetes does. `python`/`python3` become `sys.executable`; another bare name that exists
  next to `sys.executable` (torchrun, accelerate, ...) becomes that file, so the test venv's tools run. A container
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
Pod faults match the pod name with a glob (`pod="lora-*"`); api faults match request.path with a regex.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import datetime as dt
import fnmatch
import ipaddress
import itertools
import json
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

NODE, HOST_IP = "emulator-node-1", "10.0.0.10"
UNSCHEDULABLE = ("0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: "
                 "3 No preemption victims found for incoming pod.")
EVICTED = "The node was low on resource: memory."
KINDS = {"pods": "Pod", "secrets": "Secret", "configmaps": "ConfigMap", "events": "Event"}
# Field selectors the real API server accepts per resource (others are a 400, as there).
FIELDS = {
    "pods": {"metadata.name", "metadata.namespace", "spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
             "spec.serviceAccountName", "status.phase", "status.podIP", "status.nominatedNodeName"},
    "events": {"metadata.name", "metadata.namespace", "involvedObject.kind", "involvedObject.namespace",
               "involvedObject.name", "involvedObject.uid", "involvedObject.apiVersion",
               "involvedObject.resourceVersion", "involvedObject.fieldPath", "reason", "reportingComponent",
               "source", "type"},
    "secrets": {"metadata.name", "metadata.namespace", "type"},
    "configmaps": {"metadata.name", "metadata.namespace"},
}
FAULTS = {"oom", "evict", "node_lost", "unschedulable", "image_pull_backoff", "api_error", "api_timeout",
          "log_stream_drop"}
RUNTIME_FAULTS = ("oom", "evict", "node_lost")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _now_s() -> str:  # metav1.Time: whole seconds, UTC
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _nano(ns: int) -> str:  # the kubelet's log timestamp: RFC3339Nano with a fixed 9 digits
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


class ApiError(Exception):
    """Answered as a Kubernetes `Status` object."""

    REASONS = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed", 409: "AlreadyExists",
               415: "UnsupportedMediaType", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
               503: "ServiceUnavailable"}

    def __init__(self, code: int, message: str, reason: str | None = None, headers: dict | None = None, **details):
        super().__init__(message)
        self.code, self.message, self.headers, self.details = code, message, headers, details
        self.reason = reason or self.REASONS.get(code, "InternalError")

    def response(self) -> web.Response:
        return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": self.message, "reason": self.reason, "details": self.details, "code": self.code},
                     self.code, self.headers)


class _ConfigError(Exception):
    """A container cannot be started yet (missing secret, ...): the kubelet retries."""

    def __init__(self, message: str, waiting: str = "CreateContainerConfigError", event: str = "Failed",
                 event_message: str | None = None):
        super().__init__(message)
        self.waiting, self.event, self.event_message = waiting, event, event_message or f"Error: {message}"


def _json(obj: Any, code: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=json.dumps(obj, separators=(",", ":")).encode(), status=code,
                        content_type="application/json", headers=headers)


def _flag(query, name: str) -> bool:  # the sync client sends True, kubernetes_asyncio sends true or True
    return query.get(name, "").lower() in ("true", "1")


def _int(query, name: str) -> int | None:
    try:
        return int(query[name]) if name in query else None
    except ValueError:
        raise ApiError(400, f"invalid {name}: {query[name]!r}") from None


def label_selector(text: str) -> Callable[[dict], bool]:
    """`a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`, comma-separated (commas inside () kept)."""
    terms, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    terms.append(cur)
    reqs = []
    for term in (t.strip() for t in terms if t.strip()):
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            reqs.append((m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}))
        elif m := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", term):
            reqs.append((m[1], "!=" if m[2] == "!=" else "=", m[3]))
        elif m := re.fullmatch(r"(!?)\s*([\w./-]+)", term):
            reqs.append((m[2], "!exists" if m[1] else "exists", None))
        else:
            raise ApiError(400, f"unable to parse requirement: {term!r}")
    tests = {"=": lambda l, k, v: l.get(k) == v, "!=": lambda l, k, v: l.get(k) != v,
             "in": lambda l, k, v: l.get(k) in v, "notin": lambda l, k, v: l.get(k) not in v,
             "exists": lambda l, k, v: k in l, "!exists": lambda l, k, v: k not in l}
    return lambda obj: all(tests[op]((obj["metadata"].get("labels") or {}), k, v) for k, op, v in reqs)


def _field(obj: dict, path: str) -> str:
    if path == "source":
        return (obj.get("source") or {}).get("component", "")
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path):
        return (obj["metadata"].get(m[1]) or {}).get(m[2], "")
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return "" if obj is None else str(obj)


def field_selector(resource: str, text: str) -> Callable[[dict], bool]:
    reqs = []
    for term in (t.strip() for t in text.split(",") if t.strip()):
        m = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", term)
        if not m:
            raise ApiError(400, f"invalid selector: '{text}'; can't understand '{term}'")
        if m[1] not in FIELDS.get(resource, set()):
            raise ApiError(400, f'field label not supported: {m[1]}')
        reqs.append((m[1], m[2] == "!=", m[3]))
    return lambda obj: all((_field(obj, k) == v) != neg for k, neg, v in reqs)


def _merge_patch(target: dict, patch: dict) -> dict:  # RFC 7386
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_patch(target[key], value)
        else:
            target[key] = value
    return target


def _age(created: str) -> str:  # kubectl's short human duration
    s = max(0, int(time.time() - dt.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 10800 else f"{s // 3600}h" if s < 172800 else f"{s // 86400}d"


def _make_tls(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA and a server certificate for 127.0.0.1/localhost, made fresh for each cluster."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k8s-emulator-ca")])

    def cert(subject, pub, ca: bool, extra=()):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
             .not_valid_after(now + dt.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
             .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True))
        for ext in extra:
            b = b.add_extension(ext, critical=False)
        return b.sign(ca_key, hashes.SHA256())

    ca = cert(ca_name, ca_key.public_key(), True)
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]), key.public_key(), False, [
        x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])])
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "server.crt").write_bytes(server.public_bytes(pem))
    (directory / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(directory / "server.crt", directory / "server.key")
    return directory / "ca.crt", ctx


class _Container:
    def __init__(self, spec: dict):
        self.spec, self.name = spec, spec["name"]
        self.stamps: list[int] = []  # arrival time (ns) of each log line, sorted: bisect serves sinceTime
        self.lines: list[bytes] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.done, self.kill_reason, self.waiting, self.term_file = False, None, "ContainerCreating", None


class _PodRun:
    """The kubelet's side of one pod."""

    def __init__(self, pod: dict, directory: Path):
        self.pod, self.dir = pod, directory
        self.containers = {c["name"]: _Container(c) for c in pod["spec"]["containers"]}
        self.changed = asyncio.Event()  # replaced on every change; waiters hold the old one (see Cluster._touch)
        self.frozen = self.removed = self.started = False
        self.evicted: str | None = None

    def kill(self, sig=signal.SIGKILL):
        for c in self.containers.values():
            if c.proc and c.proc.returncode is None:
                try:  # the whole process group: a container dies with all its processes
                    os.killpg(c.proc.pid, sig)
                except ProcessLookupError:
                    pass


class Cluster:
    """One emulated cluster: API server + scheduler + kubelet of one node. Start on construction; `stop()` ends it."""

    def __init__(self, root: str | os.PathLike, *, schedule_delay: float = 0.1, base_env: dict | None = None,
                 token: str | None = None):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.schedule_delay = schedule_delay
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.token = token or uuid.uuid4().hex
        self.request_log: list[tuple[str, str, dict]] = []
        self._store: dict[str, dict[str, dict[str, dict]]] = {r: {} for r in KINDS}  # resource -> ns -> name -> obj
        self._runs: dict[tuple[str, str], _PodRun] = {}
        self._faults: list[dict] = []
        self._tasks: set[asyncio.Task] = set()
        self._rv, self._rv_now, self._ips = itertools.count(1), 0, itertools.count(2)
        self.ca_file, self._ssl = _make_tls(self.root)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = self.root / "kubeconfig"
        self.kubeconfig.write_text(
            f"apiVersion: v1\nkind: Config\ncurrent-context: emulator\n"
            f"clusters:\n- name: emulator\n  cluster:\n    server: {self.url}\n"
            f"    certificate-authority: {self.ca_file}\n"
            f"users:\n- name: emulator\n  user:\n    token: {self.token}\n"
            f"contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n"
            f"    namespace: default\n")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="k8s-emulator", daemon=True)
        self._thread.start()
        self._call_async(self._start())

    # ----- test helpers (any thread; the state itself is only touched on the emulator's loop) -----

    def _call_async(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call(self, fn: Callable, *args, **kwargs):
        async def run():
            return fn(*args, **kwargs)
        return self._call_async(run())

    def pods(self, namespace: str | None = None) -> list[dict]:
        return self._call(lambda: json.loads(json.dumps(
            [p for ns, pods in sorted(self._store["pods"].items()) if namespace in (None, ns) for p in pods.values()])))

    def get_pod(self, namespace: str, name: str) -> dict | None:
        return self._call(lambda: json.loads(json.dumps(self._store["pods"].get(namespace, {}).get(name))))

    def logs(self, namespace: str, name: str, container: str | None = None) -> str:
        def read():
            run = self._runs[(namespace, name)]
            return b"".join(run.containers[container or next(iter(run.containers))].lines).decode(errors="replace")
        return self._call(read)

    def wait_for_pod(self, namespace: str, name: str, until: Callable[[dict], bool] | str | tuple = ("Succeeded",
                     "Failed"), timeout: float = 30.0) -> dict:
        """Poll until `until(pod)` (or the phase is one of `until`); return the pod."""
        test = until if callable(until) else lambda p: p["status"].get("phase") in ((until,) if isinstance(until, str)
                                                                                    else until)
        deadline = time.monotonic() + timeout
        while True:
            pod = self.get_pod(namespace, name)
            if pod is not None and test(pod):
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
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {sorted(FAULTS)}")
        fault = {"kind": kind, "pod": pod, "times": times, **params}
        if kind.startswith("api_"):
            fault["path"] = re.compile(params.get("path", ".*"))
        self._call(self._add_fault, fault)

    def clear_faults(self) -> None:
        self._call(self._faults.clear)

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

    async def _start(self):
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 2**20)
        r = app.router
        for path, handler in [("/version", self._version), ("/api", self._api), ("/apis", self._apis),
                              ("/api/v1", self._resources), ("/api/v1/namespaces", self._namespaces),
                              ("/api/v1/namespaces/{ns}", self._namespace),
                              ("/api/v1/namespaces/{ns}/pods/{name}/log", self._pod_log),
                              ("/api/v1/{res}", self._list_all)]:
            r.add_get(path, handler)
        r.add_route("*", "/api/v1/namespaces/{ns}/{res}", self._collection)
        r.add_route("*", "/api/v1/namespaces/{ns}/{res}/{name}", self._item)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock, ssl_context=self._ssl, shutdown_timeout=1.0).start()

    async def _shutdown(self):
        for run in self._runs.values():
            run.removed = True
            run.kill()
            self._touch(run)
        await asyncio.wait(self._tasks, timeout=2) if self._tasks else None
        for task in list(self._tasks):
            task.cancel()
        await self._runner.cleanup()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        self.request_log.append((request.method, request.path, dict(request.query)))
        try:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized")
            fault = self._take_fault(("api_error", "api_timeout"), request=request)
            if fault and fault["kind"] == "api_timeout":
                await asyncio.sleep(fault.get("seconds", 5.0))
            elif fault:
                code = fault.get("status", 500)
                raise ApiError(code, "Too many requests, please try again later." if code == 429 else
                               "Internal error occurred: injected fault", headers={"Retry-After": "1"}
                               if code == 429 else None, **({"retryAfterSeconds": 1} if code == 429 else {}))
            return await handler(request)
        except ApiError as e:
            return e.response()
        except web.HTTPNotFound:
            return ApiError(404, "the server could not find the requested resource").response()
        except web.HTTPMethodNotAllowed:
            return ApiError(405, f"the server does not allow this method on the requested resource").response()

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

    def _bump(self, obj: dict):
        self._rv_now = next(self._rv)
        obj["metadata"]["resourceVersion"] = str(self._rv_now)

    def _put(self, resource: str, obj: dict):
        self._bump(obj)
        self._store[resource].setdefault(obj["metadata"]["namespace"], {})[obj["metadata"]["name"]] = obj

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
        return _json({"major": "1", "minor": "32", "gitVersion": "v1.32.0-emulator", "gitCommit": "emulator",
                      "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.4",
                      "compiler": "gc", "platform": "linux/amd64"})

    async def _api(self, request):
        return _json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}]})

    async def _apis(self, request):
        return _json({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})

    async def _resources(self, request):
        def res(name, kind, verbs, short=(), namespaced=True):
            return {"name": name, "singularName": "" if "/" in name else kind.lower(), "namespaced": namespaced,
                    "kind": kind, "verbs": verbs, **({"shortNames": list(short)} if short else {})}
        crud = ["create", "delete", "get", "list", "patch", "watch"]
        return _json({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            {**res("pods", "Pod", crud, ["po"]), "categories": ["all"]}, res("pods/log", "Pod", ["get"]),
            res("events", "Event", crud, ["ev"]), res("secrets", "Secret", crud), res("configmaps", "ConfigMap",
            crud, ["cm"]), res("namespaces", "Namespace", ["get", "list"], ["ns"], namespaced=False)]})

    def _namespace_obj(self, ns: str) -> dict:
        return {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": ns, "uid": str(uuid.uuid5(
            uuid.NAMESPACE_DNS, ns)), "creationTimestamp": "2025-01-01T00:00:00Z"}, "status": {"phase": "Active"}}

    async def _namespaces(self, request):
        names = {"default", "kube-system"}.union(*(s.keys() for s in self._store.values()))
        return _json({"kind": "NamespaceList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv_now)},
                      "items": [self._namespace_obj(n) for n in sorted(names)]})

    async def _namespace(self, request):  # any namespace exists
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

    async def _list(self, request, res: str, ns: str | None):
        q = request.query
        by_label = label_selector(q.get("labelSelector", ""))
        by_field = field_selector(res, q.get("fieldSelector", ""))
        spaces = [ns] if ns else sorted(self._store[res])
        items = [o for n in spaces for _, o in sorted(self._store[res].get(n, {}).items())
                 if by_label(o) and by_field(o)]
        if _flag(q, "watch"):  # a short watch: the current objects as ADDED, then the stream ends
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            for obj in items:
                await resp.write(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
            await resp.write_eof()
            return resp
        if res == "pods" and "as=Table" in request.headers.get("Accept", ""):
            return _json(self._table(items))
        return _json({"kind": KINDS[res] + "List", "apiVersion": "v1",
                      "metadata": {"resourceVersion": str(self._rv_now)}, "items": items})

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
        if not md.get("name") and md.get("generateName"):
            md["name"] = md["generateName"] + uuid.uuid4().hex[:5]
        name = md.get("name") or ""
        if not name or not _NAME.fullmatch(name):
            raise ApiError(422, f'{kind} "{name}" is invalid: metadata.name: Invalid value: "{name}": a lowercase '
                                f"RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
                           name=name, kind=res)
        if name in self._store[res].get(ns, {}):
            raise ApiError(409, f'{res} "{name}" already exists', name=name, kind=res)
        obj.update(kind=kind, apiVersion="v1")
        md.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now_s())
        if res == "pods":
            self._pod_defaults(obj)
        elif res == "secrets":
            obj.setdefault("type", "Opaque")
            for k, v in (obj.pop("stringData", None) or {}).items():
                obj.setdefault("data", {})[k] = base64.b64encode(v.encode()).decode()
        if request.query.get("dryRun"):
            return _json(obj, 201)
        self._put(res, obj)
        if res == "pods":
            run = self._runs[(ns, name)] = _PodRun(obj, self.root / "pods" / ns / f"{name}-{md['uid'][:8]}")
            self._spawn(self._run_pod(run))
        return _json(obj, 201)

    def _pod_defaults(self, pod: dict):
        """What the API server's defaulting and admission add, and the validation a test is likely to trip."""
        spec, name = pod.setdefault("spec", {}), pod["metadata"]["name"]
        volumes = {v.get("name") for v in spec.get("volumes") or []}
        if not spec.get("containers"):
            raise ApiError(422, f'Pod "{name}" is invalid: spec.containers: Required value', name=name, kind="pods")
        for i, c in enumerate(spec["containers"]):
            for field in ("name", "image"):
                if not c.get(field):
                    raise ApiError(422, f'Pod "{name}" is invalid: spec.containers[{i}].{field}: Required value')
            for j, m in enumerate(c.get("volumeMounts") or []):
                if m.get("name") not in volumes:
                    raise ApiError(422, f'Pod "{name}" is invalid: spec.containers[{i}].volumeMounts[{j}].name: '
                                        f'Not found: "{m.get("name")}"')
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
        if res != "pods":
            del self._store[res][ns][name]
            return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                          "details": {"name": name, "kind": res, "uid": obj["metadata"]["uid"]}})
        opts = (await self._body(request)) if request.can_read_body else {}
        grace = _int(request.query, "gracePeriodSeconds")
        grace = grace if grace is not None else opts.get("gracePeriodSeconds")
        grace = obj["spec"]["terminationGracePeriodSeconds"] if grace is None else grace
        run = self._runs[(ns, name)]
        alive = any(c.proc and not c.done for c in run.containers.values())
        if grace > 0 and (alive or run.frozen):  # graceful: the object stays, Terminating, until the kubelet is done
            if "deletionTimestamp" not in obj["metadata"]:
                obj["metadata"].update(deletionTimestamp=_now_s(), deletionGracePeriodSeconds=grace)
                self._bump(obj)
                if not run.frozen:
                    self._spawn(self._terminate(run, grace))
            return _json(obj)
        obj["metadata"].setdefault("deletionTimestamp", _now_s())
        obj["metadata"]["deletionGracePeriodSeconds"] = 0
        self._remove(run)
        run.kill()
        return _json(obj)

    async def _terminate(self, run: _PodRun, grace: float):
        for c in run.containers.values():
            if c.proc and not c.done:
                self._event(run.pod, "Normal", "Killing", f"Stopping container {c.name}",
                            field_path=f"spec.containers{{{c.name}}}")
        run.kill(signal.SIGTERM)
        if not await self._wait(run, lambda: all(c.done or not c.proc for c in run.containers.values()), grace):
            run.kill()
            await self._wait(run, lambda: all(c.done or not c.proc for c in run.containers.values()))
        self._remove(run)

    def _remove(self, run: _PodRun):
        md = run.pod["metadata"]
        if self._store["pods"].get(md["namespace"], {}).get(md["name"]) is run.pod:
            del self._store["pods"][md["namespace"]][md["name"]]
            self._bump(run.pod)
        if self._runs.get((md["namespace"], md["name"])) is run:
            del self._runs[(md["namespace"], md["name"])]
        run.removed = True
        self._touch(run)

    async def _patch(self, request, res: str, ns: str, name: str):
        if request.content_type not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            raise ApiError(415, f"the body of the request was in an unknown format - accepted media types include: "
                                f"application/merge-patch+json, application/strategic-merge-patch+json")
        obj, patch = self._get(res, ns, name), await self._body(request)
        if res == "pods":  # enough for labels/annotations; a pod's spec is (nearly) immutable anyway
            if set(patch) - {"metadata", "kind", "apiVersion"}:
                raise ApiError(422, f'Pod "{name}" is invalid: spec: Forbidden: pod updates may not change fields '
                                    f"other than metadata.labels and metadata.annotations (emulator)")
            patch = {"metadata": {k: v for k, v in (patch.get("metadata") or {}).items()
                                  if k in ("labels", "annotations")}}
        else:
            patch.pop("metadata", None)
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
        cols = [("Name", 0), ("Ready", 0), ("Status", 0), ("Restarts", 0), ("Age", 0), ("IP", 1), ("Node", 1)]
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(self._rv_now)},
                "columnDefinitions": [{"name": n, "type": "string", "format": "name" if n == "Name" else "",
                                       "description": n, "priority": p} for n, p in cols],
                "rows": [{"cells": [p["metadata"]["name"],
                                    f"{sum(cs.get('ready', False) for cs in p['status'].get('containerStatuses') or [])}"
                                    f"/{len(p['spec']['containers'])}", status(p), 0,
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
        i, sent = start, 0
        try:
            while True:
                changed = run.changed
                while i < len(c.lines):
                    data = chunk(i)[: (limit - sent) if limit else None]
                    i += 1
                    await resp.write(data)
                    sent += len(data)
                    if (limit and sent >= limit) or (drop and i - start >= drop.get("after_lines", 1)):
                        if drop and drop.get("mode") == "reset":  # no final chunk: the client sees a broken stream
                            request.transport.close()
                            return resp
                        break
                else:
                    if not (c.done or run.removed or run.frozen):
                        await changed.wait()
                        continue
                break
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):  # the client went away
            pass
        return resp

    # ----- the kubelet -----

    def _touch(self, run: _PodRun):
        """Wake everything waiting on this pod (log followers, faults, deletion)."""
        run.changed.set()
        run.changed = asyncio.Event()

    async def _wait(self, run: _PodRun, test: Callable[[], bool], timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not test():
            changed = run.changed
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            try:
                await asyncio.wait_for(changed.wait(), left)
            except asyncio.TimeoutError:
                return test()
        return True

    def _status(self, run: _PodRun, **changes):
        if not run.removed:
            run.pod["status"].update(changes)
            self._bump(run.pod)
            self._touch(run)

    def _cond(self, run: _PodRun, ctype: str, status: str, reason: str | None = None, message: str | None = None):
        conds = [c for c in run.pod["status"].get("conditions", []) if c["type"] != ctype]
        conds.append({"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": _now_s(),
                      **({"reason": reason} if reason else {}), **({"message": message} if message else {})})
        self._status(run, conditions=conds)

    def _cstatus(self, run: _PodRun, c: _Container, state: dict, ready=False, started=False):
        statuses = {s["name"]: s for s in run.pod["status"].get("containerStatuses", [])}
        statuses[c.name] = {"name": c.name, "image": c.spec["image"], "imageID": "", "ready": ready,
                            "restartCount": 0, "started": started, "state": state, "lastState": {},
                            **({"containerID": f"containerd://{uuid.uuid4().hex}"} if c.proc else {})}
        self._status(run, containerStatuses=[statuses[n] for n in run.containers if n in statuses])

    def _event(self, obj: dict, etype: str, reason: str, message: str, component: str = "kubelet",
               field_path: str | None = None):
        md, now = obj["metadata"], _now_s()
        ev = {"kind": "Event", "apiVersion": "v1", "type": etype, "reason": reason, "message": message,
              "metadata": {"name": f"{md['name']}.{uuid.uuid4().hex[:16]}", "namespace": md["namespace"],
                           "uid": str(uuid.uuid4()), "creationTimestamp": now},
              "involvedObject": {"kind": obj["kind"], "namespace": md["namespace"], "name": md["name"],
                                 "uid": md["uid"], "apiVersion": "v1", **({"fieldPath": field_path} if field_path
                                                                            else {})},
              "source": {"component": component, **({"host": NODE} if component == "kubelet" else {})},
              "firstTimestamp": now, "lastTimestamp": now, "count": 1, "eventTime": None,
              "reportingComponent": component, "reportingInstance": NODE if component == "kubelet" else ""}
        self._put("events", ev)

    async def _run_pod(self, run: _PodRun):
        pod, md = run.pod, run.pod["metadata"]
        await asyncio.sleep(self.schedule_delay)
        if run.removed:
            return
        if fault := self._take_fault(("unschedulable",), pod=md["name"]):
            message = fault.get("message", UNSCHEDULABLE)
            self._cond(run, "PodScheduled", "False", "Unschedulable", message)
            self._event(pod, "Warning", "FailedScheduling", message, "default-scheduler")
            return
        pod["spec"]["nodeName"] = NODE
        self._cond(run, "PodScheduled", "True")
        self._event(pod, "Normal", "Scheduled", f"Successfully assigned {md['namespace']}/{md['name']} to {NODE}",
                    "default-scheduler")
        ip = f"10.244.{next(self._ips) // 250}.{next(self._ips) % 250 + 2}"
        self._status(run, hostIP=HOST_IP, hostIPs=[{"ip": HOST_IP}], podIP=ip, podIPs=[{"ip": ip}],
                     startTime=_now_s())
        self._cond(run, "Initialized", "True")
        for ctype in ("Ready", "ContainersReady"):
            self._cond(run, ctype, "False", "ContainersNotReady", "containers with unready status: "
                                                                  f"[{' '.join(run.containers)}]")
        for c in run.containers.values():
            self._cstatus(run, c, {"waiting": {"reason": "ContainerCreating"}})
        if fault := self._take_fault(("image_pull_backoff",), pod=md["name"]):
            return await self._image_pull_backoff(run, fault)
        while True:  # the kubelet retries a container it cannot configure (missing secret, ...)
            try:
                prepared = [(c, *self._prepare(run, c)) for c in run.containers.values()]
                break
            except _ConfigError as e:
                for c in run.containers.values():
                    c.waiting = e.waiting
                    self._cstatus(run, c, {"waiting": {"reason": e.waiting, "message": str(e)}})
                self._event(pod, "Warning", e.event, e.event_message)
                await asyncio.sleep(0.5)
                if run.removed:
                    return
        for c, argv, env, cwd in prepared:
            await self._start(run, c, argv, env, cwd)
        run.started = True
        if any(c.proc for c in run.containers.values()):
            self._status(run, phase="Running")
            if all(c.proc for c in run.containers.values()):
                for ctype in ("Ready", "ContainersReady"):
                    self._cond(run, ctype, "True")
        while fault := self._take_fault(RUNTIME_FAULTS, pod=md["name"]):
            self._spawn(self._runtime_fault(run, fault))
        self._maybe_finish(run)

    def _prepare(self, run: _PodRun, c: _Container) -> tuple[list[str], dict, str]:
        """argv, environment and working directory of a container; raises _ConfigError like the kubelet."""
        ns, spec = run.pod["metadata"]["namespace"], c.spec

        def ref(resource: str, name: str, optional: bool) -> dict[str, str]:
            obj = self._store[resource].get(ns, {}).get(name)
            if obj is None:
                if optional:
                    return {}
                raise _ConfigError(f'{KINDS[resource].lower()} "{name}" not found')
            data = obj.get("data") or {}
            return {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()} \
                if resource == "secrets" else dict(data)

        env: dict[str, str] = {}
        for src in spec.get("envFrom") or []:
            for key, resource in (("secretRef", "secrets"), ("configMapRef", "configmaps")):
                if r := src.get(key):
                    env.update({src.get("prefix", "") + k: v for k, v in
                                ref(resource, r["name"], r.get("optional", False)).items()})
        for e in spec.get("env") or []:
            vf = e.get("valueFrom")
            if not vf:
                env[e["name"]] = self._expand(e.get("value", ""), env)
            elif r := vf.get("secretKeyRef") or vf.get("configMapKeyRef"):
                resource = "secrets" if "secretKeyRef" in vf else "configmaps"
                data = ref(resource, r["name"], r.get("optional", False))
                if r["key"] in data:
                    env[e["name"]] = data[r["key"]]
                elif not r.get("optional"):
                    raise _ConfigError(f"couldn't find key {r['key']} in {KINDS[resource]} {ns}/{r['name']}")
            elif r := vf.get("fieldRef"):
                env[e["name"]] = _field(run.pod, r["fieldPath"])
        mounts = self._mounts(run, c, ref)
        c.term_file = run.dir / f"{c.name}.termination-log"
        c.term_file.parent.mkdir(parents=True, exist_ok=True)
        c.term_file.write_bytes(b"")
        full = {**self.base_env, "HOSTNAME": run.pod["metadata"]["name"], "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(self.port), **env, "EMULATOR_MOUNT_MAP": json.dumps(mounts),
                "LORA_TERMINATION_LOG": str(c.term_file)}
        argv = [self._expand(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        elif argv and "/" not in argv[0] and (Path(sys.executable).parent / argv[0]).exists():
            argv[0] = str(Path(sys.executable).parent / argv[0])
        workdir = spec.get("workingDir") or ""
        for path in sorted(mounts, key=len, reverse=True):  # a working dir inside a mount uses its host dir
            if workdir == path or workdir.startswith(path.rstrip("/") + "/"):
                workdir = mounts[path] + workdir[len(path):]
                break
        if not workdir or not Path(workdir).is_dir():
            workdir = str(run.dir / "rootfs" / workdir.lstrip("/"))
        Path(workdir).mkdir(parents=True, exist_ok=True)
        return argv, full, workdir

    @staticmethod
    def _expand(text: str, env: dict) -> str:  # Kubernetes' $(VAR) expansion; $$ escapes
        return re.sub(r"\$\$|\$\(([A-Za-z_][\w.-]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)

    def _mounts(self, run: _PodRun, c: _Container, ref) -> dict[str, str]:
        ns = run.pod["metadata"]["namespace"]
        volumes = {v["name"]: v for v in run.pod["spec"].get("volumes") or []}
        mounts = {}
        for m in c.spec.get("volumeMounts") or []:
            vol = volumes[m["name"]]
            if claim := vol.get("persistentVolumeClaim"):
                host = self.root / "pvc" / ns / claim["claimName"]
            elif "hostPath" in vol:
                host = Path(vol["hostPath"]["path"])
            else:  # emptyDir, and any kind the emulator does not know
                host = run.dir / "volumes" / m["name"]
            for kind, resource, key in (("secret", "secrets", "secretName"), ("configMap", "configmaps", "name")):
                if src := vol.get(kind):
                    try:
                        files = ref(resource, src[key], src.get("optional", False))
                    except _ConfigError as e:
                        raise _ConfigError(str(e), "ContainerCreating", "FailedMount",
                                           f'MountVolume.SetUp failed for volume "{m["name"]}" : {e}') from None
                    host.mkdir(parents=True, exist_ok=True)
                    for fname, text in files.items():
                        (host / fname).write_text(text)
            host = host / m["subPath"] if m.get("subPath") else host
            host.mkdir(parents=True, exist_ok=True)
            mounts[m["mountPath"]] = str(host)
            path = Path(m["mountPath"])
            if path.is_absolute() and path.resolve() != host.resolve() and self.root in path.parents:
                if path.is_symlink():  # make the mount path itself lead to the volume
                    path.unlink()
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.symlink_to(host, target_is_directory=True)
        return mounts

    async def _start(self, run: _PodRun, c: _Container, argv: list[str], env: dict, cwd: str):
        image, fp = c.spec["image"], f"spec.containers{{{c.name}}}"
        self._event(run.pod, "Normal", "Pulled", f'Container image "{image}" already present on machine',
                    field_path=fp)
        self._event(run.pod, "Normal", "Created", f"Created container: {c.name}", field_path=fp)
        try:
            if not argv:
                raise FileNotFoundError("no command specified (the emulator has no image entrypoint)")
            c.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd, start_new_session=True, limit=2**20)
        except OSError as e:
            why = e.strerror or str(e)
            message = (f"failed to create containerd task: failed to create shim task: OCI runtime create failed: "
                       f'runc create failed: unable to start container process: exec: "{argv[0] if argv else ""}": '
                       f"{why}: unknown")
            self._event(run.pod, "Warning", "Failed", f"Error: {message}", field_path=fp)
            c.done = True
            self._cstatus(run, c, {"terminated": {"exitCode": 128, "reason": "StartError", "message": message,
                                                  "startedAt": "1970-01-01T00:00:00Z", "finishedAt": _now_s()}})
            return
        started = _now_s()
        self._event(run.pod, "Normal", "Started", f"Started container {c.name}", field_path=fp)
        self._cstatus(run, c, {"running": {"startedAt": started}}, ready=True, started=True)
        self._spawn(self._pump(run, c, started))

    async def _pump(self, run: _PodRun, c: _Container, started: str):
        """Collect the container's output as timestamped log lines; on exit, report its terminated state."""
        async def read(stream):
            while line := await stream.readline():
                c.stamps.append(time.time_ns())
                c.lines.append(line)
                self._touch(run)

        readers = asyncio.gather(read(c.proc.stdout), read(c.proc.stderr))
        code = await c.proc.wait()
        try:  # PID 1 is gone: the runtime tears down whatever else ran in the container
            os.killpg(c.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await readers
        code = code if code >= 0 else 128 - code
        message = c.term_file.read_bytes()[:4096].decode(errors="replace") if c.term_file.exists() else ""
        if not message and code and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = b"".join(c.lines[-80:])[-2048:].decode(errors="replace")
        c.done = True
        if not run.frozen:
            self._cstatus(run, c, {"terminated": {
                "exitCode": code, "reason": c.kill_reason or ("Completed" if code == 0 else "Error"),
                "startedAt": started, "finishedAt": _now_s(), **({"message": message} if message else {}),
                "containerID": f"containerd://{uuid.uuid4().hex}"}})
        self._maybe_finish(run)

    def _maybe_finish(self, run: _PodRun):
        if run.frozen or run.removed or not all(c.done for c in run.containers.values()):
            return
        codes = [((s.get("state") or {}).get("terminated") or {}).get("exitCode", 1)
                 for s in run.pod["status"].get("containerStatuses", [])]
        for ctype in ("Ready", "ContainersReady"):
            self._cond(run, ctype, "False", "PodCompleted")
        if run.evicted:
            self._status(run, phase="Failed", reason="Evicted", message=run.evicted)
        else:
            self._status(run, phase="Succeeded" if not any(codes) else "Failed")

    async def _image_pull_backoff(self, run: _PodRun, fault: dict):
        for c in run.containers.values():
            image = c.spec["image"]
            error = fault.get("message") or (f'rpc error: code = NotFound desc = failed to pull and unpack image '
                                             f'"{image}": failed to resolve reference "{image}": {image}: not found')
            fp = f"spec.containers{{{c.name}}}"
            self._event(run.pod, "Normal", "Pulling", f'Pulling image "{image}"', field_path=fp)
            self._event(run.pod, "Warning", "Failed", f'Failed to pull image "{image}": {error}', field_path=fp)
            self._event(run.pod, "Warning", "Failed", "Error: ErrImagePull", field_path=fp)
            c.waiting = "ErrImagePull"
            self._cstatus(run, c, {"waiting": {"reason": "ErrImagePull", "message": error}})
            await asyncio.sleep(fault.get("backoff_after", 0.2))
            self._event(run.pod, "Normal", "BackOff", f'Back-off pulling image "{image}"', field_path=fp)
            self._event(run.pod, "Warning", "Failed", "Error: ImagePullBackOff", field_path=fp)
            c.waiting = "ImagePullBackOff"
            self._cstatus(run, c, {"waiting": {"reason": "ImagePullBackOff", "message":
                                               f'Back-off pulling image "{image}": ErrImagePull: {error}'}})

    async def _runtime_fault(self, run: _PodRun, fault: dict):
        c = run.containers.get(fault.get("container")) or next(iter(run.containers.values()))
        if "after_lines" in fault:
            await self._wait(run, lambda: len(c.lines) >= fault["after_lines"] or c.done or run.removed)
        else:
            await asyncio.sleep(fault.get("after_seconds", 0.0))
        if run.removed or run.frozen or all(x.done for x in run.containers.values()):
            return
        kind, pod = fault["kind"], run.pod
        if kind == "oom":
            c.kill_reason = "OOMKilled"
            if c.proc and c.proc.returncode is None:
                os.killpg(c.proc.pid, signal.SIGKILL)
        elif kind == "evict":
            run.evicted = fault.get("message", EVICTED)
            self._event(pod, "Warning", "Evicted", run.evicted)
            for x in run.containers.values():
                if not x.done:
                    self._event(pod, "Normal", "Killing", f"Stopping container {x.name}",
                                field_path=f"spec.containers{{{x.name}}}")
            self._cond(run, "DisruptionTarget", "True", "TerminationByKubelet", run.evicted)
            run.kill()
        else:
            await self._node_lost(run, fault)

    async def _node_lost(self, run: _PodRun, fault: dict):
        run.frozen = True  # the node and its kubelet are gone: nobody reports this pod's containers any more
        run.kill()
        self._touch(run)
        await asyncio.sleep(fault.get("not_ready_after", 0.0))  # node-monitor-grace-period
        self._cond(run, "Ready", "False")
        self._event(run.pod, "Warning", "NodeNotReady", "Node is not ready", "node-controller")
        toleration = next((t.get("tolerationSeconds") for t in run.pod["spec"].get("tolerations") or []
                           if t.get("key") == "node.kubernetes.io/unreachable"), 300)
        await asyncio.sleep(fault.get("evict_after", toleration))
        if run.removed:
            return
        md = run.pod["metadata"]
        self._cond(run, "DisruptionTarget", "True", "DeletionByTaintManager",
                   "Taint manager: deleting due to NoExecute taint")
        self._event(run.pod, "Normal", "TaintManagerEviction", f"Marking for deletion Pod {md['namespace']}/"
                    f"{md['name']}", "taint-eviction-controller")
        md.setdefault("deletionTimestamp", _now_s())
        md.setdefault("deletionGracePeriodSeconds", run.pod["spec"]["terminationGracePeriodSeconds"])
        self._bump(run.pod)
        if fault.get("gc_after") is None:
            return  # stays Terminating while the node object exists, as in a real cluster
        await asyncio.sleep(fault["gc_after"])
        if run.removed:
            return
        self._cond(run, "DisruptionTarget", "True", "DeletionByPodGC", "PodGC: node no longer exists")
        self._status(run, phase="Failed")
        self._remove(run)
