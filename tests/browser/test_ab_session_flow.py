"""A manager makes a blind A/B session in real Chromium, adds an evaluator, and reaches the results from Manage."""

from __future__ import annotations

import pytest

from annotation.models import Membership, Policy, Project
from annotation.roles import Role
from annotation.services import ab_session_create
from tests.annotation.conftest import add_member
from tests.annotation.test_ab import source_prompts
from tests.factories import user_with_roles

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_manager_creates_a_session_adds_an_evaluator_and_opens_its_results_from_manage(
    open_page, live_server, artifacts_dir
):
    # given two imported policies that answered every prompt of a project the manager runs
    policies = [Policy.objects.create(name="vendor-a"), Policy.objects.create(name="vendor-b")]
    source = source_prompts(3, policies)[0].project
    manager = add_member(source, user_with_roles(Role.MANAGER, username="host"), Role.MANAGER)
    voter = user_with_roles(username="voter")
    page, watch = open_page(manager)

    # when the manager fills the session form from the Manage page
    page.goto(f"{live_server.url}/manage/")
    page.click("text=New A/B session")
    page.fill("#id_name", "vendors")
    page.select_option("#id_source_project", str(source.pk))
    for policy in policies:
        page.check(f"input[name=policies][value='{policy.pk}']")
    page.fill("#id_votes_per_pair", "1")
    page.click("main button[type=submit]")

    # then the session's page says it is open, with its pairs
    session = Project.objects.get(name="vendors")
    page.wait_for_url(f"{live_server.url}/ab-sessions/{session.pk}/")
    assert page.get_attribute("#session-state", "data-state") == "open"
    assert "3 pairs to vote on" in page.inner_text("#session-state")

    # when an evaluator is added by username
    page.fill("#id_username", "voter")
    page.click("text=Add as evaluator")

    # then they are listed, and are an evaluator of the session
    page.wait_for_selector("#evaluators")
    assert "voter" in page.inner_text("#evaluators")
    assert Membership.objects.filter(project=session, user=voter, role=Role.EVALUATOR).exists()
    page.screenshot(path=str(artifacts_dir / "ab-session-page.png"), full_page=True)

    # and Manage links the session's results
    page.goto(f"{live_server.url}/manage/")
    page.click(f"a[href='/manage/projects/{session.pk}/results']")
    page.wait_for_url(f"{live_server.url}/manage/projects/{session.pk}/results")
    assert watch.errors == []


def test_an_unknown_username_is_refused_on_the_session_page(open_page, live_server):
    policies = [Policy.objects.create(name="vendor-a"), Policy.objects.create(name="vendor-b")]
    source = source_prompts(2, policies)[0].project
    manager = add_member(source, user_with_roles(Role.MANAGER, username="host"), Role.MANAGER)
    session = ab_session_create(
        name="s", policies=policies, prompts=list(source.prompts.all()), votes_per_pair=1, created_by=manager
    )
    page, _watch = open_page(manager)
    page.goto(f"{live_server.url}/ab-sessions/{session.pk}/")
    page.fill("#id_username", "nobody-here")
    page.click("text=Add as evaluator")
    page.wait_for_selector("[role=alert]")
    assert "no account that can be added is named 'nobody-here'" in page.inner_text("[role=alert]")
    assert not Membership.objects.filter(project=session, role=Role.EVALUATOR).exists()
