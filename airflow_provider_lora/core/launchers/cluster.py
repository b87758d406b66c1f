"""The cluster launch protocol, written once: how a training Pod or Kubeflow Trainer TrainJob is created, reattached
to or replaced, watched, judged, read back and deleted. The operator (on the Airflow worker) and the KFP component
(in its task pod) both launch through these calls, and the trigger judges a pending run with the same verdict.

Sync calls of the ``kubernetes`` client on raw JSON, with no Airflow import: the KFP environment's client
(kubernetes<31, which kfp 2.x needs) runs it as the Airflow side's (36) does. Every call goes through one retry rule
(call_with_retries).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from airflow_provider_lora.core.contract import ERROR_PREFIX
from airflow_provider_lora.core.launchers.pod import (FAILED, PENDING, STUCK_WAITING_REASONS, SUCCEEDED, LogCursor,
                                                      PlanRefused, PodState, classify_pod, find_plan, find_result,
                                                      new_log_lines, seconds_since)
from airflow_provider_lora.core.launchers.trainjob import (classify_trainjob, failed_nodes, node_pod_selector,
                                                           rank0_pod)
from airflow_provider_lora.core.render import (LABEL_PREFIX, TRAINER_CONTAINER, TRAINJOB_GROUP, TRAINJOB_NODE_JOB,
                                               TRAINJOB_PLURAL, TRAINJOB_VERSION, TRY_NUMBER_LABEL)

Log = Callable[[str], None]
CLUSTER_LAUNCHERS = ("pod", "trainjob")  # a training Pod, or a Kubeflow Trainer TrainJob

# How a launcher waits, unless told otherwise: seconds between state checks, and how long a run may stay pending.
DEFAULT_POLL_SECONDS = 10.0
DEFAULT_STARTUP_TIMEOUT = 600.0
DELETE_WAIT_SECONDS = 120.0  # how long a failed run of an earlier try may take to go before it is replaced
# How long a new try leaves a run an earlier try deferred on to that try's trigger: cancelled by the triggerer
# (the task is no longer deferred), the trigger deletes it in on_kill (Airflow 3.3+) and fires no event. Deleting it
# under a trigger still running would make that trigger fire "Deleted", which Airflow can hand to the new try.
HANDOVER_SECONDS = 60.0
FAILURE_LOG_LINES = 30  # log lines shown per failed pod
RESULT_LOG_LINES = 200  # lines read back for the result line: other ranks may print many lines after it
LOG_READ_TIMEOUT = 120  # seconds without a log byte before a followed stream is re-opened (the state is checked)

# Answers worth another try (throttling, a restarting or overloaded API server), the attempts a call gets, the
# longest wait between them, and the seconds after which an unanswered request counts as failed.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
SYNC_ATTEMPTS = 4
MAX_BACKOFF_SECONDS = 8.0
API_TIMEOUT_SECONDS = 30.0
# Answers to a create that a new try would get again: the manifest, the namespace or the permissions are wrong.
REFUSED_STATUSES = frozenset({400, 403, 404, 422})
# Written on the run by the try that hands it to its trigger (defers). A deferred task ends only with its trigger's
# event (the same try resumes) or by a user's action (clear, mark) or a timeout: so a later try that finds this
# annotation replaces the run instead of adopting it, and the trigger's on_kill deletes only a run its own try holds.
DEFERRED_BY_ANNOTATION = LABEL_PREFIX + "deferred-by-try"


def deferring_try(obj: dict[str, Any]) -> str | None:
    """The try whose trigger holds the run ``obj``: its DEFERRED_BY_ANNOTATION, else (a run launched before that
    annotation existed) the try that created it."""
    meta = obj.get("metadata") or {}
    return (meta.get("annotations") or {}).get(DEFERRED_BY_ANNOTATION) or (meta.get("labels") or {}).get(
        TRY_NUMBER_LABEL)


class KubernetesApiError(RuntimeError):
    """A Kubernetes API call still failed after SYNC_ATTEMPTS tries."""


class LaunchRefused(ValueError):
    """The API server refused to create the run (bad manifest, admission, missing namespace, RBAC): trying again
    would be refused the same way."""


def check_seconds(name: str, seconds: Any) -> float:
    """``seconds`` (poll_interval, startup_timeout) as a positive float; a ValueError naming ``name`` otherwise."""
    if isinstance(seconds, bool) or not (isinstance(seconds, (int, float)) and seconds > 0):
        raise ValueError(f"{name}={seconds!r} is not valid: give a number of seconds > 0")
    return float(seconds)


def call_with_retries(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` with a request timeout, retried on RETRY_STATUSES and network errors with
    exponential backoff (a Retry-After header wins); other API errors (404, 409, 422, ...) are raised at once."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    kwargs.setdefault("_request_timeout", API_TIMEOUT_SECONDS)
    for attempt in range(1, SYNC_ATTEMPTS + 1):
        try:
            return call(*args, **kwargs)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            if isinstance(exc, ApiException) and exc.status not in RETRY_STATUSES:
                raise
            if attempt == SYNC_ATTEMPTS:
                raise KubernetesApiError(f"{what}: the Kubernetes API failed {SYNC_ATTEMPTS} times; last: "
                                         f"{describe_api_error(exc)}") from exc
            retry_after = str((getattr(exc, "headers", None) or {}).get("Retry-After", ""))
            time.sleep(float(retry_after) if retry_after.isdigit() else
                       min(MAX_BACKOFF_SECONDS, 2.0 ** (attempt - 1)))


def describe_api_error(exc: Exception) -> str:
    """``(500) Internal error occurred: ...``: the status and the API's own message, not the raw response dump."""
    status, body = getattr(exc, "status", None), getattr(exc, "body", None)
    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError):
        message = None
    return f"({status}) {message or getattr(exc, 'reason', '')}" if status else f"{type(exc).__name__}: {exc}"


