"""Phone layouts in real Chromium: the A/B page, the Manage table, and touch screens without key hints."""

from __future__ import annotations

import pytest

from annotation.models import Completion, Policy, Project, Prompt
from annotation.roles import Role
from annotation.services import ab_session_create
from tests.annotation.conftest import add_member
from tests.browser.test_ranking_page import open_task
from tests.factories import user_with_roles

pytestmark = pytest.mark.django_db(transaction=True)

PHONE = (390, 844)
LONG_ANSWER = "\n\n".join(
    f"Paragraph {number}: a reasonably long answer that a person has to read through before voting, "
    "with enough words to fill several lines on a narrow screen."
    for number in range(8)
)


def long_prompts(policies: list[Policy]) -> list[Prompt]:
    source = Project.objects.create(name="phone source", k=2)
    prompts = []
    for number in range(2):
        prompt = Prompt.objects.create(
            project=source, text=f"Question {number}?", content_hash=f"phone-{number}"
        )
        for index, policy in enumerate(policies):
            Completion.objects.create(
                prompt=prompt, policy=policy, text=f"Answer {index + 1}:\n\n{LONG_ANSWER}"
            )
        prompts.append(prompt)
    return prompts


def test_the_ab_page_on_a_phone_gives_most_of_the_screen_to_the_two_responses(
    open_page, live_server, artifacts_dir
):
    policies = [Policy.objects.create(name="phone-a"), Policy.objects.create(name="phone-b")]
    manager = user_with_roles(Role.MANAGER, username="phonehost")
    project = ab_session_create(
        name="phone session",
        policies=policies,
        prompts=long_prompts(policies),
        votes_per_pair=1,
        created_by=manager,
    )
    evaluator = add_member(project, user_with_roles(Role.EVALUATOR, username="phoney"), Role.EVALUATOR)
    page, watch = open_page(evaluator, viewport=PHONE, touch=True)
    page.goto(f"{live_server.url}/evaluate/{project.pk}/")
    page.wait_for_selector("#current-task")

    # when she scrolls to the responses
    page.evaluate("document.querySelector('.ab-columns').scrollIntoView({block: 'start'})")
    page.screenshot(path=str(artifacts_dir / "ab-phone-390.png"))

    # then the voting bar stays small and the responses fill most of what is left of the screen
    layout = page.evaluate(
        """() => {
            const bar = document.querySelector('#current-task .submit-bar').getBoundingClientRect();
            const columns = document.querySelector('.ab-columns').getBoundingClientRect();
            const visible = Math.max(0, Math.min(columns.bottom, bar.top) - Math.max(columns.top, 0));
            return {bar: bar.height / innerHeight, responses: visible / innerHeight};
        }"""
    )
    assert layout["bar"] <= 0.2, layout
    assert layout["responses"] >= 0.7, layout
    # and every verdict is still one tap away in the bar
    for verdict in ("left", "tie", "both_bad", "right"):
        assert page.locator(f"#current-task .submit-bar button[data-verdict={verdict}]").is_visible()
    assert watch.errors == []


def test_the_manage_table_on_a_phone_breaks_no_word(open_page, live_server, make_project):
    project = make_project(tasks=1, k=2, name="A project with a long descriptive name")
    manager = add_member(project, user_with_roles(Role.MANAGER, username="tablet"), Role.MANAGER)
    page, _watch = open_page(manager, viewport=PHONE, touch=True)
    page.goto(f"{live_server.url}/manage/")

    # each word of the table sits on one line: no cell is narrower than its longest word
    broken = page.evaluate(
        """() => Array.from(document.querySelectorAll('table.table th, table.table td')).flatMap((cell) => {
            const range = document.createRange();
            const words = [];
            const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
            while (walker.nextNode()) {
                const node = walker.currentNode;
                for (const match of node.textContent.matchAll(/\\S+/g)) {
                    range.setStart(node, match.index);
                    range.setEnd(node, match.index + match[0].length);
                    if (range.getClientRects().length > 1) words.push(match[0]);
                }
            }
            return words;
        })"""
    )
    assert broken == []


def test_touch_screens_show_no_keyboard_hints(open_page, live_server, make_project):
    project = make_project(tasks=1, k=2, name="touch")
    labeler = add_member(project, user_with_roles(Role.LABELER, username="thumbs"), Role.LABELER)
    page, _watch = open_page(labeler, viewport=PHONE, touch=True)
    open_task(page, live_server, project)

    assert page.locator("[data-action=submit]").is_visible()
    assert (
        page.locator("[data-action=submit] kbd").evaluate_all(
            "(keys) => keys.filter((key) => key.offsetParent)"
        )
        == []
    )

    # while a keyboard and mouse still see them
    desk, _ = open_page(labeler)
    open_task(desk, live_server, project)
    assert desk.locator("[data-action=submit] kbd").first.is_visible()
