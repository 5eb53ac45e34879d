"""Training runs killed or reaped mid-way, end to end: real Celery workers, real child programs, tiny
models. Each ends with the run resumed from a complete checkpoint and succeeded, never two attempts'
trainers alive at once (the process table is sampled throughout), never a result recorded by a stale
attempt, and never `cancelled` since nobody cancelled.

Beside tests/training/test_runs.py, which has kill -9 of the launcher, SIGTERM to the trainer and a
worker's warm shutdown. Here: kill -9 of the trainer, kill -9 of the worker (its child stops by itself),
a run whose model load outlasts the reaper's timeout (never reaped; and when reaped anyway, the old
attempt is killed before the new one starts), and kill -9 during a checkpoint write.
"""

# ruff: noqa: F811 (build, the fixture of test_runs, is requested by name)

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from celery.utils.nodenames import host_format
from django.db import connection
from django.utils import timezone

from tests.conftest import REPO_ROOT, _wait_for_worker, worker_database_url
from tests.training.test_runs import (  # noqa: F401 (build is a fixture)
    RUN_TIMEOUT_S,
    TINY,
    build,
    trainers_of,
    trainers_sampled,
    wait_for,
    wait_for_step,
)
from training.gpu_job_process import EXIT_ORPHANED, SLOW_START_ENV
from training.models import DatasetBuild, RewardModel, TrainingRun
from training.run_process import SLOW_CHECKPOINT_ENV
from training.services import training_runs_reap

worker_test = pytest.mark.django_db(transaction=True)
LONG = {**TINY, "max_steps": 40, "save_steps": 2}


