"""Per-project statistics and inter-annotator agreement (reads only).

Every metric is computed from one snapshot of the project loaded with a fixed
number of queries (tasks, their completions in position order, submitted
judgments as plain values), so the cost in queries does not grow with the
number of judgments; the arithmetic happens in Python. `project_stats`
loads the snapshot once and bundles every metric into a JSON-serialisable
dict for `GET /api/projects/{id}/stats`.

Conventions shared by the metrics:

- A judgment counts when its assignment is submitted.
- The *outcome* of a pair of completions (a, b) in a ranking is `a>b`, `b>a`
  or a tie: rank 1 is best, equal ranks are a tie. It is the same outcome its
  Comparison row records, read from the judgment's ranks so that no
  per-comparison rows need loading.
- Gold tasks take part in agreement like any other task: two people judging
  the same completions is what agreement measures.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import krippendorff
import numpy as np
from django.db import connection
from django.db.models import CharField, Count, Q, QuerySet
from django.db.models.functions import Cast, TruncDate
from django.utils import timezone

from annotation.models import (
    Assignment,
    Comparison,
    Judgment,
    LabelerReliability,
    Project,
    Task,
    TaskCompletion,
)


@dataclass(frozen=True)
class _TaskRow:
    id: int
    is_gold: bool
    gold_ranks: list[int] | None
    judgment_count: int
    uids: list[str]  # completion uids in TaskCompletion.position order


@dataclass(frozen=True)
class _JudgmentRow:
    id: int
    task_id: int
    user_id: int
    username: str
    none_acceptable: bool
    active_seconds: float | None
    # Rank per position of the task's completions; None where the judgment gave none.
    ranks: list[int | None]
    # "model" for a model judge's judgment (training.judges).
    source: str = "human"


@dataclass(frozen=True)
class _ProjectData:
    project: Project
    tasks: dict[int, _TaskRow]
    judgments: list[_JudgmentRow]

    def judgments_by_task(self) -> dict[int, list[_JudgmentRow]]:
        by_task: dict[int, list[_JudgmentRow]] = defaultdict(list)
        for judgment in self.judgments:
            by_task[judgment.task_id].append(judgment)
        return by_task

    @cached_property
    def rank_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """The judgments' ranks as an (n, widest task) int array, and where a rank was given (bool)."""
        width = max((len(judgment.ranks) for judgment in self.judgments), default=0)
        ranks = np.zeros((len(self.judgments), width), dtype=np.int64)
        given = np.zeros((len(self.judgments), width), dtype=bool)
        for row, judgment in enumerate(self.judgments):
            for column, rank in enumerate(judgment.ranks):
                if rank is not None:
                    ranks[row, column] = rank
                    given[row, column] = True
        return ranks, given

    @cached_property
    def judgment_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Row indexes (first, second) of every two judgments of the same task, first < second in id order."""
        task_ids = np.fromiter((judgment.task_id for judgment in self.judgments), dtype=np.int64)
        order = np.argsort(task_ids, kind="stable")
        by_task = task_ids[order]
        starts = np.flatnonzero(np.r_[True, by_task[1:] != by_task[:-1]]) if len(by_task) else by_task
        sizes = np.diff(np.r_[starts, len(by_task)])
        firsts, seconds = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
        # Tasks with the same number of judgments share one index pattern.
        for size in np.unique(sizes):
            if size < 2:
                continue
            group_starts = starts[sizes == size]
            i, j = np.triu_indices(int(size), k=1)
            firsts.append((group_starts[:, None] + i).ravel())
            seconds.append((group_starts[:, None] + j).ravel())
        return order[np.concatenate(firsts)], order[np.concatenate(seconds)]


def _submitted_judgments(*, project: Project) -> QuerySet[Judgment]:
    return Judgment.objects.filter(task__project=project, assignment__status=Assignment.Status.SUBMITTED)


def _project_data(*, project: Project) -> _ProjectData:
    """Load the project's tasks and submitted judgments in three queries."""
    uids_by_task: dict[int, list[str]] = defaultdict(list)
    # PostgreSQL gives the uid as text in str(UUID)'s form: a million uuid.UUID objects made
    # and printed took seconds. (SQLite stores it as bare hex: converted here.)
    uid = (
        Cast("completion__uid", output_field=CharField())
        if connection.vendor == "postgresql"
        else "completion__uid"
    )
    for task_id, completion_uid in (
        TaskCompletion.objects.filter(task__project=project)
        .order_by("task_id", "position")
        .values_list("task_id", uid)
    ):
        uids_by_task[task_id].append(str(completion_uid))
    tasks = {
        row["id"]: _TaskRow(
            id=row["id"],
            is_gold=row["is_gold"],
            gold_ranks=row["gold_ranks"],
            judgment_count=row["judgment_count"],
            uids=uids_by_task.get(row["id"], []),
        )
        for row in Task.objects.filter(project=project)
        .order_by("id")
        .values("id", "is_gold", "gold_ranks", "judgment_count")
    }
    judgments = []
    # Tuples rather than dicts: a million rows.
    for judgment_id, task_id, user_id, username, ranks, none_acceptable, active_seconds, source in (
        _submitted_judgments(project=project)
        .order_by("id")
        .values_list(
            "id",
            "task_id",
            "user_id",
            "user__username",
            "ranks",
            "none_acceptable",
            "active_seconds",
            "source",
        )
    ):
        given = ranks or {}
        judgments.append(
            _JudgmentRow(
                id=judgment_id,
                task_id=task_id,
                user_id=user_id,
                username=username,
                none_acceptable=none_acceptable,
                active_seconds=active_seconds,
                ranks=[given.get(uid) for uid in tasks[task_id].uids],
                source=source,
            )
        )
    return _ProjectData(project=project, tasks=tasks, judgments=judgments)


