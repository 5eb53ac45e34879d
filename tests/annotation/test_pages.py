"""The labeler's and manager's pages: who may open them, and what they show."""

from __future__ import annotations

import pytest

from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.factories import user_with_roles


@pytest.fixture
def setting(make_project):  # type: ignore[no-untyped-def]
    project = make_project(tasks=2, k=3, name="pages")
    return {
        "project": project,
        "labeler": add_member(project, user_with_roles(Role.LABELER, username="lab"), Role.LABELER),
        "manager": add_member(project, user_with_roles(Role.MANAGER, username="man"), Role.MANAGER),
        "other_labeler": user_with_roles(Role.LABELER, username="elsewhere"),
        "other_manager": user_with_roles(Role.MANAGER, username="boss-elsewhere"),
    }


def _csrf_post(client, url):  # type: ignore[no-untyped-def]
    client.get("/label/")
    return client.post(url, HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)


@pytest.mark.django_db
def test_a_member_labeler_gets_a_task_fragment_with_cards_in_their_order(setting):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(setting["labeler"])
    response = _csrf_post(client, f"/label/{setting['project'].pk}/next")
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('class="response"') == 3
    assert 'data-letter="A"' in html and 'data-letter="C"' in html
    assert "policy" not in html


@pytest.mark.django_db
def test_claiming_from_the_page_needs_the_csrf_token(setting):
    from django.test import Client

    from annotation.models import Assignment

    client = Client(enforce_csrf_checks=True)
    client.force_login(setting["labeler"])
    assert client.post(f"/label/{setting['project'].pk}/next").status_code == 403
    assert Assignment.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("who", ["other_labeler", "manager"])
def test_people_who_do_not_label_the_project_cannot_open_its_ranking_page(client, setting, who):
    client.force_login(setting[who])
    project = setting["project"]
    # Neither labels anywhere (a labeler group without a membership grants nothing): the role gate says so.
    assert client.get(f"/label/{project.pk}/").status_code == 403


@pytest.mark.django_db
@pytest.mark.parametrize(("who", "status"), [("manager", 200), ("other_manager", 404), ("labeler", 403)])
def test_only_the_projects_managers_see_its_dashboard(client, setting, who, status):
    client.force_login(setting[who])
    assert client.get(f"/manage/projects/{setting['project'].pk}/").status_code == status


@pytest.mark.django_db
def test_the_label_page_lists_only_the_labelers_projects(client, setting, make_project):
    make_project(tasks=1, k=2, name="not-mine")
    client.force_login(setting["labeler"])
    content = client.get("/label/").content.decode()
    assert "pages" in content and "not-mine" not in content


@pytest.mark.django_db
def test_every_page_carries_the_security_headers(client, setting):
    client.force_login(setting["labeler"])
    response = client.get(f"/label/{setting['project'].pk}/")
    csp = response["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    assert "<script>" not in response.content.decode()  # no inline script anywhere
