"""Project statistics and agreement, checked against numbers worked out by hand.

The data is built with the ORM in small local helpers, so each test shows
exactly which ranks were given: `_judge(task, user, [1, 2, 3])` ranks the
completion at position 0 first, position 1 second, position 2 third.
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser
from django.db.models import F
from django.utils import timezone
from pytest_django import DjangoAssertNumQueries, Settings

from annotation.models import (
    Assignment,
    Comparison,
    Completion,
    Judgment,
    Policy,
    Project,
    Prompt,
    Task,
    TaskCompletion,
)
from annotation.stats import (
    gold_accuracy,
    kendall_tau_between_labelers,
    krippendorff_alpha_ordinal,
    pairwise_agreement,
    project_judgments_per_day,
    project_labeler_table,
    project_median_active_seconds,
    project_progress,
    project_stats,
)

pytestmark = pytest.mark.django_db

# One snapshot of tasks, completions and judgments, one comparisons aggregate, the stored reliabilities,
# one per-day aggregate, one review aggregate: the same whatever the number of judgments.
PROJECT_STATS_QUERY_BOUND = 7


# --- local builders --------------------------------------------------------------


def _user(username: str) -> AbstractUser:
    return get_user_model().objects.create_user(username=username)


def _project(*, name: str = "stats", k: int = 3, overlap: int = 2) -> Project:
    return Project.objects.create(name=name, k=k, overlap=overlap)


def _task(project: Project, *, gold_ranks: list[int] | None = None) -> Task:
    """A task with project.k completions from an imported policy, positions 0…k−1."""
    policy, _ = Policy.objects.get_or_create(name="fixture", kind=Policy.Kind.IMPORTED)
    marker = uuid.uuid4().hex
    prompt = Prompt.objects.create(project=project, text=f"prompt {marker}", content_hash=marker)
    task = Task.objects.create(
        project=project, prompt=prompt, is_gold=gold_ranks is not None, gold_ranks=gold_ranks
    )
    for position in range(project.k):
        completion = Completion.objects.create(prompt=prompt, policy=policy, text=f"answer {position}")
        TaskCompletion.objects.create(task=task, completion=completion, position=position)
    return task


def _judge(
    task: Task,
    user: AbstractUser,
    ranks_by_position: list[int],
    *,
    active_seconds: float | None = None,
    none_acceptable: bool = False,
) -> Judgment:
    """A submitted assignment, its judgment and the judgment's C(K, 2) comparisons."""
    completions = [item.completion for item in task.items.select_related("completion").order_by("position")]
    now = timezone.now()
    assignment = Assignment.objects.create(
        task=task,
        user=user,
        status=Assignment.Status.SUBMITTED,
        slot=Assignment.objects.filter(task=task).count(),
        permutation=list(range(len(completions))),
        leased_at=now,
        lease_expires_at=now + timedelta(minutes=30),
        finished_at=now,
    )
    judgment = Judgment.objects.create(
        assignment=assignment,
        task=task,
        user=user,
        ranks={str(c.uid): rank for c, rank in zip(completions, ranks_by_position, strict=True)},
        none_acceptable=none_acceptable,
        active_seconds=active_seconds,
        client_token=uuid.uuid4().hex,
    )
    for (a, rank_a), (b, rank_b) in itertools.combinations(
        zip(completions, ranks_by_position, strict=True), 2
    ):
        chosen, rejected = (a, b) if rank_a <= rank_b else (b, a)
        Comparison.objects.create(
            judgment=judgment,
            project=task.project,
            task=task,
            prompt=task.prompt,
            chosen=chosen,
            rejected=rejected,
            is_tie=rank_a == rank_b,
            margin=None if rank_a == rank_b else float(abs(rank_a - rank_b)),
            labeler=user,
            created_at=now,
        )
    Task.objects.filter(pk=task.pk).update(judgment_count=F("judgment_count") + 1)
    return judgment


def _at(judgment: Judgment, moment: datetime) -> None:
    Judgment.objects.filter(pk=judgment.pk).update(created_at=moment)


# --- agreement -----------------------------------------------------------------


def test_two_labelers_in_perfect_agreement_score_one_on_every_measure() -> None:
    # given two people who rank two tasks identically
    project = _project()
    alice, bob = _user("alice"), _user("bob")
    for ranks in ([1, 2, 3], [3, 1, 2]):
        task = _task(project)
        _judge(task, alice, ranks)
        _judge(task, bob, ranks)

    # when / then
    agreement = pairwise_agreement(project=project)
    assert agreement["rate"] == 1.0
    assert agreement["shared"] == 6  # 2 tasks × C(3, 2) pairs × 1 pair of labelers
    assert agreement["per_labeler"][alice.pk] == {"shared": 6, "agreed": 6, "rate": 1.0}
    assert kendall_tau_between_labelers(project=project) == {"mean": 1.0, "pairs": 2, "skipped": 0}
    assert krippendorff_alpha_ordinal(project=project) == pytest.approx(1.0)


