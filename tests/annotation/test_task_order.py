"""Which task a person gets next: the project's task order (fill, random, uncertainty, disagreement), read
from stored values."""

from __future__ import annotations

import math

import pytest
from django.db import connection

from annotation.models import Assignment, CompletionScore, Project, Task, TaskCompletion
from annotation.services import assignment_claim_next, tasks_uncertainty_refresh
from tests.annotation.conftest import add_member, make_people
from tests.annotation.test_queue import _run_in_threads


def scores_for(project: Project, scorer: str, gaps: dict[int, float | None]) -> None:
    """Give each task's completions scores 0, gap, 2·gap, … under `scorer` (None: leave one unscored)."""
    for task in project.tasks.all():
        gap = gaps[task.pk]
        items = list(TaskCompletion.objects.filter(task=task).order_by("position"))
        for index, item in enumerate(items):
            if gap is None and index == 0:
                continue
            CompletionScore.objects.update_or_create(
                completion_id=item.completion_id, scorer=scorer, defaults={"score": index * (gap or 1.0)}
            )


def claim_order(project: Project, count: int) -> list[int]:
    person = add_member(project, make_people(1, prefix=f"order{Assignment.objects.count()}-")[0])
    order = []
    for _ in range(count):
        assignment = assignment_claim_next(project=project, user=person)
        if assignment is None:
            break
        order.append(assignment.task_id)
        Assignment.objects.filter(pk=assignment.pk).update(status=Assignment.Status.SUBMITTED)
    return order


@pytest.mark.django_db
def test_the_random_order_serves_tasks_by_their_stored_random_rank(make_project) -> None:
    project = make_project(tasks=8, k=2, task_order=Project.TaskOrder.RANDOM)
    # each task drew its own rank when it was made
    assert len(set(project.tasks.values_list("random_rank", flat=True))) == 8
    # set a known shuffle, unlike the id order the fill order would give
    tasks = list(project.tasks.order_by("id").values_list("pk", flat=True))
    shuffled = [tasks[i] for i in (5, 2, 7, 0, 3, 6, 1, 4)]
    for rank, pk in enumerate(shuffled):
        Task.objects.filter(pk=pk).update(random_rank=rank / 10)
    assert claim_order(project, 8) == shuffled


@pytest.mark.django_db
def test_the_uncertainty_order_serves_the_least_separated_task_first_and_unscored_tasks_last(
    make_project,
) -> None:
    # given six tasks: four scored with different gaps, two with a completion not scored
    project = make_project(tasks=6, k=3, task_order=Project.TaskOrder.UNCERTAINTY)
    tasks = list(project.tasks.order_by("id").values_list("pk", flat=True))
    gaps = {tasks[0]: 0.9, tasks[1]: 0.05, tasks[2]: None, tasks[3]: 0.4, tasks[4]: 0.01, tasks[5]: None}
    scores_for(project, "rm-1", gaps)

    # when the scores are turned into the tasks' uncertainty
    assert tasks_uncertainty_refresh(project=project, scorer="rm-1") == 4

    # then each stores 1 − 4 × the mean over its pairs of p(1 − p), p = σ(score gap): tanh²(gap / 2)
    stored = dict(project.tasks.values_list("pk", "uncertainty"))
    separation = (2 * math.tanh(0.01 / 2) ** 2 + math.tanh(0.02 / 2) ** 2) / 3
    assert stored[tasks[4]] == pytest.approx(separation) and stored[tasks[2]] is None
    # and the queue goes from least sure to most sure, then the unscored at random
    unscored = list(
        project.tasks.filter(uncertainty__isnull=True).order_by("random_rank").values_list("pk", flat=True)
    )
    assert claim_order(project, 6) == [tasks[4], tasks[1], tasks[3], tasks[0], *unscored]


@pytest.mark.django_db
def test_the_uncertainty_order_serves_a_task_with_all_answers_close_before_one_with_two_clear_tiers(
    make_project,
) -> None:
    # given a task whose answers form two clear tiers, tied within each (a tie labelers would give
    # anyway), and one whose answers are all close: its smallest gap is 0.2, the tiers' is 0
    project = make_project(tasks=2, k=4, task_order=Project.TaskOrder.UNCERTAINTY)
    tiers, close = project.tasks.order_by("id")
    scores_in_order(tiers, "rm-1", [5.0, 5.0, -5.0, -5.0])
    scores_in_order(close, "rm-1", [0.3, 0.1, -0.1, -0.3])

    # when the scores are turned into the tasks' uncertainty
    tasks_uncertainty_refresh(project=project, scorer="rm-1")

    # then the task where the model can separate no pair comes first: over all C(4, 2) pairs it is
    # less sure there than where only one pair of each tier is tied
    stored = dict(project.tasks.values_list("pk", "uncertainty"))
    assert stored[close.pk] < stored[tiers.pk]
    assert claim_order(project, 2) == [close.pk, tiers.pk]


@pytest.mark.django_db
def test_a_newer_reward_models_scores_reorder_the_queue(make_project) -> None:
    project = make_project(tasks=4, k=2, task_order=Project.TaskOrder.UNCERTAINTY)
    tasks = list(project.tasks.order_by("id").values_list("pk", flat=True))
    scores_for(project, "rm-old", dict(zip(tasks, [0.1, 0.2, 0.3, 0.4], strict=True)))
    scores_for(project, "rm-new", dict(zip(tasks, [0.4, 0.3, 0.2, 0.1], strict=True)))

    tasks_uncertainty_refresh(project=project, scorer="rm-old")
    first = assignment_claim_next(project=project, user=add_member(project, make_people(1, "a")[0]))
    tasks_uncertainty_refresh(project=project, scorer="rm-new")
    second = assignment_claim_next(project=project, user=add_member(project, make_people(1, "b")[0]))

    assert first.task_id == tasks[0]
    assert second.task_id == tasks[3]


