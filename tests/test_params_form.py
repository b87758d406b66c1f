"""The trigger form as a person reads it: labels, descriptions that agree with the values shown, and what a field
does not do in this DAG; and the form against LoRASpec: the bounds and choices it offers are what the spec accepts."""

from __future__ import annotations

import math

from airflow_provider_lora.core.spec import CHOICES, EFFECTIVE_4BIT_DEFAULTS, SECTIONS, LoRASpec, SpecError, bounds
from airflow_provider_lora.params import param_schemas, title


def test_titles_read_as_words_not_field_names():
    assert title("lora_bnb_4bit_compute_dtype") == "LoRA bitsandbytes 4-bit compute dtype"
    assert title("max_tokens_per_gpu") == "Max tokens per GPU"
    assert title("lr_warmup_steps") == "LR warmup steps"
    schemas = param_schemas()
    assert all(s["title"][0].isupper() and "_" not in s["title"] for s in schemas.values())


def test_a_form_default_that_differs_from_the_spec_says_so_instead_of_contradicting_it():
    form = param_schemas(learning_rate=1e-3)
    assert form["learning_rate"]["default"] == 1e-3
    assert form["learning_rate"]["description"] == "Learning rate (spec default: 2e-4). This form starts at 0.001."
    assert param_schemas()["learning_rate"]["description"] == "Learning rate (default: 2e-4)."


def test_num_epochs_says_it_is_ignored_while_max_steps_is_set():
    assert "Ignored while max_steps is set" in param_schemas(max_steps=30)["num_epochs"]["description"]
    assert "Ignored" not in param_schemas()["num_epochs"]["description"]


def test_fields_a_local_run_ignores_say_so():
    form = param_schemas()
    said = {n for n, s in form.items() if "a local run ignores it" in s["description"]}
    assert said == {n for n, f in LoRASpec.model_fields.items() if (f.json_schema_extra or {}).get("cluster_only")}
    assert {"resource_cpu_per_worker", "resource_memory_per_worker", "resource_gpu_per_worker",
            "metadata_labels"} <= said and "learning_rate" not in said


# The form against LoRASpec itself: its bounds and choices are what validation accepts, not a copy that can drift.

NUMERIC = {"integer", "number"}
BOUND_KEYS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
# Values some probes need so that only the probed field decides (one sequence must fit max_tokens_per_gpu; the
# 4-bit options are only used with 4-bit loading).
CONTEXT = {"max_tokens_per_gpu": {"max_seq_len": 1}, "eval_steps": {"eval_fraction": 0.1},
           **{name: {"lora_load_in_4bit": True} for name in EFFECTIVE_4BIT_DEFAULTS}}


def _types(schema: dict) -> set:
    return set(schema["type"]) if isinstance(schema["type"], list) else {schema["type"]}


def _refusal(name: str, value) -> str | None:
    """LoRASpec's message about ``name`` for ``value`` (None: accepted)."""
    try:
        LoRASpec.parse({**CONTEXT.get(name, {}), name: value})
    except SpecError as exc:
        about = [e for e in exc.errors if e.startswith(f"{name}=")]
        assert about, f"{name}={value!r} refused for another field: {exc.errors}"
        return about[0]
    return None


def _numeric_fields() -> dict[str, dict]:
    return {n: s for n, s in param_schemas().items() if _types(s) & NUMERIC}


def test_every_numeric_field_has_the_specs_bounds():
    numeric = _numeric_fields()
    assert {"lora_r", "lora_alpha", "learning_rate", "lora_dropout", "eval_fraction", "seed",
            "max_steps"} <= set(numeric)
    for name, schema in numeric.items():
        form = {k: schema[k] for k in BOUND_KEYS if k in schema}
        spec = bounds(name)
        assert spec, f"{name}: the spec gives no bounds, so the form cannot show any"
        if "integer" in _types(schema):  # an integer's exclusive bound is shown as the inclusive one it means
            spec = {("minimum" if k == "exclusiveMinimum" else "maximum" if k == "exclusiveMaximum" else k):
                    v + (1 if k == "exclusiveMinimum" else -1 if k == "exclusiveMaximum" else 0)
                    for k, v in spec.items()}
        assert form == spec, name
    assert param_schemas()["lora_r"]["minimum"] == 1 and param_schemas()["lora_alpha"]["minimum"] == 1
    assert param_schemas()["learning_rate"]["exclusiveMaximum"] == 1


def test_the_forms_bounds_are_where_lorasspec_starts_refusing():
    """At each bound the form allows, LoRASpec accepts; just past it (below a minimum, above a maximum), it refuses."""
    for name, schema in _numeric_fields().items():
        integer = "integer" in _types(schema)

        def past(value, direction):  # the next value the form refuses
            return value + direction if integer else math.nextafter(value, direction * math.inf)

        if "minimum" in schema:
            assert _refusal(name, schema["minimum"]) is None, name
            refused = _refusal(name, past(schema["minimum"], -1))
            assert refused and "is not valid: must be" in refused, (name, refused)
        if "exclusiveMinimum" in schema:
            assert _refusal(name, schema["exclusiveMinimum"]) is not None, name
            assert _refusal(name, past(schema["exclusiveMinimum"], 1)) is None, name
        if "maximum" in schema:
            assert _refusal(name, schema["maximum"]) is None, name
            assert _refusal(name, past(schema["maximum"], 1)) is not None, name
        if "exclusiveMaximum" in schema:
            assert _refusal(name, schema["exclusiveMaximum"]) is not None, name
            assert _refusal(name, past(schema["exclusiveMaximum"], -1)) is None, name
    # Spelled out: the refusals quote the bound the form shows.
    assert _refusal("lora_r", 0) == "lora_r=0 is not valid: must be an integer >= 1"
    assert _refusal("lora_alpha", 0) == "lora_alpha=0 is not valid: must be an integer > 0"
    assert "must be a number > 0 and < 1" in _refusal("learning_rate", 1.0)


def test_every_offered_choice_parses_and_no_refused_choice_is_offered():
    form = param_schemas()
    offered_any = False
    for name, schema in form.items():
        offered = [c for c in schema.get("enum", []) if c is not None]
        for choice in offered:
            assert _refusal(name, choice) is None, (name, choice)
            offered_any = True
        for choice in CHOICES.get(name, ()):
            assert (choice in offered) is (_refusal(name, choice) is None), (name, choice)
    assert offered_any
    assert [c for c in form["fsdp_sharding_strategy"]["enum"] if c] == ["NO_SHARD"]
    assert "DDP" in _refusal("fsdp_sharding_strategy", "FULL_SHARD")
    assert set(form["dtype"]["enum"]) == {"auto", "bfloat16", "float16", "float32"}


def test_sections_follow_the_spec():
    form = param_schemas()
    assert all(s["section"] == LoRASpec.model_fields[n].json_schema_extra["section"] for n, s in form.items())
    order = [s["section"] for s in form.values()]
    assert order == sorted(order, key=SECTIONS.index) and set(order) == set(SECTIONS)
