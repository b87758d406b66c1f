"""A task retry resumes from the last checkpoint of the failed try instead of from step 0.

The real trainer in an emulated pod, S3 output on moto: try 1 trains two epochs with checkpoint_at_epoch, is
OOM-killed after its epoch-1 checkpoint has been copied to ``{output_uri}/_checkpoints/``; try 2 (a new pod: the
first one's disk is gone) fetches that checkpoint, resumes at step 4, and publishes a run whose loss history has
every step once. How the checkpoint location is shared between tries: docs/reliability.md.
"""

from __future__ import annotations


import boto3
import pytest

from tests.test_operator_pod import cluster, operator  # noqa: F401  (the fixture, with S3 keys as a secret)
from tests.test_reliability_faults import StandInTI, oom_kill_once_logged
from tests.trainer_helpers import arithmetic_rows, write_jsonl

pytestmark = pytest.mark.slow


def test_a_retry_resumes_from_the_failed_trys_last_checkpoint(cluster, tiny_model_dir, tmp_path,  # noqa: F811
                                                             s3_endpoint, s3_bucket, monkeypatch):
    from airflow_provider_lora.compat import AirflowException
    from airflow_provider_lora.core import render

    # The staging emptyDir under the cluster's root, so the emulator gives each pod its own (as a cluster does):
    # try 2 cannot see try 1's local files, only what try 1 copied to S3.
    monkeypatch.setattr(render, "WORK_DIR", str(cluster.root / "lora-work"))

    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))  # 4 steps per epoch at batch 8
    output = f"s3://{s3_bucket}/runs/resume"

    def task():
        return operator(tiny_model_dir, dataset, output, s3_endpoint, deferrable=False, num_epochs=2,
                        max_steps=None, checkpoint_at_epoch=True, on_finish_action="keep_pod")

    killer = oom_kill_once_logged(cluster, "checkpoint checkpoint-4 copied")  # after the first checkpoint
    with pytest.raises(AirflowException, match="OOMKilled"):
        task().execute({"ti": StandInTI(try_number=1, run_id="resume")})
    killer.join()
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert "runs/resume/_checkpoints/checkpoint-4/_COMPLETE" in keys
    assert "runs/resume/_COMPLETE" not in keys  # the failed try published nothing

    result = task().execute({"ti": StandInTI(try_number=2, run_id="resume")})
    summary = result["summary"]
    assert summary["global_step"] == 8 and "checkpoint-4" in str(summary["resumed_from"]), summary
    assert [row["step"] for row in result["history"] if "loss" in row] == list(range(1, 9))  # each step once
    log = cluster.logs("default", cluster.pods()[0]["metadata"]["name"])
    assert "fetched checkpoint-4 of an earlier try" in log and "resuming from" in log
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert "runs/resume/_COMPLETE" in keys
    assert not any("/_checkpoints/" in k for k in keys)  # removed once the run is published


def test_a_retry_resumes_from_the_checkpoint_on_the_workspace_pvc(cluster, tiny_model_dir, tmp_path,  # noqa: F811
                                                                  s3_endpoint, monkeypatch):
    """A path output on a PVC holds its checkpoints itself ({output}/checkpoints): the PVC outlives the pod."""

    from airflow_provider_lora.compat import AirflowException
    from airflow_provider_lora.core import render, storage

    monkeypatch.setattr(render, "WORK_DIR", str(cluster.root / "lora-work"))
    mount = str(cluster.root / "mnt" / "lora")
    claim = cluster.root / "pvc" / "default" / "workspace"
    write_jsonl(claim / "data" / "train.jsonl", arithmetic_rows(32))

    def task():
        return operator(tiny_model_dir, f"{mount}/data/train.jsonl", f"{mount}/runs/resume", s3_endpoint,
                        deferrable=False, num_epochs=2, max_steps=None, checkpoint_at_epoch=True,
                        on_finish_action="keep_pod", pvc_claim_name="workspace", pvc_mount_path=mount)

    killer = oom_kill_once_logged(cluster, "step 5/8")  # in epoch two
    with pytest.raises(AirflowException, match="OOMKilled"):
        task().execute({"ti": StandInTI(try_number=1, run_id="resume-pvc")})
    killer.join()
    assert (claim / "runs" / "resume" / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()
    result = task().execute({"ti": StandInTI(try_number=2, run_id="resume-pvc")})
    assert "checkpoint-4" in str(result["summary"]["resumed_from"])
    assert [row["step"] for row in result["history"] if "loss" in row] == list(range(1, 9))
    assert storage.is_complete(claim / "runs" / "resume")
