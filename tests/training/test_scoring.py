"""Reward models score A/B sessions on the gpu queue; the results say how often they agree with the votes.

The worker test runs the whole path (scoring page → service → Celery →
`training.scoring_process`); the others call the services, the pages, or
the process's loop in this process, which is the same code without the
start-up cost.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import AbstractUser
from django.core.exceptions import ValidationError
from django.test import Client

from annotation.models import Comparison, Completion, CompletionScore, Policy, Project
from annotation.roles import Role
from annotation.selectors import assignment_items_in_display_order
from annotation.services import JudgmentInput, ab_session_create, assignment_claim_next, judgment_submit
from config.celery import app as celery_app
from tests.annotation.conftest import add_member
from tests.annotation.test_ab import source_prompts
from tests.factories import user_with_roles
from tests.training.child_here import run_child_here
from tests.training.test_builds_support import make_manager, project_with_prompts
from tests.training.test_generation import reward_model_dir  # noqa: F401  (a session fixture)
from training.models import DatasetBuild, RewardModel, ScoringJob, TrainingRun
from training.scoring_process import scoring_job_run
from training.services import (
    QueueUnavailable,
    reward_model_scorer_label,
    scoring_job_claim,
    scoring_job_create,
    scoring_job_spec,
    scoring_jobs_reap,
)
from training.services.child_events import ScoringEvents, scoring_work

JOB_TIMEOUT_S = 120
OUTCOMES = ("left", "right", "left", "tie", "both_bad")

worker_test = pytest.mark.django_db(transaction=True)


# --- helpers ----------------------------------------------------------------------


def ab_session(
    manager: AbstractUser, *, prompts: int = len(OUTCOMES), name: str = "blind scoring"
) -> Project:
    policies = [
        Policy.objects.create(name=f"{name}-sft", kind=Policy.Kind.IMPORTED),
        Policy.objects.create(name=f"{name}-dpo", kind=Policy.Kind.IMPORTED),
    ]
    return ab_session_create(
        name=name,
        policies=policies,
        prompts=source_prompts(prompts, policies),
        votes_per_pair=1,
        created_by=manager,
    )


def vote(project: Project, outcomes: tuple[str, ...] = OUTCOMES) -> AbstractUser:
    """An evaluator answers one pair per outcome: the left side, the right side, a tie, or both bad."""
    evaluator = add_member(project, user_with_roles(Role.EVALUATOR, username="scored-eve"), Role.EVALUATOR)
    for number, outcome in enumerate(outcomes):
        assignment = assignment_claim_next(project=project, user=evaluator)
        assert assignment is not None
        left, right = (
            str(item.completion.uid) for item in assignment_items_in_display_order(assignment=assignment)
        )
        ranks = {
            "left": {left: 1, right: 2},
            "right": {left: 2, right: 1},
            "tie": {left: 1, right: 1},
            "both_bad": {},
        }[outcome]
        answer = JudgmentInput(ranks=ranks, none_acceptable=outcome == "both_bad", client_token=f"v{number}")
        judgment_submit(assignment=assignment, user=evaluator, answer=answer)
    return evaluator


def reward_model_of(project: Project, path: Path | str, name: str = "rm-tiny") -> RewardModel:
    """A reward model whose run's dataset build reads `project` (so the project's manager may use it)."""
    build = DatasetBuild.objects.create(name=f"{name} data", status=DatasetBuild.Status.SUCCEEDED)
    build.projects.add(project)
    run = TrainingRun.objects.create(
        name=name, kind="reward", dataset_build=build, base_model="tiny", status="succeeded", peft="full"
    )
    return RewardModel.objects.create(name=name, run=run, base_model="tiny", path=str(path))


def wait_for(job: ScoringJob, timeout: float = JOB_TIMEOUT_S) -> ScoringJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.status in ScoringJob.TERMINAL:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job.pk} still {job.status} after {timeout} s: {job.error}\n{job.log_tail}")


def signed_in(client: Client, user: AbstractUser) -> tuple[Client, str]:
    """The client signed in as `user`, and the CSRF token a page of theirs set."""
    client.force_login(user)
    client.get("/")
    return client, client.cookies["csrftoken"].value


def scoring_url(project: Project) -> str:
    return f"/ab-sessions/{project.pk}/scoring"


@pytest.fixture
def manager(db: None) -> AbstractUser:
    return user_with_roles(Role.MANAGER, username="scoring-host")


@pytest.fixture
def no_publish(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    published: list[int] = []
    monkeypatch.setattr(
        "training.services.scoring.scoring_job_enqueue", lambda *, job_id: published.append(job_id)
    )
    return published


# --- through the worker -------------------------------------------------------------


@worker_test
def test_a_manager_attaches_a_reward_model_and_the_results_show_how_often_it_agrees(
    celery_worker: str,
    reward_model_dir: Path,  # noqa: F811
    csrf_client: Client,
) -> None:
    # given an A/B session of five prompts with five votes (3 decisive, a tie, "both bad")
    manager = user_with_roles(Role.MANAGER, username="scoring-host")
    project = ab_session(manager)
    vote(project)
    reward_model = reward_model_of(project, reward_model_dir)
    client, token = signed_in(csrf_client, manager)

    # when the manager attaches the reward model on the session's scoring page
    response = client.post(
        scoring_url(project), {"reward_model": reward_model.pk, "csrfmiddlewaretoken": token}
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    job = wait_for(ScoringJob.objects.get())

    # then the job scored every completion of the session once, in one attempt
    assert job.status == ScoringJob.Status.SUCCEEDED, job.error + job.log_tail
    assert (job.project, job.reward_model, job.attempts) == (project, reward_model, 1)
    completions = set(Completion.objects.filter(prompt__project=project).values_list("pk", flat=True))
    assert (job.completions_done, job.completions_total) == (len(completions), len(completions)) == (10, 10)
    scores = CompletionScore.objects.filter(scorer="reward model: rm-tiny")
    assert sorted(scores.values_list("completion_id", flat=True)) == sorted(completions)

    # and the results page shows how often those scores agree with the decisive votes
    by_completion = dict(scores.values_list("completion_id", "score"))
    decisive = Comparison.objects.filter(project=project, is_tie=False)
    agreeing = sum(by_completion[c.chosen_id] > by_completion[c.rejected_id] for c in decisive)
    results = client.get(f"/manage/projects/{project.pk}/results")
    assert results.status_code == 200
    (row,) = results.context["scorers"]
    assert (row["scorer"], row["votes"], row["agree"]) == ("reward model: rm-tiny", 3, agreeing)
    assert (row["human_ties"], row["both_bad"], row["scored"]) == (1, 1, 10)
    page = results.content.decode()
    assert "reward model: rm-tiny" in page
    assert f"{round(100 * agreeing / 3)}%" in page
    assert "10 / 10" in page

    # and the scoring page says the job succeeded and points back to the results
    status = client.get(f"{scoring_url(project)}/status").json()
    assert (status["status"], status["step"], status["total_steps"], status["terminal"]) == (
        "succeeded",
        10,
        10,
        True,
    )


# --- the process's loop, here -------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_retry_scores_only_what_is_missing_with_the_reward_models_own_numbers(
    manager: AbstractUser,
    reward_model_dir: Path,  # noqa: F811
    no_publish: list[int],
) -> None:
    from training.prompts import completion_render, prompt_render
    from training.scoring import reward_model_load, reward_scores

    # given a session whose first completion already has a score from an earlier attempt
    project = ab_session(manager, prompts=3)
    reward_model = reward_model_of(project, reward_model_dir)
    job = scoring_job_create(project=project, reward_model=reward_model, created_by=manager)
    completions = list(
        Completion.objects.filter(prompt__project=project).select_related("prompt").order_by("pk")
    )
    CompletionScore.objects.create(completion=completions[0], scorer=job.scorer, score=42.0)

    # when an attempt runs, two completions a batch
    claimed = scoring_job_claim(job_id=job.pk)
    assert claimed is not None
    spec = dataclasses.replace(scoring_job_spec(job=claimed), completions_per_batch=2)
    work = scoring_work(project_id=spec.project_id, scorer=spec.scorer)
    events = ScoringEvents(job_id=job.pk, attempt=claimed.attempts)
    assert run_child_here(events, scoring_job_run, spec, work) == "succeeded"

    # then it left the earlier score alone and wrote the rest, one row each
    job.refresh_from_db()
    assert (job.status, job.completions_done, job.completions_total) == ("succeeded", 6, 6)
    stored = dict(CompletionScore.objects.filter(scorer=job.scorer).values_list("completion_id", "score"))
    assert len(stored) == 6 and stored[completions[0].pk] == 42.0

    # and each score is the reward model's own reward for the prompt and completion
    tokenizer, model = reward_model_load(str(reward_model_dir))
    expected = reward_scores(
        tokenizer,
        model,
        [
            prompt_render(text=c.prompt.text, messages=c.prompt.messages, conversational=False)
            for c in completions
        ],
        [completion_render(c.text, conversational=False) for c in completions],
    )
    for completion, value in list(zip(completions, expected, strict=True))[1:]:
        assert stored[completion.pk] == pytest.approx(value, rel=1e-4, abs=1e-5)


@pytest.mark.django_db(transaction=True)
def test_a_cancelled_job_stops_before_its_next_batch(
    manager: AbstractUser,
    reward_model_dir: Path,  # noqa: F811
    no_publish: list[int],
) -> None:
    project = ab_session(manager, prompts=2)
    job = scoring_job_create(
        project=project, reward_model=reward_model_of(project, reward_model_dir), created_by=manager
    )
    claimed = scoring_job_claim(job_id=job.pk)
    assert claimed is not None
    ScoringJob.objects.filter(pk=job.pk).update(cancel_requested=True)

    spec = scoring_job_spec(job=claimed)
    work = scoring_work(project_id=spec.project_id, scorer=spec.scorer)
    events = ScoringEvents(job_id=job.pk, attempt=claimed.attempts)
    # the supervisor saw the cancel and created the stop file
    assert run_child_here(events, scoring_job_run, spec, work, cancel=True) == "cancelled"
    job.refresh_from_db()
    assert job.status == ScoringJob.Status.CANCELLED
    assert not CompletionScore.objects.exists()


# --- who may start it -----------------------------------------------------------------


@pytest.mark.django_db
def test_another_projects_manager_gets_404_and_starts_nothing(
    manager: AbstractUser, csrf_client: Client, no_publish: list[int]
) -> None:
    project = ab_session(manager, prompts=1)
    reward_model = reward_model_of(project, "/nowhere")
    elsewhere = project_with_prompts(["Another question?"], name="elsewhere", k=2)
    stranger = make_manager(elsewhere, user_with_roles(Role.MANAGER, username="other-host"))
    client, token = signed_in(csrf_client, stranger)

    assert client.get(scoring_url(project)).status_code == 404
    assert client.get(f"{scoring_url(project)}/status").status_code == 404
    posted = client.post(
        scoring_url(project), {"reward_model": reward_model.pk, "csrfmiddlewaretoken": token}
    )
    assert posted.status_code == 404
    assert not ScoringJob.objects.exists()
    assert no_publish == []


@pytest.mark.django_db
@pytest.mark.parametrize("role", [Role.LABELER, Role.EVALUATOR])
def test_a_labeler_or_an_evaluator_of_the_session_cannot_start_scoring(
    manager: AbstractUser, csrf_client: Client, no_publish: list[int], role: str
) -> None:
    project = ab_session(manager, prompts=1)
    reward_model = reward_model_of(project, "/nowhere")
    member = add_member(project, user_with_roles(role, username=f"member-{role}"), role)
    client, token = signed_in(csrf_client, member)

    assert client.get(scoring_url(project)).status_code == 403
    posted = client.post(
        scoring_url(project), {"reward_model": reward_model.pk, "csrfmiddlewaretoken": token}
    )
    assert posted.status_code == 403
    with pytest.raises(ValidationError) as refused:
        scoring_job_create(project=project, reward_model=reward_model, created_by=member)
    assert "project" in refused.value.message_dict
    assert not ScoringJob.objects.exists()


@pytest.mark.django_db
def test_projects_are_scored_only_with_reward_models_the_manager_may_see(
    manager: AbstractUser, csrf_client: Client, no_publish: list[int]
) -> None:
    ranking = project_with_prompts(["Rank these?"], name="ranking", k=2)
    make_manager(ranking, manager)
    project = ab_session(manager, prompts=1)
    elsewhere = project_with_prompts(["Someone else's?"], name="theirs", k=2)
    theirs = reward_model_of(elsewhere, "/nowhere", name="rm-theirs")
    client, token = signed_in(csrf_client, manager)

    # a ranking project may be scored too (its queue's uncertainty order), by its manager
    assert client.get(scoring_url(ranking)).status_code == 200
    page = client.post(scoring_url(project), {"reward_model": theirs.pk, "csrfmiddlewaretoken": token})
    assert page.status_code == 200 and "reward_model" in page.context["form"].errors
    with pytest.raises(ValidationError) as refused:
        scoring_job_create(project=project, reward_model=theirs, created_by=manager)
    assert "reward_model" in refused.value.message_dict
    assert not ScoringJob.objects.exists()


@pytest.mark.django_db
def test_a_reward_model_already_scoring_a_session_is_not_queued_twice(
    manager: AbstractUser, no_publish: list[int], django_capture_on_commit_callbacks: Any
) -> None:
    project = ab_session(manager, prompts=1)
    reward_model = reward_model_of(project, "/nowhere")
    with django_capture_on_commit_callbacks(execute=True):
        first = scoring_job_create(project=project, reward_model=reward_model, created_by=manager)
    with pytest.raises(ValidationError, match="already scoring"):
        scoring_job_create(project=project, reward_model=reward_model, created_by=manager)
    assert no_publish == [first.pk]

    # once the first has finished, the session may be scored again
    ScoringJob.objects.filter(pk=first.pk).update(status=ScoringJob.Status.SUCCEEDED)
    again = scoring_job_create(project=project, reward_model=reward_model, created_by=manager)
    assert again.scorer == first.scorer == reward_model_scorer_label(reward_model=reward_model)


@pytest.mark.django_db
def test_an_unreachable_broker_is_refused_with_a_message_and_nothing_is_created(
    manager: AbstractUser, csrf_client: Client, monkeypatch: pytest.MonkeyPatch, no_publish: list[int]
) -> None:
    monkeypatch.setattr("config.health.broker_reachable", lambda: False)
    project = ab_session(manager, prompts=1)
    reward_model = reward_model_of(project, "/nowhere")
    client, token = signed_in(csrf_client, manager)

    page = client.post(scoring_url(project), {"reward_model": reward_model.pk, "csrfmiddlewaretoken": token})

    assert page.status_code == 503
    assert "scoring job was not created" in page.content.decode()
    with pytest.raises(QueueUnavailable, match="scoring job was not created"):
        scoring_job_create(project=project, reward_model=reward_model, created_by=manager)
    assert not ScoringJob.objects.exists()
    assert no_publish == []


@pytest.mark.django_db
def test_the_session_form_starts_scoring_once_the_session_exists(
    manager: AbstractUser, csrf_client: Client, no_publish: list[int], django_capture_on_commit_callbacks: Any
) -> None:
    policies = [Policy.objects.create(name="form-sft"), Policy.objects.create(name="form-dpo")]
    source = source_prompts(2, policies)[0].project
    make_manager(source, manager)
    reward_model = reward_model_of(source, "/nowhere")
    client, token = signed_in(csrf_client, manager)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/ab-sessions/new",
            {
                "name": "scored from the start",
                "source_project": source.pk,
                "policies": [p.pk for p in policies],
                "votes_per_pair": 1,
                "max_new_tokens": 16,
                "seed": 0,
                "reward_model": reward_model.pk,
                "csrfmiddlewaretoken": token,
            },
        )

    assert response.status_code == 302
    session = Project.objects.get(name="scored from the start")
    job = ScoringJob.objects.get()
    assert (job.project, job.reward_model, job.created_by) == (session, reward_model, manager)
    assert no_publish == [job.pk]


# --- lifecycle ----------------------------------------------------------------------------


def test_scoring_jobs_go_to_the_gpu_queue_and_their_reaper_to_the_default_queue_on_beat(
    settings: Any,
) -> None:
    import training.tasks  # noqa: F401  (registers the tasks)

    def queue_for(name: str) -> str:
        return celery_app.tasks[name].queue

    assert queue_for("training.tasks.scoring_job_execute") == "gpu"
    assert queue_for("training.tasks.stalled_scoring_jobs_reap") == "default"
    beat = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert "training.tasks.stalled_scoring_jobs_reap" in beat


@pytest.mark.django_db
def test_a_job_is_claimed_once_and_the_reaper_requeues_or_fails_a_silent_one(
    manager: AbstractUser, settings: Any, django_capture_on_commit_callbacks: Any, no_publish: list[int]
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    project = ab_session(manager, prompts=1)
    first, second = reward_model_of(project, "/a", name="rm-a"), reward_model_of(project, "/b", name="rm-b")
    retry = scoring_job_create(project=project, reward_model=first, created_by=manager)
    spent = scoring_job_create(project=project, reward_model=second, created_by=manager)
    assert scoring_job_claim(job_id=retry.pk) is not None
    assert scoring_job_claim(job_id=retry.pk) is None  # a redelivery while it runs is a no-op

    old = timezone.now() - timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S + 5)
    ScoringJob.objects.filter(pk=retry.pk).update(heartbeat_at=old)
    ScoringJob.objects.filter(pk=spent.pk).update(
        status="running", attempts=settings.TRAINING_MAX_ATTEMPTS, heartbeat_at=old
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert sorted(scoring_jobs_reap()) == sorted([retry.pk, spent.pk])
    retry.refresh_from_db()
    spent.refresh_from_db()
    assert (retry.status, spent.status) == ("queued", "failed")
    assert "heartbeat stopped" in retry.error and "no attempts remain" in spent.error
    assert no_publish == [retry.pk]


@worker_test
def test_a_reward_model_attached_to_a_ranking_project_orders_its_queue_by_uncertainty(
    celery_worker: str,
    reward_model_dir: Path,  # noqa: F811
    csrf_client: Client,
) -> None:
    from annotation.models import Task
    from tests.annotation.conftest import make_people

    # given a ranking project served by uncertainty, and a reward model its manager may use
    manager = user_with_roles(Role.MANAGER, username="uncertainty-host")
    project = project_with_prompts(
        [f"Question {n}?" for n in range(6)], name="uncertain", k=3, task_order=Project.TaskOrder.UNCERTAINTY
    )
    make_manager(project, manager)
    reward_model = reward_model_of(project, reward_model_dir, name="rm-order")
    client, token = signed_in(csrf_client, manager)

    # when the manager attaches it on the project's scoring page and the job runs on the worker
    response = client.post(
        scoring_url(project), {"reward_model": reward_model.pk, "csrfmiddlewaretoken": token}
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    job = wait_for(ScoringJob.objects.get(project=project))
    assert job.status == ScoringJob.Status.SUCCEEDED, job.error + job.log_tail

    # then every task holds how well the scores separate its completions over all pairs:
    # 1 − 4 × the mean of p(1 − p), p = σ(score gap), which is the mean of tanh²(gap / 2)
    scores = dict(CompletionScore.objects.filter(scorer=job.scorer).values_list("completion_id", "score"))
    expected = {}
    for task in Task.objects.filter(project=project).prefetch_related("items"):
        values = [scores[item.completion_id] for item in task.items.all()]
        pairs = list(itertools.combinations(values, 2))
        expected[task.pk] = sum(math.tanh((a - b) / 2) ** 2 for a, b in pairs) / len(pairs)
        assert task.uncertainty == pytest.approx(expected[task.pk], abs=1e-9)

    # and a labeler is served the task the reward model is least sure about
    labeler = add_member(project, make_people(1, prefix="unsure")[0])
    assignment = assignment_claim_next(project=project, user=labeler)
    assert assignment.task_id == min(expected, key=lambda pk: (expected[pk], pk))


@pytest.mark.django_db
def test_a_finished_scoring_job_orders_the_disagreement_queue_by_the_newest_reward_models() -> None:
    from datetime import timedelta

    from django.utils import timezone

    from annotation.models import Task, TaskCompletion
    from training.services.scoring import DISAGREEMENT_MODELS, scoring_job_finish, uncertainty_scorers

    # given a ranking project that four reward models scored one after the other
    project = project_with_prompts(["One?", "Two?"], name="disagreed", k=2, task_order="disagreement")
    now = timezone.now()
    jobs = []
    for number in range(4):
        model = reward_model_of(project, "/nowhere", name=f"rm-{number}")
        jobs.append(
            ScoringJob.objects.create(
                project=project,
                reward_model=model,
                scorer=reward_model_scorer_label(reward_model=model),
                status=ScoringJob.Status.SUCCEEDED if number < 3 else ScoringJob.Status.RUNNING,
                attempts=1,
                finished_at=now + timedelta(minutes=number) if number < 3 else None,
            )
        )
    first, second = Task.objects.filter(project=project).order_by("id")
    for job_index, job in enumerate(jobs):
        for task, flips in ((first, job_index % 2 == 1), (second, False)):
            low, high = TaskCompletion.objects.filter(task=task).order_by("position")
            for item, score in ((low, 1.0 if flips else 0.0), (high, 0.0 if flips else 1.0)):
                CompletionScore.objects.update_or_create(
                    completion_id=item.completion_id, scorer=job.scorer, defaults={"score": score}
                )

    # when the newest job's scorers are chosen: its own, then the newest others, at most three
    newest = jobs[-1]
    scorers = uncertainty_scorers(job=newest)

    # then the oldest model is left out
    assert scorers == [jobs[3].scorer, jobs[2].scorer, jobs[1].scorer] and DISAGREEMENT_MODELS == 3

    # and when the newest job finishes, the task the newest three split on comes first
    assert scoring_job_finish(job_id=newest.pk, attempt=1)
    first.refresh_from_db()
    second.refresh_from_db()
    # rm-3 and rm-1 flip the first task, rm-2 does not: two of three pairs of models disagree
    assert first.disagreement == pytest.approx(-2 / 3, abs=1e-2) and second.disagreement > 0
    labeler = add_member(project, user_with_roles(Role.LABELER, username="disagreement-labeler"))
    assert assignment_claim_next(project=project, user=labeler).task_id == first.pk
