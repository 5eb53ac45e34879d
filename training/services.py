"""Writes on the training side. Views, the admin, the API and tasks call these.

Dataset builds move queued → running → succeeded | failed, each step a
compare-and-set on the row, so a task delivered twice runs the build once.
Training runs move queued → running → succeeded | failed | cancelled the same
way (see the section below).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Count, F, Q
from django.db.models.functions import Least
from django.utils import timezone

from annotation.models import Completion, CompletionScore, Policy, Project, Prompt
from annotation.roles import Role
from annotation.selectors import projects_for_user
from annotation.services import (
    ab_session_open,
    labeler_reliability_record,
    tasks_create_for_project,
    tasks_uncertainty_refresh,
)
from config.celery import app as celery_app
from config.storage import storage_path_resolve, storage_path_stored
from training.models import (
    BestOfN,
    DatasetBuild,
    GenerationJob,
    GpuJob,
    RewardModel,
    ScoringJob,
    TrainingRun,
    TrainingRunMetric,
)
from training.placement import DeviceLease, devices_held
from training.selectors import BUILD_OPTION_FIELDS, dataset_build_dir, reward_models_for_user

logger = logging.getLogger(__name__)

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


class DatasetBuildInvalid(ValueError):
    """The options do not make a build; `errors` maps a field to what is wrong with it."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{name}: {message}" for name, message in errors.items()))
        self.errors = errors


def _validation_errors(error: ValidationError) -> dict[str, str]:
    if hasattr(error, "error_dict"):
        return {
            name: " ".join(m for e in errors for m in e.messages) for name, errors in error.error_dict.items()
        }
    return {"__all__": " ".join(error.messages)}


@transaction.atomic
def dataset_build_create(
    *,
    created_by: AbstractBaseUser,
    name: str,
    projects: Iterable[Project],
    labelers: Iterable[AbstractBaseUser] = (),
    date_from: date | None = None,
    date_to: date | None = None,
    min_gold_accuracy: float | None = None,
    exclude_flagged: bool = False,
    aggregation: str = DatasetBuild.Aggregation.EVERY_VOTE,
    agreement_threshold: float = 0.5,
    ties: str = DatasetBuild.Ties.DROP,
    margin: str = DatasetBuild.Margin.NONE,
    format: str = DatasetBuild.Format.STANDARD,
    test_fraction: float = 0.1,
    seed: int = 0,
    near_duplicate_threshold: float = 0.6,
) -> DatasetBuild:
    """Save a build and queue it on the `default` queue once the transaction commits.

    The creator must manage every project of the build (the same rule that
    decides who may see it afterwards). Raises DatasetBuildInvalid.
    """
    # A build that cannot be queued would sit in `queued` for ever: refuse up front.
    broker_check()
    projects = list(projects)
    errors: dict[str, str] = {}
    if not projects:
        errors["projects"] = "choose at least one project"
    else:
        managed = set(projects_for_user(user=created_by, role=Role.MANAGER).values_list("pk", flat=True))
        if any(project.pk not in managed for project in projects):
            errors["projects"] = "you can build datasets only from projects you manage"
    build = DatasetBuild(
        name=name.strip(),
        created_by=created_by,
        date_from=date_from,
        date_to=date_to,
        min_gold_accuracy=min_gold_accuracy,
        exclude_flagged=exclude_flagged,
        aggregation=aggregation,
        agreement_threshold=agreement_threshold,
        ties=ties,
        margin=margin,
        format=format,
        test_fraction=test_fraction,
        seed=seed,
        near_duplicate_threshold=near_duplicate_threshold,
    )
    try:
        build.full_clean(exclude=["created_by"])
    except ValidationError as error:
        errors.update(_validation_errors(error))
    if errors:
        raise DatasetBuildInvalid(errors)
    build.save()
    build.projects.set(projects)
    build.labelers.set(list(labelers))
    dataset_build_enqueue(build=build)
    return build


def dataset_build_copy(*, build: DatasetBuild, created_by: AbstractBaseUser, name: str = "") -> DatasetBuild:
    """A new build with the same projects, filters and options (e.g. to rebuild after new judgments)."""
    return dataset_build_create(
        created_by=created_by,
        name=name or f"{build.name} (rebuild)"[:200],
        projects=build.projects.all(),
        labelers=build.labelers.all(),
        **{field: getattr(build, field) for field in BUILD_OPTION_FIELDS},
    )


def dataset_build_enqueue(*, build: DatasetBuild) -> None:
    """Send the build to a worker after the current transaction commits (`dataset_build_publish`)."""
    build_id = build.pk
    transaction.on_commit(lambda: dataset_build_publish(build_id=build_id))


def dataset_build_publish(*, build_id: int) -> bool:
    """Publish the build's task on the default queue; a build that cannot be queued is failed, saying why.

    The broker is checked before the build is made, but it can go away
    between that check and the commit; a build nobody will ever run must not
    sit in `queued`.
    """
    return _task_publish(
        DATASET_BUILD_TASK,
        build_id,
        fail=lambda error: dataset_build_fail(build_id=build_id, error=error, from_statuses=("queued",)),
    )


def dataset_build_progress(*, build_id: int, progress: float) -> None:
    """Record how far a running build is (0–1); a build no longer running is left alone."""
    DatasetBuild.objects.filter(pk=build_id, status=DatasetBuild.Status.RUNNING).update(
        progress=min(max(float(progress), 0.0), 1.0)
    )


def dataset_build_fail(
    *, build_id: int, error: str, from_statuses: tuple[str, ...] = ("running", "queued")
) -> bool:
    """Mark a build failed with the error (compare-and-set from the given statuses); False if it was not in one."""
    for status in from_statuses:
        changed = DatasetBuild.objects.filter(pk=build_id, status=status).update(
            status=DatasetBuild.Status.FAILED, error=error[-ERROR_MAX_CHARS:], finished_at=timezone.now()
        )
        if changed == 1:
            return True
    return False


def dataset_build_run(*, build_id: int) -> DatasetBuild | None:
    """Run a queued build to its end; what a worker does with the task.

    1. Compare-and-set queued → running: a second delivery of the task, or a
       build already started elsewhere, changes nothing and returns None.
    2. Write the files (`training.builds`), moving the progress on the row.
    3. Compare-and-set running → succeeded with counts, summary and hash; on
       any error, running → failed with the error text. No folder is left by
       a failed build.
    """
    started = DatasetBuild.objects.filter(pk=build_id, status=DatasetBuild.Status.QUEUED).update(
        status=DatasetBuild.Status.RUNNING, started_at=timezone.now(), progress=0.0, error=""
    )
    if started != 1:
        logger.info("dataset build %s is not queued; nothing to do", build_id)
        return None
    build = DatasetBuild.objects.get(pk=build_id)
    try:
        # Imported here: it needs numpy, pyarrow and datasets, which the web process never loads.
        from training.builds import dataset_build_write

        result = dataset_build_write(
            build=build, progress=lambda share: dataset_build_progress(build_id=build_id, progress=share)
        )
    except Exception as error:
        logger.exception("dataset build %s failed", build_id)
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        dataset_build_fail(build_id=build_id, error=f"{detail}\n\n{traceback.format_exc()}")
        build.refresh_from_db()
        return build
    finished = DatasetBuild.objects.filter(pk=build_id, status=DatasetBuild.Status.RUNNING).update(
        status=DatasetBuild.Status.SUCCEEDED,
        progress=1.0,
        counts=result.counts,
        summary=result.summary,
        content_hash=result.content_hash,
        finished_at=timezone.now(),
    )
    if finished != 1:
        # Someone marked it failed meanwhile (a reaper, an admin): the row wins; drop the files.
        shutil.rmtree(dataset_build_dir(build_id=build_id), ignore_errors=True)
    elif (result.summary.get("dawid_skene") or {}).get("labelers"):
        # The dashboards show each labeler's reliability as this build estimated it.
        labeler_reliability_record(
            project_ids=list(build.projects.values_list("pk", flat=True)),
            labelers=result.summary["dawid_skene"]["labelers"],
            source=f"Dawid–Skene, dataset build {build_id}",
        )
    build.refresh_from_db()
    return build


