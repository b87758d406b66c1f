"""Fine-tune a language model with LoRA from the Airflow UI: the trigger form has a field for every parameter.

Defaults fine-tune SmolLM2-135M-Instruct on the example "records -> JSON" data on CPU in a few minutes
(``make demo``). Set ``LORA_EXAMPLE_LAUNCHER=pod`` (and a ``kubernetes_default`` connection) to train in a GPU pod
instead, with ``LORA_EXAMPLE_IMAGE`` (or ``[lora] image``) naming your build of trainer/Dockerfile; every value in the
form still applies.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from airflow_provider_lora.compat import DAG  # airflow.sdk.DAG on Airflow 3, airflow.models.dag.DAG on 2.11
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
    resource_gpu_per_worker=0 if LAUNCHER == "local" else 1,
)

with DAG(
    dag_id="lora_finetune",
    description="LoRA fine-tune: base model + dataset -> adapter, metrics and loss chart",
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    params=spec_params(**EXAMPLE_DEFAULTS),
    render_template_as_native_obj=True,
    tags=["lora", "example"],
) as dag:
    LoRATrainingOperator(
        task_id="train",
        launcher=LAUNCHER,
        image=os.environ.get("LORA_EXAMPLE_IMAGE"),  # None: [lora] image; "local" needs none
        **{**templated_spec_kwargs(), "output_uri": "{{ params.output_uri }}/{{ run_id }}"},
    )
