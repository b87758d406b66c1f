"""The emulated Kubernetes API server (tests/k8s/emulator.py), driven by the real clients: kubernetes (sync),
kubernetes_asyncio, kubectl. Each fault switch is checked for the status a real cluster shows."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException


NS = "default"
TICK = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.05)"
STAMPED = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{9})Z (.*)$")


def manifest(name: str, code: str, *, labels: dict | None = None, **container) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"restartPolicy": "Never", "containers": [
                {"name": "main", "image": "python:3.11-slim", "command": ["python", "-c", code], **container}]}}


@pytest.fixture
def core(k8s_cluster):  # noqa: F811
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(k8s_cluster.kubeconfig), client_configuration=cfg)
    with client.ApiClient(cfg) as api:
        yield client.CoreV1Api(api)


def sync_log(core, name: str, **kwargs) -> str:
    # kubernetes 36's read_namespaced_pod_log returns "b'...'" (client regression, kubernetes-client/python#2596):
    # read the raw body instead.
    return core.read_namespaced_pod_log(name, NS, _preload_content=False, **kwargs).data.decode()


def raw_log(core, name: str, **query) -> str:
    """A log request with query parameters the generated clients lack (sinceTime), through the client's transport."""
    resp = core.api_client.call_api("/api/v1/namespaces/{namespace}/pods/{name}/log", "GET",
                                    {"namespace": NS, "name": name}, list(query.items()), {"Accept": "text/plain"},
                                    auth_settings=["BearerToken"], _preload_content=False, response_types_map={})
    return resp.data.decode()


def events(core, name: str) -> list[tuple[str, str, str]]:
    items = core.list_namespaced_event(NS, field_selector=f"involvedObject.name={name},involvedObject.kind=Pod").items
    return [(e.type, e.reason, e.message) for e in items]


def wait(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return result


def body(err) -> str:
    value = err.value.body
    return value.decode() if isinstance(value, bytes) else value


def cstate(pod: dict) -> dict:
    statuses = pod["status"].get("containerStatuses") or [{}]
    return statuses[0].get("state", {})


def condition(pod: dict, ctype: str) -> dict:
    return next((c for c in pod["status"].get("conditions", []) if c["type"] == ctype), {})


# ----- the sync client -----

def test_sync_client_create_get_list_delete(k8s_cluster, core):
    for name, labels in [("a", {"app": "lora", "tier": "train"}), ("b", {"app": "lora"}), ("c", {"app": "other"})]:
        created = core.create_namespaced_pod(NS, manifest(f"pod-{name}", "print('x')", labels=labels))
        assert created.status.phase == "Pending" and created.metadata.uid and created.metadata.resource_version
    pod = core.read_namespaced_pod("pod-a", NS)
    assert (pod.kind, pod.api_version, pod.metadata.namespace) == ("Pod", "v1", NS)
    assert pod.metadata.creation_timestamp is not None

    def names(**kw):
        return sorted(p.metadata.name for p in core.list_namespaced_pod(NS, **kw).items)

    assert names(label_selector="app=lora") == ["pod-a", "pod-b"]
    assert names(label_selector="app==lora,tier") == ["pod-a"]
    assert names(label_selector="app!=lora") == ["pod-c"]
    assert names(label_selector="app in (lora, other),!tier") == ["pod-b", "pod-c"]
    assert names(label_selector="app notin (lora)") == ["pod-c"]
    assert names(field_selector="metadata.name=pod-b") == ["pod-b"]
    listed = core.list_namespaced_pod(NS)
    assert listed.kind == "PodList" and int(listed.metadata.resource_version) > 0

    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(NS, manifest("pod-a", "print(1)"))
    assert err.value.status == 409 and json.loads(body(err))["reason"] == "AlreadyExists"
    with pytest.raises(ApiException) as err:
        core.list_namespaced_pod(NS, field_selector="spec.image=x")
    assert err.value.status == 400

    core.patch_namespaced_pod("pod-a", NS, {"metadata": {"annotations": {"lora/step": "7"}}})
    assert core.read_namespaced_pod("pod-a", NS).metadata.annotations == {"lora/step": "7"}

    k8s_cluster.wait_for_pod(NS, "pod-a")
    # DeleteOptions.preconditions: kube-apiserver answers a uid mismatch 409 Conflict with these words
    # (k8s.io/apiserver pkg/storage Preconditions.Check) and deletes nothing.
    with pytest.raises(ApiException) as err:
        core.delete_namespaced_pod("pod-a", NS, grace_period_seconds=0,
                                   body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid="other")))
    status = json.loads(body(err))
    assert err.value.status == 409 and status["reason"] == "Conflict"
    assert status["message"] == (f'Operation cannot be fulfilled on pods "pod-a": Precondition failed: UID in '
                                 f"precondition: other, UID in object meta: {pod.metadata.uid}")
    core.delete_namespaced_pod("pod-a", NS, grace_period_seconds=0,
                               body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=pod.metadata.uid)))
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod("pod-a", NS)
    status = json.loads(body(err))
    assert err.value.status == 404 and (status["kind"], status["reason"]) == ("Status", "NotFound")
    assert [p["metadata"]["name"] for p in k8s_cluster.pods(NS)] == ["pod-b", "pod-c"]


