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
from airflow_provider_lora.core.launchers.pod import PlanRefused, find_plan
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
                    work_dir: str | Path | None = None, plan: list[str] | None = None) -> list[str]:
    """argv that runs the trainer on a spec file; torchrun when more than one process is asked for."""
    python = python or sys.executable
    if nproc > 1:
        argv = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                "lora_trainer"]
    else:
        argv = [python, "-m", "lora_trainer"]
    argv += ["--spec", str(spec_path)]
    if plan is not None:  # the preflight plan's flags: nothing is trained
        argv += ["--plan", *plan]
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
    code, last = _run_trainer(spec, on_line, python, env, dict(nproc=spec.procs_per_worker, work_dir=work_dir))
    if code != 0:
        raise TrainingFailed(_failure(code, last), list(last))
    return load_run_result(spec.output_uri, client=client)


def plan_local(spec: LoRASpec, *, on_line: Callable[[str], None] = print, python: str | None = None,
               env: dict[str, str] | None = None, memory_gib: float | None = None) -> dict[str, Any]:
    """The dry run on this machine: the trainer's preflight plan of ``spec`` (its time measured here, where the
    training would run), as a dict; PlanRefused when the trainer refuses the run, TrainingFailed otherwise."""
    flags = [] if memory_gib is None else ["--plan-memory-gib", f"{memory_gib:g}"]
    plan_lines: list[str] = []

    def keep(line: str) -> None:
        if find_plan(line) is not None:
            plan_lines.append(line)
        on_line(line)
    code, last = _run_trainer(spec, keep, python, env, dict(plan=flags))
    plan = find_plan(plan_lines[-1]) if plan_lines else None
    if code == 0 and plan is not None:
        return plan
    errors = [line.removeprefix(ERROR_PREFIX) for line in last if line.startswith(ERROR_PREFIX)]
    if errors:
        raise PlanRefused(errors[-1], plan)
    raise TrainingFailed(_failure(code, last), list(last))


def _run_trainer(spec: LoRASpec, on_line: Callable[[str], None], python: str | None, env: dict[str, str] | None,
                 command: dict[str, Any]) -> tuple[int, collections.deque]:
    """Run the trainer on ``spec`` (trainer_command's ``command`` options), each output line to ``on_line``: its
    exit code and last lines."""
    with tempfile.TemporaryDirectory(prefix="lora-spec-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(spec.to_json())
        child_env = {**os.environ, **spec.env_vars, **(env or {}), "PYTHONUNBUFFERED": "1"}
        last: collections.deque = collections.deque(maxlen=LAST_LINES_KEPT)
        argv = trainer_command(spec_path, python=python, **command)
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env,
                              bufsize=1) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                last.append(line)
                on_line(line)
            return proc.wait(), last


def _failure(code: int, last: collections.deque) -> str:
    reason = f"the trainer exited with code {code}"
    if code < 0:
        reason = f"the trainer was killed by signal {-code}"
    errors = [line for line in last if line.startswith(ERROR_PREFIX.rstrip())]
    if errors:
        reason += ": " + errors[-1].removeprefix(ERROR_PREFIX)
    return reason
