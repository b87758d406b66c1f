"""A shared watch (what Kubernetes controllers call an informer), in the triggerer process: one list and one watch per
(cluster, namespace, resource) of the objects this provider launched (its managed-by label), however many triggers
follow them. Each LoRATrainingTrigger reads its object from the watch's cache and wakes when it changes, instead of
reading it from the API server every poll_interval: at 1,000 deferred trainings, one open request per namespace
instead of 100 requests a second.

How the cache is kept (the client-go reflector's protocol, Kubernetes API concepts, "Efficient detection of
changes"): list, then watch from the list's resourceVersion with bookmarks; each watch request ends server-side
after WATCH_TIMEOUT_SECONDS and is re-opened from the last version seen; a 410 Gone (the version is too old) means
list again; a dropped connection or an error is retried with backoff; and every RESYNC_SECONDS the whole list is
read again, so a missed event cannot strand a trigger (level-triggered, as controllers are). A trigger also looks
at its object every poll_interval from the cache, so time-based verdicts (startup timeout, deadline) still run.

When the Role does not allow list or watch (403), the watch says so once and stays unavailable: its triggers poll,
as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from typing import Any, Iterable

from airflow_provider_lora.core.render import (LABEL_MANAGED_BY, MANAGED_BY, TRAINJOB_GROUP, TRAINJOB_PLURAL,
                                               TRAINJOB_VERSION)
from airflow_provider_lora.kube import (ClusterRef, async_json, refresh_credentials, release_async_client,
                                        shared_async_client)

log = logging.getLogger(__name__)

PODS, TRAINJOBS = "pods", "trainjobs"
SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
RESYNC_SECONDS = 300.0  # a full list again: what a missed event could have hidden is found within this
WATCH_TIMEOUT_SECONDS = 290  # each watch request, ended by the server (client-go picks 5-10 minutes)
MAX_BACKOFF_SECONDS = 30.0


class SharedWatch:
    """The cached objects of ``resource`` ("pods" or "trainjobs") with this provider's label in ``namespace``."""

    def __init__(self, cluster: ClusterRef, namespace: str, resource: str):
        self.cluster, self.namespace, self.resource = cluster, namespace, resource
        self.objects: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()  # set by the first list (or once the watch is known to be unavailable)
        self.unavailable: str | None = None  # why the triggers must poll instead
        self.requests = 0  # list and watch requests made: the benchmark's and the tests' count
        self._version: str | None = None
        self._listed_at = 0.0
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task | None = None

    def __str__(self) -> str:
        return f"the watch of {self.resource} in namespace {self.namespace}"

    @property
    def usable(self) -> bool:
        return self.synced.is_set() and self.unavailable is None

    async def wait_for_change(self, names: Iterable[str], timeout: float) -> None:
        """Return when one of ``names`` changes (added, modified, deleted, or relisted), or after ``timeout``."""
        event = asyncio.Event()
        names = list(names)
        for name in names:
            self._waiters[name].add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            for name in names:
                self._waiters[name].discard(event)
                if not self._waiters[name]:
                    del self._waiters[name]

    # ---- keeping the cache -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=str(self))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await release_async_client(self.cluster, self)

    async def _run(self) -> None:
        failures, client = 0, None
        while True:
            try:
                client = await shared_async_client(self.cluster, holder=self)
                if self._version is None or time.monotonic() - self._listed_at > RESYNC_SECONDS:
                    await self._list(client)
                await self._watch(client)  # returns when the server ends the request: watch again
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status = getattr(exc, "status", None)
                if status == 410:  # the version is too old for the server: list again
                    self._version = None
                    continue
                if status == 401 and client is not None:  # a short-lived token expired: reload it, go on
                    await refresh_credentials(client)
                if status == 403:
                    self.unavailable = (f"the Kubernetes Role does not allow list and watch on {self.resource} in "
                                        f"namespace {self.namespace}: following by polling instead")
                    self.synced.set()
                    self._notify(list(self._waiters))
                    return
                failures += 1
                log.warning("%s failed (%s); again in %ss", self, exc, min(MAX_BACKOFF_SECONDS, 2 ** failures))
                await asyncio.sleep(min(MAX_BACKOFF_SECONDS, 2 ** failures))

    def _path(self) -> str:
        if self.resource == TRAINJOBS:
            return f"/apis/{TRAINJOB_GROUP}/{TRAINJOB_VERSION}/namespaces/{self.namespace}/{TRAINJOB_PLURAL}"
        return f"/api/v1/namespaces/{self.namespace}/pods"

    async def _list(self, client: Any) -> None:
        self.requests += 1
        listed = await async_json(client.call_api, self._path(), "GET", query_params=[("labelSelector", SELECTOR)],
                                  header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
                                  _return_http_data_only=True)
        objects = {o["metadata"]["name"]: o for o in listed.get("items") or []}
        changed = [n for n in set(objects) | set(self.objects) if objects.get(n) != self.objects.get(n)]
        self.objects, self._version = objects, listed["metadata"]["resourceVersion"]
        self._listed_at = time.monotonic()
        self.synced.set()
        self._notify(changed)

    async def _watch(self, client: Any) -> None:
        from airflow_provider_lora.kube import _read_checked

        self.requests += 1
        # The server ends the request by the next resync, however quiet the watch is.
        until_resync = RESYNC_SECONDS - (time.monotonic() - self._listed_at)
        timeout = max(1, min(WATCH_TIMEOUT_SECONDS, int(until_resync)))
        query = [("labelSelector", SELECTOR), ("watch", "true"), ("allowWatchBookmarks", "true"),
                 ("resourceVersion", self._version), ("timeoutSeconds", str(timeout))]
        response = await client.call_api(self._path(), "GET", query_params=query,
                                         header_params={"Accept": "application/json"},
                                         auth_settings=["BearerToken"], _preload_content=False,
                                         _return_http_data_only=True,
                                         _request_timeout=timeout + 30)
        if response.status >= 400:
            await _read_checked(response)  # raises the API's error
        pending = b""
        try:
            # One JSON event per line; read in chunks, as a line (a pod with a long command) can outgrow aiohttp's
            # readline limit.
            async for chunk in response.content.iter_any():
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if line.strip():
                        self._apply(json.loads(line))
        finally:
            response.release()

    def _apply(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":  # the server's Status, e.g. 410 Expired for a version it no longer keeps
            error = RuntimeError(obj.get("message") or "watch error")
            error.status = obj.get("code")  # type: ignore[attr-defined]
            raise error
        self._version = obj.get("metadata", {}).get("resourceVersion") or self._version
        if kind == "BOOKMARK":
            return
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.objects.pop(name, None)
        else:
            self.objects[name] = obj
        self._notify([name])

    def _notify(self, names: Iterable[str]) -> None:
        for name in names:
            for event in self._waiters.get(name, ()):
                event.set()


# ---- one watch per (cluster, namespace, resource) and event loop, shared by the triggers -----------------------------

_watches: dict[tuple[ClusterRef, str, str], SharedWatch] = {}
_holders: dict[tuple[ClusterRef, str, str], set[int]] = defaultdict(set)


async def acquire(cluster: ClusterRef, namespace: str, resource: str, holder: object) -> SharedWatch:
    """The shared watch, started by its first holder; call release() when done with it."""
    key = (cluster, namespace, resource)
    watch = _watches.get(key)
    if watch is None or watch._task is None or watch._task.get_loop() is not asyncio.get_running_loop():
        watch = _watches[key] = SharedWatch(cluster, namespace, resource)
        _holders[key] = set()
        watch.start()
    _holders[key].add(id(holder))
    return watch


async def release(watch: SharedWatch, holder: object) -> None:
    """``holder`` is done; the last one stops the watch."""
    key = (watch.cluster, watch.namespace, watch.resource)
    holders = _holders.get(key, set())
    holders.discard(id(holder))
    if not holders and _watches.get(key) is watch:
        del _watches[key]
        _holders.pop(key, None)
        await watch.stop()
