"""Publishing a run to a filesystem path or to S3 (moto), and reading it back: what a completed run looks like."""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pytest

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.storage import (
    COMPLETE_MARKER,
    IncompleteRunError,
    OutputExistsError,
    check_output_available,
    publish_run,
)

RUN_FILES = {
    "adapter/adapter_config.json": b'{"r": 16}',
    "adapter/adapter_model.safetensors": os.urandom(4096),
    "metrics.jsonl": b'{"step": 1, "epoch": 0.5, "loss": 2.0}\n',
    "summary.json": b'{"final_loss": 2.0}',
    "loss_chart.html": b"<!DOCTYPE html><html></html>",
    "loss_chart.png": b"\x89PNG\r\n\x1a\n",
    "checkpoints/checkpoint-1/optimizer.pt": b"x" * 100,
}
PUBLISHED = sorted(name for name in RUN_FILES if not name.startswith("checkpoints/"))


def make_run(root: Path, files: dict[str, bytes] = RUN_FILES) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def s3_keys(bucket: str, prefix: str = "") -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


class RecordingClient:
    """A real boto3 client whose writes are recorded in order, and whose n-th upload can be made to fail."""

    def __init__(self, fail_upload_at: int | None = None):
        self._client = storage.s3_client()
        self.calls: list[tuple[str, str]] = []
        self.fail_upload_at = fail_upload_at

    def __getattr__(self, name):
        return getattr(self._client, name)

    def upload_file(self, filename, bucket, key, **kwargs):
        self.calls.append(("upload", key))
        if self.fail_upload_at == sum(1 for op, _ in self.calls if op == "upload"):
            raise ConnectionError("injected upload failure")
        return self._client.upload_file(filename, bucket, key, **kwargs)

    def put_object(self, **kwargs):
        self.calls.append(("put", kwargs["Key"]))
        return self._client.put_object(**kwargs)

    def delete_object(self, **kwargs):
        self.calls.append(("delete", kwargs["Key"]))
        return self._client.delete_object(**kwargs)


# ------------------------------------------------------------------------------------------------------ URIs


def test_join_appends_segments_for_s3_and_paths():
    assert storage.join("s3://bucket/runs/", "adapter", "/x.json") == "s3://bucket/runs/adapter/x.json"
    assert storage.join("s3://bucket", "a") == "s3://bucket/a"
    assert storage.join("/data/runs", "a/b", "c") == "/data/runs/a/b/c"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/s3://b") and not storage.is_s3(Path("/tmp"))


@pytest.mark.parametrize(
    "call",
    [
        lambda: storage.join("s3://bucket/runs", "../other"),
        lambda: storage.join("/data/../etc"),
        lambda: storage.read_text("s3://bucket/runs/../secret.txt"),
        lambda: storage.write_text("/data/runs/..\\x", "x"),
        lambda: storage.exists("s3://bucket/../b2/x"),
        lambda: storage.download("s3://bucket/a/../b", "/tmp/x"),
        lambda: check_output_available("/data/../runs", False),
        lambda: publish_run(".", "s3://bucket/runs/../other"),
    ],
)
def test_path_traversal_is_rejected_naming_the_uri(call):
    with pytest.raises(ValueError, match=r"traversal.*\.\."):
        call()


# ------------------------------------------------------------------------------------------- local publishing


def test_publish_to_local_path_copies_everything_but_checkpoints(tmp_path):
    run = make_run(tmp_path / "run")
    out = tmp_path / "out" / "job-1"

    artifacts = publish_run(run, out)

    copied = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert copied == sorted(PUBLISHED + [COMPLETE_MARKER])
    for rel in PUBLISHED:
        assert (out / rel).read_bytes() == RUN_FILES[rel]
    marker = json.loads((out / COMPLETE_MARKER).read_text())
    assert marker["files"] == {rel: len(RUN_FILES[rel]) for rel in PUBLISHED}
    assert marker["total_bytes"] == sum(len(RUN_FILES[rel]) for rel in PUBLISHED)
    assert marker["completed_at"].endswith("+00:00")
    assert artifacts == {
        "root": str(out),
        "adapter": str(out / "adapter"),
        "metrics": str(out / "metrics.jsonl"),
        "summary": str(out / "summary.json"),
        "chart_html": str(out / "loss_chart.html"),
        "chart_png": str(out / "loss_chart.png"),
    }
    assert storage.is_complete(out)


def test_publish_reports_merged_weights_only_when_present(tmp_path):
    run = make_run(tmp_path / "run", {**RUN_FILES, "merged/model.safetensors": b"w" * 10})
    artifacts = publish_run(run, tmp_path / "out")
    assert artifacts["merged"] == str(tmp_path / "out" / "merged")
    assert (tmp_path / "out" / "merged" / "model.safetensors").read_bytes() == b"w" * 10


def test_publish_in_place_writes_only_the_marker(tmp_path):
    run = make_run(tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}

    (tmp_path / "link").symlink_to(run)  # another spelling of the same directory

    artifacts = publish_run(run, tmp_path / "link")

    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER}
    assert after == before  # nothing copied or touched
    assert set(json.loads((run / COMPLETE_MARKER).read_text())["files"]) == set(PUBLISHED)
    assert artifacts["adapter"] == str(tmp_path / "link" / "adapter")


