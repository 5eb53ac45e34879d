"""Paths in the database are relative to the storage roots, so hosts may mount storage anywhere."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from django.apps import apps

from annotation.models import Policy
from annotation.roles import Role
from config.storage import storage_path_resolve, storage_path_stored
from tests.factories import user_with_roles
from training.models import DatasetBuild, RewardModel, TrainingRun

relative_paths = importlib.import_module("training.migrations.0009_paths_relative_to_storage_roots")


@pytest.fixture
def roots(settings, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    settings.ARTIFACTS_DIR = tmp_path / "host-a" / "artifacts"
    settings.MODELS_DIR = tmp_path / "host-a" / "models"
    return tmp_path


def test_a_path_under_a_root_is_stored_relative_to_it(roots: Path) -> None:
    assert (
        storage_path_stored(roots / "host-a" / "artifacts" / "runs" / "7" / "final")
        == "artifacts:runs/7/final"
    )
    assert storage_path_stored(str(roots / "host-a" / "models" / "demo-sft")) == "models:demo-sft"


def test_a_hub_id_a_path_elsewhere_and_a_blank_are_kept_as_given(roots: Path) -> None:
    for value in ("gpt2", "org/model", "/opt/models/sft", ""):
        assert storage_path_stored(value) == value
        assert storage_path_resolve(value) == value


def test_another_host_resolves_a_stored_path_under_its_own_mount(roots: Path, settings) -> None:  # type: ignore[no-untyped-def]
    # given a path stored by host A
    stored = storage_path_stored(roots / "host-a" / "artifacts" / "runs" / "7")
    # when host B, which mounts the shared storage elsewhere, reads it
    settings.ARTIFACTS_DIR = Path("/mnt/shared/artifacts")
    # then it finds it under its own mount
    assert storage_path_resolve(stored) == "/mnt/shared/artifacts/runs/7"


def test_a_root_inside_the_other_is_matched_first(roots: Path, settings) -> None:  # type: ignore[no-untyped-def]
    settings.MODELS_DIR = roots / "host-a" / "artifacts" / "models"
    assert storage_path_stored(roots / "host-a" / "artifacts" / "models" / "sft") == "models:sft"


@pytest.mark.django_db
def test_the_data_migration_makes_existing_absolute_paths_relative_and_back(roots: Path) -> None:
    # given rows written with absolute paths before the migration
    artifacts, models = roots / "host-a" / "artifacts", roots / "host-a" / "models"
    build = DatasetBuild.objects.create(
        name="b", created_by=user_with_roles(Role.MANAGER, username="mgr"), status="succeeded"
    )
    run = TrainingRun.objects.create(
        name="r",
        kind="reward",
        dataset_build=build,
        base_model=str(models / "sft"),
        output_dir=str(artifacts / "runs/1"),
    )
    reward_model = RewardModel.objects.create(
        name="rm", run=run, base_model="gpt2", path=str(artifacts / "runs/1/final")
    )
    policy = Policy.objects.create(
        name="p", base_model="/opt/elsewhere", adapter=str(artifacts / "runs/2/final")
    )

    # when the migration runs forward
    relative_paths.paths_relative(apps, None)

    # then paths under the roots are relative, the rest untouched
    run.refresh_from_db()
    reward_model.refresh_from_db()
    policy.refresh_from_db()
    assert (run.base_model, run.output_dir) == ("models:sft", "artifacts:runs/1")
    assert (reward_model.base_model, reward_model.path) == ("gpt2", "artifacts:runs/1/final")
    assert (policy.base_model, policy.adapter) == ("/opt/elsewhere", "artifacts:runs/2/final")
    assert run.output_path == artifacts / "runs" / "1"

    # and backward, as they were
    relative_paths.paths_absolute(apps, None)
    run.refresh_from_db()
    policy.refresh_from_db()
    assert (run.base_model, run.output_dir) == (str(models / "sft"), str(artifacts / "runs/1"))
    assert policy.adapter == str(artifacts / "runs/2/final")
