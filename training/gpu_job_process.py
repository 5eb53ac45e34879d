"""What a GPU job's own process (generation, scoring) does around its work: start Django, read the
spec, heartbeat at a bounded rate, and record an unexpected error on the job's row."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

HEARTBEAT_EVERY_S = 5.0


class Heartbeat:
    """Rate-limited heartbeats on the job's row; remembers whether the attempt still owns the job.

    `beat()` writes one heartbeat and says whether the attempt still owns the job.
    """

    def __init__(self, beat: Callable[[], bool]) -> None:
        self.beat = beat
        self.last = time.monotonic()
        self.owned = True

    def __call__(self) -> None:
        if time.monotonic() - self.last < HEARTBEAT_EVERY_S:
            return
        from django.db import close_old_connections

        # A connection that died (PostgreSQL restarted) is replaced, not reused.
        close_old_connections()
        self.owned = self.beat()
        self.last = time.monotonic()


def attempt_stop(
    *,
    stop_reason: Callable[[], str | None],
    mark_cancelled: Callable[[], bool],
    heartbeat: Heartbeat,
    log: Callable[[str], Any],
    done: str,
) -> str | None:
    """Checked between batches: "cancelled" (a cancel was asked for; the job is marked so), "lost"
    (the job is no longer this attempt's), or None to go on. `done` says what was written so far."""
    stop = stop_reason()
    if stop == "cancel":
        mark_cancelled()
        log(f"cancelled after {done}")
        return "cancelled"
    if stop is not None or not heartbeat.owned:
        log("the job is no longer this attempt's; stopping")
        return "lost"
    return None


def gpu_job_main(
    argv: list[str] | None,
    *,
    module: str,
    kind: str,
    load: Callable[[str], Any],
    run: Callable[..., str],
    fail: Callable[..., bool],
) -> int:
    """`python -m <module> SPEC.json`: run the job; an exception fails the attempt with its traceback."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import django

    django.setup()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {module} SPEC.json", file=sys.stderr)
        return 2
    spec = load(args[0])
    print(f"{kind} job {spec.job_id}: attempt {spec.attempt} started", flush=True)
    try:
        run(spec, log=lambda line: print(line, flush=True))
    except Exception as error:
        traceback.print_exc()
        fail(
            job_id=spec.job_id,
            error=f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}",
            from_statuses=("running",),
            attempt=spec.attempt,
        )
        return 1
    return 0
