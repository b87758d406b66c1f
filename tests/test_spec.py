"""LoRASpec: parity with the seed KFP component, validation messages, JSON round trips, the KEY=VAL parsers and the
batch plan. No training, no network."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_lora.core.spec import (
    COMPUTE_DTYPES,
    DATASET_FORMATS,
    EFFECTIVE_4BIT_DEFAULTS,
    EFFECTIVE_DEFAULTS,
    LR_SCHEDULERS,
    QUANT_TYPES,
    LoRASpec,
    SpecError,
    check_label_key,
    check_quantity,
    format_key_values,
    parse_key_values,
    plan_batches,
    seed_parameter_names,
)

# ---- the seed component's parameter table --------------------------------------------------------------------------

SEED_SHARED = Path(__file__).resolve().parents[2] / "shared/seed/lora-training-component.md"
SEED_COPY = Path(__file__).resolve().parent / "data/seed-lora-training-component.md"
SEED_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _seed_text() -> str:
    return (SEED_SHARED if SEED_SHARED.exists() else SEED_COPY).read_text(encoding="utf-8")


def _seed_value(text: str) -> Any:
    """A default cell as the seed writes it: `None`, `128`, `0.0`, `""`, `"4"`, `Qwen/Qwen2.5-1.5B-Instruct`."""
    text = text.strip().strip("`")
    if text == "None":
        return None
    if text.startswith('"'):
        return json.loads(text)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _seed_type(text: str) -> Any:
    text = text.strip().strip("`")
    match = re.fullmatch(r"Optional\[(\w+)\]", text)
    if match:
        return Optional[SEED_TYPES[match.group(1)]]
    return SEED_TYPES[text]


def seed_rows() -> list[dict[str, Any]]:
    """The training_* rows of the seed's Inputs table, in order."""
    rows = []
    for line in _seed_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`training_"):
            continue
        name, type_text, default_text, description = cells
        rows.append({"seed_name": name.strip("`"), "name": name.strip("`").removeprefix("training_"),
                     "type": _seed_type(type_text), "optional": type_text.strip("`").startswith("Optional["),
                     "default": _seed_value(default_text), "description": description})
    return rows


SEED_ROWS = seed_rows()


def test_seed_table_is_read():
    # Guards the parser itself: the seed has 33 training_* inputs, starting with training_base_model.
    assert len(SEED_ROWS) == 33
    assert SEED_ROWS[0]["seed_name"] == "training_base_model"
    assert SEED_ROWS[-1]["seed_name"] == "training_fsdp_sharding_strategy"


def test_seed_copy_matches_shared_seed():
    if not SEED_SHARED.exists():
        pytest.skip("no shared seed next to this checkout (clean clone): the copy is what the tests read")
    assert SEED_COPY.read_text(encoding="utf-8") == SEED_SHARED.read_text(encoding="utf-8")


def test_seed_names_in_seed_order():
    assert seed_parameter_names() == [row["name"] for row in SEED_ROWS]
    # ... and they come first in the spec, so operator kwargs and CLI flags list them in the seed's order.
    assert list(LoRASpec.model_fields)[: len(SEED_ROWS)] == seed_parameter_names()


@pytest.mark.parametrize("row", SEED_ROWS, ids=[r["seed_name"] for r in SEED_ROWS])
def test_seed_parameter_type_and_default(row):
    field = LoRASpec.model_fields[row["name"]]
    assert field.annotation == row["type"], f"{row['name']}: {field.annotation} != seed {row['type']}"
    if row["optional"]:
        assert row["default"] is None and field.default is None
    else:
        assert field.default == row["default"]
        assert type(field.default) is type(row["default"])


SEED_EFFECTIVE = [(r["name"], m.group(1)) for r in SEED_ROWS
                  if r["optional"] and (m := re.search(r"\(default: ([^)]+)\)", r["description"]))]


def test_seed_documents_some_effective_defaults():
    assert {name for name, _ in SEED_EFFECTIVE} == {"learning_rate", "lr_warmup_steps", "num_epochs"}


