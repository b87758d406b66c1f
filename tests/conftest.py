"""Shared fixtures. Each lives in tests/fixtures/<name>.py and is imported here so every test can use it."""

import os

# The hub is unreachable here and in CI: fail fast instead of retrying downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A throwaway Airflow home (SQLite) for dag.test(); set before anything imports airflow.
import tempfile  # noqa: E402

os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="lora-airflow-home-")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
# [lora] image: the training image of every pod and TrainJob task here that passes no image= (the operator requires
# one; the emulated kubelet runs the container's command, whatever the image).
os.environ.setdefault("AIRFLOW__LORA__IMAGE", "registry.example/lora-trainer:0.1.0")
# The same for the KFP component, read when a pipeline is compiled (docs/kfp.md).
os.environ.setdefault("LORA_KFP_BASE_IMAGE", "registry.example/lora-trainer:0.1.0")

# unsloth patches transformers, peft and trl when imported and must come before them (the trainer does the same).
# The Airflow 2.11 venv (make test-airflow2) has no ML stack: its tests train in the main venv's python.
import importlib.util  # noqa: E402

if importlib.util.find_spec("unsloth") is not None:
    import unsloth  # noqa: F401  isort: skip

from tests.fixtures.s3 import s3_bucket, s3_endpoint  # noqa: E402,F401
from tests.fixtures.airflow import airflow_db, k8s_emu  # noqa: E402,F401
from tests.k8s.fixtures import k8s_cluster  # noqa: E402,F401
from tests.fixtures.tiny_model import tiny_model_dir  # noqa: E402,F401
from tests.fixtures.airflow_services import airflow_services  # noqa: E402,F401
from tests.fixtures.mlflow import mlflow_server  # noqa: E402,F401
