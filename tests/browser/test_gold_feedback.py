"""A labeler learns the expected ranking right after a gold task, in real Chromium."""

from __future__ import annotations

import pytest

from annotation.models import Assignment, TaskCompletion
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.browser.test_ranking_page import open_task, wait_for_next
from tests.factories import user_with_roles

pytestmark = pytest.mark.django_db(transaction=True)


def test_after_a_gold_task_the_labeler_sees_the_expected_ranking_then_goes_on(
    open_page, live_server, make_project, artifacts_dir
):
    # given a project whose next task is gold (the gold rate serves only gold while any is left)
    project = make_project(tasks=1, gold=1, k=3, gold_rate=1.0, gold_feedback=True, name="gold")
    labeler = add_member(project, user_with_roles(Role.LABELER, username="goldie"), Role.LABELER)
    page, watch = open_page(labeler)
    current = open_task(page, live_server, project)
    task = Assignment.objects.get(pk=current).task
    assert task.is_gold
    letter_of = {
        page.get_attribute(f"article.response >> nth={index}", "data-uid"): page.get_attribute(
            f"article.response >> nth={index}", "data-letter"
        )
        for index in range(3)
    }
    gold = {
        str(item.completion.uid): rank
        for item, rank in zip(
            TaskCompletion.objects.filter(task=task).order_by("position"), task.gold_ranks, strict=True
        )
    }
    expected = " > ".join(letter_of[uid] for uid, _rank in sorted(gold.items(), key=lambda pair: pair[1]))

    # when she ranks the responses in the order shown, A first, and submits
    for letter, rank in {"a": 1, "b": 2, "c": 3}.items():
        page.keyboard.press(letter)
        page.keyboard.press(str(rank))
    page.keyboard.press("Control+Enter")

    # then she is shown the expected ranking beside her own, by the letters she saw
    page.wait_for_selector("#gold-feedback")
    assert page.inner_text("#gold-feedback .gold-expected") == f"Expected: {expected}"
    assert page.inner_text("#gold-feedback .gold-yours") == "Yours: A > B > C"
    matched = expected == "A > B > C"
    assert ("you gave the expected ranking" in page.inner_text("#gold-feedback h2")) is matched
    page.screenshot(path=str(artifacts_dir / "gold-feedback.png"))

    # and Enter (the focused button) takes her to the next task
    page.keyboard.press("Enter")
    assert wait_for_next(page, current) not in ("", current)
    assert watch.errors == []
