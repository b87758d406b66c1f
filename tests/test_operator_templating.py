"""What users template reaches the pod: DAG params, Variables and macros render into every pod option listed in
template_fields, secret references included, before anything is validated or launched."""

from __future__ import annotations

import datetime

import pytest

from airflow_provider_lora.core.render import SecretRef, render_pod
from airflow_provider_lora.operators.lora import LoRATrainingOperator

PARAMS = {"ns": "ml-team", "conn": "k8s_prod", "sa": "trainer", "pool": "h200", "claim": "ws-42",
          "secret": "hf-token/token", "s3": "s3-creds", "runtime": "torch-distributed-restricted",
          "image": "registry.example.com/ml/lora-trainer:0.2.0"}


def _operator(**kwargs) -> LoRATrainingOperator:
    from airflow_provider_lora.compat import DAG

    with DAG("templated", schedule=None, start_date=datetime.datetime(2026, 1, 1), params=PARAMS):
        return LoRATrainingOperator(
            task_id="train", launcher="pod", base_model="m", dataset="s3://d/train.jsonl",
            output_uri="s3://out/{{ params.ns }}", image="{{ params.image }}", namespace="{{ params.ns }}",
            kubernetes_conn_id="{{ params.conn }}", service_account_name="{{ params.sa }}",
            node_selector={"pool": "{{ params.pool }}"},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "{{ 'NoSchedule' }}"}],
            pvc_claim_name="{{ params.claim }}", hf_token_secret="{{ params.secret }}",
            secret_env={"AWS_SECRET_ACCESS_KEY": {"name": "{{ params.s3 }}", "key": "secret"}},
            trainer_runtime="{{ params.runtime }}", s3_endpoint_url="{{ 'https://minio.' ~ params.ns }}", **kwargs)


def _render(op: LoRATrainingOperator) -> None:
    op.render_template_fields({"params": PARAMS, "ds": "2026-12-01"})


def test_every_templated_pod_option_renders_into_the_pod():
    op = _operator()
    _render(op)
    options = op._options()
    assert (options.namespace, options.service_account_name, options.pvc_claim_name) == ("ml-team", "trainer",
                                                                                         "ws-42")
    assert options.node_selector == {"pool": "h200"} and options.tolerations[0]["effect"] == "NoSchedule"
    assert options.secret_env == {"HF_TOKEN": SecretRef(name="hf-token", key="token"),
                                  "AWS_SECRET_ACCESS_KEY": SecretRef(name="s3-creds", key="secret")}
    assert options.s3_endpoint_url == "https://minio.ml-team" and options.image == PARAMS["image"]
    assert op.kubernetes_conn_id == "k8s_prod" and op.trainer_runtime == PARAMS["runtime"]
    from airflow_provider_lora.core.render import TaskIdentity

    pod = render_pod(op._spec(), options, TaskIdentity(dag_id="templated", task_id="train", run_id="r"))
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert pod["spec"]["volumes"][-1]["persistentVolumeClaim"]["claimName"] == "ws-42"


def test_a_secret_that_renders_to_a_bad_reference_names_the_parameter():
    op = _operator()
    op.render_template_fields({"params": {**PARAMS, "secret": "no-key-here"}})
    with pytest.raises(ValueError, match=r"hf_token_secret='no-key-here' is not valid: give 'secret-name/key'"):
        op._options()


def test_a_literal_bad_secret_is_refused_at_dag_parse():
    from airflow_provider_lora.compat import DAG

    with DAG("literal", schedule=None, start_date=datetime.datetime(2026, 1, 1)), \
            pytest.raises(ValueError, match=r"secret_env\['AWS_SECRET_ACCESS_KEY'\]='s3-creds' is not valid"):
        LoRATrainingOperator(task_id="t", launcher="pod", base_model="m", dataset="d", image="busybox:1",
                             secret_env={"AWS_SECRET_ACCESS_KEY": "s3-creds"})
