"""Details of the ranking page a labeler notices: errors that clear, read-backs, focus, flag keys."""

from __future__ import annotations

import pytest

from annotation.models import Judgment
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.browser.test_ranking_page import open_task, uid_of, wait_for_next
from tests.factories import user_with_roles

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def labeler_on(make_project):  # type: ignore[no-untyped-def]
    def make(**fields):  # type: ignore[no-untyped-def]
        project = make_project(tasks=2, k=3, name="details", **fields)
        labeler = add_member(project, user_with_roles(Role.LABELER, username="dora"), Role.LABELER)
        return project, labeler

    return make


def rank_all(page) -> None:  # type: ignore[no-untyped-def]
    for letter, rank in {"a": 1, "b": 2, "c": 3}.items():
        page.keyboard.press(letter)
        page.keyboard.press(str(rank))


def test_an_error_goes_away_once_it_is_fixed(open_page, live_server, labeler_on):
    project, labeler = labeler_on()
    page, watch = open_page(labeler)
    open_task(page, live_server, project)

    # when she submits with nothing ranked, she is told to rank everything
    page.keyboard.press("Control+Enter")
    assert "Give every response a rank" in page.inner_text("#task-errors")

    # then, once every response has a rank, the error is gone before any submit
    rank_all(page)
    assert page.inner_text("#task-errors").strip() == ""
    assert watch.errors == []


def test_none_acceptable_reads_back_in_the_summary(open_page, live_server, labeler_on):
    project, labeler = labeler_on()
    page, _watch = open_page(labeler)
    open_task(page, live_server, project)

    page.keyboard.press("n")

    assert page.inner_text("#summary") == "none acceptable"
    assert "not ranked yet" not in page.inner_text("#summary")


def test_a_missing_required_rationale_brings_its_box_into_view_with_focus(open_page, live_server, labeler_on):
    project, labeler = labeler_on(rationale_required=True)
    page, _watch = open_page(labeler, viewport=(390, 700), touch=True)
    open_task(page, live_server, project)
    rank_all(page)

    page.keyboard.press("Control+Enter")

    assert "write a short rationale" in page.inner_text("#task-errors")
    assert page.evaluate("document.activeElement.id") == "rationale"
    # its box is on screen, not under the sticky bar at the bottom
    box = page.evaluate(
        "(() => { const r = document.getElementById('rationale').getBoundingClientRect();"
        " const bar = document.querySelector('.submit-bar');"
        " return {top: r.top, bottom: r.bottom, barTop: bar ? bar.getBoundingClientRect().top : innerHeight,"
        " height: innerHeight}; })()"
    )
    assert box["top"] >= 0 and box["bottom"] <= min(box["barTop"], box["height"]), box


def test_x_reaches_the_selected_responses_flags_from_the_keyboard(open_page, live_server, labeler_on):
    project, labeler = labeler_on(flags=["harmful", "off-topic"])
    page, watch = open_page(labeler)
    current = open_task(page, live_server, project)
    flagged = uid_of(page, "B")

    # when she selects B, presses X, ticks the first flag with Space and goes back with Esc
    page.keyboard.press("b")
    page.keyboard.press("x")
    assert page.evaluate("document.activeElement.value") == "harmful"
    page.keyboard.press("Space")
    page.keyboard.press("Escape")
    rank_all(page)
    page.keyboard.press("Control+Enter")
    wait_for_next(page, current)

    # then the judgment carries that flag on B
    assert Judgment.objects.get().flags == {flagged: ["harmful"]}
    assert watch.errors == []
