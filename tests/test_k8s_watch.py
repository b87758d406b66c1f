"""Watches on the emulated API server (tests/k8s/emulator.py), as kube-apiserver serves them from its watch cache,
driven by the real clients' watch helpers (kubernetes, kubernetes_asyncio) and raw HTTP where the wire matters."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

NS = "default"
SLEEP = "import time\ntime.sleep(60)"
GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"


def manifest(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"restartPolicy": "Never", "containers": [
                {"name": "main", "image": "python:3.11-slim", "command": ["python", "-c", SLEEP]}]}}


@pytest.fixture
def api(k8s_cluster):
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(k8s_cluster.kubeconfig), client_configuration=cfg)
    with client.ApiClient(cfg) as api:
        yield api


@pytest.fixture
def core(api):
    return client.CoreV1Api(api)


def raw_watch(cluster, path: str) -> tuple[int, dict, list[dict]]:
    """GET path (a watch) over HTTPS; the status, headers and every JSON line until the server ends the stream."""
    req = urllib.request.Request(cluster.url + path, headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(cluster.ca_file)),
                                timeout=30) as resp:
        return resp.status, dict(resp.headers), [json.loads(line) for line in resp.read().splitlines()]


def stream(func, *args, until=None, **kwargs) -> list[dict]:
    """The events of one watch (kubernetes' Watch), up to the first that satisfies `until`, or its end."""
    events = []
    for event in watch.Watch().stream(func, *args, **kwargs):
        events.append(event)
        if until and until(event):
            break
    return events


def configmaps(core, *names: str) -> list[str]:
    """Create configmaps (changes with no kubelet behind them); their resourceVersions."""
    return [core.create_namespaced_config_map(NS, {"metadata": {"name": n}}).metadata.resource_version
            for n in names]


# ----- resourceVersion semantics -----

def test_a_watch_from_a_version_sends_every_later_change_in_order(k8s_cluster, core):
    listed = core.list_namespaced_pod(NS)
    rv = listed.metadata.resource_version
    assert rv == core.list_namespaced_config_map(NS).metadata.resource_version  # one version for the cluster
    core.create_namespaced_pod(NS, manifest("p", {"app": "a"}))
    k8s_cluster.wait_for_pod(NS, "p", "Running")
    patched = core.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"step": "patched"}}})
    core.delete_namespaced_pod("p", NS, grace_period_seconds=0)

    events = stream(core.list_namespaced_pod, NS, resource_version=rv, timeout_seconds=10,
                    until=lambda e: e["type"] == "DELETED")
    types = [e["type"] for e in events]
    assert types[0] == "ADDED" and types[-1] == "DELETED" and set(types[1:-1]) == {"MODIFIED"}
    versions = [int(e["object"].metadata.resource_version) for e in events]
    assert versions == sorted(set(versions)) and versions[0] > int(rv)
    assert int(patched.metadata.resource_version) in versions
    assert "Running" in [e["object"].status.phase for e in events]
    after_patch = [e["object"].metadata.labels for e in events
                   if int(e["object"].metadata.resource_version) >= int(patched.metadata.resource_version)]
    assert all(labels == {"app": "a", "step": "patched"} for labels in after_patch)
    # The same watch again sees the same history: the server kept it.
    again = stream(core.list_namespaced_pod, NS, resource_version=rv, timeout_seconds=10,
                   until=lambda e: e["type"] == "DELETED")
    assert [(e["type"], e["raw_object"]) for e in again] == [(e["type"], e["raw_object"]) for e in events]


def test_a_watch_without_a_version_starts_with_the_current_objects_as_added(k8s_cluster, core):
    configmaps(core, "a", "b")
    rv = core.list_namespaced_config_map(NS).metadata.resource_version
    status, headers, lines = raw_watch(k8s_cluster, f"/api/v1/namespaces/{NS}/configmaps?watch=1&timeoutSeconds=1")
    assert status == 200 and headers["Transfer-Encoding"] == "chunked"
    assert headers["Content-Type"] == "application/json"
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [("ADDED", "a"), ("ADDED", "b")]
    assert max(int(e["object"]["metadata"]["resourceVersion"]) for e in lines) == int(rv)
    # resourceVersion=0 ("any") answers the same; a version in the future waits for the changes after it.
    assert raw_watch(k8s_cluster, f"/api/v1/namespaces/{NS}/configmaps?watch=1&resourceVersion=0"
                                  "&timeoutSeconds=1")[2] == lines
    future = int(rv) + 2
    configmaps(core, "c", "d", "e")  # at rv+1, rv+2, rv+3
    later = raw_watch(k8s_cluster, f"/api/v1/namespaces/{NS}/configmaps?watch=1&resourceVersion={future}"
                                   "&timeoutSeconds=1")[2]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in later] == [("ADDED", "e")]