def test_sync_client_logs_timestamps_since_tail(k8s_cluster, core):
    # "early", then "late" just after the next whole second, so a whole-second sinceTime separates them.
    code = ("import time\nprint('early', flush=True)\ntime.sleep(1.05 - time.time() % 1)\n"
            "print('late', flush=True)")
    core.create_namespaced_pod(NS, manifest("logger", code))
    pod = k8s_cluster.wait_for_pod(NS, "logger")
    assert pod["status"]["phase"] == "Succeeded" and cstate(pod)["terminated"]["reason"] == "Completed"

    assert sync_log(core, "logger") == "early\nlate\n"
    stamped = sync_log(core, "logger", timestamps=True).splitlines()
    parsed = [STAMPED.match(line) for line in stamped]
    assert all(parsed) and [m[3] for m in parsed] == ["early", "late"]
    assert parsed[0][1] < parsed[1][1]  # different seconds
    assert sync_log(core, "logger", tail_lines=1) == "late\n"
    # sinceTime is not in the generated clients (kubectl has --since-time). The API server hands it to the kubelet
    # in whole seconds: the fraction is dropped, so a stamp just after "late" still returns it.
    assert raw_log(core, "logger", sinceTime=f"{parsed[1][1]}.999999999Z") == "late\n"
    assert raw_log(core, "logger", sinceTime=parsed[1][1] + "Z", timestamps="true") == stamped[1] + "\n"
    assert raw_log(core, "logger", sinceTime=parsed[0][1] + "+00:00") == "early\nlate\n"
    assert sync_log(core, "logger", since_seconds=3600) == "early\nlate\n"
    assert sync_log(core, "logger", limit_bytes=3) == "ear"
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod_log("logger", NS, container="nope")
    assert err.value.status == 400 and "container nope is not valid for pod logger" in body(err)
    assert k8s_cluster.logs(NS, "logger") == "early\nlate\n"


def test_follow_streams_until_the_container_exits(k8s_cluster, core):
    code = "import time\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(0.1)"
    core.create_namespaced_pod(NS, manifest("follow", code))
    k8s_cluster.wait_for_pod(NS, "follow", "Running")
    resp = core.read_namespaced_pod_log("follow", NS, follow=True, _preload_content=False)
    assert resp.data.decode() == "0\n1\n2\n3\n4\n"  # complete only because the stream waited for the exit
    assert k8s_cluster.get_pod(NS, "follow")["status"]["phase"] == "Succeeded"


def test_exit_code_and_log_line(k8s_cluster, core):
    core.create_namespaced_pod(NS, manifest("fails", "print('hello'); import sys; sys.exit(3)"))
    pod = core.read_namespaced_pod("fails", NS)
    assert pod.status.phase in ("Pending", "Running", "Failed")
    pod = k8s_cluster.wait_for_pod(NS, "fails")
    term = cstate(pod)["terminated"]
    assert pod["status"]["phase"] == "Failed" and (term["exitCode"], term["reason"]) == (3, "Error")
    assert term["startedAt"] and term["finishedAt"] and pod["status"]["startTime"] and pod["status"]["podIP"]
    assert condition(pod, "Ready")["status"] == "False" and condition(pod, "PodScheduled")["status"] == "True"
    assert sync_log(core, "fails") == "hello\n"
    assert [r for _, r, _ in events(core, "fails")] == ["Scheduled", "Pulled", "Created", "Started"]


