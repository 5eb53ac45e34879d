"""The lifecycle every background job shares: publish, claim, the attempt fence, stop, requeue, fail, cancel, reap.

A job's row is the source of truth. Every transition is a compare-and-set on
the row, so a redelivered Celery message, a reaper and a finishing process can
never both win. Services publish each kind's Celery task by name on its own
queue (`JobTask`): nothing here imports `training.tasks`, which imports the
services.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from config.celery import app as celery_app
from training.job_events import job_ended
from training.models import GpuJob, Job

ERROR_MAX_CHARS = 10_000


@dataclass(frozen=True)
class JobTask:
    """A job kind's Celery task: its name and its queue. Services publish by name (they never
    import `training.tasks`, which imports them); the tasks declare these same names and queues."""

    name: str
    queue: str


DATASET_BUILD_TASK = JobTask("training.tasks.dataset_build_execute", "default")
TRAINING_RUN_TASK = JobTask("training.tasks.training_run_execute", "gpu")
GENERATION_JOB_TASK = JobTask("training.tasks.generation_job_execute", "gpu")
SCORING_JOB_TASK = JobTask("training.tasks.scoring_job_execute", "gpu")


def validation_errors(error: ValidationError) -> dict[str, str]:
    if hasattr(error, "error_dict"):
        return {
            name: " ".join(m for e in errors for m in e.messages) for name, errors in error.error_dict.items()
        }
    return {"__all__": " ".join(error.messages)}


class QueueUnavailable(Exception):
    """The broker (Redis) does not answer; nothing was created."""


def broker_check() -> None:
    from config.health import broker_reachable

    if not broker_reachable():
        raise QueueUnavailable(
            "The job queue (Redis) cannot be reached, so the run was not created. "
            "Check that Redis is running and REDIS_URL points at it, then try again."
        )


def task_publish(task: JobTask, row_id: int, *, fail: Callable[[str], object]) -> bool:
    """Publish a job's task, by name, on its queue; when the broker refuses, `fail(error)` records why."""
    try:
        celery_app.send_task(task.name, args=(row_id,), queue=task.queue)
    except Exception as error:  # kombu raises several kinds when the broker is gone
        fail(f"could not be queued: {error}")
        return False
    return True


# --- the lifecycle ------------------------------------------------------------
#
# `job_start`, `job_succeed` and `job_fail` take any kind of job (training.models.Job);
# a dataset build, which has no attempts, uses only those. The rest is the GPU
# jobs' (training.models.GpuJob). A GPU job's row (TrainingRun, GenerationJob,
# ScoringJob) is the source of truth. The Celery task claims the row (compare-and-set; each claim is one
# attempt more), starts the job's own process group and waits for it; the
# process heartbeats, writes its progress and records its outcome on the row
# through the job's own services. Every write after the claim is fenced by
# (id, attempt, running): a write from an attempt that lost the job changes
# nothing, and its process stops. The helpers below are that lifecycle,
# written once over the job's model: each has the same status values and
# bookkeeping fields (training.models.GpuJob) and a process_id.
#
# `attempts` only grows (it is the fence). An attempt stopped on purpose (a
# SIGTERM: the task's soft time limit, a worker shutting down) is given back
# in `attempts_given_back`; the cap, TRAINING_MAX_ATTEMPTS, counts the rest.

# A kind whose attempts run on a GPU worker (TrainingRun, GenerationJob, ScoringJob).
JobModel = type[GpuJob]


def _attempts_left() -> Q:
    """Rows that failed fewer attempts than the cap (attempts given back do not count)."""
    return Q(attempts__lt=F("attempts_given_back") + settings.TRAINING_MAX_ATTEMPTS)


def job_has_attempts_left(job: GpuJob) -> bool:
    return job.attempts - job.attempts_given_back < settings.TRAINING_MAX_ATTEMPTS