def _status(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


def _json(response: Any) -> Any:
    return json.loads(response.data)


def startup_verdict(state: PodState, waited: float, startup_timeout: float) -> str | None:
    """Why a pending run that has existed ``waited`` seconds should no longer be waited for, or None. A reason
    that waiting does not clear (STUCK_WAITING_REASONS) has its own, shorter grace, counted like startup_timeout
    from the run's creation: a Secret created a minute later still lets the run start."""
    if state.phase != PENDING:
        return None
    limit = min(startup_timeout, STUCK_WAITING_REASONS[state.reason]) if state.stuck else startup_timeout
    if waited <= limit:
        return None
    return f"{state.reason} does not clear by waiting" if state.stuck else f"startup_timeout={startup_timeout:.0f}s"


# ---- one launched run, Pod or TrainJob, behind the same calls --------------------------------------------------

class LaunchedPod:
    """A training Pod by name: the calls the protocol makes on it."""

    kind = "pod"
    container = TRAINER_CONTAINER

    def __init__(self, core_api: Any, name: str, namespace: str, manifest: dict[str, Any] | None = None):
        self.core, self.name, self.namespace, self.manifest = core_api, name, namespace, manifest

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def read(self) -> dict[str, Any] | None:
        """The object as a dict, or None when it does not exist."""
        return self._absent_is_none(lambda: _json(call_with_retries(
            f"read {self}", self.core.read_namespaced_pod, self.name, self.namespace, _preload_content=False)))

    def _create(self) -> None:
        call_with_retries(f"create {self}", self.core.create_namespaced_pod, self.namespace, self.manifest)

    def _delete(self, options: Any) -> None:
        call_with_retries(f"delete {self}", self.core.delete_namespaced_pod, self.name, self.namespace,
                          grace_period_seconds=30, body=options)

    def _patch(self, body: dict[str, Any]) -> None:
        call_with_retries(f"patch {self}", self.core.patch_namespaced_pod, self.name, self.namespace, body)

    def observe(self, obj: dict[str, Any]) -> tuple[PodState, str | None]:
        """The state of ``obj`` (as read) and the pod whose log holds the result (None before it exists)."""
        return classify_pod(obj), self.name

    def failed_pods(self, log_pod: str | None) -> list[tuple[str, str]]:
        """(pod, what it is) whose logs explain a failure."""
        return [(log_pod, "")] if log_pod else []

    # -- the protocol's own calls, the same for both kinds --

    def create(self) -> bool:
        """Create it; False when one of that name exists already (another try made it, or an earlier attempt of
        this call did before its answer was lost). LaunchRefused for what a new try would be refused again."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._create()
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            if exc.status in REFUSED_STATUSES:
                raise LaunchRefused(f"the cluster refused the {self.kind}: {describe_api_error(exc)}") from None
            raise

    def delete(self, uid: str | None = None) -> bool:
        """Delete it (only the object with ``uid``, when given: not one created under the same name since it was
        read); False when it was already gone or replaced."""
        from kubernetes.client import V1DeleteOptions, V1Preconditions
        from kubernetes.client.exceptions import ApiException

        try:
            self._delete(V1DeleteOptions(preconditions=V1Preconditions(uid=uid)) if uid else None)
            return True
        except ApiException as exc:
            if exc.status in (404, 409):  # 409: the uid precondition failed, another object holds the name now
                return False
            raise

    def mark_deferred(self, try_number: int) -> None:
        """Record that ``try_number`` hands this run to its trigger (DEFERRED_BY_ANNOTATION)."""
        self._patch({"metadata": {"annotations": {DEFERRED_BY_ANNOTATION: str(try_number)}}})

    def wait_until_gone(self, timeout: float = DELETE_WAIT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while self.read() is not None:
            if time.monotonic() > deadline:
                raise KubernetesApiError(f"{self} was not deleted within {timeout:.0f}s")
            time.sleep(1)

    def log_tail(self, pod: str, lines: int) -> str:
        """The last ``lines`` lines of ``pod``'s log, each prefixed with its timestamp."""
        response = call_with_retries(f"read the log of {self.namespace}/{pod}", self.core.read_namespaced_pod_log,
                                     pod, self.namespace, container=self.container, timestamps=True,
                                     tail_lines=lines, _preload_content=False)
        return response.data.decode("utf-8", "replace")

    def failure_logs(self, log_pod: str | None, deleted: bool = False) -> str:
        """The last log lines of the pod, or of every failed node of a TrainJob (rank 0 if none failed): the error
        is often on another rank than 0."""
        try:
            pods = self.failed_pods(log_pod)
        except Exception as exc:  # the logs are a courtesy on a path that already fails
            return f"(could not list the pods of {self}: {describe_api_error(exc)})"
        if not pods:
            return (f"(no log: the {self.kind} was deleted before its log was read)" if deleted else
                    "(no log: no pod of it had started)")
        return "\n".join(f"last {FAILURE_LOG_LINES} log lines of {pod}{what}:\n{self._safe_tail(pod)}"
                         for pod, what in pods)

    def _safe_tail(self, pod: str) -> str:
        try:
            text = self.log_tail(pod, FAILURE_LOG_LINES)
        except Exception as exc:  # the log is a courtesy on a path that already fails
            return f"(could not read the log: {describe_api_error(exc)})"
        return "\n".join(line.partition(" ")[2] for line in text.splitlines())

    def logged_result(self, log_pod: str) -> dict[str, Any] | None:
        """The trainer's result line in the log of ``log_pod``; None when absent (or the pod is gone)."""
        return find_result(self.log_tail(log_pod, RESULT_LOG_LINES))

    def termination_result(self, log_pod: str) -> dict[str, Any] | None:
        """The headline result the trainer wrote to its termination message (4 KiB: no loss history, maybe no
        artifacts); None when the pod or a well-formed message is not there."""
        pod = self._absent_is_none(lambda: _json(call_with_retries(
            f"read pod {self.namespace}/{log_pod}", self.core.read_namespaced_pod, log_pod, self.namespace,
            _preload_content=False)))
        try:
            result = json.loads(classify_pod(pod).termination_message) if pod else None
        except ValueError:
            return None
        if not isinstance(result, dict) or not isinstance(result.get("summary"), dict):
            return None
        return {"summary": result["summary"], "history": [], "artifacts": result.get("artifacts") or {}}

    @staticmethod
    def _absent_is_none(call: Callable[[], Any]) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return call()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


class LaunchedTrainJob(LaunchedPod):
    """A Kubeflow Trainer TrainJob by name; its node pods carry JobSet labels, node rank 0 prints the result."""

    kind = "TrainJob"
    container = TRAINJOB_NODE_JOB

    def __init__(self, core_api: Any, name: str, namespace: str, manifest: dict[str, Any] | None = None):
        from kubernetes.client import CustomObjectsApi

        super().__init__(core_api, name, namespace, manifest)
        self.custom = CustomObjectsApi(core_api.api_client)  # the same connection as the core API
        self._args = (TRAINJOB_GROUP, TRAINJOB_VERSION, namespace, TRAINJOB_PLURAL)

    def read(self) -> dict[str, Any] | None:
        return self._absent_is_none(lambda: _json(call_with_retries(
            f"read {self}", self.custom.get_namespaced_custom_object, *self._args, self.name,
            _preload_content=False)))

    def _create(self) -> None:
        # Strict: a field the installed Trainer does not know is an error, not silently dropped (the pod
        # customisation field changed with every Trainer release).
        call_with_retries(f"create {self}", self.custom.create_namespaced_custom_object, *self._args, self.manifest,
                          field_validation="Strict")

    def _delete(self, options: Any) -> None:
        call_with_retries(f"delete {self}", self.custom.delete_namespaced_custom_object, *self._args, self.name,
                          propagation_policy="Foreground", body=options)

    def _patch(self, body: dict[str, Any]) -> None:
        call_with_retries(f"patch {self}", self.custom.patch_namespaced_custom_object, *self._args, self.name, body)

    def node_pods(self) -> list[dict[str, Any]]:
        return _json(call_with_retries(f"list the pods of {self}", self.core.list_namespaced_pod, self.namespace,
                                       label_selector=node_pod_selector(self.name), _preload_content=False))["items"]

    def observe(self, obj: dict[str, Any]) -> tuple[PodState, str | None]:
        pods = self.node_pods()
        rank0 = rank0_pod(pods)
        return classify_trainjob(obj, pods), rank0["metadata"]["name"] if rank0 else None

    def failed_pods(self, log_pod: str | None) -> list[tuple[str, str]]:
        failed = [(name, f" (node {rank}: {state.describe()})") for rank, name, state in failed_nodes(self.node_pods())]
        return failed or super().failed_pods(log_pod)


def launched(core_api: Any, launcher: str, name: str, namespace: str,
             manifest: dict[str, Any] | None = None) -> LaunchedPod:
    """The launched run of ``launcher`` ("pod" or "trainjob")."""
    return (LaunchedTrainJob if launcher == "trainjob" else LaunchedPod)(core_api, name, namespace, manifest)


def for_manifest(core_api: Any, manifest: dict[str, Any]) -> LaunchedPod:
    """The run a rendered manifest (kind Pod or TrainJob) launches."""
    return launched(core_api, "trainjob" if manifest["kind"] == "TrainJob" else "pod",
                    manifest["metadata"]["name"], manifest["metadata"]["namespace"], manifest)


def create_or_reattach(job: LaunchedPod, log: Log, try_number: int,
                       before_create: Callable[[], Any] | None = None) -> Any:
    """Create the run, unless this task instance already has one (names are the same for every try): a running or
    succeeded one that an earlier try followed from its worker (that worker died, say) is reattached, never
    duplicated; one that is failed, being deleted, or was handed to the trigger of another try is deleted and
    replaced. ``before_create`` runs just before creating; what it returns other than None is returned instead of
    creating (the operator's own published run). Returns None otherwise."""
    existing = job.read()
    if existing is not None:
        state, _ = job.observe(existing)
        made_by = (existing["metadata"].get("labels") or {}).get(TRY_NUMBER_LABEL)
        by = f", created by try {made_by}" if made_by else ""
        why = _not_adoptable(existing, state, try_number)
        if why is None:
            log(f"reattaching to {job} ({state.phase}{by})")
            return None
        log(f"{job} ({state.phase}{by}) {why}: replacing it")
        # Still running under another try's trigger: that trigger is being cancelled and deletes it (a run that
        # ended has no trigger left to do so).
        handover = _deferred_by_another_try(existing, try_number) and not state.terminal
        if handover and _gone_within(job, HANDOVER_SECONDS):
            log(f"{job} was deleted by the earlier try's trigger (on_kill)")
        else:
            job.delete(uid=existing["metadata"].get("uid"))
            job.wait_until_gone()
    if before_create is not None:
        instead = before_create()
        if instead is not None:
            return instead
    if job.create():
        log(f"created {job}")
    else:
        log(f"{job} was created meanwhile (by another try of this task): reattaching")
    return None


def _deferred_by_another_try(obj: dict[str, Any], try_number: int) -> bool:
    deferred_by = ((obj.get("metadata") or {}).get("annotations") or {}).get(DEFERRED_BY_ANNOTATION)
    return deferred_by is not None and deferred_by != str(try_number)


def _gone_within(job: LaunchedPod, seconds: float) -> bool:
    try:
        job.wait_until_gone(timeout=seconds)
        return True
    except KubernetesApiError:
        return False


def _not_adoptable(obj: dict[str, Any], state: PodState, try_number: int) -> str | None:
    """Why try ``try_number`` must not adopt ``obj`` (in ``state``), the existing run of its name; None when it
    may."""
    meta = obj["metadata"]
    deferred_by = (meta.get("annotations") or {}).get(DEFERRED_BY_ANNOTATION)
    if meta.get("deletionTimestamp"):
        return "is being deleted"
    if _deferred_by_another_try(obj, try_number):
        return (f"was handed to the trigger of try {deferred_by}, which ended while deferred (a clear, a mark or a "
                f"timeout): its training ends with that try")
    if state.phase == FAILED:
        return f"failed: {state.describe()}"
    return None


def run_plan(job: LaunchedPod, poll: float, startup_timeout: float, log: Log) -> dict[str, Any]:
    """The dry run: create the plan pod (one of an earlier try is replaced: a plan is never reused), follow its
    log, and return the plan it printed; PlanRefused when the trainer refused the run, RuntimeError when the pod
    failed otherwise (its last log lines say why). The pod is deleted in every case: a dry run leaves nothing."""
    if job.read() is not None:
        log(f"{job} of an earlier try: replacing it")
        job.delete()
        job.wait_until_gone()
    job.create()
    log(f"created {job} (dry run: the plan, no GPU requested)")
    try:
        state, log_pod = follow(job, poll, startup_timeout, log)
        text = job.log_tail(log_pod, RESULT_LOG_LINES) if log_pod else ""
        plan = find_plan(text)
        if state.phase == SUCCEEDED and plan is not None:
            return plan
        errors = [line.partition(ERROR_PREFIX)[2] for line in text.splitlines() if ERROR_PREFIX in line]
        if errors:
            raise PlanRefused(errors[-1], plan)
        raise RuntimeError(f"dry run {job} {state.phase} without a plan: {state.describe()}\n"
                           f"{job.failure_logs(log_pod)}")
    finally:
        job.delete()


def follow(job: LaunchedPod, poll: float, startup_timeout: float, log: Log) -> tuple[PodState, str | None]:
    """Wait for the run to start, stream its (rank 0) log, re-opened after a drop without repeating lines, and
    return its terminal state and the pod whose log holds the result; RuntimeError when it is deleted meanwhile or
    cannot start. The trigger's loop is the async twin of this one (the same states and verdicts)."""
    cursor, followed = LogCursor(), None
    while True:
        obj = job.read()
        if obj is None:
            raise RuntimeError(f"training {job} disappeared (deleted outside this task)")
        state, log_pod = job.observe(obj)
        if state.phase == PENDING:
            waited = seconds_since(obj["metadata"].get("creationTimestamp"))
            why = startup_verdict(state, waited, startup_timeout)
            if why:
                raise RuntimeError(f"training {job} not running {waited:.0f}s after creation ({why}): "
                                   f"{state.describe()}")
            time.sleep(poll)
            continue
        if log_pod is not None:
            if log_pod != followed:  # a restarted rank-0 pod logs from its own start
                cursor, followed = LogCursor(), log_pod
            cursor = _stream_log(job, log_pod, cursor, log)
        if state.terminal:
            return state, log_pod
        time.sleep(poll)  # the stream ended while the run went on (a dropped connection): look again


def _stream_log(job: LaunchedPod, pod: str, cursor: LogCursor, log: Log) -> LogCursor:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    since = int(seconds_since(cursor.timestamp)) + 2 if cursor.timestamp else None
    try:
        response = job.core.read_namespaced_pod_log(pod, job.namespace, container=job.container, follow=True,
                                                    timestamps=True, since_seconds=since, _preload_content=False,
                                                    _request_timeout=(30, LOG_READ_TIMEOUT))
        try:
            for raw in response:
                new = new_log_lines(raw.decode("utf-8", "replace"), cursor)
                cursor = new.cursor
                for line in new.lines:
                    log(line)
        finally:
            response.release_conn()
    except (ApiException, urllib3.exceptions.HTTPError) as exc:
        if cursor.timestamp:  # before the first line, the container may simply not be ready to log yet
            log(f"log stream of {job.namespace}/{pod} interrupted ({type(exc).__name__}); re-reading state")
    return cursor
