"""Statistics of blind A/B votes: win rates with Wilson intervals, Bradley–Terry
ratings with prompt-clustered bootstrap intervals, position bias, and how
often a scorer (a reward model) agrees with the votes.

Pure functions over plain data (no ORM), so they are tested on simulated votes
from policies of known strength.

Conventions, as in Chatbot Arena's published analysis:

- a vote is (prompt, left policy, right policy, outcome) with outcome
  "left", "right", "tie" or "both_bad"; a tie and "both bad" count as half a
  win for each side in the ratings and as neither in win rates;
- ratings are on the Elo scale: 400·log10 of the Bradley–Terry strength,
  centred so the mean rating is 1000;
- intervals are percentile intervals of a bootstrap that resamples *prompts*
  (all votes on a prompt together), because votes on one prompt are not
  independent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

OUTCOMES = ("left", "right", "tie", "both_bad")
ELO_SCALE = 400.0 / math.log(10.0)
ELO_CENTRE = 1000.0
MM_ITERATIONS = 500
MM_TOLERANCE = 1e-10
# A pseudo-count of half a win each way between every two policies keeps the
# maximum-likelihood strengths finite when one policy never loses (it shrinks
# ratings a little towards each other; Arena applies a similar regulariser).
PRIOR_WINS = 0.5
# Two scores this close (relative to their size, at least 1) are a scorer tie:
# the same text scored in batches of different shapes differs in the last bits.
SCORE_TIE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Vote:
    prompt: str
    left: str
    right: str
    outcome: str  # one of OUTCOMES


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (scipy), or None without trials."""
    if trials == 0:
        return None
    interval = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def pair_table(votes: Iterable[Vote]) -> list[dict[str, object]]:
    """Per unordered pair of policies: wins of each, ties, both bad, and the first's win rate with its interval.

    The side with more wins is named first (`policy`; by name on equal wins),
    so a row reads as "policy beat opponent". The win rate counts decisive
    votes only (ties and "both bad" are left out of its denominator and
    reported beside it).
    """
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for vote in votes:
        first, second = sorted((vote.left, vote.right))
        row = counts.setdefault(
            (first, second), {"wins_first": 0, "wins_second": 0, "ties": 0, "both_bad": 0}
        )
        winner = {"left": vote.left, "right": vote.right}.get(vote.outcome)
        if winner is None:
            row["ties" if vote.outcome == "tie" else "both_bad"] += 1
        else:
            row["wins_first" if winner == first else "wins_second"] += 1
    table = []
    for (first, second), row in sorted(counts.items()):
        if row["wins_second"] > row["wins_first"]:
            first, second = second, first
            row = {**row, "wins_first": row["wins_second"], "wins_second": row["wins_first"]}
        decisive = row["wins_first"] + row["wins_second"]
        interval = wilson_interval(row["wins_first"], decisive)
        table.append(
            {
                "policy": first,
                "opponent": second,
                **row,
                "votes": decisive + row["ties"] + row["both_bad"],
                "win_rate": row["wins_first"] / decisive if decisive else None,
                "win_rate_low": interval[0] if interval else None,
                "win_rate_high": interval[1] if interval else None,
            }
        )
    return table


def position_bias(votes: Iterable[Vote]) -> dict[str, float | int | None]:
    """Share of decisive votes won by the left side, with its Wilson interval (0.5 means no bias)."""
    left = right = 0
    for vote in votes:
        left += vote.outcome == "left"
        right += vote.outcome == "right"
    interval = wilson_interval(left, left + right)
    return {
        "left_wins": left,
        "decisive": left + right,
        "left_share": left / (left + right) if left + right else None,
        "low": interval[0] if interval else None,
        "high": interval[1] if interval else None,
    }


def _win_matrices(votes: Sequence[Vote], policies: list[str]) -> tuple[list[str], np.ndarray]:
    """Per prompt, W[p, i, j] = wins of policy i over j on prompt p (a tie is half each way)."""
    index = {policy: position for position, policy in enumerate(policies)}
    prompts = sorted({vote.prompt for vote in votes})
    prompt_index = {prompt: position for position, prompt in enumerate(prompts)}
    wins = np.zeros((len(prompts), len(policies), len(policies)))
    for vote in votes:
        p, left, right = prompt_index[vote.prompt], index[vote.left], index[vote.right]
        if vote.outcome == "left":
            wins[p, left, right] += 1
        elif vote.outcome == "right":
            wins[p, right, left] += 1
        else:
            wins[p, left, right] += 0.5
            wins[p, right, left] += 0.5
    return prompts, wins


def bradley_terry_strengths(wins: np.ndarray) -> np.ndarray:
    """Maximum-likelihood Bradley–Terry strengths by Hunter's MM algorithm.

    `wins` is (..., n, n) with wins[i, j] the wins of i over j; leading axes
    are independent problems (bootstrap replicates), solved together. Returns
    log-strengths centred to mean 0 along the last axis.
    """
    n = wins.shape[-1]
    wins = wins + PRIOR_WINS * (1 - np.eye(n))
    games = wins + np.swapaxes(wins, -1, -2)
    total_wins = wins.sum(axis=-1)
    strength = np.ones(wins.shape[:-1])
    for _iteration in range(MM_ITERATIONS):
        denominator = (games / (strength[..., :, None] + strength[..., None, :])).sum(axis=-1)
        updated = total_wins / denominator
        updated /= np.exp(np.log(updated).mean(axis=-1, keepdims=True))
        converged = np.max(np.abs(updated - strength)) < MM_TOLERANCE
        strength = updated
        if converged:
            break
    log_strength = np.log(strength)
    return log_strength - log_strength.mean(axis=-1, keepdims=True)


