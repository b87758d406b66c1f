"""The kubelet half of the emulator: runs a pod's containers as local processes and reports their status the way
the kubelet, scheduler and node controllers do, fault switches included. Mixed into `Cluster` (emulator.py), whose
store, events and faults it uses; everything here runs on the cluster's event loop."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from tests.k8s.util import EVICTED, HOST_IP, KINDS, NODE, RUNTIME_FAULTS, UNSCHEDULABLE, _field, _now_s

# The distribution reference grammar, simplified: [registry[:port]/]lowercase/path[:tag][@sha256:digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_REFERENCE = re.compile(rf"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
                              r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?\Z")


class _ConfigError(Exception):
    """A container cannot be started yet (missing secret, ...): the kubelet retries."""

    def __init__(self, message: str, waiting: str = "CreateContainerConfigError", event: str = "Failed",
                 event_message: str | None = None):
        super().__init__(message)
        self.waiting, self.event, self.event_message = waiting, event, event_message or f"Error: {message}"


class _Container:
    def __init__(self, spec: dict):
        self.spec, self.name = spec, spec["name"]
        self.stamps: list[int] = []  # arrival time (ns) of each log line, sorted: bisect serves sinceTime
        self.lines: list[bytes] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.done, self.kill_reason, self.waiting, self.term_file = False, None, "ContainerCreating", None
        self.cid = f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}"


class _PodRun:
    """The kubelet's side of one pod."""

    def __init__(self, pod: dict, directory: Path):
        self.pod, self.dir = pod, directory
        self.containers = {c["name"]: _Container(c) for c in pod["spec"]["containers"]}
        self.changed = asyncio.Event()  # replaced on every change; waiters hold the old one (see Kubelet._touch)
        self.frozen = self.removed = self.started = False
        self.evicted: str | None = None

    def kill(self, sig=signal.SIGKILL, only: _Container | None = None):
        for c in self.containers.values():
            if c.proc and c.proc.returncode is None and only in (None, c):
                try:  # the whole process group: a container dies with all its processes
                    os.killpg(c.proc.pid, sig)
                except ProcessLookupError:
                    pass


