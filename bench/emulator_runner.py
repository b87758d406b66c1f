"""Runs the emulated Kubernetes API server (tests/k8s/emulator.py) in its own process for bench/triggerer_load.py,
so the server's CPU is not counted as the triggerer's.

It creates ``--pods`` stand-in pods (one cheap ``sh`` that prints a line and then execs ``sleep``), waits until all
are Running, prints one JSON line ``{"kubeconfig": ..., "namespace": ..., "pods": [...]}`` and then answers commands
read from stdin, one per line:

- ``reset``: start counting requests from now; answers ``ok``.
- ``count``: answers a JSON line with the requests since the last reset, by kind (pod reads, lists and watches, log
  reads, patches, other), counted in the emulator's own request log (every HTTP request it served).
- ``end K``: deletes the first K pods at once (grace 0: a state change the triggers must see) and answers
  ``{"names": [...], "at": <epoch seconds just before the first delete>}``.
- ``restore``: creates again every deleted pod, waits until all are Running, answers ``ok``.

End of stdin stops the cluster (its pods' processes are killed) and the process.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.k8s.emulator import Cluster  # noqa: E402

POD_READ = re.compile(r"^/api/v1/namespaces/[^/]+/pods/[^/]+$")
POD_COLLECTION = re.compile(r"^/api/v1/namespaces/[^/]+/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/[^/]+/pods/[^/]+/log$")


def classify(method: str, path: str) -> str:
    if method == "GET" and POD_READ.match(path):
        return "pod_reads"
    if method == "GET" and POD_COLLECTION.match(path):
        return "lists_and_watches"
    if method == "GET" and POD_LOG.match(path):
        return "log_reads"
    if method == "PATCH":
        return "patches"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, required=True)
    parser.add_argument("--sleep", type=int, default=900, help="seconds each stand-in pod stays Running")
    args = parser.parse_args()

    from kubernetes import client, config

    with tempfile.TemporaryDirectory(prefix="bench-k8s-") as root, Cluster(Path(root) / "k8s") as cluster:
        api = client.CoreV1Api(config.new_client_from_config(str(cluster.kubeconfig)))
        names = [f"bench-{i:04d}" for i in range(args.pods)]

        def create(name: str) -> None:
            api.create_namespaced_pod("default", {
                # The provider's label: the triggerer's shared watch follows the pods that carry it.
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "airflow-provider-lora"}},
                "spec": {"restartPolicy": "Never", "containers": [{
                    "name": "base", "image": "busybox",
                    # exec: one process per pod (sh would otherwise stay as the sleep's parent)
                    "command": ["sh", "-c", f"echo started; exec sleep {args.sleep}"]}]}})

        def all_running() -> None:
            deadline = time.monotonic() + 120
            while True:
                phases = [p["status"].get("phase") for p in cluster.pods("default")]
                if len(phases) == len(names) and all(p == "Running" for p in phases):
                    return
                if time.monotonic() > deadline:
                    sys.exit(f"pods not Running after 120 s: {sorted(set(phases))}")
                time.sleep(0.2)

        for name in names:
            create(name)
        all_running()
        print(json.dumps({"kubeconfig": str(cluster.kubeconfig), "namespace": "default", "pods": names}), flush=True)
        start = len(cluster.request_log)
        for line in sys.stdin:
            command = line.strip()
            if command == "reset":
                start = len(cluster.request_log)
                print("ok", flush=True)
            elif command == "count":
                counts = {"pod_reads": 0, "log_reads": 0, "lists_and_watches": 0, "patches": 0, "other": 0}
                for method, path, _ in cluster.request_log[start:]:
                    counts[classify(method, path)] += 1
                print(json.dumps(counts), flush=True)
            elif command.startswith("end "):
                ended = names[: int(command.split()[1])]
                at = time.time()
                for name in ended:
                    api.delete_namespaced_pod(name, "default", grace_period_seconds=0)
                print(json.dumps({"names": ended, "at": at}), flush=True)
            elif command == "restore":
                present = {p["metadata"]["name"] for p in cluster.pods("default")}
                for name in names:
                    if name not in present:
                        create(name)
                all_running()
                print("ok", flush=True)
            else:
                print(json.dumps({"error": f"unknown command {command!r}; accepted: reset, count, end K, restore"}),
                      flush=True)


if __name__ == "__main__":
    main()
