"""How often a scorer (a reward model) agrees with blind A/B votes, on hand-made votes and scores."""

from __future__ import annotations

import math

import pytest

from annotation.ab_stats import ScoredVote, scorer_agreement, wilson_interval


def decisive(chosen: str, rejected: str, policies: tuple[str, str] = ("sft", "dpo")) -> ScoredVote:
    return ScoredVote(chosen, rejected, policies[0], policies[1], "decisive")


def wilson_by_hand(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval from its textbook formula (independent of scipy)."""
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return centre - half, centre + half


def test_agreement_counts_decisive_votes_and_leaves_ties_and_both_bad_aside() -> None:
    # given ten decisive votes the scorer saw: 7 with the chosen response scored higher,
    # 2 lower and 1 equal; two ties and one "both bad" that it scores very unevenly;
    # and a decisive vote on a response it never scored
    scores = {f"w{n}": 2.0 for n in range(7)} | {f"l{n}": 1.0 for n in range(7)}
    scores |= {"a": -1.0, "b": 3.0, "c": 0.0, "d": 5.0, "e": 0.5, "f": 0.5}
    scores |= {"t1": 9.0, "t2": -9.0, "t3": 4.0, "t4": -4.0, "x1": 8.0, "x2": -8.0}
    votes = [decisive(f"w{n}", f"l{n}") for n in range(7)]
    votes += [decisive("a", "b"), decisive("c", "d"), decisive("e", "f")]
    votes += [
        ScoredVote("t1", "t2", "sft", "dpo", "tie"),
        ScoredVote("t3", "t4", "sft", "dpo", "tie"),
        ScoredVote("x1", "x2", "sft", "dpo", "both_bad"),
    ]
    votes.append(decisive("w0", "never-scored"))

    # when
    (row,) = scorer_agreement(votes, {"reward model: rm-1": scores})

    # then
    assert row["scorer"] == "reward model: rm-1"
    assert (row["agree"], row["disagree"], row["scorer_ties"], row["votes"]) == (7, 2, 1, 10)
    assert (row["human_ties"], row["both_bad"], row["unscored"]) == (2, 1, 1)
    assert row["agreement"] == pytest.approx(0.7)
    assert row["scorer_tie_rate"] == pytest.approx(0.1)
    low, high = wilson_by_hand(7, 10)
    assert (row["low"], row["high"]) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))
    assert (row["low"], row["high"]) == pytest.approx(wilson_interval(7, 10))


def test_ties_and_both_bad_never_move_the_agreement() -> None:
    scores = {"a": 1.0, "b": 0.0, "c": 0.0, "d": 1.0}
    base = [decisive("a", "b"), decisive("c", "d")]
    extra = [ScoredVote("a", "b", "sft", "dpo", "tie")] * 5 + [
        ScoredVote("b", "a", "sft", "dpo", "both_bad")
    ] * 5

    (before,) = scorer_agreement(base, {"rm": scores})
    (after,) = scorer_agreement(base + extra, {"rm": scores})

    assert before["agreement"] == after["agreement"] == 0.5
    assert (before["low"], before["high"]) == (after["low"], after["high"])
    assert (after["human_ties"], after["both_bad"]) == (5, 5)


def test_each_scorer_is_judged_on_the_votes_it_scored_and_one_without_any_has_no_rate() -> None:
    votes = [decisive("a", "b"), decisive("c", "d")]
    scores = {
        "right": {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0},
        "wrong": {"a": 0.0, "b": 1.0, "c": 0.0, "d": 1.0},
        "elsewhere": {"z": 1.0},
    }

    rows = {row["scorer"]: row for row in scorer_agreement(votes, scores)}

    assert [row["scorer"] for row in scorer_agreement(votes, scores)] == ["elsewhere", "right", "wrong"]
    assert (rows["right"]["agree"], rows["right"]["agreement"]) == (2, 1.0)
    assert (rows["wrong"]["disagree"], rows["wrong"]["agreement"]) == (2, 0.0)
    assert rows["elsewhere"]["votes"] == 0
    assert rows["elsewhere"]["unscored"] == 2
    assert rows["elsewhere"]["agreement"] is None and rows["elsewhere"]["low"] is None


def test_scores_equal_but_for_float_noise_are_a_scorer_tie() -> None:
    votes = [decisive("a", "b"), decisive("c", "d")]
    scores = {"a": 1234.5, "b": 1234.5 * (1 + 1e-9), "c": 0.3, "d": 0.1 + 0.2}

    (row,) = scorer_agreement(votes, {"rm": scores})

    assert (row["scorer_ties"], row["agree"], row["disagree"]) == (2, 0, 0)
    assert row["agreement"] == 0.0  # a scorer that cannot tell them apart did not agree


def test_agreement_is_broken_down_by_pair_of_policies_whichever_side_won() -> None:
    votes = [
        decisive("a1", "b1", ("sft", "dpo")),
        decisive("b2", "a2", ("dpo", "sft")),
        decisive("a3", "c3", ("sft", "best-of-4")),
        decisive("c4", "a4", ("best-of-4", "sft")),
    ]
    scores = {"a1": 1.0, "b1": 0.0, "a2": 0.0, "b2": 1.0, "a3": 0.0, "c3": 1.0, "c4": 1.0, "a4": 0.0}

    (row,) = scorer_agreement(votes, {"rm": scores})

    pairs = {(pair["policy"], pair["opponent"]): pair for pair in row["pairs"]}
    assert set(pairs) == {("dpo", "sft"), ("best-of-4", "sft")}
    assert (pairs[("dpo", "sft")]["agree"], pairs[("dpo", "sft")]["votes"]) == (2, 2)
    assert (pairs[("best-of-4", "sft")]["agree"], pairs[("best-of-4", "sft")]["disagree"]) == (1, 1)
    assert row["agreement"] == 0.75


def test_no_scores_means_no_rows() -> None:
    assert scorer_agreement([decisive("a", "b")], {}) == []
