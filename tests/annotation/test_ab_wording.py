"""An A/B session's manager pages speak of evaluators and votes, and say plainly when there is nothing yet."""

from __future__ import annotations

import pytest

from annotation.models import Policy
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.annotation.test_ab import session
from tests.factories import user_with_roles


@pytest.fixture
def empty_session(db):  # type: ignore[no-untyped-def]
    policies = [Policy.objects.create(name="wording-a"), Policy.objects.create(name="wording-b")]
    manager = user_with_roles(Role.MANAGER, username="wordsmith")
    project = session(policies, manager, prompts=2)
    add_member(project, manager, Role.MANAGER)
    return project, manager


def test_an_ab_sessions_dashboard_speaks_of_evaluators_not_labelers_gold_or_imports(client, empty_session):
    project, manager = empty_session
    client.force_login(manager)

    page = client.get(f"/manage/projects/{project.pk}/").content.decode()

    assert "Gold accuracy" not in page
    assert "Import prompts" not in page
    assert "per labeler" not in page and "<h2>Labelers</h2>" not in page


def test_the_results_of_a_session_without_votes_say_so_instead_of_dashes(client, empty_session):
    project, manager = empty_session
    client.force_login(manager)

    page = client.get(f"/manage/projects/{project.pk}/results").content.decode()

    assert "agreed – of the time" not in page
    assert "– – –" not in page and "interval – –" not in page
    assert "No two evaluators have voted on the same pair yet." in page
    assert "No decisive votes yet" in page