@pytest.mark.parametrize(("name", "text"), SEED_EFFECTIVE, ids=[n for n, _ in SEED_EFFECTIVE])
def test_seed_effective_default_filled_by_validation(name, text):
    assert getattr(LoRASpec(), name) == _seed_value(text)
    assert getattr(LoRASpec.parse({}), name) == _seed_value(text)


def _description_default(description: str) -> Any:
    text = re.search(r"\(default: ([^);]+)[);]", description).group(1).strip()
    return {"true": True, "false": False}.get(text, _seed_value(text))


SPEC_EFFECTIVE = [(n, f.description) for n, f in LoRASpec.model_fields.items()
                  if n in seed_parameter_names() and "(default: " in (f.description or "")]


@pytest.mark.parametrize(("name", "description"), SPEC_EFFECTIVE, ids=[n for n, _ in SPEC_EFFECTIVE])
def test_spec_descriptions_state_the_effective_default(name, description):
    # The spec's own "(default: X)" texts (shown in the form, --help and docs) say what validation fills in.
    assert getattr(LoRASpec(), name) == _description_default(description)


def test_effective_defaults_only_for_optional_seed_fields():
    fields = LoRASpec.model_fields
    for name in {**EFFECTIVE_DEFAULTS, **EFFECTIVE_4BIT_DEFAULTS}:
        assert name in seed_parameter_names()
        assert fields[name].default is None
    spec = LoRASpec()
    for name, value in EFFECTIVE_DEFAULTS.items():
        assert getattr(spec, name) == value
    for name in EFFECTIVE_4BIT_DEFAULTS:
        assert getattr(spec, name) is None  # only with 4-bit
    four = LoRASpec(lora_load_in_4bit=True)
    for name, value in EFFECTIVE_4BIT_DEFAULTS.items():
        assert getattr(four, name) == value


def test_4bit_flag_given_as_text():
    # Trigger forms and KFP pass strings: "false" must not switch on the 4-bit defaults.
    assert LoRASpec.parse({"lora_load_in_4bit": "false"}).lora_bnb_4bit_quant_type is None
    assert LoRASpec.parse({"lora_load_in_4bit": "0"}).lora_load_in_4bit is False
    spec = LoRASpec.parse({"lora_load_in_4bit": "true"})
    assert spec.lora_load_in_4bit is True and spec.lora_bnb_4bit_quant_type == "nf4"


# ---- bad inputs: one message naming the parameter, the value and what is accepted ------------------------------------

