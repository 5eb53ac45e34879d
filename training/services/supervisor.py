"""The worker side of a GPU job: hold its cards, launch its child program, apply its events, clean up.

The Celery task of a training run, a generation or a scoring job claims the
row (`training.services.jobs`) and hands the attempt to `gpu_job_process_run`.
The child imports no Django and writes nothing to the database: it reports
events (`training.events`), which the supervisor applies with the attempt
fence (`training.services.child_events`); it is the only database writer. It
owns the child's whole process group: a job no longer this attempt's gets its
group killed at once, and when the launcher ends, whatever is left of the
group is killed and waited for before a retry is considered.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection, connections

from training.events import (
    EVENTS_FILE_ENV,
    HEARTBEAT_ENV,
    HEARTBEAT_EVERY_S,
    STOP_FILE_ENV,
    SUPERVISOR_ENV,
    EventReader,
    process_identity,
)
from training.placement import DeviceLease, devices_held
from training.services.child_events import ChildEvents
from training.services.jobs import (
    JobModel,
    job_claimable,
    job_fail,
    job_has_attempts_left,
    job_heartbeat,
    job_requeue,
    job_stop_reason,
)

logger = logging.getLogger(__name__)


# The environment variable that marks every process of one attempt (see `_job_processes`).
JOB_MARK_ENV = "RANKWISE_JOB_MARK"
# The one that names the job in every process of every attempt of it (see `_job_leftovers_kill`).
JOB_KEY_ENV = "RANKWISE_JOB"
# How often the supervisor applies its child's new events, and looks at the row (cancel, lost).
EVENTS_POLL_S = 0.2
ROW_LOOK_EVERY_S = 1.0
# How long a job told to stop (SIGTERM) has to save a checkpoint before it is killed.
JOB_STOP_GRACE_S = 60.0
# How long killed processes may take to vanish; a GPU process in the driver can be slow to die.
JOB_KILL_WAIT_S = 60.0


def _file_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def gpu_job_devices(model: JobModel, *, job_id: int, gpus: int, what: str) -> Iterator[DeviceLease | None]:
    """Hold `gpus` of this worker's cards for the job (training.placement), before it is claimed.

    The job stays queued while it waits for busy cards, so the reaper leaves
    it alone and a cancel ends the wait. Yields None when there is nothing to
    run: the job went elsewhere, was cancelled, or asks for more cards than
    this worker owns (then it is failed, saying so).
    """
    owned = list(settings.WORKER_GPUS)
    if owned and gpus > len(owned):
        job_fail(
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
        claimable = job_claimable(model, job_id=job_id)
        if claimable and not waited:
            logger.info("%s %s waits for %s free GPUs of %s", what, job_id, gpus, ",".join(owned))
            waited.append(True)
        return claimable

    with devices_held(
        count=gpus, owned=owned, lock_dir=Path(settings.GPU_LOCK_DIR), keep_waiting=keep_waiting
    ) as lease:
        yield lease


def _job_processes(mark: str, *, env: str = JOB_MARK_ENV) -> list[int]:
    """The live processes of one attempt: every one carries its mark in its environment.

    The process group alone does not reach them all: torch's elastic launcher
    (`accelerate launch` with several processes) starts each trainer in a
    session of its own, and a process whose parent died keeps its group but
    not its parent. Reads /proc (Linux, where GPU workers run); elsewhere the
    process group is all there is.
    """
    marker = f"{env}={mark}\0".encode()
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


def _job_gone(
    process: subprocess.Popen[bytes], mark: str, *, within_s: float, pump: Callable[[], object] | None = None
) -> bool:
    """Wait until no process of the attempt is left; False if some still are after `within_s`.

    `pump` applies the child's events meanwhile (a child told to stop reports that it stopped).
    """
    deadline = time.monotonic() + within_s
    while process.poll() is None or _job_processes(mark):
        if pump is not None:
            pump()
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _job_kill(process: subprocess.Popen[bytes], mark: str) -> bool:
    """SIGKILL every process of the attempt and wait for them; False if some would not die."""
    _job_signal(process, mark, signal.SIGKILL)
    return _job_gone(process, mark, within_s=JOB_KILL_WAIT_S)


def _job_stop(process: subprocess.Popen[bytes], mark: str, pump: Callable[[], object] | None = None) -> bool:
    """SIGTERM (save what you have and stop), then SIGKILL whatever is left after the grace period."""
    _job_signal(process, mark, signal.SIGTERM)
    return _job_gone(process, mark, within_s=JOB_STOP_GRACE_S, pump=pump) or _job_kill(process, mark)


def _job_key(model: JobModel, job_id: int) -> str:
    """What every process of every attempt of one job carries in its environment (JOB_KEY_ENV).

    It names the database too: two deployments (or test runs) on one host each
    have a "generation job 1", and one must never take the other's processes
    for its own leftovers.
    """
    database = connections[model.objects.db].settings_dict
    where = f"{database.get('HOST') or ''}:{database.get('PORT') or ''}/{database['NAME']}"
    return f"{hashlib.sha256(where.encode()).hexdigest()[:16]}:{model._meta.label_lower}:{job_id}"


def _job_leftovers_kill(model: JobModel, job_id: int) -> list[int]:
    """Kill what an earlier attempt of the job left on this host (its supervisor died with it).

    Such a child stops by itself once it sees its supervisor gone; this makes
    sure, before a new attempt starts, that none is still writing.
    """
    left = _job_processes(_job_key(model, job_id), env=JOB_KEY_ENV)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + JOB_KILL_WAIT_S
    while _job_processes(_job_key(model, job_id), env=JOB_KEY_ENV) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def child_heartbeat_every_s() -> float:
    """How often a child heartbeats: a tenth of the reaper's timeout, between 0.2 and 5 seconds."""
    return max(0.2, min(HEARTBEAT_EVERY_S, settings.TRAINING_HEARTBEAT_TIMEOUT_S / 10))


