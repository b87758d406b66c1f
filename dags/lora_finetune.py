"""Fine-tune a language model with LoRA from the Airflow UI: the trigger form has a field for every parameter.

Defaults fine-tune SmolLM2-135M-Instruct on the example "records -> JSON" data on CPU in a few minutes
(``make demo``). Set ``LORA_EXAMPLE_LAUNCHER=pod`` (and a ``kubernetes_default`` connection) to train in a GPU pod
instead, with ``LORA_EXAMPLE_IMAGE`` (or ``[lora] image``) naming your build of trainer/Dockerfile; the form then
also has the image and namespace. A pod cannot reach this machine's files: set ``LORA_EXAMPLE_DATASET`` and
``LORA_EXAMPLE_OUTPUT`` to s3:// locations (the default output, a local path, is refused before launching), and
``LORA_EXAMPLE_BASE_MODEL`` to a hub id or a path in the image.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from airflow_provider_lora.compat import DAG, Param, conf  # airflow.sdk on Airflow 3, airflow.models on 2.11
from airflow_provider_lora.operators.lora import LoRATrainingOperator
from airflow_provider_lora.params import spec_params, templated_spec_kwargs

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = os.environ.get("LORA_EXAMPLE_LAUNCHER", "local")

# CPU-sized defaults for the demo; on a GPU pod raise the batch and sequence length in the form.
EXAMPLE_DEFAULTS = dict(
    base_model=os.environ.get("LORA_EXAMPLE_BASE_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    dataset=os.environ.get("LORA_EXAMPLE_DATASET", str(REPO / "examples/data/records_train.jsonl")),
    output_uri=os.environ.get("LORA_EXAMPLE_OUTPUT", str(REPO / "runs")),
    effective_batch_size=4,
    max_seq_len=256,
    max_tokens_per_gpu=1024,
    max_steps=30,
    learning_rate=1e-3,
    lr_warmup_steps=3,
    # A tenth of the rows held out: the eval loss every 10 steps and the before/after answers of the first three.
    eval_fraction=0.1,
    eval_steps=10,
    resource_gpu_per_worker=0 if LAUNCHER == "local" else 1,
)

# Where the training pod runs (launcher pod or trainjob; the launcher itself is fixed when the DAG is parsed).
CLUSTER_PARAMS = {} if LAUNCHER == "local" else {
    "image": Param(os.environ.get("LORA_EXAMPLE_IMAGE") or conf.get("lora", "image", fallback=""), type="string",
                   minLength=1, title="Training image", section="Kubernetes",
                   description="The image built from trainer/Dockerfile and pushed to a registry the cluster pulls "
                               "from (this project publishes none)."),
    "namespace": Param("default", type="string", title="Namespace", section="Kubernetes",
                       description="The Kubernetes namespace of the training pod."),
}

with DAG(
    dag_id="lora_finetune",
    description="LoRA fine-tune: base model + dataset -> adapter, metrics and loss chart",
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    params={**spec_params(**EXAMPLE_DEFAULTS), **CLUSTER_PARAMS},
    render_template_as_native_obj=True,
    # One retry: a retry reattaches to the pod an earlier try made, or returns the run it already published.
    default_args={"retries": 1, "retry_delay": datetime.timedelta(seconds=30)},
    tags=["lora", "example"],
) as dag:
    LoRATrainingOperator(
        task_id="train",
        launcher=LAUNCHER,
        **({} if LAUNCHER == "local" else {"image": "{{ params.image }}", "namespace": "{{ params.namespace }}"}),
        **{**templated_spec_kwargs(), "output_uri": "{{ params.output_uri }}/{{ run_id }}"},
        asset_alias="lora-adapters",  # each new adapter schedules dags/lora_adapter_ready.py
    )
