"""A manager starts, re-runs and cancels training runs from the pages, in real Chromium."""

from __future__ import annotations

import pytest

from annotation.models import Project
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.factories import user_with_roles
from training.models import DatasetBuild, TrainingRun

pytestmark = pytest.mark.django_db(transaction=True)


def _build(manager) -> DatasetBuild:  # type: ignore[no-untyped-def]
    project = Project.objects.create(name="prefs", k=2)
    add_member(project, manager, Role.MANAGER)
    build = DatasetBuild.objects.create(
        name="small build",
        created_by=manager,
        status=DatasetBuild.Status.SUCCEEDED,
        counts={"pairs": {"train": 40, "test": 8}, "grouped": {"train": 12, "test": 3}},
    )
    build.projects.add(project)
    return build


def test_a_run_started_from_a_builds_page_warns_when_its_settings_give_very_few_steps(open_page, live_server):
    # given a small build that succeeded
    manager = user_with_roles(Role.MANAGER, username="host")
    build = _build(manager)
    page, watch = open_page(manager)

    # when the manager starts a reward run from the build's page with the default settings
    page.goto(f"{live_server.url}/datasets/{build.pk}/")
    page.click("text=Start a reward-model run")
    page.wait_for_url(f"{live_server.url}/training/runs/new?build={build.pk}&kind=reward")
    assert page.input_value("#id_dataset_build") == str(build.pk)
    assert page.input_value("#id_kind") == "reward"
    page.fill("#id_base_model", "/models/sft")
    page.click("main button[type=submit]")

    # then nothing starts: the page says the settings give 2 steps (12 groups, batch 8, 1 epoch)
    page.wait_for_selector("#few-steps")
    assert "only 2 optimizer steps" in page.inner_text("#few-steps")
    assert not TrainingRun.objects.exists()
    assert watch.errors == []


def test_a_run_is_run_again_from_its_settings_and_cancelled_only_after_a_confirmation(open_page, live_server):
    # given a queued run with its own settings
    manager = user_with_roles(Role.MANAGER, username="host")
    build = _build(manager)
    run = TrainingRun.objects.create(
        name="first try",
        kind=TrainingRun.Kind.DPO,
        dataset_build=build,
        base_model="/models/sft",
        created_by=manager,
        hyperparameters={"max_steps": 300, "beta": 0.2},
    )
    page, watch = open_page(manager)
    page.goto(f"{live_server.url}/training/runs/{run.pk}/")

    # when the manager clicks "Cancel run…", then only a confirmation appears: nothing is cancelled yet
    page.click("#cancel-run summary")
    page.wait_for_selector("text=Yes, cancel the run")
    run.refresh_from_db()
    assert not run.cancel_requested and run.status == TrainingRun.Status.QUEUED

    # when they confirm, then the run is cancelled
    page.click("text=Yes, cancel the run")
    page.wait_for_load_state()
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.CANCELLED or run.cancel_requested

    # and "Run again" opens the form filled with the run's settings
    page.goto(f"{live_server.url}/training/runs/{run.pk}/")
    page.click("#run-again")
    page.wait_for_selector("#id_base_model")
    assert page.input_value("#id_kind") == "dpo"
    assert page.input_value("#id_dataset_build") == str(build.pk)
    assert page.input_value("#id_base_model") == "/models/sft"
    assert page.input_value("#id_max_steps") == "300"
    assert page.input_value("#id_beta") == "0.2"
    assert watch.errors == []
