"""Run settings are defined once (training.run_settings): the form, the API and the run process agree on each."""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

import pytest
from django import forms
from rest_framework import serializers

from tests.training.test_runs import build  # noqa: F401 (a fixture: a succeeded build)
from training.api import RL_SETTINGS, RunHyperparametersSerializer, TrainingRunRequestSerializer
from training.forms import TrainingRunForm
from training.run_settings import FORM_SETTINGS, RUN_SETTINGS, RUN_SETTINGS_BY_NAME, RunSetting
from training.runner import RunSpec

SPEC = {
    "run_id": 1,
    "kind": "reward",
    "base_model": "m",
    "train_file": "t",
    "test_file": None,
    "output_dir": "o",
}


def candidates(setting: RunSetting) -> list[Any]:
    """Values on each side of every bound of the setting, and a few of the wrong type."""
    values: list[Any] = [None, "x", True, [1]]
    for bound in (setting.minimum, setting.maximum, setting.above, setting.below):
        if bound is not None:
            values += [bound - 1, bound, bound + 1]
            if setting.type is float:
                values += [bound - 0.001, bound + 0.001]
    values += [*setting.also, *setting.choices, setting.default, 0, 1, 2, -1, 10**6]
    return values


def spec_accepts(setting: RunSetting, value: Any) -> bool:
    try:
        RunSpec(**SPEC, **{setting.name: value})
    except ValueError as error:
        assert setting.name in str(error)
        return False
    return True


def form_reads(setting: RunSetting, value: Any) -> tuple[bool, Any]:
    """Whether the form takes `value`, and what it makes of it."""
    try:
        return True, TrainingRunForm.base_fields[setting.name].clean(value)
    except forms.ValidationError:
        return False, None


def api_reads(setting: RunSetting, value: Any) -> tuple[bool, Any]:
    """Whether the API takes `value`, and what it makes of it (JSON read loosely: "5" is 5, 0 is false)."""
    try:
        return True, RunHyperparametersSerializer().fields[setting.name].run_validation(value)
    except serializers.ValidationError:
        return False, None


def assert_agree(door: Any, setting: RunSetting, value: Any) -> None:
    """What a door takes, the run process takes as the door gives it; what the run process takes, the door takes."""
    taken, read = door(setting, value)
    if taken:
        assert spec_accepts(setting, read), (setting.name, value, read)
    if spec_accepts(setting, value):
        assert taken, (setting.name, value)


@pytest.mark.parametrize("setting", RUN_SETTINGS, ids=lambda setting: setting.name)
def test_the_api_and_the_run_process_agree_on_every_value_of_a_setting(setting: RunSetting) -> None:
    for value in candidates(setting):
        if value is None and not setting.nullable:
            continue  # an absent setting takes the spec's default; a null is not sent
        assert_agree(api_reads, setting, value)


@pytest.mark.parametrize("setting", FORM_SETTINGS, ids=lambda setting: setting.name)
def test_the_form_and_the_run_process_agree_on_every_value_of_a_setting(setting: RunSetting) -> None:
    for value in candidates(setting):
        if value in (None, "") or isinstance(value, bool | list):
            continue  # a blank field takes the default; the form reads text
        assert_agree(form_reads, setting, value)


def test_the_run_spec_takes_each_setting_s_type_and_default_from_the_definition() -> None:
    hints = get_type_hints(RunSpec)
    defaults = {field.name: field.default for field in dataclasses.fields(RunSpec)}
    for setting in RUN_SETTINGS:
        expected = setting.type if setting.type is not list else list[str]
        if setting.nullable:
            expected = expected | None
        assert hints[setting.name] == expected, setting.name
        if setting.default is not None or setting.nullable:
            assert defaults[setting.name] == setting.default, setting.name


def test_the_form_and_the_api_show_the_settings_with_the_definition_s_words_and_defaults() -> None:
    for setting in FORM_SETTINGS:
        field = TrainingRunForm.base_fields[setting.name]
        assert (str(field.label), field.initial) == (setting.label, setting.default)
    api_fields = TrainingRunRequestSerializer().fields
    assert set(RL_SETTINGS) <= set(api_fields)
    assert set(RunHyperparametersSerializer().fields) == set(RUN_SETTINGS_BY_NAME)
    assert "RL only" in api_fields["rl_watch_prompts"].help_text


def test_a_name_that_is_not_a_setting_is_refused_by_the_api_naming_it() -> None:
    serializer = TrainingRunRequestSerializer(
        data={"dataset_build": 1, "kind": "reward", "base_model": "m", "hyperparameters": {"output_dir": "/"}}
    )
    assert not serializer.is_valid()
    assert "output_dir is not a run setting" in str(serializer.errors["hyperparameters"])


@pytest.mark.django_db
def test_the_service_names_each_bad_setting_on_its_field_and_refuses_names_that_are_not_settings(
    build: Any,  # noqa: F811 (the fixture imported above)
    tiny_model_dir: Any,
) -> None:
    from django.core.exceptions import ValidationError

    from training.models import TrainingRun
    from training.services import training_run_create

    # when a run is asked for with a bad rank and a path that is the service's to set
    with pytest.raises(ValidationError) as refused:
        training_run_create(
            dataset_build=build,
            kind="reward",
            base_model=str(tiny_model_dir),
            created_by=build.created_by,
            hyperparameters={"lora_r": 0, "output_dir": "/elsewhere"},
        )

    # then each is named on its own field, and no run was made
    errors = refused.value.message_dict
    assert errors["lora_r"] == ["lora_r must be at least 1; got 0"]
    assert errors["output_dir"][0].startswith("output_dir is not a run setting")
    assert not TrainingRun.objects.exists()


def test_the_run_model_s_choices_are_the_run_process_s() -> None:
    from training.models import TrainingRun
    from training.run_settings import KINDS, PEFT_METHODS, TRAINERS

    # The model's choices carry translated labels, so they are written there; their values must be these.
    assert set(TrainingRun.Kind.values) == set(KINDS)
    assert set(TrainingRun.Peft.values) == set(PEFT_METHODS)
    assert set(TrainingRun.Trainer.values) == set(TRAINERS)
