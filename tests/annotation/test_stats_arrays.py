"""Agreement and Kendall's tau counted with arrays give exactly what the plain loops over judgments give.

No database: the project data is built in memory, with ties, missing ranks,
"none acceptable", one person judging a task twice and tasks of different
widths, and compared with the loops the array code replaced.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections import defaultdict
from typing import Any

from annotation.stats import (
    _JudgmentRow,
    _kendall_tau_from,
    _outcome,
    _pairwise_agreement_from,
    _ProjectData,
    _rate,
    _TaskRow,
    _tau_b,
)


def _agreement_by_loops(data: _ProjectData) -> dict[str, Any]:
    shared = agreed = 0
    shared_by: dict[int, int] = defaultdict(int)
    agreed_by: dict[int, int] = defaultdict(int)
    for judgments in data.judgments_by_task().values():
        for first, second in itertools.combinations(judgments, 2):
            if first.user_id == second.user_id:
                continue
            for a, b in itertools.combinations(range(len(first.ranks)), 2):
                ranks = (first.ranks[a], first.ranks[b], second.ranks[a], second.ranks[b])
                if None in ranks:
                    continue
                same = _outcome(ranks[0], ranks[1]) == _outcome(ranks[2], ranks[3])
                shared += 1
                agreed += same
                for user_id in (first.user_id, second.user_id):
                    shared_by[user_id] += 1
                    agreed_by[user_id] += same
    return {
        "rate": _rate(agreed, shared),
        "shared": shared,
        "agreed": agreed,
        "per_labeler": {
            user: {
                "shared": shared_by[user],
                "agreed": agreed_by[user],
                "rate": _rate(agreed_by[user], shared_by[user]),
            }
            for user in sorted(shared_by)
        },
    }


def _tau_by_loops(data: _ProjectData) -> dict[str, Any]:
    taus: list[float] = []
    skipped = 0
    for judgments in data.judgments_by_task().values():
        for first, second in itertools.combinations(judgments, 2):
            if first.none_acceptable or second.none_acceptable:
                skipped += 1
                continue
            both = [(x, y) for x, y in zip(first.ranks, second.ranks, strict=True) if None not in (x, y)]
            x, y = [pair[0] for pair in both], [pair[1] for pair in both]
            if len(set(x)) < 2 or len(set(y)) < 2:
                skipped += 1
                continue
            taus.append(_tau_b(x, y))
    return {"mean": statistics.fmean(taus) if taus else None, "pairs": len(taus), "skipped": skipped}


def _random_project(rng: random.Random, tasks: int) -> _ProjectData:
    rows: dict[int, _TaskRow] = {}
    judgments = []
    for task_id in range(1, tasks + 1):
        width = rng.choice([2, 3, 4, 4, 5])
        rows[task_id] = _TaskRow(id=task_id, is_gold=False, gold_ranks=None, judgment_count=0, uids=[])
        for _ in range(rng.choice([0, 1, 2, 3, 4, 5])):
            ranks: list[int | None] = [rng.randint(1, width) for _ in range(width)]
            if rng.random() < 0.1:
                ranks[rng.randrange(width)] = None
            judgments.append(
                _JudgmentRow(
                    id=0,
                    task_id=task_id,
                    user_id=rng.randint(1, 6),  # small: some people judge a task twice
                    username="",
                    none_acceptable=rng.random() < 0.05,
                    active_seconds=None,
                    ranks=ranks,
                )
            )
    rng.shuffle(judgments)  # tasks interleave, as judgments arrive
    judgments = [
        _JudgmentRow(**{**judgment.__dict__, "id": number}) for number, judgment in enumerate(judgments, 1)
    ]
    return _ProjectData(project=None, tasks=rows, judgments=judgments)  # type: ignore[arg-type]


def test_agreement_and_tau_by_arrays_equal_the_loops_exactly() -> None:
    rng = random.Random(21)
    for tasks in (0, 1, 3, 200):
        data = _random_project(rng, tasks)
        assert _pairwise_agreement_from(data) == _agreement_by_loops(data)
        assert _kendall_tau_from(data) == _tau_by_loops(data)
