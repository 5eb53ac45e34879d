"""Project settings and members on the manager pages: what is saved, what is refused, and who may."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from annotation.models import Membership, Project
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.factories import user_with_roles

pytestmark = pytest.mark.django_db

SETTINGS = {
    "name": "haiku prefs",
    "kind": "ranking",
    "instructions": "Rank **best** first.",
    "is_active": "on",
    "k": "3",
    "overlap": "2",
    "ties_allowed": "on",
    "likert_enabled": "on",
    "flags": ["harmful", "", "off-topic"],
    "rationale_required": "on",
    "task_order": "random",
    "lease_minutes": "15",
    "gold_rate": "0.1",
    "gold_feedback": "on",
}


def _signed_in(user: Any) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def _post(client: Client, url: str, data: dict[str, Any]) -> Any:
    client.get("/manage/")
    return client.post(url, {**data, "csrfmiddlewaretoken": client.cookies["csrftoken"].value})


def test_a_manager_creates_a_project_with_every_setting_and_manages_it():
    manager = user_with_roles(Role.MANAGER, username="maria")
    response = _post(_signed_in(manager), "/manage/projects/new", SETTINGS)

    project = Project.objects.get(name="haiku prefs")
    assert response.status_code == 302 and response["Location"] == f"/manage/projects/{project.pk}/settings"
    assert (project.kind, project.k, project.overlap, project.lease_minutes) == ("ranking", 3, 2, 15)
    assert (
        project.likert_enabled
        and project.rationale_required
        and project.gold_feedback
        and project.ties_allowed
    )
    assert project.flags == ["harmful", "off-topic"]
    assert (project.task_order, project.gold_rate, project.instructions) == (
        "random",
        0.1,
        "Rank **best** first.",
    )
    assert Membership.objects.filter(project=project, user=manager, role=Role.MANAGER).exists()


def test_an_ab_project_with_k_4_is_refused_naming_the_field_and_nothing_is_saved():
    manager = user_with_roles(Role.MANAGER, username="maria")
    response = _post(_signed_in(manager), "/manage/projects/new", {**SETTINGS, "kind": "ab", "k": "4"})

    assert response.status_code == 400
    html = response.content.decode()
    assert "Nothing was saved" in html
    assert "A blind A/B session judges two outputs at a time: K is 2." in html
    assert 'href="#id_k">K</a>' in html
    assert not Project.objects.exists()


def test_duplicate_flags_and_a_gold_rate_above_one_are_both_named():
    manager = user_with_roles(Role.MANAGER, username="maria")
    data = {**SETTINGS, "flags": ["harmful", "Harmful"], "gold_rate": "1.5"}
    response = _post(_signed_in(manager), "/manage/projects/new", data)

    html = response.content.decode()
    assert response.status_code == 400
    assert "is listed twice" in html
    assert 'href="#id_gold_rate">Gold rate</a>' in html
    assert not Project.objects.exists()


def test_settings_change_all_at_once_but_kind_and_k_stay_once_the_project_has_tasks(make_project):
    manager = user_with_roles(Role.MANAGER, username="maria")
    project = make_project(tasks=2, k=3, name="with tasks")
    add_member(project, manager, Role.MANAGER)
    client = _signed_in(manager)

    refused = _post(
        client, f"/manage/projects/{project.pk}/settings", {**SETTINGS, "name": "renamed", "k": "4"}
    )
    project.refresh_from_db()
    assert refused.status_code == 400
    assert "so K cannot change" in refused.content.decode()
    assert project.name == "with tasks" and project.overlap == 1  # nothing half-saved

    saved = _post(client, f"/manage/projects/{project.pk}/settings", {**SETTINGS, "name": "renamed"})
    project.refresh_from_db()
    assert saved.status_code == 302
    assert (project.name, project.overlap, project.flags) == ("renamed", 2, ["harmful", "off-topic"])


def test_a_manager_never_reaches_another_managers_project():
    mine = user_with_roles(Role.MANAGER, username="maria")
    theirs = Project.objects.create(name="theirs")
    add_member(theirs, user_with_roles(Role.MANAGER, username="boss"), Role.MANAGER)
    labeler = add_member(theirs, user_with_roles(username="lee"), Role.LABELER)
    membership = Membership.objects.get(project=theirs, user=labeler)
    client = _signed_in(mine)

    assert client.get(f"/manage/projects/{theirs.pk}/settings").status_code == 404
    assert client.get(f"/manage/projects/{theirs.pk}/members").status_code == 404
    own = Project.objects.create(name="own")
    add_member(own, mine, Role.MANAGER)
    response = _post(client, f"/manage/projects/{own.pk}/members/{membership.pk}", {"action": "remove"})
    assert response.status_code == 404
    assert _post(client, f"/manage/projects/{theirs.pk}/settings", SETTINGS).status_code == 404
    assert Membership.objects.filter(pk=membership.pk).exists()


def test_a_labeler_gets_no_project_pages():
    labeler = user_with_roles(username="lee")
    project = Project.objects.create(name="p")
    add_member(project, labeler, Role.LABELER)
    client = _signed_in(labeler)
    assert client.get("/manage/projects/new").status_code == 403
    assert client.get(f"/manage/projects/{project.pk}/members").status_code == 403


def test_members_are_added_by_exact_username_re_roled_and_removed():
    manager = user_with_roles(Role.MANAGER, username="maria")
    project = Project.objects.create(name="p")
    add_member(project, manager, Role.MANAGER)
    person = user_with_roles(username="sam")
    client = _signed_in(manager)

    assert (
        _post(
            client, f"/manage/projects/{project.pk}/members", {"username": "SA", "role": "labeler"}
        ).status_code
        == 400
    )
    added = _post(client, f"/manage/projects/{project.pk}/members", {"username": "sam", "role": "labeler"})
    assert added.status_code == 302
    membership = Membership.objects.get(project=project, user=person)
    assert membership.role == Role.LABELER

    _post(
        client,
        f"/manage/projects/{project.pk}/members/{membership.pk}",
        {"action": "role", "role": "reviewer"},
    )
    assert list(Membership.objects.filter(project=project, user=person).values_list("role", flat=True)) == [
        "reviewer"
    ]

    _post(client, f"/manage/projects/{project.pk}/members/{membership.pk}", {"action": "remove"})
    assert not Membership.objects.filter(project=project, user=person).exists()


def test_a_manager_cannot_add_another_manager_nor_change_a_managers_membership():
    manager = user_with_roles(Role.MANAGER, username="maria")
    colleague = user_with_roles(Role.MANAGER, username="boss")
    project = Project.objects.create(name="p")
    add_member(project, manager, Role.MANAGER)
    add_member(project, colleague, Role.MANAGER)
    client = _signed_in(manager)

    refused = _post(client, f"/manage/projects/{project.pk}/members", {"username": "boss", "role": "labeler"})
    assert refused.status_code == 400
    assert "No account that can be added is named “boss”." in refused.content.decode()

    theirs = Membership.objects.get(project=project, user=colleague)
    response = _post(client, f"/manage/projects/{project.pk}/members/{theirs.pk}", {"action": "remove"})
    assert response.status_code == 302
    assert Membership.objects.filter(pk=theirs.pk, role=Role.MANAGER).exists()
    page = client.get(f"/manage/projects/{project.pk}/members").content.decode()
    assert "Managers are given and taken away by a superuser" in page


def test_prompts_are_imported_from_the_project_page_and_a_bad_file_writes_nothing():
    from django.core.files.uploadedfile import SimpleUploadedFile

    manager = user_with_roles(Role.MANAGER, username="maria")
    project = Project.objects.create(name="p", k=2)
    add_member(project, manager, Role.MANAGER)
    client = _signed_in(manager)
    good = "\n".join(
        json.dumps(
            {
                "id": f"q{n}",
                "prompt": f"Question {n}?",
                "completions": [{"text": f"yes {n}", "policy": "a"}, {"text": f"no {n}", "policy": "b"}],
            }
        )
        for n in range(2)
    )
    bad = good + "\n{not json\n"

    refused = _post(
        client, f"/manage/projects/{project.pk}/import", {"file": SimpleUploadedFile("p.jsonl", bad.encode())}
    )
    assert refused.status_code == 400
    assert "nothing was imported" in refused.content.decode()
    assert not project.prompts.exists()

    imported = _post(
        client,
        f"/manage/projects/{project.pk}/import",
        {"file": SimpleUploadedFile("p.jsonl", good.encode())},
    )
    assert imported.status_code == 302
    assert project.prompts.count() == 2 and project.tasks.count() == 2


@pytest.mark.parametrize("path", ["settings", "members", "import"])
def test_project_pages_follow_the_membership_not_the_global_group(path):
    # a manager of the project who is in no global group gets in
    project = Project.objects.create(name="p")
    member_only = add_member(project, user_with_roles(username="member-only"), Role.MANAGER)
    assert _signed_in(member_only).get(f"/manage/projects/{project.pk}/{path}").status_code == 200

    # a person in the manager group who does not manage the project does not even see it
    group_only = user_with_roles(Role.MANAGER, username="group-only")
    assert _signed_in(group_only).get(f"/manage/projects/{project.pk}/{path}").status_code == 404
