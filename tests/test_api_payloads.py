"""The API's JSON bodies as clients have always read them, field by field, now that serializers write them.

Each test records the body of one endpoint for a fixture object (names, types and values, timestamps
written with `isoformat()`), so moving a body from hand-built dicts to serializers changes nothing a
client sees.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import AbstractUser
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from pytest_django import Settings
from rest_framework.test import APIClient

from annotation.models import Assignment, Membership, Project
from annotation.roles import Role
from tests.training.test_builds_support import judge, project_with_prompts, run_build, tasks_of
from training.models import DatasetBuild, RewardModel, TrainingRun

pytestmark = pytest.mark.django_db


def api_for(user: AbstractUser) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def project(labeler: AbstractUser) -> Project:
    project = project_with_prompts(["Why is the sky blue?", "Write a haiku about rain."], name="colours", k=3)
    Membership.objects.create(project=project, user=labeler, role=Role.LABELER)
    for task in tasks_of(project):
        judge(task, labeler, [1, 2, 3])
    return project


@pytest.fixture
def build(
    settings: Settings, tmp_path: Path, manager: AbstractUser, labeler: AbstractUser, project: Project
) -> DatasetBuild:
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return run_build(
        created_by=manager,
        projects=[project],
        name="colours v1",
        labelers=[labeler],
        test_fraction=0.0,
        seed=7,
        date_from=date(2026, 1, 2),
    )


# --- dataset builds ------------------------------------------------------------------------


def test_a_finished_build_reads_as_it_always_has(
    build: DatasetBuild, manager: AbstractUser, project: Project, labeler: AbstractUser
) -> None:
    # when
    detail = api_for(manager).get(f"/api/dataset-builds/{build.pk}/")
    listed = api_for(manager).get("/api/dataset-builds/")

    # then every field is there with today's value and type
    build.refresh_from_db()
    base = f"http://testserver/datasets/{build.pk}/files/"
    body = detail.json()
    assert detail.status_code == 200
    assert body["files"][0]["key"] == "README.md"
    assert all(
        set(file) == {"key", "size", "url"}
        and file["url"] == base + file["key"]
        and type(file["size"]) is int
        for file in body["files"]
    )
    assert body == {
        "id": build.pk,
        "name": "colours v1",
        "status": "succeeded",
        "progress": 1.0,
        "counts": build.counts,
        "content_hash": build.content_hash,
        "error": "",
        "options": {
            "date_from": "2026-01-02",
            "date_to": None,
            "min_gold_accuracy": None,
            "exclude_flagged": False,
            "aggregation": "every_vote",
            "agreement_threshold": 0.5,
            "ties": "drop",
            "margin": "none",
            "format": "standard",
            "test_fraction": 0.0,
            "seed": 7,
            "near_duplicate_threshold": 0.6,
            "sft_in_preferences": True,
            "sources": "humans",
            "judge_agreement_min": 0.7,
            "projects": [project.pk],
            "labelers": [labeler.pk],
        },
        "files": body["files"],
        "created_at": build.created_at.isoformat(),
        "started_at": build.started_at.isoformat(),
        "finished_at": build.finished_at.isoformat(),
        "url": f"http://testserver/datasets/{build.pk}/",  # the build's page
    }
    assert body["created_at"].endswith("+00:00")  # isoformat(), never DRF's "Z"
    assert type(body["progress"]) is float and body["counts"]
    assert listed.json()["results"] == [body]


def test_a_queued_build_answers_201_with_no_files_and_null_times(
    manager: AbstractUser, project: Project, django_capture_on_commit_callbacks: Any
) -> None:
    Membership.objects.create(project=project, user=manager, role=Role.MANAGER)

    with django_capture_on_commit_callbacks(execute=False):
        response = api_for(manager).post(
            "/api/dataset-builds/", {"name": "queued", "projects": [project.pk]}, format="json"
        )

    assert response.status_code == 201, response.content
    body = response.json()
    build = DatasetBuild.objects.get(pk=body["id"])
    assert body["status"] == "queued" and body["files"] == [] and body["progress"] == 0.0
    assert (body["started_at"], body["finished_at"], body["content_hash"], body["error"]) == (
        None,
        None,
        "",
        "",
    )
    assert body["created_at"] == build.created_at.isoformat() and body["counts"] == {}
    assert body["options"]["projects"] == [project.pk] and body["options"]["labelers"] == []


# --- training runs -------------------------------------------------------------------------


def test_a_run_reads_as_it_always_has_with_its_reward_model_only_once_succeeded(
    build: DatasetBuild, manager: AbstractUser
) -> None:
    # given a reward run that succeeded and registered a reward model, and an RL run against it
    run = TrainingRun.objects.create(
        name="rm",
        kind="reward",
        dataset_build=build,
        base_model="tiny",
        hyperparameters={"max_steps": 4},
        step=2,
        total_steps=4,
        attempts=1,
        metrics={"loss": [0.5]},
        status=TrainingRun.Status.SUCCEEDED,
    )
    reward_model = RewardModel.objects.create(name="rm-1", run=run, base_model="tiny", path="rm")
    rl = TrainingRun.objects.create(
        name="rl", kind="rl", dataset_build=build, base_model="tiny", against_reward_model=reward_model
    )

    # when
    api = api_for(manager)
    detail = api.get(f"/api/training-runs/{run.pk}/").json()
    listed = api.get("/api/training-runs/").json()["results"]

    # then
    assert detail == {
        "id": run.pk,
        "name": "rm",
        "kind": "reward",
        "status": "succeeded",
        "dataset_build": build.pk,
        "base_model": "tiny",
        "peft": "lora",
        "trainer": "grouped",
        "gpus": 1,
        "distributed": "ddp",
        "hyperparameters": {"max_steps": 4},
        "attempts": 1,
        "step": 2,
        "total_steps": 4,
        "progress": 0.5,
        "metrics": {"loss": [0.5]},
        "error": "",
        "policy": None,
        "reward_model": reward_model.pk,
        "against_reward_model": None,
        "url": f"/training/runs/{run.pk}/",
    }
    assert listed[1] == detail
    assert listed[0]["against_reward_model"] == reward_model.pk and listed[0]["reward_model"] is None
    assert listed[0]["progress"] == 0.0 and type(listed[0]["progress"]) is float
    assert rl.pk == listed[0]["id"]

    # and a reward model is named only while its run stands succeeded
    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.FAILED)
    assert api.get(f"/api/training-runs/{run.pk}/").json()["reward_model"] is None


def test_cancel_answers_the_run(build: DatasetBuild, manager: AbstractUser) -> None:
    run = TrainingRun.objects.create(name="q", kind="dpo", dataset_build=build, base_model="tiny")

    body = api_for(manager).post(f"/api/training-runs/{run.pk}/cancel").json()

    assert body["id"] == run.pk and body["status"] == "cancelled" and body["reward_model"] is None
    assert body["url"] == f"/training/runs/{run.pk}/" and body["dataset_build"] == build.pk


# --- assignments, judgments, imports -----------------------------------------------------------


def _claim(project: Project, user: AbstractUser) -> dict[str, Any]:
    response = api_for(user).post(f"/api/projects/{project.pk}/next")
    assert response.status_code == 200, response.content
    return response.json()


def test_an_assignment_reads_as_it_always_has(manager: AbstractUser, evaluator: AbstractUser) -> None:
    # given a chat prompt in a project with flags, and a person who judges there
    project = project_with_prompts(
        [[{"role": "user", "content": "Hi?"}]], name="chat", k=3, flags=["harmful"], likert_enabled=True
    )
    Membership.objects.create(project=project, user=evaluator, role=Role.LABELER)

    # when
    body = _claim(project, evaluator)
    skipped = api_for(evaluator).post(f"/api/assignments/{body['id']}/skip", {"reason": "no"}, format="json")

    # then
    assignment = Assignment.objects.select_related("task").get(pk=body["id"])
    items = {item.position: item.completion for item in assignment.task.items.select_related("completion")}
    shown = [items[position] for position in assignment.permutation]
    assert body == {
        "id": assignment.pk,
        "project": project.pk,
        "status": "active",
        "lease_expires_at": assignment.lease_expires_at.isoformat(),
        "prompt": {"text": "", "messages": [{"role": "user", "content": "Hi?"}]},
        "completions": [
            {"id": str(completion.uid), "label": label, "text": completion.text}
            for label, completion in zip("ABC", shown, strict=True)
        ],
        "settings": {
            "kind": "ranking",
            "k": 3,
            "ties_allowed": True,
            "likert_enabled": True,
            "flags": ["harmful"],
            "rationale_required": False,
        },
    }
    assert skipped.status_code == 200
    assert skipped.json() == {**body, "status": "skipped"}


def test_a_text_prompt_has_null_messages_and_the_lease_keeps_its_offset_form(labeler: AbstractUser) -> None:
    project = project_with_prompts(["Why is the sky blue?"], name="text", k=2)
    Membership.objects.create(project=project, user=labeler, role=Role.LABELER)

    body = _claim(project, labeler)

    assert body["prompt"] == {"text": "Why is the sky blue?", "messages": None}
    assert body["lease_expires_at"].endswith("+00:00")  # isoformat(), never DRF's "Z"
    expires = datetime.fromisoformat(body["lease_expires_at"])
    assert timedelta(0) < expires - timezone.now() <= timedelta(minutes=project.lease_minutes)


def test_a_judgment_answers_its_id_comparisons_and_created_and_no_gold_key_off_gold(
    manager: AbstractUser, labeler: AbstractUser
) -> None:
    project = project_with_prompts(["One?"], name="plain", k=3)
    Membership.objects.create(project=project, user=labeler, role=Role.LABELER)
    claimed = _claim(project, labeler)
    answer = {
        "ranks": {c["id"]: rank for rank, c in enumerate(claimed["completions"], start=1)},
        "client_token": "t-1",
    }
    api = api_for(labeler)

    first = api.post(f"/api/assignments/{claimed['id']}/judgment", answer, format="json")
    again = api.post(f"/api/assignments/{claimed['id']}/judgment", answer, format="json")

    judgment_id = Assignment.objects.get(pk=claimed["id"]).judgment.pk
    assert (first.status_code, first.json()) == (
        201,
        {"judgment": judgment_id, "comparisons": 3, "created": True},
    )
    assert (again.status_code, again.json()) == (
        200,
        {"judgment": judgment_id, "comparisons": 3, "created": False},
    )


def test_an_import_reports_as_it_always_has(manager: AbstractUser) -> None:
    project = Project.objects.create(name="imports", k=2)
    Membership.objects.create(project=project, user=manager, role=Role.MANAGER)
    lines = [
        '{"prompt": "A?", "completions": [{"text": "a1", "policy": "p"}, {"text": "a2", "policy": "q"}]}',
        '{"prompt": "B?", "completions": [{"text": "same", "policy": "p"}, {"text": "same", "policy": "q"}]}',
        '{"prompt": "A?", "completions": [{"text": "x", "policy": "p"}, {"text": "y", "policy": "q"}]}',
        '{"prompt": "C?", "completions": [{"text": "c1", "policy": "p"}]}',
    ]
    upload = SimpleUploadedFile("p.jsonl", "\n".join(lines).encode(), content_type="application/jsonl")

    response = api_for(manager).post(
        f"/api/projects/{project.pk}/import", {"file": upload}, format="multipart"
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == {
        "prompts_created",
        "completions_created",
        "policies_created",
        "tasks_created",
        "duplicates",
        "repeated_texts",
        "without_task",
    }
    assert (body["prompts_created"], body["policies_created"], body["tasks_created"]) == (3, 2, 1)
    assert body["duplicates"] == [{"line": 3, "reason": body["duplicates"][0]["reason"]}]
    assert body["repeated_texts"] == [2]
    assert [row["line"] for row in body["without_task"]] == [2, 4]
    assert all(
        set(row) == {"line", "reason"} and isinstance(row["reason"], str) for row in body["without_task"]
    )
