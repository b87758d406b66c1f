"""Run a pipeline with train_model under kfp.local.SubprocessRunner(use_venv=False) and write what came out as JSON.

Runs in .venv-kfp (kfp cannot share the main venv). The caller (tests/test_kfp_component.py) builds the tiny model
and the dataset in the main venv and chooses the launch mode through the task's environment (LORA_KFP_LAUNCHER...).

    run_pipeline.py MODEL_DIR DATASET_DIR OUT_DIR [COMPONENT]

COMPONENT: train_model (default) or train_model_in_task.
"""

import json
import sys
from pathlib import Path
from typing import NamedTuple

from kfp import dsl, local

from airflow_provider_lora.kfp import component


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def dataset_from_dir(src: str, data: dsl.Output[dsl.Dataset]):
    """A Dataset artifact that is a directory of JSONL files, as an upstream step would produce."""
    import shutil

    shutil.copytree(src, data.path)


class Outputs(NamedTuple):
    status: str
    model: dsl.Model
    metrics: dsl.Metrics
    chart: dsl.HTML


def make_pipeline(train):
    """The pipeline, around ``train`` (train_model or train_model_in_task)."""

    @dsl.pipeline(name="lora-local", pipeline_config=dsl.PipelineConfig(workspace=dsl.WorkspaceConfig(size="1Gi")))
    def lora_local(model_dir: str, data_dir: str) -> Outputs:
        data = dataset_from_dir(src=data_dir)
        task = train(
            pvc_path=dsl.WORKSPACE_PATH_PLACEHOLDER,
            dataset=data.outputs["data"],
            training_base_model=model_dir,
            training_effective_batch_size=8,
            training_max_tokens_per_gpu=256,
            training_max_seq_len=64,
            training_num_epochs=1,
            training_learning_rate=2e-3,
            training_lr_warmup_steps=0,
            training_resource_gpu_per_worker=0,
            training_lora_r=8,
            training_lora_alpha=16,
            training_lora_target_modules="q_proj,v_proj",
            training_seed=7,
        )
        return Outputs(status=task.outputs["Output"], model=task.outputs["output_model"],
                       metrics=task.outputs["output_metrics"], chart=task.outputs["output_loss_chart"])

    return lora_local


def main(model_dir: str, data_dir: str, out_dir: str, name: str = "train_model") -> None:
    out = Path(out_dir)
    (out / "workspace").mkdir(parents=True, exist_ok=True)  # KFP makes the workspace PVC; kfp.local does not
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "pipeline-root"),
               workspace_root=str(out / "workspace"))
    result = make_pipeline(getattr(component, name))(model_dir=model_dir, data_dir=data_dir)
    report = {
        "status": result.outputs["status"],
        "model": {"path": result.outputs["model"].path, "metadata": result.outputs["model"].metadata},
        "metrics": result.outputs["metrics"].metadata,
        "chart_path": result.outputs["chart"].path,
        "workspace": str(out / "workspace"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
