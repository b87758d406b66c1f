"""Pure pieces of the pod launcher: reading pod status, and following logs by cursor."""

from __future__ import annotations

from hypothesis import given, strategies as st

from airflow_provider_lora.core.launchers.pod import LogCursor, classify_pod, find_result, new_log_lines


def _stamp(i: int) -> str:
    # Several lines share a second, and some share the exact same nanosecond timestamp.
    return f"2026-11-28T10:00:{i // 7:02d}.{(i // 2) * 1000:09d}Z"


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\n"), max_size=20), max_size=60),
       st.integers(0, 60))
def test_two_reads_show_every_line_exactly_once(lines, split):
    """What a restarted follower sees: the first read up to some line, then a read from the saved cursor's
    second (as sinceTime returns it: whole seconds, so earlier lines of that second come again)."""
    split = min(split, len(lines))
    log = [f"{_stamp(i)} {line}" for i, line in enumerate(lines)]
    first = new_log_lines("\n".join(log[:split]) + "\n", LogCursor())
    cursor = LogCursor.decode(first.cursor.encode())  # as stored in the pod annotation
    since = cursor.since_time()
    again = [entry for entry in log if since is None or entry[:19] + "Z" >= since]
    second = new_log_lines("\n".join(again) + "\n", cursor)
    assert first.lines + second.lines == lines


def test_carriage_returns_stay_inside_their_line():
    text = "2026-11-28T11:29:05.1Z 10%\r50%\rDropping\n2026-11-28T11:29:05.2Z next\n"
    new = new_log_lines(text, LogCursor())
    assert new.lines == ["10%\r50%\rDropping", "next"] and new.cursor.timestamp == "2026-11-28T11:29:05.2Z"


def test_the_result_line_is_found_in_a_timestamped_tail():
    tail = '2026-11-28T10:00:00.1Z progress\n2026-11-28T10:00:00.2Z LORA_RESULT {"summary": {"global_step": 3}}\n'
    assert find_result(tail) == {"summary": {"global_step": 3}}
    assert find_result("2026-11-28T10:00:00.1Z no result here\n") is None


def _pod(phase, reason=None, container=None, conditions=(), deleting=False):
    status = {"phase": phase, "conditions": list(conditions)}
    if reason:
        status["reason"] = reason
    if container:
        status["containerStatuses"] = [{"name": "trainer", "state": container}]
    metadata = {"deletionTimestamp": "2026-11-28T10:00:00Z"} if deleting else {}
    return {"metadata": metadata, "status": status}


def test_pod_status_reasons():
    oom = classify_pod(_pod("Failed", container={"terminated": {"exitCode": 137, "reason": "OOMKilled"}}))
    assert (oom.phase, oom.reason, oom.exit_code) == ("failed", "OOMKilled", 137)
    assert classify_pod(_pod("Failed", reason="Evicted")).reason == "Evicted"
    assert classify_pod(_pod("Failed", reason="DeadlineExceeded")).reason == "DeadlineExceeded"
    lost = _pod("Running", conditions=[{"type": "DisruptionTarget", "status": "True",
                                        "reason": "DeletionByTaintManager"}], deleting=True)
    assert classify_pod(lost).reason == "NodeLost"
    assert classify_pod(_pod("Running", deleting=True)).reason == "Deleted"
    pull = classify_pod(_pod("Pending", container={"waiting": {"reason": "ImagePullBackOff"}}))
    assert (pull.phase, pull.reason, pull.stuck) == ("pending", "ImagePullBackOff", False)  # may clear: waits
    for reason, message in [  # the registry says the image or tag does not exist: waiting does not help
        ("ErrImagePull", 'rpc error: code = NotFound desc = failed to pull and unpack image "r.example/t:9": '
                         'failed to resolve reference "r.example/t:9": r.example/t:9: not found'),
        ("ImagePullBackOff", 'Back-off pulling image "quay.io/t/t:9": ErrImagePull: reading manifest 9 in '
                             "quay.io/t/t: manifest unknown"),
    ]:
        missing = classify_pod(_pod("Pending", container={"waiting": {"reason": reason, "message": message}}))
        assert (missing.reason, missing.stuck) == ("ImageNotFound", True), message
        assert missing.message == f"{reason}: {message}"
    for message in [  # may clear: a pull secret added, the registry back
        'rpc error: code = Unknown desc = failed to pull and unpack image "r.example/t:9": failed to authorize: '
        "failed to fetch anonymous token: unexpected status: 401 Unauthorized",
        'Error response from daemon: pull access denied for t, repository does not exist or may require '
        "authorization",
        "dial tcp 10.0.0.7:443: i/o timeout"]:
        denied = classify_pod(_pod("Pending", container={"waiting": {"reason": "ErrImagePull", "message": message}}))
        assert (denied.reason, denied.stuck) == ("ErrImagePull", False), message
    bad = classify_pod(_pod("Pending", container={"waiting": {"reason": "InvalidImageName"}}))
    assert (bad.reason, bad.stuck) == ("InvalidImageName", True)
    unscheduled = classify_pod(_pod("Pending", conditions=[{"type": "PodScheduled", "status": "False",
                                                            "reason": "Unschedulable", "message": "0/3 nodes"}]))
    assert unscheduled.reason == "Unschedulable" and unscheduled.message == "0/3 nodes"
    done = classify_pod(_pod("Succeeded", container={"terminated": {"exitCode": 0, "message": '{"a": 1}'}}))
    assert done.terminal and done.termination_message == '{"a": 1}'