def job_fail(
    model: type[Job],
    *,
    job_id: int,
    error: str,
    from_statuses: tuple[str, ...] = ("queued", "running"),
    attempt: int | None = None,
) -> bool:
    """Fail the job (compare-and-set from the given statuses, and this attempt if given), keeping the reason.

    Any kind of job, dataset builds included (they have no attempts: give none).
    """
    rows = model.objects.filter(pk=job_id, status__in=from_statuses)
    if attempt is not None:
        rows = rows.filter(attempts=attempt)
    with transaction.atomic():
        changed = rows.update(
            status=model.Status.FAILED, error=error[-ERROR_MAX_CHARS:], finished_at=timezone.now()
        )
        if changed == 1:
            job_ended(model, job_id=job_id)
    return changed == 1


def job_start(model: type[Job], *, job_id: int, **fields: Any) -> bool:
    """queued → running by compare-and-set, for a kind without attempts (a dataset build), with `fields`.

    False if the job was not queued: a second delivery of its task, or a job
    started elsewhere, changes nothing.
    """
    started = model.objects.filter(pk=job_id, status=model.Status.QUEUED).update(
        status=model.Status.RUNNING, started_at=timezone.now(), error="", **fields
    )
    return started == 1


def job_succeed(model: type[Job], *, job_id: int, **fields: Any) -> bool:
    """running → succeeded by compare-and-set, with the job's results in `fields`; its end is announced.

    False if the job no longer runs (a reaper or an admin failed it meanwhile): the row wins.
    """
    with transaction.atomic():
        finished = model.objects.filter(pk=job_id, status=model.Status.RUNNING).update(
            status=model.Status.SUCCEEDED, finished_at=timezone.now(), **fields
        )
        if finished == 1:
            job_ended(model, job_id=job_id)
    return finished == 1


def job_claim(model: JobModel, *, job_id: int, now: datetime | None = None) -> Any:
    """Move the job to `running` for this delivery, or return None if another delivery owns it.

    A queued job is claimed by compare-and-set. A running job is taken over
    only when its heartbeat stopped; a live or finished job makes a
    redelivery a no-op. Each claim is a new attempt, up to the cap; a queued
    job out of attempts is failed, saying so.
    """
    now = now or timezone.now()
    claimed = model.objects.filter(
        _attempts_left(), pk=job_id, status=model.Status.QUEUED, cancel_requested=False
    ).update(status=model.Status.RUNNING, attempts=F("attempts") + 1, started_at=now, heartbeat_at=now)
    if not claimed:
        stale = now - timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S)
        claimed = model.objects.filter(
            _attempts_left(), pk=job_id, status=model.Status.RUNNING, heartbeat_at__lt=stale
        ).update(attempts=F("attempts") + 1, heartbeat_at=now)
    if not claimed:
        job = model.objects.filter(pk=job_id).first()
        if job is not None and job.status == model.Status.QUEUED and not job_has_attempts_left(job):
            job_fail(
                model,
                job_id=job_id,
                error=f"gave up after {job.attempts - job.attempts_given_back} attempts",
                from_statuses=("queued",),
            )
        return None
    return model.objects.get(pk=job_id)


def job_owned(model: JobModel, *, job_id: int, attempt: int) -> Any:
    """The job's row while it is running this attempt (empty otherwise): the fence of every write."""
    return model.objects.filter(pk=job_id, status=model.Status.RUNNING, attempts=attempt)


def job_heartbeat(model: JobModel, *, job_id: int, attempt: int) -> bool:
    """Say the attempt is alive; False if the job is no longer this attempt's."""
    return job_owned(model, job_id=job_id, attempt=attempt).update(heartbeat_at=timezone.now()) == 1


def job_stop_reason(model: JobModel, *, job_id: int, attempt: int) -> str | None:
    """Why the attempt should stop between batches: "cancel" (asked to), "lost" (no longer its job), or None."""
    row = model.objects.filter(pk=job_id).values("status", "attempts", "cancel_requested").first()
    if row is None or row["status"] != model.Status.RUNNING or row["attempts"] != attempt:
        return "lost"
    return "cancel" if row["cancel_requested"] else None


