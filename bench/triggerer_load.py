"""Triggerer load: N concurrent LoRATrainingTrigger instances (the shared watch, and polling) against
KubernetesPodTrigger following as many pods.

Both triggers run as a triggerer runs them: their async ``run()`` generators as tasks of one asyncio loop in this
process. The Kubernetes API is the emulated server (tests/k8s/emulator.py, HTTPS with its own CA, bearer token),
started in a separate process by bench/emulator_runner.py so that its CPU is not counted here. Its pods are cheap
stand-ins (``sh -c 'echo started; exec sleep 900'``) that stay Running while measured.

For each N the two triggers are measured one after the other (the order alternates between sizes), each over a
fixed window after a warm-up, in a fresh event loop:

- requests: every request the emulator served during the window, counted in its own request log: pod status reads
  (GET .../pods/NAME: KubernetesPodTrigger's and the polling LoRATrainingTrigger's one per poll), the shared watch's
  lists and watches (GET .../pods), log reads (LoRATrainingTrigger reads the log since its cursor every
  log_interval, 30 s by default), cursor patches.
- CPU: user + system seconds of this process (resource.getrusage) over the window, per trigger and minute (what a
  deferred training costs the triggerer), and per 1,000 polls for the polling kinds.
- achieved vs nominal poll rate: polls / window against N / poll_interval.
- event-loop lag: a sampler task sleeps 10 ms in a loop and records how late it wakes (max, p99, sum / window).
- state change to event: after the window the emulator deletes LATENCY_PODS pods at once (grace 0); the seconds
  from just before the first delete to each of their triggers' events (p50, p99).

    .venv/bin/python bench/triggerer_load.py [--sizes 10 100 500] [--window 20] [--poll-interval 2]
    .venv/bin/python bench/triggerer_load.py --quick      # 10 pods, 3 s window (CI smoke)

The last lines are the ratios, KubernetesPodTrigger's over LoRATrainingTrigger's (shared watch): CPU seconds per
trigger-minute and requests per second; then the polling LoRATrainingTrigger's over the shared watch's; and, as
before the shared watch, CPU seconds per 1,000 polls of KubernetesPodTrigger over the polling LoRATrainingTrigger.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONN_ID = "lora_bench_k8s"
LATENCY_PODS = 20  # pods whose state changes after the window: the state change to event delay


class Emulator:
    """The emulator runner process and its line protocol (see bench/emulator_runner.py)."""

    def __init__(self, pods: int):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "emulator_runner.py"), "--pods", str(pods)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"emulator runner exited with {self.proc.wait()} before it was ready")
        self.info = json.loads(line)

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


KINDS = ("LoRATrainingTrigger", "KubernetesPodTrigger", "LoRATrainingTrigger(watch=False)",
         "LoRATrainingTrigger(stream_logs=False)")


def make_triggers(kind: str, names: list[str], namespace: str, poll_interval: float) -> list:
    if kind == "idle":
        return []
    if kind.startswith("LoRATrainingTrigger"):
        from airflow_provider_lora.triggers.lora import LoRATrainingTrigger

        return [LoRATrainingTrigger(name=n, namespace=namespace, kubernetes_conn_id=CONN_ID,
                                    poll_interval=poll_interval, stream_logs="stream_logs=False" not in kind,
                                    watch="watch=False" not in kind)
                for n in names]
    from airflow.providers.cncf.kubernetes.triggers.pod import KubernetesPodTrigger

    now = dt.datetime.now(dt.timezone.utc)
    return [KubernetesPodTrigger(pod_name=n, pod_namespace=namespace, trigger_start_time=now, base_container_name="base",
                                 kubernetes_conn_id=CONN_ID, poll_interval=poll_interval) for n in names]


async def measure(kind: str, emulator: Emulator, n: int, poll_interval: float, warmup: float, window: float,
                  lockstep: bool, idle_cpu_per_s: float = 0.0) -> dict:
    """One window; ``idle_cpu_per_s`` (the lag sampler's own cost, measured with no trigger) is subtracted."""
    # Collect the garbage of the set-up and of the previous window now, so that a full collection it would cause
    # is not billed to this window (collections caused by the triggers themselves still are).
    gc.collect()
    triggers = make_triggers(kind, emulator.info["pods"][:n], emulator.info["namespace"], poll_interval)
    events: list = []

    async def drain(trigger, delay: float) -> None:
        await asyncio.sleep(delay)
        async for event in trigger.run():
            events.append((time.time(), event.payload))
            return

    lags: list[float] = []

    async def sampler() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(max(0.0, time.perf_counter() - start - 0.01))

    # Steady state: a triggerer picks triggers up as tasks defer, so their polls are spread over the interval.
    # --lockstep starts them all at once instead (a triggerer restart), which makes their polls come in bursts.
    tasks = [asyncio.create_task(drain(t, 0.0 if lockstep else poll_interval * i / n)) for i, t in enumerate(triggers)]
    sampling = asyncio.create_task(sampler())
    # Warm-up: at least ``warmup`` seconds and until the triggers made about two polls each (on a loaded machine
    # their first polls, which also save a log cursor on the pod, can take longer than the nominal time).
    emulator.ask("reset")
    started = time.perf_counter()
    while time.perf_counter() - started < 60:
        await asyncio.sleep(0.5)
        counts = json.loads(emulator.ask("count"))
        # Polling kinds: about two polls each; the shared watch: listed, watching, each log read once.
        if time.perf_counter() - started >= warmup and (
                counts["pod_reads"] >= 2 * n or counts["lists_and_watches"] >= 2 and counts["log_reads"] >= n):
            break
    emulator.ask("reset")
    lags.clear()
    # Full (generation 2) garbage collections stop the loop; record them to tell them from the triggers' own work.
    full_gcs: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                full_gcs.append(time.perf_counter())
            elif full_gcs:
                full_gcs[-1] = time.perf_counter() - full_gcs[-1]

    gc.callbacks.append(on_gc)
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.sleep(window)
    usage1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
    gc.callbacks.remove(on_gc)
    counts = json.loads(emulator.ask("count"))
    measured_lags = list(lags)
    if events:  # a pod ended or the API failed during the window: the figures would be wrong
        raise SystemExit(f"{kind}: {len(events)} trigger(s) fired during the window, first: {events[0][1]}")
    delays: list[float] = []
    if n:
        ended = json.loads(emulator.ask(f"end {min(n, LATENCY_PODS)}"))
        wanted = set(ended["names"])
        deadline = time.perf_counter() + 2 * poll_interval + 30
        while len([e for e in events if e[1].get("name", e[1].get("pod_name")) in wanted]) < len(wanted) \
                and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        delays = sorted(t - ended["at"] for t, payload in events
                        if payload.get("name", payload.get("pod_name")) in wanted)
    # Cancelled mid-request, KubernetesPodTrigger's per-poll aiohttp sessions log "Unclosed client session".
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    pending = {*tasks, sampling}
    for _ in range(20):
        # Some KubernetesPodTrigger tasks outlived one cancel() (seen with 500 on a loaded machine: the run hung in
        # gather), so cancel until every task has ended.
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
        if not pending:
            break
    else:
        raise SystemExit(f"{kind}: {len(pending)} trigger task(s) still running after 20 cancel() rounds")
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    if kind.startswith("LoRATrainingTrigger"):
        from airflow_provider_lora.kube import close_shared_clients

        await close_shared_clients()
    if n:
        emulator.ask("restore")
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime) - idle_cpu_per_s * wall
    polls = counts["pod_reads"]
    requests = sum(counts.values())
    lags_ms = sorted(x * 1000 for x in measured_lags) or [0.0]
    return {
        "kind": kind, "pods": n, "window_s": wall, "cpu_s": cpu, "polls": polls, "requests": requests,
        # A watch opened before the window is a request held open through it: counted as one.
        "requests_per_s": max(requests, 1) / wall,
        "cpu_s_per_trigger_minute": 60 * cpu / (n * wall) if n else float("nan"),
        "cpu_ms_per_poll": 1000 * cpu / polls if polls else float("nan"),
        "cpu_s_per_1000_polls": 1000 * cpu / polls if polls else float("nan"),
        "poll_rate": polls / wall, "nominal_rate": n / poll_interval if n else float("nan"),
        "lag_max_ms": lags_ms[-1], "lag_p99_ms": lags_ms[min(len(lags_ms) - 1, int(0.99 * len(lags_ms)))],
        "lag_share": sum(lags_ms) / 1000 / wall, "counts": counts,
        "events_seen": len(delays), "delay_p50_s": _percentile(delays, 50), "delay_p99_s": _percentile(delays, 99),
        "full_gcs": len(full_gcs), "full_gc_max_ms": 1000 * max(full_gcs, default=0.0),
    }


