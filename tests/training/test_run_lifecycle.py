"""A training run's lifecycle without torch: the attempt fence, attempts given back, the reaper, and
the run's child program with a fake trainer under its supervisor (a slow model load, a lost attempt,
SIGTERM, a cancel, the task's time limit)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from annotation.roles import Role
from tests.factories import user_with_roles
from training.models import DatasetBuild, RewardModel, TrainingRun, TrainingRunMetric
from training.runner import RunResult
from training.services import (
    training_run_cancel,
    training_run_claim,
    training_run_execute,
    training_run_fail,
    training_run_finish,
    training_run_heartbeat,
    training_run_mark_cancelled,
    training_run_progress,
    training_run_requeue_stopped,
    training_run_started,
    training_run_stop_reason,
    training_runs_reap,
)

WAIT_S = 60


@pytest.fixture
def run(db: None) -> TrainingRun:
    """A queued reward run (its dataset build is never read here)."""
    build = DatasetBuild.objects.create(
        name="b", created_by=user_with_roles(Role.MANAGER, username="mgr"), status="succeeded"
    )
    return TrainingRun.objects.create(
        name="r", kind="reward", dataset_build=build, base_model="m", trainer="trl"
    )


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    published: list[int] = []
    monkeypatch.setattr(
        "training.services.runs.training_run_enqueue", lambda *, run_id: published.append(run_id)
    )
    return published


def succeeded(final_dir: str = "/models/rm", steps: int = 4) -> RunResult:
    return RunResult(status="succeeded", metrics={"pairwise_accuracy": 1.0}, final_dir=final_dir, steps=steps)


def take_over(run: TrainingRun) -> None:
    """What a reaper and a second delivery do to a run whose attempt 1 is still alive: attempt 2 owns it."""
    TrainingRun.objects.filter(pk=run.pk).update(attempts=2, heartbeat_at=timezone.now())


# --- the fence --------------------------------------------------------------------------------


def test_every_write_of_a_stale_attempt_changes_nothing(run: TrainingRun) -> None:
    # given attempt 1 claimed the run, then attempt 2 took it over
    training_run_claim(run_id=run.pk)
    take_over(run)
    before = TrainingRun.objects.values().get(pk=run.pk)

    # when attempt 1 writes
    written = [
        training_run_started(run_id=run.pk, attempt=1, total_steps=9, log_tail="stale"),
        training_run_progress(
            run_id=run.pk, attempt=1, step=3, total_steps=9, metrics={"loss": 1.0}, log_tail="stale"
        ),
        training_run_heartbeat(run_id=run.pk, attempt=1, log_tail="stale"),
        training_run_finish(run_id=run.pk, attempt=1, result=succeeded()),
        training_run_mark_cancelled(run_id=run.pk, attempt=1),
        training_run_requeue_stopped(run_id=run.pk, attempt=1, reason="stale"),
        training_run_fail(run_id=run.pk, error="stale", attempt=1),
    ]

    # then
    assert written == [False] * len(written)
    assert TrainingRun.objects.values().get(pk=run.pk) == before
    assert not RewardModel.objects.exists()
    assert not TrainingRunMetric.objects.exists()
    assert training_run_stop_reason(run_id=run.pk, attempt=1) == "lost"
    assert training_run_stop_reason(run_id=run.pk, attempt=2) is None


def test_the_attempt_that_owns_the_run_records_its_progress_and_result(run: TrainingRun) -> None:
    training_run_claim(run_id=run.pk)

    assert training_run_started(run_id=run.pk, attempt=1, total_steps=4, log_tail="a")
    assert training_run_progress(
        run_id=run.pk, attempt=1, step=2, total_steps=4, metrics={"loss": 0.5}, log_tail="b"
    )
    assert training_run_finish(run_id=run.pk, attempt=1, result=succeeded())
    run.refresh_from_db()
    assert (run.status, run.step, run.total_steps, run.log_tail) == ("succeeded", 4, 4, "b")
    assert RewardModel.objects.get(run=run).path == "/models/rm"
    assert list(TrainingRunMetric.objects.values_list("step", flat=True)) == [2]


def test_a_run_is_cancelled_only_when_someone_asked(run: TrainingRun) -> None:
    training_run_claim(run_id=run.pk)

    assert not training_run_mark_cancelled(run_id=run.pk, attempt=1)
    assert TrainingRun.objects.get(pk=run.pk).status == "running"

    TrainingRun.objects.filter(pk=run.pk).update(cancel_requested=True)
    assert training_run_stop_reason(run_id=run.pk, attempt=1) == "cancel"
    assert training_run_mark_cancelled(run_id=run.pk, attempt=1)
    assert TrainingRun.objects.get(pk=run.pk).status == "cancelled"


# --- attempts given back ------------------------------------------------------------------------


def test_a_run_stopped_by_a_signal_is_requeued_with_its_attempt_given_back(
    run: TrainingRun, enqueued: list[int], settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    # given a run on its last attempt
    TrainingRun.objects.filter(pk=run.pk).update(attempts=settings.TRAINING_MAX_ATTEMPTS - 1)
    training_run_claim(run_id=run.pk)
    last = settings.TRAINING_MAX_ATTEMPTS

    # when its process stops on SIGTERM
    with django_capture_on_commit_callbacks(execute=True):
        assert training_run_requeue_stopped(run_id=run.pk, attempt=last, reason="stopped by SIGTERM")

    # then it is queued again, and may still be claimed: the stop did not use up an attempt
    run.refresh_from_db()
    assert (run.status, run.attempts, run.attempts_given_back) == ("queued", last, 1)
    assert enqueued == [run.pk]
    claimed = training_run_claim(run_id=run.pk)
    assert claimed is not None
    # the new claim has a number of its own: the stopped attempt's writes stay fenced off
    assert claimed.attempts == last + 1
    assert not training_run_heartbeat(run_id=run.pk, attempt=last)


def test_a_cancel_asked_for_before_the_signal_stop_wins(run: TrainingRun, enqueued: list[int]) -> None:
    training_run_claim(run_id=run.pk)
    TrainingRun.objects.filter(pk=run.pk).update(cancel_requested=True)

    assert training_run_requeue_stopped(run_id=run.pk, attempt=1, reason="stopped by SIGTERM")

    assert TrainingRun.objects.get(pk=run.pk).status == "cancelled"
    assert enqueued == []


def test_the_reaper_counts_only_attempts_not_given_back(
    run: TrainingRun, settings: Any, enqueued: list[int], django_capture_on_commit_callbacks: Any
) -> None:
    old = timezone.now() - timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S + 5)
    TrainingRun.objects.filter(pk=run.pk).update(
        status="running", attempts=settings.TRAINING_MAX_ATTEMPTS, attempts_given_back=1, heartbeat_at=old
    )

    with django_capture_on_commit_callbacks(execute=True):
        assert training_runs_reap() == [run.pk]

    assert TrainingRun.objects.get(pk=run.pk).status == "queued"
    assert enqueued == [run.pk]


# --- the child program with a fake trainer, under its supervisor --------------------------------

# The run's child program, with `run_training` replaced by a trainer that "loads its model" until
# the test creates the file `release` or a stop is asked for (SIGTERM, or the stop file of a
# cancel; SIGTERM is ignored if told so), then returns `result`. It imports no Django: its
# supervisor, `training_run_execute` in the test's process, applies its events.
FAKE_TRAINER = """
import json, signal, sys, time
from pathlib import Path
import training.run_process as run_process
import training.runner as runner