def _outcome(rank_a: int, rank_b: int) -> int:
    """-1 when a is preferred, 1 when b is, 0 for a tie (rank 1 is best)."""
    return (rank_a > rank_b) - (rank_a < rank_b)


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


# --- progress ------------------------------------------------------------------


def _progress_from(data: _ProjectData) -> dict[str, Any]:
    overlap = data.project.overlap
    regular = [task for task in data.tasks.values() if not task.is_gold]
    judgments_wanted = len(regular) * overlap
    # Judgments beyond the overlap do not make a task more done.
    judgments_counted = sum(min(task.judgment_count, overlap) for task in regular)
    gold_task_ids = {task.id for task in data.tasks.values() if task.is_gold}
    comparisons = Comparison.objects.filter(project=data.project).aggregate(
        total=Count("id"), ties=Count("id", filter=Q(is_tie=True))
    )
    return {
        "tasks_total": len(data.tasks),
        "tasks_gold": len(gold_task_ids),
        "tasks_complete": sum(1 for task in regular if task.judgment_count >= overlap),
        "judgments_total": len(data.judgments),
        "judgments_gold": sum(1 for judgment in data.judgments if judgment.task_id in gold_task_ids),
        "judgments_wanted": judgments_wanted,
        "fraction_done": judgments_counted / judgments_wanted if judgments_wanted else 0.0,
        "comparisons_total": comparisons["total"],
        "comparisons_ties": comparisons["ties"],
        "tie_rate": _rate(comparisons["ties"], comparisons["total"]),
    }


def project_progress(*, project: Project) -> dict[str, Any]:
    """How far the project is, counted as follows.

    - `tasks_total`: every task, gold included; `tasks_gold`: the gold ones.
    - `tasks_complete`: non-gold tasks whose `judgment_count` reached the
      project's overlap. Gold tasks are judged by many people on purpose and
      never "complete", so they stay out of completion accounting.
    - `judgments_total`: submitted judgments, gold included
      (`judgments_gold` of them on gold tasks).
    - `judgments_wanted`: non-gold tasks × overlap.
    - `fraction_done`: Σ over non-gold tasks of min(judgment_count, overlap),
      divided by `judgments_wanted` (0.0 when nothing is wanted).
    - `comparisons_total`, `comparisons_ties`, and `tie_rate` = ties / total
      (None without comparisons).
    """
    return _progress_from(_project_data(project=project))


