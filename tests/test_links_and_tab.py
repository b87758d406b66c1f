"""The operator's extra links and the "Loss chart" task-instance tab (plugin), on Airflow 3.

The links' get_link is tested against a faked return-value XCom; the tab's route through Airflow's own API server app
(create_app, with the plugin loaded from the installed ``airflow.plugins`` entry point) on XComs written by real
dag.test() runs; the slow test runs the operator itself and follows its links, its chart XCom and the tab end to end.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_lora import get_provider_info, links
from airflow_provider_lora.compat import BaseOperator
from airflow_provider_lora.links import (CHART_MAX_BYTES, CHART_XCOM_KEY, LoRAArtifactsLink, LossChartLink,
                                         TAB_URL_ROUTE, read_chart)
from airflow_provider_lora.operators.lora import LoRATrainingOperator
from airflow_provider_lora.plugins.loss_chart import HOVER_SCRIPT_HASH, LoRAPlugin, parse_map_index
from tests.fixtures.airflow import AIRFLOW_3, airflow3_only, run_and_pull, run_dag_test
from tests.trainer_helpers import FAST, arithmetic_rows, write_jsonl

RUN = "manual__2026-01-01T00:00:00+00:00"
CHART = "/losschart/chart"


# ---- extra links --------------------------------------------------------------------------------------------------


class _FakeXCom:
    """Stands in for XCom: get_value answers the task's return value (None: the try failed)."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.asked: list[tuple[Any, str]] = []

    def get_value(self, *, ti_key: Any, key: str) -> Any:
        self.asked.append((ti_key, key))
        return self.value


def _ti_key(map_index: int = -1, task_id: str = "train") -> Any:
    return SimpleNamespace(dag_id="lora dag", run_id=RUN, task_id=task_id, map_index=map_index, try_number=1)


def _result(root: str) -> dict[str, Any]:
    return {"summary": {}, "history": [],
            "artifacts": {"root": root, "chart_html": root.rstrip("/") + "/loss_chart.html"}}


def _link(link: Any, monkeypatch: pytest.MonkeyPatch, value: Any, ti_key: Any = None) -> str:
    fake = _FakeXCom(value)
    monkeypatch.setattr(links, "XCom", fake)
    url = link.get_link(LoRATrainingOperator(task_id="train"), ti_key=ti_key or _ti_key())
    assert [key for _, key in fake.asked] == ["return_value"]
    return url


@pytest.mark.parametrize(("root", "url"), [
    ("s3://my-bucket/runs/exp 1/manual__2026", "https://console.aws.amazon.com/s3/buckets/my-bucket"
                                               "?prefix=runs/exp%201/manual__2026/"),
    ("s3://my-bucket/runs/", "https://console.aws.amazon.com/s3/buckets/my-bucket?prefix=runs/"),
    ("s3://my-bucket", "https://console.aws.amazon.com/s3/buckets/my-bucket"),
    ("/mnt/pvc/runs/exp1", ""),  # a filesystem/PVC path has no URL: the UI hides an empty link
])
def test_artifacts_link(monkeypatch, root, url):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert _link(LoRAArtifactsLink(), monkeypatch, _result(root)) == url


def test_artifacts_link_is_empty_for_s3_behind_a_custom_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    assert _link(LoRAArtifactsLink(), monkeypatch, _result("s3://bucket/run")) == ""


@pytest.mark.parametrize("link", [LoRAArtifactsLink(), pytest.param(LossChartLink(), marks=airflow3_only)],
                         ids=lambda link: link.name)
@pytest.mark.parametrize("value", [None, "not a dict", {"summary": {}}])
def test_links_are_empty_without_a_result(monkeypatch, link, value):
    """A failed try has no return value (get_link runs at the end of every try on Airflow 3)."""
    assert _link(link, monkeypatch, value) == ""


