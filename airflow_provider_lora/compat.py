"""The Airflow names this provider uses, importable on Airflow 3.x and 2.11 alike (through common-compat, which
resolves each to airflow.sdk on 3.x and to its 2.x home otherwise). Everything else imports them from here."""

from airflow.providers.common.compat.sdk import (  # noqa: F401
    AirflowException, AirflowFailException, BaseOperator, BaseOperatorLink, Context, conf,
)
from airflow.triggers.base import BaseTrigger, TriggerEvent  # noqa: F401  (same home on 2.11 and 3.x)