def scores_in_order(task: Task, scorer: str, values: list[float]) -> None:
    """Give the task's completions, in position order, these scores under `scorer`."""
    items = list(TaskCompletion.objects.filter(task=task).order_by("position"))
    for item, value in zip(items, values, strict=True):
        CompletionScore.objects.update_or_create(
            completion_id=item.completion_id, scorer=scorer, defaults={"score": value}
        )


@pytest.mark.django_db
def test_the_disagreement_order_serves_the_tasks_the_reward_models_disagree_on_most_first(
    make_project,
) -> None:
    # given five tasks of three completions scored by the newest reward model and an earlier one
    project = make_project(tasks=5, k=3, task_order=Project.TaskOrder.DISAGREEMENT)
    reversed_, one_swap, agree_close, agree_far, unscored = project.tasks.order_by("id")
    newest = {
        reversed_: [3.0, 2.0, 1.0],  # the earlier model reverses it: every pair disagrees
        one_swap: [3.0, 2.0, 1.0],  # the earlier model swaps one pair of three
        agree_close: [1.0, 1.01, 1.02],  # both agree; the newest model's gaps are the smallest
        agree_far: [1.0, 2.0, 3.0],  # both agree, with wide gaps
        unscored: [1.0, 2.0, 3.0],
    }
    earlier = {
        reversed_: [1.0, 2.0, 3.0],
        one_swap: [2.0, 3.0, 1.0],
        agree_close: [0.0, 5.0, 9.0],
        agree_far: [0.0, 5.0, 9.0],
    }
    for task, values in newest.items():
        scores_in_order(task, "rm-new", values)
    for task, values in earlier.items():
        scores_in_order(task, "rm-old", values)
    CompletionScore.objects.filter(
        scorer="rm-new", completion=TaskCompletion.objects.filter(task=unscored, position=0).get().completion
    ).delete()

    # when the newest model's job refreshes the stored orders, with the earlier model beside it
    assert tasks_uncertainty_refresh(project=project, scorer="rm-new", other_scorers=["rm-old"]) == 4

    # then the stored disagreement is minus the share of pairs ordered the other way (then the gap)
    stored = {task.pk: task.disagreement for task in project.tasks.all()}
    assert stored[reversed_.pk] == pytest.approx(-1.0, abs=1e-3)
    assert stored[one_swap.pk] == pytest.approx(-1 / 3, abs=1e-3)
    assert stored[agree_close.pk] < stored[agree_far.pk] < 1e-3
    assert stored[unscored.pk] is None
    # and the uncertainty order still reads the newest model's gaps alone
    gaps = dict(project.tasks.filter(uncertainty__isnull=False).values_list("pk", "uncertainty"))
    assert min(gaps, key=lambda pk: gaps[pk]) == agree_close.pk
    # and the queue serves them in the disagreement order, unscored last
    assert claim_order(project, 5) == [reversed_.pk, one_swap.pk, agree_close.pk, agree_far.pk, unscored.pk]


@pytest.mark.django_db
def test_with_one_reward_model_the_disagreement_order_follows_its_gaps(make_project) -> None:
    project = make_project(tasks=3, k=2, task_order=Project.TaskOrder.DISAGREEMENT)
    tasks = list(project.tasks.order_by("id").values_list("pk", flat=True))
    scores_for(project, "rm-only", dict(zip(tasks, [0.5, 0.1, 0.3], strict=True)))

    tasks_uncertainty_refresh(project=project, scorer="rm-only", other_scorers=["rm-never-scored-it"])

    assert dict(project.tasks.values_list("pk", "disagreement")) == dict(
        project.tasks.values_list("pk", "uncertainty")
    )
    assert claim_order(project, 3) == [tasks[1], tasks[2], tasks[0]]


@pytest.mark.django_db
def test_the_fill_order_is_unchanged_nearest_to_done_first(make_project) -> None:
    project = make_project(tasks=3, k=2, overlap=2)
    tasks = list(project.tasks.order_by("id").values_list("pk", flat=True))
    Task.objects.filter(pk=tasks[2]).update(judgment_count=1)
    assert claim_order(project, 1) == [tasks[2]]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="locking is tested on PostgreSQL")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("order", [choice.value for choice in Project.TaskOrder])
def test_32_people_claiming_at_once_get_different_tasks_in_every_order(make_project, order: str) -> None:
    # given 40 open tasks (overlap 1) in the chosen order, with uncertainty stored for half of them
    project = make_project(tasks=40, k=2, task_order=order)
    tasks = list(project.tasks.order_by("id").values_list("pk", flat=True))
    scores_for(project, "rm", {pk: (None if i % 2 else 0.01 * i) for i, pk in enumerate(tasks)})
    tasks_uncertainty_refresh(project=project, scorer="rm")
    people = [add_member(project, person) for person in make_people(32, prefix=f"{order}-")]
    claimed: list[int] = []

    # when 32 people claim at the same instant
    errors = _run_in_threads(
        people, lambda person: claimed.append(assignment_claim_next(project=project, user=person).task_id)
    )

    # then nobody shares a task, and the database agrees
    assert not errors, errors
    assert len(claimed) == len(set(claimed)) == 32
    assert Assignment.objects.filter(project=project, status=Assignment.Status.ACTIVE).count() == 32
