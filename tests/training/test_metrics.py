"""Evaluation metrics on cases small enough to compute by hand."""

from __future__ import annotations

import math

import pytest

from training.metrics import (
    expected_calibration_error,
    kendall_tau_b,
    mean_kendall_tau_per_prompt,
    mean_margin,
    pairwise_accuracy,
    pairwise_calibration_error,
    preference_probabilities,
    reward_model_metrics,
    tie_rate,
)

# r_chosen − r_rejected: 1, −5e-7 (a tie), −0.5, 0 (a tie).
CHOSEN = [1.0, 2.0, 0.5, 3.0]
REJECTED = [0.0, 2.0 + 5e-7, 1.0, 3.0]


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_pairwise_accuracy_counts_only_strict_wins_for_the_chosen_side() -> None:
    assert pairwise_accuracy(CHOSEN, REJECTED) == 0.25


def test_tie_rate_counts_pairs_closer_than_a_millionth() -> None:
    assert tie_rate(CHOSEN, REJECTED) == 0.5


def test_mean_margin_is_the_mean_reward_difference() -> None:
    assert mean_margin(CHOSEN, REJECTED) == pytest.approx((1.0 - 5e-7 - 0.5 + 0.0) / 4, abs=1e-12)


def test_preference_probabilities_are_the_sigmoid_of_the_margin() -> None:
    assert list(preference_probabilities([0.0, logit(0.8)], [0.0, 0.0])) == pytest.approx([0.5, 0.8])


def test_ece_weighs_each_bins_gap_between_accuracy_and_confidence_by_its_size() -> None:
    # Bins (0.0, 0.1] and (0.1, 0.2]: 0.1 belongs to the first.
    # ½·|0 − 0.1| + ½·|1 − 0.2| = 0.05 + 0.4
    assert expected_calibration_error([0.1, 0.2], [0, 1]) == pytest.approx(0.45)


def test_ece_is_zero_when_confidence_matches_accuracy_in_every_bin() -> None:
    assert expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)


def test_pairwise_ece_uses_the_confidence_of_the_side_the_model_prefers() -> None:
    # p = 0.95, 0.95 (right), 0.75 (right), 0.25 (wrong, confidence 0.75), 0.55 (right)
    margins = [logit(p) for p in (0.95, 0.95, 0.75, 0.25, 0.55)]
    # bin (0.9, 1]: 2/5·|1 − 0.95|; bin (0.7, 0.8]: 2/5·|½ − 0.75|; bin (0.5, 0.6]: 1/5·|1 − 0.55|
    expected = 0.4 * 0.05 + 0.4 * 0.25 + 0.2 * 0.45

    assert pairwise_calibration_error(margins, [0.0] * 5) == pytest.approx(expected)


def test_pairwise_ece_scores_an_undecided_pair_as_half_right() -> None:
    # p = 0.5 exactly: confidence 0.5, correct 0.5, no gap
    assert pairwise_calibration_error([1.0], [1.0]) == pytest.approx(0.0)


def test_kendall_tau_is_one_when_higher_rewards_go_with_better_ranks() -> None:
    assert kendall_tau_b([3.0, 2.0, 1.0], [1, 2, 3]) == pytest.approx(1.0)


def test_kendall_tau_counts_concordant_minus_discordant_pairs() -> None:
    # (0,1) and (0,2) agree, (1,2) disagrees: (2 − 1) / 3
    assert kendall_tau_b([3.0, 2.0, 1.0], [1, 3, 2]) == pytest.approx(1 / 3)


def test_kendall_tau_b_corrects_for_tied_human_ranks() -> None:
    # C = 2, D = 0; pairs untied in rewards 3, in ranks 2: 2 / √(3·2)
    assert kendall_tau_b([3.0, 2.0, 1.0], [1, 1, 2]) == pytest.approx(2 / math.sqrt(6))


def test_kendall_tau_is_undefined_when_all_rewards_are_equal() -> None:
    assert math.isnan(kendall_tau_b([1.0, 1.0, 1.0], [1, 2, 3]))


def test_mean_kendall_tau_averages_judgments_within_a_prompt_first() -> None:
    groups = [
        ("a", [3.0, 2.0, 1.0], [1, 2, 3]),  # 1
        ("a", [3.0, 2.0, 1.0], [1, 3, 2]),  # 1/3
        ("b", [1.0, 2.0, 3.0], [1, 2, 3]),  # −1
        ("c", [1.0, 1.0, 1.0], [1, 2, 3]),  # undefined, left out
    ]

    assert mean_kendall_tau_per_prompt(groups) == pytest.approx(((1 + 1 / 3) / 2 - 1) / 2)


def test_mean_kendall_tau_is_nan_when_no_prompt_has_an_order() -> None:
    assert math.isnan(mean_kendall_tau_per_prompt([("a", [1.0, 1.0], [1, 2])]))


def test_reward_model_metrics_use_the_names_a_run_reports() -> None:
    assert set(reward_model_metrics(CHOSEN, REJECTED)) == {
        "pairwise_accuracy",
        "tie_rate",
        "mean_margin",
        "ece",
    }


def test_metrics_refuse_mismatched_or_empty_inputs() -> None:
    with pytest.raises(ValueError, match="equal length"):
        pairwise_accuracy([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no pairs"):
        mean_margin([], [])
