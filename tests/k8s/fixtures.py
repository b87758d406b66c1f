"""The `k8s_cluster` fixture: a fresh emulated cluster per test (see emulator.py for what it emulates)."""

from __future__ import annotations

import pytest

from tests.k8s.emulator import Cluster


@pytest.fixture
def k8s_cluster(tmp_path):
    """A running `Cluster` rooted in tmp_path/k8s: `.kubeconfig`, `.url`, `.token`, `.ca_file`, helpers, faults."""
    cluster = Cluster(tmp_path / "k8s")
    try:
        yield cluster
    finally:
        cluster.stop()