def test_async_watch_sees_a_pod_created_patched_and_deleted_live(k8s_cluster):
    from kubernetes_asyncio import client as aclient
    from kubernetes_asyncio import config as aconfig
    from kubernetes_asyncio import watch as awatch

    async def scenario():
        cfg = aclient.Configuration()
        await aconfig.load_kube_config(config_file=str(k8s_cluster.kubeconfig), client_configuration=cfg)
        async with aclient.ApiClient(cfg) as api:
            v1 = aclient.CoreV1Api(api)

            async def collect():
                seen = []
                async with awatch.Watch() as w:
                    async for e in w.stream(v1.list_namespaced_pod, NS, timeout_seconds=30):
                        seen.append((e["type"], e["object"].metadata.name, e["object"].metadata.labels or {}))
                        if e["type"] == "DELETED":
                            return seen
                return seen

            watcher = asyncio.create_task(collect())
            while not any("watch" in q for _, p, q in k8s_cluster.request_log if p.endswith("/pods")):
                await asyncio.sleep(0.02)  # the watch is under way: what follows is live
            await v1.create_namespaced_pod(NS, manifest("live"))
            while (await v1.read_namespaced_pod("live", NS)).status.phase != "Running":
                await asyncio.sleep(0.02)
            await v1.patch_namespaced_pod("live", NS, {"metadata": {"labels": {"seen": "yes"}}})
            await v1.delete_namespaced_pod("live", NS, grace_period_seconds=0)
            return await asyncio.wait_for(watcher, 30)

    seen = asyncio.run(scenario())
    assert seen[0][:2] == ("ADDED", "live") and seen[-1][:2] == ("DELETED", "live")
    assert {t for t, _, _ in seen[1:-1]} == {"MODIFIED"}
    assert seen[-1][2] == {"seen": "yes"}


# ----- selectors -----

def test_selectors_filter_events_and_a_pod_leaving_them_is_deleted(k8s_cluster, core):
    rv = core.list_namespaced_pod(NS).metadata.resource_version
    core.create_namespaced_pod(NS, manifest("x", {"team": "a"}))
    core.create_namespaced_pod(NS, manifest("y", {"team": "b"}))
    moved = core.patch_namespaced_pod("x", NS, {"metadata": {"labels": {"team": "b"}}})
    core.patch_namespaced_pod("y", NS, {"metadata": {"labels": {"team": "a"}}})

    events = stream(core.list_namespaced_pod, NS, label_selector="team=a", resource_version=rv, timeout_seconds=10,
                    until=lambda e: e["type"] == "ADDED" and e["object"].metadata.name == "y")
    changes = [(e["type"], e["object"].metadata.name) for e in events if e["type"] != "MODIFIED"]
    assert changes == [("ADDED", "x"), ("DELETED", "x"), ("ADDED", "y")]
    assert {e["object"].metadata.name for e in events if e["type"] == "MODIFIED"} <= {"x"}
    gone = next(e["object"] for e in events if e["type"] == "DELETED")
    # cache_watcher.go: the previous content (still matching), at the resourceVersion of the change
    assert gone.metadata.labels == {"team": "a"}
    assert gone.metadata.resource_version == moved.metadata.resource_version
    assert next(e["object"] for e in events if e["type"] == "ADDED" and e["object"].metadata.name == "y"
                ).metadata.labels == {"team": "a"}


def test_a_field_selector_watch_across_namespaces(k8s_cluster, core):
    k8s_cluster.create_namespace("other")
    rv = core.list_pod_for_all_namespaces().metadata.resource_version
    core.create_namespaced_pod("other", manifest("z"))
    core.create_namespaced_pod(NS, manifest("w"))
    k8s_cluster.wait_for_pod("other", "z", "Running")
    core.delete_namespaced_pod("z", "other", grace_period_seconds=0)

    events = stream(core.list_pod_for_all_namespaces, field_selector="status.phase=Running,metadata.name=z",
                    resource_version=rv, timeout_seconds=10, until=lambda e: e["type"] == "DELETED")
    assert events[0]["type"] == "ADDED" and events[-1]["type"] == "DELETED"
    assert {(e["object"].metadata.namespace, e["object"].status.phase) for e in events} == {("other", "Running")}
    with pytest.raises(ApiException) as err:  # as for a list: a field the server does not index is a 400
        stream(core.list_namespaced_pod, NS, field_selector="spec.hostname=z", timeout_seconds=1)
    assert err.value.status == 400


