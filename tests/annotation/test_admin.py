"""Managers run projects from the admin, and see only the projects they manage."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from annotation.models import Membership, Project, Prompt
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.factories import user_with_roles


@pytest.fixture
def two_projects(make_project):  # type: ignore[no-untyped-def]
    mine = make_project(tasks=2, k=2, name="mine")
    theirs = make_project(tasks=2, k=2, name="theirs")
    me = user_with_roles(Role.MANAGER, username="boss")
    add_member(mine, me, Role.MANAGER)
    return mine, theirs, me


@pytest.mark.django_db
def test_a_manager_sees_only_the_projects_they_manage(client, two_projects):
    _mine, theirs, me = two_projects
    client.force_login(me)
    listing = client.get("/admin/annotation/project/")
    assert listing.status_code == 200
    assert b"mine" in listing.content and b"theirs" not in listing.content
    assert client.get(f"/admin/annotation/project/{theirs.pk}/change/").status_code in (302, 404)
    assert client.get(f"/admin/annotation/project/{theirs.pk}/import/").status_code == 404
    tasks = client.get("/admin/annotation/task/")
    assert tasks.context["cl"].result_count == 2


@pytest.mark.django_db
def test_creating_a_project_makes_the_creator_its_manager(client, two_projects):
    _mine, _theirs, me = two_projects
    client.force_login(me)
    response = client.post(
        "/admin/annotation/project/add/",
        {
            "name": "fresh",
            "kind": "ranking",
            "instructions": "Rank by helpfulness.",
            "is_active": "on",
            "k": "4",
            "overlap": "2",
            "ties_allowed": "on",
            "flags": '["harmful"]',
            "lease_minutes": "30",
            "gold_rate": "0.1",
            "task_order": "fill",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
            "memberships-MIN_NUM_FORMS": "0",
            "memberships-MAX_NUM_FORMS": "1000",
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    project = Project.objects.get(name="fresh")
    assert Membership.objects.filter(project=project, user=me, role=Role.MANAGER).exists()


@pytest.mark.django_db
def test_an_import_upload_lists_every_bad_line_and_writes_nothing(client, two_projects):
    mine, _theirs, me = two_projects
    client.force_login(me)
    before = Prompt.objects.count()
    bad = SimpleUploadedFile("bad.jsonl", b'{"prompt": "fine"}\n{"prompt": ""}\n{"promt": "typo"}\n')
    response = client.post(f"/admin/annotation/project/{mine.pk}/import/", {"file": bad})
    assert response.status_code == 200
    assert {error.line for error in response.context["errors"]} == {2, 3}
    assert b"nothing was imported" in response.content
    assert Prompt.objects.count() == before


@pytest.mark.django_db
def test_an_import_upload_adds_prompts_and_tasks(client, two_projects):
    mine, _theirs, me = two_projects
    client.force_login(me)
    good = SimpleUploadedFile(
        "good.jsonl",
        b'{"id": "x1", "prompt": "Name a colour.", "completions": '
        b'[{"text": "Blue", "policy": "a"}, {"text": "Chair", "policy": "b"}]}\n',
    )
    response = client.post(f"/admin/annotation/project/{mine.pk}/import/", {"file": good})
    assert response.status_code == 302
    assert Prompt.objects.filter(project=mine, external_id="x1").exists()
    assert mine.tasks.count() == 3
