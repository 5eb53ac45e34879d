"""A reviewer rejects a judgment in real Chromium: the task goes to another labeler, builds leave it out."""

from __future__ import annotations

import time

import pytest

from annotation.models import Assignment, Comparison, Judgment
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.browser.test_ranking_page import open_task, wait_for_next
from tests.factories import user_with_roles
from training.models import DatasetBuild
from training.services import dataset_build_create, dataset_build_run

pytestmark = pytest.mark.django_db(transaction=True)


def rank_all(page) -> None:  # type: ignore[no-untyped-def]
    for letter, rank in {"a": 1, "b": 2, "c": 3}.items():
        page.keyboard.press(letter)
        page.keyboard.press(str(rank))


def test_a_rejected_judgment_reopens_its_task_for_another_labeler_and_stays_out_of_builds(
    open_page, live_server, make_project, artifacts_dir
):
    # given a one-task project (one judgment wanted) that a labeler has ranked
    project = make_project(tasks=1, k=3, overlap=1, name="reviewed")
    first = add_member(project, user_with_roles(Role.LABELER, username="hasty"), Role.LABELER)
    second = add_member(project, user_with_roles(Role.LABELER, username="careful"), Role.LABELER)
    reviewer = add_member(project, user_with_roles(Role.REVIEWER, username="rita"), Role.REVIEWER)
    manager = add_member(project, user_with_roles(Role.MANAGER, username="boss"), Role.MANAGER)
    page, _watch = open_page(first)
    current = open_task(page, live_server, project)
    rank_all(page)
    page.keyboard.press("Control+Enter")
    wait_for_next(page, current)
    task = Assignment.objects.get(pk=current).task
    assert Judgment.objects.get().user == first

    # when the reviewer opens the queue from the navigation and rejects it with a reason
    page, watch = open_page(reviewer)
    page.click("nav >> text=Review")
    page.click("text=reviewed")
    item = page.locator("article.review-item")
    assert "hasty" in item.inner_text() and "rank 1" in item.inner_text()
    page.screenshot(path=str(artifacts_dir / "review-queue.png"), full_page=True)
    item.locator("input[name=reason]").fill("ranked without reading")
    item.locator("button[value=reject]").click()
    page.wait_for_selector("text=its task is open to someone else")
    assert watch.errors == []

    # then the judgment is kept, rejected, and the task is served to the other labeler
    rejected = Judgment.objects.get(user=first)
    assert rejected.review == Judgment.Review.REJECTED and rejected.review_reason == "ranked without reading"
    page, _watch = open_page(second)
    again = open_task(page, live_server, project)
    assert Assignment.objects.get(pk=again).task == task
    rank_all(page)
    page.keyboard.press("Control+Enter")
    wait_for_next(page, again)
    assert Comparison.objects.filter(judgment__user=first).count() == 3  # kept for audit

    # and a dataset build uses the second labeler's comparisons only
    build = dataset_build_create(
        created_by=manager, name="after review", projects=[project], test_fraction=0.0
    )
    dataset_build_run(build_id=build.pk)
    deadline = time.monotonic() + 120
    while build.status not in DatasetBuild.FINISHED_STATUSES and time.monotonic() < deadline:
        time.sleep(0.2)
        build.refresh_from_db()
    assert build.status == DatasetBuild.Status.SUCCEEDED, build.error
    assert sum(build.counts["pairs"].values()) == 3
    assert build.counts["grouped"] == {"train": 1, "test": 0} or sum(build.counts["grouped"].values()) == 1
