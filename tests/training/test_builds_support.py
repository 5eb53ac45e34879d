"""Builders shared by the dataset-build tests: projects whose judgments a test writes vote by vote.

(A module of helpers, not tests: tests/training/conftest.py belongs to the
model fixtures, so the build tests import these directly.)
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.contrib.auth.models import AbstractUser
from django.utils import timezone

from annotation.importing import prompt_content_hash
from annotation.models import (
    Assignment,
    Comparison,
    Completion,
    Judgment,
    Membership,
    Policy,
    Project,
    Prompt,
    Task,
)
from annotation.roles import Role
from annotation.services import JudgmentInput, judgment_submit, tasks_create_for_project
from training.models import DatasetBuild
from training.selectors import dataset_build_dir
from training.services import dataset_build_create, dataset_build_run

PromptSpec = str | list[dict[str, str]] | dict[str, Any]


def project_with_prompts(
    prompts: list[PromptSpec],
    *,
    name: str = "support",
    k: int = 4,
    answers: list[list[str]] | None = None,
    **fields: Any,
) -> Project:
    """A project with one task per prompt, K completions each ("Answer i to <prompt>").

    A prompt is its text, a list of chat messages, or {"prompt": …, "metadata": {…}}.
    """
    project = Project.objects.create(name=name, k=k, **fields)
    policies = [
        Policy.objects.get_or_create(name=f"policy-{index}", defaults={"kind": Policy.Kind.IMPORTED})[0]
        for index in range(k)
    ]
    project.policies.add(*policies)  # as an import does: the policies belong to the project
    for number, spec in enumerate(prompts):
        metadata: dict[str, Any] = {}
        if isinstance(spec, dict):
            metadata = spec.get("metadata", {})
            spec = spec["prompt"]
        is_chat = isinstance(spec, list)
        prompt = Prompt.objects.create(
            project=project,
            external_id=f"{name}-{number}",
            text="" if is_chat else spec,
            messages=spec if is_chat else None,
            metadata=metadata,
            content_hash=prompt_content_hash(spec),
        )
        texts = (
            answers[number]
            if answers
            else [f"Answer {index} to prompt {number} of {name}." for index in range(k)]
        )
        Completion.objects.bulk_create(
            Completion(prompt=prompt, policy=policy, text=text)
            for policy, text in zip(policies, texts, strict=True)
        )
    tasks_create_for_project(project=project)
    return project


def tasks_of(project: Project) -> list[Task]:
    return list(Task.objects.filter(project=project).order_by("prompt_id"))


def uids_of(task: Task) -> list[str]:
    """The task's completion uids in position order."""
    return [str(item.completion.uid) for item in task.items.select_related("completion").order_by("position")]


def judge(
    task: Task,
    user: AbstractUser,
    ranks: list[int],
    *,
    likert: list[int] | None = None,
    flags: dict[int, list[str]] | None = None,
    at: datetime | None = None,
    none_acceptable: bool = False,
) -> Judgment:
    """Submit `user`'s ranking of the task (ranks by position) through the real service.

    `flags` maps a position to flag names; `at` back-dates the judgment and its comparisons.
    """
    uids = uids_of(task)
    now = timezone.now()
    slot = Assignment.objects.filter(task=task).count()
    assignment = Assignment.objects.create(
        task=task,
        user=user,
        slot=slot,
        permutation=list(range(len(uids))),
        leased_at=now,
        lease_expires_at=now + timedelta(minutes=30),
    )
    answer = JudgmentInput(
        ranks={} if none_acceptable else dict(zip(uids, ranks, strict=True)),
        likert=dict(zip(uids, likert, strict=True)) if likert else {},
        flags={uids[position]: names for position, names in (flags or {}).items()},
        none_acceptable=none_acceptable,
        client_token=f"t{task.pk}-{user.pk}-{slot}",
    )
    judgment = judgment_submit(assignment=assignment, user=user, answer=answer).judgment
    if at is not None:
        Judgment.objects.filter(pk=judgment.pk).update(created_at=at)
        Comparison.objects.filter(judgment=judgment).update(created_at=at)
    return judgment


def make_manager(project: Project, user: AbstractUser) -> AbstractUser:
    Membership.objects.get_or_create(project=project, user=user, role=Role.MANAGER)
    return user


def run_build(
    *, created_by: AbstractUser, projects: list[Project], name: str = "build", **options: Any
) -> DatasetBuild:
    """Create a build through the service and run it here, as the worker would."""
    for project in projects:
        make_manager(project, created_by)
    build = dataset_build_create(created_by=created_by, name=name, projects=projects, **options)
    result = dataset_build_run(build_id=build.pk)
    assert result is not None
    return result


def build_folder(build: DatasetBuild) -> Path:
    return dataset_build_dir(build_id=build.pk)


def read_rows(build: DatasetBuild, output: str, split: str) -> list[dict[str, Any]]:
    path = build_folder(build) / output / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_rows(build: DatasetBuild, output: str) -> list[dict[str, Any]]:
    return read_rows(build, output, "train") + read_rows(build, output, "test")
