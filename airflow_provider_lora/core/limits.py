"""What Kubernetes and the Linux kernel accept of a rendered Pod or TrainJob, checked before it is created: past
these limits the object is refused by the API server (labels, annotations), or created and then fails to start
(``StartError``: the kernel refuses to exec a command line or environment that is too large), which a retry cannot
mend. Each error names the parameter to change and the limit; values are never echoed (envs may be private).
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

MAX_ARG_STRLEN = 131072  # one argv or environment string, its NUL included (Linux: 32 pages of 4 KiB)
# argv + environment together. The kernel's ARG_MAX is a quarter of the stack limit (2 MiB with the usual 8 MiB),
# shared with what the container runtime and Kubernetes add (service variables, PATH, ...): stay well under it.
ARG_BUDGET = 1024 * 1024
MAX_ANNOTATIONS_BYTES = 256 * 1024  # all annotations of one object, keys and values together
MAX_LABEL_VALUE = 63
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
SPEC_FLAG = "--spec-json"


def check_manifest(manifest: dict[str, Any], spec: Any) -> None:
    """ValueError naming the parameter when ``manifest`` (a rendered Pod or TrainJob of ``spec``) exceeds a limit."""
    for argv, env in _commands(manifest):
        _check_command(argv, env, spec)
    for where, metadata in _metadata(manifest):
        _check_labels(where, metadata.get("labels") or {})
        annotations = metadata.get("annotations") or {}
        size = sum(len(str(k).encode()) + len(str(v).encode()) for k, v in annotations.items())
        if size > MAX_ANNOTATIONS_BYTES:
            raise ValueError(f"metadata_annotations: the {where}'s annotations are {size:,} bytes together; "
                             f"Kubernetes accepts at most {MAX_ANNOTATIONS_BYTES:,} (256 KiB) per object: shorten "
                             "metadata_annotations (or the pod_template's annotations)")


def _commands(manifest: dict[str, Any]) -> Iterator[tuple[list[str], list[dict[str, Any]]]]:
    body = manifest.get("spec") or {}
    if manifest.get("kind") == "TrainJob":
        trainer = body.get("trainer") or {}
        yield [*(trainer.get("command") or []), *(trainer.get("args") or [])], trainer.get("env") or []
        return
    for container in [*(body.get("initContainers") or []), *(body.get("containers") or [])]:
        yield [*(container.get("command") or []), *(container.get("args") or [])], container.get("env") or []


def _metadata(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``metadata`` of the object: its own and its pod templates' (a TrainJob's overrides and patches)."""
    yield str(manifest.get("kind") or "object"), manifest.get("metadata") or {}
    yield from (("pod template", m) for m in _nested_metadata(manifest.get("spec")))


def _nested_metadata(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "metadata" and isinstance(value, dict):
                yield value
            else:
                yield from _nested_metadata(value)
    elif isinstance(node, list):
        for item in node:
            yield from _nested_metadata(item)


def _check_command(argv: list[str], env: list[dict[str, Any]], spec: Any) -> None:
    for i, arg in enumerate(argv):
        size = len(str(arg).encode()) + 1
        if size > MAX_ARG_STRLEN:
            what = ("the spec" if i and argv[i - 1] == SPEC_FLAG else f"argument {i} of the trainer's command")
            raise ValueError(f"{_largest_fields(spec)}: {what} is {size:,} bytes as one command-line argument of "
                             f"the training container; the kernel refuses any single argument over "
                             f"{MAX_ARG_STRLEN:,} bytes (MAX_ARG_STRLEN), and the pod would fail with StartError. "
                             "Shorten it: pass large data as a file (a dataset or PVC path, a Secret)")
    for item in env:
        if "value" not in item:
            continue  # from a Secret or ConfigMap: its size is not known here
        size = len(item["name"].encode()) + 1 + len(str(item["value"]).encode()) + 1
        if size > MAX_ARG_STRLEN:
            raise ValueError(f"envs: {item['name']!r} is {size:,} bytes as an environment variable of the training "
                             f"container; the kernel refuses any single one over {MAX_ARG_STRLEN:,} bytes "
                             "(MAX_ARG_STRLEN), and the pod would fail with StartError: pass large values as a file "
                             "(a Secret or ConfigMap volume, a PVC path)")
    total = sum(len(str(a).encode()) + 1 for a in argv) + sum(
        len(e["name"].encode()) + len(str(e["value"]).encode()) + 2 for e in env if "value" in e)
    if total > ARG_BUDGET:
        raise ValueError(f"{_largest_fields(spec)}: the training container's command line and environment are "
                         f"{total:,} bytes together; keep them under {ARG_BUDGET:,} bytes (the kernel's ARG_MAX, "
                         "2 MiB on most nodes, also holds what the runtime adds), or the pod fails with StartError. "
                         "envs values count twice: in the environment and in the spec argument")


def _largest_fields(spec: Any) -> str:
    """The spec fields that make up most of its size, by name and size: what the error asks to shorten."""
    sizes = sorted(((len(json.dumps(v)), k) for k, v in spec.model_dump().items()), reverse=True)
    return ", ".join(f"{name} ({size:,} bytes)" for size, name in sizes[:2])


def _check_labels(where: str, labels: dict[str, Any]) -> None:
    for key, value in labels.items():
        prefix, _, name = str(key).rpartition("/")
        if not (name and len(name) <= 63 and _LABEL_NAME.match(name)) or \
                (prefix and not (len(prefix) <= 253 and _DNS_SUBDOMAIN.match(prefix))):
            raise ValueError(f"metadata_labels: the {where}'s label key {str(key)[:80]!r} is not valid: [prefix/]name, "
                             "name at most 63 characters of letters, digits, '-', '_', '.' (also check the "
                             "pod_template's labels)")
        text = str(value)
        if len(text) > MAX_LABEL_VALUE or not _LABEL_NAME.match(text):
            raise ValueError(f"metadata_labels: the {where}'s label {key!r} has a value of {len(text)} characters "
                             f"that Kubernetes refuses: at most {MAX_LABEL_VALUE} letters, digits, '-', '_', '.', "
                             "starting and ending with a letter or digit (also check the pod_template's labels)")