BAD = [
    ("lora_r_zero", {"lora_r": 0}, ["lora_r=0", "integer >= 1"]),
    ("lora_r_text", {"lora_r": "abc"}, ["lora_r='abc'", "valid integer"]),
    ("lora_alpha_zero", {"lora_alpha": 0}, ["lora_alpha=0", "> 0"]),
    ("lora_dropout_one", {"lora_dropout": 1.0}, ["lora_dropout=1.0", ">= 0 and < 1"]),
    ("lora_dropout_negative", {"lora_dropout": -0.1}, ["lora_dropout=-0.1", ">= 0 and < 1"]),
    ("learning_rate_zero", {"learning_rate": 0}, ["learning_rate=0", "> 0 and < 1"]),
    ("learning_rate_two", {"learning_rate": 2}, ["learning_rate=2", "> 0 and < 1"]),
    ("num_epochs_zero", {"num_epochs": 0}, ["num_epochs=0", "integer >= 1"]),
    ("effective_batch_size_zero", {"effective_batch_size": 0}, ["effective_batch_size=0", "integer >= 1"]),
    ("max_tokens_per_gpu_zero", {"max_tokens_per_gpu": 0}, ["max_tokens_per_gpu=0", "integer >= 1"]),
    ("lr_warmup_negative", {"lr_warmup_steps": -1}, ["lr_warmup_steps=-1", "integer >= 0"]),
    ("seed_negative", {"seed": -1}, ["seed=-1", "integer >= 0"]),
    ("4bit_and_8bit", {"lora_load_in_4bit": True, "lora_load_in_8bit": True},
     ["lora_load_in_4bit=True", "lora_load_in_8bit=True", "choose one"]),
    ("quant_type_nf5", {"lora_load_in_4bit": True, "lora_bnb_4bit_quant_type": "nf5"},
     ["lora_bnb_4bit_quant_type='nf5'", "nf4, fp4"]),
    ("compute_dtype_fp8", {"lora_load_in_4bit": True, "lora_bnb_4bit_compute_dtype": "fp8"},
     ["lora_bnb_4bit_compute_dtype='fp8'", "bfloat16, float16, float32"]),
    ("bnb_option_without_4bit", {"lora_bnb_4bit_use_double_quant": True},
     ["lora_bnb_4bit_use_double_quant=True", "only used with 4-bit", "lora_load_in_4bit=True"]),
    ("scheduler_cosine_annealing", {"lr_scheduler": "cosine_annealing"},
     ["lr_scheduler='cosine_annealing'", "linear, cosine"]),
    ("fsdp_full_shard", {"fsdp_sharding_strategy": "FULL_SHARD"},
     ["fsdp_sharding_strategy='FULL_SHARD'", "DDP", "NO_SHARD"]),
    ("fsdp_zero3", {"fsdp_sharding_strategy": "ZERO3"},
     ["fsdp_sharding_strategy='ZERO3'", "FULL_SHARD, HYBRID_SHARD, NO_SHARD"]),
    ("seq_len_over_token_cap", {"max_seq_len": 40000},
     ["max_seq_len=40000", "max_tokens_per_gpu=32000", "raise max_tokens_per_gpu"]),
    # envs values may be private: messages name the variable or the item, never echo the whole value.
    ("envs_item_without_equals", {"envs": "A=1,B"}, ["envs=(value not shown)", "'B' has no '='", "KEY=VAL"]),
    ("envs_bad_name", {"envs": "1BAD=x"}, ["envs: '1BAD'", "[A-Za-z_][A-Za-z0-9_]*"]),
    ("envs_trailing_backslash", {"envs": "A=1\\"}, ["envs=(value not shown)", "lone backslash"]),
    ("envs_twice", {"envs": "A=1,A=2"}, ["envs=(value not shown)", "sets 'A' twice"]),
    ("envs_secret_by_name", {"envs": "HF_TOKEN=hf_canary"}, ["envs: 'HF_TOKEN' looks like a secret", "secret_env"]),
    ("envs_secret_key", {"envs": "AWS_SECRET_ACCESS_KEY=canary"}, ["'AWS_SECRET_ACCESS_KEY'", "hf_token_secret"]),
    ("labels_bad_key", {"metadata_labels": "a b=c"}, ["metadata_labels='a b=c'", "'a b'", "label key"]),
    ("labels_value_64_chars", {"metadata_labels": "team=" + "x" * 64},
     ["metadata_labels='team=" + "x" * 64, "<= 63 characters", "label value"]),
    ("labels_value_slash", {"metadata_labels": "team=ml/nlp"}, ["metadata_labels='team=ml/nlp'", "'ml/nlp'",
                                                                 "label value"]),
    ("labels_empty_prefix", {"metadata_labels": "/team=ml"}, ["metadata_labels='/team=ml'", "'/team'",
                                                               "[prefix/]name"]),
    ("annotations_bad_key", {"metadata_annotations": "a b=c"},
     ["metadata_annotations='a b=c'", "'a b'", "annotation key"]),
    ("cpu_with_words", {"resource_cpu_per_worker": "4 cores"},
     ["resource_cpu_per_worker='4 cores'", "Kubernetes quantity such as '4', '500m'"]),
    ("cpu_trailing_newline", {"resource_cpu_per_worker": "4\n"},
     ["resource_cpu_per_worker='4\\n'", "Kubernetes quantity"]),
    ("memory_32GB", {"resource_memory_per_worker": "32GB"},
     ["resource_memory_per_worker='32GB'", "'32Gi'"]),
    ("memory_zero", {"resource_memory_per_worker": "0"}, ["resource_memory_per_worker='0'", "positive"]),
    ("memory_zero_gi", {"resource_memory_per_worker": "0Gi"}, ["resource_memory_per_worker='0Gi'", "positive"]),
    ("procs_zero", {"resource_num_procs_per_worker": "0"},
     ["resource_num_procs_per_worker='0'", "'auto'", "integer >= 1"]),
    ("procs_two", {"resource_num_procs_per_worker": "two"},
     ["resource_num_procs_per_worker='two'", "'auto'", "integer >= 1"]),
    ("procs_superscript", {"resource_num_procs_per_worker": "\u00b2"},
     ["resource_num_procs_per_worker='\u00b2'", "integer >= 1"]),
    ("workers_zero", {"resource_num_workers": 0}, ["resource_num_workers=0", "integer >= 1"]),
    ("gpus_negative", {"resource_gpu_per_worker": -1}, ["resource_gpu_per_worker=-1", "integer >= 0"]),
    ("unknown_lora_rank", {"lora_rank": 8}, ["lora_rank=8", "unknown parameter", "did you mean lora_r"]),
    ("eval_fraction_half", {"eval_fraction": 0.5}, ["eval_fraction=0.5", ">= 0 and < 0.5"]),
    ("save_merged_4bit", {"save_merged": True, "lora_load_in_4bit": True},
     ["save_merged=True", "quantised", "train unquantised"]),
    ("eval_steps_without_eval_rows", {"eval_steps": 50}, ["eval_steps=50", "set eval_fraction"]),
    ("eval_steps_zero", {"eval_steps": 0, "eval_fraction": 0.1}, ["eval_steps=0"]),
    ("batch_not_divisible", {"effective_batch_size": 10, "resource_num_workers": 3},
     ["effective_batch_size=10", "3 workers x 1 processes", "multiple"]),
    ("target_modules_semicolon", {"lora_target_modules": "q_proj;v_proj"},
     ["lora_target_modules='q_proj;v_proj'", "comma-separated", "'q_proj,v_proj'"]),
    ("max_steps_zero", {"max_steps": 0}, ["max_steps=0", "integer >= 1", "unset"]),
    ("dataset_format_yaml", {"dataset_format": "yaml"}, ["dataset_format='yaml'", "'messages'", "'alpaca'"]),
    ("dtype_fp8", {"dtype": "fp8"}, ["dtype='fp8'", "'bfloat16'"]),
    ("bool_maybe", {"lora_use_dora": "maybe"}, ["lora_use_dora='maybe'", "valid boolean"]),
]


