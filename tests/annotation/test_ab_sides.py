"""Blind A/B sides: unpredictable to anyone watching their own sequence, balanced over the session.

For each evaluator, the sequence "which policy was on my left" must look like
coin flips: the Wald–Wolfowitz runs test (the number of runs of equal sides
against what a random order of the same counts gives) stays within chance.
Over the session every policy is on the left 50% ± 3% of the time. The draws
use a seeded generator here, so each case is one fixed, repeatable sample.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from annotation import services
from annotation.models import Assignment, Policy
from annotation.roles import Role
from annotation.services import ab_session_create, assignment_claim_next
from tests.annotation.conftest import add_member
from tests.annotation.test_ab import source_prompts
from tests.factories import user_with_roles


def runs_test_z(sides: list[bool]) -> float:
    """The runs test's z score: far below 0 means sides repeat, far above means they alternate."""
    ones = sum(sides)
    zeros = len(sides) - ones
    n = len(sides)
    runs = 1 + sum(1 for a, b in itertools.pairwise(sides) if a != b)
    expected = 1 + 2 * ones * zeros / n
    variance = 2 * ones * zeros * (2 * ones * zeros - n) / (n * n * (n - 1))
    return (runs - expected) / math.sqrt(variance)


def test_the_runs_test_tells_alternation_and_streaks_from_coin_flips() -> None:
    rng = random.Random(5)
    assert abs(runs_test_z([rng.random() < 0.5 for _ in range(1000)])) < 3
    assert runs_test_z([i % 2 == 0 for i in range(1000)]) > 20
    assert runs_test_z([i < 500 for i in range(1000)]) < -20


@pytest.mark.slow
@pytest.mark.django_db
@pytest.mark.parametrize(
    ("evaluators", "prompts", "votes"),
    [(1, 1000, 1), (2, 600, 2), (12, 100, 12)],
    ids=["1-evaluator", "2-evaluators", "12-evaluators"],
)
def test_each_evaluators_sides_look_like_coin_flips_and_the_session_stays_balanced(
    monkeypatch: pytest.MonkeyPatch, evaluators: int, prompts: int, votes: int
) -> None:
    # given a seeded draw, a two-policy session, and evaluators taking turns
    monkeypatch.setattr(services, "_random", random.Random(1000 + evaluators))
    policies = [Policy.objects.create(name=name) for name in ("alpha-sft", "beta-dpo")]
    host = user_with_roles(Role.MANAGER, username="host")
    project = ab_session_create(
        name="sides",
        policies=policies,
        prompts=source_prompts(prompts, policies),
        votes_per_pair=votes,
        created_by=host,
    )
    people = [
        add_member(project, user_with_roles(Role.EVALUATOR, username=f"ev{n}"), Role.EVALUATOR)
        for n in range(evaluators)
    ]
    turn = random.Random(evaluators)
    seen: dict[int, list[bool]] = {person.pk: [] for person in people}
    working = list(people)

    # when they vote until nothing is left (an answer is marked submitted: only the sides matter here)
    while working:
        person = turn.choice(working)
        assignment = assignment_claim_next(project=project, user=person)
        if assignment is None:
            working.remove(person)
            continue
        Assignment.objects.filter(pk=assignment.pk).update(status=Assignment.Status.SUBMITTED)
        seen[person.pk].append(assignment.left_policy_id == policies[0].pk)

    # then each person's sequence passes the runs test, and the session is balanced
    total = sum(len(sides) for sides in seen.values())
    assert total == prompts * votes >= 1000
    for person, sides in seen.items():
        assert len(sides) >= 80
        z = runs_test_z(sides)
        assert abs(z) < 3, f"evaluator {person}: runs test z = {z:.1f} over {len(sides)} sides"
    left = Counter(Assignment.objects.filter(task__project=project).values_list("left_policy_id", flat=True))
    for policy in policies:
        assert 0.47 <= left[policy.pk] / total <= 0.53, left


@pytest.mark.django_db
def test_part_way_through_a_session_the_sides_are_already_balanced(monkeypatch: pytest.MonkeyPatch) -> None:
    # The draw is balanced per pair of policies, so the first 300 of 1,200 votes are balanced too.
    monkeypatch.setattr(services, "_random", random.Random(7))
    policies = [Policy.objects.create(name=name) for name in ("a", "b", "c")]
    project = ab_session_create(
        name="part",
        policies=policies,
        prompts=source_prompts(1200, policies),
        votes_per_pair=1,
        created_by=user_with_roles(Role.MANAGER, username="host"),
    )
    evaluator = add_member(project, user_with_roles(Role.EVALUATOR, username="ev"), Role.EVALUATOR)
    for _ in range(300):
        assignment = assignment_claim_next(project=project, user=evaluator)
        Assignment.objects.filter(pk=assignment.pk).update(status=Assignment.Status.SUBMITTED)
    shown = Counter()
    left = Counter()
    for assignment in Assignment.objects.filter(task__project=project).prefetch_related(
        "task__items__completion"
    ):
        for item in assignment.task.items.all():
            shown[item.completion.policy_id] += 1
        left[assignment.left_policy_id] += 1
    for policy in policies:
        assert 0.42 <= left[policy.pk] / shown[policy.pk] <= 0.58, (left, shown)


@pytest.mark.django_db
def test_the_second_vote_on_a_task_shows_the_sides_the_other_way_round() -> None:
    policies = [Policy.objects.create(name=name) for name in ("a", "b")]
    project = ab_session_create(
        name="mirror",
        policies=policies,
        prompts=source_prompts(4, policies),
        votes_per_pair=2,
        created_by=user_with_roles(Role.MANAGER, username="host"),
    )
    first, second = (
        add_member(project, user_with_roles(Role.EVALUATOR, username=f"ev{n}"), Role.EVALUATOR)
        for n in range(2)
    )
    one = assignment_claim_next(project=project, user=first)
    two = assignment_claim_next(project=project, user=second)
    assert one.task_id == two.task_id and {one.slot, two.slot} == {0, 1}
    assert one.left_policy_id != two.left_policy_id
    assert one.permutation == list(reversed(two.permutation))