def test_publish_into_the_run_directory_itself_is_refused(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(ValueError, match="must not lie inside the run directory"):
        publish_run(run, run / "published")
    assert not (run / "published").exists()


def test_completed_run_is_not_overwritten_without_the_flag(tmp_path):
    out = tmp_path / "out"
    publish_run(make_run(tmp_path / "run1"), out)

    with pytest.raises(OutputExistsError, match=rf"{out}.*overwrite_output=True"):
        check_output_available(out, overwrite=False)
    with pytest.raises(OutputExistsError, match="overwrite_output=True"):
        publish_run(make_run(tmp_path / "run2", {"summary.json": b"{}"}), out)
    assert (out / "summary.json").read_bytes() == RUN_FILES["summary.json"]  # untouched
    check_output_available(out, overwrite=True)  # the flag makes it fine
    check_output_available(tmp_path / "fresh", overwrite=False)  # nothing there: fine


def test_an_unfinished_publish_can_be_retried_without_the_flag(tmp_path):
    out = make_run(tmp_path / "out", {"adapter/adapter_config.json": b"half"})  # files, but no marker
    check_output_available(out, overwrite=False)
    publish_run(make_run(tmp_path / "run"), out)
    assert (out / "adapter/adapter_config.json").read_bytes() == RUN_FILES["adapter/adapter_config.json"]


def test_overwrite_replaces_a_completed_local_run(tmp_path):
    out = tmp_path / "out"
    publish_run(make_run(tmp_path / "run1", {**RUN_FILES, "merged/model.safetensors": b"old"}), out)
    (out / "notes-by-someone-else.txt").write_text("keep me")

    new_files = {"adapter/adapter_config.json": b'{"r": 8}', "summary.json": b'{"final_loss": 1.0}'}
    artifacts = publish_run(make_run(tmp_path / "run2", new_files), out, overwrite=True)

    remaining = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert remaining == sorted([*new_files, COMPLETE_MARKER, "notes-by-someone-else.txt"])
    assert not (out / "merged").exists()  # the old run's directories go with its files
    assert "merged" not in artifacts
    assert json.loads((out / COMPLETE_MARKER).read_text())["files"] == {k: len(v) for k, v in new_files.items()}


def test_local_copy_failure_leaves_no_marker(tmp_path, monkeypatch):
    out = tmp_path / "out"
    publish_run(make_run(tmp_path / "run1"), out)
    real_copy, copies = storage.shutil.copyfile, []

    def failing_copy(src, dst):
        copies.append(dst)
        if len(copies) == 2:
            raise OSError("disk full")
        return real_copy(src, dst)

    monkeypatch.setattr(storage.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        publish_run(make_run(tmp_path / "run2"), out, overwrite=True)
    assert not storage.is_complete(out)
    with pytest.raises(IncompleteRunError, match=str(out)):
        storage.read_marker(out)


def test_local_read_write_exists_download(tmp_path):
    storage.write_text(tmp_path / "a" / "b.txt", "héllo")
    assert storage.read_text(tmp_path / "a" / "b.txt") == "héllo"
    assert storage.exists(tmp_path / "a") and not storage.exists(tmp_path / "missing")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.txt"]  # no temp file left behind

    assert storage.download(tmp_path / "a", tmp_path / "copy").joinpath("b.txt").read_text() == "héllo"
    assert storage.download(tmp_path / "a" / "b.txt", tmp_path / "one.txt").read_text() == "héllo"
    with pytest.raises(FileNotFoundError):
        storage.download(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        storage.read_text(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------------- S3 publishing


def test_publish_to_s3_uploads_verifies_and_marks_last(tmp_path, s3_bucket):
    out = f"s3://{s3_bucket}/runs/job-1"
    client = RecordingClient()

    artifacts = publish_run(make_run(tmp_path / "run"), out, client=client)

    assert s3_keys(s3_bucket) == sorted(f"runs/job-1/{rel}" for rel in [*PUBLISHED, COMPLETE_MARKER])
    assert client.calls[-1] == ("put", f"runs/job-1/{COMPLETE_MARKER}")
    assert sorted(key for op, key in client.calls[:-1]) == sorted(f"runs/job-1/{rel}" for rel in PUBLISHED)
    marker = json.loads(storage.read_text(f"{out}/{COMPLETE_MARKER}"))
    assert marker["files"] == {rel: len(RUN_FILES[rel]) for rel in PUBLISHED}
    assert artifacts["adapter"] == f"{out}/adapter" and artifacts["summary"] == f"{out}/summary.json"
    assert storage.read_text(artifacts["summary"]) == RUN_FILES["summary.json"].decode()
    assert storage.is_complete(out)


def test_s3_refuses_a_completed_run_then_overwrite_deletes_marker_first(tmp_path, s3_bucket):
    out = f"s3://{s3_bucket}/runs/job"
    publish_run(make_run(tmp_path / "run1", {**RUN_FILES, "merged/model.safetensors": b"old"}), out)
    with pytest.raises(OutputExistsError, match=rf"s3://{s3_bucket}/runs/job.*overwrite_output=True"):
        publish_run(make_run(tmp_path / "run2", {"summary.json": b"{}"}), out)

    client = RecordingClient()
    new_files = {"adapter/adapter_config.json": b'{"r": 4}', "summary.json": b"{}"}
    artifacts = publish_run(make_run(tmp_path / "run3", new_files), out, overwrite=True, client=client)

    marker_key = f"runs/job/{COMPLETE_MARKER}"
    assert client.calls[0] == ("delete", marker_key)  # before any old file goes or new file arrives
    deleted = [key for op, key in client.calls if op == "delete"]
    assert sorted(deleted[1:]) == sorted(f"runs/job/{rel}" for rel in [*PUBLISHED, "merged/model.safetensors"])
    assert client.calls[-1] == ("put", marker_key)
    assert s3_keys(s3_bucket) == sorted(f"runs/job/{rel}" for rel in [*new_files, COMPLETE_MARKER])
    assert "merged" not in artifacts


def test_s3_upload_failure_on_second_file_leaves_no_marker(tmp_path, s3_bucket):
    out = f"s3://{s3_bucket}/runs/job"
    publish_run(make_run(tmp_path / "run1"), out)  # a completed run that the failed overwrite must un-mark

    client = RecordingClient(fail_upload_at=2)
    with pytest.raises(ConnectionError, match="injected"):
        publish_run(make_run(tmp_path / "run2"), out, overwrite=True, client=client)

    assert [op for op, _ in client.calls].count("upload") == 2  # stopped at the failure
    assert f"runs/job/{COMPLETE_MARKER}" not in s3_keys(s3_bucket)
    assert not storage.is_complete(out)
    check_output_available(out, overwrite=False)  # an unmarked location is free to publish to


def test_s3_size_mismatch_after_upload_raises_and_leaves_no_marker(tmp_path, s3_bucket, monkeypatch):
    client = storage.s3_client()
    real_head = client.head_object

    def lying_head(**kwargs):
        response = real_head(**kwargs)
        if kwargs["Key"].endswith("adapter_model.safetensors"):
            response["ContentLength"] -= 1
        return response

    monkeypatch.setattr(client, "head_object", lying_head)
    out = f"s3://{s3_bucket}/job"
    with pytest.raises(OSError, match=r"size check failed for .*adapter_model.safetensors: 4095 bytes.*4096"):
        publish_run(make_run(tmp_path / "run"), out, client=client)
    assert not storage.is_complete(out)


def test_large_files_upload_in_parts(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_BYTES", 5 * 1024 * 1024)  # S3's smallest part size
    big = os.urandom(11 * 1024 * 1024)
    out = f"s3://{s3_bucket}/job"
    publish_run(make_run(tmp_path / "run", {"merged/model.safetensors": big}), out)

    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="job/merged/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert storage.download(f"{out}/merged/model.safetensors", tmp_path / "m.bin").read_bytes() == big


def test_explicit_endpoint_url_works_without_the_environment(tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    out = f"s3://{s3_bucket}/job"
    publish_run(make_run(tmp_path / "run"), out, endpoint_url=s3_endpoint)
    assert storage.is_complete(out, endpoint_url=s3_endpoint)
    assert storage.read_text(f"{out}/summary.json", endpoint_url=s3_endpoint) == RUN_FILES["summary.json"].decode()


def test_s3_exists_read_write_download(tmp_path, s3_bucket):
    base = f"s3://{s3_bucket}/data"
    storage.write_text(f"{base}/dir/a.txt", "alpha")
    storage.write_text(f"{base}/dir/sub/b.txt", "beta")

    assert storage.exists(f"{base}/dir/a.txt") and storage.exists(f"{base}/dir") and storage.exists(f"{base}/dir/")
    assert not storage.exists(f"{base}/di") and not storage.exists(f"{base}/nope.txt")
    assert storage.read_text(f"{base}/dir/sub/b.txt") == "beta"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        storage.read_text(f"{base}/nope.txt")

    local = storage.download(f"{base}/dir", tmp_path / "dl")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == ["a.txt", "sub/b.txt"]
    assert (local / "sub" / "b.txt").read_text() == "beta"
    assert storage.download(f"{base}/dir/a.txt", tmp_path / "one" / "a.txt").read_text() == "alpha"
    with pytest.raises(FileNotFoundError):
        storage.download(f"{base}/nothing", tmp_path / "none")


def test_s3_download_refuses_keys_that_escape_the_destination(tmp_path, s3_bucket):
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="run/x/../../evil.txt", Body=b"x")
    if "run/x/../../evil.txt" not in s3_keys(s3_bucket):
        pytest.skip("this S3 endpoint normalises '..' in keys")
    with pytest.raises(ValueError, match="traversal"):
        storage.download(f"s3://{s3_bucket}/run", tmp_path / "dl")
    assert not (tmp_path / "evil.txt").exists()