@pytest.mark.parametrize(("values", "expected"), [(v, e) for _, v, e in BAD], ids=[i for i, _, _ in BAD])
def test_bad_input_is_explained(values, expected):
    with pytest.raises(SpecError) as info:
        LoRASpec.parse(values)
    assert len(info.value.errors) == 1, info.value.errors
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert isinstance(info.value, ValueError)


def test_bad_table_is_big_and_distinct():
    assert len(BAD) >= 30
    assert len({i for i, _, _ in BAD}) == len(BAD)


def test_constructor_raises_too():
    # The constructor validates as well (pydantic's error); parse turns it into a SpecError.
    with pytest.raises(ValueError, match="lora_r"):
        LoRASpec(lora_r=0)


def test_every_bad_field_reported_at_once():
    with pytest.raises(SpecError) as info:
        LoRASpec.parse({"lora_r": 0, "lora_dropout": 2.0, "envs": "A", "resource_memory_per_worker": "lots",
                        "lr_scheduler": "cosine_annealing", "lora_rank": 4})
    errors = info.value.errors
    assert len(errors) >= 3
    for name in ("lora_r=0", "lora_dropout=2.0", "envs=(value not shown)", "resource_memory_per_worker='lots'",
                 "lr_scheduler='cosine_annealing'", "lora_rank=4"):
        assert sum(name in e for e in errors) == 1, (name, errors)


