"""The demo as `make demo` sets it up, in real Chromium: the labeler ranks three tasks and the
evaluator votes on three A/B pairs, keyboard only; screenshots of each step are saved."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import call_command

from annotation.models import Comparison, Judgment, Project
from annotation.selectors import ab_votes
from tests.browser.test_ranking_page import wait_for_next

pytestmark = pytest.mark.django_db(transaction=True)


def demo_accounts() -> dict[str, str]:
    """Run the demo's own setup commands; return the printed password of each account."""
    out = StringIO()
    call_command("demo_users", stdout=out)
    call_command("seed_demo", stdout=StringIO())
    return dict(re.findall(r"^\s+(manager|labeler|evaluator)\s+\S+\s+(\S+)$", out.getvalue(), re.MULTILINE))


def sign_in(browser, live_server, username: str, password: str):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("main button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")
    return context, page, errors


def test_the_demo_labeler_ranks_three_tasks_and_the_evaluator_votes_on_three_pairs(
    browser, live_server, artifacts_dir
):
    # given the demo as make demo seeds it
    passwords = demo_accounts()
    assert set(passwords) == {"manager", "labeler", "evaluator"}
    ranking = Project.objects.get(name="Demo: helpful answers")
    session = Project.objects.get(name="Demo: blind A/B")
    assert session.tasks.count() == 12

    # when the labeler opens the demo project from the home page and ranks three tasks
    context, page, errors = sign_in(browser, live_server, "labeler", passwords["labeler"])
    page.get_by_role("link", name="Label", exact=True).click()
    page.get_by_role("link", name=ranking.name).first.click()
    page.wait_for_selector("#current-task")
    current = page.get_attribute("#current-task", "data-assignment")
    for number, order in enumerate(("abcd", "badc", "cabd"), start=1):
        for rank, letter in enumerate(order, start=1):
            page.keyboard.press(letter)
            page.keyboard.press(str(rank))
        page.screenshot(path=str(artifacts_dir / f"demo-rank-{number}.png"), full_page=True)
        page.keyboard.press("Control+Enter")
        current = wait_for_next(page, current)
    context.close()

    # then three rankings are stored, each as its six pairwise comparisons
    assert Judgment.objects.filter(task__project=ranking).count() == 3
    assert Comparison.objects.filter(judgment__task__project=ranking).count() == 3 * 6
    assert errors == []

    # when the evaluator opens the blind session and votes: left, tie, right
    context, page, errors = sign_in(browser, live_server, "evaluator", passwords["evaluator"])
    page.get_by_role("link", name="Evaluate", exact=True).click()
    page.get_by_role("link", name=session.name).first.click()
    page.wait_for_selector("#current-task")
    current = page.get_attribute("#current-task", "data-assignment")
    for number, key in enumerate(("1", "t", "2"), start=1):
        page.keyboard.press(key)
        page.screenshot(path=str(artifacts_dir / f"demo-ab-{number}.png"), full_page=True)
        page.keyboard.press("Enter")
        current = wait_for_next(page, current)
    html = page.content()
    context.close()

    # then three votes are stored as given, and the page never named a source
    assert [vote.outcome for vote in ab_votes(project=session)] == ["left", "tie", "right"]
    assert "sft-large" not in html and "sft-small" not in html
    assert errors == []
    assert all(
        (artifacts_dir / f"demo-{kind}-{n}.png").stat().st_size > 0
        for kind in ("rank", "ab")
        for n in (1, 2, 3)
    )
