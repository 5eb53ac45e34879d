"""Builds record which version of each judgment they read (labelers revise until a review)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_django import Settings

from annotation.review import judgment_revise
from annotation.roles import Role
from annotation.services import JudgmentInput
from tests.factories import user_with_roles
from tests.training.test_builds_support import (
    all_rows,
    build_folder,
    judge,
    make_manager,
    project_with_prompts,
    run_build,
    tasks_of,
    uids_of,
)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def artifacts(settings: Settings, tmp_path: Path) -> Path:
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


def test_a_build_records_which_version_of_each_judgment_it_read():
    # given two judged tasks, one of them revised by its labeler after a first build
    project = project_with_prompts(
        ["Why is the sky blue?", "Write a haiku about rain."], k=3, name="versions"
    )
    manager = make_manager(project, user_with_roles(Role.MANAGER, username="vera"))
    ann, bob = (user_with_roles(Role.LABELER, username=name) for name in ("ann", "bob"))
    first, second = tasks_of(project)
    kept = judge(first, ann, [1, 2, 3])
    judge(second, bob, [1, 2, 3])
    before = run_build(created_by=manager, projects=[project], name="before", test_fraction=0.0)

    revised_ranks = dict(zip(uids_of(first), [3, 2, 1], strict=True))
    judgment_revise(judgment=kept, user=ann, answer=JudgmentInput(ranks=revised_ranks, client_token="x"))
    after = run_build(created_by=manager, projects=[project], name="after", test_fraction=0.0)

    # then each build says how many judgments it read, how many were revised, and a digest of the versions
    assert (
        before.summary["judgment_versions"]["judgments"]
        == after.summary["judgment_versions"]["judgments"]
        == 2
    )
    assert before.summary["judgment_versions"]["revised"] == 0
    assert after.summary["judgment_versions"]["revised"] == 1
    assert after.summary["judgment_versions"]["sha256"] != before.summary["judgment_versions"]["sha256"]
    assert "1 of them revised" in (build_folder(after) / "README.md").read_text()
    # and the revised ranking is what the rows say
    assert len(all_rows(after, "pairs")) == 6
    assert before.content_hash != after.content_hash