def test_parse_rejects_a_non_mapping():
    with pytest.raises(SpecError, match="mapping"):
        LoRASpec.parse([("lora_r", 8)])  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="mapping"):
        LoRASpec.from_json("[1, 2]")


# ---- good values ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantity", ["500m", "1.5", "32Gi", "2", ".5", "1e3", "128974848", "129M"])
def test_good_quantities(quantity):
    spec = LoRASpec.parse({"resource_cpu_per_worker": quantity, "resource_memory_per_worker": quantity})
    assert spec.resource_cpu_per_worker == quantity and spec.resource_memory_per_worker == quantity


def test_good_labels_and_annotations():
    spec = LoRASpec.parse({"metadata_labels": "example.com/team=ml, app.kubernetes.io/name=lora-ft,empty=",
                           "metadata_annotations": "example.com/owner=Jane Doe\\, ML,note=a\\=b"})
    assert spec.labels == {"example.com/team": "ml", "app.kubernetes.io/name": "lora-ft", "empty": ""}
    assert spec.annotations == {"example.com/owner": "Jane Doe, ML", "note": "a=b"}


def test_escaped_envs():
    spec = LoRASpec.parse({"envs": "HF_HOME=/data/hf,LIST=a\\,b\\,c,EXPR=x\\=1,WIN=C:\\\\tmp"})
    assert spec.env_vars == {"HF_HOME": "/data/hf", "LIST": "a,b,c", "EXPR": "x=1", "WIN": "C:\\tmp"}


@pytest.mark.parametrize(("procs", "gpus", "expected"), [("auto", 1, 1), ("auto", 4, 4), ("auto", 0, 1),
                                                          ("4", 1, 4), ("1", 8, 1)])
def test_procs(procs, gpus, expected):
    spec = LoRASpec.parse({"resource_num_procs_per_worker": procs, "resource_gpu_per_worker": gpus,
                           "resource_num_workers": 2})
    assert spec.procs_per_worker == expected
    assert spec.world_size == 2 * expected


def test_target_modules_normalised():
    spec = LoRASpec.parse({"lora_target_modules": " q_proj, v_proj ,model.layers.0.mlp"})
    assert spec.lora_target_modules == "q_proj,v_proj,model.layers.0.mlp"
    assert spec.target_modules == ["q_proj", "v_proj", "model.layers.0.mlp"]
    assert LoRASpec().target_modules == []


def test_good_label_keys():
    assert check_label_key("example.com/team")
    assert check_label_key("a" * 63)
    assert not check_label_key("a" * 64)
    assert not check_label_key("bad..prefix/x")
    assert not check_label_key("-bad.com/x")
    assert not check_label_key("team\n")


def test_spec_is_frozen():
    spec = LoRASpec()
    with pytest.raises(Exception):
        spec.lora_r = 8  # type: ignore[misc]
    assert spec.lora_r == 16


# ---- JSON round trips ----------------------------------------------------------------------------------------------

FULL_4BIT = {
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "effective_batch_size": 64, "max_tokens_per_gpu": 16384,
    "max_seq_len": 2048, "learning_rate": 1e-4, "lr_warmup_steps": 5, "checkpoint_at_epoch": True,
    "num_epochs": 2, "data_output_dir": "/pvc/data", "envs": "HF_HOME=/pvc/hf,LIST=a\\,b",
    "resource_cpu_per_worker": "500m", "resource_gpu_per_worker": 2, "resource_memory_per_worker": "64Gi",
    "resource_num_procs_per_worker": "2", "resource_num_workers": 2, "metadata_labels": "example.com/team=ml",
    "metadata_annotations": "note=x\\=y", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
    "lora_target_modules": "q_proj,v_proj", "lora_use_rslora": True, "lora_use_dora": True,
    "lora_load_in_4bit": True, "lora_load_in_8bit": False, "lora_bnb_4bit_quant_type": "fp4",
    "lora_bnb_4bit_compute_dtype": "float16", "lora_bnb_4bit_use_double_quant": False,
    "lora_sample_packing": False, "seed": 7, "use_liger": True, "lr_scheduler": "cosine",
    "fsdp_sharding_strategy": "NO_SHARD", "dataset": "s3://bucket/train.jsonl", "dataset_format": "messages",
    "eval_fraction": 0.1, "eval_steps": 20, "sample_prompts": 5, "sample_max_new_tokens": 32, "train_on_inputs": True, "output_uri": "s3://bucket/runs/1", "overwrite_output": True,
    "save_merged": False, "resume_from_checkpoint": "latest", "max_steps": 100, "dtype": "bfloat16",
    "mlflow_tracking_uri": "http://mlflow.mlflow:5000", "mlflow_experiment": "support-bot",
}


