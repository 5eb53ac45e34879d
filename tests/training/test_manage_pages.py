"""Generation jobs on the manager pages, scoped by project (registering policies: test_policies.py)."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from annotation.models import Policy, Project
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.factories import user_with_roles
from training.models import GenerationJob

pytestmark = pytest.mark.django_db


def _signed_in(user: Any) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def _post(client: Client, url: str, data: dict[str, Any]) -> Any:
    client.get("/manage/")
    return client.post(url, {**data, "csrfmiddlewaretoken": client.cookies["csrftoken"].value})


def test_generation_jobs_are_listed_and_shown_only_on_projects_the_manager_runs():
    manager = user_with_roles(Role.MANAGER, username="maria")
    policy = Policy.objects.create(name="sft", base_model="/models/sft")
    mine = Project.objects.create(name="mine")
    add_member(mine, manager, Role.MANAGER)
    theirs = Project.objects.create(name="theirs")
    my_job = GenerationJob.objects.create(policy=policy, project=mine, prompts_total=4, prompts_done=1)
    their_job = GenerationJob.objects.create(policy=policy, project=theirs)
    client = _signed_in(manager)

    listing = client.get("/generation/").content.decode()
    assert f"/generation/{my_job.pk}/" in listing and f"/generation/{their_job.pk}/" not in listing
    assert client.get(f"/generation/{their_job.pk}/").status_code == 404
    assert client.get(f"/generation/{their_job.pk}/status").status_code == 404
    status = client.get(f"/generation/{my_job.pk}/status").json()
    assert (status["step"], status["total_steps"], status["progress"], status["terminal"]) == (
        1,
        4,
        0.25,
        False,
    )


def test_a_generation_job_is_started_from_the_page_for_a_managed_project_only():
    manager = user_with_roles(Role.MANAGER, username="maria")
    policy = Policy.objects.create(name="sft", base_model="/models/sft")
    mine = Project.objects.create(name="mine")
    add_member(mine, manager, Role.MANAGER)
    theirs = Project.objects.create(name="theirs")
    policy.projects.add(mine)
    client = _signed_in(manager)
    data = {"policy": policy.pk, "n": 2, "temperature": 1, "top_p": 1, "max_new_tokens": 16, "seed": 0}

    refused = _post(client, "/generation/", {**data, "project": theirs.pk})
    assert refused.status_code == 400 and not GenerationJob.objects.exists()

    started = _post(client, "/generation/", {**data, "project": mine.pk})
    job = GenerationJob.objects.get()
    assert started.status_code == 302 and started["Location"] == f"/generation/{job.pk}/"
    assert (job.project, job.n, job.max_new_tokens, job.created_by) == (mine, 2, 16, manager)
