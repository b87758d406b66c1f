"""LoRATrainingTrigger: follows a training run from the triggerer, a Pod or a Kubeflow TrainJob, copying its log
lines into the task log, and fires exactly one event when the run reaches a terminal state (or is stuck, or the API
keeps failing).

The log followed is the pod's own, or for a TrainJob the log of its node-rank-0 pod (which prints the result). The
log cursor lives in an annotation of that pod, so a restarted triggerer continues where the last one stopped: no line
is shown twice and none is skipped.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

# Imported here, not in run(): the triggerer loads this module once, while an import inside run() would block its
# event loop (about 0.3 s) the first time a trigger starts.
from kubernetes_asyncio.client import CoreV1Api, V1DeleteOptions, V1Preconditions

from airflow_provider_lora.compat import BaseTrigger, TriggerEvent
from airflow_provider_lora.core.launchers.cluster import (
    CLUSTER_LAUNCHERS, DEFAULT_POLL_SECONDS, DEFAULT_STARTUP_TIMEOUT, check_seconds, deferring_try, startup_verdict,
)
from airflow_provider_lora.core.launchers.pod import (
    LOG_CURSOR_ANNOTATION, PENDING, RESULT_PREFIX, SUCCEEDED, LogCursor, PodState, classify_pod, find_result,
    new_log_lines, seconds_since,
)
from airflow_provider_lora.core.launchers.trainjob import classify_trainjob, node_job_name, node_pod_selector, rank0_pod
from airflow_provider_lora import watch as shared_watch
from airflow_provider_lora.core.results import bounded_result
from airflow_provider_lora.kube import (
    ClusterRef, async_delete_trainjob, async_json, async_pod_log, async_trainjob, call_with_fresh_credentials,
    refresh_credentials, release_async_client, shared_async_client,
)

# Consecutive failed API calls tolerated (with backoff) before the trigger gives up with an error event.
MAX_API_FAILURES = 5
# Seconds between reads of the training's log (unless log_interval says otherwise, and never more often than the
# trigger looks): the task log is for a person following progress, and each read is a request per training to
# the API server (1,000 trainings: 33 requests a second at 30 s, 100 at 10 s). The result line is read at once
# when the run ends, whatever the interval.
DEFAULT_LOG_SECONDS = 30.0


class LoRATrainingTrigger(BaseTrigger):
    """Follow the Pod or TrainJob (``launcher``) ``name`` in ``namespace``: from the triggerer's shared watch
    (airflow_provider_lora/watch.py; ``watch=False``, or a Role without list/watch: by reading it) as soon as it
    changes and at least every ``poll_interval`` seconds; its log every ``log_interval`` seconds (default
    DEFAULT_LOG_SECONDS, at least ``poll_interval``) and at once when it ends.

    Events (``event["status"]``): ``success``; ``failed`` with ``reason`` (exit code, OOMKilled, Evicted,
    DeadlineExceeded, NodeLost, Deleted; for a TrainJob, the first failed node's reason) and ``description``;
    ``stuck`` when the run is still not running ``startup_timeout`` seconds after its creation (sooner for a reason
    waiting does not clear, such as InvalidImageName: see STUCK_WAITING_REASONS), with the reason and the events;
    ``error`` when the API failed (or did not answer within API_TIMEOUT_SECONDS) ``MAX_API_FAILURES`` times in a
    row; ``timeout`` when ``deadline`` (epoch seconds: the try's start + execution_timeout) passes first. Every
    event carries ``name``, ``namespace``, ``launcher`` and ``log_pod`` (the pod whose log holds the result, when
    there is one); ``success`` also carries ``result``, the trainer's result line as this trigger saw it in the log
    (history at most 500 rows), or None when it did not see it (a restarted triggerer, stream_logs=False).
    """

    def __init__(self, *, name: str, namespace: str, launcher: str = "pod", kubernetes_conn_id: str | None = None,
                 config_file: str | None = None, cluster_context: str | None = None, in_cluster: bool | None = None,
                 poll_interval: float = DEFAULT_POLL_SECONDS, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
                 stream_logs: bool = True,
                 deadline: float | None = None, log_interval: float | None = None, watch: bool = True):
        super().__init__()
        if launcher not in CLUSTER_LAUNCHERS:
            raise ValueError(f"launcher={launcher!r} is not valid: accepted: {', '.join(CLUSTER_LAUNCHERS)}")
        check_seconds("poll_interval", poll_interval)
        check_seconds("startup_timeout", startup_timeout)
        if log_interval is not None:
            check_seconds("log_interval", log_interval)
        self.name = name
        self.namespace = namespace
        self.launcher = launcher
        self.kubernetes_conn_id = kubernetes_conn_id
        self.config_file = config_file
        self.cluster_context = cluster_context
        self.in_cluster = in_cluster
        self.poll_interval = poll_interval
        self.startup_timeout = startup_timeout
        self.stream_logs = stream_logs
        self.deadline = deadline
        self.log_interval = log_interval
        self.watch = watch
        self._result: dict[str, Any] | None = None  # the result line seen in the log
        self._fired = False  # an event went out: the task resumes with it, so on_kill must not delete

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "name": self.name, "namespace": self.namespace, "launcher": self.launcher,
            "kubernetes_conn_id": self.kubernetes_conn_id, "config_file": self.config_file,
            "cluster_context": self.cluster_context, "in_cluster": self.in_cluster,
            "poll_interval": self.poll_interval, "startup_timeout": self.startup_timeout,
            "stream_logs": self.stream_logs, "deadline": self.deadline, "log_interval": self.log_interval,
            "watch": self.watch,
        })

    @property
    def cluster(self) -> ClusterRef:
        return ClusterRef(self.kubernetes_conn_id, self.config_file, self.cluster_context, self.in_cluster)

    @property
    def kind(self) -> str:
        return "pod" if self.launcher == "pod" else "TrainJob"

    async def _observe(self, api: Any, watches: dict[str, shared_watch.SharedWatch]
                       ) -> tuple[PodState, dict[str, Any], dict[str, Any] | None]:
        """(state, the launched object, the pod whose log to follow): from the shared watches' caches when they
        are usable, else from one or two reads. An object the cache lacks is read once (it may be newer than the
        cache): a 404 then means it was deleted."""
        cached = all(w.usable for w in watches.values()) and bool(watches)
        if self.launcher == "pod":
            pod = watches[shared_watch.PODS].objects.get(self.name) if cached else None
            pod = pod or await async_json(api.read_namespaced_pod, self.name, self.namespace)
            return classify_pod(pod), pod, pod
        trainjob = watches[shared_watch.TRAINJOBS].objects.get(self.name) if cached else None
        trainjob = trainjob or await async_trainjob(api.api_client, self.name, self.namespace)
        if cached:
            pods = [p for p in watches[shared_watch.PODS].objects.values() if _selected(p, node_pod_selector(self.name))]
        else:
            pods = (await async_json(api.list_namespaced_pod, self.namespace,
                                     label_selector=node_pod_selector(self.name)))["items"]
        return classify_trainjob(trainjob, pods), trainjob, rank0_pod(pods)

    async def _start_watches(self) -> dict[str, shared_watch.SharedWatch]:
        """The shared watches this trigger reads from (none with watch=False): pods, and TrainJobs for a TrainJob."""
        if not self.watch:
            return {}
        resources = [shared_watch.PODS] + ([shared_watch.TRAINJOBS] if self.launcher == "trainjob" else [])
        watches = {r: await shared_watch.acquire(self.cluster, self.namespace, r, holder=self) for r in resources}
        for w in watches.values():
            try:
                await asyncio.wait_for(w.synced.wait(), self.poll_interval)
            except asyncio.TimeoutError:  # not listed yet: read directly meanwhile
                pass
            if w.unavailable and w.unavailable not in _said:
                _said.add(w.unavailable)
                self.log.warning("%s", w.unavailable)
        return watches

    async def run(self) -> AsyncIterator[TriggerEvent]:
        watches: dict[str, shared_watch.SharedWatch] = {}
        try:
            watches = await self._start_watches()
            async for event in self._follow(watches):
                self._fired = True  # before the yield: the triggerer may cancel us while it stores the event
                yield event
        finally:  # also on cancellation, and when the caller stops after the first event
            for w in watches.values():
                await shared_watch.release(w, holder=self)
            await release_async_client(self.cluster, self)

    async def _follow(self, watches: dict[str, shared_watch.SharedWatch]) -> AsyncIterator[TriggerEvent]:
        identity = {"name": self.name, "namespace": self.namespace, "launcher": self.launcher}
        failures = 0
        cursor, log_pod_name = LogCursor(), None
        client = None
        logs_read_at = float("-inf")
        log_interval = self.log_interval or max(self.poll_interval, DEFAULT_LOG_SECONDS)
        while True:
            started = time.monotonic()
            try:
                client = await shared_async_client(self.cluster, holder=self)
                api = CoreV1Api(client)
                state, launched, log_pod = await self._observe(api, watches)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API or the network; retried, then reported
                failures += 1
                if _status(exc) == 404:
                    yield TriggerEvent({**identity, "log_pod": log_pod_name, "status": "failed", "reason": "Deleted",
                                        "description": f"Deleted: the {self.kind} no longer exists (the task was "
                                                       "killed, or someone else deleted it)"})
                    return
                if failures >= MAX_API_FAILURES:
                    yield TriggerEvent({**identity, "log_pod": log_pod_name, "status": "error",
                                        "description": f"{MAX_API_FAILURES} Kubernetes API calls in a row failed; "
                                                       f"last: {type(exc).__name__}: {exc or 'no answer'}"})
                    return
                self.log.warning("Kubernetes API call failed (%s/%s): %s", failures, MAX_API_FAILURES, exc)
                if _status(exc) == 401 and client is not None:
                    # The token expired or rotated before its stated expiry: reload it and ask again, at once the
                    # first time (a token refused again waits as any other failure).
                    await refresh_credentials(client, since=started)
                    if failures == 1:
                        continue
                await asyncio.sleep(max(_retry_after(exc), min(self.poll_interval, 2 ** failures)))
                continue

            if log_pod is not None and log_pod["metadata"]["name"] != log_pod_name:
                # The first sight of the pod (or a replacement of rank 0): resume from its saved cursor.
                log_pod_name, cursor = log_pod["metadata"]["name"], LogCursor.of(log_pod)
            logs_due = state.terminal or time.monotonic() - logs_read_at >= log_interval  # the result line: at once
            if self.stream_logs and logs_due and log_pod is not None and classify_pod(log_pod).phase != PENDING:
                cursor, read = await self._copy_new_log_lines(api, log_pod_name, cursor)
                if read:  # a failed read is due again at the next look
                    logs_read_at = time.monotonic()
            if state.terminal:
                status = "success" if state.phase == SUCCEEDED else "failed"
                # The result travels with the event: the pod (and its log) may be gone when the task resumes.
                extra = {"result": self._result} if status == "success" else {}
                yield TriggerEvent({**identity, "log_pod": log_pod_name, "status": status, "reason": state.reason,
                                    "description": state.describe(), "exit_code": state.exit_code, **extra})
                return
            if self.deadline is not None and time.time() >= self.deadline:
                # Airflow does not enforce execution_timeout while a task is deferred: this trigger does.
                at = datetime.fromtimestamp(self.deadline, timezone.utc).isoformat(timespec="seconds")
                yield TriggerEvent({**identity, "log_pod": log_pod_name, "status": "timeout",
                                    "reason": "ExecutionTimeout",
                                    "description": f"execution_timeout: still {state.phase} at the try's deadline "
                                                   f"{at} (its start + execution_timeout)"})
                return
            if state.phase == PENDING:
                waited = seconds_since(launched["metadata"].get("creationTimestamp"))
                why = startup_verdict(state, waited, self.startup_timeout)
                if why:
                    # Kubernetes keeps retrying (image pulls, scheduling); the task stops waiting here.
                    sources = [self.name] + ([node_job_name(self.name)] if self.launcher == "trainjob" else []) + (
                        [log_pod_name] if log_pod_name and log_pod_name != self.name else [])
                    events = await self._event_messages(api, sources)
                    yield TriggerEvent({**identity, "log_pod": log_pod_name, "status": "stuck",
                                        "reason": state.reason or "Pending",
                                        "description": f"not running {waited:.0f}s after creation ({why}): "
                                                       f"{state.describe()}; events: {events}"})
                    return
            wait = self.poll_interval
            if self.deadline is not None:
                wait = max(0.0, min(wait, self.deadline - time.time()))
            followed = watches.get(shared_watch.TRAINJOBS if self.launcher == "trainjob" else shared_watch.PODS)
            if followed is not None and followed.usable:  # woken by a change, else looks again from the cache
                await followed.wait_for_change([self.name], wait)
            else:
                await asyncio.sleep(wait)

    async def _copy_new_log_lines(self, api: Any, pod_name: str, cursor: LogCursor) -> tuple[LogCursor, bool]:
        """Copy the log lines after ``cursor`` into the task log and save the new cursor on the pod; the new cursor
        and whether the log could be read. Logs are a courtesy: when they cannot be read (a lost node's kubelet,
        say) the run's status still decides."""
        try:
            text = await async_pod_log(api.api_client, pod_name, self.namespace, cursor.since_time())
        except Exception as exc:
            self.log.warning("could not read the log of %s: %s", pod_name, exc)
            return cursor, False
        new = new_log_lines(text, cursor)
        for line in new.lines:
            self.log.info("[%s] %s", pod_name, line)
            if line.startswith(RESULT_PREFIX):
                self._result = bounded_result(find_result(line)) or self._result
        if new.lines:
            try:
                await api.patch_namespaced_pod(pod_name, self.namespace, {
                    "metadata": {"annotations": {LOG_CURSOR_ANNOTATION: new.cursor.encode()}}})
            except Exception as exc:  # the lines are shown; a restart might show them again
                self.log.warning("could not save the log cursor on %s: %s", pod_name, exc)
        return new.cursor, True

    async def _event_messages(self, api: Any, names: list[str]) -> str:
        messages = []
        for name in names:
            try:
                events = await async_json(api.list_namespaced_event, self.namespace,
                                          field_selector=f"involvedObject.name={name}")
            except Exception as exc:  # events are a courtesy; the reason is already known
                return f"(could not list events: {exc})"
            messages += [f"{e.get('reason')}: {e.get('message')}" for e in events.get("items", [])]
        return "; ".join(messages) or "none"

    async def on_kill(self) -> None:
        """Airflow 3.3+: the triggerer cancelled this trigger as for a user's action (kill, clear, mark failed or
        success). It does the same for a trigger it merely no longer owns (its heartbeat lapsed; another triggerer
        takes the trigger over), so the training is stopped only when the task really ended: not after this
        trigger fired its event (the task resumes with it), and not while the task is still deferred. And only
        while this trigger's try still holds the run: after a clear, the next try may already have replaced it
        under the same name."""
        if self._fired:
            self.log.info("not deleting %s %s/%s: this trigger already fired its event", self.kind, self.namespace,
                          self.name)
            return
        ended, why = await self._task_ended()
        if not ended:
            self.log.warning("not deleting %s %s/%s: %s", self.kind, self.namespace, self.name, why)
            return
        # Held under its own token: run(), cancelled at the same moment, releases the trigger's hold and would
        # otherwise close the client under this call.
        token = object()
        client = await shared_async_client(self.cluster, holder=token)
        try:
            await self._delete_if_held(client, why)
        finally:
            await release_async_client(self.cluster, token)

    async def _delete_if_held(self, client: Any, why: str) -> None:
        api = CoreV1Api(client)
        try:
            if self.launcher == "pod":
                obj = await call_with_fresh_credentials(client, async_json, api.read_namespaced_pod, self.name,
                                                        self.namespace)
            else:
                obj = await call_with_fresh_credentials(client, async_trainjob, client, self.name, self.namespace)
            own_try = getattr(getattr(self, "task_instance", None), "try_number", None)
            holder = deferring_try(obj)
            if own_try is not None and holder != str(own_try):
                self.log.info("not deleting %s %s/%s: try %s of the task holds it now, not this trigger's try %s",
                              self.kind, self.namespace, self.name, holder, own_try)
                return
            # Only the object read above: not one the next try created under the same name meanwhile.
            options = V1DeleteOptions(preconditions=V1Preconditions(uid=obj["metadata"]["uid"]))
            if self.launcher == "pod":
                await call_with_fresh_credentials(client, api.delete_namespaced_pod, self.name, self.namespace,
                                                  grace_period_seconds=30, body=options)
            else:
                await call_with_fresh_credentials(client, async_delete_trainjob, client, self.name, self.namespace,
                                                  options)
            self.log.info("deleted %s %s/%s (%s)", self.kind, self.namespace, self.name, why)
        except Exception as exc:
            if _status(exc) not in (404, 409):  # gone, or replaced since it was read: nothing of ours to delete
                raise
            self.log.info("not deleting %s %s/%s: already deleted or replaced (%s)", self.kind, self.namespace,
                          self.name, why)

    async def _task_ended(self) -> tuple[bool, str]:
        """(whether the task instance is no longer deferred, why), from its state in Airflow's database."""
        ti = getattr(self, "task_instance", None)
        if ti is None:  # not run by a triggerer (a worker's own wait): the caller is the task itself
            return True, "the task was killed"
        try:
            state = await task_state(ti)
        except Exception as exc:  # keeping a training that should stop beats deleting one that should not
            return False, (f"could not read the state of task instance {ti.dag_id}/{ti.run_id}/{ti.task_id} "
                           f"({type(exc).__name__}: {exc}); it keeps running: delete it by hand if the task ended")
        if state == "deferred":
            return False, ("the task is still deferred: this triggerer gave the trigger up (another triggerer "
                           "follows it)")
        return True, f"the task is now {state or 'cleared'}"


async def task_state(ti: Any) -> str | None:
    """The current state of the task instance ``ti`` (the triggerer's own), through the task SDK's execution API
    (Airflow 3; only 3.3+ triggerers call on_kill)."""
    from airflow.sdk.execution_time.comms import GetTaskStates
    from airflow.sdk.execution_time.task_runner import SUPERVISOR_COMMS

    response = await SUPERVISOR_COMMS.asend(GetTaskStates(dag_id=ti.dag_id, task_ids=[ti.task_id],
                                                          run_ids=[ti.run_id], map_index=ti.map_index))
    # The answer keys a mapped task instance as "<task_id>_<map_index>".
    key = f"{ti.task_id}_{ti.map_index}" if ti.map_index is not None and ti.map_index >= 0 else ti.task_id
    return response.task_states[ti.run_id][key]


_said: set[str] = set()  # what the shared watches made known once per triggerer process (an unavailable watch)


def _selected(obj: dict[str, Any], selector: str) -> bool:
    """Whether ``obj``'s labels match an equality ``selector`` ("k=v,k2=v2"), as the API server would select it."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(key) == value for key, _, value in (term.partition("=") for term in selector.split(",")))


def _status(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


def _retry_after(exc: Exception) -> float:
    """Seconds a 429/503 answer asks us to wait (Retry-After), else 0."""
    value = (getattr(exc, "headers", None) or {}).get("Retry-After", "0")
    return float(value) if str(value).replace(".", "", 1).isdigit() else 0.0