def test_exactly_reversed_rankings_disagree_on_every_pair() -> None:
    # given two people whose rankings are each other's reverse
    project = _project()
    alice, bob = _user("alice"), _user("bob")
    task = _task(project)
    _judge(task, alice, [1, 2, 3])
    _judge(task, bob, [3, 2, 1])

    # when / then
    agreement = pairwise_agreement(project=project)
    assert agreement["rate"] == 0.0
    assert agreement["shared"] == 3
    assert kendall_tau_between_labelers(project=project) == {"mean": -1.0, "pairs": 1, "skipped": 0}
    assert krippendorff_alpha_ordinal(project=project) < 0


def test_a_tie_against_a_strict_order_is_scored_as_worked_out_by_hand() -> None:
    # given completions A, B, C at positions 0, 1, 2:
    #   alice ranks A=1 B=2 C=3, bob ranks A=1 B=1 C=2
    #   pair   alice  bob   same?
    #   A,B    A>B    tie   no
    #   A,C    A>C    A>C   yes
    #   B,C    B>C    B>C   yes          -> agreement 2/3
    # tau-b: x=[1,2,3], y=[1,1,2]; of 3 pairs, 2 concordant, 0 discordant and
    #   1 tied in y only -> (2 − 0) / sqrt((3 − 0) · (3 − 1)) = 2 / sqrt(6)
    # alpha (ordinal): units A (1,1), B (2,1), C (3,2) give coincidences
    #   o11=2, o12=o21=1, o23=o32=1, so n1=3, n2=2, n3=1, n=6;
    #   δ12=(5/2)²=6.25, δ23=(3/2)²=2.25, δ13=(6 − 2)²=16;
    #   Σ o·δ = 2·6.25 + 2·2.25 = 17; Σ n·n·δ = 2·(6·6.25 + 3·16 + 2·2.25) = 180;
    #   alpha = 1 − (n − 1)·17/180 = 1 − 85/180 = 19/36
    project = _project()
    alice, bob = _user("alice"), _user("bob")
    task = _task(project)
    _judge(task, alice, [1, 2, 3])
    _judge(task, bob, [1, 1, 2])

    # when
    agreement = pairwise_agreement(project=project)
    tau = kendall_tau_between_labelers(project=project)
    alpha = krippendorff_alpha_ordinal(project=project)

    # then
    assert agreement["shared"] == 3
    assert agreement["agreed"] == 2
    assert agreement["rate"] == pytest.approx(2 / 3)
    assert agreement["per_labeler"][bob.pk]["rate"] == pytest.approx(2 / 3)
    assert tau["mean"] == pytest.approx(2 / math.sqrt(6))
    assert tau["pairs"] == 1
    assert alpha == pytest.approx(19 / 36)


def test_agreement_per_labeler_counts_only_the_pairs_they_shared() -> None:
    # given alice and bob agree on a task that carol judges in reverse:
    #   alice–bob 3/3, alice–carol 0/3, bob–carol 0/3
    project = _project()
    alice, bob, carol = _user("alice"), _user("bob"), _user("carol")
    task = _task(project)
    _judge(task, alice, [1, 2, 3])
    _judge(task, bob, [1, 2, 3])
    _judge(task, carol, [3, 2, 1])

    # when
    agreement = pairwise_agreement(project=project)

    # then
    assert (agreement["shared"], agreement["agreed"]) == (9, 3)
    assert agreement["per_labeler"][alice.pk] == {"shared": 6, "agreed": 3, "rate": 0.5}
    assert agreement["per_labeler"][bob.pk] == {"shared": 6, "agreed": 3, "rate": 0.5}
    assert agreement["per_labeler"][carol.pk] == {"shared": 6, "agreed": 0, "rate": 0.0}


def test_kendall_tau_skips_none_acceptable_and_all_tied_judgments() -> None:
    # given on one task: bob says none is acceptable and carol ties everything,
    # so alice–bob, alice–carol and bob–carol are all skipped; on another task
    # alice [1,2,3] and dave [2,1,3] have 2 concordant pairs and 1 discordant:
    # tau = (2 − 1) / 3
    project = _project()
    alice, bob, carol, dave = _user("alice"), _user("bob"), _user("carol"), _user("dave")
    skipped_task = _task(project)
    _judge(skipped_task, alice, [1, 2, 3])
    _judge(skipped_task, bob, [1, 2, 3], none_acceptable=True)
    _judge(skipped_task, carol, [1, 1, 1])
    scored_task = _task(project)
    _judge(scored_task, alice, [1, 2, 3])
    _judge(scored_task, dave, [2, 1, 3])

    # when
    tau = kendall_tau_between_labelers(project=project)

    # then
    assert tau["pairs"] == 1
    assert tau["skipped"] == 3
    assert tau["mean"] == pytest.approx(1 / 3)


