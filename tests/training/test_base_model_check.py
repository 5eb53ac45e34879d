"""A base model that cannot load is refused when the run is submitted, by the form and by the API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from django.contrib.auth.models import AbstractUser
from rest_framework.test import APIClient

from annotation.models import Project
from annotation.roles import Role
from tests.factories import user_with_roles
from tests.training.test_builds_support import make_manager
from training.model_check import base_model_problem
from training.models import DatasetBuild, TrainingRun


@pytest.fixture
def trainer(db: None) -> AbstractUser:
    return user_with_roles(Role.MANAGER, username="submitter")


@pytest.fixture
def build(trainer: AbstractUser) -> DatasetBuild:
    project = Project.objects.create(name="checked", k=2)
    make_manager(project, trainer)
    build = DatasetBuild.objects.create(name="b", created_by=trainer, status=DatasetBuild.Status.SUCCEEDED)
    build.projects.add(project)
    return build


def copy_without(model_dir: Path, target: Path, *names: str) -> Path:
    shutil.copytree(model_dir, target)
    for name in names:
        (target / name).unlink()
    return target


def test_a_saved_model_folder_is_accepted(tiny_model_dir: Path) -> None:
    assert base_model_problem(str(tiny_model_dir)) is None


def test_each_missing_part_of_a_model_folder_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model"
    assert base_model_problem(str(missing)) == f"no model folder at {missing} on this server"
    no_config = copy_without(tiny_model_dir, tmp_path / "no-config", "config.json")
    assert "has no config.json" in (base_model_problem(str(no_config)) or "")
    no_weights = copy_without(tiny_model_dir, tmp_path / "no-weights", "model.safetensors")
    assert "no .safetensors weights" in (base_model_problem(str(no_weights)) or "")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (no_tokenizer / "model.safetensors").write_bytes(b"")
    assert "has no tokenizer" in (base_model_problem(str(no_tokenizer)) or "")
    (no_tokenizer / "config.json").write_text("{not json")
    assert "cannot be read" in (base_model_problem(str(no_tokenizer)) or "")
    assert "is a file" in (base_model_problem(str(tiny_model_dir / "config.json")) or "")


def test_a_hub_id_missing_from_the_cache_is_refused_while_the_hub_is_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    problem = base_model_problem("some-org/not-downloaded-here")
    assert problem is not None and "'some-org/not-downloaded-here'" in problem and "offline" in problem
    assert base_model_problem("not a repo id") == "no model folder at not a repo id on this server"


def test_the_api_refuses_a_missing_base_model_at_once_and_names_it(
    trainer: AbstractUser, build: DatasetBuild, tmp_path: Path
) -> None:
    api = APIClient()
    api.force_authenticate(trainer)
    missing = str(tmp_path / "typo" / "sft-model")

    response = api.post(
        "/api/training-runs/",
        {"dataset_build": build.pk, "kind": "reward", "base_model": missing},
        format="json",
    )

    assert response.status_code == 400, response.content
    assert missing in json.dumps(response.json())
    assert not TrainingRun.objects.exists()


def test_the_run_form_refuses_a_folder_that_is_not_a_model_and_says_why(
    client, trainer: AbstractUser, build: DatasetBuild, tmp_path: Path
) -> None:
    client.force_login(trainer)
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()

    response = client.post(
        "/training/runs/new",
        {
            "kind": "reward",
            "dataset_build": build.pk,
            "base_model": str(not_a_model),
            "peft": "lora",
            "trainer": "grouped",
            "gpus": 1,
            "num_train_epochs": 1,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_length": 96,
            "beta": 0.1,
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.05,
            "seed": 0,
            "max_steps": 4,
            "logging_steps": 1,
            "save_steps": 2,
            "few_steps_ok": "1",
        },
    )

    assert response.status_code == 200
    errors = response.context["form"].errors
    assert errors["base_model"] == [f"{not_a_model} has no config.json: not a saved Hugging Face model"]
    assert not TrainingRun.objects.exists()
