"""Scoring jobs: a reward model scores every completion of a project (an A/B session's, or a ranking project's)."""

from __future__ import annotations

import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.db.models.functions import Least
from django.utils import timezone

from annotation.models import Completion, CompletionScore, Project
from annotation.roles import Role
from annotation.selectors import projects_for_user
from annotation.services import tasks_uncertainty_refresh
from config.storage import storage_path_resolve
from training.job_events import job_ended
from training.models import DatasetBuild, RewardModel, ScoringJob
from training.placement import DeviceLease
from training.selectors import reward_models_for_user
from training.services.child_events import ScoringEvents, scoring_work
from training.services.jobs import (
    SCORING_JOB_TASK,
    QueueUnavailable,
    broker_check,
    job_cancel,
    job_claim,
    job_fail,
    job_heartbeat,
    job_mark_cancelled,
    job_owned,
    job_stop_reason,
    jobs_reap,
    task_publish,
)
from training.services.supervisor import child_work_write, gpu_job_devices, gpu_job_process_run

# --- scoring jobs ---------------------------------------------------------------
#
# A reward model scores every completion of a blind A/B session, so the
# session's results can say how often it agrees with the votes. It is a GPU
# job with the generation jobs' lifecycle (`training.services.jobs`);
# its process is `python -m training.scoring_process SPEC.json`.
#
# Scores are annotation.CompletionScore rows labelled with the job's scorer:
# the results page, on the human side, reads them without importing this app.
# Each batch's scores are written with the progress in one transaction, as an
# upsert on (completion, scorer): a retried attempt or a later job with the
# same reward model rewrites the same numbers, never a second row.

SCORER_MAX_CHARS = 300
# Reward models whose disagreement orders a `disagreement` queue: the newest and at most two before
# it (an old model trained on few labels mostly disagrees by being wrong).
DISAGREEMENT_MODELS = 3
SCORE_NOT_CREATED = (
    "The job queue (Redis) cannot be reached, so the scoring job was not created. "
    "Check that Redis is running and REDIS_URL points at it, then try again."
)


def reward_model_scorer_label(*, reward_model: RewardModel) -> str:
    """The label a reward model's scores carry on the annotation side (and on the results page)."""
    return f"reward model: {reward_model.name}"[:SCORER_MAX_CHARS]


def uncertainty_scorers(*, job: ScoringJob) -> list[str]:
    """The scorer labels a ranking project's queue is ordered by once `job` succeeds: its own first,
    then those of the other reward models whose scoring of the project succeeded, newest first
    (at most DISAGREEMENT_MODELS in all)."""
    labels = [job.scorer]
    earlier = (
        ScoringJob.objects.filter(project_id=job.project_id, status=ScoringJob.Status.SUCCEEDED)
        .exclude(pk=job.pk)
        .order_by(F("finished_at").desc(nulls_last=True), "-pk")
        .values_list("scorer", flat=True)
    )
    for label in earlier:
        if len(labels) >= DISAGREEMENT_MODELS:
            break
        if label not in labels:
            labels.append(label)
    return labels


def scoring_job_dir(*, job_id: int) -> Path:
    """Where a job's specs and process logs go: ARTIFACTS_DIR/scoring/<id>/."""
    return Path(settings.ARTIFACTS_DIR) / "scoring" / str(int(job_id))


def scoring_job_create(
    *, project: Project, reward_model: RewardModel, created_by: AbstractBaseUser | None
) -> ScoringJob:
    """Queue a job that scores every completion of `project` with `reward_model`.

    An A/B session's scores feed the results page's agreement table; a
    ranking project's set the uncertainty its queue can be ordered by
    (annotation.services.tasks_uncertainty_refresh, when the job succeeds).
    Raises ValidationError (by field) when the creator (when given) does not
    manage the project or may not see the reward model,
    or the reward model is already scoring the session; QueueUnavailable when
    the broker does not answer. Either way nothing is created. The job is
    queued once the caller's transaction commits.
    """
    errors: dict[str, str] = {}
    if created_by is not None:
        if not projects_for_user(user=created_by, role=Role.MANAGER).filter(pk=project.pk).exists():
            errors["project"] = "you can score only sessions you manage"
        if not reward_models_for_user(user=created_by).filter(pk=reward_model.pk).exists():
            errors["reward_model"] = "you can use only reward models trained on projects you manage"
    live = ScoringJob.objects.filter(project=project, reward_model=reward_model, status__in=ScoringJob.LIVE)
    if "reward_model" not in errors and live.exists():
        errors["reward_model"] = "this reward model is already scoring this session"
    if errors:
        raise ValidationError(errors)
    try:
        broker_check()
    except QueueUnavailable:
        raise QueueUnavailable(SCORE_NOT_CREATED) from None
    try:
        with transaction.atomic():
            job = ScoringJob.objects.create(
                project=project,
                reward_model=reward_model,
                scorer=reward_model_scorer_label(reward_model=reward_model),
                created_by=created_by,
            )
            transaction.on_commit(lambda: scoring_job_enqueue(job_id=job.pk))
    except IntegrityError:  # a job made meanwhile holds the one live slot (see the model's constraint)
        raise ValidationError({"reward_model": "this reward model is already scoring this session"}) from None
    return job


