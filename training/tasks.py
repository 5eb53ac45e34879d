"""Celery tasks of the training side: thin wrappers that take ids and call services.

One task per job kind, each naming its queue (`gpu` for training runs,
generation and scoring jobs; `default` for dataset builds and the reapers);
no routing by name pattern. Services publish the job tasks by name with the
same names and queues (`training.services.JobTask`), so they never import
this module.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_shutting_down
from django.conf import settings

from training.continuous import continuous_training_tick as continuous_training_tick_service
from training.judges import (
    JUDGE_JOB_TASK,
    JUDGE_RUN_QUEUE,
    JUDGE_RUN_TASK_NAME,
    judge_job_fail,
    judge_jobs_reap,
)
from training.judges import judge_job_execute as judge_job_execute_service
from training.judges import judge_run as judge_run_service
from training.services import (
    DATASET_BUILD_TASK,
    GENERATION_JOB_TASK,
    SCORING_JOB_TASK,
    TRAINING_RUN_TASK,
    dataset_build_fail,
    dataset_build_run,
    dataset_builds_reap,
    generation_job_fail,
    generation_jobs_reap,
    gpu_job_programs_stop,
    scoring_job_fail,
    scoring_jobs_reap,
    training_run_fail,
)
from training.services import generation_job_execute as generation_job_execute_service
from training.services import scoring_job_execute as scoring_job_execute_service
from training.services import training_run_execute as training_run_execute_service
from training.services import training_runs_reap as training_runs_reap_service


class DatasetBuildTask(Task):
    """Writes the terminal state to the row when the task itself dies (the row is the truth)."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        build_id = kwargs.get("build_id", args[0] if args else None)
        if build_id is not None:
            dataset_build_fail(build_id=int(build_id), error=f"{type(exc).__name__}: {exc}\n\n{einfo}")


@shared_task(
    name=DATASET_BUILD_TASK.name,
    queue=DATASET_BUILD_TASK.queue,
    base=DatasetBuildTask,
    ignore_result=True,
    time_limit=settings.DATASET_BUILD_TIME_LIMIT_S,
)
def dataset_build_execute(build_id: int) -> str:
    """Run a queued dataset build; a second delivery finds it no longer queued and does nothing."""
    build = dataset_build_run(build_id=int(build_id))
    return build.status if build is not None else "skipped"


class TrainingRunTask(Task):
    """Fails the run, with the reason, when the task dies outside the run process (the row is the truth)."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        run_id = kwargs.get("run_id", args[0] if args else None)
        if run_id is not None:
            training_run_fail(run_id=int(run_id), error=f"{type(exc).__name__}: {exc}")


@shared_task(
    name=TRAINING_RUN_TASK.name,
    queue=TRAINING_RUN_TASK.queue,
    base=TrainingRunTask,
    ignore_result=True,
    # Acknowledged only once the run is over; a worker lost mid-run puts the
    # message back, and the redelivery takes over only if the run's heartbeat
    # stopped (training_run_claim). The attempt cap lives on the row.
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=settings.TRAINING_SOFT_TIME_LIMIT_S,
    time_limit=settings.TRAINING_TIME_LIMIT_S,
)
def training_run_execute(run_id: int) -> None:
    """Launch the run's own process (`accelerate launch`) and wait for it. No torch in the worker."""
    training_run_execute_service(run_id=int(run_id))


@shared_task(name="training.tasks.training_runs_reap", queue="default", ignore_result=True)
def training_runs_reap() -> list[int]:
    """Runs whose heartbeat stopped go back to the queue (attempts left) or fail."""
    return training_runs_reap_service()


@shared_task(name="training.tasks.dataset_builds_reap", queue="default", ignore_result=True)
def dataset_builds_reap_task() -> list[int]:
    """Builds left `running` by a worker that died are failed, saying so."""
    return dataset_builds_reap()


class GpuJobTask(Task):
    """Fails the job's row, with the reason, when the task dies outside the job's process (the row is the truth)."""

    job_fail: Callable[..., bool]

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_id = kwargs.get("job_id", args[0] if args else None)
        if job_id is not None:
            type(self).job_fail(job_id=int(job_id), error=f"{type(exc).__name__}: {exc}")