def job_mark_cancelled(model: JobModel, *, job_id: int, attempt: int) -> bool:
    """The attempt stopped because a cancel was asked for: running → cancelled (only if one was)."""
    now = timezone.now()
    rows = job_owned(model, job_id=job_id, attempt=attempt).filter(cancel_requested=True)
    with transaction.atomic():
        cancelled = rows.update(status=model.Status.CANCELLED, heartbeat_at=now, finished_at=now) == 1
        if cancelled:
            job_ended(model, job_id=job_id)
    return cancelled


def job_requeue(
    model: JobModel,
    *,
    job_id: int,
    attempt: int,
    reason: str,
    give_back: bool,
    enqueue: Callable[[int], object],
) -> bool:
    """Put the attempt's job back in the queue (its attempt given back if `give_back`) and publish it.

    A job whose cancel was asked for is cancelled instead. False, and
    nothing changed, if the job is no longer this attempt's.
    """
    if job_mark_cancelled(model, job_id=job_id, attempt=attempt):
        return True
    fields: dict[str, Any] = {"status": model.Status.QUEUED, "error": reason[-ERROR_MAX_CHARS:]}
    if give_back:
        fields["attempts_given_back"] = F("attempts_given_back") + 1
    if job_owned(model, job_id=job_id, attempt=attempt).filter(cancel_requested=False).update(**fields) != 1:
        return False
    transaction.on_commit(lambda: enqueue(job_id))
    return True


def job_cancel(model: JobModel, *, job_id: int) -> None:
    """A queued job is cancelled at once; a running one is asked to stop (its process checks between batches)."""
    now = timezone.now()
    with transaction.atomic():
        if model.objects.filter(pk=job_id, status=model.Status.QUEUED).update(
            status=model.Status.CANCELLED, cancel_requested=True, finished_at=now
        ):
            job_ended(model, job_id=job_id)
    model.objects.filter(pk=job_id, status=model.Status.RUNNING).update(cancel_requested=True)


def jobs_reap(
    model: JobModel, *, retry_note: str, enqueue: Callable[[int], object], now: datetime | None = None
) -> list[int]:
    """Jobs whose heartbeat stopped: back to the queue while attempts remain, else failed. Returns their ids.

    Each move is a compare-and-set on the status and the heartbeat seen, so a
    job that heartbeats meanwhile is left alone.
    """
    now = now or timezone.now()
    stale = now - timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S)
    reaped = []
    for job in model.objects.filter(status=model.Status.RUNNING, heartbeat_at__lt=stale):
        same = model.objects.filter(pk=job.pk, status=model.Status.RUNNING, heartbeat_at=job.heartbeat_at)
        if job_has_attempts_left(job) and not job.cancel_requested:
            if same.update(status=model.Status.QUEUED, error=f"heartbeat stopped; {retry_note}"):
                transaction.on_commit(lambda job_id=job.pk: enqueue(job_id))
                reaped.append(job.pk)
        else:
            with transaction.atomic():
                if same.update(
                    status=model.Status.FAILED,
                    error=f"heartbeat stopped at {job.heartbeat_at:%Y-%m-%d %H:%M:%S} and no attempts remain",
                    finished_at=now,
                ):
                    job_ended(model, job_id=job.pk)
                    reaped.append(job.pk)
    return reaped


def job_claimable(model: JobModel, *, job_id: int) -> bool:
    """Whether a delivery could still claim the job: queued (not cancelled), or running with a stopped heartbeat."""
    stale = timezone.now() - timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S)
    return model.objects.filter(
        Q(status=model.Status.QUEUED) | Q(status=model.Status.RUNNING, heartbeat_at__lt=stale),
        pk=job_id,
        cancel_requested=False,
    ).exists()
