"""Kubernetes API access from Airflow: clients built from a cncf-kubernetes connection, and the few pod calls the
operator and the trigger make, on raw JSON.

The trigger shares one kubernetes_asyncio ApiClient (one connection pool, one TLS context) per connection and event
loop, instead of building a client, an SSL context and a TCP connection on every poll as KubernetesPodTrigger does:
at hundreds of deferred tasks that difference is most of the triggerer's CPU (FACTS.md).
"""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass
from typing import Any

from airflow_provider_lora.core.launchers.pod import LOG_CURSOR_ANNOTATION, LogCursor


@dataclass(frozen=True)
class ClusterRef:
    """How to reach the cluster: the fields of KubernetesHook, JSON-friendly so a trigger can carry them."""

    conn_id: str | None = None
    config_file: str | None = None
    cluster_context: str | None = None
    in_cluster: bool | None = None

    def hook_kwargs(self) -> dict[str, Any]:
        kwargs = {"conn_id": self.conn_id, "config_file": self.config_file, "cluster_context": self.cluster_context,
                  "in_cluster": self.in_cluster}
        return {k: v for k, v in kwargs.items() if v is not None}


# ---- sync (operator, worker) ------------------------------------------------------------------------------------

def sync_core_api(cluster: ClusterRef) -> Any:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    return KubernetesHook(**cluster.hook_kwargs()).core_v1_client


def read_pod(api: Any, name: str, namespace: str) -> dict[str, Any] | None:
    """The pod as a dict, or None when it does not exist."""
    from kubernetes.client.exceptions import ApiException

    try:
        return json.loads(api.read_namespaced_pod(name, namespace, _preload_content=False).data)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def read_log(api: Any, name: str, namespace: str, *, cursor: LogCursor | None = None,
             tail_lines: int | None = None) -> str:
    kwargs: dict[str, Any] = {"timestamps": True, "_preload_content": False}
    if cursor is not None and cursor.since_time():
        kwargs["since_time"] = cursor.since_time()
    if tail_lines is not None:
        kwargs["tail_lines"] = tail_lines
    return api.read_namespaced_pod_log(name, namespace, **kwargs).data.decode("utf-8", "replace")


def save_cursor(api: Any, name: str, namespace: str, cursor: LogCursor) -> None:
    api.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": {LOG_CURSOR_ANNOTATION: cursor.encode()}}})


def delete_pod(api: Any, name: str, namespace: str) -> bool:
    """Delete the pod; False when it was already gone."""
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_pod(name, namespace, grace_period_seconds=30)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def pod_events(api: Any, name: str, namespace: str) -> list[dict[str, Any]]:
    response = api.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}",
                                         _preload_content=False)
    return json.loads(response.data).get("items", [])


# ---- async (trigger, triggerer) -----------------------------------------------------------------------------------

_shared_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[ClusterRef, Any]]" = (
    weakref.WeakKeyDictionary())


async def shared_async_client(cluster: ClusterRef) -> Any:
    """One kubernetes_asyncio ApiClient per cluster and event loop, reused by every trigger in the process."""
    loop = asyncio.get_running_loop()
    clients = _shared_clients.setdefault(loop, {})
    if cluster not in clients:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook
        from kubernetes_asyncio import client as async_client

        hook = AsyncKubernetesHook(**cluster.hook_kwargs())
        # The hook resolves the connection (in-cluster, kubeconfig path or inline kubeconfig) into a client
        # configuration; its get_conn() would build a fresh client per call, which is what we avoid.
        await hook._load_config()
        clients[cluster] = async_client.ApiClient(configuration=hook.client_configuration)
    return clients[cluster]


async def async_json(call: Any, *args: Any, **kwargs: Any) -> Any:
    response = await call(*args, _preload_content=False, **kwargs)
    try:
        return json.loads(await response.read())
    finally:
        response.release()


async def async_text(call: Any, *args: Any, **kwargs: Any) -> str:
    response = await call(*args, _preload_content=False, **kwargs)
    try:
        return (await response.read()).decode("utf-8", "replace")
    finally:
        response.release()
