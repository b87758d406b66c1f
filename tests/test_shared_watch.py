"""Issue 18: the triggerer's shared watch (airflow_provider_lora/watch.py) against the emulated API server, whose
watches follow kube-apiserver's (resourceVersion, bookmarks, 410 Expired, dropped connections: tests/k8s/emulator.py).
Many triggers share one list and one watch instead of each reading its pod every poll_interval; a change is seen
when it happens; a dropped or expired watch recovers; a missed event is found by the resync; a Role without
list/watch falls back to polling."""

from __future__ import annotations

import asyncio
import logging

from airflow_provider_lora import watch as shared_watch
from airflow_provider_lora.kube import close_shared_clients
from airflow_provider_lora.triggers.lora import LoRATrainingTrigger
from tests.test_pod_launcher import cheap_pod, create, first_event, quiet, trigger

LABELLED = {"app.kubernetes.io/managed-by": "airflow-provider-lora"}
SLEEP_THEN_END = "import time; time.sleep({seconds}); print('done', flush=True)"


def labelled_pod(name: str, seconds: float) -> dict:
    pod = cheap_pod(name, SLEEP_THEN_END.format(seconds=seconds))
    pod["metadata"]["labels"] = dict(LABELLED)
    return pod


def follow_all(cluster, names: list[str], *, watch: bool, poll_interval: float, timeout: float = 90) -> list[dict]:
    """Run one trigger per pod in one event loop (as the triggerer does); their first events."""
    triggers = [quiet(LoRATrainingTrigger(name=n, namespace="default", kubernetes_conn_id=None,
                                          config_file=str(cluster.kubeconfig), poll_interval=poll_interval,
                                          watch=watch)) for n in names]

    async def first(t):
        async for event in t.run():
            return event.payload

    async def run():
        try:
            return await asyncio.wait_for(asyncio.gather(*(first(t) for t in triggers)), timeout)
        finally:
            await close_shared_clients()
    return asyncio.run(run())


def pod_reads(cluster) -> int:
    """GETs of one pod by name: what each polling trigger makes every poll_interval."""
    return sum(1 for r in cluster.request_log if r[0] == "GET" and "/pods/" in r[1] and not r[1].endswith("/log"))


def watch_requests(cluster) -> list:
    return [r for r in cluster.request_log if r[0] == "GET" and r[1].endswith("/pods")]


def test_many_triggers_share_one_watch_instead_of_reading_their_pods(k8s_cluster):
    names = [f"w{i}" for i in range(12)]
    for name in names:
        create(k8s_cluster, labelled_pod(name, 4))
    events = follow_all(k8s_cluster, names, watch=True, poll_interval=0.2)
    assert [e["status"] for e in events] == ["success"] * len(names)
    with_watch = pod_reads(k8s_cluster)
    # One list and one watch for all of them (a reconnect at most); a pod is read by name only when the cache did
    # not have it yet.
    assert 2 <= len(watch_requests(k8s_cluster)) <= 4
    assert with_watch <= len(names)

    k8s_cluster.request_log.clear()
    for name in names:
        create(k8s_cluster, labelled_pod(name + "p", 4))
    follow_all(k8s_cluster, [n + "p" for n in names], watch=False, poll_interval=0.2)
    polling = pod_reads(k8s_cluster)
    assert polling >= 10 * len(names)  # about 4 s / 0.2 s reads each
    assert watch_requests(k8s_cluster) == []


def test_a_change_is_seen_when_it_happens_not_at_the_next_poll(k8s_cluster):
    create(k8s_cluster, labelled_pod("quick", 1))
    # A minute between looks: only the watch can bring the end in time.
    [event] = follow_all(k8s_cluster, ["quick"], watch=True, poll_interval=60, timeout=40)
    assert event["status"] == "success"


def test_a_dropped_watch_and_an_expired_version_are_recovered(k8s_cluster):
    """The connection drops after one event; by then the server has forgotten the version (compacted), so the
    re-watch answers 410 Expired: the watch lists again and the trigger still sees its pod end."""
    k8s_cluster.set_fault("watch_drop", path=r"/pods$", after_events=1, mode="reset")
    k8s_cluster.compact()
    create(k8s_cluster, labelled_pod("dropped", 3))

    original = shared_watch.SharedWatch._watch

    async def watch_then_compact(self, client):
        try:
            await original(self, client)
        finally:
            k8s_cluster.compact()  # the version the watch resumes from is now too old
    shared_watch.SharedWatch._watch = watch_then_compact
    try:
        [event] = follow_all(k8s_cluster, ["dropped"], watch=True, poll_interval=30, timeout=60)
    finally:
        shared_watch.SharedWatch._watch = original
    assert event["status"] == "success"
    lists = [r for r in watch_requests(k8s_cluster) if "watch=" not in r[1]]
    assert len(lists) >= 2, k8s_cluster.request_log  # listed again after the 410


def test_a_missed_event_is_found_by_the_resync(k8s_cluster, monkeypatch):
    monkeypatch.setattr(shared_watch, "RESYNC_SECONDS", 2.0)
    original = shared_watch.SharedWatch._apply

    def deaf(self, event):  # this watch never hears the pod change: only a relist can tell
        if event.get("type") == "MODIFIED":
            return
        original(self, event)
    monkeypatch.setattr(shared_watch.SharedWatch, "_apply", deaf)
    create(k8s_cluster, labelled_pod("missed", 1))
    [event] = follow_all(k8s_cluster, ["missed"], watch=True, poll_interval=0.5, timeout=60)
    assert event["status"] == "success"


def test_a_role_without_list_and_watch_falls_back_to_polling_and_says_so_once(k8s_cluster, caplog):
    caplog.set_level(logging.WARNING)
    k8s_cluster.rbac_rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch", "delete"]},
                              {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}]
    for name in ("r1", "r2"):
        create_as_admin = k8s_cluster.rbac_rules
        k8s_cluster.rbac_rules = None
        create(k8s_cluster, labelled_pod(name, 2))
        k8s_cluster.rbac_rules = create_as_admin
    events = follow_all(k8s_cluster, ["r1", "r2"], watch=True, poll_interval=0.2)
    assert [e["status"] for e in events] == ["success", "success"]
    said = [r.getMessage() for r in caplog.records if "does not allow list and watch" in r.getMessage()]
    assert len(said) == 1 and "following by polling instead" in said[0]
    assert pod_reads(k8s_cluster) >= 10  # they polled


def test_a_trainjob_is_followed_from_the_watch_of_trainjobs_and_pods(k8s_cluster):
    from tests.test_launch_protocol import _manifest
    from kubernetes import client, config

    manifest = _manifest("trainjob", "tj", "import time; time.sleep(3); print('done', flush=True)")
    api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig)))
    api.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "default", "trainjobs", manifest)
    event = first_event(trigger(k8s_cluster, "tj", launcher="trainjob"), timeout=90)
    assert event["status"] == "success"
    reads = [r for r in k8s_cluster.request_log if r[0] == "GET" and r[1].endswith("/trainjobs/tj")]
    assert len(reads) <= 1  # from the cache, but for a first read before it was listed
