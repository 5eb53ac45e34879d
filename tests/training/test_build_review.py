"""Builds leave out the comparisons of judgments rejected in review."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_django import Settings

from annotation.review import judgment_review
from annotation.roles import Role
from tests.factories import user_with_roles
from tests.training.test_builds_support import (
    all_rows,
    judge,
    make_manager,
    project_with_prompts,
    run_build,
    tasks_of,
)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def artifacts(settings: Settings, tmp_path: Path) -> Path:
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


def test_a_build_leaves_out_judgments_rejected_in_review():
    project = project_with_prompts(
        ["Why is the sky blue?", "Write a haiku about rain."], k=3, name="rejections"
    )
    manager = make_manager(project, user_with_roles(Role.MANAGER, username="vera"))
    ann, bob = (user_with_roles(Role.LABELER, username=name) for name in ("ann", "bob"))
    first, second = tasks_of(project)
    judge(first, ann, [1, 2, 3])
    rejected = judge(second, bob, [1, 2, 3])

    judgment_review(judgment=rejected, reviewer=manager, accept=False, reason="careless")
    build = run_build(created_by=manager, projects=[project], test_fraction=0.0)

    assert build.summary["judgment_versions"]["judgments"] == 1
    assert len(all_rows(build, "pairs")) == 3
    assert len(all_rows(build, "grouped")) == 1