class GenerationJobTask(GpuJobTask):
    job_fail = staticmethod(generation_job_fail)


class ScoringJobTask(GpuJobTask):
    job_fail = staticmethod(scoring_job_fail)


class JudgeJobTask(GpuJobTask):
    job_fail = staticmethod(judge_job_fail)


# As for training runs: acknowledged once the job is over; a lost worker puts
# the message back, and the redelivery takes over only if the job's heartbeat
# stopped (`training.services.jobs.job_claim`). The attempt cap lives on the row.
GPU_JOB_TASK_OPTIONS: dict[str, Any] = {
    "ignore_result": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "soft_time_limit": settings.TRAINING_SOFT_TIME_LIMIT_S,
    "time_limit": settings.TRAINING_TIME_LIMIT_S,
}


@shared_task(
    name=GENERATION_JOB_TASK.name,
    queue=GENERATION_JOB_TASK.queue,
    base=GenerationJobTask,
    **GPU_JOB_TASK_OPTIONS,
)
def generation_job_execute(job_id: int) -> None:
    """Launch the job's own process (`python -m training.generation_process`) and wait. No torch here."""
    generation_job_execute_service(job_id=int(job_id))


@shared_task(
    name=SCORING_JOB_TASK.name,
    queue=SCORING_JOB_TASK.queue,
    base=ScoringJobTask,
    **GPU_JOB_TASK_OPTIONS,
)
def scoring_job_execute(job_id: int) -> None:
    """Launch the job's own process (`python -m training.scoring_process`) and wait. No torch here."""
    scoring_job_execute_service(job_id=int(job_id))


@shared_task(
    name=JUDGE_JOB_TASK.name,
    queue=JUDGE_JOB_TASK.queue,
    base=JudgeJobTask,
    **GPU_JOB_TASK_OPTIONS,
)
def judge_job_execute(job_id: int) -> None:
    """Launch the job's own process (`python -m training.judge_process`) and wait. No torch here."""
    judge_job_execute_service(job_id=int(job_id))


# On the default queue: on `gpu` they would wait behind the jobs they are meant to watch.
@shared_task(name="training.tasks.stalled_generation_jobs_reap", queue="default", ignore_result=True)
def stalled_generation_jobs_reap() -> list[int]:
    """Generation jobs whose heartbeat stopped go back to the queue (attempts left) or fail."""
    return generation_jobs_reap()


@shared_task(name="training.tasks.stalled_scoring_jobs_reap", queue="default", ignore_result=True)
def stalled_scoring_jobs_reap() -> list[int]:
    """Scoring jobs whose heartbeat stopped go back to the queue (attempts left) or fail."""
    return scoring_jobs_reap()


@shared_task(name="training.tasks.stalled_judge_jobs_reap", queue="default", ignore_result=True)
def stalled_judge_jobs_reap() -> list[int]:
    """Language-model judges' jobs whose heartbeat stopped go back to the queue (attempts left) or fail."""
    return judge_jobs_reap()


@shared_task(name=JUDGE_RUN_TASK_NAME, queue=JUDGE_RUN_QUEUE, ignore_result=True)
def judge_run(judge_id: int) -> str:
    """A model judge ranks the tasks it may take, from its stored scores or verdicts (training.judges)."""
    return judge_run_service(judge_id=int(judge_id))


@shared_task(name="training.tasks.continuous_training_tick", queue="default", ignore_result=True)
def continuous_training_tick() -> dict[int, str]:
    """Move every project in continuous mode one step (training.continuous); on the beat, every minute."""
    return continuous_training_tick_service()


@worker_shutting_down.connect
def gpu_jobs_stop_on_shutdown(**kwargs: Any) -> None:
    """A worker shutting down asks its jobs' programs to save what they have and go back to the queue.

    Without it, a warm shutdown waits for a run to its end, and whatever
    stops the worker meanwhile (a deploy's timeout, SIGKILL) loses the work
    since the last checkpoint and an attempt.
    """
    stopped = gpu_job_programs_stop(ancestor=os.getpid())
    if stopped:
        logging.getLogger(__name__).warning("worker shutting down: asked job processes %s to stop", stopped)
