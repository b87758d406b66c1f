"""The KFP component train_model: the seed's interface exactly, on the same LoRASpec as the operator, and real runs.

kfp cannot share this venv (kfp 2.x pins kubernetes<31, the Airflow side >=36), so the KFP parts run as scripts in
.venv-kfp (`make test` builds it) through subprocess; this side checks what they report. The pure parts of the
component (input mapping, validation, pod options) import no kfp and are tested here directly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from airflow_provider_lora.core.spec import LoRASpec, seed_parameter_names
from airflow_provider_lora.kfp import runtime
from airflow_provider_lora.kfp.cluster import _pod_options, launch_settings

ROOT = Path(__file__).resolve().parent.parent
KFP_PYTHON = ROOT / ".venv-kfp" / "bin" / "python"
KFP_IMAGE = "registry.example/lora-trainer:0.1.0"  # LORA_KFP_BASE_IMAGE of the compiled components
SEED_MD = ROOT / "tests" / "data" / "seed-lora-training-component.md"
EXAMPLE = ROOT / "tests" / "data" / "seed_example_pipeline.py"
SEED_IMPORT = "from components.training.lora import train_model"
OUR_IMPORT = "from airflow_provider_lora.kfp.component import train_model"
# What kfp 2.17.3 pins differently from the Airflow side's CPU constraints (.ci/constraints-kfp.txt says why).
KFP_OWN_PINS = {"kubernetes", "protobuf", "requests"}


@pytest.fixture(scope="module")
def kfp_python() -> Path:
    if not KFP_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-kfp is missing in CI: `make test` builds it (target .venv-kfp/.installed)")
        pytest.skip(".venv-kfp is missing: `make .venv-kfp/.installed` builds it")
    return KFP_PYTHON


def run_kfp(python: Path, script: str, *args: str, env: dict | None = None, timeout: float = 900,
            expect_failure: bool = False) -> str:
    """Run tests/kfp/<script> in .venv-kfp; fail with its output when it fails (or, expecting that, succeeds). The
    component needs LORA_KFP_BASE_IMAGE when it is compiled: KFP_IMAGE unless ``env`` says otherwise."""
    env = {"LORA_KFP_BASE_IMAGE": KFP_IMAGE, **(os.environ if env is None else env)}
    proc = subprocess.run([str(python), str(ROOT / "tests" / "kfp" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if (proc.returncode != 0) != expect_failure:
        pytest.fail(f"{script} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


# ---- the seed's table ---------------------------------------------------------------------------------------------

def seed_inputs() -> list[dict]:
    """The rows of the seed's Inputs table: name, type and default as the seed writes them."""
    section = SEED_MD.read_text().split("## Inputs", 1)[1].split("## Outputs", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        name, type_, default = (c.strip("`") for c in cells[:3])
        rows.append({"name": name, "type": type_, "default": default})
    return rows


def seed_default(text: str):
    """The Python value of a default cell: Required, `None`, `""`, `"4"`, 128, 0.0, or a bare string."""
    if text == "Required":
        return "Required"
    if text == "None":
        return None
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def test_the_seed_table_is_read_whole():
    rows = seed_inputs()
    assert len(rows) == 39
    assert rows[0]["name"] == "pvc_path" and rows[-1]["name"] == "kubernetes_config"
    training = [r["name"].removeprefix("training_") for r in rows if r["name"].startswith("training_")]
    assert training == seed_parameter_names()  # LoRASpec's seed block: same names, same order


def test_the_component_has_the_seeds_inputs_names_types_defaults_and_order(kfp_python, tmp_path):
    run_kfp(kfp_python, "inspect_component.py", str(tmp_path / "inspect.json"))
    report = json.loads((tmp_path / "inspect.json").read_text())
    ours = report["params"]
    assert [p["name"] for p in ours] == [r["name"] for r in seed_inputs()]
    for param, row in zip(ours, seed_inputs()):
        assert param["type"] == row["type"], param["name"]
        expected = seed_default(row["default"])
        if expected == "Required":
            assert param["required"], param["name"]
        else:
            assert not param["required"] and param["default"] == expected, param["name"]
            assert type(param["default"]) is type(expected), param["name"]  # 128, not 128.0
    assert report["return"] == "str"
    assert report["base_image"] == KFP_IMAGE  # LORA_KFP_BASE_IMAGE when compiled

    # As KFP compiled it: the defaults in the component YAML, descriptions from LoRASpec.
    parameters = report["compiled"]["root"]["inputDefinitions"]["parameters"]
    kfp_types = {"str": "STRING", "int": "NUMBER_INTEGER", "float": "NUMBER_DOUBLE", "bool": "BOOLEAN"}
    for row in seed_inputs():
        if not row["name"].startswith("training_"):
            continue
        compiled = parameters[row["name"]]
        assert compiled["parameterType"] == kfp_types[row["type"].removeprefix("Optional[").rstrip("]")]
        field = LoRASpec.model_fields[row["name"].removeprefix("training_")]
        assert compiled["description"] == field.description
        if field.default is None:
            assert "defaultValue" not in compiled and compiled["isOptional"]
        else:
            assert compiled["defaultValue"] == field.default
    assert parameters["kubernetes_config"]["parameterType"] == "TASK_CONFIG"
    # train_model_in_task: the same inputs; the task's own settings (a GPU) stay on its pod, and its environment
    # chooses in-task training.
    assert report["in_task_same_inputs"] is True
    in_task, _ = report["in_task"]
    container = in_task["deploymentSpec"]["executors"]["exec-train-model"]["container"]
    assert container["env"] == [{"name": "LORA_KFP_TRAINING_IMAGE", "value": KFP_IMAGE},
                                {"name": "LORA_KFP_LAUNCHER", "value": "local"}]
    assert container["resources"]["accelerator"]["resourceCount"] == "1"
    assert "taskConfigPassthroughs" not in in_task["components"]["comp-train-model"]
    # The task config stand-ins used below have the real dsl.TaskConfig's fields.
    assert sorted(report["task_config_fields"]) == sorted(vars(task_config()))


def test_every_seed_input_reaches_the_same_spec_field_as_the_operators_argument():
    """Each training_* input set to a non-default value gives the LoRASpec that the operator builds from the same
    value under the unprefixed name."""
    from airflow_provider_lora.operators.lora import LoRATrainingOperator

    values = dict(
        base_model="org/model", effective_batch_size=64, max_tokens_per_gpu=16000, max_seq_len=4096,
        learning_rate=1e-4, lr_warmup_steps=5, checkpoint_at_epoch=True, num_epochs=2,
        data_output_dir="/mnt/lora/cache", envs="A=1", resource_cpu_per_worker="8", resource_gpu_per_worker=2,
        resource_memory_per_worker="64Gi", resource_num_procs_per_worker="2", resource_num_workers=2,
        metadata_labels="team=a", metadata_annotations="note=x", lora_r=8, lora_alpha=16, lora_dropout=0.05,
        lora_target_modules="q_proj,v_proj", lora_use_rslora=True, lora_use_dora=True, lora_load_in_4bit=True,
        lora_load_in_8bit=False, lora_bnb_4bit_quant_type="fp4", lora_bnb_4bit_compute_dtype="float16",
        lora_bnb_4bit_use_double_quant=False, lora_sample_packing=False, seed=7, use_liger=True,
        lr_scheduler="cosine", fsdp_sharding_strategy="NO_SHARD")
    assert sorted(values) == sorted(seed_parameter_names())
    for name, value in values.items():
        assert value != LoRASpec.model_fields[name].default, name  # every value differs from its default
    inputs = {"pvc_path": "/ws", "dataset": None, **{f"training_{k}": v for k, v in values.items()}}

    from_kfp = runtime.parse_spec(runtime.spec_values(inputs))
    from_operator = LoRATrainingOperator(task_id="t", **values)._spec()
    assert from_kfp == from_operator
    for name, value in values.items():
        assert getattr(from_kfp, name) == value, name


def test_seed_example_file_is_the_seed_text_with_only_the_import_changed():
    blocks = re.findall(r"```python\n(.*?)```", SEED_MD.read_text(), re.S)
    (example,) = [b for b in blocks if "def my_pipeline" in b]
    assert example.count(SEED_IMPORT) == 1
    assert EXAMPLE.read_text() == example.replace(SEED_IMPORT, OUR_IMPORT)


def test_seed_example_compiles_to_yaml(kfp_python, tmp_path):
    import yaml

    run_kfp(kfp_python, "compile_example.py", str(EXAMPLE), str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    # kfp>=2.15 (2.15.2 included, the seed's minimum) refuses WORKSPACE_PATH_PLACEHOLDER without a workspace size,
    # so the seed's example as printed never compiled; given the size, it does.
    assert "PipelineConfig.workspace.size is not set" in result["as_given_error"]
    assert result["with_workspace_error"] is None
    pipeline, platform = yaml.safe_load_all((tmp_path / "pipeline.yaml").read_text())
    task = pipeline["root"]["dag"]["tasks"]["train-model"]
    given = {k: v["runtimeValue"]["constant"] for k, v in task["inputs"]["parameters"].items()}
    assert given == {"pvc_path": "{{$.workspace_path}}", "training_base_model": "Qwen/Qwen2.5-1.5B-Instruct",
                     "training_num_epochs": 3, "training_effective_batch_size": 128, "training_max_seq_len": 8192,
                     "training_lora_r": 16, "training_lora_alpha": 32}
    container = pipeline["deploymentSpec"]["executors"]["exec-train-model"]["container"]
    assert container["image"] == KFP_IMAGE
    # Launched pods and TrainJobs run the same image (LORA_KFP_POD_OPTIONS may name another).
    assert container["env"] == [{"name": "LORA_KFP_TRAINING_IMAGE", "value": KFP_IMAGE}]
    assert not any("pip install" in part for part in container["command"])  # the image holds everything
    component = pipeline["components"]["comp-train-model"]
    assert component["taskConfigPassthroughs"] == [
        {"field": "RESOURCES"}, {"field": "KUBERNETES_TOLERATIONS"}, {"field": "KUBERNETES_NODE_SELECTOR"},
        {"field": "KUBERNETES_AFFINITY"}, {"applyToTask": True, "field": "ENV"},
        {"applyToTask": True, "field": "KUBERNETES_VOLUMES"}]
    assert platform["platforms"]["kubernetes"]["pipelineConfig"]["workspace"]["size"] == "10Gi"


def test_constraints_pin_the_same_versions_as_the_airflow_side_except_kfps_own():
    def pins(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, version = line.split("==")
                out[re.sub(r"[-_.]+", "-", name).lower()] = version
        return out

    cpu, kfp = pins(ROOT / ".ci/constraints-cpu.txt"), pins(ROOT / ".ci/constraints-kfp.txt")
    # torch without its build label in the kfp pins (which the training image also installs under): the same release
    differ = {n for n in cpu.keys() & kfp.keys() if cpu[n].split("+")[0] != kfp[n]}
    assert differ == KFP_OWN_PINS
    assert cpu["torch"] == "2.13.0+cpu" and kfp["torch"] == "2.13.0"
    assert kfp["kubernetes"].split(".")[0] < "31" and "apache-airflow" not in kfp


# ---- the component's checks, before anything launches -------------------------------------------------------------

def artifact(path: Path, uri: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(path=str(path), uri=uri or f"file://{path}", metadata={})


def component_inputs(tmp_path: Path, **overrides) -> dict:
    (tmp_path / "ws").mkdir(exist_ok=True)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    inputs = {"pvc_path": str(tmp_path / "ws"), "output_model": artifact(tmp_path / "out" / "model"),
              "output_metrics": artifact(tmp_path / "out" / "metrics"),
              "output_loss_chart": artifact(tmp_path / "out" / "chart"), "dataset": artifact(data),
              "kubernetes_config": None,
              **{f"training_{n}": LoRASpec.model_fields[n].default for n in seed_parameter_names()}}
    return {**inputs, **overrides}


@pytest.mark.parametrize("env, overrides, message", [
    ({}, {}, r"no Kubernetes API to launch the training job on: not running in a cluster .* KUBERNETES_SERVER_URL"),
    ({"KUBERNETES_SERVER_URL": "http://10.0.0.1:6443", "KUBERNETES_AUTH_TOKEN": "t"}, {},
     r"KUBERNETES_SERVER_URL='http://10.0.0.1:6443' is not valid: the API server must be reached over https://"),
    ({"LORA_KFP_LAUNCHER": "pod", "LORA_KFP_POD_OPTIONS": '{"imagee": "x"}'}, {},
     r"LORA_KFP_POD_OPTIONS sets imagee: not PodOptions fields; accepted: namespace, image"),
    ({"LORA_KFP_LAUNCHER": "pod", "KUBERNETES_SERVER_URL": "https://127.0.0.1:1", "KUBERNETES_AUTH_TOKEN": "t",
      "LORA_KFP_TRAINING_IMAGE": ""}, {},
     r"LORA_KFP_POD_OPTIONS has no image and LORA_KFP_TRAINING_IMAGE is not set .*=\{\"image\": "),
    ({"LORA_KFP_LAUNCHER": "pod", "KUBERNETES_SERVER_URL": "https://127.0.0.1:1", "KUBERNETES_AUTH_TOKEN": "t"}, {},
     r"output_uri=.* is not on a mounted volume.*\n\(KFP: the training job must see pvc_path"),
    ({"LORA_KFP_LAUNCHER": "k8s"}, {}, r"LORA_KFP_LAUNCHER='k8s' is not valid: accepted: trainjob, pod, local"),
    ({"LORA_KFP_LAUNCHER": "in-task"}, {"training_base_model": "oci://quay.io/org/model:1"},
     r"training_base_model='oci://quay.io/org/model:1': oci:// models .* not supported"),
    ({"LORA_KFP_LAUNCHER": "in-task"}, {"training_lora_r": 0}, r"training_lora_r=0 is not valid: must be an integer"),
    ({"LORA_KFP_LAUNCHER": "in-task"}, {"dataset": None}, r"no training data: connect the dataset input"),
    ({"LORA_KFP_LAUNCHER": "in-task", "LORA_KFP_SPEC": '{"lora_r": 4}'}, {},
     r"LORA_KFP_SPEC sets 'lora_r', which is the component input training_lora_r"),
    ({"LORA_KFP_LAUNCHER": "in-task", "LORA_KFP_SPEC": '{"max_stepz": 4}'}, {},
     r"'max_stepz', which is not a LoRASpec field; accepted: dataset, .*max_steps"),
    ({"LORA_KFP_LAUNCHER": "in-task", "LORA_KFP_SPEC": "[1]"}, {}, r"LORA_KFP_SPEC must be a JSON object"),
    ({"LORA_KFP_LAUNCHER": "in-task"}, {"pvc_path": "/no/such/dir"}, r"pvc_path='/no/such/dir' is not a directory"),
    ({"LORA_KFP_DRY_RUN": "maybe"}, {}, r"LORA_KFP_DRY_RUN='maybe' is not valid: give true or false"),
    ({"LORA_KFP_DRY_RUN": "true", "LORA_KFP_PLAN_MEMORY_GIB": "80GB"}, {},
     r"LORA_KFP_PLAN_MEMORY_GIB='80GB' is not valid: give the accelerator memory per process in GiB"),
])
def test_bad_input_fails_before_anything_launches_naming_the_input(tmp_path, env, overrides, message):
    env = {"LORA_KFP_TRAINING_IMAGE": KFP_IMAGE, **env}  # what the compiled component sets
    with pytest.raises((ValueError, RuntimeError), match=message):
        runtime.run_component(component_inputs(tmp_path, **overrides), env=env, log=lambda line: None)
    assert not (tmp_path / "ws" / runtime.RUNS_DIR).exists()  # nothing trained


def test_a_dataset_file_without_suffix_is_staged_fresh_with_its_format(tmp_path):
    src = tmp_path / "dataset"  # how KFP names an artifact file
    src.write_text('{"text": "one"}\n')
    stage = tmp_path / "ws" / "lora-data" / "k"
    assert runtime.stage_dataset(artifact(src), {}, stage) == str(stage / "data.jsonl")
    src.write_text('{"text": "two"}\n')  # a retry with other data never reads the earlier copy
    runtime.stage_dataset(artifact(src), {}, stage)
    assert (stage / "data.jsonl").read_text() == '{"text": "two"}\n'
    src.write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match=r"cannot tell its format .* accepted: .jsonl, .json, .parquet, .csv"):
        runtime.stage_dataset(artifact(src), {}, stage)
    assert runtime.stage_dataset(None, {"dataset": "s3://b/train.jsonl"}, stage) == "s3://b/train.jsonl"


# ---- what a launched pod gets from the task ----------------------------------------------------------------------

def task_config(**values) -> SimpleNamespace:
    """A stand-in for dsl.TaskConfig (this venv has no kfp; its fields are checked against the real one above)."""
    fields = ("affinity", "tolerations", "node_selector", "env", "volumes", "volume_mounts", "resources")
    return SimpleNamespace(**{f: values.get(f) for f in fields})


def test_task_config_passes_through_to_the_training_pod_and_secrets_stay_references():
    from airflow_provider_lora.core.render import TaskIdentity, render_pod

    config = task_config(
        volumes=[{"name": "ws", "persistentVolumeClaim": {"claimName": "run-ws"}}],
        volume_mounts=[{"name": "ws", "mountPath": "/kfp-workspace"}],
        node_selector={"gpu": "h100"}, tolerations=[{"key": "gpu", "operator": "Exists"}],
        affinity={"nodeAffinity": {}},
        env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
             {"name": "KUBERNETES_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "k", "key": "t"}}},
             {"name": "WANDB_MODE", "value": "offline"}],
        resources={"limits": {"cpu": "1", "ephemeral-storage": "50Gi"}})
    launch = launch_settings({"LORA_KFP_POD_OPTIONS": '{"namespace": "team-a"}', "LORA_KFP_TRAINING_IMAGE": KFP_IMAGE},
                             config, "/kfp-workspace")
    assert launch.options.image == KFP_IMAGE  # the task's own image, as the component sets it
    assert launch.envs == {"WANDB_MODE": "offline"}  # literal values join the spec's envs
    spec = LoRASpec(base_model="m", dataset="/kfp-workspace/d.jsonl", output_uri="/kfp-workspace/lora-runs/k",
                    resource_cpu_per_worker="8", envs="WANDB_MODE=offline")
    options = _pod_options(launch)
    pod = render_pod(spec, options, TaskIdentity(dag_id="kfp", task_id="train_model", run_id="k"))
    container = pod["spec"]["containers"][0]
    assert pod["metadata"]["namespace"] == "team-a"
    assert {"name": "ws", "persistentVolumeClaim": {"claimName": "run-ws"}} in pod["spec"]["volumes"]
    assert {"name": "ws", "mountPath": "/kfp-workspace"} in container["volumeMounts"]
    assert pod["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert pod["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["spec"]["affinity"] == {"nodeAffinity": {}}
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert env["WANDB_MODE"]["value"] == "offline"
    assert "KUBERNETES_AUTH_TOKEN" not in env  # the launcher's own credentials stay with the task
    # The spec's resources win; what the task adds (ephemeral storage) is kept.
    assert container["resources"]["limits"]["cpu"] == "8"
    assert container["resources"]["limits"]["ephemeral-storage"] == "50Gi"


def test_a_literal_secret_in_the_task_env_is_refused_and_hf_token_goes_by_reference():
    leaked = task_config(env=[{"name": "HF_TOKEN", "value": "hf_literal"}])
    with pytest.raises(ValueError, match="'HF_TOKEN' carries a literal value") as err:
        launch_settings({}, leaked, "/ws")
    assert "hf_literal" not in str(err.value)
    warnings: list[str] = []
    launch = launch_settings({"HF_TOKEN": "hf_value", "LORA_KFP_HF_TOKEN_SECRET": "hf/token",
                              "LORA_KFP_TRAINING_IMAGE": KFP_IMAGE}, None, "/ws", warnings.append)
    assert launch.options.secret_env["HF_TOKEN"].name == "hf" and not warnings
    launch_settings({"HF_TOKEN": "hf_value", "LORA_KFP_TRAINING_IMAGE": KFP_IMAGE}, None, "/ws", warnings.append)
    assert "HF_TOKEN is set in this task but is not passed" in warnings[0] and "hf_value" not in warnings[0]


def test_a_trainjob_carries_the_same_workload_from_the_task():
    from airflow_provider_lora.core.render import TaskIdentity, TrainJobOptions, render_trainjob

    config = task_config(volumes=[{"name": "ws", "persistentVolumeClaim": {"claimName": "run-ws"}}],
                         volume_mounts=[{"name": "ws", "mountPath": "/kfp-workspace"}],
                         env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}])
    launch = launch_settings({"LORA_KFP_POD_OPTIONS": '{"image": "registry.example/other:2"}'}, config,
                             "/kfp-workspace")
    assert launch.options.image == "registry.example/other:2"  # LORA_KFP_POD_OPTIONS names another image
    spec = LoRASpec(base_model="m", dataset="/kfp-workspace/d.jsonl", output_uri="/kfp-workspace/lora-runs/k",
                    resource_num_workers=2, resource_gpu_per_worker=4)
    job = render_trainjob(spec, launch.options, TaskIdentity(dag_id="kfp", task_id="train_model", run_id="k"),
                          TrainJobOptions())
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in trainer["env"]
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_spec = patch["template"]["spec"]["template"]["spec"]
    assert {"name": "ws", "persistentVolumeClaim": {"claimName": "run-ws"}} in pod_spec["volumes"]


# ---- real runs: a pipeline under kfp.local.SubprocessRunner, training the tiny model -------------------------------

def run_env(**extra: str) -> dict:
    """The task's environment: this one without launcher settings of its own, plus ``extra``."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("LORA_KFP_", "KUBERNETES_", "HF_TOKEN"))}
    return {**inherited, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


def run_pipeline(kfp_python: Path, tiny_model_dir: Path, tmp_path: Path, env: dict,
                 expect_failure: bool = False, component: str = "train_model") -> dict | str:
    """The report of a pipeline run; its output when it is expected to fail."""
    from tests.trainer_helpers import arithmetic_rows, write_jsonl

    write_jsonl(tmp_path / "data" / "train.jsonl", arithmetic_rows(32))
    out = tmp_path / "kfp"
    output = run_kfp(kfp_python, "run_pipeline.py", str(tiny_model_dir), str(tmp_path / "data"), str(out),
                     component, env=env, expect_failure=expect_failure)
    return output if expect_failure else json.loads((out / "report.json").read_text())


def chart_points(html: str) -> list[list]:
    """The plotted steps the chart page carries for its hover script: [step, epoch, loss, smoothed, lr, eval]."""
    data = re.search(r'<script type="application/json" id="chart-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(data)["points"]


def check_outputs(report: dict, steps: int, base_model: Path) -> dict:
    """What every launch mode hands back: status, model artifact, metrics, chart."""
    from tests.trainer_helpers import card_images

    assert report["status"] == "training completed"
    metrics = report["metrics"]
    assert metrics["global_step"] == steps
    assert metrics["final_loss"] < metrics["first_loss"] and metrics["min_loss"] <= metrics["final_loss"]
    for name in ("tokens", "tokens_per_second", "train_runtime_seconds", "trainable_parameters"):
        assert metrics[name] > 0, name
    assert (metrics["lora_r"], metrics["lora_alpha"], metrics["learning_rate"]) == (8, 16, 2e-3)
    assert (metrics["effective_batch_size"], metrics["seed"], metrics["micro_batch"]) == (8, 7, 4)

    model = Path(report["model"]["path"])
    config = json.loads((model / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    meta = report["model"]["metadata"]
    assert meta["base_model"] == str(base_model)
    assert (meta["lora_r"], meta["lora_alpha"], sorted(meta["target_modules"])) == (8, 16, ["q_proj", "v_proj"])
    # Where the run was published: the workspace, which KFP (and kfp.local) remove with the pipeline run; the
    # output artifacts are the copies that last.
    assert meta["artifacts"]["adapter"] == meta["artifacts"]["root"] + "/adapter"
    assert "/workspace/lora-runs/" in meta["artifacts"]["root"]
    assert sorted(p.name for p in model.iterdir()) == (["adapter", "merged"] if meta["merged"] else ["adapter"])
    # The adapter's model card links its chart beside it, so the link resolves inside the artifact too.
    [image] = card_images(model / "adapter")
    assert image.is_relative_to(model / "adapter") and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    html = Path(report["chart_path"]).read_text()
    assert 'id="train-points"' in html  # the chart page of core/results, as Airflow's tab shows it
    losses = [p[2] for p in chart_points(html) if p[2] is not None]
    assert len(losses) == steps  # one real point per optimizer step
    assert (losses[0], losses[-1], min(losses)) == (metrics["first_loss"], metrics["final_loss"], metrics["min_loss"])
    return metrics


@pytest.mark.slow
def test_pipeline_trains_in_task_with_subprocess_runner(kfp_python, tiny_model_dir, tmp_path):
    """train_model_in_task: its task's environment says in-task (no LORA_KFP_LAUNCHER in ours)."""
    env = run_env(LORA_KFP_SPEC=json.dumps({"eval_fraction": 0.25, "save_merged": True}))
    report = run_pipeline(kfp_python, tiny_model_dir, tmp_path, env, component="train_model_in_task")
    metrics = check_outputs(report, steps=3, base_model=tiny_model_dir)  # 24 of 32 rows train, 8 per step
    assert metrics["final_eval_loss"] > 0 and metrics["eval_fraction"] == 0.25
    model = Path(report["model"]["path"])
    assert (model / "merged" / "config.json").is_file() and report["model"]["metadata"]["merged"] is True


def run_on_cluster(kfp_python: Path, cluster, tiny_model_dir: Path, tmp_path: Path, expect_failure: bool = False,
                   **launcher_env: str):
    """Run the pipeline against the emulated cluster: the kfp venv's kubernetes client (kubernetes<31) talks HTTPS to
    the emulated API server with a token and its CA; the emulated kubelet runs the job's trainer command (`python` /
    `torchrun` of this venv). Returns the report and every pod and TrainJob as seen while they existed."""
    workspace = str(tmp_path / "kfp" / "workspace")  # pvc_path; the job sees it through a hostPath volume
    cluster.create_secret("default", "hf", {"token": "hf_secret_value_42"})
    volume = {"volumes": [{"name": "ws", "hostPath": {"path": workspace}}],
              "volume_mounts": [{"name": "ws", "mountPath": workspace}]}
    env = run_env(KUBERNETES_SERVER_URL=cluster.url, KUBERNETES_AUTH_TOKEN=cluster.token,
                  KUBERNETES_CA_CERT=str(cluster.ca_file), LORA_KFP_POD_OPTIONS=json.dumps(volume),
                  LORA_KFP_POLL_SECONDS="0.3", HF_TOKEN="hf_secret_value_42", LORA_KFP_HF_TOKEN_SECRET="hf/token",
                  **launcher_env)
    seen: dict[str, dict] = {}
    done = threading.Event()

    def watch() -> None:  # the job is deleted at the end: keep what it looked like while it ran
        while not done.is_set():
            for obj in cluster.pods() + cluster.trainjobs():
                seen[f"{obj['kind']}/{obj['metadata']['name']}"] = obj
            done.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        report = run_pipeline(kfp_python, tiny_model_dir, tmp_path, env, expect_failure)
    finally:
        done.set()
        watcher.join()
    assert "hf_secret_value_42" not in json.dumps(seen)  # HF_TOKEN went by reference only
    return report, seen


HF_TOKEN_REF = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}


@pytest.mark.slow
def test_pipeline_trains_in_an_emulated_pod_and_deletes_it(kfp_python, k8s_cluster, tiny_model_dir, tmp_path):
    report, seen = run_on_cluster(kfp_python, k8s_cluster, tiny_model_dir, tmp_path, LORA_KFP_LAUNCHER="pod")
    check_outputs(report, steps=4, base_model=tiny_model_dir)
    assert k8s_cluster.pods() == []  # deleted once the results were collected
    creates = [r for r in k8s_cluster.request_log if r[0] == "POST" and r[1].endswith("/pods")]
    assert len(creates) == 1
    (pod,) = seen.values()
    assert pod["metadata"]["name"].startswith("lora-kfp-train-model-")
    container = pod["spec"]["containers"][0]
    assert container["image"] == KFP_IMAGE  # the component's own image
    assert HF_TOKEN_REF in container["env"]
    assert container["command"][:3] == ["python", "-m", "lora_trainer"]


@pytest.mark.slow
def test_pipeline_trains_in_an_emulated_trainjob_by_default(kfp_python, k8s_cluster, tiny_model_dir, tmp_path):
    """No launcher set: a Kubeflow Trainer TrainJob, as the seed launches; its shape read from the cluster."""
    report, seen = run_on_cluster(kfp_python, k8s_cluster, tiny_model_dir, tmp_path)
    check_outputs(report, steps=4, base_model=tiny_model_dir)
    assert k8s_cluster.trainjobs() == [] and k8s_cluster.pods() == []  # the TrainJob and its pods are gone
    (trainjob,) = [o for k, o in seen.items() if k.startswith("TrainJob/")]
    trainer = trainjob["spec"]["trainer"]
    assert trainer["command"][:2] == ["torchrun", "--nproc_per_node=1"] and trainer["numNodes"] == 1
    assert HF_TOKEN_REF in trainer["env"]
    assert "runtimePatches" in trainjob["spec"]  # the emulated Trainer says v2.2.0
    nodes = [o for k, o in seen.items() if k.startswith("Pod/")]
    assert len(nodes) == 1 and nodes[0]["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"] == \
        trainjob["metadata"]["name"]


@pytest.mark.slow
def test_a_failed_training_pod_fails_the_task_with_its_reason_and_is_deleted(kfp_python, k8s_cluster,
                                                                           tiny_model_dir, tmp_path):
    k8s_cluster.set_fault("oom", pod="lora-kfp-*", after_lines=3)
    output, seen = run_on_cluster(kfp_python, k8s_cluster, tiny_model_dir, tmp_path, expect_failure=True,
                                  LORA_KFP_LAUNCHER="pod")
    (name,) = [k.removeprefix("Pod/") for k in seen]
    assert f"training pod default/{name} failed: OOMKilled (exit code 137)" in output
    assert f"last 30 log lines of {name}:" in output
    assert k8s_cluster.pods() == []  # deleted after the failure was read


@pytest.mark.slow
def test_a_dry_run_runs_the_plan_in_one_cpu_pod_writes_it_and_trains_nothing(kfp_python, k8s_cluster,
                                                                             tiny_model_dir, tmp_path):
    """LORA_KFP_DRY_RUN with the default launcher (a TrainJob): the plan runs in one pod of the training's image,
    service account and volumes, without a GPU; its figures become the metrics, the plan the page."""
    report, seen = run_on_cluster(kfp_python, k8s_cluster, tiny_model_dir, tmp_path, LORA_KFP_DRY_RUN="true",
                                  LORA_KFP_PLAN_MEMORY_GIB="80")
    assert report["status"] == "dry run: plan written"
    metrics = report["metrics"]
    assert metrics["dataset_rows"] == 32 and metrics["memory_fits"] == 1
    assert metrics["memory_available_bytes"] == 80 * 2 ** 30 and metrics["model_trainable_parameters"] > 0
    assert "Preflight plan" in Path(report["chart_path"]).read_text()
    [(key, pod)] = seen.items()
    assert key.startswith("Pod/") and pod["metadata"]["name"].endswith("-plan")
    assert "nvidia.com/gpu" not in json.dumps(pod["spec"]["containers"][0]["resources"])
    assert "--plan" in pod["spec"]["containers"][0]["command"]
    assert k8s_cluster.pods() == [] and k8s_cluster.trainjobs() == []
    assert not list((tmp_path / "kfp").rglob("adapter_config.json"))  # nothing trained


def test_docs_name_every_setting_and_every_extra_spec_field():
    from airflow_provider_lora.kfp import cluster

    text = (ROOT / "docs" / "kfp.md").read_text()
    settings = {v for m in (runtime, cluster) for k, v in vars(m).items() if k.startswith("ENV_")}
    assert settings >= {"LORA_KFP_LAUNCHER", "LORA_KFP_SPEC", "KUBERNETES_SERVER_URL", "LORA_KFP_POD_OPTIONS"}
    for name in settings | {"LORA_KFP_BASE_IMAGE"}:
        assert f"`{name}`" in text, name
    spec_row = next(line for line in text.splitlines() if line.startswith("| `LORA_KFP_SPEC` |"))
    for name in LoRASpec.model_fields:
        if name not in seed_parameter_names():
            assert f"`{name}`" in spec_row, name


@pytest.mark.parametrize("image", [None, "", "Registry.Example/Team/Trainer"])
def test_the_component_refuses_to_compile_without_a_valid_image(kfp_python, image):
    """No published image to fall back on: without LORA_KFP_BASE_IMAGE the import fails, naming the setting."""
    env = {k: v for k, v in os.environ.items() if k != "LORA_KFP_BASE_IMAGE"}
    if image is not None:
        env["LORA_KFP_BASE_IMAGE"] = image
    proc = subprocess.run([str(kfp_python), "-c", "import airflow_provider_lora.kfp.component"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"LORA_KFP_BASE_IMAGE={image or ''!r} is not valid: set it, when compiling the pipeline" in proc.stderr
    assert "registry.example.com/team/lora-trainer:0.1.0" in proc.stderr


def test_the_kfp_venv_holds_kfp_the_core_and_the_trainer_but_no_airflow(kfp_python):
    code = ("import importlib.util, sys, kfp, kubernetes; "
            "import airflow_provider_lora.core.render, airflow_provider_lora.core.results, "
            "airflow_provider_lora.core.launchers.pod, airflow_provider_lora.core.launchers.trainjob, "
            "airflow_provider_lora.core.launchers.local, airflow_provider_lora.kfp.component, lora_trainer.data; "
            "print(kfp.__version__, kubernetes.__version__, importlib.util.find_spec('airflow') is None, "
            "sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))")
    proc = subprocess.run([str(kfp_python), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LORA_KFP_BASE_IMAGE": KFP_IMAGE})
    assert proc.returncode == 0, proc.stderr
    kfp_version, kubernetes_version, no_airflow, airflow_modules = proc.stdout.split(maxsplit=3)
    assert kfp_version.startswith("2.") and int(kubernetes_version.split(".")[0]) < 31
    assert no_airflow == "True" and airflow_modules.strip() == "[]"


class Recorded(SimpleNamespace):
    """An output artifact stand-in (this venv has no kfp): path, uri, metadata, and log_metric as KFP's Metrics."""

    def log_metric(self, name: str, value: float) -> None:
        self.metadata[name] = value


@pytest.mark.slow
def test_a_retry_of_the_same_execution_collects_the_published_run_without_training_again(k8s_cluster, tiny_model_dir,
                                                                                       tmp_path):
    """The task's component body, called twice for one execution (same output artifact URIs): the second call finds
    the run the first published and launches nothing. Runs the body here (kubernetes 36 client), not in kfp."""
    from tests.trainer_helpers import arithmetic_rows, write_jsonl

    workspace = tmp_path / "ws"
    workspace.mkdir()
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))
    volume = {"volumes": [{"name": "ws", "hostPath": {"path": str(workspace)}}],
              "volume_mounts": [{"name": "ws", "mountPath": str(workspace)}]}
    env = {"LORA_KFP_LAUNCHER": "pod", "KUBERNETES_SERVER_URL": k8s_cluster.url,
           "KUBERNETES_AUTH_TOKEN": k8s_cluster.token, "KUBERNETES_CA_CERT": str(k8s_cluster.ca_file),
           "LORA_KFP_POD_OPTIONS": json.dumps(volume), "LORA_KFP_POLL_SECONDS": "0.3",
           "LORA_KFP_TRAINING_IMAGE": KFP_IMAGE}

    def execute(attempt: str) -> tuple[dict, list[str]]:
        out = tmp_path / attempt
        outputs = {name: Recorded(path=str(out / name), uri=f"minio://mlpipeline/run-1/train-model/{name}",
                                  metadata={}) for name in ("output_model", "output_metrics", "output_loss_chart")}
        inputs = {**component_inputs(tmp_path), **outputs, "pvc_path": str(workspace), "dataset": artifact(data),
                  "training_base_model": str(tiny_model_dir), "training_effective_batch_size": 8,
                  "training_max_tokens_per_gpu": 256, "training_max_seq_len": 64, "training_num_epochs": 1,
                  "training_learning_rate": 2e-3, "training_lr_warmup_steps": 0, "training_resource_gpu_per_worker": 0}
        lines: list[str] = []
        assert runtime.run_component(inputs, env=env, log=lines.append) == "training completed"
        return outputs, lines

    first, _ = execute("try-1")
    second, lines = execute("try-2")
    assert any("already holds this execution's completed run: collecting it" in line for line in lines)
    creates = [r for r in k8s_cluster.request_log if r[0] == "POST" and r[1].endswith("/pods")]
    assert len(creates) == 1 and k8s_cluster.pods() == []
    assert second["output_metrics"].metadata == first["output_metrics"].metadata
    assert first["output_metrics"].metadata["global_step"] == 4
    assert (Path(second["output_model"].path) / "adapter" / "adapter_model.safetensors").is_file()
    assert Path(second["output_loss_chart"].path).read_text() == Path(first["output_loss_chart"].path).read_text()


def test_a_compressed_dataset_artifact_is_staged_with_its_compressed_suffix(tmp_path):
    import gzip

    stage = tmp_path / "ws" / "lora-data" / "k"
    src = tmp_path / "rows.jsonl.gz"
    src.write_bytes(gzip.compress(b'{"text": "one"}\n'))
    assert runtime.stage_dataset(artifact(src), {}, stage) == str(stage / "data.jsonl.gz")
    assert gzip.decompress((stage / "data.jsonl.gz").read_bytes()) == b'{"text": "one"}\n'
    for name, body, suffix in (("rows.csv.gz", b"text\none\n", ".csv.gz"), ("dataset", b'[{"text": "a"}]', ".json.gz"),
                               ("dataset2", b'{"text": "a"}\n', ".jsonl.gz")):
        (tmp_path / name).write_bytes(gzip.compress(body))
        assert runtime._suffix_for(tmp_path / name) == suffix
