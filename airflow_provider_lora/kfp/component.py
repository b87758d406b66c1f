"""train_model: the seed KFP component's interface (components/training/finetuning/lora) on this project's core;
train_model_in_task: the same component training inside its own task's pod.

Inputs, types, defaults and order are the seed's (tests/test_kfp_component.py checks them against the seed's table);
the ``training_*`` inputs are LoRASpec's fields with a prefix, and their descriptions below come from LoRASpec. The
body only collects the inputs: everything it does runs in :mod:`airflow_provider_lora.kfp.runtime`, which the training
image holds, so nothing is pip-installed when the task starts (a KFP lightweight component imports inside its body).

Settings the seed has no input for (launch mode, extra LoRASpec fields, pod options) come from the task's
environment; docs/kfp.md lists them. The image is chosen when this module is imported (compile time):
``LORA_KFP_BASE_IMAGE``, required (this project publishes no image); launched pods and TrainJobs run it too, unless
LORA_KFP_POD_OPTIONS names another.
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects of train_model.
import os
from typing import Optional

from kfp import dsl

from airflow_provider_lora.core.launchers.local import LOCAL_LAUNCHER
from airflow_provider_lora.core.render import IMAGE_REFERENCE
from airflow_provider_lora.core.spec import LoRASpec
from airflow_provider_lora.kfp.cluster import ENV_TRAINING_IMAGE
from airflow_provider_lora.kfp.runtime import ENV_LAUNCHER

ENV_BASE_IMAGE = "LORA_KFP_BASE_IMAGE"
# The training image: it holds this package, the trainer and kfp (install_kfp_package=False: nothing is installed
# when the task starts).
BASE_IMAGE = os.environ.get(ENV_BASE_IMAGE, "").strip()
if not IMAGE_REFERENCE.match(BASE_IMAGE):
    raise RuntimeError(
        f"{ENV_BASE_IMAGE}={BASE_IMAGE!r} is not valid: set it, when compiling the pipeline, to the training image you "
        "built from trainer/Dockerfile and pushed, such as 'registry.example.com/team/lora-trainer:0.1.0' (this "
        "project publishes no image)")

# As the seed: what is set on the task (resources, tolerations, node selector, affinity) goes to the launched job;
# env and volumes apply to the task's own pod too (it stages data on the workspace and reads the results back).
TASK_CONFIG_PASSTHROUGHS = [
    dsl.TaskConfigField.RESOURCES,
    dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
    dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
    dsl.TaskConfigField.KUBERNETES_AFFINITY,
    dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),
    dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.KUBERNETES_VOLUMES, apply_to_task=True),
]

_OWN_DOCS = {
    "pvc_path": "Workspace PVC root path (use dsl.WORKSPACE_PATH_PLACEHOLDER): dataset staging and the run's output.",
    "output_model": "Output model artifact: adapter/ (and merged/ when save_merged), with base model, r, alpha, "
                    "target modules and artifact URIs in its metadata.",
    "output_metrics": "Output training metrics artifact: every summary metric and the hyperparameters.",
    "output_loss_chart": "Output HTML artifact with the training loss chart (the same page as Airflow's).",
    "dataset": "Input training dataset artifact (a file or a directory); without it, LORA_KFP_SPEC's dataset.",
    "kubernetes_config": "KFP TaskConfig: resources, env, volumes, node selector, tolerations and affinity set on "
                         "the task, passed through to the launched job.",
}


def train_model(
    pvc_path: str,
    output_model: dsl.Output[dsl.Model],
    output_metrics: dsl.Output[dsl.Metrics],
    output_loss_chart: dsl.Output[dsl.HTML],
    dataset: dsl.Input[dsl.Dataset] = None,
    training_base_model: str = "Qwen/Qwen2.5-1.5B-Instruct",
    training_effective_batch_size: int = 128,
    training_max_tokens_per_gpu: int = 32000,
    training_max_seq_len: int = 8192,
    training_learning_rate: Optional[float] = None,
    training_lr_warmup_steps: Optional[int] = None,
    training_checkpoint_at_epoch: Optional[bool] = None,
    training_num_epochs: Optional[int] = None,
    training_data_output_dir: Optional[str] = None,
    training_envs: str = "",
    training_resource_cpu_per_worker: str = "4",
    training_resource_gpu_per_worker: int = 1,
    training_resource_memory_per_worker: str = "32Gi",
    training_resource_num_procs_per_worker: str = "auto",
    training_resource_num_workers: int = 1,
    training_metadata_labels: str = "",
    training_metadata_annotations: str = "",
    training_lora_r: int = 16,
    training_lora_alpha: int = 32,
    training_lora_dropout: float = 0.0,
    training_lora_target_modules: str = "",
    training_lora_use_rslora: Optional[bool] = None,
    training_lora_use_dora: Optional[bool] = None,
    training_lora_load_in_4bit: Optional[bool] = None,
    training_lora_load_in_8bit: Optional[bool] = None,
    training_lora_bnb_4bit_quant_type: Optional[str] = None,
    training_lora_bnb_4bit_compute_dtype: Optional[str] = None,
    training_lora_bnb_4bit_use_double_quant: Optional[bool] = None,
    training_lora_sample_packing: Optional[bool] = None,
    training_seed: Optional[int] = None,
    training_use_liger: Optional[bool] = None,
    training_lr_scheduler: Optional[str] = None,
    training_fsdp_sharding_strategy: Optional[str] = None,
    kubernetes_config: dsl.TaskConfig = None,
) -> str:
    inputs = dict(locals())  # every input by name, before anything else is bound here
    from airflow_provider_lora.kfp.runtime import run_component

    return run_component(inputs)


def _docstring() -> str:
    """Google-style Args (KFP turns them into the input descriptions), the training_* ones from LoRASpec."""
    lines = ["Fine-tune a language model with LoRA (unsloth backend) and publish the adapter, metrics and loss chart.",
             "", "Args:"]
    for name in train_model.__code__.co_varnames[: train_model.__code__.co_argcount]:
        field = LoRASpec.model_fields.get(name.removeprefix("training_")) if name.startswith("training_") else None
        lines.append(f"    {name}: {field.description if field else _OWN_DOCS[name]}")
    lines += ["", "Returns:", '    The status "training completed".']
    return "\n".join(lines)


def _component(function, passthroughs: list, launcher: Optional[str] = None):
    component = dsl.component(base_image=BASE_IMAGE, packages_to_install=[], install_kfp_package=False,
                              task_config_passthroughs=passthroughs)(function)
    # The task's environment names the image of launched jobs and, for in-task training, the launch mode;
    # set_env_variable still overrides either.
    env = {ENV_TRAINING_IMAGE: BASE_IMAGE}
    if launcher is not None:
        env[ENV_LAUNCHER] = launcher
    component.component_spec.implementation.container.env = env
    return component


train_model.__doc__ = _docstring()
_function = train_model
train_model = _component(_function, TASK_CONFIG_PASSTHROUGHS)
# The same component training inside its own task's pod (LORA_KFP_LAUNCHER=local). Nothing is passed through,
# so what is set on the task (GPU and CPU limits, env, volumes) applies to its own pod, as for any KFP task; with
# train_model's passthroughs, KFP would hand the task's resources to kubernetes_config for a launched job instead.
train_model_in_task = _component(_function, [], launcher=LOCAL_LAUNCHER)
