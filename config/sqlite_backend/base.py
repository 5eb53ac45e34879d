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

A write outside a transaction (autocommit: a flag set after a commit) takes
its turn for that one statement in the same queue.

The guarantees of a claim are SQLite's own and unchanged: the transaction
still begins IMMEDIATE and holds the database's write lock until it ends.
`SQLITE_FAIR_WRITES=0` turns the queue off (the benchmark measures the plain
backend beside it).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.db.backends.sqlite3 import base
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper


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


# A statement that writes (SQLite takes the write lock for it when it runs outside a transaction).
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class _FairWrites:
    """Mixed into the cursor wrappers: a write outside a transaction takes its turn in the queue too.

    (Inside `atomic` the turn was taken at BEGIN IMMEDIATE.) Without this, the
    autocommit writes a request makes after its transaction (a flag set on
    commit, a last-login stamp) would wait in SQLite's busy handler, in no order.
    """

    db: DatabaseWrapper

    def execute(self, sql: str, params: Any = None) -> Any:
        with self.db.writer_turn_for(sql):
            return super().execute(sql, params)  # type: ignore[misc]

    def executemany(self, sql: str, param_list: Any) -> Any:
        with self.db.writer_turn_for(sql):
            return super().executemany(sql, param_list)  # type: ignore[misc]


class FairCursorWrapper(_FairWrites, CursorWrapper):
    pass


class FairCursorDebugWrapper(_FairWrites, CursorDebugWrapper):
    pass


class DatabaseWrapper(base.DatabaseWrapper):
    holds_writer_turn = False

    @property
    def fair_writes(self) -> bool:
        return bool(getattr(settings, "SQLITE_FAIR_WRITES", True))

    def _writer_turn_take(self) -> None:
        # As long as SQLite itself would wait for the lock, then the error it would give.
        if not WRITERS.acquire(timeout=float(self.settings_dict.get("OPTIONS", {}).get("timeout", 5))):
            raise base.Database.OperationalError(
                "database is locked (waited for this process's earlier writers)"
            )
        self.holds_writer_turn = True

    def _writer_turn_release(self) -> None:
        if self.holds_writer_turn:
            self.holds_writer_turn = False
            WRITERS.release()

    @contextlib.contextmanager
    def writer_turn_for(self, sql: str) -> Iterator[None]:
        """Around one statement: its turn, when it writes outside a transaction."""
        if (
            not self.fair_writes
            or self.holds_writer_turn
            or self.in_atomic_block
            or not sql.lstrip().upper().startswith(_WRITES)
        ):
            yield
            return
        self._writer_turn_take()
        try:
            yield
        finally:
            self._writer_turn_release()

    def make_cursor(self, cursor: Any) -> CursorWrapper:
        return FairCursorWrapper(cursor, self)

    def make_debug_cursor(self, cursor: Any) -> CursorDebugWrapper:
        return FairCursorDebugWrapper(cursor, self)

    def _start_transaction_under_autocommit(self) -> None:
        if not self.fair_writes or self.holds_writer_turn:
            super()._start_transaction_under_autocommit()
            return
        self._writer_turn_take()
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
