"""The one job lifecycle (training.services.jobs) on every kind, fast: no worker, no child, no torch.

Every transition is a compare-and-set on the row; every write after the claim
is fenced by (id, attempt, running). The child programs and their supervisor
are exercised with a fake trainer in test_run_lifecycle.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from annotation.models import Policy, Project
from config.celery import app as celery_app
from training import services
from training.models import DatasetBuild, GenerationJob, GpuJob, RewardModel, ScoringJob, TrainingRun
from training.selectors import job_status_payload
from training.services import jobs

pytestmark = pytest.mark.django_db

KINDS = ("training_run", "generation_job", "scoring_job")
NUMBERS = itertools.count()


def queued_run() -> TrainingRun:
    build = DatasetBuild.objects.create(name="b", status="succeeded")
    return TrainingRun.objects.create(name="r", kind="reward", dataset_build=build, base_model="m")


def queued_generation_job() -> GenerationJob:
    number = next(NUMBERS)
    policy = Policy.objects.create(name=f"p{number}", kind=Policy.Kind.MODEL, base_model="m")
    project = Project.objects.create(name=f"g{number}", k=2)
    return GenerationJob.objects.create(policy=policy, project=project, n=2)


def queued_scoring_job() -> ScoringJob:
    run = queued_run()
    TrainingRun.objects.filter(pk=run.pk).update(status="succeeded")
    number = next(NUMBERS)
    reward_model = RewardModel.objects.create(name=f"rm{number}", run=run, base_model="m", path="rm")
    project = Project.objects.create(name=f"s{number}", k=2, kind=Project.Kind.AB)
    return ScoringJob.objects.create(project=project, reward_model=reward_model, scorer="reward model: rm")


MAKE: dict[str, Callable[[], GpuJob | TrainingRun]] = {
    "training_run": queued_run,
    "generation_job": queued_generation_job,
    "scoring_job": queued_scoring_job,
}
ENQUEUE: dict[str, Callable[[int], bool]] = {
    "training_run": lambda pk: services.training_run_enqueue(run_id=pk),
    "generation_job": lambda pk: services.generation_job_enqueue(job_id=pk),
    "scoring_job": lambda pk: services.scoring_job_enqueue(job_id=pk),
}
KIND_OF: dict[type, str] = {
    TrainingRun: "training_run",
    GenerationJob: "generation_job",
    ScoringJob: "scoring_job",
}
REAP: dict[str, Callable[..., list[int]]] = {
    "training_run": services.training_runs_reap,
    "generation_job": services.generation_jobs_reap,
    "scoring_job": services.scoring_jobs_reap,
}


@pytest.fixture(params=KINDS)
def job(request: pytest.FixtureRequest) -> Any:
    return MAKE[request.param]()


def row(job: Any) -> Any:
    return type(job).objects.get(pk=job.pk)


def later(settings: Any) -> Any:
    """A moment after a heartbeat sent now would count as stopped."""
    return timezone.now() + timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S + 1)


# --- claim --------------------------------------------------------------------------------------


def test_a_queued_job_is_claimed_once_and_each_claim_is_one_attempt_more(job: Any) -> None:
    # when two deliveries of its task claim it
    first = jobs.job_claim(type(job), job_id=job.pk)
    second = jobs.job_claim(type(job), job_id=job.pk)

    # then the first owns attempt 1 and the second, seeing a live heartbeat, gets nothing
    assert first is not None and (first.status, first.attempts) == ("running", 1)
    assert first.started_at is not None and first.heartbeat_at is not None
    assert second is None
    assert row(job).attempts == 1


def test_a_running_job_is_taken_over_only_once_its_heartbeat_stopped(job: Any, settings: Any) -> None:
    jobs.job_claim(type(job), job_id=job.pk)

    taken = jobs.job_claim(type(job), job_id=job.pk, now=later(settings))

    assert taken is not None and (taken.status, taken.attempts) == ("running", 2)


def test_a_queued_job_out_of_attempts_is_failed_saying_so_when_claimed(job: Any, settings: Any) -> None:
    # given a job that failed every attempt it had, and one stopped on purpose (given back)
    type(job).objects.filter(pk=job.pk).update(
        attempts=settings.TRAINING_MAX_ATTEMPTS + 1, attempts_given_back=1
    )

    # then a delivery does not claim it: it is failed, saying why
    assert jobs.job_claim(type(job), job_id=job.pk) is None
    failed = row(job)
    assert failed.status == "failed"
    assert failed.error == f"gave up after {settings.TRAINING_MAX_ATTEMPTS} attempts"
    assert failed.finished_at is not None


def test_a_cancelled_job_is_never_claimed(job: Any) -> None:
    jobs.job_cancel(type(job), job_id=job.pk)

    assert jobs.job_claim(type(job), job_id=job.pk) is None
    assert row(job).status == "cancelled"
    assert not jobs.job_claimable(type(job), job_id=job.pk)


# --- the fence ----------------------------------------------------------------------------------


def test_every_write_of_a_stale_attempt_changes_nothing_and_tells_it_to_stop(job: Any, settings: Any) -> None:
    # given attempt 1 whose job was taken over by attempt 2 (its heartbeat looked stopped)
    model = type(job)
    jobs.job_claim(model, job_id=job.pk)
    jobs.job_claim(model, job_id=job.pk, now=later(settings))
    before = row(job)

    # when attempt 1 writes as if it still owned the job
    writes = [
        jobs.job_heartbeat(model, job_id=job.pk, attempt=1),
        jobs.job_owned(model, job_id=job.pk, attempt=1).exists(),
        jobs.job_mark_cancelled(model, job_id=job.pk, attempt=1),
        jobs.job_requeue(model, job_id=job.pk, attempt=1, reason="stale", give_back=True, enqueue=print),
        jobs.job_fail(model, job_id=job.pk, error="stale", attempt=1),
    ]

    # then none took, the row is attempt 2's as it was, and attempt 1 is told it lost the job
    assert writes == [False] * len(writes)
    after = row(job)
    assert (after.status, after.attempts, after.attempts_given_back, after.error) == ("running", 2, 0, "")
    assert after.heartbeat_at == before.heartbeat_at
    assert jobs.job_stop_reason(model, job_id=job.pk, attempt=1) == "lost"
    assert jobs.job_stop_reason(model, job_id=job.pk, attempt=2) is None


def test_the_attempt_that_owns_the_job_heartbeats_and_fails_it_keeping_the_errors_tail(job: Any) -> None:
    model = type(job)
    jobs.job_claim(model, job_id=job.pk)

    assert jobs.job_heartbeat(model, job_id=job.pk, attempt=1)
    assert jobs.job_fail(model, job_id=job.pk, error="x" * 20_000 + "the cause", attempt=1)

    failed = row(job)
    assert failed.status == "failed" and failed.finished_at is not None
    assert len(failed.error) == jobs.ERROR_MAX_CHARS and failed.error.endswith("the cause")
    assert jobs.job_stop_reason(model, job_id=job.pk, attempt=1) == "lost"


# --- stop, cancel, requeue ----------------------------------------------------------------------


def test_a_job_is_cancelled_only_when_someone_asked(job: Any) -> None:
    model = type(job)
    jobs.job_claim(model, job_id=job.pk)

    # an attempt that stops on its own cannot call that a cancel
    assert not jobs.job_mark_cancelled(model, job_id=job.pk, attempt=1)
    assert row(job).status == "running"

    # once a manager asks, the attempt is told at its next check and its stop is a cancel
    jobs.job_cancel(model, job_id=job.pk)
    assert jobs.job_stop_reason(model, job_id=job.pk, attempt=1) == "cancel"
    assert jobs.job_mark_cancelled(model, job_id=job.pk, attempt=1)
    cancelled = row(job)
    assert (cancelled.status, cancelled.cancel_requested) == ("cancelled", True)
    assert cancelled.finished_at is not None


def test_a_queued_job_is_cancelled_at_once(job: Any) -> None:
    jobs.job_cancel(type(job), job_id=job.pk)

    cancelled = row(job)
    assert (cancelled.status, cancelled.cancel_requested) == ("cancelled", True)
    assert cancelled.finished_at is not None


def test_a_stopped_attempt_goes_back_to_the_queue_with_its_attempt_given_back_and_is_published(
    job: Any, django_capture_on_commit_callbacks: Any
) -> None:
    model = type(job)
    jobs.job_claim(model, job_id=job.pk)
    published: list[int] = []

    with django_capture_on_commit_callbacks(execute=True):
        requeued = jobs.job_requeue(
            model,
            job_id=job.pk,
            attempt=1,
            reason="stopped by SIGTERM",
            give_back=True,
            enqueue=published.append,
        )

    assert requeued and published == [job.pk]
    back = row(job)
    assert (back.status, back.attempts, back.attempts_given_back) == ("queued", 1, 1)
    assert back.error == "stopped by SIGTERM"
    # the attempt given back does not count: the next claim is attempt 2 and within the cap
    assert jobs.job_has_attempts_left(back)
    assert jobs.job_claim(model, job_id=job.pk).attempts == 2  # type: ignore[union-attr]


def test_a_cancel_asked_for_before_a_requeue_wins(job: Any, django_capture_on_commit_callbacks: Any) -> None:
    model = type(job)
    jobs.job_claim(model, job_id=job.pk)
    jobs.job_cancel(model, job_id=job.pk)
    published: list[int] = []

    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.job_requeue(
            model, job_id=job.pk, attempt=1, reason="stopped", give_back=True, enqueue=published.append
        )

    assert row(job).status == "cancelled" and published == []


# --- a kind without attempts: dataset builds ---------------------------------------------------


def test_a_build_is_started_once_and_succeeds_only_while_it_runs() -> None:
    build = DatasetBuild.objects.create(name="b")

    # two deliveries start it once
    assert jobs.job_start(DatasetBuild, job_id=build.pk, progress=0.0)
    assert not jobs.job_start(DatasetBuild, job_id=build.pk, progress=0.0)
    assert row(build).status == "running" and row(build).started_at is not None

    # a build failed meanwhile (a reaper, an admin) is not succeeded by its late worker
    assert services.dataset_build_fail(build_id=build.pk, error="reaped")
    assert not jobs.job_succeed(DatasetBuild, job_id=build.pk, progress=1.0)
    assert (row(build).status, row(build).error, row(build).progress) == ("failed", "reaped", 0.0)


def test_a_running_build_succeeds_with_its_results() -> None:
    build = DatasetBuild.objects.create(name="b")
    jobs.job_start(DatasetBuild, job_id=build.pk, progress=0.0)

    assert jobs.job_succeed(DatasetBuild, job_id=build.pk, progress=1.0, content_hash="abc")

    done = row(build)
    assert (done.status, done.progress, done.content_hash) == ("succeeded", 1.0, "abc")
    assert done.finished_at is not None and done.is_terminal


# --- the reaper ---------------------------------------------------------------------------------


def test_the_reaper_requeues_a_silent_job_while_attempts_remain_and_leaves_a_live_one(
    django_capture_on_commit_callbacks: Any,
) -> None:
    for kind in KINDS:
        silent, live = MAKE[kind](), MAKE[kind]()
        model = type(silent)
        jobs.job_claim(model, job_id=silent.pk)
        jobs.job_claim(model, job_id=live.pk)
        model.objects.filter(pk=silent.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))

        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            reaped = REAP[kind](now=timezone.now())

        assert reaped == [silent.pk], kind
        assert len(callbacks) == 1, kind  # its task is published again once the reaper commits
        assert (row(silent).status, row(silent).error.startswith("heartbeat stopped")) == ("queued", True)
        assert row(live).status == "running", kind


def test_the_reaper_fails_a_silent_job_out_of_attempts_or_asked_to_cancel(
    job: Any, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    model = type(job)
    jobs.job_claim(model, job_id=job.pk)
    model.objects.filter(pk=job.pk).update(
        attempts=settings.TRAINING_MAX_ATTEMPTS, heartbeat_at=timezone.now() - timedelta(hours=1)
    )

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        reaped = REAP[KIND_OF[model]](now=timezone.now())

    assert job.pk in reaped and callbacks == []
    failed = row(job)
    assert failed.status == "failed" and "no attempts remain" in failed.error


def test_the_reaper_fails_a_dataset_build_running_past_its_time_limit(settings: Any) -> None:
    build = DatasetBuild.objects.create(name="stuck", status=DatasetBuild.Status.RUNNING)
    DatasetBuild.objects.filter(pk=build.pk).update(
        started_at=timezone.now() - timedelta(seconds=settings.DATASET_BUILD_TIME_LIMIT_S + 1)
    )
    fresh = DatasetBuild.objects.create(
        name="fresh", status=DatasetBuild.Status.RUNNING, started_at=timezone.now()
    )

    assert services.dataset_builds_reap() == [build.pk]
    assert row(build).status == "failed" and "did not finish within" in row(build).error
    assert row(fresh).status == "running"


# --- publishing ---------------------------------------------------------------------------------


@pytest.fixture
def broker_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Error 111 connecting to redis: Connection refused")

    monkeypatch.setattr(celery_app, "send_task", refuse)


@pytest.mark.parametrize("kind", KINDS)
def test_a_job_whose_task_cannot_be_published_is_failed_with_the_reason(kind: str, broker_gone: None) -> None:
    job = MAKE[kind]()

    assert ENQUEUE[kind](job.pk) is False

    failed = row(job)
    assert failed.status == "failed" and failed.finished_at is not None
    assert failed.error == "could not be queued: Error 111 connecting to redis: Connection refused"


def test_a_build_whose_task_cannot_be_published_is_failed_with_the_reason(broker_gone: None) -> None:
    build = DatasetBuild.objects.create(name="b")

    assert services.dataset_build_publish(build_id=build.pk) is False

    assert (row(build).status, row(build).error) == (
        "failed",
        "could not be queued: Error 111 connecting to redis: Connection refused",
    )


@pytest.mark.parametrize("kind", KINDS)
def test_a_publish_failure_never_fails_a_job_that_already_left_the_queue(
    kind: str, broker_gone: None
) -> None:
    job = MAKE[kind]()
    jobs.job_claim(type(job), job_id=job.pk)

    assert ENQUEUE[kind](job.pk) is False
    assert row(job).status == "running"


# --- one status shape ---------------------------------------------------------------------------


def test_every_kind_answers_its_status_in_the_same_shape() -> None:
    build = DatasetBuild.objects.create(name="b", progress=0.5, status=DatasetBuild.Status.RUNNING)
    payloads = [job_status_payload(build)] + [job_status_payload(MAKE[kind]()) for kind in KINDS]

    assert len({tuple(payload) for payload in payloads}) == 1
    assert [payload["kind"] for payload in payloads] == ["dataset_build", *KINDS]
    assert payloads[0]["progress"] == 0.5 and payloads[0]["terminal"] is False
    assert all(payload["status"] == "queued" for payload in payloads[1:])
    assert job_status_payload(None)["terminal"] is True
