"""Gold tasks: the labeler learns the expected ranking right after, where the project shows it; the
dashboard says when gold tasks exist that the gold rate never serves."""

from __future__ import annotations

import pytest

from annotation.models import Assignment, Judgment, Project, TaskCompletion
from annotation.roles import Role
from tests.annotation.conftest import add_member, make_people
from tests.annotation.test_api import token_client


def claim_and_answer(client, project: Project, ranks_for):  # type: ignore[no-untyped-def]
    claimed = client.post(f"/api/projects/{project.pk}/next").json()
    answer = {"ranks": ranks_for(claimed), "client_token": f"t-{claimed['id']}"}
    return client.post(f"/api/assignments/{claimed['id']}/judgment", answer, format="json")


@pytest.mark.django_db
def test_a_gold_answer_returns_the_expected_ranking_and_whether_it_matched(make_project):
    # given a project that serves only gold tasks and shows the expected ranking
    project = make_project(tasks=0, gold=2, k=3, gold_rate=1.0, gold_feedback=True)
    labeler = add_member(project, make_people(1)[0], Role.LABELER)
    client = token_client(labeler)

    # when the labeler gives the gold answer, then the reverse one on the next gold task
    right = claim_and_answer(client, project, lambda claimed: dict(_gold_of_uids(claimed)))
    wrong = claim_and_answer(
        client, project, lambda claimed: {uid: 4 - rank for uid, rank in _gold_of_uids(claimed)}
    )

    # then each answer says what was expected (by completion id), and whether it matched
    assert right.status_code == 201 and wrong.status_code == 201
    assert right.json()["gold"]["matched"] is True
    assert wrong.json()["gold"]["matched"] is False
    for response in (right, wrong):
        judgment = Judgment.objects.get(pk=response.json()["judgment"])
        assert response.json()["gold"]["expected"] == dict(_gold_of_uids({"id": judgment.assignment_id}))


def _gold_of(claimed: dict) -> list[tuple[TaskCompletion, int]]:
    task = Assignment.objects.get(pk=claimed["id"]).task
    items = TaskCompletion.objects.filter(task=task).order_by("position").select_related("completion")
    return list(zip(items, task.gold_ranks, strict=True))


def _gold_of_uids(claimed: dict) -> list[tuple[str, int]]:
    return [(str(item.completion.uid), rank) for item, rank in _gold_of(claimed)]


@pytest.mark.django_db
def test_no_expected_ranking_is_returned_when_the_project_does_not_show_it_or_the_task_is_not_gold(
    make_project,
):
    hidden = make_project(tasks=0, gold=1, k=2, gold_rate=1.0, gold_feedback=False, name="hidden")
    regular = make_project(tasks=1, k=2, gold_feedback=True, name="regular")
    labeler = make_people(1)[0]
    for project in (hidden, regular):
        add_member(project, labeler, Role.LABELER)
    client = token_client(labeler)

    for project in (hidden, regular):
        response = claim_and_answer(
            client, project, lambda claimed: {c["id"]: n for n, c in enumerate(claimed["completions"], 1)}
        )
        assert response.status_code == 201
        assert "gold" not in response.json()


@pytest.mark.django_db
def test_the_dashboard_warns_when_gold_tasks_exist_but_the_gold_rate_serves_none(make_project, client):
    silent = make_project(tasks=2, gold=3, k=2, gold_rate=0.0, name="silent gold")
    served = make_project(tasks=2, gold=3, k=2, gold_rate=0.2, name="served gold")
    manager = make_people(1, prefix="boss")[0]
    for project in (silent, served):
        add_member(project, manager, Role.MANAGER)
    client.force_login(manager)

    warned = client.get(f"/manage/projects/{silent.pk}/").content.decode()
    quiet = client.get(f"/manage/projects/{served.pk}/").content.decode()

    assert "3 gold tasks" in warned and "gold rate is 0" in warned
    assert "gold rate is 0" not in quiet
