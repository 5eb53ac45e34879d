"""A manager learns in Chromium that a run failed: the count in the navigation, the notices page, the run's page."""

from __future__ import annotations

import pytest

from annotation.models import Membership, Notice, Project
from annotation.roles import Role
from tests.factories import user_with_roles
from training.models import DatasetBuild, TrainingRun
from training.services import training_run_fail

pytestmark = pytest.mark.django_db(transaction=True)


def _failed_run(manager):  # type: ignore[no-untyped-def]
    project = Project.objects.create(name="noticed")
    Membership.objects.create(project=project, user=manager, role=Role.MANAGER)
    build = DatasetBuild.objects.create(name="b", created_by=manager, status=DatasetBuild.Status.SUCCEEDED)
    build.projects.add(project)
    run = TrainingRun.objects.create(
        name="rm-night", kind=TrainingRun.Kind.REWARD, dataset_build=build, base_model="m", created_by=manager
    )
    assert training_run_fail(run_id=run.pk, error="out of memory")
    return run


def test_a_failed_run_shows_as_an_unread_notice_that_leads_to_the_run(open_page, live_server):
    # given a manager whose run failed
    manager = user_with_roles(Role.MANAGER, username="nadia")
    run = _failed_run(manager)
    page, watch = open_page(manager)

    # when they follow the count in the navigation to the notices, then the run
    badge = page.locator(".notices-link .count")
    assert badge.inner_text() == "1"
    page.click(".notices-link")
    row = page.locator("tr.notice.unread")
    assert row.count() == 1
    assert "rm-night" in row.inner_text()
    assert "failed" in row.inner_text()
    page.click("tr.notice a")
    page.wait_for_url(f"{live_server.url}/training/runs/{run.pk}/")

    # then the notice is read: no count any more
    assert page.locator(".notices-link .count").count() == 0
    assert Notice.objects.get().read_at is not None
    assert watch.errors == []


def test_the_notices_page_reads_in_korean(open_page):
    manager = user_with_roles(Role.MANAGER, username="minji")
    _failed_run(manager)
    page, _watch = open_page(manager, locale="ko-KR")

    page.click(".notices-link")

    assert page.locator("h1").inner_text() == "알림"
    row = page.locator("tr.notice").inner_text()
    assert "학습 실행" in row and "실패" in row