def dataset_build_delete(*, build: DatasetBuild) -> None:
    """Delete the row and its files."""
    folder = dataset_build_dir(build_id=build.pk)
    build.delete()
    shutil.rmtree(folder, ignore_errors=True)


# --- training runs ------------------------------------------------------------
#
# The run's row is the source of truth. Every transition is a compare-and-set
# on the status (and, where it matters, on the heartbeat), so a redelivered
# Celery message, a reaper and a finishing process can never both win.


class QueueUnavailable(Exception):
    """The broker (Redis) does not answer; nothing was created."""


def broker_check() -> None:
    from config.health import broker_reachable

    if not broker_reachable():
        raise QueueUnavailable(
            "The job queue (Redis) cannot be reached, so the run was not created. "
            "Check that Redis is running and REDIS_URL points at it, then try again."
        )


def training_run_files(*, build: DatasetBuild) -> dict[str, str | None]:
    """The dataset files a run reads: TRL pairs (train, test) and grouped K-wise rows (train, test)."""
    folder = dataset_build_dir(build_id=build.pk)

    def present(path: Path) -> str | None:
        return str(path) if path.exists() and path.stat().st_size else None

    return {
        "train_file": str(folder / "pairs" / "train.jsonl"),
        "test_file": present(folder / "pairs" / "test.jsonl"),
        "grouped_train_file": present(folder / "grouped" / "train.jsonl"),
        "grouped_test_file": present(folder / "grouped" / "test.jsonl"),
    }


def training_run_spec(*, run: TrainingRun) -> Any:
    """The RunSpec for this run (validated: a bad hyper-parameter raises ValueError naming it)."""
    from training.runner import RunSpec

    return RunSpec.with_defaults(
        kind=run.kind,
        peft=run.peft,
        run_id=run.pk or 0,
        base_model=storage_path_resolve(run.base_model),
        output_dir=str(run.output_path)
        if run.output_dir
        else str(Path(settings.ARTIFACTS_DIR) / "runs" / "pending"),
        attempt=run.attempts,
        trainer=run.trainer,
        # The grouped trainer reads margins from the ranks the way the build chose to.
        grouped_margin=run.dataset_build.margin,
        **training_run_files(build=run.dataset_build),
        **run.hyperparameters,
    )


def training_run_create(
    *,
    dataset_build: DatasetBuild,
    kind: str,
    base_model: str,
    created_by: AbstractBaseUser | None,
    peft: str = "lora",
    hyperparameters: dict[str, Any] | None = None,
    name: str = "",
    gpus: int = 1,
    distributed: str = TrainingRun.Distributed.DDP,
    trainer: str = TrainingRun.Trainer.GROUPED,
) -> TrainingRun:
    """Create a queued run and enqueue it once the transaction commits.

    Checks the broker first, so an unreachable queue leaves nothing behind,
    and validates the hyper-parameters as the run process will (ValidationError).
    """
    if dataset_build.status != DatasetBuild.Status.SUCCEEDED:
        raise ValidationError({"dataset_build": "the dataset build has not succeeded yet"})
    if gpus > settings.TRAINING_MAX_GPUS:
        raise ValidationError(
            {
                "gpus": f"at most {settings.TRAINING_MAX_GPUS}: no GPU worker owns more "
                f"(TRAINING_MAX_GPUS); asked for {gpus}"
            }
        )
    run = TrainingRun(
        name=name or f"{kind} on {dataset_build.name or f'build {dataset_build.pk}'}",
        kind=kind,
        dataset_build=dataset_build,
        base_model=storage_path_stored(base_model),
        peft=peft,
        trainer=trainer,
        hyperparameters=dict(hyperparameters or {}),
        gpus=gpus,
        distributed=distributed,
        created_by=created_by,
    )
    run.full_clean(exclude=["created_by"])
    try:
        training_run_spec(run=run)
    except (TypeError, ValueError) as error:
        raise ValidationError({"hyperparameters": str(error)}) from None
    broker_check()
    with transaction.atomic():
        run.save()
        run.output_dir = storage_path_stored(Path(settings.ARTIFACTS_DIR) / "runs" / str(run.pk))
        run.save(update_fields=["output_dir"])
        transaction.on_commit(lambda: training_run_enqueue(run_id=run.pk))
    return run


def _task_publish(task: JobTask, row_id: int, *, fail: Callable[[str], object]) -> bool:
    """Publish a job's task, by name, on its queue; when the broker refuses, `fail(error)` records why."""
    try:
        celery_app.send_task(task.name, args=(row_id,), queue=task.queue)
    except Exception as error:  # kombu raises several kinds when the broker is gone
        fail(f"could not be queued: {error}")
        return False
    return True


def training_run_enqueue(*, run_id: int) -> bool:
    """Publish the run's task on the gpu queue; a run that cannot be queued is failed, saying why."""
    return _task_publish(
        TRAINING_RUN_TASK,
        run_id,
        fail=lambda error: training_run_fail(run_id=run_id, error=error, from_statuses=("queued",)),
    )


def training_run_claim(*, run_id: int, now: datetime | None = None) -> TrainingRun | None:
    """Move the run to `running` for this delivery, or return None if another delivery owns it.

    The GPU jobs' claim (`_gpu_job_claim`): a queued run is claimed by
    compare-and-set, a running one only when its heartbeat stopped, and each
    claim is one attempt more; the attempt number fences every later write.
    """
    return cast("TrainingRun | None", _gpu_job_claim(TrainingRun, job_id=run_id, now=now))


# accelerate's configuration for each multi-GPU strategy, shipped with the code.
ACCELERATE_CONFIG_DIR = Path(__file__).resolve().parent / "accelerate"


def training_run_accelerate_config(*, distributed: str) -> Path:
    """The shipped `accelerate launch --config_file` of a multi-GPU strategy (ddp, fsdp, deepspeed_zero2/3)."""
    return ACCELERATE_CONFIG_DIR / f"{TrainingRun.Distributed(distributed).value}.yaml"