def test_full_spec_sets_every_field():
    assert set(FULL_4BIT) == set(LoRASpec.model_fields)
    assert LoRASpec.parse(FULL_4BIT).model_dump() == FULL_4BIT


@pytest.mark.parametrize("values", [{}, FULL_4BIT, {"lora_load_in_4bit": True}], ids=["defaults", "full-4bit",
                                                                                    "4bit-defaults"])
def test_json_round_trip(values):
    spec = LoRASpec.parse(values)
    text = spec.to_json()
    assert json.loads(text)["lora_r"] == spec.lora_r
    again = LoRASpec.from_json(text)
    assert again == spec
    assert again.to_json() == text


_ENV_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
_LABEL_NAMES = st.from_regex(r"[a-z0-9]([-a-z0-9_.]{0,10}[a-z0-9])?", fullmatch=True)


@st.composite
def valid_specs(draw) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if draw(st.booleans()):
        values["lora_r"] = draw(st.integers(1, 512))
    if draw(st.booleans()):
        values["lora_alpha"] = draw(st.integers(1, 1024))
    if draw(st.booleans()):
        values["lora_dropout"] = draw(st.floats(0, 1, exclude_max=True))
    if draw(st.booleans()):
        values["learning_rate"] = draw(st.floats(1e-8, 1, exclude_max=True))
    if draw(st.booleans()):
        values["num_epochs"] = draw(st.integers(1, 100))
    if draw(st.booleans()):
        values["lr_scheduler"] = draw(st.sampled_from(LR_SCHEDULERS))
    if draw(st.booleans()):
        values["dataset_format"] = draw(st.sampled_from(DATASET_FORMATS))
    if draw(st.booleans()):
        values["eval_fraction"] = draw(st.floats(0, 0.5, exclude_max=True))
    quant = draw(st.sampled_from(["4bit", "8bit", "none"]))
    if quant == "4bit":
        values["lora_load_in_4bit"] = True
        if draw(st.booleans()):
            values["lora_bnb_4bit_quant_type"] = draw(st.sampled_from(QUANT_TYPES))
        if draw(st.booleans()):
            values["lora_bnb_4bit_compute_dtype"] = draw(st.sampled_from(COMPUTE_DTYPES))
    elif quant == "8bit":
        values["lora_load_in_8bit"] = True
    else:
        values["save_merged"] = draw(st.booleans())  # merging needs an unquantised base
    values["envs"] = format_key_values(draw(st.dictionaries(_ENV_NAMES, st.text(max_size=20), max_size=4)))
    values["metadata_labels"] = format_key_values(draw(st.dictionaries(_LABEL_NAMES, _LABEL_NAMES, max_size=3)))
    values["metadata_annotations"] = format_key_values(
        draw(st.dictionaries(_LABEL_NAMES.map(lambda k: "example.com/" + k), st.text(max_size=20), max_size=3)))
    workers = draw(st.integers(1, 4))
    procs = draw(st.integers(1, 8))
    values.update(resource_num_workers=workers, resource_num_procs_per_worker=str(procs),
                  effective_batch_size=workers * procs * draw(st.integers(1, 64)))
    return values


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_specs())
def test_generated_specs_round_trip(values):
    spec = LoRASpec.parse(values)
    for name, value in values.items():
        assert getattr(spec, name) == value
    again = LoRASpec.from_json(spec.to_json())
    assert again == spec
    assert LoRASpec.parse(spec.model_dump()) == spec  # re-validating a dumped spec never raises
    assert again.env_vars == parse_key_values(values["envs"])