def test_python_m_lora_trainer_runs_with_the_venv_python(k8s_cluster, core):
    m = manifest("trainer-help", "")
    m["spec"]["containers"][0].update(command=["python", "-m", "lora_trainer"], args=["--help"])
    core.create_namespaced_pod(NS, m)
    assert k8s_cluster.wait_for_pod(NS, "trainer-help")["status"]["phase"] == "Succeeded"
    assert sync_log(core, "trainer-help").startswith("usage: lora-train")


def test_long_output_without_newlines(k8s_cluster, core):
    code = "import sys\nsys.stdout.write('\\r' + 'x' * 40000)\nprint('\\ndone')"
    core.create_namespaced_pod(NS, manifest("progress", code))
    assert k8s_cluster.wait_for_pod(NS, "progress")["status"]["phase"] == "Succeeded"
    text = sync_log(core, "progress")
    assert text == "\r" + "x" * 40000 + "\ndone\n"  # stored as 16 KiB partial lines, served joined
    stamped = sync_log(core, "progress", timestamps=True)
    assert len(re.findall(r"\.\d{9}Z ", stamped)) == 4  # each partial line carries its own timestamp


def test_termination_message(k8s_cluster, core):
    code = "import json, os\nopen(os.environ['LORA_TERMINATION_LOG'], 'w').write(json.dumps({'step': 2}) + 'x' * 5000)"
    core.create_namespaced_pod(NS, manifest("msg", code))
    term = cstate(k8s_cluster.wait_for_pod(NS, "msg"))["terminated"]
    assert term["message"].startswith('{"step": 2}') and len(term["message"]) == 4096

    code = "import sys\nprint('the last words')\nsys.exit(1)"
    core.create_namespaced_pod(NS, manifest("fallback", code, terminationMessagePolicy="FallbackToLogsOnError"))
    assert cstate(k8s_cluster.wait_for_pod(NS, "fallback"))["terminated"]["message"] == "the last words\n"


def test_running_pod_status_and_graceful_delete(k8s_cluster, core):
    code = "import os, time\nprint(os.getpid(), flush=True)\nwhile True: time.sleep(0.05)"
    core.create_namespaced_pod(NS, manifest("sleeper", code))
    pod = k8s_cluster.wait_for_pod(NS, "sleeper", lambda p: p["status"].get("phase") == "Running"
                                   and k8s_cluster.logs(NS, "sleeper"))
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["started"] and "startedAt" in status["state"]["running"]
    assert condition(pod, "Ready")["status"] == "True" and pod["spec"]["nodeName"]
    pid = int(k8s_cluster.logs(NS, "sleeper"))
    deleted = core.delete_namespaced_pod("sleeper", NS)  # default grace: SIGTERM, the object stays until exit
    assert deleted.metadata.deletion_timestamp is not None
    wait(lambda: k8s_cluster.get_pod(NS, "sleeper") is None)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert ("Normal", "Killing", "Stopping container main") in events(core, "sleeper")


# ----- kubernetes_asyncio -----