def _percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured per trigger kind and size")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the window (default: 2.5 x poll "
                                                                   "interval)")
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--lockstep", action="store_true", help="start all triggers at once (default: spread over "
                                                                   "one poll interval)")
    parser.add_argument("--quick", action="store_true", help="10 pods, 3 s window: a smoke run for CI")
    parser.add_argument("--status-only-variant", action="store_true",
                        help="also measure LoRATrainingTrigger with stream_logs=False (pod status reads only)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, help="measure only these (no ratios unless all three)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.window = [10], 3.0
    warmup = args.warmup if args.warmup is not None else 2.5 * args.poll_interval
    # The triggers' info lines (pod reached Running, ...) would drown the figures; warnings still show.
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")

    # A private Airflow home, and the connection both triggers use, from the environment (no metadata DB needed).
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bench-airflow-"))
    emulator = Emulator(max(args.sizes))
    try:
        os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps(
            {"conn_type": "kubernetes", "extra": {"kube_config_path": emulator.info["kubeconfig"]}})
        # Import both up front so neither pays module loading inside its window.
        import airflow.providers.cncf.kubernetes.triggers.pod  # noqa: F401
        import airflow_provider_lora.triggers.lora  # noqa: F401

        # The lag sampler wakes 100 times a second; its CPU, measured alone, is not the triggers' cost.
        idle = asyncio.run(measure("idle", emulator, 0, args.poll_interval, 0.5, min(args.window, 5.0), False))
        idle_cpu_per_s = idle["cpu_s"] / idle["window_s"]
        print(f"lag sampler alone: {idle_cpu_per_s * 1000:.1f} CPU ms/s (subtracted below); loop lag max "
              f"{idle['lag_max_ms']:.0f} ms, p99 {idle['lag_p99_ms']:.1f} ms", flush=True)
        results = []
        kinds = args.kinds or list(KINDS if args.status_only_variant else KINDS[:3])
        for i, n in enumerate(args.sizes):
            for kind in (kinds if i % 2 == 0 else kinds[::-1]):
                result = asyncio.run(measure(kind, emulator, n, args.poll_interval, warmup, args.window,
                                             args.lockstep, idle_cpu_per_s))
                results.append(result)
                print(f"{kind:38s} {n:4d} pods: {result['requests']} requests ({result['requests_per_s']:.1f}/s; "
                      f"{result['polls']} pod reads) in {result['window_s']:.1f} s; CPU {result['cpu_s']:.2f} s = "
                      f"{result['cpu_s_per_trigger_minute'] * 1000:.1f} ms per trigger-minute, "
                      f"state change to event p50 {result['delay_p50_s']:.2f} s, p99 {result['delay_p99_s']:.2f} s "
                      f"({result['events_seen']} events), "
                      f"{result['cpu_s_per_1000_polls']:.2f} s per 1,000 polls; loop lag "
                      f"max {result['lag_max_ms']:.0f} ms, p99 {result['lag_p99_ms']:.1f} ms, "
                      f"total/wall {result['lag_share']:.1%}; {result['full_gcs']} full GC(s), longest "
                      f"{result['full_gc_max_ms']:.0f} ms", flush=True)
    finally:
        emulator.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    by = {(r["kind"], r["pods"]): r for r in results}
    ours, kpt, polling = KINDS[0], KINDS[1], KINDS[2]
    for n in args.sizes if {ours, kpt, polling} <= set(kinds) else []:
        for other in (kpt, polling):
            for metric, what in (("cpu_s_per_trigger_minute", "CPU s per trigger-minute"),
                                 ("requests_per_s", "requests per second")):
                ratio = by[other, n][metric] / by[ours, n][metric]
                print(f"ratio {other} / {ours} {what} at {n} pods: {ratio:.2f}x")
        ratio = by[kpt, n]["cpu_s_per_1000_polls"] / by[polling, n]["cpu_s_per_1000_polls"]
        print(f"ratio {kpt} / {polling} CPU s per 1,000 polls at {n} pods: {ratio:.2f}x")
        if (KINDS[3], n) in by:
            ratio = by[kpt, n]["cpu_s_per_1000_polls"] / by[KINDS[3], n]["cpu_s_per_1000_polls"]
            print(f"ratio {kpt} / {KINDS[3]} CPU s per 1,000 polls at {n} pods: {ratio:.2f}x")


if __name__ == "__main__":
    main()
