"""Pod launcher: what a training pod's state means, and how its logs are followed without gaps or repeats.

The functions here work on plain pod dicts (the API's JSON), which the sync operator path and the async trigger
both read: parsing JSON into the kubernetes client's model objects (mostly its date parsing) costs about 0.7 CPU
ms per poll, more than the rest of the poll over a kept-alive connection.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from airflow_provider_lora.core.render import LABEL_PREFIX, TRAINER_CONTAINER

from airflow_provider_lora.core.contract import PLAN_PREFIX, RESULT_PREFIX
LOG_CURSOR_ANNOTATION = LABEL_PREFIX + "log-cursor"
# Waiting reasons that waiting does not clear, with the seconds the trigger still waits before failing the task
# (at most startup_timeout): an invalid image name never becomes valid; a missing Secret or ConfigMap key may still
# be created; ImageNotFound (ours: an image pull the registry answered "not found") is a name or tag nobody pushed.
# Other ImagePullBackOff/ErrImagePull (a registry outage, a pull secret added later) and Unschedulable (an
# autoscaler adding a node) can clear by themselves, so they wait the whole startup_timeout.
STUCK_WAITING_REASONS = {"InvalidImageName": 0.0, "ImageNotFound": 0.0, "ErrImageNeverPull": 60.0,
                         "CreateContainerConfigError": 60.0, "CreateContainerError": 60.0}
# How containerd (`code = NotFound`, `...: not found`) and CRI-O / registries (`manifest unknown`) word a pull of an
# image or tag that does not exist. "pull access denied" / 401 are not here: a pull secret may still fix those.
IMAGE_NOT_FOUND = re.compile(r"code = NotFound|manifest unknown|: not found\b", re.I)

# DisruptionTarget reasons that mean the pod's node is gone (Kubernetes 1.27+; older ones set reason NodeLost).
NODE_LOST_REASONS = {"DeletionByTaintManager", "DeletionByPodGC", "NodeLost"}

RUNNING, PENDING, SUCCEEDED, FAILED = "running", "pending", "succeeded", "failed"

# Terminated reasons of a container whose process never started (the runtime could not exec it).
NEVER_RAN_REASONS = {"StartError", "ContainerCannotRun"}
# What a new pod from the same manifest would fail with again: the command line or environment is too large for
# the kernel, the command is not in the image, or the image reference is invalid. Retrying those only repeats them.
_REPEATS = re.compile(r"argument list too long|executable file not found|no such file or directory", re.I)


def fails_again(reason: str | None, description: str) -> bool:
    """Whether a pod that failed with ``reason`` (and ``description``) would fail the same way if retried."""
    if reason in ("InvalidImageName", "ImageNotFound"):
        return True
    return reason in NEVER_RAN_REASONS and bool(_REPEATS.search(description))


@dataclass
class PodState:
    """What a pod's status says, in the terms a task log needs."""

    phase: str  # pending | running | succeeded | failed
    reason: str = ""  # e.g. OOMKilled, Evicted, DeadlineExceeded, NodeLost, Unschedulable, ImagePullBackOff
    message: str = ""
    exit_code: int | None = None
    termination_message: str = ""
    stuck: bool = False  # pending for a reason that will not resolve by waiting (STUCK_WAITING_REASONS)

    @property
    def terminal(self) -> bool:
        return self.phase in (SUCCEEDED, FAILED)

    def describe(self) -> str:
        details = [f"exit code {self.exit_code}"] if self.exit_code is not None else []
        details += [self.message] if self.message else []
        return (self.reason or self.phase) + (f" ({', '.join(details)})" if details else "")


def classify_pod(pod: dict[str, Any]) -> PodState:
    """Read a pod dict's status into a PodState."""
    status = pod.get("status") or {}
    phase = (status.get("phase") or "Pending").lower()
    container = next((c for c in status.get("containerStatuses") or [] if c.get("name") == TRAINER_CONTAINER),
                     None) or next(iter(status.get("containerStatuses") or []), None)
    state = (container or {}).get("state") or {}
    terminated = state.get("terminated")
    waiting = state.get("waiting")

    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    disruption = conditions.get("DisruptionTarget", {})
    if disruption.get("status") == "True" and disruption.get("reason") in NODE_LOST_REASONS:
        # The node stopped reporting; Kubernetes evicts its pods (taint manager) and later garbage-collects them.
        return PodState(FAILED, "NodeLost", disruption.get("message") or "the node running the pod was lost")
    if pod.get("metadata", {}).get("deletionTimestamp") and phase in ("pending", "running"):
        return PodState(FAILED, "Deleted", "the pod was deleted while it ran")
    if phase == "failed" or (terminated and terminated.get("exitCode", 0) != 0):
        # The pod's own reason (Evicted, DeadlineExceeded) says more than the container's (Error, OOMKilled).
        reason = status.get("reason") or (terminated or {}).get("reason") or "Error"
        message = status.get("message") or ""
        if not message and (terminated or {}).get("reason") in NEVER_RAN_REASONS:
            # The container never ran, so it has no log: the runtime's message is the only cause there is.
            message = terminated.get("message") or ""
        return PodState(FAILED, reason, message, (terminated or {}).get("exitCode"),
                        (terminated or {}).get("message") or "")
    if phase == "succeeded":
        return PodState(SUCCEEDED, "Completed", "", (terminated or {}).get("exitCode", 0),
                        (terminated or {}).get("message") or "")
    if phase == "running":
        return PodState(RUNNING)
    if (waiting and waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff")
            and IMAGE_NOT_FOUND.search(waiting.get("message") or "")):
        return PodState(PENDING, "ImageNotFound", f"{waiting['reason']}: {waiting['message']}", stuck=True)
    if waiting and waiting.get("reason") in STUCK_WAITING_REASONS:
        return PodState(PENDING, waiting["reason"], waiting.get("message", ""), stuck=True)
    unscheduled = conditions.get("PodScheduled")
    if unscheduled and unscheduled.get("status") == "False":
        return PodState(PENDING, unscheduled.get("reason", "Unschedulable"), unscheduled.get("message", ""))
    return PodState(PENDING, (waiting or {}).get("reason", ""), (waiting or {}).get("message", ""))


