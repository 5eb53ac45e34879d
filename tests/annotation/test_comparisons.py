"""Every judgment becomes exactly its C(K,2) comparisons, consistent with the ranks."""

from __future__ import annotations

import itertools
import math
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annotation.models import Comparison, Completion, Judgment, Project, Task, TaskCompletion
from annotation.services import (
    JudgmentInput,
    JudgmentInvalid,
    assignment_claim_next,
    comparisons_from_judgment,
    judgment_submit,
    judgment_validate,
)
from tests.annotation.conftest import add_member, make_people


@st.composite
def rankings(draw: st.DrawFn) -> tuple[int, list[int], list[int] | None]:
    """K from 2 to 9, a rank per completion (ties likely), and Likert ratings consistent with it or None."""
    k = draw(st.integers(min_value=2, max_value=9))
    ranks = draw(st.lists(st.integers(min_value=1, max_value=k), min_size=k, max_size=k))
    if not draw(st.booleans()):
        return k, ranks, None
    # Likert consistent with the ranking: a better rank never rates lower.
    levels = sorted(set(ranks))
    ratings_by_rank = sorted(
        draw(st.lists(st.integers(min_value=1, max_value=7), min_size=len(levels), max_size=len(levels))),
        reverse=True,
    )
    rating = dict(zip(levels, ratings_by_rank, strict=True))
    return k, ranks, [rating[rank] for rank in ranks]


def _unsaved_task(k: int) -> list[TaskCompletion]:
    task = Task(pk=1, project_id=1, prompt_id=1)
    return [
        TaskCompletion(task=task, position=position, completion=Completion(pk=position + 1, uid=uuid.uuid4()))
        for position in range(k)
    ]


@given(rankings())
@settings(max_examples=400)
def test_every_ranking_gives_exactly_k_choose_2_consistent_comparisons(ranking):
    k, ranks, likert = ranking
    items = _unsaved_task(k)
    uids = [str(item.completion.uid) for item in items]
    judgment = Judgment(
        task=items[0].task,
        user_id=1,
        ranks=dict(zip(uids, ranks, strict=True)),
        likert=dict(zip(uids, likert, strict=True)) if likert else {},
    )

    comparisons = comparisons_from_judgment(judgment=judgment, items=items, likert_margins=likert is not None)

    assert len(comparisons) == math.comb(k, 2)
    pairs = {frozenset((c.chosen.pk, c.rejected.pk)) for c in comparisons}
    assert pairs == {frozenset((a + 1, b + 1)) for a, b in itertools.combinations(range(k), 2)}
    rank_of = {item.completion.pk: rank for item, rank in zip(items, ranks, strict=True)}
    rating_of = {item.completion.pk: r for item, r in zip(items, likert or [0] * k, strict=True)}
    for comparison in comparisons:
        chosen, rejected = rank_of[comparison.chosen.pk], rank_of[comparison.rejected.pk]
        assert comparison.is_tie == (chosen == rejected)
        if comparison.is_tie:
            assert comparison.margin is None
            assert comparison.chosen.pk < comparison.rejected.pk  # ties keep position order
        else:
            assert chosen < rejected
            expected = (
                rating_of[comparison.chosen.pk] - rating_of[comparison.rejected.pk]
                if likert
                else rejected - chosen
            )
            assert comparison.margin == expected


def test_none_acceptable_gives_no_preference_pairs():
    items = _unsaved_task(3)
    uids = [str(item.completion.uid) for item in items]
    judgment = Judgment(task=items[0].task, user_id=1, ranks=dict(zip(uids, [1, 2, 3], strict=True)))
    judgment.none_acceptable = True
    assert comparisons_from_judgment(judgment=judgment, items=items, likert_margins=False) == []


def _validate(project: Project, uids: list[str], **answer) -> None:  # type: ignore[no-untyped-def]
    judgment_validate(answer=JudgmentInput(client_token="t1", **answer), project=project, uids=uids)