class Kubelet:
    """Pod lifecycle. `Cluster` provides root, port, base_env, schedule_delay, _store, _runs, _put, _bump, _remove,
    _take_fault, _spawn, _pumps, _ips and _event_ns."""

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
                            **({"containerID": c.cid} if c.proc else {})}
        self._status(run, containerStatuses=[statuses[n] for n in run.containers if n in statuses])

    def _event(self, obj: dict, etype: str, reason: str, message: str, component: str = "kubelet",
               field_path: str | None = None):
        md, now = obj["metadata"], _now_s()
        stamp = self._event_ns = max(self._event_ns + 1, time.time_ns())  # names sort by time, as client-go's do
        ev = {"kind": "Event", "apiVersion": "v1", "type": etype, "reason": reason, "message": message,
              "metadata": {"name": f"{md['name']}.{stamp:x}", "namespace": md["namespace"],
                           "uid": str(uuid.uuid4()), "creationTimestamp": now},
              "involvedObject": {"kind": obj["kind"], "namespace": md["namespace"], "name": md["name"],
                                 "uid": md["uid"], "apiVersion": obj.get("apiVersion", "v1"), **({"fieldPath": field_path} if field_path
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
        n = next(self._ips)
        ip = f"10.244.{n // 250}.{n % 250 + 2}"
        self._status(run, hostIP=HOST_IP, hostIPs=[{"ip": HOST_IP}], podIP=ip, podIPs=[{"ip": ip}],
                     startTime=_now_s())
        self._cond(run, "Initialized", "True")
        for ctype in ("Ready", "ContainersReady"):
            self._cond(run, ctype, "False", "ContainersNotReady", "containers with unready status: "
                                                                  f"[{' '.join(run.containers)}]")
        for c in run.containers.values():
            self._cstatus(run, c, {"waiting": {"reason": "ContainerCreating"}})
        if bad := [c for c in run.containers.values() if not _IMAGE_REFERENCE.match(c.spec["image"])]:
            for c in bad:  # the kubelet's check before any pull: the pod waits for ever
                image, fp = c.spec["image"], f"spec.containers{{{c.name}}}"
                message = (f'Failed to apply default image tag "{image}": couldn\'t parse image name "{image}": '
                           "invalid reference format")
                c.waiting = "InvalidImageName"
                self._cstatus(run, c, {"waiting": {"reason": "InvalidImageName", "message": message}})
                self._event(pod, "Warning", "InspectFailed", message, field_path=fp)
                self._event(pod, "Warning", "Failed", "Error: InvalidImageName", field_path=fp)
            return
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
            await self._start_container(run, c, argv, env, cwd)
        run.started = True
        if any(c.proc for c in run.containers.values()) and not self._terminal(run):
            self._status(run, phase="Running")
            if all(c.proc and not c.done for c in run.containers.values()):
                for ctype in ("Ready", "ContainersReady"):
                    self._cond(run, ctype, "True")
        for kind in RUNTIME_FAULTS:
            if fault := self._take_fault((kind,), pod=md["name"]):
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
        full = {**self.base_env, "HOSTNAME": run.pod["spec"].get("hostname") or run.pod["metadata"]["name"], "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(self.port), **env, "EMULATOR_MOUNT_MAP": json.dumps(mounts),
                "LORA_TERMINATION_LOG": str(c.term_file)}
        argv = [self._expand(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
        python = os.environ.get("LORA_TEST_PYTHON") or sys.executable  # the venv with the trainer (see emulator.py)
        if argv and argv[0] in ("python", "python3"):
            argv[0] = python
        elif argv and "/" not in argv[0] and (Path(python).parent / argv[0]).exists():
            argv[0] = str(Path(python).parent / argv[0])
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

    async def _start_container(self, run: _PodRun, c: _Container, argv: list[str], env: dict, cwd: str):
        image, fp = c.spec["image"], f"spec.containers{{{c.name}}}"
        self._event(run.pod, "Normal", "Pulled", f'Container image "{image}" already present on machine',
                    field_path=fp)
        self._event(run.pod, "Normal", "Created", f"Created container: {c.name}", field_path=fp)
        try:
            if not argv:
                raise FileNotFoundError("no command specified (the emulator has no image entrypoint)")
            if run.pod["spec"].get("subdomain"):
                if not shutil.which(argv[0]):
                    raise FileNotFoundError(2, "No such file or directory")
                argv = self._with_pod_hosts(run, argv)
            c.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd, start_new_session=True)
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
        if run.removed:  # deleted while starting
            run.kill()
        started = _now_s()
        self._event(run.pod, "Normal", "Started", f"Started container {c.name}", field_path=fp)
        self._cstatus(run, c, {"running": {"startedAt": started}}, ready=True, started=True)
        self._pumps.add(self._spawn(self._pump(run, c, started)))

    def _with_pod_hosts(self, run: _PodRun, argv: list[str]) -> list[str]:
        """Cluster DNS for a pod with a hostname and subdomain (a JobSet's pods, behind its headless service):
        `<hostname>.<subdomain>[.<ns>.svc.cluster.local]` of every such pod in the namespace resolves (to this
        machine, where every emulated node runs), as the cluster's DNS answers it, and nothing else new does. The
        process gets its own /etc/hosts in a private mount namespace, so nothing outside the pod changes."""
        ns = run.pod["metadata"]["namespace"]
        names = [f"{s['hostname']}.{s['subdomain']}" for p in self._store["pods"].get(ns, {}).values()
                 if (s := p["spec"]).get("hostname") and s.get("subdomain")]
        hosts = run.dir / "etc-hosts"
        hosts.write_text(Path("/etc/hosts").read_text() + "".join(
            f"127.0.0.1 {n} {n}.{ns}.svc.cluster.local\n" for n in sorted(set(names))))
        return ["unshare", "--mount", "--", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
                *argv]

    async def _pump(self, run: _PodRun, c: _Container, started: str):
        """Collect the container's output as timestamped log lines; on exit, report its terminated state."""
        def add(line: bytes):
            c.stamps.append(time.time_ns())
            c.lines.append(line)

        async def read(stream):
            # The runtime cuts long lines (progress bars with \r) into 16 KiB parts, whether the line arrived
            # whole in one read or in pieces.
            buf = b""
            while chunk := await stream.read(65536):
                *lines, buf = (buf + chunk).split(b"\n")
                for line in lines:
                    line += b"\n"
                    for start in range(0, len(line), 16384):
                        add(line[start:start + 16384])
                while len(buf) >= 16384:
                    add(buf[:16384])
                    buf = buf[16384:]
                self._touch(run)
            if buf:
                add(buf)

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
                "containerID": c.cid}})
        self._maybe_finish(run)

    @staticmethod
    def _terminal(run: _PodRun) -> bool:
        return run.pod["status"].get("phase") in ("Succeeded", "Failed")

    def _maybe_finish(self, run: _PodRun):
        if run.frozen or run.removed or self._terminal(run) or not all(c.done for c in run.containers.values()):
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
            run.kill(only=c)
        elif kind == "evict":
            run.evicted = fault.get("message", EVICTED.format(container=c.name))
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
                           if t.get("key") == "node.kubernetes.io/unreachable"), 0)
        delay = fault.get("evict_after", toleration)
        if delay is None:  # a toleration without tolerationSeconds: the pod stays bound to the lost node
            return
        await asyncio.sleep(delay)
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
