"""airflow-provider-lora: LoRA fine-tuning for Airflow, Kubeflow Pipelines and the command line.

This module imports no airflow: the training image and the KFP environment install the distribution without it.
"""

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """Provider metadata for Airflow's provider discovery (entry point ``apache_airflow_provider``)."""
    return {
        "package-name": "airflow-provider-lora",
        "name": "LoRA fine-tuning",
        "description": "LoRA fine-tuning of language models: operator, deferrable trigger and bundled trainer.",
        "versions": [__version__],
        "integrations": [{"integration-name": "LoRA fine-tuning", "tags": ["software"],
                          "how-to-guide": ["/docs/parameters.md"]}],
        "operators": [{"integration-name": "LoRA fine-tuning",
                       "python-modules": ["airflow_provider_lora.operators.lora"]}],
        "triggers": [{"integration-name": "LoRA fine-tuning",
                      "python-modules": ["airflow_provider_lora.triggers.lora"]}],
        "extra-links": ["airflow_provider_lora.links.LoRAArtifactsLink", "airflow_provider_lora.links.LossChartLink"],
        # The [lora] section of airflow.cfg (AIRFLOW__LORA__<OPTION>), in the form cncf-kubernetes declares its own.
        "config": {
            "lora": {
                "description": "Defaults of LoRATrainingOperator for every task of this Airflow deployment.\n",
                "options": {
                    "image": {
                        "description": "The training image of tasks with launcher='pod' or 'trainjob' that pass no "
                                       "image=: one built from trainer/Dockerfile and pushed to a registry the "
                                       "cluster can pull from. No default (this project publishes no image): with "
                                       "neither set, such a task fails at DAG parse.\n",
                        "version_added": None,
                        "type": "string",
                        "example": "registry.example.com/team/lora-trainer:0.1.0",
                        "default": "",
                    },
                    "deployment": {
                        "description": "Tells apart Airflow deployments that launch into one namespace: part of "
                                       "each pod's and TrainJob's name and labels (deployment= overrides it).\n",
                        "version_added": None,
                        "type": "string",
                        "example": "prod-eu",
                        "default": "default",
                    },
                },
            },
        },
    }