def child_work_write(path: Path, work: dict[str, Any]) -> Path:
    """Write a child's input file (the rows it works on), whole before the child reads it."""
    staged = path.with_name(path.name + ".partial")
    staged.write_text(json.dumps(work, separators=(",", ":")))
    staged.replace(path)
    return path


def gpu_job_process_run(
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
    events: ChildEvents,
) -> None:
    """Run a claimed attempt's child program, apply its events, and clean up after it.

    1. Kill whatever an earlier attempt of the job left on this host. Start
       `command` in a session of its own; every process of it inherits a
       random mark of this attempt and the job's key in its environment, sees
       exactly the GPUs of `lease` (`CUDA_VISIBLE_DEVICES`; none on a worker
       without GPUs), holds their locks while it lives, and is told where to
       append its events, which file means "cancel", how often to heartbeat
       and who its supervisor is (this process: a child whose supervisor
       died stops at once).
    2. While it runs, apply its events to the row (`events`, each write
       fenced by the attempt), and look at the row: a cancel asked for
       creates the stop file; a job no longer this attempt's (reaped and
       taken over, failed by hand), or a fenced write that changed nothing,
       kills the whole group at once.
    3. When the first process (the launcher) ends, apply the events left,
       then kill and wait for whatever is left of the group before anything
       else: two processes of one job never coexist.
    4. The child reports success, cancellation, a stop and its own errors
       as events. If it died without doing so (killed, out of memory), the
       job goes back to `queued` while attempts remain (the next attempt
       resumes where this one stopped), or fails with the reason; if SIGTERM
       ended it, it goes back to `queued` with its attempt given back.

    The task's own end (soft time limit, worker shutdown) sends the group
    SIGTERM: the child saves what it has, reports `stopped`, and the job
    goes back to the queue with its attempt given back.
    """
    mark = secrets.token_hex(16)
    events_path = log_path.with_name(f"events-attempt-{attempt}.jsonl")
    stop_path = log_path.with_name(f"stop-attempt-{attempt}")
    events_path.unlink(missing_ok=True)
    stop_path.unlink(missing_ok=True)
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": lease.cuda_visible_devices,
        JOB_MARK_ENV: mark,
        JOB_KEY_ENV: _job_key(model, job_id),
        EVENTS_FILE_ENV: str(events_path),
        STOP_FILE_ENV: str(stop_path),
        SUPERVISOR_ENV: process_identity(),
        HEARTBEAT_ENV: f"{child_heartbeat_every_s():g}",
    }
    # The child imports no Django: it must not find the worker's settings module either.
    environment.pop("DJANGO_SETTINGS_MODULE", None)
    reader = EventReader(events_path)
    # Read, not yet applied: an interruption in the middle of an event leaves it here for the next pump.
    pending: collections.deque[dict[str, Any]] = collections.deque()
    lost: list[str] = []
    last_look = 0.0

    def pump() -> bool:
        """Apply the child's new events, in order; False once the job is no longer this attempt's."""
        if lost:
            return False
        pending.extend(reader.read())
        while pending:
            if not events.apply(pending[0]):
                lost.append(f"its {pending[0]['event']} event found the {what} no longer this attempt's")
                return False
            pending.popleft()
        return True

    def look() -> bool:
        """Ask the row: a cancel creates the stop file; False if the job is no longer this attempt's."""
        nonlocal last_look
        if time.monotonic() - last_look < min(ROW_LOOK_EVERY_S, child_heartbeat_every_s()) or events.finished:
            return True
        last_look = time.monotonic()
        if not events.applied and not job_heartbeat(model, job_id=job_id, attempt=attempt):
            # Until the child's own heartbeats begin (its interpreter and launcher start), the
            # supervisor beats for it.
            lost.append(f"the {what} is no longer this attempt's")
            return False
        reason = job_stop_reason(model, job_id=job_id, attempt=attempt)
        if reason == "lost" and not events.finished:
            lost.append(f"the {what} is no longer this attempt's")
            return False
        if reason == "cancel" and not stop_path.exists():
            stop_path.touch()
        return True

    left = _job_leftovers_kill(model, job_id)
    with log_path.open("ab") as log:
        if left:
            log.write(f"attempt {attempt}: killed {left}, left by an earlier attempt\n".encode())
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
            returncode: int | None = None
            while returncode is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    returncode = process.wait(timeout=EVENTS_POLL_S)
                if not (pump() and look()):
                    break
        except BaseException as interruption:
            # The interruption (a signal) may have come in the middle of a query: that connection
            # is unusable, and the next query opens another.
            connection.close()
            stopped = _job_stop(process, mark, pump=pump)
            pump()
            job_requeue(
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
        if lost:
            # Nothing more of this attempt may be written: its folders belong to another attempt now.
            _job_kill(process, mark)
            log.write(f"attempt {attempt}: killed: {lost[0]}\n".encode())
            return
        pump()
        # Stopped from outside by SIGTERM (a service manager signals every process), the rest of
        # the group may be saving a checkpoint: it gets the grace of the task's own stop.
        if process.returncode == -signal.SIGTERM:
            gone = _job_stop(process, mark, pump=pump)
        else:
            gone = _job_kill(process, mark)
        pump()
        returncode = process.returncode
    model.objects.filter(pk=job_id, attempts=attempt).update(log_tail=_file_tail(log_path))
    row = model.objects.filter(pk=job_id).values("status", "attempts", "cancel_requested").first()
    if row is None or row["status"] != model.Status.RUNNING or row["attempts"] != attempt:
        return  # the child's outcome is recorded, or a later attempt owns the job
    reason = f"the {what} process exited with status {returncode}"
    if returncode < 0:
        reason = f"the {what} process was killed by signal {-returncode}"
    if not gone:
        # A retry beside a process that would not die could run the job twice.
        left_now = ", ".join(map(str, _job_processes(mark)))
        job_fail(
            model,
            job_id=job_id,
            error=f"{reason}; its processes {left_now} did not exit when killed, so it is not retried",
            attempt=attempt,
        )
        return
    if returncode == -signal.SIGTERM:
        # A stop, not a failure of the job: its attempt is given back, as it would have done itself.
        job_requeue(
            model,
            job_id=job_id,
            attempt=attempt,
            reason=f"attempt {attempt}: {reason}; {retry_note}",
            give_back=True,
            enqueue=enqueue,
        )
        return
    job = model.objects.get(pk=job_id)
    if job_has_attempts_left(job) and not row["cancel_requested"]:
        job_requeue(
            model,
            job_id=job_id,
            attempt=attempt,
            reason=f"attempt {attempt}: {reason}; {retry_note}",
            give_back=False,
            enqueue=enqueue,
        )
        return
    job_fail(
        model,
        job_id=job_id,
        error=f"{reason} (attempt {attempt} of {settings.TRAINING_MAX_ATTEMPTS})",
        attempt=attempt,
    )
