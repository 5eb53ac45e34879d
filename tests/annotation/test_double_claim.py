"""One person claiming from two tabs at once holds one lease, on PostgreSQL and on the SQLite default.

The tests here run on whichever database the suite was given;
``test_the_same_races_hold_on_the_sqlite_default`` runs this file again on
SQLite in a child process, so ``make test`` covers both.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from django.db import connection, connections

from annotation.models import Assignment
from annotation.services import assignment_claim_next
from tests.annotation.conftest import add_member, make_people, run_on_sqlite

REPO_ROOT = Path(__file__).resolve().parents[2]


def claim_at_once(project, person, tabs: int) -> list[Assignment | None]:  # type: ignore[no-untyped-def]
    barrier = threading.Barrier(tabs)
    results: list[Assignment | None] = []
    errors: list[BaseException] = []

    def tab() -> None:
        try:
            barrier.wait()
            results.append(assignment_claim_next(project=project, user=person))
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=tab) for _ in range(tabs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a claim hung"
    assert not errors, errors
    return results


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("tabs", [2, 10])
def test_simultaneous_claims_by_one_person_all_get_the_same_single_lease(make_project, tabs: int) -> None:
    # given a project with plenty of open tasks and one labeler
    project = make_project(tasks=20, k=2)
    person = add_member(project, make_people(1)[0])

    # when the labeler claims from several tabs at the same instant, a few times over
    for _round in range(3):
        results = claim_at_once(project, person, tabs)

        # then every tab got the same assignment, and only one is active
        assert {assignment.pk for assignment in results if assignment is not None} == {results[0].pk}
        active = Assignment.objects.filter(project=project, user=person, status=Assignment.Status.ACTIVE)
        assert active.count() == 1
        active.update(status=Assignment.Status.SUBMITTED)
    assert Assignment.objects.filter(project=project, user=person).count() == 3


@pytest.mark.django_db
def test_the_database_refuses_a_second_active_lease_for_one_person_in_a_project(make_project) -> None:
    from django.db import IntegrityError, transaction

    project = make_project(tasks=3, k=2)
    person = add_member(project, make_people(1)[0])
    held = assignment_claim_next(project=project, user=person)
    other_task = project.tasks.exclude(pk=held.task_id).first()
    with pytest.raises(IntegrityError), transaction.atomic():
        Assignment.objects.create(
            task=other_task,
            user=person,
            slot=0,
            permutation=[0, 1],
            leased_at=held.leased_at,
            lease_expires_at=held.lease_expires_at,
        )


@pytest.mark.django_db
def test_a_person_whose_lease_ran_out_gets_a_new_one_and_the_old_slot_is_freed(make_project) -> None:
    from datetime import timedelta

    project = make_project(tasks=3, k=2)
    person = add_member(project, make_people(1)[0])
    first = assignment_claim_next(project=project, user=person)
    later = first.lease_expires_at + timedelta(seconds=1)

    second = assignment_claim_next(project=project, user=person, now=later)

    assert second is not None and second.pk != first.pk
    first.refresh_from_db()
    assert first.status == Assignment.Status.EXPIRED


@pytest.mark.skipif(connection.vendor == "sqlite", reason="this is the SQLite run")
def test_the_same_races_hold_on_the_sqlite_default(tmp_path: Path) -> None:
    output = run_on_sqlite(__file__, tmp_path, deselect="sqlite_default")
    assert "4 passed" in output, output[-2000:]