def project_judgments_per_day(*, project: Project) -> list[dict[str, Any]]:
    """Submitted judgments per calendar day, oldest first, days without any left out.

    The day is the judgment's `created_at` truncated in the database in the
    project's TIME_ZONE setting, not the request's active time zone, so every
    viewer sees the same days. Rows: `{"date": "YYYY-MM-DD", "judgments": n}`.
    """
    rows = (
        _submitted_judgments(project=project)
        .annotate(date=TruncDate("created_at", tzinfo=timezone.get_default_timezone()))
        .values("date")
        .annotate(judgments=Count("id"))
        .order_by("date")
    )
    return [{"date": row["date"].isoformat(), "judgments": row["judgments"]} for row in rows]


def _median_active_seconds_from(data: _ProjectData) -> float | None:
    return _median([j.active_seconds for j in data.judgments if j.active_seconds is not None])


def project_median_active_seconds(*, project: Project) -> float | None:
    """Median active time of the submitted judgments that recorded one, in seconds.

    Judgments without an active time are left out; None when none has one.
    """
    return _median_active_seconds_from(_project_data(project=project))


# --- agreement -----------------------------------------------------------------


def _pairwise_agreement_from(data: _ProjectData) -> dict[str, Any]:
    # Counted with arrays over every two judgments of a task (by different people) at once.
    ranks, given = data.rank_matrix
    first, second = data.judgment_pairs
    user_ids = np.fromiter((judgment.user_id for judgment in data.judgments), dtype=np.int64)
    people, user_index = np.unique(user_ids, return_inverse=True)
    others = user_ids[first] != user_ids[second]
    first, second = first[others], second[others]
    shared_by = np.zeros(len(people), dtype=np.int64)
    agreed_by = np.zeros(len(people), dtype=np.int64)
    shared = agreed = 0
    for a, b in itertools.combinations(range(ranks.shape[1]), 2):
        both = given[first, a] & given[first, b] & given[second, a] & given[second, b]
        same = both & (
            np.sign(ranks[first, a] - ranks[first, b]) == np.sign(ranks[second, a] - ranks[second, b])
        )
        shared += int(both.sum())
        agreed += int(same.sum())
        for rows in (first, second):
            shared_by += np.bincount(user_index[rows], weights=both, minlength=len(people)).astype(np.int64)
            agreed_by += np.bincount(user_index[rows], weights=same, minlength=len(people)).astype(np.int64)
    per_labeler = {
        int(user_id): {
            "shared": int(shared_by[index]),
            "agreed": int(agreed_by[index]),
            "rate": _rate(int(agreed_by[index]), int(shared_by[index])),
        }
        for index, user_id in enumerate(people)
        if shared_by[index]
    }
    return {"rate": _rate(agreed, shared), "shared": shared, "agreed": agreed, "per_labeler": per_labeler}


def pairwise_agreement(*, project: Project) -> dict[str, Any]:
    """Raw agreement on pair outcomes between people who judged the same task.

    1. For every task, take every two of its judgments (two different people).
    2. For every pair of the task's completions that both ranked, the
       *shared pair-judgment* agrees when both give the same outcome:
       a>b, b>a, or a tie.
    3. `rate` = agreed / shared over the project (None when nothing is shared);
       `per_labeler[user_id]` = the same over the shared pair-judgments that
       person took part in, i.e. their agreement with everyone else.

    Judgments marked "none acceptable" count with the ranks they gave, as
    their Comparison rows do. Chance agreement is not corrected for; see
    `krippendorff_alpha_ordinal` for a chance-corrected figure.
    """
    return _pairwise_agreement_from(_project_data(project=project))


def _tau_b(x: list[int], y: list[int]) -> float:
    """Kendall's tau-b of two rank vectors, as `scipy.stats.kendalltau` computes it.

    Counted over the pairs directly: a task has a handful of completions, and
    scipy's per-call overhead (and its p-value) cost about a millisecond a
    call, which at 100k judgments was most of the statistics' time.
    Both vectors must hold at least two different values.
    """
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 or dy == 0:
            ties_x += dx == 0
            ties_y += dy == 0
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    pairs = len(x) * (len(x) - 1) // 2
    return (concordant - discordant) / math.sqrt((pairs - ties_x) * (pairs - ties_y))


