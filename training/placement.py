"""Which GPUs a job's process may use: the worker's own cards, each held by one job at a time.

A GPU worker is started with the cards it owns (`RANKWISE_GPUS=0,1`, see the
README). A job asks for a number of cards; it takes them from its worker's
cards, all at once or none, and its process sees exactly those
(`CUDA_VISIBLE_DEVICES`). Each card is held through an exclusive `flock` on a
file of its own in a folder local to the host (`GPU_LOCK_DIR`), so:

- two jobs never hold one card at once, whether they run on one worker
  (`--concurrency` above 1) or on two workers whose device sets overlap by
  mistake;
- a job that asks for more cards than are free waits, holding none of them
  meanwhile (no two jobs each holding half of what the other needs);
- a lock is released by the kernel when its holders die: the worker's
  process and the job's launcher (which inherits the lock), so a card is
  never left locked by a worker that vanished, nor freed while the job's
  launcher still runs.

No Django here: the settings are passed in.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# A CUDA device as CUDA_VISIBLE_DEVICES names it: an index, or a GPU / MIG UUID.
DEVICE_PATTERN = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z-]+)$")
POLL_S = 0.5


class DevicesUnavailable(Exception):
    """The job asks for more cards than its worker owns: no wait would ever serve it."""


@dataclass
class DeviceLease:
    """The cards a job holds, and the open lock files that hold them (inherited by its launcher)."""

    devices: list[str]
    lock_fds: list[int] = field(default_factory=list)

    @property
    def cuda_visible_devices(self) -> str:
        """The job process's CUDA_VISIBLE_DEVICES: its cards, or none (empty) on a worker that owns none."""
        return ",".join(self.devices)

    def release(self) -> None:
        for fd in self.lock_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.lock_fds = []


def devices_parse(value: str) -> list[str]:
    """`"0,1"` → `["0", "1"]`; ValueError naming the fault for a malformed or repeated device."""
    if value.strip() == "":
        return []
    devices = [item.strip() for item in value.split(",")]
    for device in devices:
        if not DEVICE_PATTERN.match(device):
            raise ValueError(f"{device!r} is not a GPU index (0, 1, …) nor a GPU-/MIG- UUID")
    if len(set(devices)) != len(devices):
        raise ValueError(f"{value!r} names a device twice")
    return devices


def _lock_path(lock_dir: Path, device: str) -> Path:
    return lock_dir / f"gpu-{device}.lock"


def _lock_try(lock_dir: Path, device: str) -> int | None:
    """An open, exclusively locked file for `device`, or None if another job holds it."""
    fd = os.open(_lock_path(lock_dir, device), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def devices_try(*, count: int, owned: list[str], lock_dir: Path) -> DeviceLease | None:
    """Take `count` free cards of `owned` at once, or none (None): a job never holds part of what it needs."""
    lease = DeviceLease(devices=[])
    if count == 0:
        return lease
    lock_dir.mkdir(parents=True, exist_ok=True)
    for device in owned:
        fd = _lock_try(lock_dir, device)
        if fd is None:
            continue
        lease.devices.append(device)
        lease.lock_fds.append(fd)
        if len(lease.devices) == count:
            return lease
    lease.release()
    return None


@contextlib.contextmanager
def devices_held(
    *,
    count: int,
    owned: list[str],
    lock_dir: Path,
    keep_waiting: Callable[[], bool],
    poll_s: float = POLL_S,
) -> Iterator[DeviceLease | None]:
    """Hold `count` of the worker's cards for the block; waits while too few are free.

    A worker that owns no cards runs jobs on its CPUs: the lease is empty and
    the job sees no card at all. Yields None when `keep_waiting()` says the
    job no longer needs them (cancelled, taken by another worker). Raises
    DevicesUnavailable when the worker owns fewer cards than `count`.
    """
    if not owned:
        count = 0
    if count > len(owned):
        raise DevicesUnavailable(
            f"asks for {count} GPUs but this worker owns {len(owned)} ({','.join(owned)})"
        )
    lease = devices_try(count=count, owned=owned, lock_dir=lock_dir)
    while lease is None:
        if not keep_waiting():
            yield None
            return
        time.sleep(poll_s)
        lease = devices_try(count=count, owned=owned, lock_dir=lock_dir)
    try:
        yield lease
    finally:
        lease.release()
