"""Builders for annotation tests: projects with tasks ready to claim."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
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


def run_on_sqlite(test_file: str, tmp_path: Path, *, deselect: str) -> str:
    """Run `test_file` again on the SQLite default in a child pytest (less the tests matching `deselect`).

    Returns pytest's output; fails the calling test when the child run fails.
    """
    (tmp_path / "var").mkdir(exist_ok=True)  # where the SQLite test database goes
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "VAR_DIR": str(tmp_path / "var"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", f"not {deselect}"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout
