"""The SQLite default serves the web process's writers first come, first served (config.sqlite_backend).

``test_the_sqlite_default_runs_this_file`` runs this file again on SQLite in a
child process, so ``make test`` on PostgreSQL covers the SQLite run too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from django.db import connection, connections

from annotation.models import Assignment
from annotation.services import assignment_claim_next
from config.sqlite_backend.base import WriterQueue
from tests.annotation.conftest import add_member, make_people, run_on_sqlite

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(4000):
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting until {what}")


def test_writers_get_their_turn_in_the_order_they_asked() -> None:
    queue = WriterQueue()
    assert queue.acquire(timeout=1)
    served: list[int] = []

    def writer(number: int) -> None:
        assert queue.acquire(timeout=60)
        served.append(number)
        queue.release()

    threads = []
    for number in range(8):
        thread = threading.Thread(target=writer, args=(number,))
        thread.start()
        threads.append(thread)
        # The next writer asks only once this one is queued behind the holder.
        wait_until(lambda number=number: queue.waiting == number + 2, f"writer {number} is queued")
    queue.release()
    for thread in threads:
        thread.join(timeout=60)
    assert served == list(range(8))
    assert queue.waiting == 0


def test_a_writer_that_gives_up_does_not_block_the_ones_behind_it() -> None:
    queue = WriterQueue()
    assert queue.acquire(timeout=1)
    assert not queue.acquire(timeout=0.01)  # gives up; its ticket is skipped
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(queue.acquire(timeout=60)))
    thread.start()
    wait_until(lambda: queue.waiting == 3, "the third writer is queued")
    queue.release()
    thread.join(timeout=60)
    assert got == [True]
    queue.release()
    assert queue.waiting == 0


@pytest.mark.skipif(connection.vendor != "sqlite", reason="runs in the SQLite child run")
@pytest.mark.django_db(transaction=True)
def test_24_labelers_claiming_at_once_on_the_sqlite_default_all_get_distinct_tasks(make_project) -> None:
    assert type(connections["default"]).__module__ == "config.sqlite_backend.base"
    project = make_project(tasks=80, k=2)
    people = [add_member(project, person) for person in make_people(24)]
    claimed: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(people))

    def labeler(person) -> None:  # type: ignore[no-untyped-def]
        try:
            start.wait()
            for _ in range(3):
                assignment = assignment_claim_next(project=project, user=person)
                assert assignment is not None
                claimed.append((person.pk, assignment.task_id))
                # Let the lease go, so the next claim is a fresh write.
                Assignment.objects.filter(pk=assignment.pk).update(status=Assignment.Status.EXPIRED)
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=labeler, args=(person,)) for person in people]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a claim hung"
    assert not errors, errors
    assert len(claimed) == 72
    # No two labelers held one task at the same time: every active lease is on its own task.
    active = Assignment.objects.filter(status=Assignment.Status.ACTIVE)
    assert active.count() == active.values("task").distinct().count()


@pytest.mark.skipif(connection.vendor != "sqlite", reason="runs in the SQLite child run")
@pytest.mark.django_db(transaction=True)
def test_a_write_outside_a_transaction_waits_for_its_turn_too(make_project) -> None:
    from annotation.models import Project
    from config.sqlite_backend.base import WRITERS

    project = make_project(tasks=1, k=2)
    assert WRITERS.acquire(timeout=5)  # an earlier writer of this process holds the turn
    done: list[bool] = []

    def rename() -> None:
        try:
            Project.objects.filter(pk=project.pk).update(name="renamed")  # autocommit: no atomic block
            done.append(True)
        finally:
            connections.close_all()

    thread = threading.Thread(target=rename)
    try:
        thread.start()
        wait_until(lambda: WRITERS.waiting == 2, "the write is queued behind the holder")
        assert not done
    finally:
        WRITERS.release()
    thread.join(timeout=60)
    assert done == [True]
    assert Project.objects.get(pk=project.pk).name == "renamed"


@pytest.mark.skipif(connection.vendor == "sqlite", reason="this is the SQLite run")
def test_the_sqlite_default_runs_this_file(tmp_path: Path) -> None:
    output = run_on_sqlite(__file__, tmp_path, deselect="sqlite_default_runs")
    assert "4 passed" in output, output[-2000:]