spec_path, release, result = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
ignore_sigterm = sys.argv[4:] == ["ignore-sigterm"]

def run_training(spec, reporter):
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reporter.log("loading the model")
    while not release.exists() and not reporter.should_stop():
        time.sleep(0.05)
    return runner.RunResult(**result)

runner.run_training = run_training
assert "django" not in sys.modules
sys.exit(run_process.main([spec_path]))
"""


def wait_until(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {WAIT_S} s"
        time.sleep(0.05)


@pytest.fixture
def run_process_env(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    """Child programs heartbeat every 0.2 s (a tenth of the reaper's timeout, at least 0.2 s)."""
    settings.TRAINING_HEARTBEAT_TIMEOUT_S = 2


def fake_command(folder: Path, result: RunResult, *extra: str) -> Any:
    def command(*, run: TrainingRun, spec_path: Path) -> list[str]:
        return [
            sys.executable,
            "-c",
            FAKE_TRAINER,
            str(spec_path),
            str(folder / "release"),
            json.dumps(result.to_dict()),
            *extra,
        ]

    return command


def supervise_in_thread(run: TrainingRun) -> threading.Thread:
    """The run's task (`training_run_execute`) in a thread of this process, as a worker would run it."""

    def execute() -> None:
        try:
            training_run_execute(run_id=run.pk)
        finally:
            connection.close()

    thread = threading.Thread(target=execute, daemon=True)
    thread.start()
    return thread


def loading(run: TrainingRun) -> bool:
    return "loading the model" in TrainingRun.objects.get(pk=run.pk).log_tail


def trainers(folder: Path) -> list[int]:
    import psutil

    return [
        process.pid
        for process in psutil.process_iter(["cmdline"])
        if any(str(folder) in arg for arg in process.info["cmdline"] or [])
    ]


@pytest.mark.django_db(transaction=True)
def test_a_run_loading_its_model_heartbeats_and_is_never_reaped(
    run: TrainingRun,
    tmp_path: Path,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    enqueued: list[int],
    run_process_env: None,
) -> None:
    # given a reaper that takes a run silent for 2 s, and a child loading its model
    TrainingRun.objects.filter(pk=run.pk).update(output_dir=str(tmp_path))
    result = succeeded(str(tmp_path / "final"))
    monkeypatch.setattr("training.services.runs.training_run_command", fake_command(tmp_path, result))
    supervisor = supervise_in_thread(run)
    try:
        wait_until(lambda: loading(run), "a heartbeat with the log")

        # when the load takes several heartbeat timeouts
        seen: set[Any] = set()

        def beats() -> bool:
            assert not training_runs_reap(), "the reaper took a run that is alive"
            seen.add(TrainingRun.objects.get(pk=run.pk).heartbeat_at)
            return len(seen) > 3 * settings.TRAINING_HEARTBEAT_TIMEOUT_S / 0.2

        wait_until(beats, "heartbeats during the model load")
    finally:
        (tmp_path / "release").touch()
        supervisor.join(WAIT_S)

    # then the one attempt trained and its result was recorded
    run.refresh_from_db()
    assert (run.status, run.attempts) == ("succeeded", 1), run.error
    assert RewardModel.objects.filter(run=run).count() == 1
    assert enqueued == []


@pytest.mark.django_db(transaction=True)
def test_a_child_whose_run_was_taken_over_is_killed_and_records_nothing(
    run: TrainingRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_process_env: None
) -> None:
    # given attempt 1's child loading its model
    TrainingRun.objects.filter(pk=run.pk).update(output_dir=str(tmp_path))
    result = succeeded(str(tmp_path / "final"))
    monkeypatch.setattr("training.services.runs.training_run_command", fake_command(tmp_path, result))
    supervisor = supervise_in_thread(run)
    try:
        wait_until(lambda: loading(run), "a heartbeat with the log")

        # when attempt 2 takes the run over (a reaper and a redelivery) while attempt 1 still loads
        take_over(run)
        supervisor.join(WAIT_S)
    finally:
        (tmp_path / "release").touch()

    # then its supervisor killed attempt 1's child, and nothing of it is the run's
    assert not supervisor.is_alive()
    assert trainers(tmp_path) == []
    run.refresh_from_db()
    assert (run.status, run.attempts) == ("running", 2)
    assert not RewardModel.objects.exists()
    assert "no longer this attempt's" in (tmp_path / "process-attempt-1.log").read_text()


@pytest.mark.django_db(transaction=True)
def test_a_child_stopped_by_sigterm_without_a_cancel_is_requeued_and_never_cancelled(
    run: TrainingRun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    enqueued: list[int],
    run_process_env: None,
) -> None:
    # given a child whose trainer stops early with a checkpoint when asked to
    TrainingRun.objects.filter(pk=run.pk).update(output_dir=str(tmp_path))
    monkeypatch.setattr("training.services.runs.training_run_command", fake_command(tmp_path, STOPPED))
    supervisor = supervise_in_thread(run)
    try:
        wait_until(lambda: loading(run), "a heartbeat with the log")

        # when the child (not its supervisor) gets SIGTERM
        (child,) = trainers(tmp_path)
        os.kill(child, signal.SIGTERM)
        supervisor.join(WAIT_S)
    finally:
        (tmp_path / "release").touch()

    # then the run is back in the queue with its attempt given back, not cancelled
    run.refresh_from_db()
    assert (run.status, run.attempts, run.attempts_given_back) == ("queued", 1, 1)
    assert "stopped by SIGTERM" in run.error
    assert enqueued == [run.pk]


@pytest.mark.django_db(transaction=True)
def test_a_cancel_reaches_the_child_through_its_supervisor_and_the_run_is_cancelled(
    run: TrainingRun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    enqueued: list[int],
    run_process_env: None,
) -> None:
    # given a child loading its model
    TrainingRun.objects.filter(pk=run.pk).update(output_dir=str(tmp_path))
    monkeypatch.setattr("training.services.runs.training_run_command", fake_command(tmp_path, STOPPED))
    supervisor = supervise_in_thread(run)
    try:
        wait_until(lambda: loading(run), "a heartbeat with the log")

        # when someone cancels the run
        training_run_cancel(run=TrainingRun.objects.get(pk=run.pk))
        supervisor.join(WAIT_S)
    finally:
        (tmp_path / "release").touch()

    # then the supervisor's stop file stopped the child, and the run is cancelled
    assert (tmp_path / "stop-attempt-1").exists()
    run.refresh_from_db()
    assert (run.status, run.attempts) == ("cancelled", 1)
    assert enqueued == []


# --- the supervisor interrupted (the task's time limit) -------------------------------------------------


class TaskInterrupted(Exception):
    """Stands for Celery's SoftTimeLimitExceeded, raised in the task while it waits for the run."""


def interrupt_when_loading(run: TrainingRun) -> threading.Thread:
    """Raise TaskInterrupted in this (the main) thread once the run's child heartbeats, as Celery's
    soft time limit does."""

    def raise_interrupted(signum: int, frame: Any) -> None:
        raise TaskInterrupted

    signal.signal(signal.SIGUSR1, raise_interrupted)

    def interrupt() -> None:
        wait_until(lambda: loading(run), "a heartbeat with the log")
        connection.close()
        os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    return thread


STOPPED = RunResult(status="cancelled", metrics={}, final_dir="", steps=2, checkpoint_dir="checkpoint-2")


@pytest.mark.django_db(transaction=True)
def test_the_tasks_time_limit_stops_the_child_which_reports_it_and_the_run_is_requeued_with_its_attempt_given_back(
    run: TrainingRun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    enqueued: list[int],
    run_process_env: None,
) -> None:
    # given a run whose child is loading its model
    TrainingRun.objects.filter(pk=run.pk).update(output_dir=str(tmp_path))
    monkeypatch.setattr("training.services.runs.training_run_command", fake_command(tmp_path, STOPPED))
    interrupter = interrupt_when_loading(run)

    # when the task is interrupted while it waits (it returns: the interruption is handled)
    try:
        training_run_execute(run_id=run.pk)
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        (tmp_path / "release").touch()
    interrupter.join()

    # then the child got SIGTERM, stopped and said so, and the run went back with its attempt given back
    run.refresh_from_db()
    assert (run.status, run.attempts, run.attempts_given_back) == ("queued", 1, 1)
    assert "stopped by SIGTERM" in run.error
    assert enqueued == [run.pk]


@pytest.mark.django_db(transaction=True)
def test_a_run_process_that_ignores_sigterm_is_killed_and_the_run_requeued_with_its_attempt_given_back(
    run: TrainingRun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    enqueued: list[int],
    run_process_env: None,
) -> None:
    # given a run whose process ignores SIGTERM, and a short grace period
    TrainingRun.objects.filter(pk=run.pk).update(output_dir=str(tmp_path))
    monkeypatch.setattr(
        "training.services.runs.training_run_command", fake_command(tmp_path, STOPPED, "ignore-sigterm")
    )
    monkeypatch.setattr("training.services.supervisor.JOB_STOP_GRACE_S", 0.5)
    interrupter = interrupt_when_loading(run)

    # when the task is interrupted while it waits
    try:
        training_run_execute(run_id=run.pk)
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        (tmp_path / "release").touch()
    interrupter.join()

    # then the process was killed, and the task put the run back, its attempt given back
    run.refresh_from_db()
    assert (run.status, run.attempts, run.attempts_given_back) == ("queued", 1, 1)
    assert "time limit" in run.error
    assert enqueued == [run.pk]
    assert not [pid for pid in trainers(tmp_path)], "a process of the run outlived its task"


@pytest.mark.django_db(transaction=True)
def test_a_run_process_ended_by_sigterm_before_it_could_handle_it_is_requeued_with_its_attempt_given_back(
    run: TrainingRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, enqueued: list[int]
) -> None:
    # given a run whose process is ended by SIGTERM from outside (say, while it still starts up)
    TrainingRun.objects.filter(pk=run.pk).update(output_dir=str(tmp_path))
    ended = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    monkeypatch.setattr(
        "training.services.runs.training_run_command",
        lambda *, run, spec_path: [sys.executable, "-c", ended],
    )

    # when the task runs it
    training_run_execute(run_id=run.pk)

    # then the stop did not use up an attempt
    run.refresh_from_db()
    assert (run.status, run.attempts, run.attempts_given_back) == ("queued", 1, 1)
    assert "killed by signal 15" in run.error
    assert enqueued == [run.pk]
