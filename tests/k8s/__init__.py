"""An emulated Kubernetes API server and kubelet for tests (see emulator.py)."""