# ---- KEY=VAL parsers and checks -------------------------------------------------------------------------------------

_KEYS = st.text(min_size=1).map(str.strip).filter(bool)


@settings(max_examples=300)
@given(st.dictionaries(_KEYS, st.text()))
def test_key_values_round_trip(pairs):
    assert parse_key_values(format_key_values(pairs)) == pairs


@settings(max_examples=100)
@given(st.dictionaries(_KEYS, st.text(alphabet=",=\\ ab", max_size=8), min_size=1))
def test_key_values_round_trip_with_separators(pairs):
    text = format_key_values(pairs)
    assert parse_key_values(text) == pairs


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from(list(",=\\ \n\tab=,\\")) | st.characters(), max_size=30))
def test_parse_key_values_returns_dict_or_value_error(text):
    try:
        pairs = parse_key_values(text, "envs")
    except ValueError as exc:
        assert str(exc).startswith("envs")
        return
    assert isinstance(pairs, dict)
    assert all(key and key == key.strip() for key in pairs)
    assert parse_key_values(format_key_values(pairs)) == pairs


def test_parse_key_values_examples():
    assert parse_key_values("") == {}
    assert parse_key_values("  ") == {}
    assert parse_key_values(" A =1 , B= 2") == {"A": "1 ", "B": " 2"}
    assert parse_key_values("A=x=y") == {"A": "x=y"}
    assert parse_key_values("A=") == {"A": ""}
    for bad in ("A=1,", ",A=1", "A", "=1", "A=1,A=2", "A=\\"):
        with pytest.raises(ValueError):
            parse_key_values(bad)


@settings(max_examples=300)
@given(st.text())
def test_checks_never_crash(text):
    assert check_quantity(text) in (True, False)
    assert check_label_key(text) in (True, False)
    # Neither accepts whitespace anywhere (in particular not a trailing newline).
    assert not check_quantity(text + "\n")
    assert not check_label_key(text + "\n")


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["envs", "metadata_labels", "metadata_annotations", "resource_memory_per_worker",
                        "resource_cpu_per_worker", "resource_num_procs_per_worker", "lora_target_modules"]),
       st.text(max_size=40))
def test_parse_arbitrary_text_is_spec_or_spec_error(name, text):
    try:
        spec = LoRASpec.parse({name: text})
    except SpecError as exc:
        assert len(exc.errors) == 1
        if name == "resource_num_procs_per_worker" and "not divisible" in exc.errors[0]:
            assert text.isdigit() and 128 % int(text)  # a valid count that does not divide the default batch
        elif name == "envs":  # names the parameter, never echoes the (possibly private) value
            assert exc.errors[0].startswith("envs") and f"envs={text!r}" not in exc.errors[0]
        else:
            assert exc.errors[0].startswith(f"{name}={text!r}")
        return
    assert isinstance(spec, LoRASpec)
    assert LoRASpec.from_json(spec.to_json()) == spec


# ---- batch plan ----------------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(per_process=st.integers(1, 512), world=st.integers(1, 16), max_seq_len=st.integers(1, 65536),
       slack=st.integers(0, 200000))
def test_plan_batches_properties(per_process, world, max_seq_len, slack):
    spec = LoRASpec.parse({"effective_batch_size": per_process * world, "max_seq_len": max_seq_len,
                           "max_tokens_per_gpu": max_seq_len + slack})
    plan = plan_batches(spec, world)
    assert plan.micro_batch * plan.grad_accum * plan.world_size == spec.effective_batch_size
    assert plan.world_size == world
    assert plan.micro_batch * spec.max_seq_len <= spec.max_tokens_per_gpu
    assert plan.max_tokens_per_micro_batch == plan.micro_batch * spec.max_seq_len
    # The largest such micro-batch: nothing bigger divides the per-process batch within the token cap.
    cap = spec.max_tokens_per_gpu // spec.max_seq_len
    assert not any(per_process % m == 0 for m in range(plan.micro_batch + 1, min(cap, per_process) + 1))
    assert str(plan.micro_batch) in plan.describe()


