"""The task queue: claims, leases, skips and submits, on PostgreSQL."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.db import OperationalError, connection, connections, transaction
from django.db.models import Count
from django.utils import timezone

from annotation.models import Assignment, Comparison, Judgment, Task
from annotation.services import (
    AssignmentNotActive,
    JudgmentInput,
    LeaseTakenOver,
    assignment_claim_next,
    assignment_skip,
    assignments_expire_stale,
    judgment_submit,
)
from tests.annotation.conftest import add_member, make_people


def _answer(assignment: Assignment, token: str) -> JudgmentInput:
    """Rank the completions in display order: the first shown is best."""
    uids = [str(item.completion.uid) for item in assignment.task.items.select_related("completion")]
    by_position = dict(enumerate(uids))
    ranks = {by_position[position]: rank for rank, position in enumerate(assignment.permutation, start=1)}
    return JudgmentInput(ranks=ranks, client_token=token)


def _run_in_threads(people: list, work) -> list[BaseException]:  # type: ignore[no-untyped-def]
    """Start one thread per person at the same instant; return the exceptions they raised."""
    barrier = threading.Barrier(len(people))
    errors: list[BaseException] = []

    def target(person) -> None:  # type: ignore[no-untyped-def]
        try:
            barrier.wait()
            work(person)
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=target, args=(person,)) for person in people]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a claimer hung (deadlock?)"
    return errors


pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="locking is tested on PostgreSQL")


@pytest.mark.django_db(transaction=True)
def test_32_people_claiming_at_once_never_share_a_task_and_all_200_get_done(make_project):
    # given 200 tasks that each want one judgment, and 32 labelers
    project = make_project(tasks=200, k=2, overlap=1)
    people = make_people(32)
    for person in people:
        add_member(project, person)
    done: Counter[int] = Counter()

    def work(person) -> None:  # type: ignore[no-untyped-def]
        while (assignment := assignment_claim_next(project=project, user=person)) is not None:
            judgment_submit(
                assignment=assignment, user=person, answer=_answer(assignment, f"t{assignment.pk}")
            )
            done[person.pk] += 1

    # when they all claim and submit as fast as they can
    errors = _run_in_threads(people, work)

    # then nothing failed, every task has exactly one judgment and nobody had a task twice
    assert errors == []
    assert sum(done.values()) == 200
    assert Judgment.objects.count() == 200
    assert set(Task.objects.values_list("judgment_count", flat=True)) == {1}
    per_task = Assignment.objects.values("task").annotate(n=Count("id")).filter(n__gt=1)
    assert list(per_task) == []
    assert Comparison.objects.count() == 200  # C(2,2) per judgment


@pytest.mark.django_db(transaction=True)
def test_32_simultaneous_first_claims_get_32_different_tasks(make_project):
    project = make_project(tasks=200, k=3, overlap=1)
    people = make_people(32)
    for person in people:
        add_member(project, person)
    claimed: dict[int, int] = {}

    def work(person) -> None:  # type: ignore[no-untyped-def]
        assignment = assignment_claim_next(project=project, user=person)
        claimed[person.pk] = assignment.task_id

    assert _run_in_threads(people, work) == []
    assert len(claimed) == 32
    assert len(set(claimed.values())) == 32


@pytest.mark.django_db(transaction=True)
def test_with_overlap_3_and_10_people_each_task_gets_exactly_3_different_people(make_project):
    project = make_project(tasks=40, k=4, overlap=3)
    people = make_people(10)
    for person in people:
        add_member(project, person)

    def work(person) -> None:  # type: ignore[no-untyped-def]
        while (assignment := assignment_claim_next(project=project, user=person)) is not None:
            judgment_submit(
                assignment=assignment, user=person, answer=_answer(assignment, f"t{assignment.pk}")
            )

    assert _run_in_threads(people, work) == []
    judges = Judgment.objects.values("task").annotate(n=Count("user", distinct=True), total=Count("id"))
    assert {(row["n"], row["total"]) for row in judges} == {(3, 3)}
    assert judges.count() == 40
    assert Comparison.objects.count() == 40 * 3 * 6  # C(4,2) = 6 per judgment


@pytest.mark.django_db(transaction=True)
def test_while_all_slots_are_leased_nobody_else_gets_the_task(make_project):
    # given one task wanting 3 judgments, leased to 3 people at once
    project = make_project(tasks=1, k=2, overlap=3)
    people = make_people(12)
    for person in people:
        add_member(project, person)
    results: dict[int, Assignment | None] = {}

    def work(person) -> None:  # type: ignore[no-untyped-def]
        results[person.pk] = assignment_claim_next(project=project, user=person)

    assert _run_in_threads(people, work) == []
    got = [a for a in results.values() if a is not None]
    assert len(got) == 3
    assert sorted(a.slot for a in got) == [0, 1, 2]


@pytest.mark.django_db
def test_claiming_again_returns_the_lease_you_hold(make_project):
    project = make_project(tasks=5)
    (person,) = make_people(1)
    add_member(project, person)
    first = assignment_claim_next(project=project, user=person)
    again = assignment_claim_next(project=project, user=person)
    assert again.pk == first.pk


@pytest.mark.django_db
def test_each_person_sees_a_stored_random_permutation(make_project):
    project = make_project(tasks=30, k=4)
    (person,) = make_people(1)
    add_member(project, person)
    permutations = set()
    for index in range(30):
        assignment = assignment_claim_next(project=project, user=person)
        assert sorted(assignment.permutation) == [0, 1, 2, 3]
        permutations.add(tuple(assignment.permutation))
        judgment_submit(assignment=assignment, user=person, answer=_answer(assignment, f"t{index}"))
    # 30 draws from 24 orders: identical orders every time would mean no shuffling.
    assert len(permutations) > 5


@pytest.mark.django_db
def test_tasks_closest_to_done_come_first(make_project):
    project = make_project(tasks=3, k=2, overlap=2)
    alice, bob = make_people(2)
    add_member(project, alice)
    add_member(project, bob)
    first = assignment_claim_next(project=project, user=alice)
    judgment_submit(assignment=first, user=alice, answer=_answer(first, "a1"))
    # bob gets the task alice already judged once: one more judgment finishes it
    assert assignment_claim_next(project=project, user=bob).task_id == first.task_id


@pytest.mark.django_db
def test_a_skip_releases_the_lease_and_is_never_offered_again(make_project):
    project = make_project(tasks=2, k=2, overlap=1)
    alice, bob = make_people(2)
    add_member(project, alice)
    add_member(project, bob)
    skipped = assignment_claim_next(project=project, user=alice)
    assignment_skip(assignment=skipped, reason="I cannot read this language")
    skipped.refresh_from_db()
    assert skipped.status == Assignment.Status.SKIPPED
    assert skipped.skip_reason == "I cannot read this language"
    # alice moves on to the other task; bob can take the skipped one
    assert assignment_claim_next(project=project, user=alice).task_id != skipped.task_id
    assert assignment_claim_next(project=project, user=bob).task_id == skipped.task_id
    with pytest.raises(AssignmentNotActive):
        assignment_skip(assignment=skipped)


@pytest.mark.django_db
def test_an_expired_lease_returns_the_task_to_the_pool(make_project):
    project = make_project(tasks=1, k=2, overlap=1, lease_minutes=10)
    alice, bob = make_people(2)
    add_member(project, alice)
    add_member(project, bob)
    now = timezone.now()
    held = assignment_claim_next(project=project, user=alice, now=now)
    assert assignment_claim_next(project=project, user=bob, now=now + timedelta(minutes=5)) is None
    taken = assignment_claim_next(project=project, user=bob, now=now + timedelta(minutes=11))
    assert taken.task_id == held.task_id
    held.refresh_from_db()
    assert held.status == Assignment.Status.EXPIRED


@pytest.mark.django_db
def test_a_late_submit_is_kept_when_nobody_took_the_task_over(make_project):
    project = make_project(tasks=1, k=3, overlap=1, lease_minutes=10)
    (alice,) = make_people(1)
    add_member(project, alice)
    now = timezone.now()
    held = assignment_claim_next(project=project, user=alice, now=now)
    assert assignments_expire_stale(now=now + timedelta(minutes=30)) == 1
    result = judgment_submit(
        assignment=held, user=alice, answer=_answer(held, "late"), now=now + timedelta(minutes=30)
    )
    assert result.created
    held.refresh_from_db()
    assert held.status == Assignment.Status.SUBMITTED


@pytest.mark.django_db
def test_a_late_submit_after_a_takeover_is_refused_and_stores_nothing(make_project):
    project = make_project(tasks=1, k=3, overlap=1, lease_minutes=10)
    alice, bob = make_people(2)
    add_member(project, alice)
    add_member(project, bob)
    now = timezone.now()
    held = assignment_claim_next(project=project, user=alice, now=now)
    assignment_claim_next(project=project, user=bob, now=now + timedelta(minutes=11))
    with pytest.raises(LeaseTakenOver):
        judgment_submit(
            assignment=held, user=alice, answer=_answer(held, "late"), now=now + timedelta(minutes=12)
        )
    assert Judgment.objects.count() == 0
    assert Comparison.objects.count() == 0


@pytest.mark.django_db
def test_submitting_twice_with_the_same_token_stores_one_judgment(make_project):
    project = make_project(tasks=1, k=4)
    (alice,) = make_people(1)
    add_member(project, alice)
    held = assignment_claim_next(project=project, user=alice)
    first = judgment_submit(assignment=held, user=alice, answer=_answer(held, "same"))
    second = judgment_submit(assignment=held, user=alice, answer=_answer(held, "same"))
    assert first.created and not second.created
    assert second.judgment.pk == first.judgment.pk
    assert Judgment.objects.count() == 1
    assert Comparison.objects.count() == 6
    assert Task.objects.get().judgment_count == 1
    # a second, different answer to the same assignment is refused
    with pytest.raises(AssignmentNotActive):
        judgment_submit(assignment=held, user=alice, answer=_answer(held, "other"))


@pytest.mark.django_db
def test_gold_tasks_are_mixed_in_at_the_gold_rate(make_project):
    project = make_project(tasks=40, gold=10, k=2, overlap=1, gold_rate=0.2)
    (alice,) = make_people(1)
    add_member(project, alice)
    kinds = []
    for index in range(30):
        assignment = assignment_claim_next(project=project, user=alice)
        kinds.append(assignment.task.is_gold)
        judgment_submit(assignment=assignment, user=alice, answer=_answer(assignment, f"g{index}"))
    assert sum(kinds) == 6  # 20% of 30
    # spread through the session, not bunched at the start
    assert 1 <= sum(kinds[:10]) <= 3


@pytest.mark.django_db
def test_a_gold_task_goes_to_every_labeler_beyond_the_overlap(make_project):
    project = make_project(tasks=0, gold=1, k=2, overlap=1, gold_rate=1.0)
    people = make_people(3)
    for person in people:
        add_member(project, person)
    claims = [assignment_claim_next(project=project, user=person) for person in people]
    assert all(claim is not None and claim.task.is_gold for claim in claims)
    assert sorted(claim.slot for claim in claims) == [0, 1, 2]


def _lockable_from_another_connection(table: str, pk: int) -> bool:
    """Whether another connection could lock the row right now (NOWAIT: it never waits)."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR NO KEY UPDATE NOWAIT", [pk])  # noqa: S608 — our table names
                answer.append(cursor.fetchone() is not None)
        except OperationalError:
            answer.append(False)
        finally:
            connections.close_all()

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join(timeout=30)
    return answer == [True]


