"""LoRATrainingTrigger: follows a training pod from the triggerer, copying its log lines into the task log, and
fires exactly one event when the pod reaches a terminal state (or is stuck, or the API keeps failing).

The log cursor lives in a pod annotation, so a restarted triggerer continues where the last one stopped: no line is
shown twice and none is skipped.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

# Imported here, not in run(): the triggerer loads this module once, while an import inside run() would block its
# event loop (about 0.3 s) the first time a trigger starts.
from kubernetes_asyncio.client import CoreV1Api

from airflow_provider_lora.compat import BaseTrigger, TriggerEvent
from airflow_provider_lora.core.launchers.pod import (
    LOG_CURSOR_ANNOTATION, PENDING, STUCK_WAITING_REASONS, SUCCEEDED, LogCursor, classify_pod, new_log_lines,
    seconds_since,
)
from airflow_provider_lora.kube import ClusterRef, async_json, async_pod_log, shared_async_client

# Consecutive failed API calls tolerated (with backoff) before the trigger gives up with an error event.
MAX_API_FAILURES = 5


class LoRATrainingTrigger(BaseTrigger):
    """Poll the pod ``pod_name`` in ``namespace`` every ``poll_interval`` seconds.

    Events (``event["status"]``): ``success``; ``failed`` with ``reason`` (exit code, OOMKilled, Evicted,
    DeadlineExceeded, NodeLost, Deleted) and ``description``; ``stuck`` when the pod is still not running
    ``startup_timeout`` seconds after its creation (sooner for a reason waiting does not clear, such as
    InvalidImageName: see STUCK_WAITING_REASONS), with the reason and the pod's events; ``error`` when the API
    failed (or did not answer within API_TIMEOUT_SECONDS) ``MAX_API_FAILURES`` times in a row.
    """

    def __init__(self, *, pod_name: str, namespace: str, kubernetes_conn_id: str | None = None,
                 config_file: str | None = None, cluster_context: str | None = None, in_cluster: bool | None = None,
                 poll_interval: float = 10.0, startup_timeout: float = 600.0, stream_logs: bool = True):
        super().__init__()
        self.pod_name = pod_name
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.config_file = config_file
        self.cluster_context = cluster_context
        self.in_cluster = in_cluster
        self.poll_interval = poll_interval
        self.startup_timeout = startup_timeout
        self.stream_logs = stream_logs

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "pod_name": self.pod_name, "namespace": self.namespace, "kubernetes_conn_id": self.kubernetes_conn_id,
            "config_file": self.config_file, "cluster_context": self.cluster_context, "in_cluster": self.in_cluster,
            "poll_interval": self.poll_interval, "startup_timeout": self.startup_timeout,
            "stream_logs": self.stream_logs,
        })

    @property
    def cluster(self) -> ClusterRef:
        return ClusterRef(self.kubernetes_conn_id, self.config_file, self.cluster_context, self.in_cluster)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        identity = {"pod_name": self.pod_name, "namespace": self.namespace}
        failures = 0
        cursor: LogCursor | None = None
        while True:
            try:
                api = CoreV1Api(await shared_async_client(self.cluster))
                pod = await async_json(api.read_namespaced_pod, self.pod_name, self.namespace)
                if cursor is None:
                    cursor = LogCursor.of(pod)
                state = classify_pod(pod)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API or the network; retried, then reported
                failures += 1
                if _status(exc) == 404:
                    yield TriggerEvent({**identity, "status": "failed", "reason": "Deleted",
                                        "description": "the pod no longer exists (deleted by someone else?)"})
                    return
                if failures >= MAX_API_FAILURES:
                    yield TriggerEvent({**identity, "status": "error",
                                        "description": f"{MAX_API_FAILURES} Kubernetes API calls in a row failed; "
                                                       f"last: {type(exc).__name__}: {exc or 'no answer'}"})
                    return
                self.log.warning("Kubernetes API call failed (%s/%s): %s", failures, MAX_API_FAILURES, exc)
                await asyncio.sleep(max(_retry_after(exc), min(self.poll_interval, 2 ** failures)))
                continue

            if self.stream_logs and state.phase != PENDING:
                cursor = await self._copy_new_log_lines(api, cursor)
            if state.terminal:
                status = "success" if state.phase == SUCCEEDED else "failed"
                yield TriggerEvent({**identity, "status": status, "reason": state.reason,
                                    "description": state.describe(), "exit_code": state.exit_code})
                return
            if state.phase == PENDING:
                waited = seconds_since(pod["metadata"].get("creationTimestamp"))
                limit = min(self.startup_timeout, STUCK_WAITING_REASONS[state.reason]) if state.stuck else \
                    self.startup_timeout
                if waited > limit:
                    # Kubernetes keeps retrying (image pulls, scheduling); the task stops waiting here.
                    why = (f"{state.reason} does not clear by waiting" if state.stuck else
                           f"startup_timeout={self.startup_timeout:.0f}s")
                    events = await self._event_messages(api)
                    yield TriggerEvent({**identity, "status": "stuck", "reason": state.reason or "Pending",
                                        "description": f"not running {waited:.0f}s after creation ({why}): "
                                                       f"{state.describe()}; events: {events}"})
                    return
            await asyncio.sleep(self.poll_interval)

    async def _copy_new_log_lines(self, api: Any, cursor: LogCursor) -> LogCursor:
        """Copy the log lines after ``cursor`` into the task log and save the new cursor on the pod. Logs are a
        courtesy: when they cannot be read (a lost node's kubelet, say) the pod's status still decides."""
        try:
            text = await async_pod_log(api.api_client, self.pod_name, self.namespace, cursor.since_time())
        except Exception as exc:
            self.log.warning("could not read the log of %s: %s", self.pod_name, exc)
            return cursor
        new = new_log_lines(text, cursor)
        for line in new.lines:
            self.log.info("[%s] %s", self.pod_name, line)
        if new.lines:
            try:
                await api.patch_namespaced_pod(self.pod_name, self.namespace, {
                    "metadata": {"annotations": {LOG_CURSOR_ANNOTATION: new.cursor.encode()}}})
            except Exception as exc:  # the lines are shown; a restart might show them again
                self.log.warning("could not save the log cursor on %s: %s", self.pod_name, exc)
        return new.cursor

    async def _event_messages(self, api: Any) -> str:
        try:
            events = await async_json(api.list_namespaced_event, self.namespace,
                                      field_selector=f"involvedObject.name={self.pod_name}")
        except Exception as exc:  # events are a courtesy; the reason is already known
            return f"(could not list events: {exc})"
        return "; ".join(f"{e.get('reason')}: {e.get('message')}" for e in events.get("items", [])) or "none"

    async def on_kill(self) -> None:
        """Airflow 3.3+: the user killed, cleared or marked the deferred task: stop the training."""
        api = CoreV1Api(await shared_async_client(self.cluster))
        try:
            await api.delete_namespaced_pod(self.pod_name, self.namespace, grace_period_seconds=30)
            self.log.info("deleted pod %s/%s", self.namespace, self.pod_name)
        except Exception as exc:
            if _status(exc) != 404:
                raise


def _status(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


def _retry_after(exc: Exception) -> float:
    """Seconds a 429/503 answer asks us to wait (Retry-After), else 0."""
    value = (getattr(exc, "headers", None) or {}).get("Retry-After", "0")
    return float(value) if str(value).replace(".", "", 1).isdigit() else 0.0