def training_run_command(*, run: TrainingRun, spec_path: Path) -> list[str]:
    """`accelerate launch` of the run process: one process per GPU (or CPU process where there is none).

    Several processes share the work as the run's strategy says (the shipped
    configuration files: torch.distributed with NCCL on GPUs, gloo on CPUs).
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    if run.gpus > 1:
        command += ["--config_file", str(training_run_accelerate_config(distributed=run.distributed))]
    if not run.distributed.startswith("deepspeed") or run.gpus == 1:
        # DeepSpeed takes its precision from its own file, and refuses it twice.
        command += ["--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "--num_processes", str(run.gpus)]
    return [*command, "-m", "training.run_process", str(spec_path)]


def training_run_execute(*, run_id: int) -> None:
    """Run one delivery of the run's task: claim it, launch its process group, wait, clean up after it.

    The process records success, cancellation and its own errors, each
    fenced by its attempt. If any process of the group dies without the run
    recording an outcome (killed, out of memory), the whole group is killed
    and the run goes back to `queued` while attempts remain, to resume from
    its newest complete checkpoint, or fails with the reason
    (`_gpu_job_process_run`). The run's GPUs are held before the claim
    (`_gpu_job_devices`): a run waiting for cards stays queued.
    """
    row = TrainingRun.objects.filter(pk=run_id).values("gpus").first()
    if row is None:
        return
    with _gpu_job_devices(TrainingRun, job_id=run_id, gpus=row["gpus"], what="run") as lease:
        if lease is not None:
            _training_run_launch(run_id=run_id, lease=lease)


def _training_run_launch(*, run_id: int, lease: DeviceLease) -> None:
    run = training_run_claim(run_id=run_id)
    if run is None:
        return
    attempt = run.attempts
    try:
        spec = training_run_spec(run=run)
        output = run.output_path
        output.mkdir(parents=True, exist_ok=True)
        spec_path = output / f"spec-attempt-{attempt}.json"
        spec.to_json(spec_path)
    except Exception as error:
        training_run_fail(run_id=run_id, error=f"{type(error).__name__}: {error}", attempt=attempt)
        return
    _gpu_job_process_run(
        TrainingRun,
        job_id=run_id,
        attempt=attempt,
        command=training_run_command(run=run, spec_path=spec_path),
        lease=lease,
        log_path=output / f"process-attempt-{attempt}.log",
        what="run",
        retry_note="retrying from the last checkpoint",
        enqueue=lambda queued_id: training_run_enqueue(run_id=queued_id),
    )


def _file_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def training_run_started(*, run_id: int, attempt: int, total_steps: int, log_tail: str) -> bool:
    """Record the steps the attempt will train; False if the run is no longer this attempt's."""
    rows = _gpu_job_owned(TrainingRun, job_id=run_id, attempt=attempt)
    return rows.update(total_steps=total_steps, log_tail=log_tail, heartbeat_at=timezone.now()) == 1


@transaction.atomic
def training_run_progress(
    *, run_id: int, attempt: int, step: int, total_steps: int, metrics: dict[str, float], log_tail: str
) -> bool:
    """Record a step and its metrics; False (and nothing written) if the run is no longer this attempt's."""
    step = min(step, total_steps) if total_steps else step
    moved = _gpu_job_owned(TrainingRun, job_id=run_id, attempt=attempt).update(
        step=step, total_steps=max(total_steps, step), log_tail=log_tail, heartbeat_at=timezone.now()
    )
    if moved != 1:
        return False
    if metrics:
        TrainingRunMetric.objects.create(run_id=run_id, step=step, values=metrics)
    return True


def training_run_heartbeat(*, run_id: int, attempt: int, log_tail: str | None = None) -> bool:
    """Say the attempt is alive (and what it printed last); False if the run is no longer this attempt's."""
    fields: dict[str, Any] = {"heartbeat_at": timezone.now()}
    if log_tail is not None:
        fields["log_tail"] = log_tail
    return _gpu_job_owned(TrainingRun, job_id=run_id, attempt=attempt).update(**fields) == 1


def training_run_stop_reason(*, run_id: int, attempt: int) -> str | None:
    """Why the attempt should stop at its next step: "cancel" (asked to), "lost" (no longer its run), or None."""
    return _gpu_job_stop_reason(TrainingRun, job_id=run_id, attempt=attempt)


def training_run_mark_cancelled(*, run_id: int, attempt: int) -> bool:
    """The attempt stopped because a cancel was asked for: running → cancelled (never without the ask)."""
    return _gpu_job_mark_cancelled(TrainingRun, job_id=run_id, attempt=attempt)


def training_run_requeue_stopped(*, run_id: int, attempt: int, reason: str) -> bool:
    """The attempt stopped on a signal with a checkpoint saved: back to `queued`, the attempt given back.

    A cancel asked for meanwhile wins: the run is cancelled instead. False if
    the run is no longer this attempt's.
    """
    return _gpu_job_requeue(
        TrainingRun,
        job_id=run_id,
        attempt=attempt,
        reason=reason,
        give_back=True,
        enqueue=lambda queued_id: training_run_enqueue(run_id=queued_id),
    )


@transaction.atomic
def training_run_finish(*, run_id: int, attempt: int, result: Any) -> bool:
    """Record the attempt's trained result and register what it made (a RewardModel or a Policy).

    False, with nothing registered, if the run is no longer this attempt's:
    a stale attempt's weights are never the run's result.
    """
    now = timezone.now()
    run = _gpu_job_owned(TrainingRun, job_id=run_id, attempt=attempt).select_for_update().first()
    if run is None:
        return False
    run.status = TrainingRun.Status.SUCCEEDED
    run.step = run.total_steps = max(run.total_steps, result.steps)
    if run.kind == TrainingRun.Kind.REWARD:
        RewardModel.objects.create(
            name=f"rm-{run.pk}",
            run=run,
            base_model=run.base_model,
            path=storage_path_stored(result.final_dir),
            metrics=result.metrics,
        )
    else:
        run.policy = Policy.objects.create(
            name=f"dpo-{run.pk}",
            kind=Policy.Kind.MODEL,
            base_model=run.base_model,
            adapter=storage_path_stored(result.final_dir) if run.peft != TrainingRun.Peft.FULL else "",
            generation_settings={},
        )
        if run.peft == TrainingRun.Peft.FULL:
            run.policy.base_model = storage_path_stored(result.final_dir)
            run.policy.save(update_fields=["base_model"])
    run.metrics = result.metrics
    run.heartbeat_at = run.finished_at = now
    run.save()
    return True


def training_run_fail(
    *,
    run_id: int,
    error: str,
    from_statuses: tuple[str, ...] = ("queued", "running"),
    attempt: int | None = None,
) -> bool:
    """Fail the run (compare-and-set from the given statuses, and this attempt if given), keeping the reason."""
    return _gpu_job_fail(
        TrainingRun, job_id=run_id, error=error, from_statuses=from_statuses, attempt=attempt
    )