def _kendall_tau_from(data: _ProjectData) -> dict[str, Any]:
    # tau-b of every two judgments of a task at once, counted as `_tau_b` counts: the same
    # integers, then the same float operations, so each tau is the value `_tau_b` returns
    # (and fmean, an exactly rounded sum, does not depend on the order).
    ranks, given = data.rank_matrix
    first, second = data.judgment_pairs
    none_acceptable = np.fromiter((judgment.none_acceptable for judgment in data.judgments), dtype=bool)
    counted = ~(none_acceptable[first] | none_acceptable[second])
    first, second = first[counted], second[counted]
    both = given[first] & given[second]
    concordant = np.zeros(len(first), dtype=np.int64)
    discordant = np.zeros(len(first), dtype=np.int64)
    ties_x = np.zeros(len(first), dtype=np.int64)
    ties_y = np.zeros(len(first), dtype=np.int64)
    for i, j in itertools.combinations(range(ranks.shape[1]), 2):
        pair = both[:, i] & both[:, j]
        dx = ranks[first, i] - ranks[first, j]
        dy = ranks[second, i] - ranks[second, j]
        tied = (dx == 0) | (dy == 0)
        ties_x += pair & (dx == 0)
        ties_y += pair & (dy == 0)
        concordant += pair & ~tied & ((dx > 0) == (dy > 0))
        discordant += pair & ~tied & ((dx > 0) != (dy > 0))
    size = both.sum(axis=1)
    pairs = size * (size - 1) // 2
    # tau-b divides by the ties in each vector: undefined for a constant one (or fewer than two ranks).
    defined = (size >= 2) & (ties_x < pairs) & (ties_y < pairs)
    taus = (concordant - discordant)[defined].astype(np.float64) / np.sqrt(
        ((pairs - ties_x) * (pairs - ties_y))[defined].astype(np.float64)
    )
    skipped = int((~counted).sum()) + int((~defined).sum())
    return {
        "mean": statistics.fmean(taus.tolist()) if len(taus) else None,
        "pairs": len(taus),
        "skipped": skipped,
    }


def kendall_tau_between_labelers(*, project: Project) -> dict[str, Any]:
    """Mean Kendall's tau-b between two people's rankings of the same task.

    1. For every task with two or more judgments, take every two of them.
    2. Build each person's rank vector over the task's completions in
       position order (completions both ranked) and compute tau-b (as
       `scipy.stats.kendalltau` does), which corrects for ties: +1 is the same
       order, −1 the reverse.
    3. Skip the two judgments (and count them in `skipped`) when either is
       marked "none acceptable" or either vector is constant (all tied),
       where tau-b is undefined.

    Returns `mean` over the scored task pairs (None when none), `pairs` (how
    many were scored) and `skipped`.
    """
    return _kendall_tau_from(_project_data(project=project))


def _krippendorff_alpha_from(data: _ProjectData) -> float | None:
    # Units: (task, position) that two or more people ranked; others carry no agreement.
    values_by_unit: dict[tuple[int, int], dict[int, int]] = defaultdict(dict)
    for judgment in data.judgments:
        for position, rank in enumerate(judgment.ranks):
            if rank is not None:
                values_by_unit[(judgment.task_id, position)][judgment.user_id] = rank
    units = [unit for unit, values in values_by_unit.items() if len(values) >= 2]
    if not units:
        return None
    labelers = sorted({user_id for unit in units for user_id in values_by_unit[unit]})
    reliability = np.full((len(labelers), len(units)), np.nan)
    row_of = {user_id: row for row, user_id in enumerate(labelers)}
    for column, unit in enumerate(units):
        for user_id, rank in values_by_unit[unit].items():
            reliability[row_of[user_id], column] = rank
    # A single value everywhere (everyone tied everything) leaves alpha as 0/0.
    if len(np.unique(reliability[~np.isnan(reliability)])) < 2:
        return None
    alpha = float(krippendorff.alpha(reliability_data=reliability, level_of_measurement="ordinal"))
    return None if math.isnan(alpha) else alpha


