"""Bad input, at every entry point, refused with a message that names the parameter and the value, before
anything is launched.

One table (BAD_INPUTS) of named cases over: operator kwargs (against the emulated cluster: no pod may be created),
the DAG's trigger-form Params (Airflow's own Param validation), the trainer's command line (training must not start),
dataset rows, model paths and output locations. The spec's own per-field table is in test_spec.py (BAD); this
one checks that each entry point surfaces such errors, and the checks that live outside the spec. Then hypothesis
fuzzing of the spec and of every parser the launcher and CLI use, and three whole-run cases: a dataset with a bad
row, an output location that is not writable, an output that already holds a completed run. Counts:
docs/reliability.md.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.launchers.pod import LogCursor, find_result, new_log_lines
from airflow_provider_lora.core.render import IMAGE_REFERENCE, _LABEL_VALUE_OK, safe_label_value
from airflow_provider_lora.core.spec import LoRASpec, SpecError

VALID_OPERATOR = dict(base_model="org/model", dataset="s3://data/train.jsonl", output_uri="s3://runs/out",
                      resource_gpu_per_worker=0, resource_cpu_per_worker="1", resource_memory_per_worker="1Gi")
CANARY = "hf_canary_value_never_shown"

# (id, entry point, input, fragments the message must hold). Entry points: operator (kwargs over VALID_OPERATOR),
# params (trigger-form values), params_then_operator (passes the form's schema, refused by the spec when the task
# starts), cli (argv), rows (dataset rows), completed (an S3 output already holding a completed run).
BAD_INPUTS = [
    # ---- operator kwargs --------------------------------------------------------------------------------------
    ("op_launcher_unknown", "operator", {"launcher": "kubernetes"}, ["launcher='kubernetes'", "pod, trainjob, local"]),
    ("op_on_finish_unknown", "operator", {"on_finish_action": "delete"},
     ["on_finish_action='delete'", "delete_pod, delete_succeeded_pod, keep_pod"]),
    ("op_poll_interval_zero", "operator", {"poll_interval": 0}, ["poll_interval=0", "> 0"]),
    ("op_startup_timeout_negative", "operator", {"startup_timeout": -5}, ["startup_timeout=-5", "> 0"]),
    ("op_image_uppercase", "operator", {"image": "ghcr.io/Team/Trainer:1"},
     ["image='ghcr.io/Team/Trainer:1'", "image reference"]),
    ("op_image_shell", "operator", {"image": "trainer; rm -rf /"}, ["image='trainer; rm -rf /'", "image reference"]),
    ("op_namespace_uppercase", "operator", {"namespace": "ML_Team"}, ["namespace='ML_Team'", "DNS label"]),
    ("op_pull_policy", "operator", {"image_pull_policy": "Sometimes"},
     ["image_pull_policy='Sometimes'", "Always, IfNotPresent, Never"]),
    ("op_hf_token_without_key", "operator", {"hf_token_secret": "hf-token"},
     ["hf_token_secret='hf-token'", "secret-name/key"]),
    ("op_secret_env_three_parts", "operator", {"secret_env": {"S3_KEY": "a/b/c"}},
     ["secret_env['S3_KEY']='a/b/c'", "secret-name/key"]),
    ("op_secret_env_bad_name", "operator", {"secret_env": {"BAD NAME": "creds/key"}},
     ["secret_env key 'BAD NAME'", "environment variable name"]),
    ("op_env_also_from_secret", "operator", {"envs": "AWS_REGION=eu-west-1", "secret_env": {"AWS_REGION": "c/r"}},
     ["AWS_REGION", "also comes from a secret"]),
    ("op_envs_secret_literal", "operator", {"envs": f"HF_TOKEN={CANARY}"}, ["envs: 'HF_TOKEN'", "looks like a secret"]),
    ("op_reserved_label", "operator", {"metadata_labels": "lora.airflow-provider/dag_id=other"},
     ["lora.airflow-provider/dag_id", "reserved"]),
    ("op_label_injection", "operator", {"metadata_labels": "team=ml,evil=a\nb"},
     ["metadata_labels=", "label value"]),
    ("op_annotation_key_injection", "operator", {"metadata_annotations": "a\nb=c"},
     ["metadata_annotations=", "annotation key"]),
    ("op_env_name_injection", "operator", {"envs": "PATH=/x,LD_PRELOAD;X=1"},
     ["envs: 'LD_PRELOAD;X'", "environment variable name"]),
    ("op_two_workers_on_a_pod", "operator", {"resource_num_workers": 2, "effective_batch_size": 128},
     ["resource_num_workers=2", "trainjob"]),
    ("op_lora_r_zero", "operator", {"lora_r": 0}, ["lora_r=0", "integer >= 1"]),
    ("op_unknown_kwarg", "operator", {"lora_rank": 8}, ["lora_rank"]),
    # ---- model paths ----------------------------------------------------------------------------------------------
    ("model_empty", "operator", {"base_model": ""}, ["base_model=''", "Hugging Face model id"]),
    ("model_traversal", "operator", {"base_model": "/mnt/lora/models/../../etc"},
     ["base_model='/mnt/lora/models/../../etc'", "'..'"]),
    ("model_newline", "operator", {"base_model": "org/model\n--trust-remote-code"},
     ["base_model=", "control characters"]),
    ("model_missing_directory", "cli", ["--base-model", "/nonexistent/model", "--dataset", "/nonexistent/d.jsonl",
                                        "--output-uri", "{tmp}/out"],
     ["base_model='/nonexistent/model'", "no such file or directory"]),
    # ---- datasets ---------------------------------------------------------------------------------------------------
    ("dataset_traversal_s3", "operator", {"dataset": "s3://data/team-a/../team-b/secret.jsonl"},
     ["dataset='s3://data/team-a/../team-b/secret.jsonl'", "'..'"]),
    ("dataset_missing_file", "cli", ["--base-model", "org/model", "--dataset", "/nonexistent/d.jsonl",
                                     "--output-uri", "{tmp}/out"],
     ["dataset='/nonexistent/d.jsonl'", "no such file or directory"]),
    ("rows_unknown_columns", "rows", [{"question": "q", "answer": "a"}],
     ["columns ['answer', 'question']", "'messages'", "dataset_format"]),
    ("rows_messages_not_a_list", "rows", [{"messages": "hello"}], ["row 0", "non-empty list of turns"]),
    ("rows_unknown_role", "rows", [{"messages": [{"role": "wizard", "content": "x"}]}],
     ["row 0", "role 'wizard'", "assistant"]),
    ("rows_content_not_text", "rows", [{"messages": [{"role": "user", "content": 3}]}],
     ["row 0", "content must be a string, got int"]),
    ("rows_no_assistant_turn", "rows", [{"messages": [{"role": "user", "content": "hi"}]}],
     ["row 0", "no assistant turn"]),
    ("rows_alpaca_output_null", "rows", [{"instruction": "a", "output": None}],
     ["row 0", "output must be a string"]),
    ("rows_second_row_missing_column", "rows", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}],
     ["1 of 2 rows", "row 1", "missing column 'completion'"]),
    ("rows_empty", "rows", [], ["no rows"]),
    # ---- output locations -----------------------------------------------------------------------------------------
    ("output_not_on_a_volume", "operator", {"output_uri": "/data/runs/x"},
     ["output_uri='/data/runs/x'", "not on a mounted volume", "pvc_claim_name"]),
    ("output_traversal", "operator", {"output_uri": "s3://runs/team-a/../team-b"},
     ["output_uri='s3://runs/team-a/../team-b'", "'..'"]),
    ("output_s3_without_bucket", "operator", {"output_uri": "s3:///runs"},
     ["output_uri='s3:///runs'", "bucket is missing"]),
    ("output_completed_run", "completed", {}, ["already holds a completed run", "overwrite_output=True"]),
    ("output_under_a_file", "cli", ["--base-model", "org/model", "--dataset", "s3://d/x.jsonl",
                                    "--output-uri", "{tmp}/a-file/run"],
     ["output_uri='{tmp}/a-file/run'", "is not writable", "NotADirectoryError"]),
    # ---- trigger-form Params --------------------------------------------------------------------------------------
    ("params_lora_r_zero", "params", {"lora_r": 0}, ["param lora_r", "0 is less than the minimum of 1"]),
    ("params_dropout_text", "params", {"lora_dropout": "high"}, ["param lora_dropout", "'high' is not of type"]),
    ("params_scheduler_unknown", "params", {"lr_scheduler": "cosine_annealing"},
     ["param lr_scheduler", "'cosine_annealing' is not one of"]),
    ("params_dataset_format", "params", {"dataset_format": "yaml"}, ["param dataset_format", "'yaml'"]),
    ("params_gpus_negative", "params", {"resource_gpu_per_worker": -1}, ["param resource_gpu_per_worker", "-1"]),
    ("params_epochs_text", "params", {"num_epochs": "three"}, ["param num_epochs", "'three'"]),
    ("params_seq_len_over_cap", "params_then_operator", {"max_seq_len": 40000},
     ["max_seq_len=40000", "max_tokens_per_gpu=32000"]),
    ("params_target_modules_semicolon", "params_then_operator", {"lora_target_modules": "q_proj;v_proj"},
     ["lora_target_modules='q_proj;v_proj'", "comma-separated"]),
    ("params_memory_gb", "params_then_operator", {"resource_memory_per_worker": "32GB"},
     ["resource_memory_per_worker='32GB'", "'32Gi'"]),
    # ---- command line ----------------------------------------------------------------------------------------------
    ("cli_rank_text", "cli", ["--lora-r", "sixteen"], ["lora_r='sixteen'", "valid integer"]),
    ("cli_unknown_flag", "cli", ["--lora-rank", "8"], ["unrecognized arguments: --lora-rank"]),
    ("cli_spec_file_missing", "cli", ["--spec", "/nonexistent/spec.json"],
     ["--spec '/nonexistent/spec.json'", "cannot read"]),
    ("cli_spec_json_list", "cli", ["--spec-json", "[1, 2]"], ["JSON object", "got list"]),
    ("cli_spec_json_broken", "cli", ["--spec-json", "{lora_r: 8"], ["--spec-json: not a JSON object"]),
    ("cli_learning_rate_nan", "cli", ["--learning-rate", "nan"], ["learning_rate=nan", "> 0 and < 1"]),
    ("cli_spec_and_spec_json", "cli", ["--spec", "a.json", "--spec-json", "{}"], ["not allowed with argument"]),
    ("cli_envs_secret", "cli", ["--envs", f"AWS_SECRET_ACCESS_KEY={CANARY}"],
     ["envs: 'AWS_SECRET_ACCESS_KEY' looks like a secret"]),
]


def test_the_table_is_big_distinct_and_covers_every_entry_point():
    assert len(BAD_INPUTS) >= 40
    assert len({case[0] for case in BAD_INPUTS}) == len(BAD_INPUTS)
    assert {case[1] for case in BAD_INPUTS} >= {"operator", "params", "params_then_operator", "cli", "rows",
                                                "completed"}


def run_cli(argv: list[str]) -> tuple[int, str]:
    from lora_trainer.__main__ import main

    err = io.StringIO()
    with redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    return code, err.getvalue()


def operator_error(cluster, kwargs: dict, s3_bucket: str | None = None) -> str:
    from airflow_provider_lora.operators.lora import LoRATrainingOperator
    from tests.test_reliability_faults import StandInTI

    values = {**VALID_OPERATOR, "task_id": "train", "launcher": "pod", "kubernetes_conn_id": None,
              "config_file": str(cluster.kubeconfig), "poll_interval": 0.2, **kwargs}
    with pytest.raises((ValueError, TypeError, Exception)) as info:
        LoRATrainingOperator(**values).execute({"ti": StandInTI()})
    return str(info.value)


@pytest.mark.parametrize(("entry", "given_input", "fragments"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_before_launching(entry, given_input, fragments, k8s_cluster, s3_endpoint, s3_bucket,
                                               tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a directory")
    fragments = [f.replace("{tmp}", str(tmp_path)) for f in fragments]
    if entry == "operator":
        message = operator_error(k8s_cluster, given_input)
    elif entry == "completed":
        out = f"s3://{s3_bucket}/done"
        storage.write_text(f"{out}/{storage.COMPLETE_MARKER}", json.dumps({"files": {}}))
        message = operator_error(k8s_cluster, {"output_uri": out})
    elif entry in ("params", "params_then_operator"):
        from airflow.sdk.definitions.param import ParamsDict

        from airflow_provider_lora.params import spec_params

        params = ParamsDict(spec_params(base_model="org/model"))
        if entry == "params":
            with pytest.raises(Exception) as info:
                for name, value in given_input.items():
                    params[name] = value  # what the REST API and the trigger form run
                params.validate()
            assert type(info.value).__name__ == "ParamValidationError"
            message = str(info.value)
        else:
            for name, value in given_input.items():
                params[name] = value  # the form's schema accepts it ...
            message = operator_error(k8s_cluster, given_input)  # ... the spec does not, at the task's start
    elif entry == "cli":
        # The trainer's first checks may run (no model, no data); loading the model would fail this test.
        monkeypatch.setattr("lora_trainer.model.load_model", _no_model)
        code, message = run_cli([a.replace("{tmp}", str(tmp_path)) for a in given_input])
        assert code == 2, (code, message)
    elif entry == "rows":
        from lora_trainer.data import DataError, to_examples

        with pytest.raises(DataError) as info:
            to_examples(given_input, "auto")
        message = str(info.value)
    else:
        raise AssertionError(entry)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert CANARY not in message  # a secret-looking value is never echoed
    creates = [r for r in k8s_cluster.request_log if r[0] == "POST"]
    assert creates == []  # nothing was launched
    assert k8s_cluster.pods() == []


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded: the checks should have stopped the run before")


# ---- whole runs on the tiny model: bad row, unwritable output, completed output ------------------------------------

def test_a_dataset_with_one_bad_row_fails_naming_it_and_publishes_nothing(tiny_model_dir, tmp_path):
    from tests.trainer_helpers import FAST, arithmetic_rows, write_jsonl

    rows = arithmetic_rows(16)
    rows[11] = {"messages": [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": 2}]}
    dataset = write_jsonl(tmp_path / "train.jsonl", rows)
    argv = ["--base-model", str(tiny_model_dir), "--dataset", str(dataset), "--output-uri", str(tmp_path / "out")]
    for name, value in FAST.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    code, message = run_cli(argv)
    assert code == 2 and "row 11" in message and "content must be a string, got int" in message, message
    assert not storage.is_complete(tmp_path / "out")


def test_an_unwritable_s3_output_fails_before_the_model_loads(tmp_path, s3_endpoint, monkeypatch):
    import lora_trainer.model as model

    monkeypatch.setattr(model, "load_model", _no_model)
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("{}\n")
    code, message = run_cli(["--base-model", "org/model", "--dataset", str(dataset),
                             "--output-uri", "s3://no-such-bucket-anywhere/run"])
    assert code == 2 and "output_uri='s3://no-such-bucket-anywhere/run' is not writable" in message, message
    assert "NoSuchBucket" in message


def test_an_output_holding_a_completed_run_is_refused_by_the_trainer(tmp_path, monkeypatch):
    import lora_trainer.model as model

    monkeypatch.setattr(model, "load_model", _no_model)
    out = tmp_path / "out"
    storage.write_text(out / storage.COMPLETE_MARKER, json.dumps({"files": {}}))
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("{}\n")
    code, message = run_cli(["--base-model", "org/model", "--dataset", str(dataset), "--output-uri", str(out)])
    assert code == 2 and "already holds a completed run" in message and "overwrite_output=True" in message
    assert (out / storage.COMPLETE_MARKER).exists()  # the completed run is untouched


# ---- fuzzing: a valid spec or a SpecError naming the field; never another exception ----------------------------------

FIELDS = list(LoRASpec.model_fields)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                  max_size=3), max_leaves=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), _JSON, max_size=6))
def test_any_mapping_is_a_spec_or_a_spec_error_naming_the_field(values):
    try:
        spec = LoRASpec.parse(values)
    except SpecError as exc:
        assert exc.errors
        for error in exc.errors:  # each message starts from a field it names (or the model-level rule's fields)
            assert any(name in error for name in [*FIELDS, *map(str, values)]), error
        return
    assert LoRASpec.from_json(spec.to_json()) == spec


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["--lora-r", "--envs", "--dataset", "--output-uri", "--lora-use-dora",
                                 "--no-lora-use-dora", "--resource-cpu-per-worker", "--spec-json", "--max-steps"])
                | st.text(max_size=15), max_size=6).map(lambda xs: [x for x in xs if x]))
def test_any_command_line_is_a_spec_or_a_clear_refusal(argv):
    from lora_trainer.__main__ import build_parser, spec_from_args

    err = io.StringIO()
    try:
        with redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 2 and "lora-train: error:" in err.getvalue()
        return
    try:
        assert isinstance(spec_from_args(args), LoRASpec)
    except SpecError as exc:
        assert exc.errors


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_log_parsers_never_raise(text):
    assert find_result(text) is None or isinstance(find_result(text), (dict, list, str, int, float, bool))
    cursor = LogCursor.decode(text)
    assert LogCursor.decode(cursor.encode()) == cursor
    new = new_log_lines(text, cursor)
    assert all("\n" not in line for line in new.lines)


@settings(max_examples=300)
@given(st.text(max_size=100))
def test_any_label_value_is_made_valid_and_distinct(text):
    value = safe_label_value(text)
    assert len(value) <= 63 and _LABEL_VALUE_OK.match(value)
    assert safe_label_value(text + "x") != value or text + "x" == value


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_operator_secret_refs_are_refs_or_errors_naming_the_parameter(text):
    from airflow_provider_lora.core.render import SecretRef

    try:
        ref = SecretRef.parse(text, "hf_token_secret")
    except ValueError as exc:
        assert str(exc).startswith(f"hf_token_secret={text!r}")
        return
    assert f"{ref.name}/{ref.key}" == text


@settings(max_examples=300)
@given(st.text(max_size=60), st.text(max_size=30))
def test_storage_paths_never_escape(base, part):
    try:
        joined = storage.join("s3://bucket/" + base, part)
    except ValueError as exc:
        assert "traversal" in str(exc) or "bucket" in str(exc)
        return
    assert ".." not in joined.split("/")


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_image_references_never_hold_whitespace_or_shell_characters(text):
    if IMAGE_REFERENCE.match(text):
        assert not set(text) & set(" \t\n;|&$`'\"<>(){}")