def training_run_cancel(*, run: TrainingRun) -> TrainingRun:
    """A queued run is cancelled at once; a running one is asked to stop at its next step."""
    _gpu_job_cancel(TrainingRun, job_id=run.pk)
    run.refresh_from_db()
    return run


def training_runs_reap(*, now: datetime | None = None) -> list[int]:
    """Runs whose heartbeat stopped: back to the queue while attempts remain, else failed. Returns their ids."""
    return _gpu_jobs_reap(
        TrainingRun,
        retry_note="retrying from the last checkpoint",
        enqueue=lambda run_id: training_run_enqueue(run_id=run_id),
        now=now,
    )


def dataset_builds_reap(*, now: datetime | None = None) -> list[int]:
    """Fail builds still `running` past the build time limit: their worker died mid-build.

    A build streams at tens of thousands of rows a second, so the limit
    (DATASET_BUILD_TIME_LIMIT_S, the task's own hard limit too) is far beyond
    any healthy build; the row then says what happened instead of spinning.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.DATASET_BUILD_TIME_LIMIT_S)
    stuck = list(
        DatasetBuild.objects.filter(status=DatasetBuild.Status.RUNNING, started_at__lt=cutoff).values_list(
            "pk", flat=True
        )
    )
    limit = settings.DATASET_BUILD_TIME_LIMIT_S
    return [
        build_id
        for build_id in stuck
        if dataset_build_fail(
            build_id=build_id,
            error=f"the build did not finish within {limit} s (its worker probably stopped); rebuild it",
        )
    ]


# --- GPU jobs: the lifecycle training runs, generation and scoring jobs share ---
#
# A GPU job's row (TrainingRun, GenerationJob, ScoringJob) is the source of
# truth. The Celery task claims the row (compare-and-set; each claim is one
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

JobModel = type[GpuJob] | type[TrainingRun]

# The environment variable that marks every process of one attempt (see `_job_processes`).
JOB_MARK_ENV = "RANKWISE_JOB_MARK"
# How long a job told to stop (SIGTERM) has to save a checkpoint before it is killed.
JOB_STOP_GRACE_S = 60.0
# How long killed processes may take to vanish; a GPU process in the driver can be slow to die.
JOB_KILL_WAIT_S = 60.0


def _attempts_left() -> Q:
    """Rows that failed fewer attempts than the cap (attempts given back do not count)."""
    return Q(attempts__lt=F("attempts_given_back") + settings.TRAINING_MAX_ATTEMPTS)


def _has_attempts_left(job: GpuJob | TrainingRun) -> bool:
    return job.attempts - job.attempts_given_back < settings.TRAINING_MAX_ATTEMPTS


def _gpu_job_fail(
    model: JobModel,
    *,
    job_id: int,
    error: str,
    from_statuses: tuple[str, ...] = ("queued", "running"),
    attempt: int | None = None,
) -> bool:
    """Fail the job (compare-and-set from the given statuses, and this attempt if given), keeping the reason."""
    rows = model.objects.filter(pk=job_id, status__in=from_statuses)
    if attempt is not None:
        rows = rows.filter(attempts=attempt)
    changed = rows.update(
        status=model.Status.FAILED, error=error[-ERROR_MAX_CHARS:], finished_at=timezone.now()
    )
    return changed == 1


def _gpu_job_claim(model: JobModel, *, job_id: int, now: datetime | None = None) -> Any:
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
        if job is not None and job.status == model.Status.QUEUED and not _has_attempts_left(job):
            _gpu_job_fail(
                model,
                job_id=job_id,
                error=f"gave up after {job.attempts - job.attempts_given_back} attempts",
                from_statuses=("queued",),
            )
        return None
    return model.objects.get(pk=job_id)


def _gpu_job_owned(model: JobModel, *, job_id: int, attempt: int) -> Any:
    """The job's row while it is running this attempt (empty otherwise): the fence of every write."""
    return model.objects.filter(pk=job_id, status=model.Status.RUNNING, attempts=attempt)


def _gpu_job_heartbeat(model: JobModel, *, job_id: int, attempt: int) -> bool:
    """Say the attempt is alive; False if the job is no longer this attempt's."""
    return _gpu_job_owned(model, job_id=job_id, attempt=attempt).update(heartbeat_at=timezone.now()) == 1


def _gpu_job_stop_reason(model: JobModel, *, job_id: int, attempt: int) -> str | None:
    """Why the attempt should stop between batches: "cancel" (asked to), "lost" (no longer its job), or None."""
    row = model.objects.filter(pk=job_id).values("status", "attempts", "cancel_requested").first()
    if row is None or row["status"] != model.Status.RUNNING or row["attempts"] != attempt:
        return "lost"
    return "cancel" if row["cancel_requested"] else None


def _gpu_job_mark_cancelled(model: JobModel, *, job_id: int, attempt: int) -> bool:
    """The attempt stopped because a cancel was asked for: running → cancelled (only if one was)."""
    now = timezone.now()
    rows = _gpu_job_owned(model, job_id=job_id, attempt=attempt).filter(cancel_requested=True)
    return rows.update(status=model.Status.CANCELLED, heartbeat_at=now, finished_at=now) == 1


