"""Evaluation metrics for reward models and DPO policies: pure functions on numbers.

Nothing here knows about models or files; the runner scores the test split and
hands the rewards in, so every number can be checked against a hand computation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np
from scipy import stats

# Two rewards closer than this count as a tie. Float32 rewards of the same text
# differ by ~1e-7 between batch layouts (padding changes the kernels), so a
# tighter threshold would call the same score two different ones; a looser one
# would hide real, if small, preferences.
TIE_TOLERANCE = 1e-6
ECE_BINS = 10


def _rewards_pair(
    rewards_chosen: Sequence[float], rewards_rejected: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    chosen = np.asarray(rewards_chosen, dtype=np.float64)
    rejected = np.asarray(rewards_rejected, dtype=np.float64)
    if chosen.shape != rejected.shape or chosen.ndim != 1:
        raise ValueError(
            f"rewards_chosen and rewards_rejected must be flat and of equal length, got {chosen.shape} and {rejected.shape}"
        )
    if chosen.size == 0:
        raise ValueError("there are no pairs to evaluate")
    return chosen, rejected


def pairwise_accuracy(rewards_chosen: Sequence[float], rewards_rejected: Sequence[float]) -> float:
    """The share of pairs whose chosen completion gets the strictly higher reward.

    A tie is not a correct answer: the model did not prefer the chosen side.
    """
    chosen, rejected = _rewards_pair(rewards_chosen, rewards_rejected)
    return float(np.mean(chosen > rejected))


def tie_rate(
    rewards_chosen: Sequence[float], rewards_rejected: Sequence[float], *, tolerance: float = TIE_TOLERANCE
) -> float:
    """The share of pairs the reward model cannot tell apart (|r_chosen − r_rejected| < tolerance).

    Ties come from identical texts, from texts that tokenize to the same ids,
    or from a head that has collapsed to a constant. They count as wrong in
    `pairwise_accuracy`, so this says how much of its shortfall is indecision
    rather than a wrong order.
    """
    chosen, rejected = _rewards_pair(rewards_chosen, rewards_rejected)
    return float(np.mean(np.abs(chosen - rejected) < tolerance))


def mean_margin(rewards_chosen: Sequence[float], rewards_rejected: Sequence[float]) -> float:
    """The mean of r_chosen − r_rejected over the pairs."""
    chosen, rejected = _rewards_pair(rewards_chosen, rewards_rejected)
    return float(np.mean(chosen - rejected))


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[float], *, n_bins: int = ECE_BINS
) -> float:
    """ECE over `n_bins` equal-width bins of confidence (Guo et al., 2017, eq. 3).

    Bin b holds the confidences in (b/n, (b+1)/n] (the first bin also takes
    0); ECE = Σ_b |B_b|/N · |mean(correct in B_b) − mean(confidence in B_b)|.
    `correct` may be fractional (0.5 for a coin flip).
    """
    conf = np.asarray(confidences, dtype=np.float64)
    hits = np.asarray(correct, dtype=np.float64)
    if conf.shape != hits.shape or conf.ndim != 1:
        raise ValueError("confidences and correct must be flat and of equal length")
    if conf.size == 0:
        raise ValueError("there is nothing to calibrate")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    # ceil(c·n) − 1 puts c in (b/n, (b+1)/n]; clip sends 0 to the first bin.
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            total += in_bin.sum() / conf.size * abs(hits[in_bin].mean() - conf[in_bin].mean())
    return float(total)


def preference_probabilities(
    rewards_chosen: Sequence[float], rewards_rejected: Sequence[float]
) -> np.ndarray:
    """P(chosen ≻ rejected) = sigmoid(r_chosen − r_rejected), the Bradley–Terry model the loss fits."""
    chosen, rejected = _rewards_pair(rewards_chosen, rewards_rejected)
    return 1.0 / (1.0 + np.exp(-(chosen - rejected)))


def pairwise_calibration_error(
    rewards_chosen: Sequence[float], rewards_rejected: Sequence[float], *, n_bins: int = ECE_BINS
) -> float:
    """ECE of the reward model's P(chosen ≻ rejected) on pairs whose human answer is "chosen".

    Every label says "chosen wins", so binning p itself against the labels
    would reduce to 1 − mean(p) and call a model that is always certain
    perfectly calibrated. The standard top-label form is used instead: the
    model predicts the side with p > 0.5, its confidence is max(p, 1 − p),
    and the prediction is right when that side is the chosen one (p = 0.5
    predicts neither and scores 0.5). Only bins (0.4, 0.5] to (0.9, 1.0] can
    fill, as confidence is at least 0.5.
    """
    p = preference_probabilities(rewards_chosen, rewards_rejected)
    confidence = np.maximum(p, 1.0 - p)
    correct = np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))
    return expected_calibration_error(confidence, correct, n_bins=n_bins)


def kendall_tau_b(rewards: Sequence[float], ranks: Sequence[float]) -> float:
    """Kendall's tau-b between a reward ordering and human ranks (1 = best, equal = tie).

    +1 when higher rewards always go with better (lower) ranks. NaN when
    either side is constant, where no order exists to agree with.
    """
    scores = np.asarray(rewards, dtype=np.float64)
    human = np.asarray(ranks, dtype=np.float64)
    if scores.shape != human.shape or scores.ndim != 1:
        raise ValueError("rewards and ranks must be flat and of equal length")
    if scores.size < 2 or np.all(scores == scores[0]) or np.all(human == human[0]):
        return math.nan
    # Negated ranks so that "better" points the same way on both sides.
    return float(stats.kendalltau(scores, -human, variant="b").statistic)


def mean_kendall_tau_per_prompt(
    groups: Sequence[tuple[Hashable, Sequence[float], Sequence[float]]],
) -> float:
    """The mean over prompts of Kendall's tau-b between rewards and human ranks.

    `groups` holds (prompt key, rewards, ranks), one per grouped row. Several
    judgments of one prompt are averaged first, so a prompt ranked often does
    not outweigh the rest. Rows whose tau is undefined (all ranks or all
    rewards equal) are left out; NaN when none is left.
    """
    per_prompt: dict[Hashable, list[float]] = defaultdict(list)
    for key, rewards, ranks in groups:
        tau = kendall_tau_b(rewards, ranks)
        if not math.isnan(tau):
            per_prompt[key].append(tau)
    if not per_prompt:
        return math.nan
    return float(np.mean([np.mean(taus) for taus in per_prompt.values()]))


def reward_model_metrics(
    rewards_chosen: Sequence[float], rewards_rejected: Sequence[float], *, n_bins: int = ECE_BINS
) -> dict[str, float]:
    """The reward model's pairwise metrics under the names a run reports."""
    return {
        "pairwise_accuracy": pairwise_accuracy(rewards_chosen, rewards_rejected),
        "tie_rate": tie_rate(rewards_chosen, rewards_rejected),
        "mean_margin": mean_margin(rewards_chosen, rewards_rejected),
        "ece": pairwise_calibration_error(rewards_chosen, rewards_rejected, n_bins=n_bins),
    }
