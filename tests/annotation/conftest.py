"""Builders for annotation tests: projects with tasks ready to claim."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser

from annotation.models import Completion, Membership, Policy, Project, Prompt
from annotation.roles import Role
from annotation.services import tasks_create_for_project

ProjectMaker = Callable[..., Project]


def add_member(project: Project, user: AbstractUser, role: str = Role.LABELER) -> AbstractUser:
    Membership.objects.get_or_create(project=project, user=user, role=role)
    return user


def make_people(count: int, prefix: str = "person") -> list[AbstractUser]:
    User = get_user_model()
    return [User.objects.create_user(username=f"{prefix}{index}", password=None) for index in range(count)]


@pytest.fixture
def make_project() -> ProjectMaker:
    """make_project(tasks=10, k=4, overlap=1, gold=0, **project_fields) -> Project with tasks built."""

    def build(
        *, tasks: int = 10, k: int = 4, gold: int = 0, name: str | None = None, **fields: Any
    ) -> Project:
        project = Project.objects.create(name=name or f"project-{Project.objects.count() + 1}", k=k, **fields)
        policies = [
            Policy.objects.get_or_create(name=f"policy-{index}", defaults={"kind": Policy.Kind.IMPORTED})[0]
            for index in range(k)
        ]
        for number in range(tasks + gold):
            is_gold = number >= tasks
            metadata = {"gold_ranks": list(range(1, k + 1))} if is_gold else {}
            prompt = Prompt.objects.create(
                project=project,
                external_id=f"p{number}",
                text=f"Question {number} of {project.name}?",
                content_hash=f"{project.name}-{number}",
                metadata=metadata,
            )
            Completion.objects.bulk_create(
                Completion(prompt=prompt, policy=policy, text=f"Answer {index} to question {number}.")
                for index, policy in enumerate(policies)
            )
        tasks_create_for_project(project=project)
        return project

    return build
