"""The "Loss chart" tab on every task instance (Airflow 3.1+): an external view whose page is served by a small
FastAPI app mounted in the API server at ``/losschart``.

The page is the ``loss_chart_html`` XCom that LoRATrainingOperator pushes after a successful run; every other task
instance (the tab shows on every task of every DAG) gets a short "No loss chart for this task" page. The route is
protected by Airflow's own DAG/XCom read permission (401 without credentials; the UI's iframe sends the ``_token``
cookie). The chart page is served with a sandboxing Content-Security-Policy: an XCom value must never run script in
the API server's origin, so the page gets an opaque origin, no network, and only the chart's own hover script (by
its hash) runs.

The FastAPI app is built on first access to ``fastapi_apps``, which only the API server (and ``airflow plugins``)
reads: schedulers, DAG processors and workers load every plugin too, and need not import the API server's modules.
"""

# No "from __future__ import annotations": FastAPI resolves the route's annotations (SessionDep, imported inside
# create_app) at definition time, and string annotations would name nothing in the module's globals.
import base64
import functools
import hashlib
import html
import json
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from airflow_provider_lora.core.results import _HOVER_JS
from airflow_provider_lora.links import CHART_XCOM_KEY, TAB_URL_PREFIX, TAB_URL_ROUTE

MAP_INDEX_PLACEHOLDER = "{MAP_INDEX}"  # left as-is by the UI for unmapped task instances
CHART_ROUTE = "/chart"
# ``sandbox allow-scripts`` (no allow-same-origin): an opaque origin, even opened directly; scripts: only the chart's
# hover script, named by its hash (the chart's data is a JSON block, which does not execute); no fetches at all.
HOVER_SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(_HOVER_JS.encode()).digest()).decode()
CSP = (f"sandbox allow-scripts; default-src 'none'; style-src 'unsafe-inline'; script-src '{HOVER_SCRIPT_HASH}'; "
       "img-src data:")
NO_CHART_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>No loss chart</title>
<style>body{{font:14px system-ui,sans-serif;color:#555;margin:2em}}</style></head>
<body><p>No loss chart for this task{detail}.</p>
<p>The chart appears here after a successful run of LoRATrainingOperator.</p></body></html>
"""


def parse_map_index(value: str | None) -> int:
    """``{MAP_INDEX}`` (unmapped task instance in the UI), "" or None mean -1; otherwise an integer >= -1."""
    if value is None or value.strip() in ("", MAP_INDEX_PLACEHOLDER):
        return -1
    index = int(value)  # ValueError: the route answers 400
    if index < -1:
        raise ValueError(f"map_index={value!r} is below -1")
    return index


def _as_html(value: Any) -> str | None:
    """The stored XCom value as the chart page, or None when it is not a page (JSON-encoded or already decoded)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            decoded = value
        value = decoded
    return value if isinstance(value, str) and value.lstrip()[:1] == "<" else None


@functools.cache
def create_app() -> Any:
    from fastapi import Depends, FastAPI, HTTPException, Query
    from fastapi.responses import HTMLResponse
    from sqlalchemy import select

    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.common.db.common import SessionDep
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from airflow.models.xcom import XComModel

    app = FastAPI(title="LoRA loss chart", description="The Loss chart tab of LoRATrainingOperator's task instances.",
                  docs_url=None, redoc_url=None, openapi_url=None)
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}

    @app.get(CHART_ROUTE, response_class=HTMLResponse,
             dependencies=[Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.XCOM))])
    def chart(
        session: SessionDep,
        dag_id: str = Query(min_length=1),
        run_id: str = Query(min_length=1),
        task_id: str = Query(min_length=1),
        map_index: str = Query("-1"),
    ) -> HTMLResponse:
        try:
            index = parse_map_index(map_index)
        except ValueError:
            raise HTTPException(400, f"map_index must be an integer >= -1, not {map_index!r}") from None
        value = session.scalar(
            select(XComModel.value).where(
                XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == task_id,
                XComModel.map_index == index, XComModel.key == CHART_XCOM_KEY,
            ).limit(1)
        )
        page = _as_html(value) if value is not None else None
        if page is None:
            detail = "" if value is None else " (the stored value is not a page: a custom XCom backend?)"
            page = NO_CHART_PAGE.format(detail=html.escape(detail))
        return HTMLResponse(page, headers=headers)

    return app


class _FastAPIApps:
    """``fastapi_apps`` as a descriptor: builds the app when the API server first asks for it."""

    def __get__(self, instance: Any, owner: Any) -> list[dict[str, Any]]:
        return [{"app": create_app(), "url_prefix": TAB_URL_PREFIX, "name": "LoRA loss chart"}]


class LoRAPlugin(AirflowPlugin):
    name = "lora_loss_chart"
    fastapi_apps = _FastAPIApps()  # type: ignore[assignment]
    external_views = [
        {
            "name": "Loss chart",
            # Relative (no leading "/"): the UI resolves it against its <base href>, so a sub-path deployment works.
            "href": (f"{TAB_URL_PREFIX.lstrip('/')}{CHART_ROUTE}?dag_id={{DAG_ID}}&run_id={{RUN_ID}}"
                     f"&task_id={{TASK_ID}}&map_index={{MAP_INDEX}}"),
            "destination": "task_instance",
            "url_route": TAB_URL_ROUTE,
        }
    ]
