"""Run a GPU child program's work in the test's own process, then apply its events as its supervisor
would: the child's loop and the supervisor's fenced writes, without a worker or a subprocess."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.events import EventReader, EventWriter
from training.gpu_job_process import ChildChannel
from training.services.child_events import ChildEvents


def run_child_here(
    events: ChildEvents,
    work_run: Callable[[Any, dict[str, Any], ChildChannel], str],
    spec: Any,
    work: dict[str, Any],
    *,
    cancel: bool = False,
) -> str:
    """`work_run(spec, work, channel)` here; its events applied in order (each fenced). Returns its outcome.

    `cancel`: the stop file exists from the start (the supervisor saw a cancel asked for).
    """
    with tempfile.TemporaryDirectory() as folder:
        channel = ChildChannel()
        channel.writer = EventWriter(Path(folder) / "events.jsonl")
        channel.stop_file = Path(folder) / "stop"
        if cancel:
            channel.stop_file.touch()
        outcome = work_run(spec, work, channel)
        channel.writer.close()
        for event in EventReader(Path(folder) / "events.jsonl").read():
            if not events.apply(event):
                return "lost"
    return outcome
