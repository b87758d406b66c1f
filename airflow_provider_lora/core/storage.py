"""One interface over filesystem/PVC paths and ``s3://bucket/prefix`` URIs.

The trainer publishes its run directory with :func:`publish_run`; the Airflow worker, the KFP component and the CLI read
results back with :func:`read_text`, :func:`download` and :func:`is_complete`. A run counts as complete only when its
``_COMPLETE`` marker exists: the marker is written last and lists every published file with its size, so a reader
never mistakes a half-copied run for a finished one.

S3 goes through boto3, which honours ``AWS_ENDPOINT_URL`` and the other ``AWS_*`` variables by itself; callers that
hold a ready client (an Airflow S3Hook's, say) pass it as ``client=``. boto3 is imported only when an S3 URI is used,
so importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

# The run directory's layout and completion marker, as the trainer writes them (defined in core/contract.py; these
# names stay importable from here).
from airflow_provider_lora.core.contract import (ADAPTER_DIR, CHART_HTML, CHART_PNG, CHECKPOINTS_DIR,
                                                 COMPLETE_MARKER, MERGED_DIR, METRICS_FILE, SUMMARY_FILE)

# Multipart above 64 MiB: adapters stay single-part, merged weights (GBs) upload in parallel parts.
MULTIPART_BYTES = 64 * 1024 * 1024
RETRIES = {"max_attempts": 5, "mode": "standard"}

_S3_PREFIX = "s3://"


class OutputExistsError(Exception):
    """The output location already holds a completed run and overwriting was not asked for."""


class OutputNotWritableError(Exception):
    """The output location cannot be written (permissions, a missing bucket, no credentials)."""


class IncompleteRunError(Exception):
    """The location holds no completed run (no ``_COMPLETE`` marker): it is missing, running, or failed mid-copy."""


# ---------------------------------------------------------------------------------------------------------- URIs


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(_S3_PREFIX)


def _check_uri(uri: str | os.PathLike) -> str:
    """Return ``uri`` as a string; a ``..`` segment could escape the output prefix, so it is refused."""
    text = os.fspath(uri)
    if ".." in re.split(r"[/\\]", text):
        raise ValueError(f"path traversal ('..') is not allowed in {text!r}")
    return text


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Append path segments to a URI or path; parts never restart from the root (a leading '/' is dropped)."""
    text = _check_uri(uri)
    clean = [_check_uri(p).strip("/") for p in parts]
    clean = [p for p in clean if p]
    if is_s3(text):
        return "/".join([text.rstrip("/"), *clean]) if clean else text
    return os.path.join(text, *clean)


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(_S3_PREFIX):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in S3 URI {uri!r}")
    return bucket, key


def _prefix(key: str) -> str:
    """A key as a 'directory' prefix: '' for the bucket root, else with exactly one trailing '/'."""
    key = key.rstrip("/")
    return f"{key}/" if key else ""


# -------------------------------------------------------------------------------------------------------- client


