"""Blind A/B sessions: frozen pairs, balanced sides, no policy in sight, votes into comparisons."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from django.test import Client
from rest_framework.test import APIClient

from annotation.models import Comparison, Completion, Policy, Project, Prompt
from annotation.roles import Role
from annotation.selectors import ab_votes
from annotation.services import (
    JudgmentInput,
    MissingOutputs,
    ab_session_create,
    assignment_claim_next,
    judgment_submit,
)
from tests.annotation.conftest import add_member
from tests.factories import user_with_roles

SECRET_NAMES = ("zephyr-sft-7731", "quasar-dpo-4419", "nimbus-bo4-2208")


def source_prompts(
    count: int, policies: list[Policy], *, missing: tuple[int, int] | None = None
) -> list[Prompt]:
    project = Project.objects.create(name=f"source-{count}-{len(policies)}", k=2)
    prompts = []
    for number in range(count):
        prompt = Prompt.objects.create(project=project, text=f"Question {number}?", content_hash=f"q{number}")
        for index, policy in enumerate(policies):
            if missing != (number, index):
                Completion.objects.create(
                    prompt=prompt, policy=policy, text=f"Answer {index} to question {number}."
                )
        prompts.append(prompt)
    project.policies.add(*policies)  # as an import does: the policies belong to the project
    return prompts


@pytest.fixture
def policies(db):  # type: ignore[no-untyped-def]
    return [Policy.objects.create(name=name) for name in SECRET_NAMES]


@pytest.fixture
def manager(db):  # type: ignore[no-untyped-def]
    return user_with_roles(Role.MANAGER, username="host")


def session(policies, manager, prompts=6, votes_per_pair=1):  # type: ignore[no-untyped-def]
    return ab_session_create(
        name="blind",
        policies=policies,
        prompts=source_prompts(prompts, policies),
        votes_per_pair=votes_per_pair,
        created_by=manager,
    )


@pytest.mark.django_db
def test_missing_outputs_are_named_and_nothing_is_created(policies, manager):
    prompts = source_prompts(3, policies[:2], missing=(1, 0))
    before = Project.objects.count()
    with pytest.raises(MissingOutputs) as caught:
        ab_session_create(
            name="x", policies=policies[:2], prompts=prompts, votes_per_pair=1, created_by=manager
        )
    assert [(policy.name, prompt.pk) for policy, prompt in caught.value.missing] == [
        (SECRET_NAMES[0], prompts[1].pk)
    ]
    assert Project.objects.count() == before


@pytest.mark.django_db
def test_three_policies_are_paired_round_robin_with_alternating_positions(policies, manager):
    project = session(policies, manager, prompts=12)
    pairs = Counter()
    first_positions = Counter()
    for task in project.tasks.prefetch_related("items__completion__policy"):
        items = sorted(task.items.all(), key=lambda item: item.position)
        names = tuple(item.completion.policy.name for item in items)
        pairs[frozenset(names)] += 1
        first_positions[names[0]] += 1
    assert set(pairs.values()) == {4}  # 12 prompts over the 3 pairs
    assert set(first_positions.values()) == {4}  # each policy first in half its tasks


def _collect(response) -> str:  # type: ignore[no-untyped-def]
    body = b"".join(response.streaming_content) if response.streaming else response.content
    cookies = "; ".join(f"{key}={morsel.value}" for key, morsel in response.cookies.items())
    # Header values, not names: "Content-Security-Policy" is not a leak.
    return body.decode() + json.dumps([value for _name, value in response.items()]) + cookies


@pytest.mark.django_db
def test_nothing_an_evaluator_can_fetch_before_voting_names_a_policy(policies, manager):
    project = session(policies, manager, prompts=3)
    evaluator = add_member(project, user_with_roles(Role.EVALUATOR, username="blind-eve"), Role.EVALUATOR)
    page = Client(enforce_csrf_checks=True)
    page.force_login(evaluator)
    seen = [_collect(page.get(url)) for url in ("/", "/evaluate/", f"/evaluate/{project.pk}/", "/jsi18n/")]
    token = page.cookies["csrftoken"].value
    seen.append(_collect(page.post(f"/evaluate/{project.pk}/next", HTTP_X_CSRFTOKEN=token)))
    api = APIClient()
    api.force_authenticate(evaluator)
    seen.append(_collect(api.post(f"/api/projects/{project.pk}/next")))
    seen.append(_collect(api.get("/api/projects/")))
    seen.append(_collect(api.get(f"/api/projects/{project.pk}/")))
    everything = "\n".join(seen)
    assert 'data-side="left"' in everything  # the pair was really fetched
    for policy in policies:
        assert policy.name not in everything
    assert "policy" not in everything.lower()
    # and the results stay out of reach
    assert page.get(f"/manage/projects/{project.pk}/results").status_code == 403
    assert api.get(f"/api/projects/{project.pk}/judgments").status_code == 404


@pytest.mark.django_db
def test_votes_become_comparisons_with_strength_as_margin_and_feed_the_results(policies, manager, client):
    project = session(policies[:2], manager, prompts=4, votes_per_pair=1)
    evaluator = add_member(project, user_with_roles(Role.EVALUATOR, username="voter"), Role.EVALUATOR)
    outcomes = ["left", "left", "tie", "both_bad"]
    for number, outcome in enumerate(outcomes):
        assignment = assignment_claim_next(project=project, user=evaluator)
        left, right = (
            str(item.completion.uid) for item in sorted(assignment.task.items.all(), key=lambda i: i.position)
        )
        left, right = [left, right] if assignment.permutation == [0, 1] else [right, left]
        ranks = {"left": {left: 1, right: 2}, "tie": {left: 1, right: 1}, "both_bad": {}}[outcome]
        answer = JudgmentInput(
            ranks=ranks,
            none_acceptable=outcome == "both_bad",
            strength=2 if number == 0 else (1 if outcome == "left" else None),
            client_token=f"v{number}",
        )
        judgment_submit(assignment=assignment, user=evaluator, answer=answer)
    margins = sorted(c.margin for c in Comparison.objects.filter(project=project, is_tie=False))
    assert margins == [1.0, 2.0]
    assert Comparison.objects.filter(project=project, is_tie=True).count() == 1
    assert sorted(vote.outcome for vote in ab_votes(project=project)) == sorted(outcomes)

    client.force_login(manager)
    results = client.get(f"/manage/projects/{project.pk}/results")
    assert results.status_code == 200
    assert len(results.context["ratings"]) == 2
    assert results.context["bias"]["left_wins"] == 2


@pytest.mark.django_db
def test_strength_is_only_for_a_decisive_ab_vote(policies, manager):
    from annotation.services import JudgmentInvalid

    project = session(policies[:2], manager, prompts=1)
    evaluator = add_member(project, user_with_roles(Role.EVALUATOR, username="strong"), Role.EVALUATOR)
    assignment = assignment_claim_next(project=project, user=evaluator)
    a, b = (str(item.completion.uid) for item in assignment.task.items.all())
    with pytest.raises(JudgmentInvalid, match="strength"):
        judgment_submit(
            assignment=assignment,
            user=evaluator,
            answer=JudgmentInput(ranks={a: 1, b: 1}, strength=2, client_token="s"),
        )
