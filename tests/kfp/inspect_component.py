"""Print train_model's interface as JSON, as KFP sees it: the Python signature (names in order, types spelled as the
seed's table spells them, defaults) and the compiled component's input definitions. Runs in .venv-kfp."""

import dataclasses
import inspect
import json
import sys
import tempfile
import typing
from pathlib import Path

import yaml
from kfp import compiler, dsl

from airflow_provider_lora.kfp import component

_KFP_TYPES = {dsl.Model: "dsl.Model", dsl.Metrics: "dsl.Metrics", dsl.HTML: "dsl.HTML", dsl.Dataset: "dsl.Dataset",
              dsl.TaskConfig: "dsl.TaskConfig"}


def spell(annotation) -> str:
    """Spell an annotation as the seed's table does: str, Optional[int], dsl.Output[dsl.Model], dsl.TaskConfig."""
    if annotation in _KFP_TYPES:
        return _KFP_TYPES[annotation]
    if isinstance(annotation, type):
        return annotation.__name__
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return f"Optional[{spell(inner)}]"
    if origin is typing.Annotated:
        marker = args[1].__name__  # kfp's InputAnnotation / OutputAnnotation (classes)
        wrapper = {"InputAnnotation": "dsl.Input", "OutputAnnotation": "dsl.Output"}[marker]
        return f"{wrapper}[{spell(args[0])}]"
    raise TypeError(f"cannot spell {annotation!r}")


def in_task_pipeline() -> list:
    """A pipeline giving train_model_in_task a GPU, compiled (pipeline and platform documents)."""
    @dsl.pipeline(name="in-task", pipeline_config=dsl.PipelineConfig(workspace=dsl.WorkspaceConfig(size="10Gi")))
    def in_task():
        task = component.train_model_in_task(pvc_path=dsl.WORKSPACE_PATH_PLACEHOLDER, training_lora_r=8)
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1).set_cpu_limit("8")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in_task.yaml"
        compiler.Compiler().compile(in_task, str(path))
        return list(yaml.safe_load_all(path.read_text()))


def main(out: str) -> None:
    signature = inspect.signature(component.train_model.python_func)
    params = [{"name": p.name, "type": spell(p.annotation),
               "required": p.default is inspect.Parameter.empty,
               "default": None if p.default is inspect.Parameter.empty else p.default}
              for p in signature.parameters.values()]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "component.yaml"
        compiler.Compiler().compile(component.train_model, str(path))
        compiled = yaml.safe_load(path.read_text())
    report = {
        "params": params,
        "return": spell(signature.return_annotation),
        "compiled": compiled,
        "base_image": component.BASE_IMAGE,
        "task_config_fields": [f.name for f in dataclasses.fields(dsl.TaskConfig)],
        "in_task": in_task_pipeline(),
        "in_task_same_inputs": (component.train_model_in_task.component_spec.inputs
                                == component.train_model.component_spec.inputs),
    }
    Path(out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