# ----- bookmarks and timeouts -----

def test_bookmarks_carry_the_current_version_when_asked_for(k8s_cluster, core):
    k8s_cluster.watch_bookmark_interval = 0.2
    rv = core.list_namespaced_pod(NS).metadata.resource_version
    events = stream(core.list_namespaced_pod, NS, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=10,
                    until=lambda e: e["type"] == "BOOKMARK")
    assert [e["raw_object"] for e in events] == [{"kind": "Pod", "apiVersion": "v1",
                                                  "metadata": {"resourceVersion": rv}}]
    configmaps(core, "elsewhere")  # no pod changed, but the version moved on: a resumed watch may skip ahead
    current = core.list_namespaced_pod(NS).metadata.resource_version
    w = watch.Watch()
    for event in w.stream(core.list_namespaced_pod, NS, resource_version=rv, allow_watch_bookmarks=True,
                          timeout_seconds=10):
        if event["type"] == "BOOKMARK":
            break
    assert int(current) > int(rv) and w.resource_version == current  # the client keeps the bookmark's version
    # without allowWatchBookmarks: none
    lines = raw_watch(k8s_cluster, f"/api/v1/namespaces/{NS}/pods?watch=1&timeoutSeconds=1")[2]
    assert lines == []


def test_timeout_seconds_ends_the_stream_and_the_server_has_a_default(k8s_cluster, core):
    start = time.monotonic()
    assert stream(core.list_namespaced_pod, NS, timeout_seconds=1) == []
    assert 0.9 <= time.monotonic() - start < 15
    k8s_cluster.watch_min_request_timeout = 0.5  # kube-apiserver: between --min-request-timeout and twice that
    start = time.monotonic()
    status, _, lines = raw_watch(k8s_cluster, f"/api/v1/namespaces/{NS}/pods?watch=1")
    assert status == 200 and lines == [] and 0.45 <= time.monotonic() - start < 15


# ----- history: 410 Expired and relisting -----

def test_a_watch_from_a_compacted_version_gets_410_expired_and_a_relist_recovers(k8s_cluster, core):
    rv = core.list_namespaced_config_map(NS).metadata.resource_version
    configmaps(core, "a")
    k8s_cluster.compact()
    current = core.list_namespaced_config_map(NS).metadata.resource_version
    status, _, lines = raw_watch(k8s_cluster, f"/api/v1/namespaces/{NS}/configmaps?watch=1&resourceVersion={rv}")
    assert status == 200  # a watch answers its error as an event, once accepted
    assert [(e["type"], {k: e["object"][k] for k in ("kind", "status", "message", "reason", "code")})
            for e in lines] == [("ERROR", {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410,
                                           "message": f"too old resource version: {rv} ({current})"})]
    with pytest.raises(ApiException) as err:  # the client turns it into an exception
        stream(core.list_namespaced_config_map, NS, resource_version=rv, timeout_seconds=5)
    assert err.value.status == 410 and err.value.reason.startswith("Expired: too old resource version")
    with pytest.raises(ApiException) as err:  # a list at that exact version: a plain 410
        core.list_namespaced_config_map(NS, resource_version=rv, resource_version_match="Exact")
    assert err.value.status == 410
    assert json.loads(err.value.body)["message"] == "The resourceVersion for the provided list is too old."

    # What an informer does: relist, then watch from the list's version.
    listed = core.list_namespaced_config_map(NS)
    assert "a" in [c.metadata.name for c in listed.items]
    configmaps(core, "b")
    events = stream(core.list_namespaced_config_map, NS, resource_version=listed.metadata.resource_version,
                    timeout_seconds=10, until=lambda e: True)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "b")]


