"""The event protocol between a GPU job's child program and its supervisor.

A child program (a training run, a generation or a scoring job) imports no
Django and writes nothing to the database: it reports what happens as JSON
lines appended to its attempt's events file, one object per line, each with
an `event` kind and the time it was written (`at`, Unix seconds). The
supervisor in the Celery worker tails the file and applies every event to the
job's row, fenced by the attempt; it is the only database writer.

Kinds, and what they carry:

    started      total_steps (runs); prompts_total, prompts_done (generation);
                 completions_total, completions_done (scoring)
    heartbeat    nothing: the child is alive (sent from a thread started before
                 anything slow, the model load included)
    progress     step, total_steps, metrics (runs)
    log          line
    checkpoint   path: a checkpoint was renamed into place, complete
    batch        completions {prompt id: [[text, settings], ...]} (generation)
                 or scores {completion id: score} (scoring): written by the
                 supervisor, fenced, in one transaction with the progress
    result       the outcome of a run (RunResult's fields) or {} for a job
    stopped      cause ("cancel": the supervisor asked through the stop file;
                 "signal": SIGTERM), steps, checkpoint_dir
    error        error (the exception and its traceback)

What reaches the child from the supervisor: its spec (argv), its input files,
these environment variables, SIGTERM (save and stop), and the stop file
(created when someone cancels the job).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

# Where the child appends its events; where the supervisor asks it to stop (a cancel).
EVENTS_FILE_ENV = "RANKWISE_EVENTS_FILE"
STOP_FILE_ENV = "RANKWISE_STOP_FILE"
# "pid:start-time" of the supervisor: a child whose supervisor is gone stops at once.
SUPERVISOR_ENV = "RANKWISE_SUPERVISOR"
# Seconds between the child's heartbeats (the supervisor sets it well under its reaper's timeout).
HEARTBEAT_ENV = "RANKWISE_HEARTBEAT_EVERY_S"
HEARTBEAT_EVERY_S = 5.0

EVENT_KINDS = frozenset(
    {"started", "heartbeat", "progress", "log", "checkpoint", "batch", "result", "stopped", "error"}
)


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities (which JSON has no words for) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


class EventWriter:
    """Appends events to a file, one JSON line each, whole lines only; safe from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()
        # Unbuffered appends: each line is one write, so a reader never sees half of one
        # unless the process dies inside the write (the reader keeps such a tail for later).
        self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (open for the process's life)

    def emit(self, event: str, **values: Any) -> None:
        if event not in EVENT_KINDS:
            raise ValueError(f"unknown event {event!r}")
        line = json.dumps({"event": event, "at": time.time(), **json_safe(values)}, allow_nan=False)
        with self.lock:
            self.file.write(line.encode() + b"\n")

    def close(self) -> None:
        with self.lock:
            self.file.close()


class EventReader:
    """Tails an events file: each `read()` returns the events whole lines added since the last one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                data = file.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # b"" after a whole line; else a line still being written
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "log", "line": line.decode(errors="replace")}
            if isinstance(event, dict) and event.get("event") in EVENT_KINDS:
                events.append(event)
        return events


# --- who is the supervisor ------------------------------------------------------------------------


def process_start_time(pid: int) -> str:
    """The start time of process `pid` (clock ticks since boot, from /proc), "" where unknown.

    With the pid it names one process for the machine's uptime: a pid reused
    by another process has another start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (command) state ppid ... starttime(22nd)": the command may hold spaces and parentheses.
            return stat.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def process_identity(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{process_start_time(pid)}"


def process_alive(identity: str) -> bool:
    """Whether the process `process_identity` named is still alive (and not a zombie)."""
    pid_text, _, started = identity.partition(":")
    try:
        pid = int(pid_text)
    except ValueError:
        return True  # no supervisor named: nothing to watch
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return not started  # no /proc: the signal said it lives
    if fields[0] in (b"Z", b"X"):
        return False
    return not started or fields[19].decode() == started
