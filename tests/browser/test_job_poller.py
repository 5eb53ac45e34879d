"""The one poller (static/js/job.js) moves a live job's page and reloads it when the job ends, in real Chromium.

The rows are moved by the test, as a worker would move them: no worker runs here.
"""

from __future__ import annotations

import pytest
from django.utils import timezone

from annotation.models import Project
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.factories import user_with_roles
from training.models import DatasetBuild, TrainingRun

pytestmark = pytest.mark.django_db(transaction=True)


def _manager_and_build(status: str):  # type: ignore[no-untyped-def]
    manager = user_with_roles(Role.MANAGER, username="host")
    project = Project.objects.create(name="prefs", k=2)
    add_member(project, manager, Role.MANAGER)
    build = DatasetBuild.objects.create(name="live build", created_by=manager, status=status)
    build.projects.add(project)
    return manager, build


def test_a_running_builds_page_follows_its_progress_and_shows_the_build_once_it_succeeds(
    open_page, live_server
):
    # given a manager on the page of a build that is running
    manager, build = _manager_and_build(DatasetBuild.Status.RUNNING)
    page, watch = open_page(manager)
    page.goto(f"{live_server.url}/datasets/{build.pk}/")
    assert page.get_attribute("[data-job-status-url]", "data-job-terminal") == "false"

    # when the build moves halfway, the page follows without a reload
    DatasetBuild.objects.filter(pk=build.pk).update(progress=0.5)
    page.locator("[data-job-progress-label]", has_text="50%").wait_for()
    assert page.inner_text("[data-job-status]") == "Running"

    # and when it succeeds, the page reloads and shows the finished build
    DatasetBuild.objects.filter(pk=build.pk).update(
        status=DatasetBuild.Status.SUCCEEDED, progress=1.0, finished_at=timezone.now()
    )
    page.wait_for_selector("[data-job-status-url][data-job-terminal=true]")
    assert page.inner_text("[data-job-status]") == "Succeeded"
    assert watch.errors == []


def test_a_running_runs_page_follows_its_steps_and_shows_the_failure_once_it_fails(open_page, live_server):
    # given a manager on the page of a run at step 0 of 10
    manager, build = _manager_and_build(DatasetBuild.Status.SUCCEEDED)
    run = TrainingRun.objects.create(
        name="live run",
        kind="reward",
        dataset_build=build,
        base_model="m",
        created_by=manager,
        status=TrainingRun.Status.RUNNING,
        attempts=1,
        total_steps=10,
        heartbeat_at=timezone.now(),
    )
    page, watch = open_page(manager)
    page.goto(f"{live_server.url}/training/runs/{run.pk}/")

    # when it trains three steps and logs a line, the page follows
    TrainingRun.objects.filter(pk=run.pk).update(step=3, log_tail="step 3: loss 0.69")
    page.locator("[data-job-steps]", has_text="3 / 10").wait_for()
    page.locator("[data-job-log]", has_text="loss 0.69").wait_for()

    # and when it fails, the page reloads with the reason
    TrainingRun.objects.filter(pk=run.pk).update(
        status=TrainingRun.Status.FAILED, error="out of memory", finished_at=timezone.now()
    )
    page.wait_for_selector("[data-job-status-url][data-job-terminal=true]")
    assert "out of memory" in page.inner_text("main")
    assert watch.errors == []
