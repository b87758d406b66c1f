"""OpenLineage for LoRATrainingOperator: its inputs (the dataset, the base model), its output (the adapter) and,
once the run ended, its figures as a run facet.

apache-airflow-providers-openlineage calls the operator's ``get_openlineage_facets_on_start``,
``..._on_complete`` and ``..._on_failure``; they import this module, which imports the OpenLineage client. Nothing
else imports it, so the operator works unchanged where that provider is not installed.

Dataset names follow OpenLineage's naming spec (spec/Naming.md): the namespace is the data source
(``scheme://authority``) and the name is the path within it, so that namespace and name together give the URI.
- ``s3://bucket/key``: namespace ``s3://bucket``, name ``key``;
- a local or PVC path (or ``file://...``): namespace ``file``, name the absolute path;
- a Hugging Face Hub id: namespace ``https://huggingface.co``, name ``org/model`` or ``datasets/org/data`` (the
  Hub's own URL of the repository; the spec names no Hub scheme).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from attrs import define
from openlineage.client.facet_v2 import RunFacet
from openlineage.client.generated.documentation_dataset import DocumentationDatasetFacet
from openlineage.client.event_v2 import Dataset
from airflow.providers.openlineage.extractors import OperatorLineage

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.spec import LoRASpec

HUB = "https://huggingface.co"
RUN_FACET = "loraTraining"  # the run facet's key in the events
# The summary figures the run facet carries (summary.json's names): what a lineage consumer compares runs by.
FIGURES = ("first_loss", "final_loss", "min_loss", "base_eval_loss", "final_eval_loss", "min_eval_loss",
           "best_eval_step", "global_step", "epochs", "train_runtime_seconds", "trainable_parameters")


@define
class LoRATrainingRunFacet(RunFacet):
    """What trained: the method and its settings, and (on complete) the run's figures and where the adapter is."""

    method: str
    baseModel: str
    loraR: int
    loraAlpha: int
    learningRate: float
    figures: dict[str, Any] | None = None
    adapter: str | None = None
    # A summary.json value is the run's own figure, never a secret: keep the client from redacting it.
    _additional_skip_redact = ["method", "baseModel", "figures", "adapter"]


def location(where: str, kind: str) -> tuple[str, str]:
    """``(namespace, name)`` of a dataset, model or adapter location as the spec takes it; ``kind`` is
    ``"model"`` or ``"dataset"`` (a Hub dataset lives under ``datasets/`` on the Hub)."""
    if where.startswith("s3://"):
        bucket, _, key = where[len("s3://"):].partition("/")
        return f"s3://{bucket}", key.strip("/")
    if where.startswith("hf://"):
        repo = where[len("hf://"):].strip("/")
        return HUB, repo if repo.startswith(("datasets/", "models/")) else _hub_name(repo, kind)
    if where.startswith("file://"):
        return "file", where[len("file://"):]
    if where.startswith(("/", ".")) or where.count("/") > 1:
        return "file", str(PurePosixPath(where)) if where.startswith("/") else where
    return HUB, _hub_name(where, kind)  # org/name (or a bare name): a Hub id, as the trainer reads it


def _hub_name(repo: str, kind: str) -> str:
    return f"datasets/{repo}" if kind == "dataset" else repo


def _dataset(where: str, kind: str, description: str) -> Dataset:
    namespace, name = location(where, kind)
    return Dataset(namespace=namespace, name=name,
                   facets={"documentation": DocumentationDatasetFacet(description=description)})


def operator_lineage(spec: LoRASpec, result: dict[str, Any] | None = None, *, dry_run: bool = False) -> OperatorLineage:
    """The operator's lineage: the dataset and base model in, the adapter out (none on a dry run, which writes
    nothing), and the training facet; with ``result`` (the task's return value) the adapter's published location
    and the run's figures."""
    inputs = [_dataset(spec.dataset, "dataset", "training data"), _dataset(spec.base_model, "model", "base model")]
    summary = (result or {}).get("summary") or {}
    adapter = ((result or {}).get("artifacts") or {}).get("adapter")
    if adapter is None and not dry_run and spec.output_uri:
        adapter = storage.artifact_uris(spec.output_uri, [])["adapter"]
    outputs = [_dataset(adapter, "model", f"LoRA adapter of {spec.base_model}")] if adapter and not dry_run else []
    facet = LoRATrainingRunFacet(
        method=_method(spec), baseModel=spec.base_model, loraR=spec.lora_r,
        loraAlpha=spec.lora_alpha, learningRate=spec.learning_rate, adapter=adapter if not dry_run else None,
        figures={name: summary[name] for name in FIGURES if summary.get(name) is not None} or None)
    return OperatorLineage(inputs=inputs, outputs=outputs, run_facets={RUN_FACET: facet})


def _method(spec: LoRASpec) -> str:
    parts = ["QLoRA" if spec.lora_load_in_4bit or spec.lora_load_in_8bit else "LoRA"]
    parts += [name for name, on in (("rsLoRA", spec.lora_use_rslora), ("DoRA", spec.lora_use_dora)) if on]
    return "+".join(parts)
