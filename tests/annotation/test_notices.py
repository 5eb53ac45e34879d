"""In-app notices: who is told that a job ended, the unread count in the navigation, reading them."""

from __future__ import annotations

import pytest

from annotation.models import Notice
from annotation.notifications import notice_job_ended, notices_unread_count
from annotation.roles import Role
from tests.annotation.conftest import add_member

pytestmark = pytest.mark.django_db


def _ended(project, started_by, object_id: int = 1, outcome: str = "succeeded") -> int:  # type: ignore[no-untyped-def]
    return notice_job_ended(
        kind=Notice.Kind.RUN,
        object_id=object_id,
        outcome=outcome,
        title="rm-helpful",
        url=f"/training/runs/{object_id}/",
        project_id=project.pk,
        started_by_id=started_by.pk,
    )


def test_the_person_who_started_a_job_and_the_projects_managers_are_told_once(
    make_project, manager, labeler, outsider
):
    # given a project with a manager; the job was started by another account
    project = make_project(tasks=1)
    add_member(project, manager, Role.MANAGER)
    add_member(project, labeler, Role.LABELER)

    # when the job ends, and a retried task reports the same end again
    assert _ended(project, started_by=outsider) == 2
    _ended(project, started_by=outsider)

    # then the starter and the manager each have one notice; the labeler none
    assert sorted(Notice.objects.values_list("user__username", flat=True)) == sorted(
        [manager.username, outsider.username]
    )
    assert notices_unread_count(user=labeler) == 0


def test_the_navigation_shows_the_unread_count_and_the_page_lists_the_notices(
    make_project, manager, csrf_client, login
):
    project = make_project(tasks=1)
    add_member(project, manager, Role.MANAGER)
    _ended(project, started_by=manager, object_id=1)
    _ended(project, started_by=manager, object_id=2, outcome="failed")
    client = login(csrf_client, manager)

    home = client.get("/").content.decode()
    assert 'href="/notices/"' in home
    assert '<span class="count"' in home and ">2</span>" in home

    page = client.get("/notices/").content.decode()
    assert page.count('class="notice unread"') == 2
    assert "rm-helpful" in page
    assert "failed" in page and "succeeded" in page


def test_opening_a_notice_marks_it_read_and_goes_to_the_jobs_page(make_project, manager, csrf_client, login):
    project = make_project(tasks=1)
    add_member(project, manager, Role.MANAGER)
    _ended(project, started_by=manager, object_id=7)
    notice = Notice.objects.get()
    client = login(csrf_client, manager)

    response = client.get(f"/notices/{notice.pk}/")

    assert response.status_code == 302
    assert response["Location"] == "/training/runs/7/"
    assert notices_unread_count(user=manager) == 0
    assert '<span class="count"' not in client.get("/").content.decode()


def test_an_off_site_address_is_never_followed(make_project, manager, csrf_client, login):
    notice_job_ended(
        kind=Notice.Kind.BUILD,
        object_id=1,
        outcome="failed",
        title="b",
        url="https://evil.example/",
        started_by_id=manager.pk,
    )
    client = login(csrf_client, manager)

    response = client.get(f"/notices/{Notice.objects.get().pk}/")

    assert response["Location"] == "/notices/"


def test_mark_all_as_read_needs_a_post_with_the_csrf_token(make_project, manager, csrf_client, login):
    project = make_project(tasks=1)
    add_member(project, manager, Role.MANAGER)
    _ended(project, started_by=manager, object_id=1)
    _ended(project, started_by=manager, object_id=2)
    client = login(csrf_client, manager)

    assert client.post("/notices/read/").status_code == 403
    client.get("/notices/")
    response = client.post("/notices/read/", {"csrfmiddlewaretoken": client.cookies["csrftoken"].value})

    assert response.status_code == 302
    assert notices_unread_count(user=manager) == 0


def test_a_person_cannot_open_or_see_another_persons_notice(
    make_project, manager, outsider, csrf_client, login
):
    project = make_project(tasks=1)
    add_member(project, manager, Role.MANAGER)
    _ended(project, started_by=manager)
    notice = Notice.objects.get()
    client = login(csrf_client, outsider)

    assert client.get(f"/notices/{notice.pk}/").status_code == 404
    assert "rm-helpful" not in client.get("/notices/").content.decode()
    assert Notice.objects.get().read_at is None


def test_signed_out_people_are_sent_to_sign_in(csrf_client):
    assert csrf_client.get("/notices/").status_code == 302
