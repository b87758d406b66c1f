"""The operator as a DAG author writes it, run by dag.test() with the local launcher: the XCom holds the result."""

from __future__ import annotations

import datetime
import inspect

import pytest

from airflow_provider_lora.core.spec import LoRASpec
from airflow_provider_lora.operators.lora import LoRATrainingOperator
from tests.fixtures.airflow import local_trainer, run_and_pull
from tests.trainer_helpers import FAST, arithmetic_rows, write_jsonl


def test_every_spec_field_is_a_keyword_argument_with_the_spec_default():
    parameters = inspect.signature(LoRATrainingOperator.__init__).parameters
    for name, field in LoRASpec.model_fields.items():
        assert parameters[name].default == field.default, name


def test_bad_values_fail_at_dag_parse_naming_the_parameter():
    with pytest.raises(ValueError, match=r"(?s)train: .*lora_r=0 is not valid"):
        LoRATrainingOperator(task_id="train", lora_r=0)


def test_templated_values_are_checked_after_rendering():
    operator = LoRATrainingOperator(task_id="train", dataset="{{ params.dataset }}", lora_r="{{ params.r }}")
    operator.lora_r = "0"  # as Jinja would render it
    with pytest.raises(ValueError, match="lora_r=0"):
        operator._spec()


@pytest.mark.slow
@local_trainer
def test_dag_test_with_the_local_launcher_returns_the_result(airflow_db, tiny_model_dir, tmp_path):
    from airflow_provider_lora.compat import DAG

    dataset = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24))
    with DAG("lora_local_test", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        LoRATrainingOperator(task_id="train", launcher="local", base_model=str(tiny_model_dir),
                             dataset=str(dataset), output_uri=str(tmp_path / "out") + "/{{ run_id }}",
                             **{**FAST, "num_epochs": 2})
    run, ti, result = run_and_pull(dag)
    assert result["summary"]["final_loss"] < result["summary"]["first_loss"]
    assert result["artifacts"]["adapter"].startswith(str(tmp_path / "out"))
    assert run.run_id in result["artifacts"]["root"]  # output_uri was templated
    assert [r["step"] for r in result["history"]] == list(range(1, result["summary"]["global_step"] + 1))
