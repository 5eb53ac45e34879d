"""Continuous mode: every so many new judgments a fresh reward model scores the project and re-orders its queue.

The worker test runs whole cycles: the beat's tick (called here in a loop, as
the beat would every minute) starts a build, a reward run and a scoring job
on the real workers, and the tasks' uncertainty follows the new model.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError
from django.test import Client

from annotation.models import CompletionScore, Project, Task
from annotation.roles import Role
from config.celery import app as celery_app
from tests.annotation.conftest import add_member, make_people
from tests.factories import user_with_roles
from tests.training.test_builds_support import judge, make_manager, project_with_prompts, tasks_of
from tests.training.test_scoring import signed_in
from training.continuous import continuous_training_set, continuous_training_tick
from training.models import ContinuousTraining, DatasetBuild, ScoringJob, TrainingRun

TIMEOUT_S = 600
worker_test = pytest.mark.django_db(transaction=True)


def template_run(project: Project, manager, base_model: str) -> TrainingRun:  # type: ignore[no-untyped-def]
    """A reward run on a build of `project` (not trained: continuous mode copies its settings only)."""
    build = DatasetBuild.objects.create(
        name="template data", status=DatasetBuild.Status.SUCCEEDED, created_by=manager, test_fraction=0.0
    )
    build.projects.add(project)
    return TrainingRun.objects.create(
        name="template",
        kind=TrainingRun.Kind.REWARD,
        dataset_build=build,
        base_model=base_model,
        status=TrainingRun.Status.SUCCEEDED,
        peft="full",
        hyperparameters={
            "max_steps": 4,
            "logging_steps": 1,
            "per_device_train_batch_size": 2,
            "max_length": 96,
        },
        created_by=manager,
    )


@pytest.mark.django_db
def test_continuous_mode_needs_a_reward_run_on_a_build_of_the_project() -> None:
    manager = user_with_roles(Role.MANAGER, username="cont-host")
    project = project_with_prompts(["One?"], name="cont", k=2)
    elsewhere = project_with_prompts(["Two?"], name="cont-elsewhere", k=2)
    make_manager(project, manager)
    make_manager(elsewhere, manager)
    other_run = template_run(elsewhere, manager, "tiny")
    dpo_run = template_run(project, manager, "tiny")
    TrainingRun.objects.filter(pk=dpo_run.pk).update(kind=TrainingRun.Kind.DPO)
    dpo_run.refresh_from_db()

    with pytest.raises(ValidationError) as wrong_project:
        continuous_training_set(
            project=project, template_run=other_run, every_judgments=5, created_by=manager
        )
    with pytest.raises(ValidationError) as wrong_kind:
        continuous_training_set(project=project, template_run=dpo_run, every_judgments=5, created_by=manager)
    with pytest.raises(ValidationError) as none_needed:
        continuous_training_set(
            project=project,
            template_run=template_run(project, manager, "tiny"),
            every_judgments=0,
            created_by=manager,
        )

    assert "must read this project" in str(wrong_project.value)
    assert "must be a reward run" in str(wrong_kind.value)
    assert set(none_needed.value.message_dict) == {"every_judgments"}
    assert not ContinuousTraining.objects.exists()


@pytest.mark.django_db
def test_the_tick_waits_for_enough_new_human_judgments_and_another_managers_page_is_404() -> None:
    manager = user_with_roles(Role.MANAGER, username="cont-wait")
    project = project_with_prompts([f"Q{n}?" for n in range(4)], name="cont-wait", k=2, overlap=1)
    make_manager(project, manager)
    person = add_member(project, make_people(1, prefix="contp")[0])
    judge(tasks_of(project)[0], person, [1, 2])
    mode = continuous_training_set(
        project=project,
        template_run=template_run(project, manager, "tiny"),
        every_judgments=2,
        created_by=manager,
    )
    assert mode.judgments_at_last_start == 1

    judge(tasks_of(project)[1], person, [1, 2])
    assert continuous_training_tick() == {project.pk: "waiting"}

    other = user_with_roles(Role.MANAGER, username="cont-other")
    client = Client()
    client.force_login(other)
    assert client.get(f"/projects/{project.pk}/continuous").status_code == 404


def test_the_tick_runs_on_the_default_queue_every_minute() -> None:
    from django.conf import settings

    import training.tasks  # noqa: F401  (registers the tasks)

    entry = settings.CELERY_BEAT_SCHEDULE["continuous-training"]
    assert entry["task"] == "training.tasks.continuous_training_tick"
    assert entry["schedule"] <= 60
    assert celery_app.tasks["training.tasks.continuous_training_tick"].queue == "default"


@worker_test
@pytest.mark.timeout(900)
def test_new_judgments_start_a_cycle_whose_reward_model_re_orders_the_queue(
    celery_worker: str, tiny_model_dir: Path, csrf_client: Client
) -> None:
    # given a ranking project ordered by uncertainty, a person who ranked some of it, and continuous mode on
    manager = user_with_roles(Role.MANAGER, username="cont-cycle")
    project = project_with_prompts(
        [f"Question {n}?" for n in range(8)], name="cont-cycle", k=3, task_order=Project.TaskOrder.UNCERTAINTY
    )
    make_manager(project, manager)
    person = add_member(project, make_people(1, prefix="cycler")[0])
    tasks = tasks_of(project)
    for task in tasks[:2]:
        judge(task, person, [1, 2, 3])
    client, token = signed_in(csrf_client, manager)
    template = template_run(project, manager, str(tiny_model_dir))
    response = client.post(
        f"/projects/{project.pk}/continuous",
        {"template_run": template.pk, "every_judgments": 3, "active": "on", "csrfmiddlewaretoken": token},
    )
    assert response.status_code == 302, response.content.decode()[:2000]

    # when three more judgments arrive and the beat ticks until the cycle is over
    for task in tasks[2:5]:
        judge(task, person, [3, 2, 1])
    steps = []
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        steps.append(continuous_training_tick()[project.pk])
        if steps[-1] in ("done", "failed"):
            break
        time.sleep(0.5)
    mode = ContinuousTraining.objects.get(project=project)
    assert steps[-1] == "done", (steps[-12:], mode.last_error)

    # then the cycle built from every judgment, trained a reward model and scored the project with it
    assert steps[0] == "build started"
    assert [step for step in steps if step.endswith("started")] == [
        "build started",
        "run started",
        "scoring started",
    ]
    assert (mode.state, mode.cycles, mode.judgments_at_last_start) == (ContinuousTraining.State.IDLE, 1, 5)
    run = mode.current_run
    assert run.status == TrainingRun.Status.SUCCEEDED and run.base_model == template.base_model
    assert mode.current_build.summary["filters"]["judgments_up_to_id"] > 0
    job = mode.current_scoring
    assert job.status == ScoringJob.Status.SUCCEEDED and job.reward_model == run.reward_model
    scored = dict(CompletionScore.objects.filter(scorer=job.scorer).values_list("completion_id", "score"))
    for task in Task.objects.filter(project=project).prefetch_related("items"):
        pairs = list(itertools.combinations([scored[item.completion_id] for item in task.items.all()], 2))
        separation = sum(math.tanh((a - b) / 2) ** 2 for a, b in pairs) / len(pairs)
        assert task.uncertainty == pytest.approx(separation, abs=1e-9)

    # and with no new judgments, the next tick waits
    assert continuous_training_tick()[project.pk] == "waiting"
    page = client.get(f"/projects/{project.pk}/continuous").content.decode()
    assert f"#{run.pk}" in page
