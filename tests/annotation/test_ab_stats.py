"""A/B statistics recover a known truth on simulated votes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from annotation.ab_stats import (
    ELO_CENTRE,
    ELO_SCALE,
    Vote,
    bradley_terry_ratings,
    pair_table,
    position_bias,
    wilson_interval,
)

POLICIES = ("sft", "dpo", "best-of-4")
TRUE_LOG_STRENGTH = {"sft": 0.0, "dpo": 0.45, "best-of-4": 0.8}


def true_ratings() -> dict[str, float]:
    mean = np.mean(list(TRUE_LOG_STRENGTH.values()))
    return {policy: ELO_CENTRE + ELO_SCALE * (value - mean) for policy, value in TRUE_LOG_STRENGTH.items()}


def simulate(generator: np.random.Generator, prompts: int) -> list[Vote]:
    """Every pair of policies once per prompt, sides at random, winner drawn from Bradley–Terry."""
    votes = []
    for prompt in range(prompts):
        for i, first in enumerate(POLICIES):
            for second in POLICIES[i + 1 :]:
                left, right = (first, second) if generator.random() < 0.5 else (second, first)
                gap = TRUE_LOG_STRENGTH[left] - TRUE_LOG_STRENGTH[right]
                left_wins = generator.random() < 1 / (1 + math.exp(-gap))
                votes.append(Vote(str(prompt), left, right, "left" if left_wins else "right"))
    return votes


def test_the_bradley_terry_order_is_the_true_order():
    votes = simulate(np.random.default_rng(1), prompts=300)
    ranked = [row["policy"] for row in bradley_terry_ratings(votes, rounds=200)]
    assert ranked == ["best-of-4", "dpo", "sft"]


def test_the_95_percent_intervals_cover_the_true_ratings_about_95_percent_of_the_time():
    # given 60 independent simulated sessions of 200 prompts each
    generator = np.random.default_rng(7)
    truth = true_ratings()
    covered = total = 0
    for simulation in range(60):
        rows = bradley_terry_ratings(simulate(generator, prompts=200), rounds=300, seed=simulation)
        for row in rows:
            covered += row["low"] <= truth[row["policy"]] <= row["high"]
            total += 1
    # then coverage is near the nominal 95% (180 intervals: a binomial 95% band is about 91–98%)
    assert 0.89 <= covered / total <= 0.99, covered / total


def test_ties_and_both_bad_count_half_each_way_in_ratings_and_not_in_win_rates():
    votes = [Vote("1", "a", "b", "tie"), Vote("2", "b", "a", "both_bad"), Vote("3", "a", "b", "left")]
    (row,) = pair_table(votes)
    assert (row["wins_first"], row["wins_second"], row["ties"], row["both_bad"]) == (1, 0, 1, 1)
    assert row["win_rate"] == 1.0
    ratings = {r["policy"]: r["rating"] for r in bradley_terry_ratings(votes, rounds=50)}
    assert ratings["a"] > ratings["b"]


def test_the_win_rate_interval_is_wilsons():
    low, high = wilson_interval(7, 10)
    # Wilson (1927) for 7/10 at 95%: 0.3968 … 0.8922
    assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)
    assert wilson_interval(0, 0) is None


def test_position_bias_is_the_left_share_of_decisive_votes():
    votes = [Vote(str(n), "a", "b", "left") for n in range(30)] + [
        Vote(str(n), "a", "b", "right") for n in range(10)
    ]
    votes.append(Vote("x", "a", "b", "tie"))
    bias = position_bias(votes)
    assert (bias["left_wins"], bias["decisive"], bias["left_share"]) == (30, 40, 0.75)
    assert bias["low"] > 0.5  # a real bias: its interval excludes one half


@pytest.mark.parametrize("votes", [[], [Vote("1", "a", "a", "left")]])
def test_too_few_policies_give_no_ratings(votes):
    assert bradley_terry_ratings(votes) == []


def test_head_to_head_names_the_winning_side_first():
    votes = [Vote(str(n), "a", "b", "right") for n in range(3)] + [Vote("9", "b", "a", "right")]
    (row,) = pair_table(votes)
    assert (row["policy"], row["opponent"]) == ("b", "a")
    assert (row["wins_first"], row["wins_second"]) == (3, 1)
    assert row["win_rate"] == 0.75 and row["win_rate_low"] < 0.75 < row["win_rate_high"]
