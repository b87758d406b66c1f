"""Load: 200 LoRA tasks deferred at once in one triggerer.

200 LoRATrainingTrigger.run() generators run as tasks of one asyncio loop, as the triggerer runs them, against the
emulated API server, which runs in its own process so its CPU and GIL stay out of the triggerer's figures. Each pod
is a cheap stand-in for the trainer (``sh -c``: a few log lines, a pause, then a result line with the task's own
number), so 200 pods do not mean 200 Python processes.

Asserted: every trigger fires exactly one success event for its own pod; the lines it copied into its task log are
its own pod's, each once and in order; the result the operator would read from the pod's log is that task's.
Measured and printed (no assertion on speed): event-loop lag (a sampler coroutine), the triggerer's CPU time, wall
time, and the API requests served. Figures: docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from airflow_provider_lora.core.launchers.pod import find_result
from airflow_provider_lora.core.launchers.cluster import LaunchedPod
from airflow_provider_lora.kube import close_shared_clients
from airflow_provider_lora.triggers.lora import LoRATrainingTrigger

pytestmark = pytest.mark.slow
TASKS = 200
POLL_INTERVAL = 1.0
REPO = Path(__file__).resolve().parents[1]

# The emulator in a child process: prints its kubeconfig, serves until stdin closes, then prints its request count.
RUNNER = """
import json, sys
from tests.k8s.emulator import Cluster
cluster = Cluster(sys.argv[1], schedule_delay=0.05)
print(json.dumps({"kubeconfig": str(cluster.kubeconfig)}), flush=True)
sys.stdin.read()
print(json.dumps({"requests": len(cluster.request_log)}), flush=True)
cluster.stop()
"""


def stand_in_pod(i: int) -> dict:
    result = json.dumps({"summary": {"global_step": i, "final_loss": i / 1000}, "history": [],
                         "artifacts": {"root": f"s3://load/run-{i}"}})
    script = (f"echo 'task {i} line 1'; sleep 15; echo 'task {i} line 2'; sleep 2; "
              f"echo 'LORA_RESULT {result}'")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"load-{i:03d}", "namespace": "default"},
            "spec": {"restartPolicy": "Never", "containers": [
                {"name": "trainer", "image": "busybox", "command": ["sh", "-c", script]}]}}


class PerTaskLog(logging.Handler):
    """Collects each trigger's task-log lines by the logger it was given."""

    def __init__(self):
        super().__init__()
        self.lines: dict[str, list[str]] = {}

    def emit(self, record):
        self.lines.setdefault(record.name, []).append(record.getMessage())


def test_200_deferred_tasks_in_one_triggerer_each_get_their_own_result(tmp_path, capsys):
    from kubernetes import client, config

    emulator = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path / "k8s")], cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        kubeconfig = json.loads(emulator.stdout.readline())["kubeconfig"]
        api = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
        created = time.perf_counter()
        for i in range(TASKS):
            api.create_namespaced_pod("default", stand_in_pod(i))
        created = time.perf_counter() - created

        handler = PerTaskLog()
        triggers = []
        for i in range(TASKS):
            t = LoRATrainingTrigger(name=f"load-{i:03d}", namespace="default", kubernetes_conn_id=None,
                                    config_file=kubeconfig, poll_interval=POLL_INTERVAL, startup_timeout=300)
            logger = logging.getLogger(f"load.task-{i:03d}")
            logger.handlers, logger.propagate, logger.level = [handler], False, logging.INFO
            t._log = logger
            triggers.append(t)
        phases = [p.status.phase for p in api.list_namespaced_pod("default").items]
        unfinished = sum(phase in ("Pending", "Running") for phase in phases)
        assert unfinished == TASKS  # every task is deferred while its pod runs
        figures = asyncio.run(run_like_a_triggerer(triggers))

        for i, (t, events) in enumerate(zip(triggers, figures["events"])):
            assert len(events) == 1, (t.name, events)
            assert events[0]["status"] == "success" and events[0]["name"] == t.name, events[0]
            shown = handler.lines.get(f"load.task-{i:03d}", [])
            copied = [line for line in shown if line.startswith(f"[{t.name}] ")]
            assert copied[:2] == [f"[{t.name}] task {i} line 1", f"[{t.name}] task {i} line 2"], shown
            assert len(copied) == 3 and copied[2].startswith(f"[{t.name}] LORA_RESULT "), shown  # once each
            result = find_result(LaunchedPod(api, t.name, "default").log_tail(t.name, 20))  # what the operator reads back
            assert result["summary"]["global_step"] == i and result["artifacts"]["root"] == f"s3://load/run-{i}"
    finally:
        out, _ = emulator.communicate("", timeout=120)
    requests = json.loads(out.strip().splitlines()[-1])["requests"]
    lag = figures["lag"]
    with capsys.disabled():
        print(f"\n[load] {TASKS} pods created in {created:.1f}s; {TASKS} deferred tasks, poll_interval "
              f"{POLL_INTERVAL}s: all done in {figures['wall']:.1f}s "
              f"wall; triggerer CPU {figures['cpu']:.2f}s ({figures['cpu'] / figures['wall'] * 100:.0f}% of one "
              f"core); event-loop lag p50 {lag['p50']*1000:.1f} ms, p99 {lag['p99']*1000:.1f} ms, max "
              f"{lag['max']*1000:.1f} ms over {lag['samples']} samples; {requests} API requests served")


async def run_like_a_triggerer(triggers: list[LoRATrainingTrigger]) -> dict:
    """Each trigger's run() as a task of this loop (as the triggerer does), plus a lag sampler; CPU is this
    thread's (the emulator is another process)."""
    lags: list[float] = []
    done = asyncio.Event()

    async def sampler(period: float = 0.05):
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(period)
            lags.append(time.perf_counter() - before - period)

    async def collect(t: LoRATrainingTrigger) -> list[dict]:
        return [event.payload async for event in t.run()]

    cpu0, wall0 = time.thread_time(), time.perf_counter()
    sampling = asyncio.ensure_future(sampler())
    try:
        events = await asyncio.wait_for(asyncio.gather(*(collect(t) for t in triggers)), timeout=240)
    finally:
        done.set()
        await sampling
        await close_shared_clients()
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    ordered = sorted(lags)
    return {"events": events, "cpu": cpu, "wall": wall,
            "lag": {"p50": statistics.median(ordered), "p99": ordered[int(len(ordered) * 0.99) - 1],
                    "max": ordered[-1], "samples": len(ordered)}}
