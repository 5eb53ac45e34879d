"""The entry of a training run's own process.

    python -m training.run_process SPEC.json
    accelerate launch --multi_gpu --num_processes N -m training.run_process SPEC.json

The Celery task starts this process and waits for it; the process writes its
own progress, heartbeat and terminal state to the run's row, so a worker that
dies while a run is training loses nothing: the run finishes and records
itself, or its heartbeat stops and the reaper takes over. Only the main
process (rank 0) writes; the others follow its stop decision.
"""

from __future__ import annotations

import collections
import os
import sys
import time
import traceback
from typing import Any

import django

# Writes are rate-limited: the trainer calls the reporter on every micro-step.
HEARTBEAT_EVERY_S = 5.0
CANCEL_CHECK_EVERY_S = 2.0
LOG_LINES_KEPT = 200


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class DatabaseReporter:
    """A `training.runner.Reporter` that writes to the TrainingRun row."""

    def __init__(self, run_id: int) -> None:
        from training.models import TrainingRun

        self.run_id = run_id
        self.rows = TrainingRun.objects.filter(pk=run_id)
        self.main = is_main_process()
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.last_heartbeat = 0.0
        self.last_cancel_check = 0.0
        self.stop = False

    def _write(self, **fields: Any) -> None:
        from django.db import close_old_connections
        from django.utils import timezone

        from training.models import TrainingRun

        # A connection that died (PostgreSQL restarted) is replaced, not reused.
        close_old_connections()
        self.rows.filter(status=TrainingRun.Status.RUNNING).update(
            heartbeat_at=timezone.now(), log_tail="\n".join(self.lines), **fields
        )
        self.last_heartbeat = time.monotonic()

    def started(self, *, total_steps: int) -> None:
        if self.main:
            self._write(total_steps=total_steps)

    def progress(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        from training.models import TrainingRunMetric

        step = min(step, total_steps) if total_steps else step
        self._write(step=step, total_steps=max(total_steps, step))
        if metrics:
            TrainingRunMetric.objects.create(run_id=self.run_id, step=step, values=metrics)

    def heartbeat(self) -> None:
        if self.main and time.monotonic() - self.last_heartbeat >= HEARTBEAT_EVERY_S:
            self._write()

    def should_stop(self) -> bool:
        if not self.main or self.stop:
            return self.stop
        if time.monotonic() - self.last_cancel_check >= CANCEL_CHECK_EVERY_S:
            from training.models import TrainingRun

            self.last_cancel_check = time.monotonic()
            cancel, status = self.rows.values_list("cancel_requested", "status").get()
            # Stop when asked to, or when the row left `running` (reaped, failed by hand).
            self.stop = cancel or status != TrainingRun.Status.RUNNING
        return self.stop

    def log(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def flush(self) -> None:
        if self.main:
            self._write()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    django.setup()
    from training.runner import RunSpec, run_training
    from training.services import training_run_fail, training_run_finish

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m training.run_process SPEC.json", file=sys.stderr)
        return 2
    spec = RunSpec.from_json(args[0])
    reporter = DatabaseReporter(spec.run_id)
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    print(f"run {spec.run_id}: process rank {rank} of {world} started", flush=True)
    try:
        result = run_training(spec, reporter)
    except Exception as error:
        reporter.log(traceback.format_exc())
        if is_main_process():
            reporter.flush()
            training_run_fail(run_id=spec.run_id, error=f"{type(error).__name__}: {error}")
        return 1
    if is_main_process():
        reporter.flush()
        training_run_finish(run_id=spec.run_id, result=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
