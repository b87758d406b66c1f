"""The worker's S3 access: ``aws_conn_id`` (an Airflow AWS connection, through the Amazon provider's S3Hook) and
``s3_endpoint_url`` (an S3-compatible endpoint for the worker and the trainer), against a real S3 endpoint: moto's
server on 127.0.0.1 (tests/fixtures/s3.py).

The worker reads S3 twice: before launching (is a completed run already at ``output_uri``?) and after the run (the
chart page for the Loss chart tab). In these tests the process's own AWS_ENDPOINT_URL is removed, so only the
connection or the parameter can lead the worker's client to the moto server.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from types import SimpleNamespace

import boto3
import pytest

from airflow_provider_lora import links
from airflow_provider_lora.compat import AirflowFailException
from airflow_provider_lora.core import storage
from airflow_provider_lora.core.render import PodOptions, TaskIdentity, render_pod
from airflow_provider_lora.core.spec import LoRASpec
from airflow_provider_lora.operators.lora import LoRATrainingOperator
from tests.fixtures.airflow import K8S_EMU, local_trainer, run_and_pull
from tests.trainer_helpers import FAST, arithmetic_rows, write_jsonl

IMAGE = "registry.example/lora-trainer:0.1.0"

CONN_ID = "lora_s3"
PAGE = "<!DOCTYPE html><html><body><svg></svg>a chart</body></html>"


@pytest.fixture
def s3_connection(s3_endpoint, monkeypatch) -> str:
    """An Airflow AWS connection pointing at the moto server (given as AIRFLOW_CONN_<ID>, as a secrets backend or
    the environment gives it to a worker); the process's own AWS_ENDPOINT_URL removed. Yields the endpoint."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({
        "conn_type": "aws", "login": "conn-access-key", "password": "conn-secret-key",
        "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}))
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    return s3_endpoint


def _operator(**kwargs) -> LoRATrainingOperator:
    return LoRATrainingOperator(task_id="train", base_model="tiny", dataset="/data/train.jsonl", **kwargs)


def _completed_run(tmp_path, output_uri: str, endpoint: str) -> dict[str, str]:
    """Publish a small run directory (as the trainer does) to ``output_uri``; its artifact URIs."""
    run = tmp_path / "run"
    run.mkdir()
    (run / storage.SUMMARY_FILE).write_text("{}")
    (run / storage.CHART_HTML).write_text(PAGE)
    return storage.publish_run(run, output_uri, endpoint_url=endpoint)


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint)


# ---- aws_conn_id ---------------------------------------------------------------------------------------------------


def test_the_worker_reads_s3_through_the_connection(s3_connection, s3_bucket, tmp_path):
    output = f"s3://{s3_bucket}/runs/done"
    artifacts = _completed_run(tmp_path, output, s3_connection)
    operator = _operator(aws_conn_id=CONN_ID, output_uri=output)

    client = operator._s3()
    assert client.meta.endpoint_url == s3_connection  # the connection's endpoint_url
    credentials = client._request_signer._credentials
    assert (credentials.access_key, credentials.secret_key) == ("conn-access-key", "conn-secret-key")
    # Without the connection the worker's client would not reach this S3 at all.
    assert _operator(output_uri=output)._s3().meta.endpoint_url != s3_connection

    # Before launching: the completed run at output_uri is found through the connection, and the task fails
    # without retries, naming the location and the way out.
    with pytest.raises(AirflowFailException, match=rf"{output} already holds a completed run.*overwrite_output=True"):
        operator._check_output_free(operator._spec())
    overwrite = _operator(aws_conn_id=CONN_ID, output_uri=output, overwrite_output=True)
    overwrite._check_output_free(overwrite._spec())  # asked for: fine
    fresh = _operator(aws_conn_id=CONN_ID, output_uri=f"s3://{s3_bucket}/runs/new")
    fresh._check_output_free(fresh._spec())  # nothing there: fine

    # After the run: the chart page, read with the same client.
    assert links.read_chart(artifacts["chart_html"], logging.getLogger("test"), operator._s3) == PAGE
    # The artifacts link: S3 behind a custom endpoint has no AWS console page.
    assert links._s3_endpoint(operator) == s3_connection
    assert links.browsable_url(output, links._s3_endpoint(operator)) == ""


def test_a_completed_run_at_the_output_fails_the_pod_task_before_any_pod_is_created(k8s_emu, s3_connection,
                                                                                   s3_bucket, tmp_path):
    output = f"s3://{s3_bucket}/runs/done"
    _completed_run(tmp_path, output, s3_connection)
    operator = _operator(launcher="pod", kubernetes_conn_id=K8S_EMU, aws_conn_id=CONN_ID, output_uri=output,
                         resource_gpu_per_worker=0)
    ti = SimpleNamespace(dag_id="d", task_id="train", run_id="r", map_index=-1, try_number=1,
                         xcom_push=lambda **kw: pytest.fail(f"nothing is pushed before the check: {kw}"))
    with pytest.raises(AirflowFailException, match=rf"train: {output} already holds a completed run"):
        operator.execute({"ti": ti})
    assert [r for r in k8s_emu.request_log if r[0] == "POST"] == [] and k8s_emu.pods() == []


def test_aws_conn_id_without_the_amazon_provider_fails_before_launching(monkeypatch, tmp_path):
    # As if apache-airflow-providers-amazon were not installed: importing its S3 hook raises ImportError.
    monkeypatch.setitem(sys.modules, "airflow.providers.amazon.aws.hooks.s3", None)
    output = tmp_path / "out"
    operator = LoRATrainingOperator(task_id="train", launcher="local", aws_conn_id=CONN_ID, base_model="tiny",
                                    dataset=str(tmp_path / "train.jsonl"), output_uri=str(output))
    with pytest.raises(AirflowFailException) as caught:
        operator.execute({})
    assert str(caught.value) == (
        "aws_conn_id='lora_s3' needs apache-airflow-providers-amazon on the worker, which is not installed: install "
        "it, or set aws_conn_id=None to use boto3's default credential chain")
    assert not output.exists()
    assert links._s3_endpoint(operator) is None  # the link falls back quietly; the task has already failed


