"""The trigger form as a person reads it: labels, descriptions that agree with the values shown, and what a field
does not do in this DAG."""

from __future__ import annotations

from airflow_provider_lora.core.spec import LoRASpec
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