@airflow3_only
def test_loss_chart_link_points_at_the_task_instance_tab(monkeypatch):
    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    chart = LossChartLink()
    assert _link(chart, monkeypatch, _result("/out")) == (
        f"/dags/lora%20dag/runs/{RUN}/tasks/train/plugin/{TAB_URL_ROUTE}")
    assert _link(chart, monkeypatch, _result("/out"), _ti_key(map_index=3, task_id="group.train")) == (
        f"/dags/lora%20dag/runs/{RUN}/tasks/group.train/mapped/3/plugin/{TAB_URL_ROUTE}")
    # Behind a proxy under a sub-path the UI lives under [api] base_url's path: the link stays same-origin.
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/team-a/")
    assert _link(chart, monkeypatch, _result("/out")).startswith("/team-a/dags/lora%20dag/runs/")


@pytest.mark.skipif(AIRFLOW_3, reason="Airflow 2.11 (no task-instance tab) only")
def test_loss_chart_link_is_empty_on_airflow_2(monkeypatch):
    """Airflow 2.11's webserver has no plugin tabs: the link stays empty (the UI greys it out) and reads no XCom."""
    fake = _FakeXCom(_result("/out"))
    monkeypatch.setattr(links, "XCom", fake)
    assert LossChartLink().get_link(LoRATrainingOperator(task_id="train"), ti_key=_ti_key()) == ""
    assert fake.asked == []


def test_links_are_declared_for_serialization_and_provider_discovery():
    operator = LoRATrainingOperator(task_id="train")
    assert [link.name for link in operator.operator_extra_links] == ["LoRA artifacts", "Loss chart"]
    if AIRFLOW_3:
        from airflow.serialization.serialized_objects import OperatorSerialization

        encoded = OperatorSerialization.serialize_operator(operator)
        assert encoded["_operator_extra_links"] == {"LoRA artifacts": "_link_LoRAArtifactsLink",
                                                    "Loss chart": "_link_LossChartLink"}
    else:  # 2.11's webserver rebuilds the link objects by class path, from the providers' "extra-links"
        from airflow.serialization.serialized_objects import SerializedBaseOperator

        encoded = SerializedBaseOperator.serialize_operator(operator)
        assert encoded["_operator_extra_links"] == [{"airflow_provider_lora.links.LoRAArtifactsLink": {}},
                                                    {"airflow_provider_lora.links.LossChartLink": {}}]
        decoded = SerializedBaseOperator.deserialize_operator(encoded)
        assert [type(link) for link in decoded.operator_extra_links] == [LoRAArtifactsLink, LossChartLink]
    assert get_provider_info()["extra-links"] == ["airflow_provider_lora.links.LoRAArtifactsLink",
                                                  "airflow_provider_lora.links.LossChartLink"]


# ---- the chart XCom, as the worker reads it ----------------------------------------------------------------------


def test_read_chart_keeps_a_readable_page_under_the_cap(tmp_path, caplog):
    page = tmp_path / "loss_chart.html"
    page.write_text("<!DOCTYPE html><html></html>")
    log = logging.getLogger("test")
    assert read_chart(str(page), log) == "<!DOCTYPE html><html></html>"
    page.write_text("x" * (CHART_MAX_BYTES + 1))
    with caplog.at_level(logging.INFO):
        assert read_chart(str(page), log) is None
        assert read_chart(str(tmp_path / "missing.html"), log) is None
    assert "larger than 2097152 bytes" in caplog.text and "not readable from the worker" in caplog.text


# ---- the tab: the plugin inside Airflow's API server ---------------------------------------------------------------


