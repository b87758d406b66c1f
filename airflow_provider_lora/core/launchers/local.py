"""Local launcher: run the bundled trainer as a subprocess on this machine (a laptop, or an Airflow worker).

The trainer runs in its own process so a crash, an out-of-memory kill or a CUDA error never takes the caller down,
and so the caller (an Airflow worker) never imports torch.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from airflow_provider_lora.core.contract import ERROR_PREFIX
from airflow_provider_lora.core.results import RunResult, load_run_result
from airflow_provider_lora.core.spec import LoRASpec

LOCAL_LAUNCHER = "local"  # the training runs in a subprocess of the launching process (a worker, a KFP task)

LAST_LINES_KEPT = 40


class TrainingFailed(RuntimeError):
    """The training process ended without a completed run; carries the reason and its last log lines."""

    def __init__(self, reason: str, last_lines: list[str]):
        self.reason = reason
        self.last_lines = last_lines
        tail = "\n".join(last_lines)
        super().__init__(f"{reason}\nlast lines of the trainer's output:\n{tail}")


def trainer_command(spec_path: str | Path, *, python: str | None = None, nproc: int = 1,
                    work_dir: str | Path | None = None) -> list[str]:
    """argv that runs the trainer on a spec file; torchrun when more than one process is asked for."""
    python = python or sys.executable
    if nproc > 1:
        argv = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                "lora_trainer"]
    else:
        argv = [python, "-m", "lora_trainer"]
    argv += ["--spec", str(spec_path)]
    if work_dir is not None:
        argv += ["--work-dir", str(work_dir)]
    return argv


def run_local(spec: LoRASpec, *, on_line: Callable[[str], None] = print, python: str | None = None,
              env: dict[str, str] | None = None, work_dir: str | Path | None = None,
              client: Any = None) -> RunResult:
    """Train ``spec`` in a subprocess, streaming its output lines to ``on_line``; return the published result.

    This machine is the one worker: ``resource_num_procs_per_worker`` processes train on it (torchrun when more
    than one). ``env`` adds variables for the child after ``spec.envs`` (so a caller can pass secrets that the
    spec must not carry). ``client``: the S3 client that reads an ``s3://`` result back (default: boto3's)."""
    if spec.resource_num_workers != 1:
        raise ValueError(f"resource_num_workers={spec.resource_num_workers} needs a cluster: the local launcher runs "
                         "one worker; use the pod or trainjob launcher, or set resource_num_workers=1")
    nproc = spec.procs_per_worker
    with tempfile.TemporaryDirectory(prefix="lora-spec-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(spec.to_json())
        child_env = {**os.environ, **spec.env_vars, **(env or {}), "PYTHONUNBUFFERED": "1"}
        last = collections.deque(maxlen=LAST_LINES_KEPT)
        argv = trainer_command(spec_path, python=python, nproc=nproc, work_dir=work_dir)
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env,
                              bufsize=1) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                last.append(line)
                on_line(line)
            code = proc.wait()
    if code != 0:
        reason = f"the trainer exited with code {code}"
        if code < 0:
            reason = f"the trainer was killed by signal {-code}"
        errors = [line for line in last if line.startswith(ERROR_PREFIX.rstrip())]
        if errors:
            reason += ": " + errors[-1].removeprefix(ERROR_PREFIX)
        raise TrainingFailed(reason, list(last))
    return load_run_result(spec.output_uri, client=client)
