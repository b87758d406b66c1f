"""Kubeflow Pipelines: ``airflow_provider_lora.kfp.component.train_model``, the seed component's interface on this
project's core (docs/kfp.md).

Needs ``kfp>=2`` (the ``kfp`` extra), which cannot share an environment with the Airflow side (kfp 2.x pins
kubernetes<31, the cncf-kubernetes provider >=36): install this distribution with ``--no-deps`` beside kfp. Nothing on
the Airflow side imports this package.
"""
