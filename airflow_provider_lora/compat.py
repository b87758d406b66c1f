"""The Airflow names this provider uses, importable on Airflow 3.x and 2.11 alike. Everything else imports them
from here.

common-compat resolves each name to ``airflow.sdk`` (and its execution-time XCom) on 3.x and to its 2.x home
(``airflow.models``, ``airflow.exceptions``, ``airflow.configuration``...) on 2.11. What differs beyond the import
path is decided here, once, with the flags below:

- extra links: ``get_link(self, operator, *, ti_key)`` on both; 3.x runs it on the worker when the try ends and
  stores the URL as XCom, 2.11 runs it in the webserver on request. ``XCom.get_value(ti_key=, key=)`` reads the
  return value on both.
- the "Loss chart" task-instance tab (plugins/loss_chart.py) needs Airflow 3.1+ (``external_views`` and
  ``fastapi_apps``); 2.11's Flask webserver ignores both attributes, so the plugin loads there without a tab and
  the "Loss chart" link stays empty.
- ``dag.test()``: 3.x runs only DAGs serialized to the database; 2.11 takes the DAG object and ``execution_date``.
"""

from airflow.providers.common.compat.sdk import (  # noqa: F401
    DAG, AirflowException, AirflowFailException, Asset, AssetAlias, BaseOperator, BaseOperatorLink, Context, Param,
    XCom, conf, get_current_context,
)
from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_0_PLUS, AIRFLOW_V_3_1_PLUS  # noqa: F401
from airflow.triggers.base import BaseTrigger, TriggerEvent  # noqa: F401  (same home on 2.11 and 3.x)

# The Loss chart tab: a plugin external view on a task instance, served by a FastAPI app in the API server.
HAS_TASK_INSTANCE_TAB = AIRFLOW_V_3_1_PLUS
