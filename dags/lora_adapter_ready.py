"""Runs for every adapter a LoRA training publishes: scheduled on the asset alias "lora-adapters", which the
training examples pass as the operator's ``asset_alias`` (dags/lora_finetune.py, dags/lora_finetune_pod.py).

Each training that succeeds emits an asset event for its adapter's location (``s3://.../adapter`` or
``file:///.../adapter``) with the run's figures as the event's extra; this DAG receives them as
``triggering_asset_events`` (``triggering_dataset_events`` on Airflow 2.11). Put what comes next here: evaluate the
adapter, register it, deploy it. The task below gathers what a next step needs.
"""

from __future__ import annotations

import datetime

# The names exist on Airflow 2.11 and 3.x alike through common-compat (a dependency of this provider).
from airflow.providers.common.compat.sdk import DAG, AssetAlias, get_current_context, task

ADAPTERS = AssetAlias("lora-adapters")


@task
def adapters_ready() -> list[dict]:
    """One entry per new adapter: its URI and the figures its training reported."""
    context = get_current_context()
    events = context.get("triggering_asset_events") or context.get("triggering_dataset_events") or {}
    ready: dict[tuple, dict] = {}
    for key, received in events.items():  # Airflow 3 files each event under its asset and under the alias
        for event in received:
            uri = getattr(getattr(event, "asset", None), "uri", None) or getattr(key, "uri", key)
            ready[(uri, str(event.timestamp))] = {"uri": uri, **(event.extra or {})}
    if not ready:
        raise ValueError("no adapter in this run's triggering asset events: trigger it through a training")
    return list(ready.values())


with DAG(
    dag_id="lora_adapter_ready",
    description="Next steps for each new LoRA adapter (scheduled on the 'lora-adapters' asset alias)",
    schedule=[ADAPTERS],
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    tags=["lora", "example"],
) as dag:
    adapters_ready()
