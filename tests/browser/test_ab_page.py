"""An evaluator votes in a blind A/B session in real Chromium, keyboard only."""

from __future__ import annotations

import pytest

from annotation.models import Judgment, Policy
from annotation.roles import Role
from annotation.selectors import ab_votes
from annotation.services import ab_session_create
from tests.annotation.conftest import add_member
from tests.annotation.test_ab import source_prompts
from tests.browser.test_ranking_page import wait_for_next
from tests.factories import user_with_roles

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_evaluator_votes_on_three_pairs_with_the_keyboard(open_page, live_server, artifacts_dir):
    # given a blind session of two policies
    policies = [Policy.objects.create(name="hidden-alpha"), Policy.objects.create(name="hidden-beta")]
    manager = user_with_roles(Role.MANAGER, username="host")
    project = ab_session_create(
        name="blind",
        policies=policies,
        prompts=source_prompts(4, policies),
        votes_per_pair=1,
        created_by=manager,
    )
    evaluator = add_member(project, user_with_roles(Role.EVALUATOR, username="eve"), Role.EVALUATOR)
    page, watch = open_page(evaluator)
    page.goto(f"{live_server.url}/evaluate/{project.pk}/")
    page.wait_for_selector("#current-task")
    current = page.get_attribute("#current-task", "data-assignment")
    page.screenshot(path=str(artifacts_dir / "ab-desktop.png"), full_page=True)

    # when she votes: left better; a tie; right clearly better — each sent with Enter
    for keys in (["1"], ["t"], ["ArrowRight", "c"]):
        for key in keys:
            page.keyboard.press(key)
        page.keyboard.press("Enter")
        current = wait_for_next(page, current)

    # then three votes are stored as she gave them, and nothing named a policy
    assert Judgment.objects.count() == 3
    assert [vote.outcome for vote in ab_votes(project=project)] == ["left", "tie", "right"]
    assert sorted(Judgment.objects.values_list("strength", flat=True), key=str) == [1, 2, None]
    assert "hidden-" not in page.content()
    assert watch.errors == [] and watch.foreign_requests == []
