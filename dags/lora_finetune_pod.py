"""Fine-tune in a GPU pod on Kubernetes (launcher="pod"), then use the adapter in a downstream task.

How-to: docs/howto.md ("A GPU pod"). Nothing here needs editing: the deployment's settings are Airflow Variables
(Admin > Variables, or ``AIRFLOW_VAR_<NAME>`` environment variables), the run's training values are the trigger
form's fields (one per parameter, as in dags/lora_finetune.py).

- ``lora_image`` (required, unless ``[lora] image`` is set): your build of trainer/Dockerfile, pushed where the
  cluster pulls from.
- ``lora_kubernetes_conn_id`` (default ``kubernetes_default``): the cncf-kubernetes connection to the GPU cluster.
- ``lora_namespace`` (default ``default``): where the pod runs.
- ``lora_service_account`` (default ``lora-trainer``): a ServiceAccount in that namespace that may write to the
  bucket: bound to an IAM role (EKS: IRSA annotation or Pod Identity association), so no keys are stored anywhere.
- ``lora_output_prefix`` (default ``s3://my-bucket/lora-runs``): the form's default output is
  ``<prefix>/lora_finetune_pod``, and each run publishes under it, to ``.../<run_id>``.
- ``lora_dataset`` (default ``<prefix>/datasets/train.jsonl``): the form's default dataset.
- ``lora_gpu_node_selector`` (JSON, default ``{"nvidia.com/gpu.present": "true"}``): labels of the GPU nodes.
"""

from __future__ import annotations

import datetime

# The names exist on Airflow 2.11 and 3.x alike through common-compat (a dependency of this provider).
from airflow.providers.common.compat.sdk import DAG, Variable, task

from airflow_provider_lora.operators.lora import LoRATrainingOperator
from airflow_provider_lora.params import dry_run_params, spec_params, templated_dry_run_kwargs, templated_spec_kwargs

# Read when the file is parsed: the operator checks the image then (a missing one fails the parse, saying why), and
# the output prefix, dataset and node selector are the form's defaults or a dict; one mechanism for all of them.
IMAGE = Variable.get("lora_image", None)  # None: [lora] image; with neither, the DAG does not parse (says why)
CONN_ID = Variable.get("lora_kubernetes_conn_id", "kubernetes_default")
NAMESPACE = Variable.get("lora_namespace", "default")
SERVICE_ACCOUNT = Variable.get("lora_service_account", "lora-trainer")
OUTPUT_PREFIX = Variable.get("lora_output_prefix", "s3://my-bucket/lora-runs").rstrip("/")
DATASET = Variable.get("lora_dataset", f"{OUTPUT_PREFIX}/datasets/train.jsonl")
GPU_NODE_SELECTOR = Variable.get("lora_gpu_node_selector", {"nvidia.com/gpu.present": "true"},
                                 deserialize_json=True)
# GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule so that only GPU pods land there; tolerating the taint
# is harmless where there is none.
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@task
def register_adapter(result: dict) -> dict:
    """Use what the training published, through the return value's documented keys (docs/operator.md): read the
    adapter's PEFT config from ``artifacts["adapter"]`` and record where everything is, with the headline figures.
    After a dry run (the form's "Dry run" switch) there is no adapter: skipped."""
    import json

    from airflow.providers.common.compat.sdk import AirflowSkipException

    if result.get("dry_run"):
        raise AirflowSkipException("a dry run trained nothing: its plan is the train task's XCom 'plan'")

    from airflow_provider_lora.core import storage

    artifacts, summary = result["artifacts"], result["summary"]
    config = json.loads(storage.read_text(storage.join(artifacts["adapter"], "adapter_config.json")))
    return {
        "adapter": artifacts["adapter"],
        "base_model": config["base_model_name_or_path"],
        "lora_r": config["r"],
        "final_loss": summary["final_loss"],
        "global_step": summary["global_step"],
        "loss_chart": artifacts["chart_png"],
        "merged": artifacts.get("merged"),  # only with save_merged
    }


with DAG(
    dag_id="lora_finetune_pod",
    description="LoRA fine-tune in a GPU pod; the adapter's config read back downstream",
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    params={
        **spec_params(
            base_model="Qwen/Qwen2.5-0.5B-Instruct",
            dataset=DATASET,
            output_uri=f"{OUTPUT_PREFIX}/lora_finetune_pod",  # each run publishes under <this>/<run_id>
            resource_gpu_per_worker=1,
            resource_memory_per_worker="24Gi",
            checkpoint_at_epoch=True,  # a retry resumes from the last epoch's checkpoint instead of step 0
        ),
        **dry_run_params(),  # plan first: will it fit, what will it read, in a CPU pod
    },
    render_template_as_native_obj=True,  # each form value reaches the operator with its type
    tags=["lora", "example", "kubernetes"],
) as dag:
    train = LoRATrainingOperator(
        task_id="train",
        launcher="pod",
        image=IMAGE,
        kubernetes_conn_id=CONN_ID,
        namespace=NAMESPACE,
        service_account_name=SERVICE_ACCOUNT,  # S3 access through the ServiceAccount's role: no keys in the pod
        node_selector=GPU_NODE_SELECTOR,
        tolerations=GPU_TOLERATIONS,
        deferrable=True,  # the wait runs on the triggerer, not in a worker slot
        retries=2,  # a retry reattaches to a pod still running, or resumes from the last checkpoint
        retry_delay=datetime.timedelta(minutes=2),
        **{**templated_spec_kwargs(), "output_uri": "{{ params.output_uri }}/{{ run_id }}"},
        **templated_dry_run_kwargs(),
        asset_alias="lora-adapters",  # each new adapter schedules dags/lora_adapter_ready.py
    )
    register_adapter(train.output)