def test_the_history_is_a_bounded_window(k8s_cluster, core):
    k8s_cluster.watch_cache_size = 3
    rv = core.list_namespaced_config_map(NS).metadata.resource_version
    versions = configmaps(core, "c0", "c1", "c2", "c3", "c4")  # the window keeps c2, c3, c4
    lines = raw_watch(k8s_cluster, f"/api/v1/namespaces/{NS}/configmaps?watch=1&resourceVersion={rv}")[2]
    assert lines[0]["object"]["message"] == f"too old resource version: {rv} ({versions[1]})"
    lines = raw_watch(k8s_cluster, f"/api/v1/namespaces/{NS}/configmaps?watch=1&timeoutSeconds=1"
                                   f"&resourceVersion={versions[1]}")[2]
    assert [e["object"]["metadata"]["name"] for e in lines] == ["c2", "c3", "c4"]
    # A list at an exact version inside the window: the state then.
    listed = core.list_namespaced_config_map(NS, resource_version=versions[3], resource_version_match="Exact")
    assert [c.metadata.name for c in listed.items if c.metadata.name.startswith("c")] == ["c0", "c1", "c2", "c3"]
    assert listed.metadata.resource_version == versions[3]


# ----- faults and RBAC -----

def test_watch_drop_ends_the_stream_and_the_client_resumes_from_its_last_version(k8s_cluster, core):
    rv = core.list_namespaced_config_map(NS).metadata.resource_version
    versions = configmaps(core, "c0", "c1", "c2", "c3")
    k8s_cluster.set_fault("watch_drop", after_events=2)
    w, names = watch.Watch(), []
    for event in w.stream(core.list_namespaced_config_map, NS, resource_version=rv):  # no timeout: it resumes
        names.append(event["object"].metadata.name)
        if len(names) == 4:
            w.stop()
    assert names == ["c0", "c1", "c2", "c3"]
    watches = [q for m, p, q in k8s_cluster.request_log if p.endswith("/configmaps") and "watch" in q]
    assert [q.get("resourceVersion") for q in watches] == [rv, versions[1]]

    k8s_cluster.set_fault("watch_drop", after_events=1, mode="reset")
    with pytest.raises(Exception) as err:  # no final chunk: the stream breaks
        stream(core.list_namespaced_config_map, NS, resource_version=rv, timeout_seconds=10)
    assert "ProtocolError" in repr(err.value) or "IncompleteRead" in repr(err.value)


def test_rbac_list_without_watch_is_refused_a_watch(k8s_cluster, core):
    k8s_cluster.rbac_rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    core.list_namespaced_pod(NS)
    with pytest.raises(ApiException) as err:
        stream(core.list_namespaced_pod, NS, timeout_seconds=1)
    assert err.value.status == 403
    assert json.loads(err.value.body)["message"] == ('pods is forbidden: User "emulator" cannot watch resource '
                                                     '"pods" in API group "" in the namespace "default"')
    assert k8s_cluster.denied == [("watch", "", "pods", NS)]
    k8s_cluster.rbac_rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["watch"]}]
    assert stream(core.list_namespaced_pod, NS, timeout_seconds=1) == []


# ----- TrainJobs -----

def test_trainjob_watch(k8s_cluster, api):
    custom = client.CustomObjectsApi(api)
    k8s_cluster.watch_bookmark_interval = 0.2
    job = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob", "metadata": {"name": "tj"},
           "spec": {"runtimeRef": {"name": "torch-distributed"}, "suspend": True,
                    "trainer": {"numNodes": 1, "command": ["sleep", "30"]}}}
    rv = custom.list_namespaced_custom_object(GROUP, VERSION, NS, "trainjobs")["metadata"]["resourceVersion"]
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, "trainjobs", job)
    while not k8s_cluster.trainjobs()[0]["status"].get("conditions"):
        time.sleep(0.02)
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "trainjobs", "tj")

    for func, args in ((custom.list_namespaced_custom_object, (NS,)), (custom.list_cluster_custom_object, ())):
        events = stream(func, GROUP, VERSION, *args, "trainjobs", field_selector="metadata.name=tj",
                        resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=10,
                        until=lambda e: e["type"] == "BOOKMARK")
        assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]
        assert events[1]["object"]["status"]["conditions"][0]["reason"] == "Suspended"
        assert "deletionTimestamp" in events[2]["object"]["metadata"]
        bookmark = events[3]["object"]
        assert (bookmark["kind"], bookmark["apiVersion"], set(bookmark["metadata"])) == (
            "TrainJob", f"{GROUP}/{VERSION}", {"resourceVersion"})
        assert int(bookmark["metadata"]["resourceVersion"]) >= int(events[2]["object"]["metadata"]["resourceVersion"])
