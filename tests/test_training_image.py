"""The training image is the user's own build: no default names an image nobody publishes. The pod and TrainJob
launchers take it from ``image=`` or ``[lora] image`` and refuse, at DAG parse, to go without one."""

from __future__ import annotations

import pytest

from airflow_provider_lora import get_provider_info
from airflow_provider_lora.core.render import PodOptions
from airflow_provider_lora.operators.lora import LoRATrainingOperator

SPEC = dict(base_model="org/model", dataset="s3://data/train.jsonl", output_uri="s3://runs/out")


@pytest.fixture
def no_configured_image(monkeypatch):
    monkeypatch.delenv("AIRFLOW__LORA__IMAGE", raising=False)  # tests/conftest.py sets one for the suite


@pytest.mark.parametrize("launcher", ["pod", "trainjob"])
def test_a_cluster_launcher_without_an_image_fails_at_parse_naming_both_ways_to_give_it(no_configured_image,
                                                                                        launcher):
    with pytest.raises(ValueError) as info:
        LoRATrainingOperator(task_id="t", launcher=launcher, **SPEC)
    message = str(info.value)
    assert f"image=None is not valid with launcher={launcher!r}" in message
    assert "image='registry.example.com/team/lora-trainer:0.1.0'" in message  # what is accepted
    assert "[lora] image" in message and "AIRFLOW__LORA__IMAGE" in message
    assert "launcher='local' needs none" in message


def test_the_local_launcher_needs_no_image(no_configured_image):
    assert LoRATrainingOperator(task_id="t", launcher="local", **SPEC).image is None


def test_lora_image_in_the_airflow_configuration_is_the_default_and_image_wins(monkeypatch):
    monkeypatch.setenv("AIRFLOW__LORA__IMAGE", "registry.example/team/trainer:2")
    assert LoRATrainingOperator(task_id="t", launcher="pod", **SPEC).image == "registry.example/team/trainer:2"
    chosen = LoRATrainingOperator(task_id="t", launcher="pod", image="registry.example/own:3", **SPEC)
    assert chosen.image == "registry.example/own:3"
    assert chosen._options().image == "registry.example/own:3"  # what the pod is rendered with


def test_a_malformed_image_fails_at_parse_and_a_templated_one_once_rendered(no_configured_image):
    with pytest.raises(ValueError, match=r"image='Registry.Example/Team:1' is not valid: expected an image "
                                         r"reference such as 'registry.example.com/team/lora-trainer:0.1.0'"):
        LoRATrainingOperator(task_id="t", launcher="pod", image="Registry.Example/Team:1", **SPEC)
    templated = LoRATrainingOperator(task_id="t", launcher="pod", image="{{ var.value.trainer_image }}", **SPEC)
    assert "image" in templated.template_fields


def test_pod_options_have_no_default_image():
    from pydantic import ValidationError

    assert PodOptions.model_fields["image"].is_required()
    with pytest.raises(ValidationError, match="image"):
        PodOptions()


def test_the_provider_declares_the_lora_config_section_as_providers_do():
    """In the form of cncf-kubernetes' own get_provider_info()["config"], so Airflow lists and documents it."""
    from airflow.providers.cncf.kubernetes.get_provider_info import get_provider_info as cncf_info

    cncf_option = next(iter(next(iter(cncf_info()["config"].values()))["options"].values()))
    section = get_provider_info()["config"]["lora"]
    assert set(section) == {"description", "options"}
    assert set(section["options"]) == {"image", "deployment"}
    for name, option in section["options"].items():
        assert set(option) == set(cncf_option), name
        assert option["type"] == "string" and option["description"], name
    assert section["options"]["image"]["default"] == ""  # no image unless the deployment names one
    assert section["options"]["deployment"]["default"] == "default"
