"""Out-of-memory self-healing (docs/concepts.md, "Out-of-memory policy").

Within one process the trainer catches an out-of-memory error, halves the micro-batch, doubles gradient
accumulation (same effective batch), turns gradient checkpointing on and goes on from its latest checkpoint; the
losses match a run that started with the smaller micro-batch. Across tries (the kernel's OOM kill cannot be caught)
the next try's operator reads the failed pod and renders its pod with the halved settings. At micro-batch 1 the run
stops with a clear error and its own exit code, and is not retried.
"""

from __future__ import annotations

import json
import logging

import pytest

from airflow_provider_lora.core import oom
from airflow_provider_lora.core.contract import OOM_ADJUSTMENTS_KEY, OOM_ERROR, OOM_EXIT_CODE, OOM_SETTINGS_ENV
from airflow_provider_lora.core.spec import LoRASpec, plan_batches
from tests.test_operator_pod import cluster  # noqa: F401  (fixture: the emulator with S3 keys as a secret)
from tests.test_reliability_faults import oom_kill_once_logged
from tests.test_reliability_faults import stand_in  # noqa: F401  (fixture: the pod runs a stand-in script)
from tests.trainer_helpers import arithmetic_rows, history, make_spec, train, write_jsonl

# An allocation no machine can make: the CPU allocator's real failure, not a made-up exception.
IMPOSSIBLE_BYTES = 2**62


def real_allocation_failure():
    import torch

    return torch.empty(IMPOSSIBLE_BYTES, dtype=torch.uint8)


# ---- the rule and the classification (no training) --------------------------------------------------------------

def test_halving_keeps_the_effective_batch_until_micro_batch_1():
    plan = plan_batches(LoRASpec(effective_batch_size=12, max_seq_len=64, max_tokens_per_gpu=256), 1)
    seen = [(plan.micro_batch, plan.grad_accum)]
    while (plan := oom.halved(plan)) is not None:
        seen.append((plan.micro_batch, plan.grad_accum))
        assert plan.micro_batch * plan.grad_accum == 12 and plan.max_tokens_per_micro_batch == plan.micro_batch * 64
    assert seen == [(4, 3), (2, 6), (1, 12)]


def test_out_of_memory_errors_are_told_from_other_errors():
    import torch

    from lora_trainer.oom import is_out_of_memory

    with pytest.raises(RuntimeError) as cpu:
        real_allocation_failure()
    assert is_out_of_memory(cpu.value)  # "DefaultCPUAllocator: can't allocate memory", through accelerate's check
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory."))


# ---- within one process ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", arithmetic_rows(32))  # 4 steps per epoch


def fail_training_steps(monkeypatch, at_steps, error=real_allocation_failure):
    """Make trl's training step run out of memory when it starts optimizer step ``at_steps`` (each once; "all":
    every time). Returns the micro-batch sizes of the steps that failed."""
    from trl import SFTTrainer

    original, failed, done = SFTTrainer.training_step, [], set()

    def training_step(self, model, inputs, *args, **kwargs):
        step = self.state.global_step + 1
        if at_steps == "all" or (step in at_steps and step not in done):
            done.add(step)
            failed.append(len(inputs["input_ids"]))
            error()
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", training_step)
    return failed