def krippendorff_alpha_ordinal(*, project: Project) -> float | None:
    """Krippendorff's alpha with the ordinal metric over the ranks people gave.

    Reliability data: one row per labeler, one column per unit = (task,
    completion), the value the rank that labeler gave it (missing where they
    did not judge the task). Units ranked by fewer than two people are
    dropped as unpairable. alpha = 1 − observed / expected disagreement:
    1 is perfect agreement, 0 is chance level, below 0 systematic
    disagreement. Ranks are compared within a task only, since a unit is a
    completion in one task. None when no unit was ranked by two people, or
    when every rank given is the same value (alpha is then 0/0).
    """
    return _krippendorff_alpha_from(_project_data(project=project))


# --- gold ----------------------------------------------------------------------


def _gold_accuracy_from(data: _ProjectData) -> dict[int, dict[str, Any]]:
    judged: dict[int, int] = defaultdict(int)
    pairs: dict[int, int] = defaultdict(int)
    correct: dict[int, int] = defaultdict(int)
    for judgment in data.judgments:
        task = data.tasks[judgment.task_id]
        if not task.is_gold:
            continue
        gold = task.gold_ranks or []
        judged[judgment.user_id] += 1
        for a, b in itertools.combinations(range(min(len(gold), len(judgment.ranks))), 2):
            given_a, given_b = judgment.ranks[a], judgment.ranks[b]
            if given_a is None or given_b is None:
                continue
            pairs[judgment.user_id] += 1
            correct[judgment.user_id] += _outcome(given_a, given_b) == _outcome(gold[a], gold[b])
    return {
        user_id: {
            "judged": judged[user_id],
            "pairs": pairs[user_id],
            "correct": correct[user_id],
            "accuracy": _rate(correct[user_id], pairs[user_id]),
        }
        for user_id in sorted(judged)
    }


def gold_accuracy(*, project: Project) -> dict[int, dict[str, Any]]:
    """Per labeler, how often their pair outcomes on gold tasks match the gold answer.

    For every judgment on a gold task, each of its C(K, 2) pairs of
    completions is correct when its outcome (a>b, b>a, tie) equals the
    outcome of the task's `gold_ranks` (in position order) for that pair.
    Keyed by user id: `judged` gold judgments, `pairs` compared, `correct`,
    and `accuracy` = correct / pairs (None without pairs). People with no
    gold judgment are absent.
    """
    return _gold_accuracy_from(_project_data(project=project))


# --- per labeler and the bundle --------------------------------------------------


def _labeler_table_from(
    data: _ProjectData,
    *,
    agreement: dict[str, Any],
    gold: dict[int, dict[str, Any]],
    reviews: dict[int, dict[str, int]] | None = None,
) -> list[dict[str, Any]]:
    reliability = {
        row["user_id"]: row
        for row in LabelerReliability.objects.filter(project=data.project).values(
            "user_id", "reliability", "source"
        )
    }
    reviews = reviews if reviews is not None else _reviews_by_labeler(project=data.project)
    by_user: dict[int, list[_JudgmentRow]] = defaultdict(list)
    for judgment in data.judgments:
        by_user[judgment.user_id].append(judgment)
    rows = []
    for user_id, judgments in by_user.items():
        user_gold = gold.get(user_id)
        user_agreement = agreement["per_labeler"].get(user_id)
        rows.append(
            {
                "user_id": user_id,
                "username": judgments[0].username,
                # A model judge, listed like anyone (its gold accuracy and agreement are measured the same way).
                "is_model": judgments[0].source == "model",
                "judgments": len(judgments),
                "median_active_seconds": _median(
                    [j.active_seconds for j in judgments if j.active_seconds is not None]
                ),
                "gold_judged": user_gold["judged"] if user_gold else 0,
                "gold_accuracy": user_gold["accuracy"] if user_gold else None,
                "agreement_shared": user_agreement["shared"] if user_agreement else 0,
                "agreement_rate": user_agreement["rate"] if user_agreement else None,
                # Estimated from the votes by the latest Dawid–Skene build (None without one).
                "reliability": reliability[user_id]["reliability"] if user_id in reliability else None,
                "reliability_source": reliability[user_id]["source"] if user_id in reliability else "",
                # Review: of this person's reviewed judgments, the share accepted (None before any review).
                "reviewed": reviews[user_id]["reviewed"],
                "acceptance_rate": _rate(reviews[user_id]["accepted"], reviews[user_id]["reviewed"]),
            }
        )
    rows.sort(key=lambda row: (-row["judgments"], row["username"]))
    return rows


