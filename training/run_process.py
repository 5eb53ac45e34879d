"""The entry of a training run's child program.

    python -m training.run_process SPEC.json
    accelerate launch --config_file training/accelerate/ddp.yaml --num_processes N -m training.run_process SPEC.json

It imports no Django and never touches the database. It reads its spec and the
build's dataset files, writes checkpoints and the final weights under the
run's folder, and reports events (`training.events`) that its supervisor, the
Celery task that launched it, applies to the run's row with the attempt fence.
Only the main process (rank 0) reports; the others follow its stop decision.

1. Read the spec; start the watch thread before anything slow (model load,
   reference model, tokenising): it heartbeats, and ends the process at once
   if the supervisor is gone.
2. Train (`training.runner.run_training`). SIGTERM asks for a stop at the
   next step, with a checkpoint; so does the stop file (a cancel).
3. Report the outcome: `result` (succeeded), or `stopped` with its cause
   ("cancel" or "signal"; the supervisor cancels the run or puts it back in
   the queue with the attempt given back); an exception is an `error` event.
   A child that lost its run is killed by its supervisor: it never decides.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from training.gpu_job_process import ChildChannel, is_main_process, slow_start_for_tests

LOG_LINES_KEPT = 200
# Test-only: "STEP:SECONDS", a pause after checkpoint-STEP is written and before it is complete.
SLOW_CHECKPOINT_ENV = "RANKWISE_TEST_SLOW_CHECKPOINT"


class EventReporter:
    """A `training.runner.Reporter` that reports as events on the child's channel.

    `stop_cause` says why the run was asked to stop: "cancel" (the supervisor
    created the stop file: someone cancelled the run) or "signal" (SIGTERM), or None.
    """

    def __init__(self, channel: ChildChannel, checkpoints_dir: Path | None = None) -> None:
        self.channel = channel
        self.main = channel.reports
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.lines_lock = threading.Lock()
        self.stop_cause: str | None = None
        self.checkpoints_dir = checkpoints_dir
        self.checkpoint_reported: str | None = None

    def started(self, *, total_steps: int) -> None:
        self.channel.emit("started", total_steps=total_steps)

    def progress(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.channel.emit("progress", step=step, total_steps=total_steps, metrics=metrics)
        self.checkpoints_look()

    def checkpoints_look(self) -> None:
        """Report the newest complete checkpoint once it is renamed into place (looked at as steps are logged)."""
        if not self.main or self.checkpoints_dir is None:
            return
        from training.runner import checkpoint_newest_complete

        newest = checkpoint_newest_complete(self.checkpoints_dir)
        if newest is not None and str(newest) != self.checkpoint_reported:
            self.checkpoint_reported = str(newest)
            self.checkpoint(str(newest))

    def heartbeat(self) -> None:
        pass  # the watch thread beats, whatever the trainer is busy with

    def checkpoint(self, path: str) -> None:
        self.channel.emit("checkpoint", path=path)

    def should_stop(self) -> bool:
        if self.stop_cause is None and self.main and self.channel.cancel_asked():
            self.stop_cause = "cancel"
        return self.stop_cause is not None

    def request_stop(self) -> None:
        """SIGTERM: stop at the next step with a checkpoint; the run goes back to the queue."""
        if self.stop_cause is None:
            self.stop_cause = "signal"

    def log(self, line: str) -> None:
        with self.lines_lock:
            self.lines.append(line)
        self.channel.log(line)


def slow_checkpoint_for_tests(channel: ChildChannel) -> None:
    """Test-only hook: pause after writing checkpoint-STEP, before it is marked complete and renamed
    into place, so a test can kill the trainer in the middle of a checkpoint."""
    value = os.environ.get(SLOW_CHECKPOINT_ENV)
    if not value:
        return
    step_text, _, seconds_text = value.partition(":")
    step, seconds = int(step_text), float(seconds_text or 60)
    from trl import DPOTrainer, RewardTrainer

    for trainer_class in (RewardTrainer, DPOTrainer):
        original = trainer_class._save_checkpoint

        def slowed(self: Any, model: Any, trial: Any, original: Any = original) -> None:
            original(self, model, trial)
            if self.state.global_step == step and self.is_world_process_zero():
                channel.log(f"checkpoint-{step} written, not complete yet (paused {seconds:g} s for a test)")
                time.sleep(seconds)

        trainer_class._save_checkpoint = slowed  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m training.run_process SPEC.json", file=sys.stderr)
        return 2
    from training.runner import RunSpec

    spec = RunSpec.from_json(args[0])
    channel = ChildChannel(reports=is_main_process())
    reporter = EventReporter(channel, spec.checkpoints_dir)
    # Every SIGTERM (the supervisor's, a worker shutdown's, a second one) means the same: stop at
    # the next step with a checkpoint. What will not stop is killed by the supervisor.
    channel.on_sigterm(also=reporter.request_stop)
    channel.start()
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    print(f"run {spec.run_id}: attempt {spec.attempt}, process rank {rank} of {world} started", flush=True)
    try:
        slow_start_for_tests(channel)
        slow_checkpoint_for_tests(channel)
        from training import runner

        result = runner.run_training(spec, reporter)
    except Exception as error:
        traceback.print_exc()
        channel.emit("error", error=f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
        return 1
    finally:
        channel.stop()
    reporter.checkpoints_look()
    report_result(channel, reporter, result)
    return 0


def report_result(channel: ChildChannel, reporter: EventReporter, result: Any) -> None:
    """The attempt's outcome as an event; the supervisor records it, fenced by the attempt."""
    if result.status == "succeeded":
        channel.emit("result", **result.to_dict())
    else:
        channel.emit(
            "stopped",
            cause=reporter.stop_cause or "signal",
            steps=result.steps,
            checkpoint_dir=result.checkpoint_dir,
        )


if __name__ == "__main__":
    sys.exit(main())