def _gpu_job_requeue(
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
    if _gpu_job_mark_cancelled(model, job_id=job_id, attempt=attempt):
        return True
    fields: dict[str, Any] = {"status": model.Status.QUEUED, "error": reason[-ERROR_MAX_CHARS:]}
    if give_back:
        fields["attempts_given_back"] = F("attempts_given_back") + 1
    if (
        _gpu_job_owned(model, job_id=job_id, attempt=attempt).filter(cancel_requested=False).update(**fields)
        != 1
    ):
        return False
    transaction.on_commit(lambda: enqueue(job_id))
    return True


def _gpu_job_cancel(model: JobModel, *, job_id: int) -> None:
    """A queued job is cancelled at once; a running one is asked to stop (its process checks between batches)."""
    now = timezone.now()
    model.objects.filter(pk=job_id, status=model.Status.QUEUED).update(
        status=model.Status.CANCELLED, cancel_requested=True, finished_at=now
    )
    model.objects.filter(pk=job_id, status=model.Status.RUNNING).update(cancel_requested=True)


def _gpu_jobs_reap(
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
        if _has_attempts_left(job) and not job.cancel_requested:
            if same.update(status=model.Status.QUEUED, error=f"heartbeat stopped; {retry_note}"):
                transaction.on_commit(lambda job_id=job.pk: enqueue(job_id))
                reaped.append(job.pk)
        elif same.update(
            status=model.Status.FAILED,
            error=f"heartbeat stopped at {job.heartbeat_at:%Y-%m-%d %H:%M:%S} and no attempts remain",
            finished_at=now,
        ):
            reaped.append(job.pk)
    return reaped


def _gpu_job_claimable(model: JobModel, *, job_id: int) -> bool:
    """Whether a delivery could still claim the job: queued (not cancelled), or running with a stopped heartbeat."""
    stale = timezone.now() - timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S)
    return model.objects.filter(
        Q(status=model.Status.QUEUED) | Q(status=model.Status.RUNNING, heartbeat_at__lt=stale),
        pk=job_id,
        cancel_requested=False,
    ).exists()


@contextlib.contextmanager
def _gpu_job_devices(model: JobModel, *, job_id: int, gpus: int, what: str) -> Iterator[DeviceLease | None]:
    """Hold `gpus` of this worker's cards for the job (training.placement), before it is claimed.

    The job stays queued while it waits for busy cards, so the reaper leaves
    it alone and a cancel ends the wait. Yields None when there is nothing to
    run: the job went elsewhere, was cancelled, or asks for more cards than
    this worker owns (then it is failed, saying so).
    """
    owned = list(settings.WORKER_GPUS)
    if owned and gpus > len(owned):
        _gpu_job_fail(
            model,
            job_id=job_id,
            error=f"the {what} asks for {gpus} GPUs but its worker owns {len(owned)} "
            f"(RANKWISE_GPUS={','.join(owned)}); ask for at most the GPUs each worker owns (TRAINING_MAX_GPUS)",
            from_statuses=("queued",),
        )
        yield None
        return

    waited = []

    def keep_waiting() -> bool:
        claimable = _gpu_job_claimable(model, job_id=job_id)
        if claimable and not waited:
            logger.info("%s %s waits for %s free GPUs of %s", what, job_id, gpus, ",".join(owned))
            waited.append(True)
        return claimable

    with devices_held(
        count=gpus, owned=owned, lock_dir=Path(settings.GPU_LOCK_DIR), keep_waiting=keep_waiting
    ) as lease:
        yield lease


def _job_processes(mark: str) -> list[int]:
    """The live processes of one attempt: every one carries its mark in its environment.

    The process group alone does not reach them all: torch's elastic launcher
    (`accelerate launch` with several processes) starts each trainer in a
    session of its own, and a process whose parent died keeps its group but
    not its parent. Reads /proc (Linux, where GPU workers run); elsewhere the
    process group is all there is.
    """
    marker = f"{JOB_MARK_ENV}={mark}\0".encode()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                # A zombie's environment reads empty: it is dead already.
                if marker in environ.read():
                    found.append(int(entry))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def _process_parent(pid: int) -> int:
    """The parent of `pid` (0 when unknown), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (command) state ppid ...": the command may hold spaces and parentheses.
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def gpu_job_programs_stop(*, ancestor: int) -> list[int]:
    """SIGTERM the job programs (run, generation and scoring processes) started under process `ancestor`.

    What a worker does when it begins a warm shutdown: a Celery worker waits
    for its running tasks, which wait for their runs, possibly for hours. A
    run process told to stop saves a checkpoint and puts its run back in the
    queue with its attempt given back. Launchers (`accelerate launch`) are
    left alone: one that dies first would take its trainer down before the
    checkpoint; they end when their trainers do. Returns the pids signalled.
    """
    try:
        entries = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []
    signalled = []
    for pid in entries:
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if f"{JOB_MARK_ENV}=".encode() not in environ.read():
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"accelerate.commands.launch" in cmdline.read():
                    continue
        except OSError:
            continue
        parent, depth = _process_parent(pid), 0
        while parent not in (0, 1, ancestor) and depth < 64:
            parent, depth = _process_parent(parent), depth + 1
        if parent == ancestor:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
                signalled.append(pid)
    return signalled


def _job_signal(process: subprocess.Popen[bytes], mark: str, signum: int) -> None:
    """Send `signum` to the attempt's process group and to every process carrying its mark."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)
    for pid in _job_processes(mark):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _job_gone(process: subprocess.Popen[bytes], mark: str, *, within_s: float) -> bool:
    """Wait until no process of the attempt is left; False if some still are after `within_s`."""
    deadline = time.monotonic() + within_s
    while process.poll() is None or _job_processes(mark):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _job_kill(process: subprocess.Popen[bytes], mark: str) -> bool:
    """SIGKILL every process of the attempt and wait for them; False if some would not die."""
    _job_signal(process, mark, signal.SIGKILL)
    return _job_gone(process, mark, within_s=JOB_KILL_WAIT_S)


def _job_stop(process: subprocess.Popen[bytes], mark: str) -> bool:
    """SIGTERM (save what you have and stop), then SIGKILL whatever is left after the grace period."""
    _job_signal(process, mark, signal.SIGTERM)
    return _job_gone(process, mark, within_s=JOB_STOP_GRACE_S) or _job_kill(process, mark)


def _gpu_job_process_run(
    model: JobModel,
    *,
    job_id: int,
    attempt: int,
    command: list[str],
    lease: DeviceLease,
    log_path: Path,
    what: str,
    retry_note: str,
    enqueue: Callable[[int], object],
) -> None:
    """Run a claimed attempt's process group, wait for it, and clean up after it.

    1. Start `command` in a session of its own; every process of it inherits
       a random mark of this attempt in its environment, sees exactly the
       GPUs of `lease` (`CUDA_VISIBLE_DEVICES`; none on a worker without
       GPUs), and holds their locks while it lives.
    2. Wait for the first process (the launcher). Whatever is left of the
       group then (a trainer whose launcher was killed) is killed, and waited
       for, before anything else: two processes of one job never coexist.
    3. The process records success, cancellation and its own errors. If it
       died without doing so (killed, out of memory), the job goes back to
       `queued` while attempts remain (the next attempt resumes where this one
       stopped), or fails with the reason; if SIGTERM ended it, it goes back
       to `queued` with its attempt given back.

    The task's own end (soft time limit, worker shutdown) sends the group
    SIGTERM: the job saves what it has and goes back to the queue with its
    attempt given back.
    """
    mark = secrets.token_hex(16)
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": lease.cuda_visible_devices,
        JOB_MARK_ENV: mark,
    }
    with log_path.open("ab") as log:
        log.write(f"attempt {attempt}: CUDA_VISIBLE_DEVICES={lease.cuda_visible_devices!r}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=settings.BASE_DIR,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # The launcher holds the cards too: they stay taken until it is gone.
            pass_fds=lease.lock_fds,
        )
        model.objects.filter(pk=job_id, attempts=attempt).update(process_id=process.pid)
        try:
            returncode = process.wait()
        except BaseException as interruption:
            stopped = _job_stop(process, mark)
            _gpu_job_requeue(
                model,
                job_id=job_id,
                attempt=attempt,
                reason=f"attempt {attempt}: stopped by its task's time limit or its worker's shutdown; "
                + retry_note,
                give_back=stopped,
                enqueue=enqueue,
            )
            if isinstance(interruption, Exception):
                return  # the soft time limit: handled; the task ends normally
            raise
        # Stopped from outside by SIGTERM (a service manager signals every process), the rest of
        # the group may be saving a checkpoint: it gets the grace of the task's own stop.
        gone = _job_stop(process, mark) if returncode == -signal.SIGTERM else _job_kill(process, mark)
    model.objects.filter(pk=job_id, attempts=attempt).update(log_tail=_file_tail(log_path))
    row = model.objects.filter(pk=job_id).values("status", "attempts", "cancel_requested").first()
    if row is None or row["status"] != model.Status.RUNNING or row["attempts"] != attempt:
        return  # the process recorded its own outcome, or a later attempt owns the job
    reason = f"the {what} process exited with status {returncode}"
    if returncode < 0:
        reason = f"the {what} process was killed by signal {-returncode}"
    if not gone:
        # A retry beside a process that would not die could run the job twice.
        left = ", ".join(map(str, _job_processes(mark)))
        _gpu_job_fail(
            model,
            job_id=job_id,
            error=f"{reason}; its processes {left} did not exit when killed, so it is not retried",
            attempt=attempt,
        )
        return
    if returncode == -signal.SIGTERM:
        # A stop, not a failure of the job: its attempt is given back, as it would have done itself.
        _gpu_job_requeue(
            model,
            job_id=job_id,
            attempt=attempt,
            reason=f"attempt {attempt}: {reason}; {retry_note}",
            give_back=True,
            enqueue=enqueue,
        )
        return
    job = model.objects.get(pk=job_id)
    if _has_attempts_left(job) and not row["cancel_requested"]:
        _gpu_job_requeue(
            model,
            job_id=job_id,
            attempt=attempt,
            reason=f"attempt {attempt}: {reason}; {retry_note}",
            give_back=False,
            enqueue=enqueue,
        )
        return
    _gpu_job_fail(
        model,
        job_id=job_id,
        error=f"{reason} (attempt {attempt} of {settings.TRAINING_MAX_ATTEMPTS})",
        attempt=attempt,
    )


