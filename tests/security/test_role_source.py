"""One source of truth for roles: a project membership decides, and every page agrees with the API.

For each role, two people who used to get different answers from pages and
API: a member of the project who is in no global group, and a person in the
role's global group who is a member of nothing. For every page and API
endpoint of the role, the first gets through everywhere and the second
nowhere — never a page that refuses what the API allows, or the reverse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.contrib.auth.models import AbstractUser
from django.test import Client
from rest_framework.test import APIClient

from annotation.models import Membership, Policy, Project
from annotation.roles import Role
from annotation.services import ab_session_create
from tests.annotation.test_ab import source_prompts
from tests.factories import user_with_roles

Probe = Callable[[Client, APIClient, Project], int]


@dataclass(frozen=True)
class Door:
    name: str
    probe: Probe
    through: tuple[int, ...]  # the answers that mean "allowed"


def _page(path: str) -> Probe:
    return lambda page, api, project: page.get(path.format(id=project.pk)).status_code


def _page_post(path: str) -> Probe:
    return lambda page, api, project: page.post(path.format(id=project.pk)).status_code


def _api(method: str, path: str) -> Probe:
    return lambda page, api, project: getattr(api, method)(path.format(id=project.pk)).status_code


def _api_lists_project(page: Client, api: APIClient, project: Project) -> int:
    listed = {row["id"] for row in api.get("/api/projects/").json()["results"]}
    return 200 if project.pk in listed else 404


def _nav_entry(label: str) -> Probe:
    def probe(page: Client, api: APIClient, project: Project) -> int:
        return 200 if f">{label}</a>" in page.get("/").content.decode() else 404

    return probe


DOORS: dict[str, list[Door]] = {
    Role.LABELER: [
        Door("navigation entry", _nav_entry("Label"), (200,)),
        Door("label page", _page("/label/"), (200,)),
        Door("ranking page", _page("/label/{id}/"), (200,)),
        Door("claim from the page", _page_post("/label/{id}/next"), (200,)),
        Door("API project list", _api_lists_project, (200,)),
        Door("API project", _api("get", "/api/projects/{id}/"), (200,)),
        Door("API claim", _api("post", "/api/projects/{id}/next"), (200, 204)),
    ],
    Role.EVALUATOR: [
        Door("navigation entry", _nav_entry("Evaluate"), (200,)),
        Door("evaluate page", _page("/evaluate/"), (200,)),
        Door("A/B page", _page("/evaluate/{id}/"), (200,)),
        Door("claim from the page", _page_post("/evaluate/{id}/next"), (200,)),
        Door("API project list", _api_lists_project, (200,)),
        Door("API project", _api("get", "/api/projects/{id}/"), (200,)),
        Door("API claim", _api("post", "/api/projects/{id}/next"), (200, 204)),
    ],
    Role.MANAGER: [
        Door("project dashboard", _page("/manage/projects/{id}/"), (200,)),
        Door(
            "dataset build form lists it",
            lambda p, a, project: _form_lists(p, "/datasets/new", project),
            (200,),
        ),
        Door(
            "A/B session form lists it",
            lambda p, a, project: _form_lists(p, "/ab-sessions/new", project),
            (200,),
        ),
        Door("API project list", _api_lists_project, (200,)),
        Door("API stats", _api("get", "/api/projects/{id}/stats"), (200,)),
        Door("API judgments", _api("get", "/api/projects/{id}/judgments"), (200,)),
    ],
}


def _form_lists(page: Client, path: str, project: Project) -> int:
    response = page.get(path)
    if response.status_code != 200:
        return response.status_code
    return 200 if f'value="{project.pk}"' in response.content.decode() else 404


def _project_for(role: str) -> Project:
    sft, dpo = Policy.objects.create(name="sft"), Policy.objects.create(name="dpo")
    prompts = source_prompts(2, [sft, dpo])
    if role != Role.EVALUATOR:
        return prompts[0].project
    host = user_with_roles(Role.MANAGER, username="host")
    return ab_session_create(
        name="blind", policies=[sft, dpo], prompts=prompts, votes_per_pair=1, created_by=host
    )


def _answers(user: AbstractUser, role: str, project: Project) -> dict[str, bool]:
    page, api = Client(), APIClient()
    page.force_login(user)
    api.force_authenticate(user)
    return {door.name: door.probe(page, api, project) in door.through for door in DOORS[role]}


@pytest.mark.django_db
@pytest.mark.parametrize("role", [Role.LABELER, Role.EVALUATOR, Role.MANAGER])
def test_a_member_without_the_global_group_gets_through_every_page_and_api_door_of_the_role(
    role: str,
) -> None:
    # given a person who holds the role in the project, and no global group at all
    project = _project_for(role)
    member = user_with_roles(username="member-only")
    Membership.objects.create(project=project, user=member, role=role)

    # when they try every page and API door of the role, then every one lets them through
    answers = _answers(member, role, project)
    assert answers == dict.fromkeys(answers, True)


@pytest.mark.django_db
@pytest.mark.parametrize("role", [Role.LABELER, Role.EVALUATOR, Role.MANAGER])
def test_a_global_group_without_a_membership_opens_no_door_of_the_project(role: str) -> None:
    # given a person in the role's global group who is a member of nothing
    project = _project_for(role)
    grouped = user_with_roles(role, username="group-only")

    # when they try every page and API door of the role, then none lets them reach the project
    answers = _answers(grouped, role, project)
    assert answers == dict.fromkeys(answers, False)
    # and a labeler or evaluator group alone is told how to get to work
    if role != Role.MANAGER:
        client = Client()
        client.force_login(grouped)
        assert "not a member of any project yet" in client.get("/").content.decode()


@pytest.mark.django_db
def test_a_project_manager_without_the_account_wide_right_is_not_offered_the_admin() -> None:
    project = _project_for(Role.MANAGER)
    member = user_with_roles(username="member-only")
    Membership.objects.create(project=project, user=member, role=Role.MANAGER)
    client = Client()
    client.force_login(member)
    home = client.get("/").content.decode()
    assert ">Manage</a>" in home
    assert ">Admin</a>" not in home
