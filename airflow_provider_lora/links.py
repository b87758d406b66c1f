"""Extra links of LoRATrainingOperator and the loss chart XCom that the "Loss chart" task-instance tab shows.

On Airflow 3 a link's ``get_link`` runs on the worker when the try ends (successful or not) and its string is stored
as XCom ``_link_<Class>``; on 2.11 it runs in the webserver on request. Both read the task's return value with
``XCom.get_value``. The UI shows a link only when it is non-empty and http(s) or same-origin, so "no link" is "".
"""

from __future__ import annotations

import os
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from airflow_provider_lora.compat import HAS_TASK_INSTANCE_TAB, BaseOperatorLink, XCom, conf

CHART_XCOM_KEY = "loss_chart_html"
CHART_MAX_BYTES = 2 * 1024 * 1024
# The tab: the plugin (plugins/loss_chart.py) serves it under TAB_URL_PREFIX; the UI shows it under
# .../tasks/<task>[/mapped/<i>]/plugin/<TAB_URL_ROUTE>.
TAB_URL_PREFIX = "/losschart"
TAB_URL_ROUTE = "lora-loss-chart"
AWS_CONSOLE_S3 = "https://console.aws.amazon.com/s3/buckets/"
_PATH_SAFE = "!$&'()*+,;=:@"  # RFC 3986 pchar: kept as-is in a path segment


def _return_value(ti_key: Any) -> dict[str, Any]:
    value = XCom.get_value(ti_key=ti_key, key="return_value")
    return value if isinstance(value, dict) else {}


def browsable_url(root: str, endpoint_url: str | None = None) -> str:
    """The artifact root as a URL a browser can open: the AWS console for ``s3://``; "" for a filesystem/PVC path
    (no URL reaches it) and for S3 behind a custom endpoint (``endpoint_url`` or AWS_ENDPOINT_URL[_S3]: MinIO and
    the like, which the AWS console does not show)."""
    if not root.startswith("s3://"):
        return ""
    if endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        return ""
    bucket, _, prefix = root[len("s3://"):].partition("/")
    if not bucket:
        return ""
    url = AWS_CONSOLE_S3 + quote(bucket, safe="")
    prefix = prefix.strip("/")
    return f"{url}?prefix={quote(prefix + '/', safe='/')}" if prefix else url


def tab_path(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """The UI path of the task instance's "Loss chart" tab, under the API server's base path (``[api] base_url``)
    so that it stays same-origin behind a sub-path proxy."""
    base = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    path = (f"{base}/dags/{quote(dag_id, safe=_PATH_SAFE)}/runs/{quote(run_id, safe=_PATH_SAFE)}"
            f"/tasks/{quote(task_id, safe=_PATH_SAFE)}")
    if map_index is not None and map_index >= 0:
        path += f"/mapped/{map_index}"
    return f"{path}/plugin/{TAB_URL_ROUTE}"


class LoRAArtifactsLink(BaseOperatorLink):
    """The run's published artifacts (adapter, metrics, summary, chart) where a browser can open them."""

    name = "LoRA artifacts"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        root = (_return_value(ti_key).get("artifacts") or {}).get("root")
        return browsable_url(root, _s3_endpoint(operator)) if isinstance(root, str) else ""


def _s3_endpoint(operator: Any) -> str | None:
    """The custom S3 endpoint the operator reads with: its ``s3_endpoint_url``, else its AWS connection's."""
    if getattr(operator, "s3_endpoint_url", None):
        return operator.s3_endpoint_url
    conn_id = getattr(operator, "aws_conn_id", None)
    if not conn_id:
        return None
    try:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=conn_id).conn_config.get_service_endpoint_url("s3")
    except Exception:  # no provider or no connection: the task has failed or warned about it already
        return None


class LossChartLink(BaseOperatorLink):
    """The task instance's "Loss chart" tab, once the run has succeeded (always "" before Airflow 3.1: no tab)."""

    name = "Loss chart"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        if not HAS_TASK_INSTANCE_TAB or not (_return_value(ti_key).get("artifacts") or {}).get("chart_html"):
            return ""
        map_index = getattr(ti_key, "map_index", -1)
        return tab_path(ti_key.dag_id, ti_key.run_id, ti_key.task_id, -1 if map_index is None else map_index)


def read_chart(uri: str, log: Any, s3: Callable[[], Any] | None = None) -> str | None:
    """The chart page at ``uri`` if the worker can read it and it is at most CHART_MAX_BYTES; else None, logged.
    ``s3`` makes the worker's S3 client (called only for an ``s3://`` uri); None: boto3's default chain."""
    from airflow_provider_lora.core import storage

    try:
        if not storage.is_s3(uri) and os.path.getsize(uri) > CHART_MAX_BYTES:
            log.warning("loss chart %s is larger than %d bytes: not kept for the Loss chart tab", uri,
                        CHART_MAX_BYTES)
            return None
        text = storage.read_text(uri, client=s3() if s3 is not None and storage.is_s3(uri) else None)
    except Exception as exc:  # the chart is a courtesy: the run has succeeded either way
        log.info("loss chart %s is not readable from the worker (%s): the Loss chart tab stays empty", uri, exc)
        return None
    if len(text.encode("utf-8")) > CHART_MAX_BYTES:
        log.warning("loss chart %s is larger than %d bytes: not kept for the Loss chart tab", uri, CHART_MAX_BYTES)
        return None
    return text


def push_loss_chart(result: dict[str, Any], log: Any, s3: Callable[[], Any] | None = None) -> None:
    """After a successful run: push the chart page as XCom ``loss_chart_html`` for the Loss chart tab (``s3``: as
    in :func:`read_chart`)."""
    uri = (result.get("artifacts") or {}).get("chart_html")
    if not uri or not HAS_TASK_INSTANCE_TAB:  # before Airflow 3.1 no tab shows it: keep it out of the database
        return
    text = read_chart(uri, log, s3)
    if text is None:
        return
    try:
        from airflow_provider_lora.compat import get_current_context

        get_current_context()["ti"].xcom_push(key=CHART_XCOM_KEY, value=text)
    except Exception as exc:
        log.warning("could not push the loss chart to XCom %r: %s", CHART_XCOM_KEY, exc)