# --- generation jobs ------------------------------------------------------------
#
# A generation job is a GPU job like a training run, and follows the same
# rules: the row is the source of truth, every transition is a
# compare-and-set, the Celery task only claims the job and waits for the
# job's own process (`python -m training.generation_process SPEC.json`),
# which writes progress, heartbeats and its outcome itself. Attempts, the
# heartbeat timeout and the time limits are the training runs' settings.
#
# Completions are written in the same transaction as the progress, one batch
# of prompts at a time, under a lock on those prompts' rows, topping each
# prompt up to `n` completions from the policy: a retry, a second delivery or
# a second job for the same policy can never give a prompt more than `n`.


def generation_job_dir(*, job_id: int) -> Path:
    """Where a job's specs and process logs go: ARTIFACTS_DIR/generation/<id>/."""
    return Path(settings.ARTIFACTS_DIR) / "generation" / str(int(job_id))


def policy_prompt_format(*, policy: Policy) -> str:
    """How a policy reads prompts: "chat", "text", or "auto" (chat prompts through the chat template).

    An explicit `prompt_format` in the policy's generation settings wins; a
    policy registered by a DPO run reads prompts as its dataset build wrote
    them; otherwise "auto" (the process also looks for the demo model's
    report, which says it was trained on chat).
    """
    explicit = (policy.generation_settings or {}).get("prompt_format")
    if explicit in ("chat", "text"):
        return str(explicit)
    run = TrainingRun.objects.filter(policy=policy).select_related("dataset_build").first()
    if run is not None:
        return "chat" if run.dataset_build.format == DatasetBuild.Format.CONVERSATIONAL else "text"
    return "auto"


def generation_job_validate(*, job: GenerationJob, created_by: AbstractBaseUser | None) -> None:
    """Raise ValidationError (by field) unless the unsaved job can run.

    The policy must be a model or a best-of-n policy (an imported source has
    nothing to generate with); a creator, when given, must manage the project.
    """
    errors: dict[str, str] = {}
    policy = job.policy
    if policy.kind == Policy.Kind.IMPORTED:
        errors["policy"] = "an imported policy has no model to generate with"
    elif policy.kind == Policy.Kind.BEST_OF_N:
        link = BestOfN.objects.filter(policy=policy).select_related("base_policy").first()
        if link is None:
            errors["policy"] = "this best-of-n policy has no base policy and reward model"
        elif not link.base_policy.base_model:
            errors["policy"] = "the best-of-n policy's base policy has no base model"
    elif not policy.base_model:
        errors["policy"] = "the policy has no base model to generate with"
    if created_by is not None:
        managed = projects_for_user(user=created_by, role=Role.MANAGER).filter(pk=job.project_id)
        if not managed.exists():
            errors["project"] = "you can generate only for projects you manage"
    try:
        job.full_clean(exclude=["created_by"])
    except ValidationError as error:
        errors.update(_validation_errors(error))
    if errors:
        raise ValidationError(errors)


def generation_job_create(
    *,
    policy: Policy,
    project: Project,
    n: int,
    created_by: AbstractBaseUser | None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
) -> GenerationJob:
    """Create a queued job that gives every prompt of `project` `n` completions from `policy`.

    Prompts that already have `n` completions from the policy are left
    alone, so calling this again for a project that grew generates only
    what is missing. When the job succeeds on a ranking project, tasks are
    made for the prompts that reached K completions.

    Raises ValidationError (by field) and QueueUnavailable (the broker does
    not answer); either way nothing is created. The job is queued once the
    caller's transaction commits.
    """
    job = GenerationJob(
        policy=policy,
        project=project,
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        created_by=created_by,
    )
    generation_job_validate(job=job, created_by=created_by)
    try:
        broker_check()
    except QueueUnavailable:
        raise QueueUnavailable(
            "The job queue (Redis) cannot be reached, so the generation job was not created. "
            "Check that Redis is running and REDIS_URL points at it, then try again."
        ) from None
    with transaction.atomic():
        job.save()
        transaction.on_commit(lambda: generation_job_enqueue(job_id=job.pk))
    return job


def generation_job_enqueue(*, job_id: int) -> bool:
    """Publish the job's task on the gpu queue; a job that cannot be queued is failed, saying why."""
    return _task_publish(
        GENERATION_JOB_TASK,
        job_id,
        fail=lambda error: generation_job_fail(job_id=job_id, error=error, from_statuses=("queued",)),
    )


def generation_job_claim(*, job_id: int, now: datetime | None = None) -> GenerationJob | None:
    """Move the job to `running` for this delivery, or return None if another delivery owns it (`_gpu_job_claim`)."""
    return cast("GenerationJob | None", _gpu_job_claim(GenerationJob, job_id=job_id, now=now))


def generation_job_spec(*, job: GenerationJob) -> Any:
    """The GenerationSpec of the job's current attempt (what its process reads)."""
    from training.generation import BestOfNSpec, GenerationSpec, PolicySpec

    policy = job.policy
    best_of_n = None
    if policy.kind == Policy.Kind.BEST_OF_N:
        link = BestOfN.objects.select_related("base_policy", "reward_model__run__dataset_build").get(
            policy=policy
        )
        best_of_n = BestOfNSpec(
            n=link.n,
            reward_model_id=link.reward_model_id,
            reward_model_path=storage_path_resolve(link.reward_model.path),
            base_policy_id=link.base_policy_id,
            conversational=link.reward_model.run.dataset_build.format == DatasetBuild.Format.CONVERSATIONAL,
        )
        policy = link.base_policy
    return GenerationSpec(
        job_id=job.pk,
        attempt=job.attempts,
        policy_id=job.policy_id,
        project_id=job.project_id,
        n=job.n,
        temperature=job.temperature,
        top_p=job.top_p,
        max_new_tokens=job.max_new_tokens,
        seed=job.seed,
        policy=PolicySpec(
            base_model=storage_path_resolve(policy.base_model),
            adapter=storage_path_resolve(policy.adapter),
            prompt_format=policy_prompt_format(policy=policy),
        ),
        best_of_n=best_of_n,
    )


