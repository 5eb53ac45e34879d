"""Review: accept or reject once; a rejection reopens the task for someone else; the queue's filters;
revisions until a judgment is reviewed."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from annotation.models import Assignment, Comparison, Judgment, Policy, Task
from annotation.review import (
    JudgmentNotRevisable,
    ReviewConflict,
    ReviewFilters,
    judgment_review,
    judgment_revise,
    projects_for_reviewer,
    review_queue,
)
from annotation.roles import Role
from annotation.selectors import ab_scored_votes, ab_votes
from annotation.services import JudgmentInput, JudgmentInvalid, assignment_claim_next, judgment_submit
from annotation.stats import project_stats
from tests.annotation.conftest import add_member, make_people
from tests.annotation.test_ab import session
from tests.training.test_builds_support import judge

pytestmark = pytest.mark.django_db


@pytest.fixture
def judged(make_project):  # type: ignore[no-untyped-def]
    """One task (one judgment wanted) judged by `first`; `second` labels too; `rita` reviews."""
    project = make_project(tasks=1, gold=1, k=2, overlap=1)
    first, second, rita = make_people(3)
    for person in (first, second):
        add_member(project, person, Role.LABELER)
    add_member(project, rita, Role.REVIEWER)
    task = project.tasks.get(is_gold=False)
    judgment = judge(task, first, [1, 2])
    return project, judgment, first, second, rita


def test_a_rejection_needs_a_reason_and_changes_nothing_without_one(judged):
    _project, judgment, _first, _second, rita = judged
    with pytest.raises(ValidationError):
        judgment_review(judgment=judgment, reviewer=rita, accept=False, reason="  ")
    assert Judgment.objects.get(pk=judgment.pk).review == Judgment.Review.PENDING


def test_a_judgment_is_reviewed_once(judged):
    _project, judgment, _first, _second, rita = judged
    judgment_review(judgment=judgment, reviewer=rita, accept=True)
    with pytest.raises(ReviewConflict):
        judgment_review(judgment=judgment, reviewer=rita, accept=False, reason="changed my mind")
    assert Judgment.objects.get(pk=judgment.pk).review == Judgment.Review.ACCEPTED


def test_a_rejection_reopens_the_task_for_someone_else_but_not_its_labeler(judged):
    project, judgment, first, second, rita = judged
    # given the task is done (gold is not served at the project's gold rate of 0)
    assert assignment_claim_next(project=project, user=second) is None

    judgment_review(judgment=judgment, reviewer=rita, accept=False, reason="random ranks")

    task = Task.objects.get(pk=judgment.task_id)
    assert task.judgment_count == 0
    assert Assignment.objects.get(pk=judgment.assignment_id).status == Assignment.Status.REJECTED
    assert assignment_claim_next(project=project, user=first) is None
    claimed = assignment_claim_next(project=project, user=second)
    assert claimed is not None and claimed.task_id == task.pk


def test_an_accepted_judgment_keeps_its_task_done(judged):
    project, judgment, _first, second, rita = judged
    judgment_review(judgment=judgment, reviewer=rita, accept=True)
    assert assignment_claim_next(project=project, user=second) is None


def test_the_queue_filters_by_status_labeler_and_gold(judged):
    project, judgment, _first, second, rita = judged
    gold = judge(project.tasks.get(is_gold=True), second, [2, 1])

    assert list(review_queue(project=project, filters=ReviewFilters())) == [judgment, gold]
    assert list(review_queue(project=project, filters=ReviewFilters(labeler_id=second.pk))) == [gold]
    assert list(review_queue(project=project, filters=ReviewFilters(gold=True))) == [gold]
    judgment_review(judgment=judgment, reviewer=rita, accept=True)
    assert list(review_queue(project=project, filters=ReviewFilters())) == [gold]
    assert list(review_queue(project=project, filters=ReviewFilters(review=Judgment.Review.ACCEPTED))) == [
        judgment
    ]


def test_reviewers_and_managers_review_a_project_labelers_do_not(judged):
    project, _judgment, first, _second, rita = judged
    boss = add_member(project, make_people(1, prefix="boss")[0], Role.MANAGER)
    assert list(projects_for_reviewer(user=rita)) == [project]
    assert list(projects_for_reviewer(user=boss)) == [project]
    assert list(projects_for_reviewer(user=first)) == []


# --- revisions --------------------------------------------------------------------------


def _answer(judgment: Judgment, ranks: list[int]) -> JudgmentInput:
    uids = [str(item.completion.uid) for item in judgment.task.items.order_by("position")]
    return JudgmentInput(ranks=dict(zip(uids, ranks, strict=True)), client_token="ignored")


def test_a_revision_replaces_the_answer_and_its_comparisons_and_counts_the_version(judged):
    _project, judgment, first, _second, _rita = judged
    before = {(c.chosen_id, c.rejected_id) for c in judgment.comparisons.all()}

    revised = judgment_revise(judgment=judgment, user=first, answer=_answer(judgment, [2, 1]))

    after = {(c.chosen_id, c.rejected_id) for c in Comparison.objects.filter(judgment=judgment)}
    assert revised.version == 2
    assert after == {(rejected, chosen) for chosen, rejected in before}
    assert Comparison.objects.filter(judgment=judgment).count() == 1
    assert Judgment.objects.get(pk=judgment.pk).client_token == judgment.client_token


def test_a_reviewed_or_someone_elses_judgment_cannot_be_revised(judged):
    _project, judgment, first, second, rita = judged
    with pytest.raises(JudgmentNotRevisable):
        judgment_revise(judgment=judgment, user=second, answer=_answer(judgment, [2, 1]))
    judgment_review(judgment=judgment, reviewer=rita, accept=True)
    with pytest.raises(JudgmentNotRevisable):
        judgment_revise(judgment=judgment, user=first, answer=_answer(judgment, [2, 1]))
    assert Judgment.objects.get(pk=judgment.pk).version == 1


def test_an_invalid_revision_changes_nothing(judged):
    _project, judgment, first, _second, _rita = judged
    with pytest.raises(JudgmentInvalid):
        judgment_revise(judgment=judgment, user=first, answer=_answer(judgment, [1, 5]))
    assert Judgment.objects.get(pk=judgment.pk).version == 1
    assert Comparison.objects.filter(judgment=judgment).count() == 1


def test_the_queue_can_show_only_judgments_others_contradict(make_project):
    project = make_project(tasks=2, k=2, overlap=2)
    ann, bob, cy = make_people(3)
    contested, agreed = project.tasks.order_by("id")
    a1 = judge(contested, ann, [1, 2])
    b1 = judge(contested, bob, [2, 1])
    a2 = judge(agreed, ann, [1, 2])
    judge(agreed, cy, [1, 2])

    shown = list(review_queue(project=project, filters=ReviewFilters(disagreeing=True)))

    assert shown == [a1, b1]
    assert a2 not in shown


def test_the_dashboard_and_stats_show_acceptance_rates(judged, client):
    project, judgment, first, _second, rita = judged
    other = judge(project.tasks.get(is_gold=True), first, [2, 1])
    judgment_review(judgment=judgment, reviewer=rita, accept=True)
    judgment_review(judgment=other, reviewer=rita, accept=False, reason="wrong")
    boss = add_member(project, make_people(1, prefix="boss")[0], Role.MANAGER)

    stats = project_stats(project=project)
    client.force_login(boss)
    page = client.get(f"/manage/projects/{project.pk}/").content.decode()

    assert stats["review"] == {"reviewed": 2, "rate": 0.5}
    (row,) = [row for row in stats["labelers"] if row["user_id"] == first.pk]
    assert (row["reviewed"], row["acceptance_rate"]) == (2, 0.5)
    assert "Accepted in review" in page and "50%" in page


def test_a_vote_rejected_in_review_leaves_the_ab_results(db):
    policies = [Policy.objects.create(name="review-a"), Policy.objects.create(name="review-b")]
    boss, voter = make_people(2)
    project = session(policies, boss, prompts=2)
    add_member(project, voter, Role.EVALUATOR)
    add_member(project, boss, Role.MANAGER)
    judgments = []
    for number in range(2):
        assignment = assignment_claim_next(project=project, user=voter)
        left, right = (str(item.completion.uid) for item in assignment.task.items.order_by("position"))
        answer = JudgmentInput(ranks={left: 1, right: 2}, client_token=f"vote-{number}")
        judgments.append(judgment_submit(assignment=assignment, user=voter, answer=answer).judgment)

    judgment_review(judgment=judgments[0], reviewer=boss, accept=False, reason="clicked at random")

    assert len(ab_votes(project=project)) == 1
    assert len(ab_scored_votes(project=project)) == 1
