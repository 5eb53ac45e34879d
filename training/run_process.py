"""The entry of a training run's own process.

    python -m training.run_process SPEC.json
    accelerate launch --config_file training/accelerate/ddp.yaml --num_processes N -m training.run_process SPEC.json

The Celery task starts this process and waits for it; the process writes its
own progress, heartbeat and terminal state to the run's row, so a worker that
dies while a run is training loses nothing: the run finishes and records
itself, or its heartbeat stops and the reaper takes over. Only the main
process (rank 0) writes; the others follow its stop decision.

Every write is fenced by the spec's attempt (training.services): once the
run is no longer this attempt's (reaped, taken over, failed by hand), a write
changes nothing and the process exits at once, without a checkpoint, since
the checkpoint folder now belongs to another attempt.

1. Start Django, read the spec; rank 0 starts its heartbeat thread before
   anything slow (model load, reference model, tokenising), so the reaper
   never takes a run that is alive.
2. Train (`training.runner.run_training`). SIGTERM asks for a stop at the
   next step, with a checkpoint.
3. Record the outcome: succeeded (the result is registered), cancelled (only
   when a cancel was asked for), or back to `queued` with the attempt given
   back (stopped by SIGTERM); an exception fails the attempt with its traceback.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import django

# The heartbeat thread's rate; the reaper's timeout (TRAINING_HEARTBEAT_TIMEOUT_S) is far longer.
HEARTBEAT_EVERY_S = 5.0
CANCEL_CHECK_EVERY_S = 2.0
LOG_LINES_KEPT = 200
# Exit status of a process whose attempt lost the run: nothing it did is recorded.
EXIT_LOST = 3


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class DatabaseReporter:
    """A `training.runner.Reporter` that writes to the TrainingRun row, fenced by the attempt.

    `stop_cause` says why the run was asked to stop: "cancel" (someone
    cancelled it) or "signal" (SIGTERM), or None.
    """

    def __init__(self, run_id: int, attempt: int) -> None:
        self.run_id = run_id
        self.attempt = attempt
        self.main = is_main_process()
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.lines_lock = threading.Lock()
        self.last_cancel_check = 0.0
        self.stop_cause: str | None = None

    # --- fenced writes --------------------------------------------------------

    def log_tail(self) -> str:
        with self.lines_lock:
            return "\n".join(self.lines)

    def owned(self, written: bool) -> None:
        """A fenced write changed nothing: the run is no longer this attempt's, so stop here."""
        if not written:
            self.lost()

    def lost(self) -> None:
        print(
            f"run {self.run_id}: attempt {self.attempt} no longer owns the run; stopping without saving",
            flush=True,
        )
        # From any thread, at once: every further step or checkpoint would
        # write into a folder another attempt now owns.
        os._exit(EXIT_LOST)

    def beat(self) -> None:
        """One heartbeat (the heartbeat thread calls this); stops the process if the attempt lost the run."""
        from django.db import close_old_connections

        from training.services import training_run_heartbeat

        # A connection that died (PostgreSQL restarted) is replaced, not reused.
        close_old_connections()
        self.owned(training_run_heartbeat(run_id=self.run_id, attempt=self.attempt, log_tail=self.log_tail()))

    # --- the Reporter protocol --------------------------------------------------

    def started(self, *, total_steps: int) -> None:
        if self.main:
            from training.services import training_run_started

            self.owned(
                training_run_started(
                    run_id=self.run_id,
                    attempt=self.attempt,
                    total_steps=total_steps,
                    log_tail=self.log_tail(),
                )
            )

    def progress(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        if self.main:
            from training.services import training_run_progress

            self.owned(
                training_run_progress(
                    run_id=self.run_id,
                    attempt=self.attempt,
                    step=step,
                    total_steps=total_steps,
                    metrics=metrics,
                    log_tail=self.log_tail(),
                )
            )

    def heartbeat(self) -> None:
        pass  # the heartbeat thread beats, whatever the trainer is busy with

    def should_stop(self) -> bool:
        if not self.main or self.stop_cause is not None:
            return self.stop_cause is not None
        if time.monotonic() - self.last_cancel_check >= CANCEL_CHECK_EVERY_S:
            from training.services import training_run_stop_reason

            self.last_cancel_check = time.monotonic()
            reason = training_run_stop_reason(run_id=self.run_id, attempt=self.attempt)
            if reason == "lost":
                self.lost()
            if reason == "cancel":
                self.stop_cause = "cancel"
        return self.stop_cause is not None

    def request_stop(self) -> None:
        """SIGTERM: stop at the next step with a checkpoint; the run goes back to the queue."""
        if self.stop_cause is None:
            self.stop_cause = "signal"

    def log(self, line: str) -> None:
        with self.lines_lock:
            self.lines.append(line)
        print(line, flush=True)


class HeartbeatThread(threading.Thread):
    """Heartbeats every HEARTBEAT_EVERY_S from the start of the process to its end.

    A thread rather than the trainer's callbacks: loading a large model, the
    DPO reference copy, tokenising and precomputing reference log-probs send
    no callback for minutes. The price: a trainer hung in its main thread
    looks alive; the task's time limit ends it.
    """

    def __init__(self, reporter: DatabaseReporter) -> None:
        super().__init__(name=f"run-{reporter.run_id}-heartbeat", daemon=True)
        self.reporter = reporter
        self.done = threading.Event()

    def run(self) -> None:
        from django.db import connection

        try:
            while True:
                try:
                    self.reporter.beat()
                except Exception:  # the database is away for a moment: the next beat may get through
                    traceback.print_exc()
                if self.done.wait(HEARTBEAT_EVERY_S):
                    return
        finally:
            connection.close()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    django.setup()
    from training.runner import RunSpec, run_training

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m training.run_process SPEC.json", file=sys.stderr)
        return 2
    spec = RunSpec.from_json(args[0])
    reporter = DatabaseReporter(spec.run_id, spec.attempt)

    def stop_at_next_step(signum: int, frame: Any) -> None:
        # Every SIGTERM (the supervisor's, a worker shutdown's, a second one) means the same:
        # stop at the next step with a checkpoint. What will not stop is killed by the supervisor.
        reporter.request_stop()

    signal.signal(signal.SIGTERM, stop_at_next_step)
    heartbeat = HeartbeatThread(reporter)
    if reporter.main:
        heartbeat.start()
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    print(f"run {spec.run_id}: attempt {spec.attempt}, process rank {rank} of {world} started", flush=True)
    try:
        result = run_training(spec, reporter)
    except Exception as error:
        reporter.log(traceback.format_exc())
        if reporter.main:
            record_error(
                spec.run_id, spec.attempt, f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}"
            )
        return 1
    finally:
        heartbeat.done.set()
    if reporter.main:
        heartbeat.join()
        record_result(reporter, result)
    return 0


def record_error(run_id: int, attempt: int, error: str) -> None:
    from training.services import training_run_fail

    training_run_fail(run_id=run_id, error=error, from_statuses=("running",), attempt=attempt)


def record_result(reporter: DatabaseReporter, result: Any) -> None:
    """The attempt's outcome on the row (each write fenced; a lost attempt records nothing)."""
    from training.services import (
        training_run_finish,
        training_run_mark_cancelled,
        training_run_requeue_stopped,
    )

    run_id, attempt = reporter.run_id, reporter.attempt
    if result.status == "succeeded":
        recorded = training_run_finish(run_id=run_id, attempt=attempt, result=result)
    elif reporter.stop_cause == "cancel":
        recorded = training_run_mark_cancelled(run_id=run_id, attempt=attempt)
    else:
        recorded = training_run_requeue_stopped(
            run_id=run_id,
            attempt=attempt,
            reason=f"attempt {attempt} stopped by SIGTERM at step {result.steps} "
            f"(a time limit or a worker shutting down); resuming from {result.checkpoint_dir}",
        )
    if not recorded:
        print(
            f"run {run_id}: attempt {attempt} no longer owns the run; its outcome is not recorded", flush=True
        )


if __name__ == "__main__":
    sys.exit(main())