def test_alpha_is_none_when_no_two_labelers_judged_the_same_task() -> None:
    # given two people on two different tasks
    project = _project()
    _judge(_task(project), _user("alice"), [1, 2, 3])
    _judge(_task(project), _user("bob"), [3, 2, 1])

    # when / then
    assert krippendorff_alpha_ordinal(project=project) is None
    assert pairwise_agreement(project=project)["rate"] is None
    assert kendall_tau_between_labelers(project=project)["mean"] is None


# --- gold ----------------------------------------------------------------------


def test_gold_accuracy_compares_every_pair_with_the_gold_answer() -> None:
    # given a gold task whose answer is A>B>C, i.e. A>B, A>C, B>C
    #   alice [1,2,3]: A>B ✓ A>C ✓ B>C ✓        -> 3/3
    #   bob   [1,1,2]: A=B ✗ A>C ✓ B>C ✓        -> 2/3
    #   carol [2,1,3]: B>A ✗ A>C ✓ B>C ✓ and on a second gold task with
    #   answer A=B>C she gives [1,1,3]: A=B ✓ A>C ✓ B>C ✓  -> 5/6
    # and a regular task, which gold accuracy ignores
    project = _project()
    alice, bob, carol = _user("alice"), _user("bob"), _user("carol")
    gold = _task(project, gold_ranks=[1, 2, 3])
    gold_with_tie = _task(project, gold_ranks=[1, 1, 2])
    _judge(gold, alice, [1, 2, 3])
    _judge(gold, bob, [1, 1, 2])
    _judge(gold, carol, [2, 1, 3])
    _judge(gold_with_tie, carol, [1, 1, 3])
    _judge(_task(project), alice, [3, 2, 1])

    # when
    accuracy = gold_accuracy(project=project)

    # then
    assert accuracy[alice.pk] == {"judged": 1, "pairs": 3, "correct": 3, "accuracy": 1.0}
    assert accuracy[bob.pk] == {"judged": 1, "pairs": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert accuracy[carol.pk] == {"judged": 2, "pairs": 6, "correct": 5, "accuracy": pytest.approx(5 / 6)}


# --- progress, time and the labeler table ----------------------------------------


def _progress_project() -> tuple[Project, dict[str, AbstractUser]]:
    """Overlap 2; three regular tasks judged 3, 1 and 0 times; a gold task judged once.

    Active seconds: alice 10 and 30, bob 20 and none, carol 40.
    One tie among the 15 comparisons (bob's A=B).
    """
    project = _project(overlap=2)
    users = {name: _user(name) for name in ("alice", "bob", "carol")}
    over_judged, half_judged, _unjudged = _task(project), _task(project), _task(project)
    gold = _task(project, gold_ranks=[1, 2, 3])
    _judge(over_judged, users["alice"], [1, 2, 3], active_seconds=10)
    _judge(over_judged, users["bob"], [1, 1, 2], active_seconds=20)
    _judge(over_judged, users["carol"], [1, 2, 3], active_seconds=40)
    _judge(half_judged, users["alice"], [2, 1, 3], active_seconds=30)
    _judge(gold, users["bob"], [1, 2, 3])
    return project, users


def test_progress_counts_complete_tasks_without_gold_and_caps_each_task_at_the_overlap() -> None:
    # given
    project, _ = _progress_project()

    # when
    progress = project_progress(project=project)

    # then: (min(3, 2) + 1 + 0) / (3 regular tasks × overlap 2) = 3/6
    assert progress == {
        "tasks_total": 4,
        "tasks_gold": 1,
        "tasks_complete": 1,
        "judgments_total": 5,
        "judgments_gold": 1,
        "judgments_wanted": 6,
        "fraction_done": 0.5,
        "comparisons_total": 15,
        "comparisons_ties": 1,
        "tie_rate": pytest.approx(1 / 15),
    }


def test_median_active_seconds_leaves_out_judgments_without_a_time() -> None:
    # given active times 10, 20, 40, 30 and one missing: median of four is (20 + 30) / 2
    project, _ = _progress_project()

    # when / then
    assert project_median_active_seconds(project=project) == 25.0


def test_labeler_table_lists_most_judgments_first_with_gold_and_agreement() -> None:
    # given alice 2 judgments, bob 2 (one gold, all correct), carol 1;
    # on the over-judged task: alice–bob 2/3 (A,B differ), alice–carol 3/3, bob–carol 2/3
    project, users = _progress_project()

    # when
    table = project_labeler_table(project=project)

    # then: ties on judgments are broken by username
    assert [row["username"] for row in table] == ["alice", "bob", "carol"]
    alice, bob, carol = table
    assert alice == {
        "user_id": users["alice"].pk,
        "username": "alice",
        "is_model": False,
        "judgments": 2,
        "median_active_seconds": 20.0,
        "gold_judged": 0,
        "gold_accuracy": None,
        "agreement_shared": 6,
        "agreement_rate": pytest.approx(5 / 6),
        "reliability": None,  # no Dawid–Skene build yet (tests/training/test_builds_dawid_skene.py)
        "reliability_source": "",
        "reviewed": 0,  # nobody has reviewed a judgment yet (tests/annotation/test_review.py)
        "acceptance_rate": None,
    }
    assert (bob["judgments"], bob["median_active_seconds"]) == (2, 20.0)
    assert (bob["gold_judged"], bob["gold_accuracy"]) == (1, 1.0)
    assert bob["agreement_rate"] == pytest.approx(4 / 6)
    assert (carol["judgments"], carol["median_active_seconds"], carol["agreement_rate"]) == (
        1,
        40.0,
        pytest.approx(5 / 6),
    )


def test_judgments_per_day_counts_days_in_the_configured_time_zone(settings: Settings) -> None:
    # given Auckland (UTC+13 in March): 09:00 UTC on 1 March is still 1 March
    # there, 20:00 UTC on 1 March and 10:00 UTC on 2 March are both 2 March
    settings.TIME_ZONE = "Pacific/Auckland"
    project = _project()
    task = _task(project)
    _at(_judge(task, _user("alice"), [1, 2, 3]), datetime(2024, 3, 1, 9, tzinfo=UTC))
    _at(_judge(task, _user("bob"), [1, 2, 3]), datetime(2024, 3, 1, 20, tzinfo=UTC))
    _at(_judge(task, _user("carol"), [1, 2, 3]), datetime(2024, 3, 2, 10, tzinfo=UTC))

    # when
    per_day = project_judgments_per_day(project=project)

    # then
    assert per_day == [{"date": "2024-03-01", "judgments": 1}, {"date": "2024-03-02", "judgments": 2}]


# --- the bundle ------------------------------------------------------------------


def test_an_empty_project_returns_zeros_and_none() -> None:
    # given a project with no tasks at all
    project = _project()

    # when
    stats = project_stats(project=project)

    # then
    assert stats["progress"] == {
        "tasks_total": 0,
        "tasks_gold": 0,
        "tasks_complete": 0,
        "judgments_total": 0,
        "judgments_gold": 0,
        "judgments_wanted": 0,
        "fraction_done": 0.0,
        "comparisons_total": 0,
        "comparisons_ties": 0,
        "tie_rate": None,
    }
    assert stats["judgments_per_day"] == []
    assert stats["median_active_seconds"] is None
    assert stats["labelers"] == []
    assert stats["pairwise_agreement"] == {"rate": None, "shared": 0, "agreed": 0, "per_labeler": {}}
    assert stats["kendall_tau"] == {"mean": None, "pairs": 0, "skipped": 0}
    assert stats["krippendorff_alpha"] is None
    assert stats["gold_accuracy"] == {}


def test_the_stats_bundle_reads_back_from_json_unchanged() -> None:
    # given a project with gold, ties, several labelers and active times
    project, users = _progress_project()

    # when
    stats = project_stats(project=project)

    # then
    assert json.loads(json.dumps(stats)) == stats
    assert stats["gold_accuracy"][str(users["bob"].pk)]["accuracy"] == 1.0
    assert stats["pairwise_agreement"]["per_labeler"][str(users["carol"].pk)]["rate"] == pytest.approx(5 / 6)
    assert stats["progress"] == project_progress(project=project)
    assert stats["labelers"] == project_labeler_table(project=project)


@pytest.mark.parametrize("judgments", [3, 30])
def test_project_stats_runs_a_fixed_number_of_queries_whatever_the_number_of_judgments(
    judgments: int, django_assert_max_num_queries: DjangoAssertNumQueries
) -> None:
    # given `judgments` judgments by three people, three to a task, one task gold
    project = _project()
    people = [_user(name) for name in ("alice", "bob", "carol")]
    for index in range(judgments // len(people)):
        task = _task(project, gold_ranks=[1, 2, 3] if index == 0 else None)
        for person, ranks in zip(people, ([1, 2, 3], [1, 1, 2], [3, 2, 1]), strict=True):
            _judge(task, person, ranks, active_seconds=10.0)

    # when / then
    with django_assert_max_num_queries(PROJECT_STATS_QUERY_BOUND):
        stats = project_stats(project=project)
    assert stats["progress"]["judgments_total"] == judgments
