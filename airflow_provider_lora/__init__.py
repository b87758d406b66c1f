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
    }
