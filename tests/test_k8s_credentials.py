"""Short-lived cluster credentials, as EKS and GKE kubeconfigs give them: an exec credential plugin issues tokens that
expire (here after a few seconds), and the emulated API server answers 401 to an expired one. The trigger's shared
async client renews its token before it expires and after a 401; the worker's sync client after a 401. A deferred
training that outlives several tokens succeeds."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import time

import pytest

from airflow_provider_lora import kube
from airflow_provider_lora.core.launchers.cluster import LaunchedPod, for_manifest
from airflow_provider_lora.kube import ClusterRef, close_shared_clients
from tests.k8s.emulator import Cluster
from tests.k8s.exec_credential import sign, verify
from tests.test_pod_launcher import cheap_pod, quiet

LIFETIME = 2.0  # seconds a token is valid


def use_connection(monkeypatch, cluster: Cluster) -> ClusterRef:
    """An Airflow connection to the emulated cluster, as a user configures one (kube_config_path)."""
    monkeypatch.setenv("AIRFLOW_CONN_K8S_EXEC", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(cluster.kubeconfig)}}))
    return ClusterRef(conn_id="k8s_exec")


@pytest.fixture
def exec_cluster(tmp_path):
    cluster = Cluster(tmp_path / "k8s", token_lifetime=LIFETIME)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def silent_exec_cluster(tmp_path):
    """Its plugin gives no expirationTimestamp: a client learns of the expiry only from the 401."""
    cluster = Cluster(tmp_path / "k8s", token_lifetime=LIFETIME, token_expiry_in_credential=False)
    try:
        yield cluster
    finally:
        cluster.stop()


def verdicts(cluster: Cluster) -> list[str]:
    return [verdict for _, verdict in cluster.auth_log]


def accepted_tokens(cluster: Cluster) -> list[str]:
    return list(dict.fromkeys(token for token, verdict in cluster.auth_log if verdict == "ok"))


def expiry_of(token: str) -> float:
    return int(token.split(".")[1]) / 1000


# ---- the emulator's side -------------------------------------------------------------------------------------

def test_the_emulator_accepts_only_unexpired_tokens_its_exec_plugin_issued(exec_cluster):
    import subprocess
    import sys

    import urllib3
    import yaml

    user = yaml.safe_load(exec_cluster.kubeconfig.read_text())["users"][0]["user"]
    assert set(user) == {"exec"} and user["exec"]["apiVersion"] == "client.authentication.k8s.io/v1"
    out = subprocess.run([user["exec"]["command"], *user["exec"]["args"]], capture_output=True, text=True,
                         check=True).stdout
    credential = json.loads(out)
    assert credential["kind"] == "ExecCredential"
    token = credential["status"]["token"]
    expires = datetime.datetime.fromisoformat(credential["status"]["expirationTimestamp"].replace("Z", "+00:00"))
    assert 0 < expires.timestamp() - time.time() <= LIFETIME

    http = urllib3.PoolManager(ca_certs=str(exec_cluster.ca_file))

    def get(bearer: str) -> urllib3.BaseHTTPResponse:
        return http.request("GET", exec_cluster.url + "/api/v1/namespaces/default/pods",
                            headers={"Authorization": f"Bearer {bearer}"})

    assert get(token).status == 200
    forged = sign(os.urandom(32), int((time.time() + 60) * 1000), "x")  # well-formed, someone else's key
    for refused in (exec_cluster.token, forged, ""):  # the fixed token no longer works either
        answer = get(refused)
        assert answer.status == 401
        assert json.loads(answer.data) | {"details": {}} == {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "Unauthorized",
            "reason": "Unauthorized", "details": {}, "code": 401}
    time.sleep(max(0.0, expiry_of(token) - time.time()) + 0.05)
    assert get(token).status == 401
    assert verdicts(exec_cluster)[-1] == "expired"
    assert verify(b"k", sign(b"k", int(time.time() * 1000) + 5000, "n")) == "ok"


# ---- the worker's sync client ----------------------------------------------------------------------------------

def test_the_sync_client_survives_an_expired_token(silent_exec_cluster, monkeypatch):
    """The operator's own calls (create, read, log, delete) each outlive a token: with no expirationTimestamp the
    kubernetes library never renews it, so each is refused once (401) and made again with a fresh one."""
    cluster = silent_exec_cluster
    api = kube.sync_core_api(use_connection(monkeypatch, cluster))

    def after_expiry() -> None:
        latest = accepted_tokens(cluster)[-1]
        time.sleep(max(0.0, expiry_of(latest) - time.time()) + 0.1)

    pod = LaunchedPod(api, "p", "default", cheap_pod("p", "print('hello')"))
    assert pod.read() is None  # loads the first token
    after_expiry()
    assert pod.create() is True
    cluster.wait_for_pod("default", "p")
    after_expiry()
    assert pod.read()["status"]["phase"] == "Succeeded"
    after_expiry()
    assert "hello" in pod.log_tail("p", 5)
    after_expiry()
    assert pod.delete() is True
    assert verdicts(cluster).count("expired") == 4  # each call after an expiry: refused once, then renewed
    assert len(accepted_tokens(cluster)) == 5


# ---- the trigger's shared async client ---------------------------------------------------------------------------

def test_the_shared_async_client_renews_its_token_before_it_expires(exec_cluster, monkeypatch):
    cluster_ref = use_connection(monkeypatch, exec_cluster)

    async def poll_for(seconds: float) -> int:
        from kubernetes_asyncio.client import CoreV1Api

        calls, deadline = 0, time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                api = CoreV1Api(await kube.shared_async_client(cluster_ref))
                await kube.async_json(api.list_namespaced_pod, "default")
                calls += 1
                await asyncio.sleep(0.1)
        finally:
            await close_shared_clients()
        return calls

    calls = asyncio.run(poll_for(4 * LIFETIME))
    tokens = accepted_tokens(exec_cluster)
    assert "expired" not in verdicts(exec_cluster)  # renewed ahead of time, never refused
    assert expiry_of(tokens[-1]) - expiry_of(tokens[0]) >= 3 * LIFETIME  # one client, four tokens' lifetimes
    issued = exec_cluster.issued_tokens_file.read_text().count("\n")
    assert issued <= calls / 3  # the plugin runs when a token is due, not on every request


def test_the_trigger_follows_a_pod_through_tokens_it_learns_expired_from_a_401(silent_exec_cluster, monkeypatch,
                                                                               caplog):
    from airflow_provider_lora.triggers.lora import LoRATrainingTrigger

    caplog.set_level(logging.INFO)
    cluster = silent_exec_cluster
    api = kube.sync_core_api(use_connection(monkeypatch, cluster))
    for_manifest(api, cheap_pod("slow", "import time\nfor i in range(5):\n    print(i, flush=True)\n"
                                             f"    time.sleep({LIFETIME})")).create()
    trigger = quiet(LoRATrainingTrigger(name="slow", namespace="default", kubernetes_conn_id="k8s_exec",
                                        poll_interval=0.2))

    async def first_event() -> dict:
        try:
            async for event in trigger.run():
                return event.payload
        finally:
            await close_shared_clients()

    event = asyncio.run(asyncio.wait_for(first_event(), 60))
    assert event["status"] == "success", event
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("[slow] ")] == [
        f"[slow] {i}" for i in range(5)]
    assert verdicts(cluster).count("expired") >= 3  # it outlived (at least) three tokens, each refused once


# ---- a deferred training, operator and trigger --------------------------------------------------------------------

@pytest.mark.slow
def test_a_deferred_training_outlives_three_exec_plugin_tokens(exec_cluster, monkeypatch, airflow_db, tiny_model_dir,
                                                               tmp_path, s3_endpoint, s3_bucket):
    from airflow_provider_lora.compat import DAG
    from tests.fixtures.airflow import run_dag_test
    from tests.test_operator_pod import SAFE_ENV, operator
    from tests.trainer_helpers import arithmetic_rows, write_jsonl

    exec_cluster.base_env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
    exec_cluster.create_secret("default", "s3-creds", {"id": "testing-key", "secret": "testing-secret"})
    monkeypatch.setenv("AIRFLOW_CONN_K8S_EMU", json.dumps(  # the connection test_operator_pod's operator uses
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(exec_cluster.kubeconfig)}}))
    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))
    with DAG("lora_exec_tokens", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        operator(tiny_model_dir, dataset, f"s3://{s3_bucket}/runs/exec-tokens", s3_endpoint, deferrable=True,
                 on_finish_action="delete_pod", log_interval=0.5)  # log reads while the tokens expire
    started = time.time()
    run = run_dag_test(dag)
    assert run.state == "success"
    ti = next(t for t in run.get_task_instances() if t.task_id == "train")
    assert ti.xcom_pull(task_ids="train")["summary"]["global_step"] == 4
    tokens = accepted_tokens(exec_cluster)
    assert "expired" not in verdicts(exec_cluster)
    # The training outlived at least three tokens, each one accepted only until its expiry.
    assert time.time() - started > 3 * LIFETIME
    assert expiry_of(tokens[-1]) - expiry_of(tokens[0]) >= 3 * LIFETIME
    log_reads = [r for r in exec_cluster.request_log if r[1].endswith("/log")]
    assert len(log_reads) >= 3  # the trigger followed the log meanwhile
    assert exec_cluster.pods() == []