def test_async_client(k8s_cluster):
    from kubernetes_asyncio import client as aclient
    from kubernetes_asyncio import config as aconfig
    from kubernetes_asyncio import watch as awatch

    async def scenario():
        cfg = aclient.Configuration()
        await aconfig.load_kube_config(config_file=str(k8s_cluster.kubeconfig), client_configuration=cfg)
        async with aclient.ApiClient(cfg) as api:
            v1 = aclient.CoreV1Api(api)
            code = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.1)"
            await v1.create_namespaced_pod(NS, manifest("async-pod", code, labels={"run": "r1"}))
            await v1.create_namespaced_pod(NS, manifest("other", "print(1)", labels={"run": "r2"}))
            while (got := await v1.read_namespaced_pod("async-pod", NS)).status.phase == "Pending":
                await asyncio.sleep(0.02)
            assert got.metadata.labels == {"run": "r1"}
            listed = await v1.list_namespaced_pod(NS, label_selector="run=r1")
            assert [p.metadata.name for p in listed.items] == ["async-pod"]
            resp = await v1.read_namespaced_pod_log("async-pod", NS, follow=True, _preload_content=False)
            assert resp.headers["Content-Type"] == "text/plain"
            assert (await resp.read()).decode() == "line 0\nline 1\nline 2\n"
            resp.release()
            text = await v1.read_namespaced_pod_log("async-pod", NS, timestamps=True, tail_lines=2)
            assert [STAMPED.match(line)[3] for line in text.splitlines()] == ["line 1", "line 2"]
            seen = [(e["type"], e["object"].metadata.name) async for e in awatch.Watch().stream(
                v1.list_namespaced_pod, NS, label_selector="run=r2", timeout_seconds=1)]
            assert seen[0] == ("ADDED", "other")
            await v1.delete_namespaced_pod("async-pod", NS, grace_period_seconds=0)
            assert [p.metadata.name for p in (await v1.list_namespaced_pod(NS)).items] == ["other"]
            return [q for m, p, q in k8s_cluster.request_log if m == "GET" and p.endswith("/pods") and "watch" in q]

    watch_queries = asyncio.run(scenario())
    assert watch_queries and watch_queries[0]["watch"] in ("true", "True")


# ----- the kubelet: env, secrets, volumes -----

def test_secret_env_envfrom_and_expansion(k8s_cluster, core):
    core.create_namespaced_secret(NS, client.V1Secret(metadata=client.V1ObjectMeta(name="hf"),
                                                      string_data={"token": "s3cr3t", "user": "me"}))
    assert core.read_namespaced_secret("hf", NS).data["token"] == "czNjcjN0"
    env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
           {"name": "GREETING", "value": "hi $(HF_user) $$(HF_user)"},
           {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    code = "import os\nprint(os.environ['HF_TOKEN'], os.environ['GREETING'], os.environ['POD'], os.environ['HOSTNAME'])"
    core.create_namespaced_pod(NS, manifest("env", code, env=env, envFrom=[{"secretRef": {"name": "hf"},
                                                                             "prefix": "HF_"}]))
    k8s_cluster.wait_for_pod(NS, "env")
    assert k8s_cluster.logs(NS, "env") == "s3cr3t hi me $(HF_user) env env\n"


def test_missing_secret_gives_create_container_config_error(k8s_cluster, core):
    env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}]
    core.create_namespaced_pod(NS, manifest("needs-secret", "import os; print(os.environ['HF_TOKEN'])", env=env))
    pod = k8s_cluster.wait_for_pod(NS, "needs-secret", lambda p: "waiting" in cstate(p)
                                   and cstate(p)["waiting"]["reason"] == "CreateContainerConfigError")
    assert pod["status"]["phase"] == "Pending"
    assert cstate(pod)["waiting"]["message"] == 'secret "later" not found'
    assert ("Warning", "Failed", 'Error: secret "later" not found') in events(core, "needs-secret")
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod_log("needs-secret", NS)
    assert "is waiting to start: CreateContainerConfigError" in body(err)

    k8s_cluster.create_secret(NS, "later", {"other": "x"})  # the key is still missing
    wait(lambda: any("couldn't find key token in Secret default/later" in m for _, _, m in events(core,
                                                                                                  "needs-secret")))
    k8s_cluster.create_secret(NS, "later-ok", {"token": "t0k"})
    core.create_namespaced_pod(NS, manifest("gets-secret", "import os; print(os.environ['HF_TOKEN'])", env=[
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "later-ok", "key": "token"}}}]))
    assert k8s_cluster.wait_for_pod(NS, "gets-secret")["status"]["phase"] == "Succeeded"
    assert k8s_cluster.logs(NS, "gets-secret") == "t0k\n"


