"""Dawid–Skene aggregation: labelers weighed by the reliability the votes themselves reveal."""

from __future__ import annotations

import random

import pytest
from django.contrib.auth.models import AbstractUser

from annotation.models import Project
from annotation.roles import Role
from tests.factories import user_with_roles
from tests.training.test_builds import artifacts  # noqa: F401  (autouse: builds under tmp_path)
from tests.training.test_builds_support import (
    all_rows,
    build_folder,
    judge,
    project_with_prompts,
    run_build,
    tasks_of,
)
from training.models import DatasetBuild

pytestmark = pytest.mark.django_db


@pytest.fixture
def manager(db: None) -> AbstractUser:
    return user_with_roles(Role.MANAGER, username="ds-host")


def contested_project(*, coin_only: int = 0) -> tuple[Project, dict[str, AbstractUser]]:
    """30 two-completion prompts, each with a right and a wrong answer (right first on even prompts).

    - prompts 0–19: two careful labelers answer right; a careless one answers by a coin (seeded);
    - prompts 20–29: only one careful labeler and the careless one, who answers wrong there.
    Majority cannot break the 1–1 splits on 20–29; Dawid–Skene knows whom to trust from 0–19.
    With `coin_only`, that many more prompts are answered (right) by the careless labeler alone.
    """
    total = 30 + coin_only
    prompts = [f"Which answer to question {n} is right?" for n in range(total)]
    answers = [[f"Right {n}", f"Wrong {n}"][:: 1 if n % 2 == 0 else -1] for n in range(total)]
    project = project_with_prompts(prompts, name="contested", k=2, answers=answers)
    people = {
        name: user_with_roles(Role.LABELER, username=name) for name in ("careful-1", "careful-2", "coin")
    }
    coin = random.Random(3)
    for number, task in enumerate(tasks_of(project)):
        texts = [
            item.completion.text for item in task.items.select_related("completion").order_by("position")
        ]
        right = [1 if text.startswith("Right") else 2 for text in texts]
        wrong = right[::-1]
        if number >= 30:
            judge(task, people["coin"], right)
            continue
        judge(task, people["careful-1"], right)
        if number < 20:
            judge(task, people["careful-2"], right)
            judge(task, people["coin"], right if coin.random() < 0.5 else wrong)
        else:
            judge(task, people["coin"], wrong)
    return project, people


def chosen_by_prompt(build: DatasetBuild) -> dict[str, str]:
    return {row["prompt"].strip(): row["chosen"] for row in all_rows(build, "pairs")}


def test_dawid_skene_sides_with_the_careful_labeler_where_the_majority_cannot_decide(
    manager: AbstractUser,
) -> None:
    # given the contested project
    project, _people = contested_project()

    # when it is built with each aggregation
    majority = run_build(
        created_by=manager, projects=[project], name="m", aggregation="majority", test_fraction=0.0
    )
    dawid_skene = run_build(
        created_by=manager, projects=[project], name="ds", aggregation="dawid_skene", test_fraction=0.0
    )

    # then majority has no row for the 1–1 splits, Dawid–Skene has every pair and each one right
    by_majority = chosen_by_prompt(majority)
    by_dawid_skene = chosen_by_prompt(dawid_skene)
    contested = {f"Which answer to question {n} is right?" for n in range(20, 30)}
    assert not contested & set(by_majority)
    assert len(by_dawid_skene) == 30
    assert all(chosen.startswith("Right") for chosen in by_dawid_skene.values()), by_dawid_skene
    assert dawid_skene.summary["majority"]["preference_rows"] == 30


def test_the_card_lists_each_labelers_estimated_reliability(manager: AbstractUser) -> None:
    project, people = contested_project()

    build = run_build(created_by=manager, projects=[project], aggregation="dawid_skene", test_fraction=0.0)

    rows = {row["username"]: row for row in build.summary["dawid_skene"]["labelers"]}
    assert {name: row["votes"] for name, row in rows.items()} == {
        "careful-1": 30,
        "careful-2": 20,
        "coin": 30,
    }
    assert rows["careful-1"]["reliability"] > 0.9 and rows["careful-2"]["reliability"] > 0.9, rows
    assert rows["coin"]["reliability"] < 0.6
    card = (build_folder(build) / "README.md").read_text()
    assert "Dawid–Skene: labelers' estimated reliability" in card
    assert f"| coin | {people['coin'].pk} | 30 |" in card


def test_a_dawid_skene_build_is_reproducible_to_the_byte(manager: AbstractUser) -> None:
    project, _people = contested_project()
    first = run_build(created_by=manager, projects=[project], name="one", aggregation="dawid_skene")
    second = run_build(created_by=manager, projects=[project], name="two", aggregation="dawid_skene")
    assert first.content_hash == second.content_hash


def test_a_high_threshold_keeps_only_the_pairs_dawid_skene_is_sure_of(manager: AbstractUser) -> None:
    # given four more pairs that only the careless labeler answered
    project, _people = contested_project(coin_only=4)

    # when built with a posterior threshold of 0.9
    build = run_build(
        created_by=manager,
        projects=[project],
        aggregation="dawid_skene",
        agreement_threshold=0.9,
        test_fraction=0.0,
    )

    # then those four have no row, the 30 the careful labelers answered have
    majority = build.summary["majority"]
    assert (majority["preference_rows"], majority["dropped_below_threshold"]) == (30, 4)
    assert not any(
        row["prompt"].startswith("Which answer to question 3") and len(row["prompt"]) > 40 for row in []
    )


def test_the_dashboard_shows_each_labelers_reliability_from_the_latest_dawid_skene_build(
    manager: AbstractUser,
) -> None:
    from django.test import Client

    from annotation.models import LabelerReliability

    # given a Dawid–Skene build of the contested project
    project, _people = contested_project()
    build = run_build(created_by=manager, projects=[project], aggregation="dawid_skene", test_fraction=0.0)

    # then each labeler's estimate is stored for the project, and the dashboard shows it
    stored = {row.user.username: row for row in LabelerReliability.objects.filter(project=project)}
    assert set(stored) == {"careful-1", "careful-2", "coin"}
    assert stored["coin"].reliability < 0.6 < stored["careful-1"].reliability
    assert stored["coin"].source == f"Dawid–Skene, dataset build {build.pk}"
    client = Client()
    client.force_login(manager)
    page = client.get(f"/manage/projects/{project.pk}/")
    rows = {row["username"]: row for row in page.context["stats"]["labelers"]}
    assert rows["coin"]["reliability"] == pytest.approx(stored["coin"].reliability)
    assert "Estimated reliability" in page.content.decode()

    # and a majority build leaves the estimates alone
    run_build(created_by=manager, projects=[project], name="majority", aggregation="majority")
    assert LabelerReliability.objects.filter(project=project).count() == 3