def scoring_job_enqueue(*, job_id: int) -> bool:
    """Publish the job's task on the gpu queue; a job that cannot be queued is failed, saying why."""
    return task_publish(
        SCORING_JOB_TASK,
        job_id,
        fail=lambda error: scoring_job_fail(job_id=job_id, error=error, from_statuses=("queued",)),
    )


def scoring_job_claim(*, job_id: int, now: datetime | None = None) -> ScoringJob | None:
    """Move the job to `running` for this delivery, or return None if another delivery owns it (`job_claim`)."""
    return cast("ScoringJob | None", job_claim(ScoringJob, job_id=job_id, now=now))


def scoring_job_spec(*, job: ScoringJob) -> Any:
    """The ScoringSpec of the job's current attempt (what its process reads).

    The reward model reads prompts and completions the way its dataset build
    wrote them (conversational or standard), and at most the tokens it was
    trained on.
    """
    from training.scoring import ScoringSpec

    reward_model = RewardModel.objects.select_related("run__dataset_build").get(pk=job.reward_model_id)
    max_length = reward_model.run.hyperparameters.get("max_length")
    return ScoringSpec(
        job_id=job.pk,
        attempt=job.attempts,
        project_id=job.project_id,
        scorer=job.scorer,
        reward_model_path=storage_path_resolve(reward_model.path),
        conversational=reward_model.run.dataset_build.format == DatasetBuild.Format.CONVERSATIONAL,
        max_length=int(max_length) if max_length else None,
    )


def scoring_job_execute(*, job_id: int) -> None:
    """Run one delivery of the job's task: hold its GPU, claim it, launch its process, wait, clean up after a crash."""
    with gpu_job_devices(ScoringJob, job_id=job_id, gpus=1, what="scoring job") as lease:
        if lease is not None:
            _scoring_job_launch(job_id=job_id, lease=lease)


def _scoring_job_launch(*, job_id: int, lease: DeviceLease) -> None:
    job = scoring_job_claim(job_id=job_id)
    if job is None:
        return
    attempt = job.attempts
    try:
        spec = scoring_job_spec(job=job)
    except Exception as error:
        scoring_job_fail(job_id=job_id, error=f"{type(error).__name__}: {error}", attempt=attempt)
        return
    folder = scoring_job_dir(job_id=job_id)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / f"spec-attempt-{attempt}.json"
    spec.to_json(spec_path)
    work_path = child_work_write(
        folder / f"work-attempt-{attempt}.json", scoring_work(project_id=spec.project_id, scorer=spec.scorer)
    )
    gpu_job_process_run(
        ScoringJob,
        job_id=job_id,
        attempt=attempt,
        command=[sys.executable, "-m", "training.scoring_process", str(spec_path), str(work_path)],
        lease=lease,
        log_path=folder / f"process-attempt-{attempt}.log",
        what="scoring",
        retry_note="retrying the completions not scored yet",
        enqueue=lambda queued_id: scoring_job_enqueue(job_id=queued_id),
        events=ScoringEvents(job_id=job_id, attempt=attempt),
    )


def scoring_job_started(*, job_id: int, attempt: int, completions_total: int, completions_done: int) -> bool:
    """Record the counts an attempt found; False if the job is no longer this attempt's."""
    rows = job_owned(ScoringJob, job_id=job_id, attempt=attempt)
    return (
        rows.update(
            completions_total=completions_total,
            completions_done=min(completions_done, completions_total),
            heartbeat_at=timezone.now(),
        )
        == 1
    )


def scoring_job_heartbeat(*, job_id: int, attempt: int) -> bool:
    """Say the attempt is alive; False if the job is no longer this attempt's."""
    return job_heartbeat(ScoringJob, job_id=job_id, attempt=attempt)