def s3_client(endpoint_url: str | None = None, **kwargs: Any) -> Any:
    """A boto3 S3 client with retries; without ``endpoint_url`` boto3 reads AWS_ENDPOINT_URL itself."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url, config=Config(retries=RETRIES), **kwargs)


def _client(client: Any, endpoint_url: str | None) -> Any:
    return client if client is not None else s3_client(endpoint_url)


def _is_not_found(exc: Exception) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def _head_size(client: Any, bucket: str, key: str) -> int | None:
    """Size of one object, or None if it does not exist."""
    from botocore.exceptions import ClientError

    try:
        return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as exc:
        if _is_not_found(exc):
            return None
        raise


def _list_keys(client: Any, bucket: str, prefix: str) -> Iterable[str]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield obj["Key"]


# ----------------------------------------------------------------------------------------------- small operations


def exists(uri: str | os.PathLike, *, client: Any = None, endpoint_url: str | None = None) -> bool:
    """True for an existing file/object, or a directory/prefix with at least one object under it."""
    text = _check_uri(uri)
    if not is_s3(text):
        return Path(text).exists()
    s3 = _client(client, endpoint_url)
    bucket, key = _split_s3(text)
    if key and not key.endswith("/") and _head_size(s3, bucket, key) is not None:
        return True
    return s3.list_objects_v2(Bucket=bucket, Prefix=_prefix(key), MaxKeys=1).get("KeyCount", 0) > 0


def read_text(uri: str | os.PathLike, *, client: Any = None, endpoint_url: str | None = None) -> str:
    text = _check_uri(uri)
    if not is_s3(text):
        return Path(text).read_text(encoding="utf-8")
    bucket, key = _split_s3(text)
    s3 = _client(client, endpoint_url)
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as exc:
        if _is_not_found(exc):
            raise FileNotFoundError(f"no such object: {text}") from exc
        raise
    return body.read().decode("utf-8")


def write_text(uri: str | os.PathLike, text: str, *, client: Any = None, endpoint_url: str | None = None) -> None:
    """Write a text file/object. Locally the write is atomic (temp file + rename), so readers never see half a file."""
    target = _check_uri(uri)
    if is_s3(target):
        bucket, key = _split_s3(target)
        _client(client, endpoint_url).put_object(Bucket=bucket, Key=key, Body=text.encode("utf-8"))
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _delete(uri: str, client: Any, endpoint_url: str | None) -> None:
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        _client(client, endpoint_url).delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def download(
    uri: str | os.PathLike, local_path: str | os.PathLike, *, client: Any = None, endpoint_url: str | None = None
) -> Path:
    """Copy one file/object to ``local_path``, or a whole directory/prefix into the directory ``local_path``."""
    text = _check_uri(uri)
    dest = Path(local_path)
    if not is_s3(text):
        src = Path(text)
        if src.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
        elif src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            raise FileNotFoundError(f"nothing to download at {text}")
        return dest

    s3 = _client(client, endpoint_url)
    bucket, key = _split_s3(text)
    if key and not key.endswith("/") and _head_size(s3, bucket, key) is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(dest))
        return dest
    prefix = _prefix(key)
    found = False
    for obj_key in _list_keys(s3, bucket, prefix):
        rel = obj_key[len(prefix):]
        if not rel or rel.endswith("/"):  # "directory" placeholder objects
            continue
        # A key is untrusted input: one holding '..' would write outside local_path.
        _check_uri(rel)
        target = dest.joinpath(*rel.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, obj_key, str(target))
        found = True
    if not found:
        raise FileNotFoundError(f"nothing to download at {text}")
    return dest


# ---------------------------------------------------------------------------------------------- completed runs


def read_marker(output_uri: str | os.PathLike, *, client: Any = None, endpoint_url: str | None = None) -> dict:
    """The ``_COMPLETE`` marker of a run; IncompleteRunError when there is none."""
    uri = join(output_uri, COMPLETE_MARKER)
    try:
        return json.loads(read_text(uri, client=client, endpoint_url=endpoint_url))
    except FileNotFoundError as exc:
        raise IncompleteRunError(
            f"{os.fspath(output_uri)} holds no completed run: {COMPLETE_MARKER} is missing "
            "(the run has not finished, failed, or was interrupted while publishing)"
        ) from exc


def remove_tree(uri: str | os.PathLike, *, client: Any = None, endpoint_url: str | None = None) -> None:
    """Delete a directory, or every object under an S3 prefix; nothing there is fine."""
    text = _check_uri(uri)
    if not is_s3(text):
        shutil.rmtree(text, ignore_errors=True)
        return
    s3 = _client(client, endpoint_url)
    bucket, key = _split_s3(text)
    for obj_key in list(_list_keys(s3, bucket, _prefix(key))):
        s3.delete_object(Bucket=bucket, Key=obj_key)


def completed_children(uri: str | os.PathLike, *, client: Any = None, endpoint_url: str | None = None) -> list[str]:
    """Names of the directories/prefixes directly under ``uri`` that hold a ``_COMPLETE`` marker."""
    text = _check_uri(uri)
    if not is_s3(text):
        root = Path(text)
        return sorted(p.parent.name for p in root.glob(f"*/{COMPLETE_MARKER}")) if root.is_dir() else []
    bucket, key = _split_s3(text)
    prefix = _prefix(key)
    names = {k[len(prefix):].split("/")[0] for k in _list_keys(_client(client, endpoint_url), bucket, prefix)
             if k.endswith(f"/{COMPLETE_MARKER}") and k[len(prefix):].count("/") == 1}
    return sorted(names)


def is_complete(output_uri: str | os.PathLike, *, client: Any = None, endpoint_url: str | None = None) -> bool:
    return exists(join(output_uri, COMPLETE_MARKER), client=client, endpoint_url=endpoint_url)


def check_output_available(
    output_uri: str | os.PathLike, overwrite: bool, *, client: Any = None, endpoint_url: str | None = None
) -> None:
    """Fail before any training if ``output_uri`` already holds a completed run and ``overwrite`` is False.

    With ``overwrite`` True nothing happens here: :func:`publish_run` replaces the old run.
    """
    if not overwrite and is_complete(output_uri, client=client, endpoint_url=endpoint_url):
        raise _output_exists(output_uri)


WRITE_PROBE = "_WRITE_PROBE"


def check_writable(output_uri: str | os.PathLike, *, client: Any = None, endpoint_url: str | None = None) -> None:
    """Write and delete a small probe at ``output_uri`` before training, so that a location which cannot take the
    run fails in seconds instead of after the training."""
    uri = join(output_uri, WRITE_PROBE)
    try:
        write_text(uri, "probe", client=client, endpoint_url=endpoint_url)
        _delete(uri, client, endpoint_url)
    except Exception as exc:  # OSError locally; botocore's ClientError / NoCredentialsError / connection errors
        raise OutputNotWritableError(f"output_uri={os.fspath(output_uri)!r} is not writable: "
                                     f"{type(exc).__name__}: {exc}") from exc


def _output_exists(output_uri: str | os.PathLike) -> OutputExistsError:
    return OutputExistsError(
        f"{os.fspath(output_uri)} already holds a completed run ({COMPLETE_MARKER} is present). "
        "Choose another output location, or pass overwrite_output=True to replace it."
    )


def artifact_uris(output_uri: str | os.PathLike, files: Iterable[str]) -> dict[str, str]:
    """The artifact URIs of a run that published ``files`` (relative paths, as the marker lists them).

    The same keys come from publish_run and from a later read; ``merged`` only when merged weights were published.
    """
    root = _check_uri(output_uri)
    uris = {
        "root": root,
        "adapter": join(root, ADAPTER_DIR),
        "metrics": join(root, METRICS_FILE),
        "summary": join(root, SUMMARY_FILE),
        "chart_html": join(root, CHART_HTML),
        "chart_png": join(root, CHART_PNG),
    }
    if any(rel.startswith(f"{MERGED_DIR}/") for rel in files):
        uris["merged"] = join(root, MERGED_DIR)
    return uris


def _run_files(run_dir: Path, exclude: Iterable[str]) -> dict[str, int]:
    """Relative POSIX path -> size of every file to publish (excluded top-level dirs and the marker left out)."""
    skip = set(exclude)
    files: dict[str, int] = {}
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if rel.parts[0] in skip or rel.as_posix() == COMPLETE_MARKER or not path.is_file():
            continue
        files[rel.as_posix()] = path.stat().st_size
    return files


def _copy_file(src: Path, dest_uri: str, size: int, s3: Any, transfer: Any) -> None:
    """Copy one file and check the copy has the size measured before the copy started."""
    if s3 is not None:
        bucket, key = _split_s3(dest_uri)
        s3.upload_file(str(src), bucket, key, Config=transfer)
        copied = _head_size(s3, bucket, key)
    else:
        dest = Path(dest_uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        copied = dest.stat().st_size
    if copied != size:
        raise OSError(f"size check failed for {dest_uri}: {copied} bytes published, {size} expected")


def _remove_empty_dirs(root: Path, rel_paths: Iterable[str]) -> None:
    """After deleting an old run's files locally, drop the directories they leave empty (never ``root`` itself)."""
    dirs = {root.joinpath(*Path(rel).parts[:i]) for rel in rel_paths for i in range(1, len(Path(rel).parts))}
    for directory in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        try:
            directory.rmdir()
        except OSError:
            pass  # not empty: holds something that was not ours