@pytest.mark.django_db(transaction=True)
def test_a_submit_locks_its_task_but_not_the_project_so_submits_do_not_queue_on_it(make_project):
    # given a labeler's lease
    project = make_project(tasks=2, k=2, overlap=1)
    (alice,) = make_people(1)
    add_member(project, alice)
    held = assignment_claim_next(project=project, user=alice)

    # when her submit's transaction is still open
    with transaction.atomic():
        judgment_submit(assignment=held, user=alice, answer=_answer(held, "t1"))
        rows = {
            "annotation_task": held.task_id,
            "annotation_project": project.pk,
            "annotation_prompt": held.task.prompt_id,
        }
        lockable = {table: _lockable_from_another_connection(table, pk) for table, pk in rows.items()}

    # then only the task is held: another task's submit could take the project and prompt rows' locks
    assert lockable == {"annotation_task": False, "annotation_project": True, "annotation_prompt": True}


@pytest.mark.django_db(transaction=True)
def test_a_retry_sent_while_the_first_submit_is_being_stored_gets_that_judgment_back(make_project):
    # given a lease and one answer, sent twice at the same instant (a client retrying too early)
    project = make_project(tasks=1, k=3)
    (alice,) = make_people(1)
    add_member(project, alice)
    held = assignment_claim_next(project=project, user=alice)
    answer = _answer(held, "same")
    results = []

    def send(_attempt: str) -> None:
        results.append(
            judgment_submit(assignment=Assignment.objects.get(pk=held.pk), user=alice, answer=answer)
        )

    # when both reach the service together
    errors = _run_in_threads(["first", "retry"], send)

    # then one stored the judgment and the other got it back, not a conflict
    assert errors == []
    assert sorted(result.created for result in results) == [False, True]
    assert len({result.judgment.pk for result in results}) == 1
    assert {result.comparisons for result in results} == {3}
    assert Judgment.objects.count() == 1
    assert Comparison.objects.count() == 3
    assert Task.objects.get().judgment_count == 1