def losses(output) -> list[float]:
    return [r["loss"] for r in history(output) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_at_epoch, oom_step, resumed", [(True, 6, "checkpoint-4"), (False, 2, None)])
def test_an_oom_mid_training_halves_the_micro_batch_and_learns_the_same(tiny_model_dir, dataset, tmp_path,
                                                                       monkeypatch, capsys, checkpoint_at_epoch,
                                                                       oom_step, resumed):
    """Two epochs of 4 steps, effective batch 8 at micro-batch 4. A real allocation failure at step 6 resumes from
    the epoch-1 checkpoint; at step 2 (no checkpoint yet) training starts again from step 0 with the adapter's
    initial weights. Either way the losses are those of a run that used micro-batch 2 from the start."""
    settings = dict(num_epochs=2, checkpoint_at_epoch=checkpoint_at_epoch, seed=3)
    reference = train(tiny_model_dir, dataset, tmp_path / "small", max_tokens_per_gpu=128, **settings).summary
    assert (reference["batch"]["micro_batch"], reference["batch"]["grad_accum"]) == (2, 4)

    failed = fail_training_steps(monkeypatch, {oom_step})
    summary = train(tiny_model_dir, dataset, tmp_path / "healed", **settings).summary
    assert failed == [4]  # it did run out of memory, at micro-batch 4
    assert (summary["batch"]["micro_batch"], summary["batch"]["grad_accum"]) == (2, 4)
    assert summary["batch"]["effective_batch_size"] == 8 and summary["gradient_checkpointing"] is True
    assert summary["global_step"] == 8 and (resumed is None) == (summary["resumed_from"] is None)
    assert resumed is None or summary["resumed_from"].endswith(resumed)
    [change] = summary[OOM_ADJUSTMENTS_KEY]
    assert change["micro_batch"] == {"from": 4, "to": 2} and change["grad_accum"] == {"from": 2, "to": 4}
    assert change["gradient_checkpointing"] == {"from": False, "to": True} and change["where"] == "in-process"
    assert "can't allocate memory" in change["why"]
    on_disk = json.loads((tmp_path / "healed" / "summary.json").read_text())
    assert on_disk[OOM_ADJUSTMENTS_KEY] == summary[OOM_ADJUSTMENTS_KEY]
    assert "micro-batch 4 -> 2, gradient accumulation 2 -> 4 (effective batch 8 kept)" in capsys.readouterr().out

    assert [r["step"] for r in history(tmp_path / "healed") if "loss" in r] == list(range(1, 9))  # each step once
    # Same rows per optimizer step, summed in other groupings: equal up to float32 rounding (measured: at most
    # 9e-8 relative with the resume, exactly equal with the restart; a seed-for-seed rerun is exactly equal).
    assert losses(tmp_path / "healed") == pytest.approx(losses(tmp_path / "small"), rel=1e-6)


@pytest.mark.slow
def test_out_of_memory_at_micro_batch_1_stops_with_a_clear_error(tiny_model_dir, dataset, tmp_path, monkeypatch,
                                                                  capsys):
    import torch

    from lora_trainer.train import main_entry

    def cuda_oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 has a total capacity "
                                     "of 22.05 GiB of which 1.20 GiB is free.")

    failed = fail_training_steps(monkeypatch, "all", cuda_oom)
    spec = make_spec(tiny_model_dir, dataset, tmp_path / "run", max_tokens_per_gpu=128, max_steps=2)  # micro 2
    assert main_entry(spec) == OOM_EXIT_CODE
    assert failed == [2, 1]  # halved once, then nothing left to halve
    out, err = capsys.readouterr()
    assert "micro-batch 2 -> 1, gradient accumulation 4 -> 8 (effective batch 8 kept)" in out
    [line] = [line for line in err.splitlines() if line.startswith(OOM_ERROR)]
    assert line.startswith(OOM_ERROR + "at micro-batch 1 (CUDA out of memory. Tried to allocate 3.50 GiB")
    for advice in ("4-bit", "max_seq_len", "lora_r", "more memory"):
        assert advice in line
    assert not (tmp_path / "run" / "summary.json").exists()


# ---- across tries: the operator reads the pod the last try left -----------------------------------------------

ECHO_SETTINGS = (f"import os, time\nprint('settings', os.environ.get({OOM_SETTINGS_ENV!r}), flush=True)\n"
                 "for i in range(400):\n    print('working', i, flush=True)\n    time.sleep(0.05)")


def trainer_env(cluster) -> dict[str, str]:
    [pod] = cluster.pods()
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env", [])}


def task_log(caplog, capfd) -> str:
    """What the operator logged (Airflow 3's task logger writes to the process's streams, Airflow 2's to logging)."""
    return caplog.text + "".join(capfd.readouterr())