def scoring_job_stop_reason(*, job_id: int, attempt: int) -> str | None:
    """Why the attempt should stop between batches: "cancel" (asked to), "lost" (no longer its job), or None."""
    return job_stop_reason(ScoringJob, job_id=job_id, attempt=attempt)


@transaction.atomic
def scoring_job_write_batch(*, job_id: int, attempt: int, scores: dict[int, float]) -> int | None:
    """Store a batch's scores (completion id -> score) and move the progress, in one transaction.

    Only completions of the job's session are written. Returns how many, or
    None (nothing written) when the job is no longer this attempt's. A score
    that is not a finite number raises ValueError: a broken model must fail
    the job, not put NaN into the results.
    """
    job = (
        job_owned(ScoringJob, job_id=job_id, attempt=attempt)
        .select_for_update()
        .only("pk", "project_id", "scorer")
        .first()
    )
    if job is None:
        return None
    bad = sorted(pk for pk, value in scores.items() if not math.isfinite(value))
    if bad:
        raise ValueError(f"the reward model gave no finite score for completion(s) {bad[:10]}")
    completion_ids = Completion.objects.filter(pk__in=list(scores), prompt__project_id=job.project_id)
    rows = [
        CompletionScore(completion_id=pk, scorer=job.scorer, score=float(scores[pk]))
        for pk in completion_ids.order_by("pk").values_list("pk", flat=True)
    ]
    CompletionScore.objects.bulk_create(
        rows, update_conflicts=True, unique_fields=["completion", "scorer"], update_fields=["score"]
    )
    ScoringJob.objects.filter(pk=job_id).update(
        completions_done=Least(F("completions_done") + len(rows), F("completions_total")),
        heartbeat_at=timezone.now(),
    )
    return len(rows)


@transaction.atomic
def scoring_job_finish(*, job_id: int, attempt: int) -> bool:
    """Mark the attempt's job succeeded; False (and nothing changed) if the job is no longer this attempt's.

    On a ranking project the new scores become the tasks' uncertainty (and,
    with the earlier reward models' scores, their disagreement: see
    `uncertainty_scorers`) in the same transaction, so the queue's
    uncertainty and disagreement orders follow the newest reward model from
    the moment the job reads as succeeded.
    """
    now = timezone.now()
    rows = job_owned(ScoringJob, job_id=job_id, attempt=attempt)
    finished = (
        rows.update(
            status=ScoringJob.Status.SUCCEEDED,
            completions_done=F("completions_total"),
            heartbeat_at=now,
            finished_at=now,
        )
        == 1
    )
    if finished:
        job_ended(ScoringJob, job_id=job_id)
        job = ScoringJob.objects.select_related("project").get(pk=job_id)
        if job.project.kind == Project.Kind.RANKING:
            newest, *others = uncertainty_scorers(job=job)
            tasks_uncertainty_refresh(project=job.project, scorer=newest, other_scorers=others)
            # The model judges waiting for these scores run once this commits.
            from training.judges import judges_after_scoring

            judges_after_scoring(project=job.project, reward_model=job.reward_model)
    return finished


def scoring_job_mark_cancelled(*, job_id: int, attempt: int) -> bool:
    """The attempt stopped because a cancel was asked for: running → cancelled."""
    return job_mark_cancelled(ScoringJob, job_id=job_id, attempt=attempt)


def scoring_job_fail(
    *,
    job_id: int,
    error: str,
    from_statuses: tuple[str, ...] = ("queued", "running"),
    attempt: int | None = None,
) -> bool:
    """Fail the job (compare-and-set from the given statuses, and this attempt if given), keeping the reason."""
    return job_fail(ScoringJob, job_id=job_id, error=error, from_statuses=from_statuses, attempt=attempt)


def scoring_job_cancel(*, job: ScoringJob) -> ScoringJob:
    """A queued job is cancelled at once; a running one stops after its current batch (scores written stay)."""
    job_cancel(ScoringJob, job_id=job.pk)
    job.refresh_from_db()
    return job


def scoring_jobs_reap(*, now: datetime | None = None) -> list[int]:
    """Jobs whose heartbeat stopped: back to the queue while attempts remain, else failed. Returns their ids."""
    return jobs_reap(
        ScoringJob,
        retry_note="retrying the completions not scored yet",
        enqueue=lambda job_id: scoring_job_enqueue(job_id=job_id),
        now=now,
    )