def publish_run(
    run_dir: str | os.PathLike,
    output_uri: str | os.PathLike,
    *,
    overwrite: bool = False,
    exclude: Iterable[str] = (CHECKPOINTS_DIR,),
    client: Any = None,
    endpoint_url: str | None = None,
) -> dict[str, str]:
    """Copy the run directory to ``output_uri``, verify every copy's size, then write the ``_COMPLETE`` marker.

    Replacing a completed run needs ``overwrite=True``: its marker goes first, then the files it lists (only those,
    so nothing else under a shared prefix is touched), then the new files are copied. Any failure raises and leaves
    no marker. If ``output_uri`` is ``run_dir`` itself, nothing is copied and only the marker is written.
    Returns the artifact URIs (see :func:`artifact_uris`).
    """
    src = Path(run_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"run directory {src} does not exist")
    out = _check_uri(output_uri)
    s3 = _client(client, endpoint_url) if is_s3(out) else None

    same_place = False
    if s3 is None:
        src_real, out_real = src.resolve(), Path(out).resolve()
        same_place = src_real == out_real
        # Copying a directory into itself would publish the run inside the run (and again on every retry).
        if not same_place and out_real.is_relative_to(src_real):
            raise ValueError(f"output {out} must not lie inside the run directory {src}")

    marker_uri = join(out, COMPLETE_MARKER)
    if is_complete(out, client=s3):
        if not overwrite:
            raise _output_exists(out)
        old_files = read_marker(out, client=s3).get("files", {})
        _delete(marker_uri, s3, None)  # first: from here on the location is not a completed run
        if not same_place:
            for rel in old_files:
                _delete(join(out, _check_uri(rel)), s3, None)
            if s3 is None:
                _remove_empty_dirs(Path(out), old_files)

    files = _run_files(src, exclude)
    if not same_place:
        transfer = None
        if s3 is not None:
            from boto3.s3.transfer import TransferConfig

            transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
        for rel, size in files.items():
            _copy_file(src / rel, join(out, rel), size, s3, transfer)

    marker = {
        "completed_at": datetime.now(timezone.utc).isoformat(),
        "total_bytes": sum(files.values()),
        "files": files,
    }
    write_text(marker_uri, json.dumps(marker, indent=1, sort_keys=True), client=s3)
    return artifact_uris(out, files)