# ---- s3_endpoint_url -----------------------------------------------------------------------------------------------


def test_s3_endpoint_url_is_used_by_the_worker_without_any_environment(s3_endpoint, s3_bucket, tmp_path,
                                                                       monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    output = f"s3://{s3_bucket}/runs/done"
    artifacts = _completed_run(tmp_path, output, s3_endpoint)
    operator = _operator(s3_endpoint_url=s3_endpoint, output_uri=output)
    assert operator._s3().meta.endpoint_url == s3_endpoint
    with pytest.raises(AirflowFailException, match="already holds a completed run"):
        operator._check_output_free(operator._spec())
    assert links.read_chart(artifacts["chart_html"], logging.getLogger("test"), operator._s3) == PAGE
    assert links._s3_endpoint(operator) == s3_endpoint


def test_s3_endpoint_url_overrides_the_connection(s3_connection):
    operator = _operator(aws_conn_id=CONN_ID, s3_endpoint_url="http://minio.minio:9000",
                         output_uri="s3://bucket/run")
    client = operator._s3()
    assert client.meta.endpoint_url == "http://minio.minio:9000"
    assert client._request_signer._credentials.access_key == "conn-access-key"  # still the connection's keys


def test_s3_endpoint_url_reaches_the_pod_as_aws_endpoint_url():
    spec = LoRASpec.parse({"base_model": "m", "dataset": "s3://b/d.jsonl", "output_uri": "s3://b/run"})
    identity = TaskIdentity(dag_id="d", task_id="t", run_id="r")
    operator = _operator(s3_endpoint_url="http://minio.minio:9000", output_uri="s3://b/run")
    env = render_pod(spec, operator._options(), identity)["spec"]["containers"][0]["env"]
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio.minio:9000"} in env
    # Not set: boto3 in the pod keeps its own default.
    env = render_pod(spec, PodOptions(image=IMAGE), identity)["spec"]["containers"][0]["env"]
    assert "AWS_ENDPOINT_URL" not in {e["name"] for e in env}
    # Set in two places: refused, rather than one silently winning.
    clash = spec.model_copy(update={"envs": "AWS_ENDPOINT_URL=http://other:9000"})
    with pytest.raises(ValueError, match="s3_endpoint_url and envs/secret_env both set AWS_ENDPOINT_URL"):
        render_pod(clash, PodOptions(image=IMAGE, s3_endpoint_url="http://minio.minio:9000"), identity)


@pytest.mark.parametrize("value", ["minio:9000", "ftp://minio:9000", "http://"])
def test_s3_endpoint_url_must_be_an_http_url(value):
    with pytest.raises(ValueError, match=rf"s3_endpoint_url={value!r} is not valid: give an http\(s\) URL"):
        _operator(s3_endpoint_url=value, output_uri="s3://bucket/run")


# ---- end to end: a local run publishing to S3, the worker reading it back ------------------------------------------


@pytest.mark.slow
@local_trainer
@pytest.mark.parametrize("how", ["connection", "endpoint parameter"])
def test_a_run_publishes_to_s3_and_the_worker_reads_its_chart_back(how, s3_endpoint, s3_bucket, tiny_model_dir,
                                                                   tmp_path, monkeypatch, airflow_db):
    from airflow_provider_lora.compat import DAG

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    if how == "connection":
        monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({
            "conn_type": "aws", "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}))
        # The worker reads through the connection; the trainer (a subprocess here, a pod in a cluster) gets the
        # endpoint from its own environment.
        options = dict(aws_conn_id=CONN_ID, envs=f"AWS_ENDPOINT_URL={s3_endpoint}")
    else:
        options = dict(s3_endpoint_url=s3_endpoint)  # both the worker and the trainer
    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))
    dag_id = f"lora_worker_s3_{how.replace(' ', '_')}"
    with DAG(dag_id, schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        LoRATrainingOperator(task_id="train", launcher="local", base_model=str(tiny_model_dir),
                             dataset=str(dataset), output_uri=f"s3://{s3_bucket}/runs/{{{{ run_id }}}}",
                             **options, **FAST)
    run, ti, result = run_and_pull(dag)
    root = f"s3://{s3_bucket}/runs/{run.run_id}"
    assert result["artifacts"]["root"] == root
    assert storage.is_complete(root, endpoint_url=s3_endpoint)

    # The chart page the worker pushed for the tab is the object the trainer uploaded, and it plots this run.
    bucket, key = result["artifacts"]["chart_html"][len("s3://"):].split("/", 1)
    uploaded = _client(s3_endpoint).get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    assert ti.xcom_pull(task_ids="train", key=links.CHART_XCOM_KEY) == uploaded
    assert uploaded.startswith("<!DOCTYPE html>") and "<svg" in uploaded
    steps = [row["step"] for row in result["history"] if "loss" in row]
    assert steps and steps[-1] == result["summary"]["global_step"]
    # S3 behind a custom endpoint: no AWS console link; the chart link points at the tab.
    assert ti.xcom_pull(task_ids="train", key="_link_LoRAArtifactsLink") == ""
    assert ti.xcom_pull(task_ids="train", key="_link_LossChartLink").endswith(f"/plugin/{links.TAB_URL_ROUTE}")