class _ChartPusher(BaseOperator):
    """Pushes ``page`` (if any) as the chart XCom, as LoRATrainingOperator does after a successful run."""

    def __init__(self, *, page: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.page = page

    def execute(self, context: Any) -> None:
        if self.page is not None:
            context["ti"].xcom_push(key=CHART_XCOM_KEY, value=self.page)


@pytest.fixture(scope="module")
def api(airflow_db) -> SimpleNamespace:
    """Airflow's API server app (core), in process, with the plugins it finds; tokens for the simple auth manager."""
    if not AIRFLOW_3:
        pytest.skip("the Loss chart tab needs Airflow 3.1+'s API server (2.11's Flask webserver has no plugin tabs)")
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    app = create_app("core")
    manager = get_auth_manager()
    return SimpleNamespace(
        client=TestClient(app),
        browser=TestClient(app, cookies={"_token": manager.generate_jwt(SimpleAuthManagerUser(username="admin",
                                                                                               role="admin"))}),
        admin=manager.generate_jwt(SimpleAuthManagerUser(username="admin", role="admin")),
        viewer=manager.generate_jwt(SimpleAuthManagerUser(username="viewer", role="viewer")),
        nobody=manager.generate_jwt(SimpleAuthManagerUser(username="nobody", role=None)),
    )


@pytest.fixture(scope="module")
def chart_run(airflow_db) -> Any:
    """A finished run with a task that has a chart, one that has none, and a mapped task with a chart per index."""
    from airflow_provider_lora.compat import DAG

    with DAG("lora_tab_test", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        _ChartPusher(task_id="with_chart", page="<!DOCTYPE html><html><body><svg></svg>chart one</body></html>")
        _ChartPusher(task_id="without_chart")
        _ChartPusher.partial(task_id="mapped").expand(page=["<html>index zero</html>", "<html>index one</html>"])
    run = run_dag_test(dag)
    assert run.state == "success"
    return run


def _get(api: SimpleNamespace, token: str | None, **params: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return api.client.get(CHART, params=params, headers=headers)


def test_the_tab_route_needs_credentials_and_dag_xcom_read_access(api):
    params = dict(dag_id="lora_tab_test", run_id=RUN, task_id="with_chart", map_index="{MAP_INDEX}")
    assert _get(api, None, **params).status_code == 401
    assert _get(api, "not-a-jwt", **params).status_code == 403  # an invalid token
    assert _get(api, api.nobody, **params).status_code == 403  # a user without a role
    assert _get(api, api.viewer, **params).status_code == 200


def test_the_tab_shows_the_chart_xcom_of_the_task_instance(api, chart_run):
    base = dict(dag_id="lora_tab_test", run_id=chart_run.run_id)
    answer = _get(api, api.viewer, **base, task_id="with_chart", map_index="{MAP_INDEX}")  # unmapped: literal
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    assert answer.text == "<!DOCTYPE html><html><body><svg></svg>chart one</body></html>"
    # An XCom value must not run script in the API server's origin.
    # An opaque origin (no allow-same-origin), no fetches, and no script but the chart's own hover script.
    csp = [part.strip() for part in answer.headers["content-security-policy"].split(";")]
    assert csp[0] == "sandbox allow-scripts" and "default-src 'none'" in csp
    assert [p for p in csp if p.startswith("script-src")] == [f"script-src '{HOVER_SCRIPT_HASH}'"]
    assert answer.headers["x-content-type-options"] == "nosniff"
    # The UI's iframe authenticates with the _token cookie.
    by_cookie = api.browser.get(CHART, params={**base, "task_id": "with_chart"})
    assert by_cookie.status_code == 200 and "chart one" in by_cookie.text
    for index, word in ((0, "zero"), (1, "one")):
        answer = _get(api, api.viewer, **base, task_id="mapped", map_index=str(index))
        assert answer.text == f"<html>index {word}</html>"


@pytest.mark.parametrize(("task_id", "map_index"), [
    ("without_chart", "{MAP_INDEX}"),  # a task of the run without a chart
    ("mapped", "{MAP_INDEX}"),  # a mapped task asked as unmapped
    ("mapped", "7"),  # no such index
    ("no_such_task", "-1"),
])
def test_the_tab_answers_gracefully_for_tasks_without_a_chart(api, chart_run, task_id, map_index):
    answer = _get(api, api.viewer, dag_id="lora_tab_test", run_id=chart_run.run_id, task_id=task_id,
                  map_index=map_index)
    assert answer.status_code == 200 and "No loss chart for this task" in answer.text


def test_the_tab_refuses_a_malformed_map_index(api):
    answer = _get(api, api.viewer, dag_id="d", run_id=RUN, task_id="t", map_index="first")
    assert answer.status_code == 400
    assert [parse_map_index(v) for v in ("{MAP_INDEX}", "", None, "-1", "4")] == [-1, -1, -1, -1, 4]


def test_the_plugin_registers_the_tab_and_mounts_its_app(api):
    plugins = api.client.get("/api/v2/plugins", headers={"Authorization": f"Bearer {api.admin}"}).json()["plugins"]
    ours = [p for p in plugins if p["name"] == LoRAPlugin.name]
    assert len(ours) == 1 and "airflow.plugins" in ours[0]["source"]  # loaded through the entry point
    assert ours[0]["fastapi_apps"] == [{"app": "fastapi.applications.FastAPI", "url_prefix": "/losschart",
                                        "name": "LoRA loss chart"}]
    (view,) = ours[0]["external_views"]
    assert view["destination"] == "task_instance" and view["url_route"] == TAB_URL_ROUTE
    # Relative to the UI's <base href>, and filled in by the UI.
    assert view["href"] == ("losschart/chart?dag_id={DAG_ID}&run_id={RUN_ID}&task_id={TASK_ID}"
                            "&map_index={MAP_INDEX}")


def test_airflow_plugins_lists_the_plugin(airflow_db, tmp_path):
    """The CLI, in a fresh process (cwd outside the repository, so only the installed distribution is seen)."""
    airflow = Path(sys.executable).parent / "airflow"
    done = subprocess.run([str(airflow), "plugins", "-o", "json"], capture_output=True, text=True, cwd=tmp_path,
                          env=os.environ.copy(), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    plugins = json.loads(done.stdout[done.stdout.index("["):])
    (ours,) = [p for p in plugins if p["name"] == LoRAPlugin.name]
    assert "airflow_provider_lora.plugins.loss_chart:LoRAPlugin" in ours["source"]
    assert "Plugin 'lora_loss_chart' already registered" not in done.stdout + done.stderr


# ---- end to end: the operator's run, its links and its tab -------------------------------------------------------


@pytest.mark.slow
def test_a_local_run_pushes_its_chart_and_links_and_the_tab_shows_it(api, tiny_model_dir, tmp_path):
    from airflow_provider_lora.compat import DAG

    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))
    with DAG("lora_links_test", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        LoRATrainingOperator(task_id="train", launcher="local", base_model=str(tiny_model_dir),
                             dataset=str(dataset), output_uri=str(tmp_path / "out") + "/{{ run_id }}", **FAST)
    run, ti, result = run_and_pull(dag)

    page = ti.xcom_pull(task_ids="train", key=CHART_XCOM_KEY)
    assert page == Path(result["artifacts"]["chart_html"]).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page

    # Airflow 3 stored each link's URL as XCom when the try ended; the API answers them to the UI.
    tab = f"/dags/lora_links_test/runs/{run.run_id}/tasks/train/plugin/{TAB_URL_ROUTE}"
    assert ti.xcom_pull(task_ids="train", key="_link_LossChartLink") == tab
    assert ti.xcom_pull(task_ids="train", key="_link_LoRAArtifactsLink") == ""  # a local path
    answer = api.client.get(f"/api/v2/dags/lora_links_test/dagRuns/{run.run_id}/taskInstances/train/links",
                            headers={"Authorization": f"Bearer {api.viewer}"})
    assert answer.status_code == 200
    assert answer.json()["extra_links"] == {"LoRA artifacts": None, "Loss chart": tab}

    shown = _get(api, api.viewer, dag_id="lora_links_test", run_id=run.run_id, task_id="train",
                 map_index="{MAP_INDEX}")
    assert shown.status_code == 200 and shown.text == page
