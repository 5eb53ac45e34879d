"""A labeler ranks in real Chromium: keyboard only, mouse only, on a phone, against hostile text."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from annotation.models import Assignment, Completion, Judgment, Policy, Prompt
from annotation.roles import Role
from annotation.services import assignment_claim_next, tasks_create_for_project
from tests.annotation.conftest import add_member
from tests.factories import user_with_roles

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ranking_project(make_project):  # type: ignore[no-untyped-def]
    project = make_project(
        tasks=8, k=3, overlap=1, flags=["harmful"], instructions="Rank by **helpfulness**.", name="browser"
    )
    labeler = user_with_roles(Role.LABELER, username="lena")
    add_member(project, labeler, Role.LABELER)
    return project, labeler


def open_task(page, live_server, project) -> str:  # type: ignore[no-untyped-def]
    page.goto(f"{live_server.url}/label/{project.pk}/")
    page.wait_for_selector("#current-task")
    return page.get_attribute("#current-task", "data-assignment")


def wait_for_next(page, previous: str) -> str:  # type: ignore[no-untyped-def]
    page.wait_for_function(
        "previous => { const t = document.querySelector('#current-task'); "
        "return (t && t.dataset.assignment !== previous) || document.querySelector('#no-task'); }",
        arg=previous,
    )
    return (
        page.get_attribute("#current-task", "data-assignment") if page.query_selector("#current-task") else ""
    )


def uid_of(page, letter: str) -> str:  # type: ignore[no-untyped-def]
    return page.get_attribute(f'article.response[data-letter="{letter}"]', "data-uid")


def expected_ranks(page, ranks_by_letter: dict[str, int]) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {uid_of(page, letter): rank for letter, rank in ranks_by_letter.items()}


def test_a_labeler_ranks_three_tasks_and_skips_one_with_the_keyboard_only(
    open_page, live_server, ranking_project
):
    project, labeler = ranking_project
    page, watch = open_page(labeler)
    current = open_task(page, live_server, project)
    stored: dict[int, dict[str, int]] = {}

    # when: three rankings typed as letter + digit, one of them with a tie, each sent with Ctrl+Enter
    for keys in ({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 1, "c": 2}, {"c": 1, "a": 2, "b": 3}):
        stored[int(current)] = expected_ranks(page, {letter.upper(): rank for letter, rank in keys.items()})
        for letter, rank in keys.items():
            page.keyboard.press(letter)
            page.keyboard.press(str(rank))
        page.keyboard.press("Control+Enter")
        current = wait_for_next(page, current)

    # and a skip: s opens the dialog, Tab reaches its Skip button, Enter confirms
    skipped = current
    page.keyboard.press("s")
    page.wait_for_selector("#skip-dialog[open]")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    wait_for_next(page, skipped)

    # then the stored judgments are exactly what was typed, and the skip is recorded
    judgments = {j.assignment_id: j.ranks for j in Judgment.objects.filter(user=labeler)}
    assert judgments == stored
    assert Assignment.objects.get(pk=skipped).status == Assignment.Status.SKIPPED
    assert watch.errors == [] and watch.dialogs == []


def test_a_labeler_ranks_three_tasks_with_the_mouse_including_a_tie_flags_and_a_skip(
    open_page, live_server, ranking_project, artifacts_dir
):
    project, labeler = ranking_project
    page, watch = open_page(labeler)
    current = open_task(page, live_server, project)
    stored: dict[int, dict[str, int]] = {}
    page.screenshot(path=str(artifacts_dir / "ranking-desktop.png"), full_page=True)

    for index, clicks in enumerate(
        ({"A": 2, "B": 1, "C": 3}, {"A": 1, "B": 2, "C": 2}, {"A": 3, "B": 2, "C": 1})
    ):
        stored[int(current)] = expected_ranks(page, clicks)
        for letter, rank in clicks.items():
            page.click(f'article.response[data-letter="{letter}"] button.rank[data-rank="{rank}"]')
        if index == 0:
            page.check('article.response[data-letter="C"] input.flag-box[value="harmful"]')
            page.fill("#rationale", "B answers the question; C is rude.")
        assert page.inner_text("#summary") == {0: "B > A > C", 1: "A > B = C", 2: "C > B > A"}[index]
        page.click("[data-action=submit]")
        current = wait_for_next(page, current)

    skipped = current
    page.click("[data-action=skip]")
    page.select_option("#skip-reason", "unreadable")
    page.click('#skip-dialog button[value="skip"]')
    wait_for_next(page, skipped)

    judgments = {j.assignment_id: j for j in Judgment.objects.filter(user=labeler)}
    assert {pk: j.ranks for pk, j in judgments.items()} == stored
    first = judgments[min(judgments)]
    assert first.rationale == "B answers the question; C is rude."
    assert list(first.flags.values()) == [["harmful"]]
    assert first.active_seconds is not None and first.active_seconds >= 0
    skip = Assignment.objects.get(pk=skipped)
    assert (skip.status, skip.skip_reason) == (Assignment.Status.SKIPPED, "unreadable")
    assert watch.errors == []


def test_an_incomplete_ranking_is_not_sent_and_says_what_is_missing(open_page, live_server, ranking_project):
    project, labeler = ranking_project
    page, _watch = open_page(labeler)
    open_task(page, live_server, project)
    page.keyboard.press("a")
    page.keyboard.press("1")
    page.keyboard.press("Control+Enter")
    assert "Give every response a rank" in page.inner_text("#task-errors")
    assert Judgment.objects.count() == 0


def test_a_phone_sized_screen_ranks_one_task_without_horizontal_scrolling(
    open_page, live_server, ranking_project, artifacts_dir
):
    project, labeler = ranking_project
    page, watch = open_page(labeler, viewport=(390, 844), touch=True)
    current = open_task(page, live_server, project)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    expected = expected_ranks(page, {"A": 3, "B": 1, "C": 2})
    for letter, rank in {"A": 3, "B": 1, "C": 2}.items():
        page.tap(f'article.response[data-letter="{letter}"] button.rank[data-rank="{rank}"]')
    page.screenshot(path=str(artifacts_dir / "ranking-phone.png"), full_page=True)
    page.tap("[data-action=submit]")
    wait_for_next(page, current)
    assert Judgment.objects.get(assignment_id=current).ranks == expected
    assert watch.errors == []


def test_an_answer_after_a_takeover_shows_the_person_their_answer(open_page, live_server, ranking_project):
    # given lena's lease ran out and sam took the task over
    project, labeler = ranking_project
    page, _watch = open_page(labeler)
    current = open_task(page, live_server, project)
    Assignment.objects.filter(pk=current).update(lease_expires_at=timezone.now() - timedelta(minutes=1))
    project.tasks.exclude(assignments__pk=current).delete()
    sam = user_with_roles(Role.LABELER, username="sam")
    add_member(project, sam, Role.LABELER)
    assert assignment_claim_next(project=project, user=sam) is not None

    # when she submits
    for letter, rank in {"a": 1, "b": 2, "c": 3}.items():
        page.keyboard.press(letter)
        page.keyboard.press(str(rank))
    page.fill("#rationale", "A is the only correct one")
    page.keyboard.press("Control+Enter")

    # then she sees what happened and her answer, and nothing of hers is stored
    page.wait_for_selector(".conflict")
    text = page.inner_text(".conflict")
    assert "someone else took it over" in text
    assert "A > B > C" in text and "A is the only correct one" in text
    assert Judgment.objects.count() == 0


PAYLOADS = [
    "<script>alert('prompt-script')</script>",
    "<img src=x onerror=\"alert('img-onerror')\">",
    "[click me](javascript:alert('js-link'))",
    "<svg onload=\"alert('svg-onload')\"></svg>",
    "</div></article></main><script>alert('closing-tags')</script>",
    "![tracker](http://203.0.113.9/pixel.png)",
    '<a href="http://203.0.113.9/" onclick="alert(\'onclick\')">x</a>',
    '<iframe src="http://203.0.113.9/"></iframe>',
    "<style>body{background:url(http://203.0.113.9/bg.png)}</style>",
    '<form action="http://203.0.113.9/"><button>go</button></form>',
]


def test_hostile_prompts_and_outputs_fire_no_dialog_and_make_no_request_off_the_server(
    open_page, live_server, make_project
):
    # given a task whose prompt and outputs are an XSS and exfiltration corpus
    project = make_project(tasks=0, k=3, name="hostile")
    labeler = user_with_roles(Role.LABELER, username="target")
    add_member(project, labeler, Role.LABELER)
    policy = Policy.objects.get_or_create(name="hostile", defaults={"kind": Policy.Kind.IMPORTED})[0]
    prompt = Prompt.objects.create(project=project, text="\n\n".join(PAYLOADS), content_hash="hostile")
    for index in range(3):
        Completion.objects.create(
            prompt=prompt, policy=policy, text="\n\n".join(PAYLOADS[index:] + PAYLOADS[:index])
        )
    tasks_create_for_project(project=project)

    # when the labeler opens it and interacts with it
    page, watch = open_page(labeler)
    open_task(page, live_server, project)
    page.click('article.response[data-letter="A"]')
    page.keyboard.press("r")
    page.wait_for_timeout(300)

    # then nothing ran and nothing was fetched from elsewhere
    assert watch.dialogs == []
    assert watch.foreign_requests == []
    assert watch.errors == []
    dangerous = page.evaluate(
        "document.querySelectorAll('.md script, .md img, .md svg, .md iframe, .md style, .md form, "
        ".md [onerror], .md [onload], .md [onclick]').length"
    )
    assert dangerous == 0
    hrefs = page.eval_on_selector_all(".md a", "links => links.map(a => [a.getAttribute('href'), a.rel])")
    assert all(not href.startswith("javascript:") for href, _rel in hrefs)
    assert all(rel == "noopener noreferrer nofollow" for _href, rel in hrefs)
    assert "alert('prompt-script')" in page.inner_text(".prompt")  # shown as text, not run


def test_the_page_speaks_korean_to_a_korean_browser(open_page, live_server, ranking_project):
    project, labeler = ranking_project
    page, _watch = open_page(labeler, locale="ko-KR")
    open_task(page, live_server, project)
    assert page.get_attribute("html", "lang") == "ko"
    assert "제출" in page.inner_text("[data-action=submit]")
    page.keyboard.press("a")
    page.keyboard.press("1")
    assert "아직 순위 없음" in page.inner_text("#summary")  # from the JavaScript catalog


def test_a_manager_sees_the_dashboard_with_charts(open_page, live_server, ranking_project, artifacts_dir):
    project, labeler = ranking_project
    manager = user_with_roles(Role.MANAGER, username="mona")
    add_member(project, manager, Role.MANAGER)
    # some judgments, so the charts have something to draw
    page, _watch = open_page(labeler)
    current = open_task(page, live_server, project)
    for _ in range(3):
        for letter, rank in {"a": 1, "b": 2, "c": 3}.items():
            page.keyboard.press(letter)
            page.keyboard.press(str(rank))
        page.keyboard.press("Control+Enter")
        current = wait_for_next(page, current)

    page, watch = open_page(manager)
    page.goto(f"{live_server.url}/manage/projects/{project.pk}/")
    assert page.locator("canvas[data-chart]").count() >= 2
    # judgments per day are counts: whole-number ticks only
    page.wait_for_function(
        "() => window.Chart && Chart.getChart(document.querySelector('[data-chart=chart-throughput]'))"
    )
    throughput = page.evaluate(
        "() => Chart.getChart(document.querySelector('[data-chart=chart-throughput]')).scales.y.ticks.map(t => t.label)"
    )
    assert throughput[0] == "0" and "3" in throughput and all(label.isdigit() for label in throughput), (
        throughput
    )
    assert "lena" in page.inner_text("table.table")
    page.screenshot(path=str(artifacts_dir / "dashboard.png"), full_page=True)
    assert watch.errors == []


def test_likert_ratings_are_given_with_shift_and_a_digit(open_page, live_server, make_project):
    project = make_project(tasks=2, k=2, likert_enabled=True, name="likert")
    labeler = user_with_roles(Role.LABELER, username="rater")
    add_member(project, labeler, Role.LABELER)
    page, watch = open_page(labeler)
    current = open_task(page, live_server, project)
    expected_ranks_by_uid = expected_ranks(page, {"A": 1, "B": 2})
    expected_likert = {uid_of(page, "A"): 6, uid_of(page, "B"): 3}

    page.keyboard.press("a")
    page.keyboard.press("1")
    page.keyboard.press("Shift+Digit6")
    page.keyboard.press("b")
    page.keyboard.press("2")
    page.keyboard.press("Shift+Digit3")
    page.keyboard.press("Control+Enter")
    wait_for_next(page, current)

    judgment = Judgment.objects.get(assignment_id=current)
    assert (judgment.ranks, judgment.likert) == (expected_ranks_by_uid, expected_likert)
    assert judgment.comparisons.get().margin == 3  # the Likert gap, as the project rates
    assert watch.errors == []
