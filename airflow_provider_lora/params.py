"""The trigger form: one Airflow Param per LoRASpec field, derived from the spec (type, default, choices, bounds,
description, section), and the templated operator kwargs that read them back.

Use both in a DAG with ``render_template_as_native_obj=True`` so each value reaches the operator with its type:

    with DAG(..., params=spec_params(base_model="..."), render_template_as_native_obj=True):
        LoRATrainingOperator(task_id="train", **templated_spec_kwargs())
"""

from __future__ import annotations

from typing import Any

from airflow_provider_lora.core.spec import (
    ACCEPTED_CHOICES,
    EFFECTIVE_4BIT_DEFAULTS,
    EFFECTIVE_DEFAULTS,
    SECTIONS,
    LoRASpec,
    bounds,
)

# Text fields that may be empty. The form treats a non-nullable field as required and sends null for a cleared one,
# so these are nullable in the form and rendered back as "".
OPTIONAL_TEXT = ("envs", "metadata_labels", "metadata_annotations", "lora_target_modules")


# Words a field name spells in lowercase that a person reads otherwise.
_TITLE_WORDS = {"lora": "LoRA", "bnb": "bitsandbytes", "4bit": "4-bit", "8bit": "8-bit", "gpu": "GPU", "cpu": "CPU",
                "lr": "LR", "fsdp": "FSDP", "rslora": "rsLoRA", "dora": "DoRA", "uri": "URI", "seq": "sequence",
                "len": "length", "num": "number of", "procs": "processes", "envs": "environment variables",
                "dtype": "dtype", "liger": "Liger", "mlflow": "MLflow"}


def title(name: str) -> str:
    """A form label from a field name: ``lora_bnb_4bit_compute_dtype`` -> "LoRA bitsandbytes 4-bit compute dtype"."""
    words = [_TITLE_WORDS.get(word, word) for word in name.split("_")]
    text = " ".join(words)
    return text[0].upper() + text[1:]


def _description(name: str, field: Any, defaults: dict[str, Any]) -> str:
    """The spec's description, plus what this form changes: a default of its own (the spec's "default: X" would
    otherwise contradict the value shown), num_epochs ignored under max_steps, and fields a local run ignores."""
    text = field.description
    if name in defaults and defaults[name] != field.default and "(default" in text:
        text = text.replace("(default:", "(spec default:").replace("(default with", "(spec default with")
        text += f" This form starts at {defaults[name]!r}."
    if name == "num_epochs" and defaults.get("max_steps") is not None:
        text += " Ignored while max_steps is set (clear max_steps to train by epochs)."
    if (field.json_schema_extra or {}).get("cluster_only"):
        text += " Applies to the pod and trainjob launchers only; a local run ignores it."
    return text


def form_bounds(name: str, integer: bool) -> dict[str, float]:
    """The field's bounds in the spec (JSON Schema keywords), with an integer's exclusive bound written as the
    inclusive one it means (lora_alpha > 0 is lora_alpha >= 1), so the form's number field shows its minimum."""
    limits = bounds(name)
    if integer:
        for exclusive, inclusive, step in (("exclusiveMinimum", "minimum", 1), ("exclusiveMaximum", "maximum", -1)):
            if exclusive in limits:
                limits[inclusive] = limits.pop(exclusive) + step
    return limits


def param_schemas(**defaults: Any) -> dict[str, dict[str, Any]]:
    """name -> JSON schema of the form field (what Param takes), with ``defaults`` replacing the spec's."""
    properties = LoRASpec.model_json_schema()["properties"]
    schemas = {}
    for name, field in LoRASpec.model_fields.items():
        prop = properties[name]
        types = [p.get("type") for p in prop.get("anyOf", [prop])]
        schema: dict[str, Any] = {
            "type": types[0] if len(types) == 1 else types,
            "default": defaults.get(name, field.default),
            "title": title(name),
            "description": _description(name, field, defaults),
            "section": (field.json_schema_extra or {})["section"],
        }
        if name in OPTIONAL_TEXT:
            schema["type"] = ["string", "null"]
        if schema["type"] == ["boolean", "null"] and name in EFFECTIVE_DEFAULTS and name not in defaults:
            # A switch cannot show "unset": show the value that unset means.
            schema["default"] = EFFECTIVE_DEFAULTS[name]
        # The form offers only what validation accepts (of the FSDP strategies, NO_SHARD: see its description).
        enum = prop.get("enum") or ACCEPTED_CHOICES.get(name)
        if enum:
            schema["enum"] = [*enum, *([None] if "null" in types else [])]
            if "null" in types:
                unset = EFFECTIVE_DEFAULTS.get(name) or EFFECTIVE_4BIT_DEFAULTS.get(name)
                schema["values_display"] = {"null": f"default ({unset})" if unset else "unset"}
        schema.update(form_bounds(name, integer="integer" in types))
        schemas[name] = schema
    unknown = set(defaults) - set(schemas)
    if unknown:
        raise ValueError(f"spec_params got unknown field(s): {', '.join(sorted(unknown))}")
    # The form shows the sections in the spec's order, each field in definition order within its section.
    return dict(sorted(schemas.items(), key=lambda item: SECTIONS.index(item[1]["section"])))


def spec_params(**defaults: Any) -> dict[str, Any]:
    """Airflow Params for every spec field (Airflow import kept inside: this module is cheap to import)."""
    from airflow_provider_lora.compat import Param

    return {name: Param(**schema) for name, schema in param_schemas(**defaults).items()}


def templated_spec_kwargs() -> dict[str, str]:
    """``{field: "{{ params.field }}"}`` for every spec field (optional text fields render None as "")."""
    return {name: ("{{ params.%s or '' }}" if name in OPTIONAL_TEXT else "{{ params.%s }}") % name
            for name in LoRASpec.model_fields}


# The operator's dry run on the form (operator arguments, not spec fields), in a section of its own after the spec's.
DRY_RUN_SCHEMAS: dict[str, dict[str, Any]] = {
    "dry_run": {
        "type": "boolean", "default": False, "title": "Dry run (plan only)", "section": "Dry run",
        "description": "Run the preflight plan instead of the training: the data as the trainer sees it, the model, "
                       "an itemised memory estimate against the memory below, in one pod without a GPU (deleted when "
                       "done). The plan is the task's XCom 'plan'; nothing is trained.",
    },
    "plan_memory_gib": {
        "type": ["number", "null"], "default": None, "exclusiveMinimum": 0, "section": "Dry run",
        "title": "Accelerator memory per process for the plan (GiB)",
        "description": "What the plan compares its memory estimate with, such as 80 for an H100 80GB (the plan pod "
                       "has no GPU to ask). Empty: the memory the pod requests per process.",
    },
}


def dry_run_params() -> dict[str, Any]:
    """Airflow Params for the operator's dry_run and plan_memory_gib."""
    from airflow_provider_lora.compat import Param

    return {name: Param(**schema) for name, schema in DRY_RUN_SCHEMAS.items()}


def templated_dry_run_kwargs() -> dict[str, str]:
    """``{"dry_run": "{{ params.dry_run }}", ...}``: the operator arguments that read dry_run_params back."""
    return {name: "{{ params.%s }}" % name for name in DRY_RUN_SCHEMAS}