# ---- logs ------------------------------------------------------------------------------------------------------

@dataclass
class LogCursor:
    """Where log following stopped: the timestamp of the last line shown and how many lines carried exactly that
    timestamp. ``sinceTime`` has whole-second precision, so lines of the cursor's second come again and are
    skipped here; kept in a pod annotation, it survives a triggerer restart."""

    timestamp: str = ""  # RFC3339Nano of the last line shown, "" before the first
    seen_at_timestamp: int = 0

    def since_time(self) -> str | None:
        return self.timestamp[:19] + "Z" if self.timestamp else None

    def encode(self) -> str:
        return f"{self.timestamp} {self.seen_at_timestamp}" if self.timestamp else ""

    @classmethod
    def decode(cls, text: str | None) -> "LogCursor":
        if not text or " " not in text:
            return cls()
        timestamp, count = text.rsplit(" ", 1)
        return cls(timestamp, int(count)) if count.isdigit() else cls()

    @classmethod
    def of(cls, pod: dict[str, Any]) -> "LogCursor":
        return cls.decode(((pod.get("metadata") or {}).get("annotations") or {}).get(LOG_CURSOR_ANNOTATION))


@dataclass
class NewLines:
    lines: list[str] = field(default_factory=list)
    cursor: LogCursor = field(default_factory=LogCursor)


def new_log_lines(text: str, cursor: LogCursor) -> NewLines:
    """Lines of a ``timestamps=true`` log response that come after ``cursor``, and the cursor after them."""
    out = NewLines(cursor=LogCursor(cursor.timestamp, cursor.seen_at_timestamp))
    key = _sort_key(cursor.timestamp) if cursor.timestamp else None
    seen_same = 0
    # Split on newlines only: progress bars write carriage returns inside one log line.
    for raw in text.split("\n"):
        timestamp, _, line = raw.partition(" ")
        if not _TIMESTAMP.match(timestamp):
            continue  # the empty tail after the last newline
        if key is not None:
            this = _sort_key(timestamp)
            if this < key:
                continue
            if this == key:
                seen_same += 1
                if seen_same <= cursor.seen_at_timestamp:
                    continue
        out.lines.append(line)
        if timestamp == out.cursor.timestamp:
            out.cursor.seen_at_timestamp += 1
        else:
            out.cursor = LogCursor(timestamp, 1)
    return out


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def _sort_key(timestamp: str) -> tuple[str, str]:
    """RFC3339Nano strings sort by (second, fraction) once the fraction is padded."""
    seconds, _, rest = timestamp.partition(".")
    fraction = rest.rstrip("Z") if rest else ""
    return seconds.rstrip("Z"), fraction.ljust(9, "0")


def find_result(log_text: str) -> dict[str, Any] | None:
    """The trainer's result line (RunResult.to_xcom() JSON) in a log text; None when absent or damaged."""
    return find_json_line(log_text, RESULT_PREFIX)


def find_plan(log_text: str) -> dict[str, Any] | None:
    """The plan ``lora-train --plan`` printed, in a log text; None when absent or damaged."""
    return find_json_line(log_text, PLAN_PREFIX)


class PlanRefused(ValueError):
    """The trainer's plan says the training cannot run as asked (it does not fit, or its data or model is
    refused); ``plan`` holds the plan when one was made."""

    def __init__(self, message: str, plan: dict[str, Any] | None):
        super().__init__(message)
        self.plan = plan


def find_json_line(log_text: str, prefix: str) -> dict[str, Any] | None:
    """The JSON object on the last line starting with ``prefix`` in a log text; None when absent or damaged.

    The container runtime cuts lines longer than 16 KiB into parts, and a ``timestamps=true`` log puts each part's
    timestamp in front of it, glued to the previous part: those timestamps are taken out again."""
    for raw in reversed(log_text.split("\n")):
        _, _, line = raw.partition(" ") if raw[:4].isdigit() else ("", "", raw)
        if line.startswith(prefix):
            text = line[len(prefix):]
            for candidate in (text, _PART_TIMESTAMP.sub("", text)):
                try:
                    return json.loads(candidate)
                except ValueError:
                    continue
            return None
    return None


_PART_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{1,9}Z ")


def seconds_since(timestamp: str | None, now: datetime | None = None) -> float:
    if not timestamp:
        return 0.0
    then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return ((now or datetime.now(timezone.utc)) - then).total_seconds()