def test_pvc_persists_between_pods_and_mount_map(k8s_cluster, core):
    mount = str(k8s_cluster.root / "mnt" / "data")  # under the cluster root: the path itself leads to the volume
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "lora-pvc"}}, {"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "data", "mountPath": mount}, {"name": "tmp", "mountPath": "/scratch"}]

    def pod(name, code):
        m = manifest(name, code, volumeMounts=mounts, workingDir=mount)
        m["spec"]["volumes"] = volumes
        return m

    code = ("import json, os\nopen('model.txt', 'w').write('trained')\n"
            "print(json.dumps(json.loads(os.environ['EMULATOR_MOUNT_MAP'])))")
    core.create_namespaced_pod(NS, pod("writer", code))
    k8s_cluster.wait_for_pod(NS, "writer")
    mount_map = json.loads(k8s_cluster.logs(NS, "writer"))
    assert set(mount_map) == {mount, "/scratch"} and mount_map[mount].endswith("pvc/default/lora-pvc")
    core.create_namespaced_pod(NS, pod("reader", f"print(open({mount + '/model.txt'!r}).read())"))
    assert k8s_cluster.wait_for_pod(NS, "reader")["status"]["phase"] == "Succeeded"
    assert k8s_cluster.logs(NS, "reader") == "trained\n"

    with pytest.raises(ApiException) as err:
        bad = manifest("bad", "print(1)", volumeMounts=[{"name": "nope", "mountPath": "/x"}])
        core.create_namespaced_pod(NS, bad)
    assert err.value.status == 422
    assert json.loads(body(err))["message"].endswith('volumeMounts[0].name: Not found: "nope"')


def test_missing_executable_is_a_start_error(k8s_cluster, core):
    m = manifest("noexec", "")
    m["spec"]["containers"][0]["command"] = ["definitely-not-a-program-xyz"]
    core.create_namespaced_pod(NS, m)
    pod = k8s_cluster.wait_for_pod(NS, "noexec")
    term = cstate(pod)["terminated"]
    assert pod["status"]["phase"] == "Failed" and (term["reason"], term["exitCode"]) == ("StartError", 128)
    assert 'exec: "definitely-not-a-program-xyz"' in term["message"]


# ----- faults -----

def test_fault_oom(k8s_cluster, core):
    k8s_cluster.set_fault("oom", pod="oom-*", after_lines=3)
    core.create_namespaced_pod(NS, manifest("oom-1", TICK))
    pod = k8s_cluster.wait_for_pod(NS, "oom-1")
    term = cstate(pod)["terminated"]
    assert pod["status"]["phase"] == "Failed" and (term["reason"], term["exitCode"]) == ("OOMKilled", 137)
    assert k8s_cluster.logs(NS, "oom-1").count("tick") >= 3
    core.create_namespaced_pod(NS, manifest("oom-2", "print('ok')"))  # times=1: the next pod is spared
    assert k8s_cluster.wait_for_pod(NS, "oom-2")["status"]["phase"] == "Succeeded"


def test_fault_evict(k8s_cluster, core):
    core.create_namespaced_pod(NS, manifest("evictee", TICK))
    k8s_cluster.wait_for_pod(NS, "evictee", "Running")
    k8s_cluster.set_fault("evict", after_seconds=0.1)  # a running pod is hit too
    pod = k8s_cluster.wait_for_pod(NS, "evictee")
    assert (pod["status"]["phase"], pod["status"]["reason"]) == ("Failed", "Evicted")
    assert pod["status"]["message"].startswith("The node was low on resource: memory.")
    assert condition(pod, "DisruptionTarget")["reason"] == "TerminationByKubelet"
    assert cstate(pod)["terminated"]["exitCode"] == 137
    assert any(e[:2] == ("Warning", "Evicted") and e[2] == pod["status"]["message"] for e in events(core, "evictee"))


def test_fault_node_lost(k8s_cluster, core):
    k8s_cluster.set_fault("node_lost", after_seconds=0.2, evict_after=0.5, gc_after=0.5)
    core.create_namespaced_pod(NS, manifest("lost", "import os, time\nprint(os.getpid(), flush=True)\n"
                                                    "while True: time.sleep(0.05)"))
    pod = k8s_cluster.wait_for_pod(NS, "lost", lambda p: condition(p, "Ready").get("status") == "False"
                                   and p["status"]["phase"] == "Running")
    assert "running" in cstate(pod)  # nobody reports the container any more
    with pytest.raises(ProcessLookupError):
        os.kill(int(k8s_cluster.logs(NS, "lost")), 0)
    assert ("Warning", "NodeNotReady", "Node is not ready") in events(core, "lost")
    with pytest.raises(ApiException) as err:
        sync_log(core, "lost")
    assert err.value.status == 500
    pod = k8s_cluster.wait_for_pod(NS, "lost", lambda p: "deletionTimestamp" in p["metadata"])
    assert pod["status"]["phase"] == "Running" and condition(pod, "DisruptionTarget")["reason"] == \
        "DeletionByTaintManager"
    wait(lambda: k8s_cluster.get_pod(NS, "lost") is None)


def test_fault_unschedulable(k8s_cluster, core):
    k8s_cluster.set_fault("unschedulable")
    core.create_namespaced_pod(NS, manifest("gpu-hungry", "print(1)"))
    pod = k8s_cluster.wait_for_pod(NS, "gpu-hungry", lambda p: p["status"].get("conditions"))
    cond = condition(pod, "PodScheduled")
    assert (pod["status"]["phase"], cond["status"], cond["reason"]) == ("Pending", "False", "Unschedulable")
    ev = [e for e in events(core, "gpu-hungry") if e[1] == "FailedScheduling"]
    assert ev and ev[0][0] == "Warning" and ev[0][2].startswith("0/3 nodes are available: 3 Insufficient "
                                                                 "nvidia.com/gpu.")
    assert sync_log(core, "gpu-hungry") == ""
    time.sleep(0.3)
    assert k8s_cluster.get_pod(NS, "gpu-hungry")["status"]["phase"] == "Pending"


def test_fault_image_pull_backoff(k8s_cluster, core):
    k8s_cluster.set_fault("image_pull_backoff", backoff_after=0.1)
    core.create_namespaced_pod(NS, manifest("badimage", "print(1)"))
    pod = k8s_cluster.wait_for_pod(NS, "badimage", lambda p: "waiting" in cstate(p)
                                   and cstate(p)["waiting"]["reason"] == "ImagePullBackOff")
    assert pod["status"]["phase"] == "Pending"
    reasons = [(t, r, m) for t, r, m in events(core, "badimage")]
    assert ("Warning", "Failed", "Error: ErrImagePull") in reasons
    assert ("Warning", "Failed", "Error: ImagePullBackOff") in reasons
    with pytest.raises(ApiException) as err:
        sync_log(core, "badimage")
    assert err.value.status == 400 and "trying and failing to pull image" in body(err)


def test_fault_api_error_500_and_429(k8s_cluster, core):
    core.create_namespaced_pod(NS, manifest("api", "print(1)"))
    k8s_cluster.set_fault("api_error", path=r"/pods/api$", times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            core.read_namespaced_pod("api", NS)
        assert err.value.status == 500 and json.loads(body(err))["reason"] == "InternalError"
    assert core.read_namespaced_pod("api", NS).metadata.name == "api"

    # urllib3 (sync client) honours Retry-After and retries a 429 silently...
    k8s_cluster.set_fault("api_error", path=r"/pods/api$", status=429)
    before = len(k8s_cluster.request_log)
    assert core.read_namespaced_pod("api", NS).metadata.name == "api"
    assert len(k8s_cluster.request_log) - before == 2
    # ... kubernetes_asyncio raises it.
    from kubernetes_asyncio import client as aclient
    from kubernetes_asyncio import config as aconfig

    async def get():
        cfg = aclient.Configuration()
        await aconfig.load_kube_config(config_file=str(k8s_cluster.kubeconfig), client_configuration=cfg)
        async with aclient.ApiClient(cfg) as api:
            await aclient.CoreV1Api(api).read_namespaced_pod("api", NS)

    k8s_cluster.set_fault("api_error", path=r"/pods/api$", status=429)
    with pytest.raises(aclient.ApiException) as err:
        asyncio.run(get())
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"


def test_fault_api_timeout(k8s_cluster, core):
    core.create_namespaced_pod(NS, manifest("slow", "print(1)"))
    # urllib3 retries a read timeout 3 times: 4 hung requests make the sync client give up.
    k8s_cluster.set_fault("api_timeout", path=r"/pods/slow$", seconds=1.0, times=4)
    before, start = len(k8s_cluster.request_log), time.monotonic()
    with pytest.raises(Exception) as err:
        core.read_namespaced_pod("slow", NS, _request_timeout=0.3)
    assert "timed out" in str(err.value).lower() and time.monotonic() - start >= 1.2
    assert len(k8s_cluster.request_log) - before == 4
    assert core.read_namespaced_pod("slow", NS).metadata.name == "slow"  # the fault is used up
    assert len(k8s_cluster.request_log) - before == 5


def test_fault_log_stream_drop(k8s_cluster, core):
    k8s_cluster.set_fault("log_stream_drop", after_lines=3)
    core.create_namespaced_pod(NS, manifest("ticker", TICK))
    k8s_cluster.wait_for_pod(NS, "ticker", "Running")
    wait(lambda: k8s_cluster.logs(NS, "ticker").count("tick") >= 5)
    text = core.read_namespaced_pod_log("ticker", NS, follow=True, _preload_content=False).data.decode()
    assert text == "tick\n" * 3  # a clean end although the container still runs
    assert k8s_cluster.get_pod(NS, "ticker")["status"]["phase"] == "Running"

    k8s_cluster.set_fault("log_stream_drop", after_lines=2, mode="reset")
    with pytest.raises(Exception) as err:
        core.read_namespaced_pod_log("ticker", NS, follow=True, _preload_content=False).data
    assert "IncompleteRead" in repr(err.value) or "ProtocolError" in repr(err.value)


# ----- auth, helpers, discovery, throughput -----

def test_unauthorized_without_token(k8s_cluster):
    ctx = ssl.create_default_context(cafile=str(k8s_cluster.ca_file))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{k8s_cluster.url}/api/v1/namespaces/default/pods", context=ctx)
    body = json.loads(err.value.read())
    assert err.value.code == 401 and (body["kind"], body["reason"]) == ("Status", "Unauthorized")
    req = urllib.request.Request(f"{k8s_cluster.url}/api/v1", headers={"Authorization": f"Bearer {k8s_cluster.token}"})
    assert json.loads(urllib.request.urlopen(req, context=ctx).read())["groupVersion"] == "v1"


def test_helpers_add_event_and_request_log(k8s_cluster, core):
    core.create_namespaced_pod(NS, manifest("h", "print(1)"))
    k8s_cluster.add_event(NS, "h", "Custom", "from a test", type="Warning")
    assert ("Warning", "Custom", "from a test") in events(core, "h")
    assert ("POST", "/api/v1/namespaces/default/pods", {}) in k8s_cluster.request_log
    assert any(p == "/api/v1/namespaces/default/events" and q.get("fieldSelector", "").startswith(
        "involvedObject.name=h") for m, p, q in k8s_cluster.request_log)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_get_logs_describe(k8s_cluster, tmp_path):
    def kubectl(*args: str) -> str:
        out = subprocess.run(["kubectl", f"--kubeconfig={k8s_cluster.kubeconfig}", f"--cache-dir={tmp_path}/cache",
                              *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    pod_file = tmp_path / "pod.json"
    pod_file.write_text(json.dumps(manifest("kc", "print('from kubectl')", labels={"app": "kc"})))
    assert "pod/kc created" in kubectl("create", "--validate=false", "-f", str(pod_file))
    k8s_cluster.wait_for_pod(NS, "kc")
    table = kubectl("get", "pods", "-l", "app=kc")
    assert re.search(r"^kc\s+0/1\s+Completed\s+0\s+\d+s$", table, re.M), table
    assert kubectl("logs", "kc") == "from kubectl\n"
    assert STAMPED.match(kubectl("logs", "kc", "--timestamps").strip())
    described = kubectl("describe", "pod", "kc")
    assert re.search(r"Status:\s+Succeeded", described) and "Started container main" in described
    assert 'pod "kc" deleted' in kubectl("delete", "pod", "kc")