@pytest.mark.parametrize(
    ("fields", "answer", "field"),
    [
        ({}, {"ranks": {"a": 1, "b": 2}}, "ranks"),  # c missing
        ({}, {"ranks": {"a": 1, "b": 2, "c": 3, "d": 1}}, "ranks"),  # unknown id
        ({}, {"ranks": {"a": 0, "b": 2, "c": 3}}, "ranks"),
        ({}, {"ranks": {"a": 1, "b": 2, "c": 4}}, "ranks"),
        ({"ties_allowed": False}, {"ranks": {"a": 1, "b": 1, "c": 2}}, "ranks"),
        ({}, {"ranks": {"a": 1, "b": 2, "c": 3}, "likert": {"a": 5, "b": 4, "c": 3}}, "likert"),  # Likert off
        ({"likert_enabled": True}, {"ranks": {"a": 1, "b": 2, "c": 3}}, "likert"),  # Likert missing
        (
            {"likert_enabled": True},
            {"ranks": {"a": 1, "b": 2, "c": 3}, "likert": {"a": 2, "b": 6, "c": 1}},
            "likert",
        ),
        (
            {"likert_enabled": True},
            {"ranks": {"a": 1, "b": 2, "c": 3}, "likert": {"a": 9, "b": 6, "c": 1}},
            "likert",
        ),
        ({"flags": ["harmful"]}, {"ranks": {"a": 1, "b": 2, "c": 3}, "flags": {"a": ["rude"]}}, "flags"),
        ({"rationale_required": True}, {"ranks": {"a": 1, "b": 2, "c": 3}, "rationale": "  "}, "rationale"),
        ({}, {"ranks": {"a": 1, "b": 2, "c": 3}, "active_seconds": -1.0}, "active_seconds"),
        ({}, {"ranks": {"a": 1, "b": 2, "c": 3}, "active_seconds": float("nan")}, "active_seconds"),
    ],
)
def test_an_answer_that_does_not_fit_is_refused_naming_the_field(fields, answer, field):
    project = Project(name="p", k=3, **fields)
    with pytest.raises(JudgmentInvalid) as caught:
        _validate(project, ["a", "b", "c"], **answer)
    assert field in caught.value.errors


def test_a_bad_client_token_is_refused():
    with pytest.raises(JudgmentInvalid) as caught:
        judgment_validate(
            answer=JudgmentInput(ranks={"a": 1, "b": 2}, client_token="<script>"),
            project=Project(name="p", k=2),
            uids=["a", "b"],
        )
    assert "client_token" in caught.value.errors


@pytest.mark.django_db
@given(ranking=rankings())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_stored_judgment_has_exactly_its_comparisons(make_project, ranking):
    # given a task of K completions claimed by a labeler
    k, ranks, likert = ranking
    project = make_project(tasks=1, k=k, likert_enabled=likert is not None, name=f"prop-{uuid.uuid4()}")
    (person,) = make_people(1, prefix=f"u{uuid.uuid4().hex[:8]}-")
    add_member(project, person)
    assignment = assignment_claim_next(project=project, user=person)
    uids = [str(item.completion.uid) for item in assignment.task.items.order_by("position")]

    # when they submit a random ranking with ties
    result = judgment_submit(
        assignment=assignment,
        user=person,
        answer=JudgmentInput(
            ranks=dict(zip(uids, ranks, strict=True)),
            likert=dict(zip(uids, likert, strict=True)) if likert else {},
            client_token="prop",
        ),
    )

    # then exactly C(K,2) comparisons are stored, each agreeing with the ranks
    stored = Comparison.objects.filter(judgment=result.judgment).select_related("chosen", "rejected")
    assert stored.count() == math.comb(k, 2)
    rank_of = dict(zip(uids, ranks, strict=True))
    for comparison in stored:
        chosen, rejected = rank_of[str(comparison.chosen.uid)], rank_of[str(comparison.rejected.uid)]
        assert comparison.is_tie == (chosen == rejected)
        assert chosen <= rejected
        assert comparison.labeler_id == person.pk
        assert comparison.project_id == project.pk
