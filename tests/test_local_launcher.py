"""The trainer as users start it: in a subprocess through the local launcher (one process and torchrun), through
the lora-train command, and against S3 (a moto server on 127.0.0.1)."""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
import pytest

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.launchers.local import TrainingFailed, run_local
from airflow_provider_lora.core.results import load_run_result
from tests.trainer_helpers import arithmetic_rows, make_spec, train, write_jsonl

pytestmark = pytest.mark.slow


def test_torchrun_with_two_processes_keeps_the_effective_batch_and_writes_once(tiny_model_dir, tmp_path):
    import pandas as pd

    dataset = tmp_path / "train.parquet"
    pd.DataFrame(arithmetic_rows(32)).to_parquet(dataset)
    spec = make_spec(tiny_model_dir, dataset, tmp_path / "run", resource_num_procs_per_worker="2",
                     resource_gpu_per_worker=0, num_epochs=2)
    lines: list[str] = []
    result = run_local(spec, on_line=lines.append)
    batch = result.summary["batch"]
    assert batch["world_size"] == 2 and batch["micro_batch"] * batch["grad_accum"] * 2 == 8
    assert result.summary["global_step"] == 2 * 32 // 8  # each rank sees half of every batch
    assert result.summary["final_loss"] < result.summary["first_loss"]
    # Rank 0 alone logs progress and writes metrics: every step exactly once.
    assert [r["step"] for r in result.history if "loss" in r] == list(range(1, 9))
    assert sum(line.startswith("[lora-trainer] done:") for line in lines) == 1


def test_lora_train_command_trains_an_alpaca_csv(tiny_model_dir, tmp_path):
    import os
    from pathlib import Path

    import pandas as pd

    rows = [{"instruction": f"Repeat the number {i}", "input": "", "output": f"{i} {i}"} for i in range(16)]
    pd.DataFrame(rows).to_csv(tmp_path / "alpaca.csv", index=False)
    spec = make_spec(tiny_model_dir, tmp_path / "alpaca.csv", tmp_path / "run", max_steps=2)
    (tmp_path / "spec.json").write_text(spec.to_json())
    termination = tmp_path / "termination-log"
    # The console script, with a flag overriding the spec file.
    command = [str(Path(sys.executable).parent / "lora-train"), "--spec", str(tmp_path / "spec.json"), "--lora-r", "4"]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "LORA_TERMINATION_LOG": str(termination)})
    assert done.returncode == 0, done.stderr[-2000:]
    result = load_run_result(str(tmp_path / "run"))
    assert result.summary["data"]["format"] == "alpaca" and result.summary["lora"]["r"] == 4
    last = [line for line in done.stdout.splitlines() if line.startswith("LORA_RESULT ")][-1]
    assert json.loads(last.removeprefix("LORA_RESULT "))["summary"]["global_step"] == 2
    assert json.loads(termination.read_text())["summary"]["global_step"] == 2


def test_spec_envs_reach_the_trainer_through_the_local_launcher(tiny_model_dir, tmp_path):
    dataset = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(16))
    termination = tmp_path / "termination-log"
    spec = make_spec(tiny_model_dir, dataset, tmp_path / "run", max_steps=1,
                     envs=f"LORA_TERMINATION_LOG={termination}")
    run_local(spec, on_line=lambda line: None)
    assert json.loads(termination.read_text())["summary"]["global_step"] == 1
    # The spec recorded in the artifacts keeps env names, never values.
    assert load_run_result(str(tmp_path / "run")).summary["spec"]["envs"] == "LORA_TERMINATION_LOG=<redacted>"


def test_a_failed_run_raises_with_the_reason_and_last_lines(tiny_model_dir, tmp_path):
    spec = make_spec(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "run", max_steps=1)
    with pytest.raises(TrainingFailed, match="exited with code 2: dataset=.*no such file") as info:
        run_local(spec, on_line=lambda line: None)
    assert any("no such file" in line for line in info.value.last_lines)
    assert not storage.is_complete(str(tmp_path / "run"))


def test_several_workers_need_a_cluster(tiny_model_dir, tmp_path):
    spec = make_spec(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run", resource_num_workers=2,
                     resource_gpu_per_worker=1)
    with pytest.raises(ValueError, match="resource_num_workers=2 needs a cluster"):
        run_local(spec)


def test_s3_dataset_and_s3_output(tiny_model_dir, tmp_path, s3_endpoint, s3_bucket):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    rows = arithmetic_rows(16)
    client.put_object(Bucket=s3_bucket, Key="data/train.jsonl",
                      Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    output = f"s3://{s3_bucket}/runs/first"
    outcome = train(tiny_model_dir, f"s3://{s3_bucket}/data/train.jsonl", output, max_steps=2)
    assert outcome.summary["data"]["rows"] == 16
    result = load_run_result(output)
    assert result.summary["global_step"] == 2
    assert result.artifacts["adapter"] == f"{output}/adapter"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/first/")["Contents"]}
    assert "runs/first/adapter/adapter_model.safetensors" in keys and "runs/first/_COMPLETE" in keys
    assert not any("/checkpoints/" in k for k in keys)
