"""Kubernetes API access from Airflow: clients built from a cncf-kubernetes connection (sync for the operator, whose
calls are core.launchers.cluster's), and the few async calls the trigger makes, on raw JSON.

The trigger shares one kubernetes_asyncio ApiClient (one connection pool, one TLS context) per connection and event
loop, instead of building a client, an SSL context and a TCP connection on every poll as KubernetesPodTrigger does:
at hundreds of deferred tasks that difference is most of the triggerer's CPU (docs/performance.md, "Triggerer
load").

Credentials can be short-lived: EKS and GKE kubeconfigs get a token from an exec plugin (`aws eks get-token`, about
15 minutes; `gke-gcloud-auth-plugin`, about an hour), in-cluster and projected service-account tokens rotate. A
shared client outlives them, so it reloads them before they expire and again after a 401 (_AsyncCredentials); the
worker's sync client reloads them after a 401 (the kubernetes library itself renews an exec token before its
expirationTimestamp).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from datetime import datetime, timezone
from dataclasses import dataclass
from typing import Any

from airflow_provider_lora.core.launchers.cluster import API_TIMEOUT_SECONDS


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

log = logging.getLogger(__name__)


def sync_core_api(cluster: ClusterRef) -> Any:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    api = KubernetesHook(**cluster.hook_kwargs()).core_v1_client
    _reload_credentials_on_401(api.api_client, cluster)
    return api


def _reload_credentials_on_401(api_client: Any, cluster: ClusterRef) -> None:
    """Make every call of ``api_client`` (and of each API object built on it) that the API server answers with 401
    load the connection's credentials again and try once more. The kubernetes library renews an exec plugin's
    token only when the plugin gave an expirationTimestamp, and never re-reads a kubeconfig's token or tokenFile:
    a token that expired or rotated meanwhile is replaced here."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client.exceptions import ApiException

    call_api = api_client.call_api

    def call_with_fresh_credentials(*args: Any, **kwargs: Any) -> Any:
        try:
            return call_api(*args, **kwargs)
        except ApiException as exc:
            if exc.status != 401:
                raise
        log.info("the Kubernetes API refused the credentials (401): loading them again from %s", _source(cluster))
        fresh = KubernetesHook(**cluster.hook_kwargs()).get_conn()  # runs the exec plugin, re-reads token files
        api_client.configuration = fresh.configuration  # where every request reads its Authorization header
        fresh.close()
        return call_api(*args, **kwargs)

    api_client.call_api = call_with_fresh_credentials


def _source(cluster: ClusterRef) -> str:
    if cluster.config_file:
        return f"config_file={cluster.config_file!r}"
    return "the in-cluster service account" if cluster.in_cluster else f"kubernetes_conn_id={cluster.conn_id!r}"


# ---- async (trigger, triggerer) -----------------------------------------------------------------------------------

_shared_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[ClusterRef, Any]]" = (
    weakref.WeakKeyDictionary())
# Who uses each shared client (trigger ids): the last one to let go closes it, so no connection outlives its users
# (a dag.test() or a worker's asyncio.run ends its loop right after the one trigger it ran).
_holders: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[ClusterRef, set[int]]]" = (
    weakref.WeakKeyDictionary())


async def shared_async_client(cluster: ClusterRef, holder: object | None = None) -> Any:
    """One kubernetes_asyncio ApiClient per cluster and event loop, reused by every trigger in the process;
    ``holder`` (a trigger) keeps it open until it calls release_async_client. Its credentials renew themselves
    (see _AsyncCredentials); after a 401, call refresh_credentials."""
    loop = asyncio.get_running_loop()
    clients = _shared_clients.setdefault(loop, {})
    if cluster not in clients:
        from kubernetes_asyncio import client as async_client

        credentials = await _AsyncCredentials.load(cluster)
        clients[cluster] = async_client.ApiClient(configuration=credentials.configuration)
        _credentials[clients[cluster]] = credentials
    if holder is not None:
        _holders.setdefault(loop, {}).setdefault(cluster, set()).add(id(holder))
    return clients[cluster]


async def release_async_client(cluster: ClusterRef, holder: object) -> None:
    """``holder`` is done with the shared client; the last holder closes it."""
    loop = asyncio.get_running_loop()
    holders = _holders.get(loop, {}).get(cluster)
    if holders is None or id(holder) not in holders:
        return
    holders.discard(id(holder))
    if not holders and cluster in _shared_clients.get(loop, {}):
        await _shared_clients[loop].pop(cluster).close()