@contextmanager
def private_worker(log_path: Path, queue: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A solo Celery worker of its own on `queue` (its task runs in the worker's own process: kill it
    and the supervisor dies with it). The retries it publishes go to the `gpu` queue."""
    environment = {**os.environ, "DATABASE_URL": worker_database_url(connection.settings_dict), **env}
    node = f"{queue}@%h"
    command = [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", queue, "--pool", "solo"]
    command += ["-n", node, "--loglevel", "INFO"]
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            command, cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_worker(worker, host_format(node), log_path)
        yield worker
    finally:
        if worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def run_on(queue: str, build: DatasetBuild, tiny_model_dir: Path, settings, **hyperparameters) -> TrainingRun:  # type: ignore[no-untyped-def]
    from training.tasks import training_run_execute

    run = TrainingRun.objects.create(
        name=queue,
        kind="reward",
        dataset_build=build,
        base_model=str(tiny_model_dir),
        hyperparameters={**LONG, **hyperparameters},
    )
    TrainingRun.objects.filter(pk=run.pk).update(
        output_dir=str(Path(settings.ARTIFACTS_DIR) / "runs" / str(run.pk))
    )
    training_run_execute.apply_async((run.pk,), queue=queue)
    run.refresh_from_db()
    return run


def log_of(run: TrainingRun, attempt: int) -> str:
    path = run.output_path / f"process-attempt-{attempt}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_until(check, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {RUN_TIMEOUT_S} s"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_resumed_alone(run: TrainingRun, samples: list[dict[int, str]], *, attempts: int) -> None:
    """Succeeded by its last attempt alone, resumed from a checkpoint, one result, never two attempts at once."""
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    assert run.attempts == attempts
    assert "resuming from checkpoint" in log_of(run, attempts)
    assert all(len(set(sample.values())) <= 1 for sample in samples), "two attempts trained at once"
    assert max(len(sample) for sample in samples) == 1
    assert RewardModel.objects.filter(run=run).count() == 1
    assert run.step == run.total_steps == 40


@worker_test
def test_kill_9_of_the_trainer_kills_its_launcher_and_the_retry_resumes_alone(
    celery_worker, build, tiny_model_dir
):
    from tests.training.test_runs import create

    # given a run training mid-way, with a checkpoint at step 2
    run = create(build, tiny_model_dir, hyperparameters=dict(LONG))
    with trainers_sampled(run) as samples:
        run = wait_for_step(run, 3)

        # when its trainer (not the launcher) is killed
        (trainer,) = trainers_of(run)
        os.kill(trainer, signal.SIGKILL)
        run = wait_for(run, TrainingRun.TERMINAL)

    # then the attempt's group was cleaned up and the retry resumed from the checkpoint, alone
    assert_resumed_alone(run, samples, attempts=2)
    assert "attempt 1:" in run.error


@worker_test
def test_kill_9_of_the_worker_stops_its_child_and_the_reaped_run_resumes_on_another_worker(
    celery_worker, build, tiny_model_dir, settings, tmp_path
):
    # given a run training on a worker whose own process supervises it, with a checkpoint at step 2
    with private_worker(tmp_path / "worker.log", "gpu-killed") as worker:
        run = run_on("gpu-killed", build, tiny_model_dir, settings)
        with trainers_sampled(run) as samples:
            run = wait_for_step(run, 3)
            (trainer,) = trainers_of(run)

            # when the worker is killed (kill -9: no shutdown of any kind)
            worker.kill()
            worker.wait()

            # then its child sees its supervisor gone and stops by itself, saving nothing
            wait_until(lambda: gone(trainer), "the orphaned trainer's exit")
            assert "the supervisor" in log_of(run, 1) and "is gone" in log_of(run, 1)
            run.refresh_from_db()
            assert (run.status, run.attempts) == ("running", 1)

            # and once the reaper sees its heartbeat stopped, the run goes to another worker, which resumes it
            later = timezone.now() + timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S + 1)
            assert training_runs_reap(now=later) == [run.pk]
            run = wait_for(run, TrainingRun.TERMINAL)

    assert_resumed_alone(run, samples, attempts=2)
    assert "heartbeat stopped" in run.error
    assert f"exited with status {EXIT_ORPHANED}" not in run.error  # nobody was left to record it


@pytest.fixture(scope="module")
def slow_worker(django_db_setup, tmp_path_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A worker whose children load slowly (6 s, heartbeating; its reaper's timeout is 10 s, so they
    heartbeat every second) and pause 60 s in the middle of writing checkpoint-6."""
    queue = "gpu-slow"
    log_path = tmp_path_factory.mktemp("slow-worker") / "worker.log"
    env = {SLOW_START_ENV: "6", SLOW_CHECKPOINT_ENV: "6:60", "TRAINING_HEARTBEAT_TIMEOUT_S": "10"}
    with private_worker(log_path, queue, **env):
        yield queue


@worker_test
def test_a_run_whose_model_load_outlasts_the_reapers_timeout_heartbeats_and_is_never_reaped(
    celery_worker, slow_worker, build, tiny_model_dir, settings
):
    # given a reaper that takes a run silent for 3 s, and a run whose model load takes 6 s
    settings.TRAINING_HEARTBEAT_TIMEOUT_S = 3
    run = run_on(slow_worker, build, tiny_model_dir, settings, max_steps=4)
    with trainers_sampled(run) as samples:
        # when the reaper looks again and again while it loads, and until it trains
        def trains() -> bool:
            assert training_runs_reap() == [], "the reaper took a run that is alive"
            run.refresh_from_db()
            return run.step >= 1 or run.status in TrainingRun.TERMINAL

        wait_until(trains, "a trained step")
        run = wait_for(run, TrainingRun.TERMINAL)

    # then the one attempt loaded, trained and recorded its result
    assert "loading the model (slowed" in log_of(run, 1)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    assert (run.attempts, run.step) == (1, 4)
    assert max(len(sample) for sample in samples) == 1
    assert RewardModel.objects.filter(run=run).count() == 1


@worker_test
def test_a_run_reaped_while_alive_is_killed_before_its_next_attempt_trains_and_records_nothing(
    celery_worker, slow_worker, build, tiny_model_dir, settings
):
    # given a run still loading its model (slowly) on one worker
    run = run_on(slow_worker, build, tiny_model_dir, settings)
    with trainers_sampled(run) as samples:
        wait_until(lambda: "loading the model (slowed" in log_of(run, 1), "the slow model load")

        # when a reaper takes it anyway (its clock far ahead), and another worker claims it
        later = timezone.now() + timedelta(hours=1)
        assert training_runs_reap(now=later) == [run.pk]
        run = wait_for(run, TrainingRun.TERMINAL)

    # then the first attempt was killed before the second trained, and only the second recorded anything
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    assert run.attempts == 2
    assert all(len(set(sample.values())) <= 1 for sample in samples), "two attempts trained at once"
    assert {spec for sample in samples for spec in sample.values()} <= {
        f"{run.output_path}/spec-attempt-1.json",
        f"{run.output_path}/spec-attempt-2.json",
    }
    assert RewardModel.objects.filter(run=run).count() == 1
    assert "saved" not in log_of(run, 1)


@worker_test
def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous_complete_checkpoint(
    celery_worker, slow_worker, build, tiny_model_dir, settings
):
    # given a run writing checkpoint-6 (paused in the middle), with checkpoint-4 complete
    run = run_on(slow_worker, build, tiny_model_dir, settings)
    with trainers_sampled(run) as samples:
        wait_until(lambda: "checkpoint-6 written, not complete yet" in log_of(run, 1), "the checkpoint write")

        # when its trainer is killed then
        (trainer,) = trainers_of(run)
        os.kill(trainer, signal.SIGKILL)
        run = wait_for(run, TrainingRun.TERMINAL)

    # then the retry passed over the half-written checkpoint and resumed from checkpoint-4
    assert_resumed_alone(run, samples, attempts=2)
    retry = log_of(run, 2)
    assert "resuming from checkpoint checkpoint-4 " in retry
    assert "an incomplete checkpoint left by a process killed while writing it" in retry
