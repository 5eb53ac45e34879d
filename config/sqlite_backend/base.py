"""SQLite, the embedded default, with its writers served in the order they came.

SQLite lets one transaction write at a time. With `BEGIN IMMEDIATE` a second
writer waits in SQLite's busy handler, which sleeps and retries (1, 2, 5 …
100 ms) instead of queueing: under a team of labelers claiming at once, a
writer that arrives later often gets the lock before one that has been
waiting for seconds. The median claim stays fast, the slowest are not (p95 of
several seconds with 24 labelers on the development server).

This backend puts the web process's writers in a first-come, first-served
queue before `BEGIN IMMEDIATE`: a thread takes a ticket and waits on a
condition until its number is served (or SQLite's own timeout passes), then
begins; the lock is handed on
when its transaction commits or rolls back (or its connection closes). Only
one thread of this process asks SQLite for the write lock at a time, so it
waits in the busy handler only for another process (a Celery worker), whose
writes are short.

The guarantees of a claim are SQLite's own and unchanged: the transaction
still begins IMMEDIATE and holds the database's write lock until it ends.
`SQLITE_FAIR_WRITES=0` turns the queue off (the benchmark measures the plain
backend beside it).
"""

from __future__ import annotations

import threading
import time

from django.conf import settings
from django.db.backends.sqlite3 import base


class WriterQueue:
    """A first-come, first-served lock (a ticket lock): `acquire` blocks until every earlier ticket was released."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._abandoned: set[int] = set()

    def acquire(self, timeout: float) -> bool:
        """Wait for this caller's turn; False (and the ticket given up) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abandoned.add(ticket)
                    return False
                self._condition.wait(left)
            return True

    def release(self) -> None:
        with self._condition:
            self._serving += 1
            # Tickets whose holders gave up waiting are skipped.
            while self._serving in self._abandoned:
                self._abandoned.remove(self._serving)
                self._serving += 1
            self._condition.notify_all()

    @property
    def waiting(self) -> int:
        """How many threads hold or wait for the lock."""
        with self._condition:
            return self._next_ticket - self._serving


WRITERS = WriterQueue()


class DatabaseWrapper(base.DatabaseWrapper):
    holds_writer_turn = False

    def _writer_turn_release(self) -> None:
        if self.holds_writer_turn:
            self.holds_writer_turn = False
            WRITERS.release()

    def _start_transaction_under_autocommit(self) -> None:
        if not getattr(settings, "SQLITE_FAIR_WRITES", True) or self.holds_writer_turn:
            super()._start_transaction_under_autocommit()
            return
        # As long as SQLite itself would wait for the lock, then the error it would give.
        if not WRITERS.acquire(timeout=float(self.settings_dict.get("OPTIONS", {}).get("timeout", 5))):
            raise base.Database.OperationalError(
                "database is locked (waited for this process's earlier writers)"
            )
        self.holds_writer_turn = True
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            self._writer_turn_release()
            raise

    def _commit(self) -> None:
        try:
            super()._commit()
        finally:
            self._writer_turn_release()

    def _rollback(self) -> None:
        try:
            super()._rollback()
        finally:
            self._writer_turn_release()

    def _close(self) -> None:
        try:
            super()._close()
        finally:
            self._writer_turn_release()
