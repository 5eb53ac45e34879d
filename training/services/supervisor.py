"""The worker side of a GPU job: hold its cards, launch its process group, watch it, clean up after it.

The Celery task of a training run, a generation or a scoring job claims the
row (`training.services.jobs`) and hands the attempt to `gpu_job_process_run`,
which owns the child's whole process group: when the launcher ends, whatever
is left of the group is killed and waited for before a retry is considered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from django.conf import settings

from training.placement import DeviceLease, devices_held
from training.services.jobs import JobModel, job_claimable, job_fail, job_has_attempts_left, job_requeue

logger = logging.getLogger(__name__)


# The environment variable that marks every process of one attempt (see `_job_processes`).
JOB_MARK_ENV = "RANKWISE_JOB_MARK"
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


def _job_processes(mark: str) -> list[int]:
    """The live processes of one attempt: every one carries its mark in its environment.

    The process group alone does not reach them all: torch's elastic launcher
    (`accelerate launch` with several processes) starts each trainer in a
    session of its own, and a process whose parent died keeps its group but
    not its parent. Reads /proc (Linux, where GPU workers run); elsewhere the
    process group is all there is.
    """
    marker = f"{JOB_MARK_ENV}={mark}\0".encode()
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


def _job_gone(process: subprocess.Popen[bytes], mark: str, *, within_s: float) -> bool:
    """Wait until no process of the attempt is left; False if some still are after `within_s`."""
    deadline = time.monotonic() + within_s
    while process.poll() is None or _job_processes(mark):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _job_kill(process: subprocess.Popen[bytes], mark: str) -> bool:
    """SIGKILL every process of the attempt and wait for them; False if some would not die."""
    _job_signal(process, mark, signal.SIGKILL)
    return _job_gone(process, mark, within_s=JOB_KILL_WAIT_S)


def _job_stop(process: subprocess.Popen[bytes], mark: str) -> bool:
    """SIGTERM (save what you have and stop), then SIGKILL whatever is left after the grace period."""
    _job_signal(process, mark, signal.SIGTERM)
    return _job_gone(process, mark, within_s=JOB_STOP_GRACE_S) or _job_kill(process, mark)


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
) -> None:
    """Run a claimed attempt's process group, wait for it, and clean up after it.

    1. Start `command` in a session of its own; every process of it inherits
       a random mark of this attempt in its environment, sees exactly the
       GPUs of `lease` (`CUDA_VISIBLE_DEVICES`; none on a worker without
       GPUs), and holds their locks while it lives.
    2. Wait for the first process (the launcher). Whatever is left of the
       group then (a trainer whose launcher was killed) is killed, and waited
       for, before anything else: two processes of one job never coexist.
    3. The process records success, cancellation and its own errors. If it
       died without doing so (killed, out of memory), the job goes back to
       `queued` while attempts remain (the next attempt resumes where this one
       stopped), or fails with the reason; if SIGTERM ended it, it goes back
       to `queued` with its attempt given back.

    The task's own end (soft time limit, worker shutdown) sends the group
    SIGTERM: the job saves what it has and goes back to the queue with its
    attempt given back.
    """
    mark = secrets.token_hex(16)
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": lease.cuda_visible_devices,
        JOB_MARK_ENV: mark,
    }
    with log_path.open("ab") as log:
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
            returncode = process.wait()
        except BaseException as interruption:
            stopped = _job_stop(process, mark)
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
        # Stopped from outside by SIGTERM (a service manager signals every process), the rest of
        # the group may be saving a checkpoint: it gets the grace of the task's own stop.
        gone = _job_stop(process, mark) if returncode == -signal.SIGTERM else _job_kill(process, mark)
    model.objects.filter(pk=job_id, attempts=attempt).update(log_tail=_file_tail(log_path))
    row = model.objects.filter(pk=job_id).values("status", "attempts", "cancel_requested").first()
    if row is None or row["status"] != model.Status.RUNNING or row["attempts"] != attempt:
        return  # the process recorded its own outcome, or a later attempt owns the job
    reason = f"the {what} process exited with status {returncode}"
    if returncode < 0:
        reason = f"the {what} process was killed by signal {-returncode}"
    if not gone:
        # A retry beside a process that would not die could run the job twice.
        left = ", ".join(map(str, _job_processes(mark)))
        job_fail(
            model,
            job_id=job_id,
            error=f"{reason}; its processes {left} did not exit when killed, so it is not retried",
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