async def close_shared_clients() -> None:
    """Close the clients of the running loop; for callers whose loop ends (a worker's asyncio.run, tests)."""
    loop = asyncio.get_running_loop()
    _holders.pop(loop, None)
    for client in _shared_clients.pop(loop, {}).values():
        await client.close()


async def refresh_credentials(api_client: Any, since: float | None = None) -> None:
    """The API server refused ``api_client``'s credentials (401): load them again, unless that already happened
    after ``since`` (time.monotonic() when the refused request started), as when many triggers see one expiry."""
    credentials = _credentials.get(api_client)
    if credentials is not None:
        await credentials.refresh(force_since=time.monotonic() if since is None else since)


async def call_with_fresh_credentials(api_client: Any, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``await call(*args, **kwargs)``, made once more with reloaded credentials when it is answered 401."""
    started = time.monotonic()
    try:
        return await call(*args, **kwargs)
    except Exception as exc:
        if getattr(exc, "status", None) != 401:
            raise
    await refresh_credentials(api_client, since=started)
    return await call(*args, **kwargs)


_credentials: "weakref.WeakKeyDictionary[Any, _AsyncCredentials]" = weakref.WeakKeyDictionary()
# The longest a shared client goes without reloading its credentials (a kubeconfig's token or tokenFile, an exec
# plugin that gives no expirationTimestamp); an exec token with an expiry is renewed by kubernetes_asyncio from 5
# minutes before it, and checked at least twice in its remaining life.
CREDENTIAL_RECHECK_SECONDS = 60.0


class _AsyncCredentials:
    """The credentials of one shared client, kept fresh by kubernetes_asyncio's own mechanisms: its kubeconfig
    loader (re-runs an exec plugin from 5 minutes before the token's expirationTimestamp, re-reads token and
    tokenFile) and in-cluster loader (re-reads the service-account token every minute), driven from the
    configuration's refresh_api_key_hook, which the client awaits before each request. The hook costs a clock read
    until a reload is due; one reload runs at a time, and concurrent requests wait for it."""

    def __init__(self, cluster: ClusterRef, configuration: Any, loader: Any | None):
        self.cluster, self.configuration, self.loader = cluster, configuration, loader  # loader None: in-cluster
        self._lock = asyncio.Lock()
        self._loaded_at = time.monotonic()
        self._due = self._loaded_at + self._recheck_in()
        if loader is not None:  # the in-cluster loader installs its own hook
            configuration.refresh_api_key_hook = self._before_request

    @classmethod
    async def load(cls, cluster: ClusterRef) -> "_AsyncCredentials":
        from kubernetes_asyncio import client as async_client

        configuration = async_client.Configuration()
        return cls(cluster, configuration, await _load_async_config(cluster, configuration))

    def _recheck_in(self) -> float:
        expiry = getattr(self.loader, "exec_plugin_expiry", None)
        if expiry is None:
            return CREDENTIAL_RECHECK_SECONDS
        left = (expiry - datetime.now(timezone.utc)).total_seconds()
        return max(0.0, min(CREDENTIAL_RECHECK_SECONDS, left / 2))

    async def _before_request(self, configuration: Any) -> None:
        if time.monotonic() >= self._due:
            await self.refresh()

    async def refresh(self, force_since: float | None = None) -> None:
        async with self._lock:
            if force_since is None and time.monotonic() < self._due:
                return  # another request reloaded them while this one waited
            if force_since is not None and self._loaded_at > force_since:
                return  # reloaded after the refused request started: those are new already
            if force_since is not None:
                log.info("the Kubernetes API refused the credentials (401): loading them again from %s",
                         _source(self.cluster))
            await self._reload(force=force_since is not None)
            self._loaded_at = time.monotonic()
            self._due = self._loaded_at + self._recheck_in()

    async def _reload(self, force: bool) -> None:
        from kubernetes_asyncio import config as async_config

        if self.loader is None:
            async_config.load_incluster_config(client_configuration=self.configuration)
            return
        if force and hasattr(self.loader, "exec_plugin_expiry"):
            del self.loader.exec_plugin_expiry  # refused before its stated expiry: the loader would keep it
        await self.loader.load_and_set(self.configuration)


async def _load_async_config(cluster: ClusterRef, configuration: Any) -> Any:
    """Load the cluster's address and credentials into ``configuration``, resolved as AsyncKubernetesHook resolves
    a connection (in_cluster, kube_config_path, inline kube_config, else the default kubeconfig; config_file wins
    over the connection). Returns the kubeconfig loader that can load them again, or None in-cluster. The hook's
    own loading keeps no loader (it re-runs an exec plugin on every call instead), hence its fields only here."""
    from kubernetes_asyncio import config as async_config

    context, inline, path = cluster.cluster_context, None, cluster.config_file
    if not path:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

        hook = AsyncKubernetesHook(**cluster.hook_kwargs())
        in_cluster = hook._coalesce_param(cluster.in_cluster, await hook._get_field("in_cluster"))
        context = hook._coalesce_param(context, await hook._get_field("cluster_context"))
        path, inline = await hook._get_field("kube_config_path"), await hook._get_field("kube_config")
        if sum(1 for source in (in_cluster, path, inline) if source) > 1:
            raise ValueError(f"kubernetes_conn_id={cluster.conn_id!r} sets more than one of in_cluster, "
                             "kube_config_path and kube_config: set one")
        if in_cluster:
            async_config.load_incluster_config(client_configuration=configuration)
            return None
    if inline:
        import yaml

        config_dict = inline if isinstance(inline, dict) else yaml.safe_load(inline)
        return await async_config.load_kube_config_from_dict(config_dict, context=context,
                                                             client_configuration=configuration)
    # persist_config=False: never write refreshed credentials back into someone's kubeconfig file.
    return await async_config.load_kube_config(config_file=path or None, context=context,
                                               client_configuration=configuration, persist_config=False)


async def _read_checked(response: Any) -> bytes:
    """The body of a raw (``_preload_content=False``) response; an ApiException for a 4xx/5xx answer, as the
    client raises only when it parses responses itself."""
    try:
        body = await response.read()
    finally:
        response.release()
    if response.status >= 400:
        from kubernetes_asyncio.client.exceptions import ApiException

        error = ApiException(status=response.status, reason=response.reason)
        error.body, error.headers = body.decode("utf-8", "replace"), dict(response.headers)
        raise error
    return body


async def async_json(call: Any, *args: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("_request_timeout", API_TIMEOUT_SECONDS)
    return json.loads(await _read_checked(await call(*args, _preload_content=False, **kwargs)))


async def async_pod_log(api_client: Any, name: str, namespace: str, since_time: str | None = None) -> str:
    """The pod's log with timestamps, from ``since_time`` (RFC3339) on. The generated clients have no sinceTime
    parameter (only the relative sinceSeconds, which a clock skew would turn into gaps), so the call is spelled
    out with the API's own query parameter."""
    query = [("timestamps", "true")] + ([("sinceTime", since_time)] if since_time else [])
    response = await api_client.call_api(
        "/api/v1/namespaces/{namespace}/pods/{name}/log", "GET", path_params={"name": name, "namespace": namespace},
        query_params=query, header_params={"Accept": "text/plain"}, auth_settings=["BearerToken"],
        _preload_content=False, _return_http_data_only=True, _request_timeout=API_TIMEOUT_SECONDS)
    return (await _read_checked(response)).decode("utf-8", "replace")


# ---- TrainJobs (Kubeflow Trainer) --------------------------------------------------------------------------------

async def async_trainjob(api_client: Any, name: str, namespace: str) -> dict[str, Any]:
    from kubernetes_asyncio.client import CustomObjectsApi

    from airflow_provider_lora.core.render import TRAINJOB_GROUP, TRAINJOB_PLURAL, TRAINJOB_VERSION

    return await async_json(CustomObjectsApi(api_client).get_namespaced_custom_object, TRAINJOB_GROUP,
                            TRAINJOB_VERSION, namespace, TRAINJOB_PLURAL, name)


async def async_delete_trainjob(api_client: Any, name: str, namespace: str, options: Any = None) -> None:
    """Delete the TrainJob and, before it goes, its pods; ``options``: V1DeleteOptions (preconditions)."""
    from kubernetes_asyncio.client import CustomObjectsApi

    from airflow_provider_lora.core.render import TRAINJOB_GROUP, TRAINJOB_PLURAL, TRAINJOB_VERSION

    await CustomObjectsApi(api_client).delete_namespaced_custom_object(
        TRAINJOB_GROUP, TRAINJOB_VERSION, namespace, TRAINJOB_PLURAL, name, propagation_policy="Foreground",
        body=options)
