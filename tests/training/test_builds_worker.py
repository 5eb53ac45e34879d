"""A dataset build through the real Celery worker (another process, reading the test database)."""

from __future__ import annotations

import shutil
import time

import pytest
from django.contrib.auth.models import AbstractUser

from annotation.roles import Role
from config.celery import app as celery_app
from tests.factories import user_with_roles
from tests.training.test_builds_support import judge, make_manager, project_with_prompts, tasks_of
from training.models import DatasetBuild
from training.selectors import dataset_build_dir
from training.services import dataset_build_create

WAIT_S = 60


def queue_for(task_name: str) -> str:
    import training.tasks  # noqa: F401  (registers the tasks)

    return celery_app.tasks[task_name].queue


def test_the_build_task_goes_to_the_default_queue() -> None:
    assert queue_for("training.tasks.dataset_build_execute") == "default"


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_build_queued_on_commit_runs_on_a_worker_to_success(
    celery_worker: str, manager: AbstractUser
) -> None:
    # given judgments, committed (the worker cannot see an open transaction)
    project = project_with_prompts(["Why is the sky blue?", "Write a haiku about rain."], k=3)
    make_manager(project, manager)
    alice = user_with_roles(Role.LABELER, username="alice")
    for task in tasks_of(project):
        judge(task, alice, [1, 2, 3])

    # when a build is created (the service queues it once the transaction commits)
    build = dataset_build_create(created_by=manager, name="via worker", projects=[project])
    try:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            build.refresh_from_db()
            if build.is_finished:
                break
            time.sleep(0.2)

        # then the worker ran it to the end
        assert build.status == DatasetBuild.Status.SUCCEEDED, build.error
        assert build.progress == 1.0
        assert build.started_at is not None and build.finished_at is not None
        assert build.counts["pairs"]["train"] + build.counts["pairs"]["test"] == 6
        assert (dataset_build_dir(build_id=build.pk) / "README.md").is_file()
    finally:
        # The worker writes under the real ARTIFACTS_DIR, not a test folder.
        shutil.rmtree(dataset_build_dir(build_id=build.pk), ignore_errors=True)
