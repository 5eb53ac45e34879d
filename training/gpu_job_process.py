"""What every GPU child program (training run, generation, scoring) does around its work.

A child imports no Django and never touches the database. Its supervisor (the
Celery worker that launched it) hands it a spec, input files and, in its
environment, where to append its events (`training.events`), the stop file
that says "cancel", how often to heartbeat and who the supervisor is.

`ChildChannel` is that link: `emit` appends an event; a watch thread, started
before anything slow (the model load included), heartbeats at the
supervisor's rate and ends the process at once when the supervisor is gone
(killed with its worker): nobody would record what it does, and the reaper
will give the job to another attempt, which must never find this one still
writing into its folders. SIGTERM asks for a stop with what was done saved.

Without an events file (a child run by hand) events are printed as JSON lines.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.events import (
    EVENTS_FILE_ENV,
    HEARTBEAT_ENV,
    HEARTBEAT_EVERY_S,
    STOP_FILE_ENV,
    SUPERVISOR_ENV,
    EventWriter,
    json_safe,
    process_alive,
)

# Exit status of a child whose supervisor died: it stopped without saving anything.
EXIT_ORPHANED = 4
# How often the watch thread looks for its supervisor.
SUPERVISOR_CHECK_EVERY_S = 0.5
# Test-only: seconds a child waits, heartbeating, before loading anything (a slow model load on purpose).
SLOW_START_ENV = "RANKWISE_TEST_SLOW_START_S"


def is_main_process() -> bool:
    """Process 0 of a multi-process run (or the only process): the one that reports."""
    return int(os.environ.get("RANK", "0")) == 0


class ChildChannel:
    """A child's link to its supervisor: events out; the stop file, SIGTERM and the supervisor's life in."""

    def __init__(self, *, reports: bool = True) -> None:
        self.reports = reports
        events_file = os.environ.get(EVENTS_FILE_ENV)
        self.writer = EventWriter(events_file) if events_file and reports else None
        stop_file = os.environ.get(STOP_FILE_ENV)
        self.stop_file = Path(stop_file) if stop_file else None
        self.supervisor = os.environ.get(SUPERVISOR_ENV, "")
        self.heartbeat_every_s = float(os.environ.get(HEARTBEAT_ENV) or HEARTBEAT_EVERY_S)
        self.signalled = threading.Event()
        self.done = threading.Event()
        self.watch: threading.Thread | None = None

    def emit(self, event: str, **values: Any) -> None:
        if not self.reports:
            return
        if self.writer is not None:
            self.writer.emit(event, **values)
        else:
            print(json.dumps({"event": event, **json_safe(values)}), flush=True)

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.emit("log", line=line)

    def cancel_asked(self) -> bool:
        return self.stop_file is not None and self.stop_file.exists()

    def on_sigterm(self, also: Callable[[], None] | None = None) -> None:
        """SIGTERM (a time limit, a worker shutting down, the supervisor's stop): stop with what is saved."""

        def handle(signum: int, frame: Any) -> None:
            self.signalled.set()
            if also is not None:
                also()

        signal.signal(signal.SIGTERM, handle)

    def start(self) -> None:
        """Start the watch thread: heartbeats (when this process reports) and the supervisor's life."""
        self.watch = threading.Thread(target=self._watch, name="child-watch", daemon=True)
        self.watch.start()

    def stop(self) -> None:
        self.done.set()
        if self.watch is not None:
            self.watch.join()

    def _watch(self) -> None:
        last_beat = -float("inf")
        while not self.done.is_set():
            if self.supervisor and not process_alive(self.supervisor):
                print(
                    f"the supervisor ({self.supervisor}) is gone: stopping without saving, "
                    "the job's next attempt resumes from what was saved",
                    flush=True,
                )
                os._exit(EXIT_ORPHANED)
            if time.monotonic() - last_beat >= self.heartbeat_every_s:
                try:
                    self.emit("heartbeat")
                except OSError:
                    traceback.print_exc()
                last_beat = time.monotonic()
            self.done.wait(min(SUPERVISOR_CHECK_EVERY_S, self.heartbeat_every_s))


def slow_start_for_tests(channel: ChildChannel) -> None:
    """Test-only hook: wait RANKWISE_TEST_SLOW_START_S seconds, heartbeating, as a slow model load would."""
    seconds = float(os.environ.get(SLOW_START_ENV) or 0)
    if seconds > 0:
        channel.log(f"loading the model (slowed by {seconds:g} s for a test)")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not channel.signalled.is_set():
            time.sleep(0.05)


def work_read(path: str | Path) -> dict[str, Any]:
    """A job's input file (written by its supervisor before the launch)."""
    return dict(json.loads(Path(path).read_text()))


def gpu_job_main(
    argv: list[str] | None,
    *,
    module: str,
    kind: str,
    load: Callable[[str], Any],
    run: Callable[..., str],
) -> int:
    """`python -m <module> SPEC.json WORK.json`: run the job; an exception is reported as an `error` event."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(f"usage: python -m {module} SPEC.json WORK.json", file=sys.stderr)
        return 2
    spec = load(args[0])
    channel = ChildChannel()
    channel.on_sigterm()
    channel.start()
    print(f"{kind} job {spec.job_id}: attempt {spec.attempt} started", flush=True)
    try:
        slow_start_for_tests(channel)
        run(spec, work_read(args[1]), channel)
    except Exception as error:
        traceback.print_exc()
        channel.emit("error", error=f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
        return 1
    finally:
        channel.stop()
    return 0