def test_plan_batches_seed_defaults():
    plan = plan_batches(LoRASpec(), 1)
    assert (plan.micro_batch, plan.grad_accum, plan.world_size) == (2, 64, 1)
    plan = plan_batches(LoRASpec(), 8)
    assert (plan.micro_batch, plan.grad_accum) == (2, 8)


def test_a_prime_effective_batch_is_said_with_a_multiple_to_choose():
    # 4 rows fit per micro-batch, but 13 is prime: micro-batch 1 x accumulation 13, said with 12 or 16 instead.
    spec = LoRASpec.parse({"effective_batch_size": 13, "max_seq_len": 512, "max_tokens_per_gpu": 2048})
    plan = plan_batches(spec, 1)
    assert (plan.micro_batch, plan.grad_accum) == (1, 13)
    warning = plan.warning(spec)
    assert "micro-batch 1 x gradient accumulation 13" in warning and "micro-batches of 4" in warning
    assert "choose a multiple of 4, such as 12 or 16" in warning
    assert plan_batches(LoRASpec(), 1).warning(LoRASpec()) is None  # 128 with room for 2: no warning
    one_fits = LoRASpec.parse({"effective_batch_size": 13, "max_seq_len": 512, "max_tokens_per_gpu": 512})
    assert plan_batches(one_fits, 1).warning(one_fits) is None  # micro-batch 1 is all that fits anyway


def test_warmup_longer_than_the_run_is_said_with_the_numbers():
    from airflow_provider_lora.core.spec import optimizer_steps, warmup_warning

    # Defaults (warmup 10, 3 epochs) on 40 rows at batch 8: 5 steps an epoch, 15 in all.
    spec = LoRASpec.parse({"effective_batch_size": 8, "max_seq_len": 64, "max_tokens_per_gpu": 256})
    plan = plan_batches(spec, 1)
    assert optimizer_steps(spec, plan, 40) == 15 and warmup_warning(spec, 15) is None
    assert optimizer_steps(spec, plan, 16) == 6
    assert optimizer_steps(spec, plan, 44) == 18  # 11 micro-batches of 4: the last, alone, is a step of its own
    warning = warmup_warning(spec, 6)
    assert "lr_warmup_steps=10 is at least the run's 6 optimizer step(s)" in warning
    assert "climbs to 1.20e-04 of learning_rate=0.0002" in warning and "such as 0" in warning
    assert optimizer_steps(spec.model_copy(update={"max_steps": 3}), plan, 1000) == 3


def test_plan_batches_world_must_divide():
    with pytest.raises(SpecError, match="effective_batch_size=128 is not divisible by the world size 3"):
        plan_batches(LoRASpec(), 3)


# ---- transformers ----------------------------------------------------------------------------------------------------

def test_lr_schedulers_are_transformers_scheduler_types():
    import transformers

    known = {s.value for s in transformers.SchedulerType}
    assert set(LR_SCHEDULERS) <= known, set(LR_SCHEDULERS) - known
    for name in LR_SCHEDULERS:
        assert transformers.SchedulerType(name).value == name


def test_annotations_are_plain_types():
    # Every field is a str/int/float/bool, an Optional of one, or a Literal of strings: forms, flags and the KFP
    # signature can all express that.
    for name, field in LoRASpec.model_fields.items():
        ann = field.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if typing.get_origin(ann) is typing.Literal:
            assert all(isinstance(a, str) for a in typing.get_args(ann)), name
        elif args:
            assert len(args) == 1 and args[0] in SEED_TYPES.values(), name
        else:
            assert ann in SEED_TYPES.values(), name


def test_an_oci_base_model_is_refused_before_launch():
    with pytest.raises(SpecError) as caught:
        LoRASpec.parse(dict(base_model="oci://quay.io/models/granite:1", dataset="d"))
    assert "base_model='oci://quay.io/models/granite:1' is not valid: oci:// models (modelcars) are not " \
           "supported" in str(caught.value)
