"""Policies and generation jobs on the manager pages: registered only when they would load, scoped by project."""

from __future__ import annotations

import json
from pathlib import Path
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


def saved_model(folder: Path, *, tokenizer: bool = True, config: str | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config if config is not None else json.dumps({"model_type": "llama"}))
    if tokenizer:
        (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    return folder


def test_a_folder_with_config_and_tokenizer_is_registered_as_a_model_policy(tmp_path):
    manager = user_with_roles(Role.MANAGER, username="maria")
    folder = saved_model(tmp_path / "my-sft")
    response = _post(
        _signed_in(manager),
        "/policies/",
        {"name": "", "base_model": str(folder), "adapter": "", "prompt_format": "auto"},
    )

    assert response.status_code == 302
    policy = Policy.objects.get(name="my-sft")
    assert policy.kind == Policy.Kind.MODEL and policy.base_model == str(folder.resolve())
    assert policy.generation_settings == {}


def test_a_prompt_format_chosen_at_registration_is_the_policys(tmp_path):
    from training.services import policy_prompt_format

    manager = user_with_roles(Role.MANAGER, username="maria")
    folder = saved_model(tmp_path / "chat-sft")
    data = {"name": "", "base_model": str(folder), "adapter": "", "prompt_format": "chat"}
    assert _post(_signed_in(manager), "/policies/", data).status_code == 302
    assert policy_prompt_format(policy=Policy.objects.get(name="chat-sft")) == "chat"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda path: path / "nowhere", "does not exist on this server"),
        (lambda path: saved_model(path / "m", tokenizer=False), "has no tokenizer"),
        (lambda path: saved_model(path / "m", config="{not json"), "does not read as JSON"),
        (lambda path: saved_model(path / "m", config="{}"), "names no model_type"),
    ],
)
def test_a_folder_that_would_not_load_is_refused_saying_what_is_wrong(tmp_path, make, says):
    manager = user_with_roles(Role.MANAGER, username="maria")
    folder = make(tmp_path)
    response = _post(
        _signed_in(manager),
        "/policies/",
        {"name": "x", "base_model": str(folder), "adapter": "", "prompt_format": "auto"},
    )

    assert response.status_code == 400
    assert says in response.content.decode()
    assert not Policy.objects.exists()


def test_a_hub_id_missing_from_the_cache_is_refused_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    manager = user_with_roles(Role.MANAGER, username="maria")
    response = _post(
        _signed_in(manager),
        "/policies/",
        {"name": "", "base_model": "org/model", "adapter": "", "prompt_format": "auto"},
    )
    assert response.status_code == 400
    assert "is not in this server&#x27;s Hugging Face cache" in response.content.decode()

    saved_model(tmp_path / "hub" / "models--org--model" / "snapshots" / "abc123")
    response = _post(
        _signed_in(manager),
        "/policies/",
        {"name": "", "base_model": "org/model", "adapter": "", "prompt_format": "auto"},
    )
    assert response.status_code == 302
    assert Policy.objects.get(name="model").base_model == "org/model"


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
    client = _signed_in(manager)
    data = {"policy": policy.pk, "n": 2, "temperature": 1, "top_p": 1, "max_new_tokens": 16, "seed": 0}

    refused = _post(client, "/generation/", {**data, "project": theirs.pk})
    assert refused.status_code == 400 and not GenerationJob.objects.exists()

    started = _post(client, "/generation/", {**data, "project": mine.pk})
    job = GenerationJob.objects.get()
    assert started.status_code == 302 and started["Location"] == f"/generation/{job.pk}/"
    assert (job.project, job.n, job.max_new_tokens, job.created_by) == (mine, 2, 16, manager)
