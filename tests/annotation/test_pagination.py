"""Every list that can grow is paginated, and each page costs the same number of queries however many rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from annotation.models import Membership, Project
from annotation.pagination import API_PAGE_SIZE, PAGE_SIZE
from annotation.roles import Role
from tests.annotation.conftest import add_member, make_people
from training.models import DatasetBuild, TrainingRun

PAGE_URLS = [
    "/manage/",
    "/label/",
    "/evaluate/",
    "/datasets/",
    "/training/runs/",
    "/policies/",
    "/generation/",
]
API_URLS = ["/api/projects/", "/api/dataset-builds/", "/api/training-runs/"]


def _grow(manager: Any, judge: Any, count: int, make_project: Callable[..., Project]) -> None:
    """`count` ranking projects, A/B sessions, builds over them and runs over the builds."""
    for index in range(count):
        for kind in (Project.Kind.RANKING, Project.Kind.AB):
            project = make_project(tasks=2, k=2, name=f"{kind}-{index}-{Project.objects.count()}", kind=kind)
            add_member(project, manager, Role.MANAGER)
            add_member(project, judge, Role.LABELER if kind == Project.Kind.RANKING else Role.EVALUATOR)
        build = DatasetBuild.objects.create(name=f"build {index}", created_by=manager)
        build.projects.add(project)
        build.labelers.add(judge)
        TrainingRun.objects.create(name=f"run {index}", kind="reward", dataset_build=build, base_model="m")


def _queries(client: Client, url: str) -> tuple[int, int]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    return len(captured.captured_queries), response.status_code


@pytest.fixture
def people(db: None) -> dict[str, Any]:
    manager, judge = make_people(2, prefix="lists")
    judge.is_staff = False
    return {"manager": manager, "judge": judge}


@pytest.mark.django_db
@pytest.mark.parametrize("url", PAGE_URLS + API_URLS)
def test_a_list_costs_the_same_number_of_queries_for_2_rows_as_for_12(
    url: str, people: dict[str, Any], make_project: Callable[..., Project]
) -> None:
    # given a manager (who also judges in every project, so the judge lists are full too)
    client = Client()
    who = people["judge"] if url in ("/label/", "/evaluate/") else people["manager"]
    client.force_login(who)
    _grow(people["manager"], people["judge"], 2, make_project)
    few, _ = _queries(client, url)

    # when the lists grow six-fold
    _grow(people["manager"], people["judge"], 10, make_project)
    many, _ = _queries(client, url)

    # then a page costs what it cost before
    assert many == few, url


@pytest.mark.django_db
def test_the_api_walks_every_build_with_cursors_past_the_old_cut_of_200(
    people: dict[str, Any], make_project: Callable[..., Project]
) -> None:
    # given 230 builds of a project the manager runs
    project = make_project(tasks=1, k=2)
    add_member(project, people["manager"], Role.MANAGER)
    builds = DatasetBuild.objects.bulk_create(
        DatasetBuild(name=f"b{index}", created_by=people["manager"]) for index in range(230)
    )
    DatasetBuild.projects.through.objects.bulk_create(
        DatasetBuild.projects.through(datasetbuild_id=build.pk, project_id=project.pk) for build in builds
    )
    api = APIClient()
    api.force_authenticate(people["manager"])

    # when the client follows `next` to the end
    seen, url, pages = [], "/api/dataset-builds/", 0
    while url:
        body = api.get(url).json()
        seen += [row["id"] for row in body["results"]]
        url, pages = body["next"], pages + 1

    # then every build came once, newest first, a page at a time
    assert seen == sorted((build.pk for build in builds), reverse=True)
    assert pages == -(-230 // API_PAGE_SIZE)


@pytest.mark.django_db
def test_a_page_size_is_asked_for_and_capped(
    people: dict[str, Any], make_project: Callable[..., Project]
) -> None:
    for index in range(3):
        add_member(make_project(tasks=1, k=2, name=f"p{index}"), people["manager"], Role.MANAGER)
    api = APIClient()
    api.force_authenticate(people["manager"])

    body = api.get("/api/projects/?page_size=2").json()

    assert len(body["results"]) == 2 and body["next"] and body["previous"] is None
    rest = api.get(body["next"]).json()
    assert len(rest["results"]) == 1 and rest["next"] is None


@pytest.mark.django_db
def test_the_manage_page_is_paginated_and_keeps_the_run_filters_in_its_links(
    people: dict[str, Any], make_project: Callable[..., Project]
) -> None:
    # given more projects than one page holds
    projects = [make_project(tasks=0, k=2, name=f"many {index}") for index in range(PAGE_SIZE + 3)]
    Membership.objects.bulk_create(
        Membership(project=project, user=people["manager"], role=Role.MANAGER) for project in projects
    )
    client = Client()
    client.force_login(people["manager"])

    # when
    first = client.get("/manage/")
    last = client.get("/manage/?page=2")

    # then
    assert len(first.context["rows"]) == PAGE_SIZE and len(last.context["rows"]) == 3
    assert 'rel="next"' in first.content.decode() and "page=2" in first.content.decode()
    runs = client.get("/training/runs/?status=queued&page=1")
    assert runs.status_code == 200 and runs.context["page_query"] == "status=queued"