def test_each_oom_killed_try_halves_the_last_and_micro_batch_1_fails_clearly(k8s_cluster, stand_in, caplog,
                                                                               capfd):
    """The stand-in trainer is killed by the kernel (OOMKilled, exit 137) on tries 1-3: tries 2 and 3 run with
    micro-batches 2 and 1 (effective batch 8), taking the last try's values from its failed pod; try 4 has nothing
    left to halve and fails without launching, saying so."""
    from airflow_provider_lora.compat import AirflowException, AirflowFailException
    from tests.test_reliability_faults import StandInTI, fail_with, operator

    caplog.set_level(logging.INFO)
    stand_in["script"] = ECHO_SETTINGS
    task = dict(effective_batch_size=8, max_seq_len=64, max_tokens_per_gpu=256)  # micro-batch 4
    seen = []
    for try_number in (1, 2, 3):
        k8s_cluster.set_fault("oom", pod="lora-*", after_lines=3)
        assert "OOMKilled" in fail_with(k8s_cluster, operator(k8s_cluster, **task), StandInTI(try_number))
        seen.append(oom.read_settings(trainer_env(k8s_cluster).get(OOM_SETTINGS_ENV)))
    assert seen[0] is None
    assert [s["micro_batch"] for s in seen[1:]] == [2, 1]
    assert [(c["micro_batch"], c["grad_accum"]) for c in seen[2]["adjustments"]] == [
        ({"from": 4, "to": 2}, {"from": 2, "to": 4}), ({"from": 2, "to": 1}, {"from": 4, "to": 8})]
    assert seen[2]["adjustments"][0]["where"] == "retry (try 2)" and "OOMKilled" in seen[2]["adjustments"][0]["why"]
    assert "retry (try 2), micro-batch 4 -> 2, gradient accumulation 2 -> 4" in task_log(caplog, capfd)

    with pytest.raises(AirflowFailException) as info:  # not retried
        operator(k8s_cluster, **task).execute({"ti": StandInTI(4)})
    message = str(info.value)
    assert "try 3 ran out of memory at micro-batch 1" in message and "memory limit 1Gi" in message
    assert "4-bit" in message
    assert isinstance(info.value, AirflowException)


def test_a_retry_cannot_halve_when_the_failed_pod_was_deleted_and_says_so(k8s_cluster, stand_in, caplog, capfd):
    from tests.test_reliability_faults import StandInTI, fail_with, operator

    caplog.set_level(logging.INFO)
    stand_in["script"] = ECHO_SETTINGS
    k8s_cluster.set_fault("oom", pod="lora-*", after_lines=3)
    fail_with(k8s_cluster, operator(k8s_cluster, on_finish_action="delete_pod"), StandInTI(1))
    assert k8s_cluster.pods() == []
    stand_in["script"] = "print('LORA_RESULT ' + __import__('json').dumps({'summary': {'global_step': 1}}))"
    operator(k8s_cluster, on_finish_action="delete_pod").execute({"ti": StandInTI(2)})
    [said] = [line for line in task_log(caplog, capfd).splitlines() if "cannot be read" in line]
    assert "on_finish_action='delete_pod', which deletes failed runs too" in said and "not a halved one" in said


def test_the_trainers_own_oom_error_at_micro_batch_1_is_not_retried(k8s_cluster, stand_in):
    from airflow_provider_lora.compat import AirflowFailException
    from tests.test_reliability_faults import StandInTI, operator

    stand_in["script"] = (f"import sys\nprint({OOM_ERROR!r} + 'out of memory at micro-batch 1', file=sys.stderr)\n"
                          f"sys.exit({OOM_EXIT_CODE})")
    with pytest.raises(AirflowFailException, match="not retried: out of memory at micro-batch 1"):
        operator(k8s_cluster).execute({"ti": StandInTI(1)})