def _reviews_by_labeler(*, project: Project) -> dict[int, dict[str, int]]:
    """Per labeler: judgments reviewed and judgments accepted (rejected ones included in reviewed)."""
    counts: dict[int, dict[str, int]] = defaultdict(lambda: {"reviewed": 0, "accepted": 0})
    rows = (
        Judgment.objects.filter(task__project=project)
        .exclude(review=Judgment.Review.PENDING)
        .values("user_id", "review")
        .annotate(n=Count("id"))
        .order_by()
    )
    for row in rows:
        counts[row["user_id"]]["reviewed"] += row["n"]
        if row["review"] == Judgment.Review.ACCEPTED:
            counts[row["user_id"]]["accepted"] += row["n"]
    return counts


def review_acceptance(
    *, project: Project, reviews: dict[int, dict[str, int]] | None = None
) -> dict[str, Any]:
    """The project's reviewed judgments and the share accepted (`rate`, None before any review)."""
    totals = (reviews if reviews is not None else _reviews_by_labeler(project=project)).values()
    reviewed = sum(row["reviewed"] for row in totals)
    return {"reviewed": reviewed, "rate": _rate(sum(row["accepted"] for row in totals), reviewed)}


def project_labeler_table(*, project: Project) -> list[dict[str, Any]]:
    """One row per person who submitted a judgment, most judgments first (then by username).

    Columns: `user_id`, `username`, `judgments`, `median_active_seconds`
    (None when no judgment recorded one), `gold_judged` and `gold_accuracy`
    as in `gold_accuracy`, and `agreement_shared` / `agreement_rate`, their
    shared pair-judgments and raw agreement with everyone else as in
    `pairwise_agreement`.
    """
    data = _project_data(project=project)
    return _labeler_table_from(data, agreement=_pairwise_agreement_from(data), gold=_gold_accuracy_from(data))


def project_stats(*, project: Project) -> dict[str, Any]:
    """Every statistic above in one JSON-serialisable dict, from one snapshot.

    Keys: `progress`, `judgments_per_day`, `median_active_seconds`,
    `labelers`, `pairwise_agreement`, `kendall_tau`, `krippendorff_alpha`,
    `gold_accuracy`. Dicts keyed by user id in the separate functions are
    keyed by the id as a string here, as JSON objects are, so the bundle
    reads back from JSON unchanged. Runs a fixed number of queries whatever
    the number of judgments.
    """
    data = _project_data(project=project)
    agreement = _pairwise_agreement_from(data)
    gold = _gold_accuracy_from(data)
    reviews = _reviews_by_labeler(project=project)
    return {
        "project_id": project.pk,
        "progress": _progress_from(data),
        "judgments_per_day": project_judgments_per_day(project=project),
        "median_active_seconds": _median_active_seconds_from(data),
        "labelers": _labeler_table_from(data, agreement=agreement, gold=gold, reviews=reviews),
        "pairwise_agreement": {
            **agreement,
            "per_labeler": {str(user_id): row for user_id, row in agreement["per_labeler"].items()},
        },
        "kendall_tau": _kendall_tau_from(data),
        "krippendorff_alpha": _krippendorff_alpha_from(data),
        "gold_accuracy": {str(user_id): row for user_id, row in gold.items()},
        "review": review_acceptance(project=project, reviews=reviews),
    }