def bradley_terry_ratings(
    votes: Sequence[Vote], *, rounds: int = 1000, seed: int = 0, confidence: float = 0.95
) -> list[dict[str, float | str]]:
    """Elo-scale ratings with prompt-clustered bootstrap intervals, best first.

    1. One win matrix per prompt.
    2. The point estimate fits Bradley–Terry to the sum over prompts.
    3. Each bootstrap round draws prompts with replacement (multinomial
       counts, drawn per group of prompts with the same win matrix) and
       refits; all rounds are solved at once.
    4. The interval is the (1−confidence)/2 and (1+confidence)/2 percentiles.
    """
    policies = sorted({vote.left for vote in votes} | {vote.right for vote in votes})
    if len(policies) < 2:
        return []
    _prompts, per_prompt = _win_matrices(votes, policies)
    point = bradley_terry_strengths(per_prompt.sum(axis=0))
    # Prompts with the same win matrix are interchangeable in a draw: how many of a group's
    # prompts a round draws only matters in sum, and those sums are multinomial with the
    # groups' shares. So draw per group, not per prompt: a session of one vote per prompt
    # has a few dozen groups whatever its size (rounds × prompts counts took 800 MB at 100k).
    groups, sizes = np.unique(per_prompt.reshape(per_prompt.shape[0], -1), axis=0, return_counts=True)
    groups = groups.reshape(-1, *per_prompt.shape[1:])
    generator = np.random.default_rng(seed)
    draws = generator.multinomial(per_prompt.shape[0], sizes / sizes.sum(), size=rounds)
    resampled = np.einsum("bu,uij->bij", draws, groups)
    replicates = bradley_terry_strengths(resampled)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail], axis=0)
    rows = [
        {
            "policy": policy,
            "rating": ELO_CENTRE + ELO_SCALE * point[position],
            "low": ELO_CENTRE + ELO_SCALE * low[position],
            "high": ELO_CENTRE + ELO_SCALE * high[position],
        }
        for position, policy in enumerate(policies)
    ]
    return sorted(rows, key=lambda row: -float(row["rating"]))


# --- agreement of scorers with the votes --------------------------------------------


@dataclass(frozen=True)
class ScoredVote:
    """A vote as a scorer sees it: which of two completions (by id) the evaluator chose.

    For a tie or "both bad", `chosen` and `rejected` are just the two
    completions, with no preference. The policies name the pair.
    """

    chosen: str
    rejected: str
    chosen_policy: str
    rejected_policy: str
    outcome: str  # "decisive", "tie" or "both_bad"


def _scores_tie(first: float, second: float) -> bool:
    return abs(first - second) <= SCORE_TIE_TOLERANCE * max(1.0, abs(first), abs(second))


def _agreement_row(counts: dict[str, int]) -> dict[str, object]:
    votes = counts["agree"] + counts["disagree"] + counts["scorer_ties"]
    interval = wilson_interval(counts["agree"], votes)
    return {
        **counts,
        "votes": votes,
        "agreement": counts["agree"] / votes if votes else None,
        "low": interval[0] if interval else None,
        "high": interval[1] if interval else None,
        "scorer_tie_rate": counts["scorer_ties"] / votes if votes else None,
    }


def scorer_agreement(
    votes: Iterable[ScoredVote], scores: Mapping[str, Mapping[str, float]]
) -> list[dict[str, object]]:
    """Per scorer (`scores`: scorer -> completion id -> score), how often it agrees with the votes.

    1. Only votes whose two completions the scorer scored count; decisive
       votes it lacks a score for are counted as `unscored`.
    2. A decisive vote (one side chosen) agrees when the scorer gave the
       chosen completion the higher score, disagrees when the lower, and is a
       scorer tie when the two are equal (SCORE_TIE_TOLERANCE).
    3. `agreement` = agreeing votes / decisive votes used (scorer ties stay in
       the denominator: a scorer that cannot tell the two apart did not
       agree), with its 95% Wilson interval; `scorer_tie_rate` beside it.
    4. Ties and "both bad" votes are counted (`human_ties`, `both_bad`) and
       are neither agreement nor disagreement.
    5. `pairs`: the same per unordered pair of policies, by name.

    Rows are sorted by scorer.
    """
    votes = list(votes)
    rows = []
    for scorer in sorted(scores):
        given = scores[scorer]
        empty = {"agree": 0, "disagree": 0, "scorer_ties": 0}
        totals = {**empty, "human_ties": 0, "both_bad": 0, "unscored": 0}
        per_pair: dict[tuple[str, str], dict[str, int]] = {}
        for vote in votes:
            if vote.chosen not in given or vote.rejected not in given:
                totals["unscored"] += vote.outcome == "decisive"
                continue
            if vote.outcome != "decisive":
                totals["human_ties" if vote.outcome == "tie" else "both_bad"] += 1
                continue
            chosen, rejected = given[vote.chosen], given[vote.rejected]
            verdict = (
                "scorer_ties"
                if _scores_tie(chosen, rejected)
                else ("agree" if chosen > rejected else "disagree")
            )
            totals[verdict] += 1
            pair = tuple(sorted((vote.chosen_policy, vote.rejected_policy)))
            per_pair.setdefault((pair[0], pair[1]), dict(empty))[verdict] += 1
        rows.append(
            {
                "scorer": scorer,
                **_agreement_row(totals),
                "pairs": [
                    {"policy": first, "opponent": second, **_agreement_row(counts)}
                    for (first, second), counts in sorted(per_pair.items())
                ],
            }
        )
    return rows