@pytest.mark.slow
def test_an_oom_killed_training_pod_is_retried_with_half_the_micro_batch_and_resumes(
        cluster, tiny_model_dir, tmp_path, s3_endpoint, monkeypatch):  # noqa: F811
    """The real trainer in an emulated pod, output on a PVC: try 1 (micro-batch 4 x accumulation 2) is OOM-killed
    in epoch 2; try 2 runs micro-batch 2 x accumulation 4, resumes from try 1's epoch-1 checkpoint, and its
    result (XCom) and summary.json say what was changed and why."""
    from airflow_provider_lora.compat import AirflowException
    from airflow_provider_lora.core import render
    from tests.test_operator_pod import operator
    from tests.test_reliability_faults import StandInTI

    monkeypatch.setattr(render, "WORK_DIR", str(cluster.root / "lora-work"))
    mount = str(cluster.root / "mnt" / "lora")
    claim = cluster.root / "pvc" / "default" / "workspace"
    write_jsonl(claim / "data" / "train.jsonl", arithmetic_rows(32))

    def task():
        return operator(tiny_model_dir, f"{mount}/data/train.jsonl", f"{mount}/runs/oom", s3_endpoint,
                        deferrable=False, num_epochs=2, max_steps=None, checkpoint_at_epoch=True,
                        pvc_claim_name="workspace", pvc_mount_path=mount)  # on_finish_action: delete_succeeded_pod

    killer = oom_kill_once_logged(cluster, "step 5/8")  # in epoch two
    with pytest.raises(AirflowException, match="OOMKilled"):
        task().execute({"ti": StandInTI(try_number=1, run_id="oom")})
    killer.join()

    result = task().execute({"ti": StandInTI(try_number=2, run_id="oom")})
    summary = result["summary"]
    assert (summary["batch"]["micro_batch"], summary["batch"]["grad_accum"]) == (2, 4)
    assert summary["batch"]["effective_batch_size"] == 8 and summary["gradient_checkpointing"] is True
    assert "checkpoint-4" in str(summary["resumed_from"])
    assert [row["step"] for row in result["history"] if "loss" in row] == list(range(1, 9))
    [change] = summary[OOM_ADJUSTMENTS_KEY]  # in the XCom
    assert change["micro_batch"] == {"from": 4, "to": 2} and change["where"] == "retry (try 2)"
    assert "try 1: OOMKilled (exit code 137" in change["why"]
    published = json.loads((claim / "runs" / "oom" / "summary.json").read_text())
    assert published[OOM_ADJUSTMENTS_KEY] == [change]


def test_under_torchrun_a_rank_out_of_memory_fails_the_try_for_the_next_to_halve(tmp_path, monkeypatch, capsys):
    """Several processes: no in-process recovery (the other ranks wait in collectives). The rank says so on stderr
    and in the termination message, where torchrun's own report cannot push it out of the log tail."""
    from types import SimpleNamespace

    from airflow_provider_lora.core.contract import TERMINATION_LOG_ENV
    from lora_trainer import train as train_lib

    monkeypatch.setenv(TERMINATION_LOG_ENV, str(tmp_path / "termination-log"))
    plan = plan_batches(LoRASpec(effective_batch_size=16, max_seq_len=64, max_tokens_per_gpu=256), 2)
    setup = train_lib._Setup(None, plan, False, False, "off", False, [])
    with pytest.raises(SystemExit) as exit_info:
        train_lib._after_out_of_memory(setup, SimpleNamespace(num_processes=2, process_index=1), "Tried 2 GiB")
    assert exit_info.value.code == 1
    said = (tmp_path / "termination-log").read_text()
    assert said.startswith(OOM_ERROR) and "rank 1 at micro-batch 4 (Tried 2 GiB)" in said
    assert said in capsys.readouterr().err


def test_the_trainers_oom_error_in_the_termination_message_halves_the_next_try(k8s_cluster, stand_in):
    """What a torchrun pod leaves when a rank ran out of memory: exit code 1, OOM_ERROR in its termination
    message."""
    from tests.test_reliability_faults import StandInTI, fail_with, operator

    stand_in["script"] = ("import os, sys\nopen(os.environ['LORA_TERMINATION_LOG'], 'w').write("
                          f"{OOM_ERROR!r} + 'rank 1 at micro-batch 4')\nsys.exit(1)")
    task = dict(effective_batch_size=8, max_seq_len=64, max_tokens_per_gpu=256)  # micro-batch 4
    fail_with(k8s_cluster, operator(k8s_cluster, **task), StandInTI(1))
    stand_in["script"] = ECHO_SETTINGS
    k8s_cluster.set_fault("oom", pod="lora-*", after_lines=3)
    fail_with(k8s_cluster, operator(k8s_cluster, **task), StandInTI(2))
    settings = oom.read_settings(trainer_env(k8s_cluster).get(OOM_SETTINGS_ENV))
    assert settings["micro_batch"] == 2 and "rank 1 at micro-batch 4" in settings["adjustments"][0]["why"]