def generation_job_execute(*, job_id: int) -> None:
    """Run one delivery of the job's task: claim it, launch its process, wait, clean up after a crash.

    The process records success, cancellation and its own errors. If it
    dies without doing so (killed, out of memory), the job goes back to
    `queued` while attempts remain (the next attempt skips the prompts
    already done), or fails with the reason. Its GPU is held before the claim.
    """
    with _gpu_job_devices(GenerationJob, job_id=job_id, gpus=1, what="generation job") as lease:
        if lease is not None:
            _generation_job_launch(job_id=job_id, lease=lease)


def _generation_job_launch(*, job_id: int, lease: DeviceLease) -> None:
    job = generation_job_claim(job_id=job_id)
    if job is None:
        return
    attempt = job.attempts
    try:
        spec = generation_job_spec(job=job)
    except Exception as error:  # e.g. the best-of-n link or its reward model is gone
        generation_job_fail(job_id=job_id, error=f"{type(error).__name__}: {error}", attempt=attempt)
        return
    folder = generation_job_dir(job_id=job_id)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / f"spec-attempt-{attempt}.json"
    spec.to_json(spec_path)
    _gpu_job_process_run(
        GenerationJob,
        job_id=job_id,
        attempt=attempt,
        command=[sys.executable, "-m", "training.generation_process", str(spec_path)],
        lease=lease,
        log_path=folder / f"process-attempt-{attempt}.log",
        what="generation",
        retry_note="retrying the prompts not done yet",
        enqueue=lambda queued_id: generation_job_enqueue(job_id=queued_id),
    )


def _owned(*, job_id: int, attempt: int) -> Any:
    """The job's row while it is running this attempt (empty otherwise)."""
    return _gpu_job_owned(GenerationJob, job_id=job_id, attempt=attempt)


def generation_job_started(*, job_id: int, attempt: int, prompts_total: int, prompts_done: int) -> bool:
    """Record the prompt counts an attempt found; False if the job is no longer this attempt's."""
    return (
        _owned(job_id=job_id, attempt=attempt).update(
            prompts_total=prompts_total,
            prompts_done=min(prompts_done, prompts_total),
            heartbeat_at=timezone.now(),
        )
        == 1
    )


def generation_job_heartbeat(*, job_id: int, attempt: int) -> bool:
    """Say the attempt is alive; False if the job is no longer this attempt's."""
    return _gpu_job_heartbeat(GenerationJob, job_id=job_id, attempt=attempt)


def generation_job_stop_reason(*, job_id: int, attempt: int) -> str | None:
    """Why the attempt should stop between batches: "cancel" (asked to), "lost" (no longer its job), or None."""
    return _gpu_job_stop_reason(GenerationJob, job_id=job_id, attempt=attempt)


