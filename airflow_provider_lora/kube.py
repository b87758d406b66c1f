"""Kubernetes API access from Airflow: clients built from a cncf-kubernetes connection, and the few pod calls the
operator and the trigger make, on raw JSON.

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


def read_pod(api: Any, name: str, namespace: str) -> dict[str, Any] | None:
    """The pod as a dict, or None when it does not exist."""
    from kubernetes.client.exceptions import ApiException

    try:
        return json.loads(api.read_namespaced_pod(name, namespace, _preload_content=False).data)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def read_log_tail(api: Any, name: str, namespace: str, lines: int) -> str:
    """The last ``lines`` lines of the pod's log, each prefixed with its timestamp."""
    response = api.read_namespaced_pod_log(name, namespace, timestamps=True, tail_lines=lines, _preload_content=False)
    return response.data.decode("utf-8", "replace")


# Answers worth another try (throttling, a restarting or overloaded API server), the attempts a sync call gets, and
# the longest wait between them.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
SYNC_ATTEMPTS = 4
MAX_BACKOFF_SECONDS = 8.0


def create_pod(api: Any, manifest: dict[str, Any]) -> bool:
    """Create the pod, retrying throttling, server errors and timeouts with backoff; False when a pod of that name
    already exists (another try made it, or an earlier attempt of this call did before its answer was lost)."""
    from kubernetes.client.exceptions import ApiException

    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    try:
        call_with_retries(f"create pod {namespace}/{name}", api.create_namespaced_pod, namespace, manifest)
        return True
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise


class KubernetesApiError(RuntimeError):
    """A Kubernetes API call still failed after SYNC_ATTEMPTS tries."""


def call_with_retries(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` with a request timeout, retried on RETRY_STATUSES and network errors with
    exponential backoff (a Retry-After header wins); other API errors (404, 409, 422, ...) are raised at once."""
    import time

    import urllib3
    from kubernetes.client.exceptions import ApiException

    for attempt in range(1, SYNC_ATTEMPTS + 1):
        try:
            return call(*args, _request_timeout=API_TIMEOUT_SECONDS, **kwargs)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            status = getattr(exc, "status", None)
            if isinstance(exc, ApiException) and status not in RETRY_STATUSES:
                raise
            if attempt == SYNC_ATTEMPTS:
                raise KubernetesApiError(f"{what}: the Kubernetes API failed {SYNC_ATTEMPTS} times; last: "
                                         f"{describe_api_error(exc)}") from exc
            headers = getattr(exc, "headers", None) or {}
            retry_after = str(headers.get("Retry-After", ""))
            wait = float(retry_after) if retry_after.isdigit() else min(MAX_BACKOFF_SECONDS, 2.0 ** (attempt - 1))
            time.sleep(wait)


def describe_api_error(exc: Exception) -> str:
    """``(500) Internal error occurred: ...``: the status and the API's own message, not the raw response dump."""
    status, body = getattr(exc, "status", None), getattr(exc, "body", None)
    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError):
        message = None
    return f"({status}) {message or getattr(exc, 'reason', '')}" if status else f"{type(exc).__name__}: {exc}"


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


# A request the API server does not answer within this many seconds counts as a failed call (retried, then
# reported); without it a hung connection would stall a trigger for ever.
API_TIMEOUT_SECONDS = 30.0


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

def _custom_api(core_api: Any) -> Any:
    from kubernetes.client import CustomObjectsApi

    return CustomObjectsApi(core_api.api_client)  # the same connection as the core API


def create_trainjob(core_api: Any, manifest: dict[str, Any]) -> None:
    """Create a TrainJob with strict field validation: a field the installed Trainer does not know is an error,
    not silently dropped (the pod customisation field changed with every Trainer release)."""
    from airflow_provider_lora.core.render import TRAINJOB_GROUP, TRAINJOB_PLURAL, TRAINJOB_VERSION

    call_with_retries(f"create TrainJob {manifest['metadata']['namespace']}/{manifest['metadata']['name']}",
                      _custom_api(core_api).create_namespaced_custom_object, TRAINJOB_GROUP, TRAINJOB_VERSION,
                      manifest["metadata"]["namespace"], TRAINJOB_PLURAL, manifest, field_validation="Strict")


def read_trainjob(core_api: Any, name: str, namespace: str) -> dict[str, Any] | None:
    """The TrainJob as a dict, or None when it does not exist."""
    from kubernetes.client.exceptions import ApiException

    from airflow_provider_lora.core.render import TRAINJOB_GROUP, TRAINJOB_PLURAL, TRAINJOB_VERSION

    try:
        response = _custom_api(core_api).get_namespaced_custom_object(
            TRAINJOB_GROUP, TRAINJOB_VERSION, namespace, TRAINJOB_PLURAL, name, _preload_content=False)
        return json.loads(response.data)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def delete_trainjob(core_api: Any, name: str, namespace: str) -> bool:
    """Delete the TrainJob (its pods go with it); False when it was already gone."""
    from kubernetes.client.exceptions import ApiException

    from airflow_provider_lora.core.render import TRAINJOB_GROUP, TRAINJOB_PLURAL, TRAINJOB_VERSION

    try:
        _custom_api(core_api).delete_namespaced_custom_object(
            TRAINJOB_GROUP, TRAINJOB_VERSION, namespace, TRAINJOB_PLURAL, name, propagation_policy="Foreground")
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def list_pods(core_api: Any, namespace: str, label_selector: str) -> list[dict[str, Any]]:
    response = core_api.list_namespaced_pod(namespace, label_selector=label_selector, _preload_content=False)
    return json.loads(response.data)["items"]


async def async_trainjob(api_client: Any, name: str, namespace: str) -> dict[str, Any]:
    from kubernetes_asyncio.client import CustomObjectsApi

    from airflow_provider_lora.core.render import TRAINJOB_GROUP, TRAINJOB_PLURAL, TRAINJOB_VERSION

    return await async_json(CustomObjectsApi(api_client).get_namespaced_custom_object, TRAINJOB_GROUP,
                            TRAINJOB_VERSION, namespace, TRAINJOB_PLURAL, name)


async def async_delete_trainjob(api_client: Any, name: str, namespace: str) -> None:
    from kubernetes_asyncio.client import CustomObjectsApi

    from airflow_provider_lora.core.render import TRAINJOB_GROUP, TRAINJOB_PLURAL, TRAINJOB_VERSION

    await CustomObjectsApi(api_client).delete_namespaced_custom_object(
        TRAINJOB_GROUP, TRAINJOB_VERSION, namespace, TRAINJOB_PLURAL, name, propagation_policy="Foreground")
