"""The claim's gold-share counter (QueueCounter) equals a recount of the assignments, whoever writes them.

The database keeps the counter (triggers, annotation.counters) in the
transaction of each claim, skip, expiry or deletion. The tests here run on
whichever database the suite was given;
``test_the_counters_hold_on_the_sqlite_default`` runs this file again on
SQLite in a child process, so the SQLite triggers are covered too.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from annotation.counters import counters_recount
from annotation.models import Assignment, QueueCounter
from annotation.services import (
    AssignmentNotActive,
    JudgmentInput,
    LeaseTakenOver,
    assignment_claim_next,
    assignment_skip,
    assignments_expire_stale,
    judgment_submit,
)
from tests.annotation.conftest import add_member, make_people, run_on_sqlite


def _recount() -> dict[tuple[int, int], tuple[int, int]]:
    """(project, person) -> (shown, shown gold), counted from the assignments."""
    shown: Counter[tuple[int, int]] = Counter()
    gold: Counter[tuple[int, int]] = Counter()
    for project_id, user_id, is_gold in (
        Assignment.objects.exclude(status=Assignment.Status.SKIPPED)
        .order_by()
        .values_list("project_id", "user_id", "task__is_gold")
    ):
        shown[project_id, user_id] += 1
        gold[project_id, user_id] += int(is_gold)
    return {key: (shown[key], gold[key]) for key in shown}


def _counters() -> dict[tuple[int, int], tuple[int, int]]:
    """The kept counters, leaving out rows that count nothing (everything skipped or deleted)."""
    return {
        (project_id, user_id): (shown, gold)
        for project_id, user_id, shown, gold in QueueCounter.objects.values_list(
            "project_id", "user_id", "shown", "shown_gold"
        )
        if (shown, gold) != (0, 0)
    }


def _answer(assignment: Assignment, token: str) -> JudgmentInput:
    uids = [str(item.completion.uid) for item in assignment.task.items.select_related("completion")]
    ranks = {uids[position]: rank for rank, position in enumerate(assignment.permutation, start=1)}
    return JudgmentInput(ranks=ranks, client_token=token)


def _at_once(count: int, work) -> None:  # type: ignore[no-untyped-def]
    """Run work(index) in `count` threads started at the same instant; fail on any error or hang."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def target(index: int) -> None:
        try:
            barrier.wait()
            work(index)
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a claim hung"
    assert not errors, errors


@pytest.mark.django_db(transaction=True)
def test_after_concurrent_claims_skips_submits_expiries_and_deletions_the_counter_equals_the_recount(
    make_project,
) -> None:
    # given a project with gold tasks mixed in at 30%, and people who also claim from two tabs at once
    project = make_project(tasks=24, gold=6, k=2, overlap=2, gold_rate=0.3)
    people = [add_member(project, person) for person in make_people(6)]

    def work(index: int) -> None:
        person = people[index // 2]  # two threads per person: two tabs
        for round_ in range(4):
            assignment = assignment_claim_next(project=project, user=person)
            if assignment is None or assignment.status != Assignment.Status.ACTIVE:
                continue
            if round_ % 3 == 1:
                try:
                    assignment_skip(assignment=assignment, reason="unclear")
                except AssignmentNotActive:  # the other tab skipped or submitted it first
                    continue
            else:
                try:
                    judgment_submit(
                        assignment=assignment, user=person, answer=_answer(assignment, f"t{index}-{round_}")
                    )
                except (AssignmentNotActive, LeaseTakenOver):  # the other tab got there first
                    continue

    # when they work at the same instant
    _at_once(len(people) * 2, work)
    # and a few more claims are left to lapse and be reaped, and one person's assignments are deleted
    for person in people[:3]:
        assignment_claim_next(project=project, user=person)
    assignments_expire_stale(now=timezone.now() + timedelta(days=1))
    Assignment.objects.filter(user=people[-1], project=project).delete()

    # then every counter equals a recount of the assignments, gold included
    recount = _recount()
    assert _counters() == recount
    assert sum(shown for shown, _gold in recount.values()) > len(people)
    assert any(gold for _shown, gold in recount.values())
    assert Assignment.objects.filter(status=Assignment.Status.SKIPPED).exists()


@pytest.mark.django_db
def test_a_skip_gives_its_count_back_and_a_recount_repairs_a_wrong_counter(make_project) -> None:
    project = make_project(tasks=3, gold=1, k=2, gold_rate=0.5)
    (person,) = make_people(1)
    add_member(project, person)
    first = assignment_claim_next(project=project, user=person)
    assert first is not None and first.task.is_gold  # below the rate: gold first
    assert _counters() == {(project.pk, person.pk): (1, 1)}

    assignment_skip(assignment=first)
    assert _counters() == {}

    second = assignment_claim_next(project=project, user=person)
    assert second is not None and not second.task.is_gold  # the only gold task was skipped
    assert _counters() == {(project.pk, person.pk): (1, 0)}

    QueueCounter.objects.update(shown=99, shown_gold=7)
    counters_recount()
    assert _counters() == _recount() == {(project.pk, person.pk): (1, 0)}


@pytest.mark.django_db
def test_a_claim_costs_the_same_statements_whatever_the_persons_history(make_project) -> None:
    # given two labelers in a project with gold at 50%: one new, one with 40 tasks behind them
    # (20 of them gold), so that both are due a gold task next
    project = make_project(tasks=25, gold=25, k=2, overlap=2, gold_rate=0.5)
    new, veteran = (add_member(project, person) for person in make_people(2))
    for index in range(40):
        held = assignment_claim_next(project=project, user=veteran)
        judgment_submit(assignment=held, user=veteran, answer=_answer(held, f"v{index}"))

    def claim_statements(person) -> list[str]:  # type: ignore[no-untyped-def]
        with CaptureQueriesContext(connection) as queries:
            claimed = assignment_claim_next(project=project, user=person)
        assert claimed is not None and claimed.task.is_gold
        return [query["sql"] for query in queries.captured_queries]

    # when each claims their next task
    fresh, seasoned = claim_statements(new), claim_statements(veteran)

    # then both claims cost the same statements, and the gold share is read from the counter row,
    # not counted over the person's assignments
    assert len(fresh) == len(seasoned)
    assert any('FROM "annotation_queuecounter"' in sql for sql in seasoned)
    per_person_counts = [
        sql for sql in seasoned if "COUNT(" in sql.upper() and '"annotation_assignment"."user_id" =' in sql
    ]
    assert per_person_counts == []
    assert QueueCounter.objects.values_list("shown", "shown_gold").get(project=project, user=veteran) == (
        41,
        21,
    )


@pytest.mark.django_db
def test_the_counters_hold_on_the_sqlite_default(tmp_path: Path) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("this is the PostgreSQL run's check; the child run is on SQLite")
    output = run_on_sqlite(__file__, tmp_path, deselect="sqlite_default")
    assert "3 passed" in output, output[-2000:]