@transaction.atomic
def generation_job_write_batch(
    *, job_id: int, attempt: int, completions: dict[int, list[tuple[str, dict[str, Any]]]]
) -> int | None:
    """Store a batch's completions (prompt id -> [(text, generation settings)]) and move the progress.

    1. Lock the job's row (still running this attempt, or nothing is
       written and None is returned), then the batch's prompts, in id order.
    2. Per prompt, keep only as many new completions (in order) as it lacks
       of `n` from the policy now: another attempt may have written some.
    3. Insert them and move `prompts_done` in the same transaction.

    Returns the number of completions written.
    """
    job = (
        _owned(job_id=job_id, attempt=attempt)
        .select_for_update()
        .only("pk", "policy_id", "project_id", "n")
        .first()
    )
    if job is None:
        return None
    prompt_ids = list(
        Prompt.objects.select_for_update(no_key=True)
        .filter(pk__in=list(completions), project_id=job.project_id)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    have = dict(
        Completion.objects.filter(prompt_id__in=prompt_ids, policy_id=job.policy_id)
        .values("prompt_id")
        .annotate(count=Count("pk"))
        .values_list("prompt_id", "count")
    )
    rows: list[Completion] = []
    done = 0
    for prompt_id in prompt_ids:
        existing = have.get(prompt_id, 0)
        new = completions[prompt_id][: max(job.n - existing, 0)]
        rows += [
            Completion(prompt_id=prompt_id, policy_id=job.policy_id, text=text, generation_settings=settings_)
            for text, settings_ in new
        ]
        # Every prompt of a batch lacked completions when the attempt began.
        done += existing + len(new) >= job.n
    Completion.objects.bulk_create(rows)
    GenerationJob.objects.filter(pk=job_id).update(
        prompts_done=Least(F("prompts_done") + done, F("prompts_total")),
        completions_written=F("completions_written") + len(rows),
        heartbeat_at=timezone.now(),
    )
    return len(rows)


@transaction.atomic
def generation_job_finish(*, job_id: int, attempt: int) -> bool:
    """Mark the attempt's job succeeded; make the tasks its completions allow (a ranking project's, or an A/B session's pairs once it has every output).

    False (and nothing changed) if the job is no longer this attempt's.
    """
    now = timezone.now()
    finished = _owned(job_id=job_id, attempt=attempt).update(
        status=GenerationJob.Status.SUCCEEDED,
        prompts_done=F("prompts_total"),
        heartbeat_at=now,
        finished_at=now,
    )
    if finished != 1:
        return False
    job = GenerationJob.objects.select_related("project").get(pk=job_id)
    if job.project.kind == Project.Kind.RANKING:
        made = tasks_create_for_project(project=job.project)
        GenerationJob.objects.filter(pk=job_id).update(tasks_created=made)
    elif ab_session_open(project=job.project):
        # The last of an A/B session's outputs: its pairs are made now.
        GenerationJob.objects.filter(pk=job_id).update(tasks_created=job.project.tasks.count())
    return True


def generation_job_mark_cancelled(*, job_id: int, attempt: int) -> bool:
    """The attempt stopped because a cancel was asked for: running → cancelled."""
    return _gpu_job_mark_cancelled(GenerationJob, job_id=job_id, attempt=attempt)


def generation_job_fail(
    *,
    job_id: int,
    error: str,
    from_statuses: tuple[str, ...] = ("queued", "running"),
    attempt: int | None = None,
) -> bool:
    """Fail the job (compare-and-set from the given statuses, and this attempt if given), keeping the reason."""
    return _gpu_job_fail(
        GenerationJob, job_id=job_id, error=error, from_statuses=from_statuses, attempt=attempt
    )


def generation_job_cancel(*, job: GenerationJob) -> GenerationJob:
    """A queued job is cancelled at once; a running one stops after its current batch.

    Completions already written stay (they are whole: a batch is one transaction).
    """
    _gpu_job_cancel(GenerationJob, job_id=job.pk)
    job.refresh_from_db()
    return job


def generation_jobs_reap(*, now: datetime | None = None) -> list[int]:
    """Jobs whose heartbeat stopped: back to the queue while attempts remain, else failed. Returns their ids."""
    return _gpu_jobs_reap(
        GenerationJob,
        retry_note="retrying the prompts not done yet",
        enqueue=lambda job_id: generation_job_enqueue(job_id=job_id),
        now=now,
    )


@transaction.atomic
def best_of_n_policy_create(
    *, base_policy: Policy, reward_model: RewardModel, n: int, name: str = ""
) -> Policy:
    """A policy that samples `n` completions from `base_policy` and keeps the one `reward_model` scores highest.

    Raises ValidationError when the base policy cannot generate (imported, or
    itself best-of-n), n is outside 2–64, or the name is taken.
    """
    errors: dict[str, str] = {}
    if base_policy.kind != Policy.Kind.MODEL or not base_policy.base_model:
        errors["base_policy"] = "the base policy must be a model policy with a base model"
    if not 2 <= int(n) <= 64:
        errors["n"] = "best-of-n samples from 2 to 64 candidates"
    name = (name or f"best-of-{n} {base_policy.name} by {reward_model.name}")[:200]
    if Policy.objects.filter(name=name).exists():
        errors["name"] = f"a policy named {name!r} already exists"
    if errors:
        raise ValidationError(errors)
    policy = Policy.objects.create(
        name=name,
        kind=Policy.Kind.BEST_OF_N,
        base_model=base_policy.base_model,
        adapter=base_policy.adapter,
        generation_settings={
            "best_of_n": {"n": int(n), "base_policy": base_policy.pk, "reward_model": reward_model.pk}
        },
    )
    BestOfN.objects.create(policy=policy, base_policy=base_policy, reward_model=reward_model, n=int(n))
    return policy


# --- scoring jobs ---------------------------------------------------------------
#
# A reward model scores every completion of a blind A/B session, so the
# session's results can say how often it agrees with the votes. It is a GPU
# job with the generation jobs' lifecycle (the `_gpu_job_*` helpers above);
# its process is `python -m training.scoring_process SPEC.json`.
#
# Scores are annotation.CompletionScore rows labelled with the job's scorer:
# the results page, on the human side, reads them without importing this app.
# Each batch's scores are written with the progress in one transaction, as an
# upsert on (completion, scorer): a retried attempt or a later job with the
# same reward model rewrites the same numbers, never a second row.

SCORER_MAX_CHARS = 300
SCORE_NOT_CREATED = (
    "The job queue (Redis) cannot be reached, so the scoring job was not created. "
    "Check that Redis is running and REDIS_URL points at it, then try again."
)


def reward_model_scorer_label(*, reward_model: RewardModel) -> str:
    """The label a reward model's scores carry on the annotation side (and on the results page)."""
    return f"reward model: {reward_model.name}"[:SCORER_MAX_CHARS]


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
    return _task_publish(
        SCORING_JOB_TASK,
        job_id,
        fail=lambda error: scoring_job_fail(job_id=job_id, error=error, from_statuses=("queued",)),
    )


def scoring_job_claim(*, job_id: int, now: datetime | None = None) -> ScoringJob | None:
    """Move the job to `running` for this delivery, or return None if another delivery owns it (`_gpu_job_claim`)."""
    return cast("ScoringJob | None", _gpu_job_claim(ScoringJob, job_id=job_id, now=now))


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
    with _gpu_job_devices(ScoringJob, job_id=job_id, gpus=1, what="scoring job") as lease:
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
    _gpu_job_process_run(
        ScoringJob,
        job_id=job_id,
        attempt=attempt,
        command=[sys.executable, "-m", "training.scoring_process", str(spec_path)],
        lease=lease,
        log_path=folder / f"process-attempt-{attempt}.log",
        what="scoring",
        retry_note="retrying the completions not scored yet",
        enqueue=lambda queued_id: scoring_job_enqueue(job_id=queued_id),
    )


def scoring_job_started(*, job_id: int, attempt: int, completions_total: int, completions_done: int) -> bool:
    """Record the counts an attempt found; False if the job is no longer this attempt's."""
    rows = _gpu_job_owned(ScoringJob, job_id=job_id, attempt=attempt)
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
    return _gpu_job_heartbeat(ScoringJob, job_id=job_id, attempt=attempt)


def scoring_job_stop_reason(*, job_id: int, attempt: int) -> str | None:
    """Why the attempt should stop between batches: "cancel" (asked to), "lost" (no longer its job), or None."""
    return _gpu_job_stop_reason(ScoringJob, job_id=job_id, attempt=attempt)


@transaction.atomic
def scoring_job_write_batch(*, job_id: int, attempt: int, scores: dict[int, float]) -> int | None:
    """Store a batch's scores (completion id -> score) and move the progress, in one transaction.

    Only completions of the job's session are written. Returns how many, or
    None (nothing written) when the job is no longer this attempt's. A score
    that is not a finite number raises ValueError: a broken model must fail
    the job, not put NaN into the results.
    """
    job = (
        _gpu_job_owned(ScoringJob, job_id=job_id, attempt=attempt)
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

    On a ranking project the new scores become the tasks' uncertainty in the
    same transaction, so the queue's uncertainty order follows the newest
    reward model from the moment the job reads as succeeded.
    """
    now = timezone.now()
    rows = _gpu_job_owned(ScoringJob, job_id=job_id, attempt=attempt)
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
        job = ScoringJob.objects.select_related("project").get(pk=job_id)
        if job.project.kind == Project.Kind.RANKING:
            tasks_uncertainty_refresh(project=job.project, scorer=job.scorer)
    return finished


def scoring_job_mark_cancelled(*, job_id: int, attempt: int) -> bool:
    """The attempt stopped because a cancel was asked for: running → cancelled."""
    return _gpu_job_mark_cancelled(ScoringJob, job_id=job_id, attempt=attempt)


def scoring_job_fail(
    *,
    job_id: int,
    error: str,
    from_statuses: tuple[str, ...] = ("queued", "running"),
    attempt: int | None = None,
) -> bool:
    """Fail the job (compare-and-set from the given statuses, and this attempt if given), keeping the reason."""
    return _gpu_job_fail(ScoringJob, job_id=job_id, error=error, from_statuses=from_statuses, attempt=attempt)


def scoring_job_cancel(*, job: ScoringJob) -> ScoringJob:
    """A queued job is cancelled at once; a running one stops after its current batch (scores written stay)."""
    _gpu_job_cancel(ScoringJob, job_id=job.pk)
    job.refresh_from_db()
    return job


def scoring_jobs_reap(*, now: datetime | None = None) -> list[int]:
    """Jobs whose heartbeat stopped: back to the queue while attempts remain, else failed. Returns their ids."""
    return _gpu_jobs_reap(
        ScoringJob,
        retry_note="retrying the completions not scored yet",
        enqueue=lambda job_id: scoring_job_enqueue(job_id=job_id),
        now=now,
    )
