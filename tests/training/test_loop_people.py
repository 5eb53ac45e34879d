"""The simulated labelers and evaluators of `simulate_loop`: they judge by the known truth, with set noise."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from training.demo.loop import (
    evaluator_verdict,
    labeler_ranks,
    recipes_picture,
    report_markdown,
    seeds_markdown,
    seeds_summary,
    verdict_answer,
)
from training.demo.task import DemoProblem

PROBLEM = DemoProblem(
    id="p", prompt="Mia has 5 apples and buys 7 more. How many apples does Mia have now?", answer=12
)


def answer(value: int) -> str:
    return f"Mia has {value} apples. The answer is {value}."


def test_a_careful_labeler_ranks_right_answers_first_then_wrong_ones_then_none_with_ties_within():
    completions = {"a": answer(14), "b": answer(12), "c": answer(11), "d": "I do not know.", "e": answer(12)}

    ranks = labeler_ranks(PROBLEM, completions, noise=0.0, rng=random.Random(0))

    assert ranks == {"b": 1, "e": 1, "a": 2, "c": 2, "d": 3}


def test_without_a_right_answer_the_wrong_ones_still_beat_no_answer():
    completions = {"a": answer(14), "b": "No idea."}

    assert labeler_ranks(PROBLEM, completions, noise=0.0, rng=random.Random(0)) == {"a": 1, "b": 2}


def test_a_noisy_labeler_ranks_at_random_about_as_often_as_its_noise_says():
    completions = {"a": answer(12), "b": answer(13), "c": "?", "d": answer(20)}
    honest = {"a": 1, "b": 2, "c": 3, "d": 2}
    rng = random.Random(1)

    rankings = [labeler_ranks(PROBLEM, completions, noise=0.3, rng=rng) for _ in range(4000)]

    # a random order has no ties, so it never equals the honest one
    off = sum(ranks != honest for ranks in rankings) / len(rankings)
    assert off == pytest.approx(0.3, abs=0.03)
    assert all(sorted(ranks.values()) in ([1, 2, 3, 4], [1, 2, 2, 3]) for ranks in rankings)


@pytest.mark.parametrize(
    ("left", "right", "verdict"),
    [(12, 13, "left"), (9, 12, "right"), (12, 12, "tie"), (10, 13, "both_bad")],
)
def test_a_careful_evaluator_prefers_the_right_answer(left: int, right: int, verdict: str):
    assert evaluator_verdict(PROBLEM, answer(left), answer(right), noise=0.0, rng=random.Random(0)) == verdict


def test_verdicts_become_the_judgment_the_ab_page_would_send():
    assert verdict_answer("left", "L", "R") == {
        "ranks": {"L": 1, "R": 2},
        "none_acceptable": False,
        "strength": 2,
    }
    assert verdict_answer("right", "L", "R")["ranks"] == {"L": 2, "R": 1}
    assert verdict_answer("tie", "L", "R") == {
        "ranks": {"L": 1, "R": 1},
        "none_acceptable": False,
        "strength": None,
    }
    assert verdict_answer("both_bad", "L", "R") == {"ranks": {}, "none_acceptable": True, "strength": None}


def measure(successes: int, trials: int) -> dict[str, object]:
    return {"value": successes / trials, "successes": successes, "trials": trials, "low": 0.4, "high": 0.9}


def test_the_markdown_report_puts_the_goals_first_and_says_which_were_missed():
    report = {
        "settings": {
            "train_prompts": 600,
            "k": 4,
            "temperature": 1.0,
            "heldout_prompts": 150,
            "eval_prompts": 300,
            "base_model": "var/models/demo-sft",
            "seed": 0,
        },
        "goals": [
            {
                "goal": "reward model picks the right answer over a wrong one (held-out)",
                "target": "≥ 75%",
                "reached": 0.8,
                "met": True,
            },
            {
                "goal": "DPO accuracy minus SFT accuracy (held-out)",
                "target": "≥ +10 points",
                "reached": 4.0,
                "met": False,
            },
            {
                "goal": "A/B win rate of DPO over SFT, 95% interval",
                "target": "lower bound > 50%",
                "reached": [0.45, 0.7],
                "met": False,
            },
            {"goal": "whole loop on this machine", "target": "< 20 minutes", "reached": 900.0, "met": True},
        ],
        "reward_model": {
            "accuracy_right_vs_wrong": measure(80, 100),
            "accuracy_nearer_vs_farther": measure(150, 200),
            "accuracy_train_right_vs_wrong": measure(90, 100),
            "run_metrics": {"pairwise_accuracy": 0.7, "tie_rate": 0.3},
        },
        "policies": {"sft": measure(30, 100), "dpo": measure(34, 100), "gain_points": 4.0},
        "ab": {
            "votes": 100,
            "dpo_wins": 20,
            "sft_wins": 15,
            "ties": 30,
            "both_bad": 35,
            "dpo_win_rate": measure(20, 35),
            "position_bias": {"left_share": 0.5, "low": 0.3, "high": 0.7},
            "ratings": [{"policy": "loop dpo", "rating": 1010.0, "low": 990.0, "high": 1030.0}],
            "names": {"sft": "loop sft", "dpo": "loop dpo"},
            "evaluators": [{"name": "careful", "noise": 0.05, "votes": 100}],
        },
        "labeling": {"labelers": [{"name": "careful", "noise": 0.05, "judgments": 10, "matches_truth": 9}]},
        "stages": [{"name": "generate", "seconds": 12.5}],
        "total_seconds": 900.0,
    }

    text = report_markdown(report)

    assert text.index("## Goals") < text.index("## Reward model")
    assert "| DPO accuracy minus SFT accuracy (held-out) | ≥ +10 points | +4.0 points | **no** |" in text
    assert "| reward model picks the right answer over a wrong one (held-out) | ≥ 75% | 80.0% | yes |" in text
    assert "| whole loop on this machine | < 20 minutes | 15.0 min | yes |" in text
    assert "45.0%–70.0%" in text
    assert "| DPO | 1010 | 990–1030 |" in text


def seed_report(seed: int, *, rl_right: int) -> dict[str, object]:
    """A two-seed loop's report for one seed: five policies, one A/B session, the RL watch."""
    keys = ("sft", "sft_top", "dpo", "rl", "best_of_n")
    right = {"sft": 60, "sft_top": 70, "dpo": 80, "rl": rl_right, "best_of_n": 75}
    policies: dict[str, object] = {
        key: {**measure(right[key], 100), "gain_points": None if key == "sft" else float(right[key] - 60)}
        for key in keys
    }
    names = {key: f"loop s{seed} {key}" for key in keys}
    versus = {
        key: {
            "wins": 12,
            "losses": 4,
            "ties": 3,
            "both_bad": 1,
            "votes": 20,
            "win_rate": {**measure(12, 16), "low": 0.5, "high": 0.9},
        }
        for key in keys[1:]
    }
    return {
        "settings": {"seed": seed},
        "policies": policies,
        "best_of_n": {"n": 8, "temperature": 1.0},
        "ab": {
            "names": names,
            "versus_sft": versus,
            "ratings": [
                {"policy": names[key], "rating": 900.0 + 10 * index, "low": 880.0, "high": 960.0}
                for index, key in enumerate(keys)
            ],
        },
        "rl_watch": [
            {"step": 10, "kl": 0.1, "proxy_reward": 0.2, "true_score": 0.6},
            {"step": 20, "kl": 0.4, "proxy_reward": 0.9, "true_score": 0.7},
        ],
        "goals": [
            {
                "goal": "RL accuracy minus SFT accuracy (held-out)",
                "target": "≥ +10 points",
                "reached": float(rl_right - 60),
                "met": rl_right >= 70,
            }
        ],
        "stages": [{"name": "generate", "seconds": 10.0 + seed}],
        "total_seconds": 300.0,
    }


def test_two_seeds_are_reported_side_by_side_with_both_seeds_pooled(tmp_path: Path):
    reports = [seed_report(0, rl_right=72), seed_report(1, rl_right=66)]

    summary = seeds_summary(reports, total_seconds=660.0)
    text = seeds_markdown(summary, picture="loop-recipes.svg")

    # pooled over both seeds' problems, and the mean gain over SFT
    assert summary["policies"]["rl"]["pooled"]["successes"] == 138
    assert summary["policies"]["rl"]["pooled"]["trials"] == 200
    assert summary["policies"]["rl"]["mean_gain_points"] == 9.0
    assert "| RL (RLOO) | 72.0% (40.0%–90.0%) | 66.0% (40.0%–90.0%) | 69.0% (" in text
    assert "| best-of-8 |" in text
    assert (
        "| RL accuracy minus SFT accuracy (held-out) | ≥ +10 points | +12.0 points (met) | +6.0 points (**not met**) |"
        in text
    )
    assert "| generate | 10.0 | 11.0 |" in text
    assert (
        "one seed after the other; 11.0 minutes in all, the stack's start included (goal: under 20: met)"
        in text
    )
    assert "## Over-optimisation, seed 1" in text and "| 20 | 0.400 | 0.900 | 70.0% |" in text


def test_seeds_run_side_by_side_say_so_and_their_goal_is_the_whole_wall_time():
    reports = [seed_report(0, rl_right=72), seed_report(1, rl_right=66)]

    text = seeds_markdown(seeds_summary(reports, total_seconds=1260.0, at_once=2))

    assert "2 seeds at a time, side by side, the gpu worker running 2 jobs at once" in text
    assert "21.0 minutes in all, the stack's start included (goal: under 20: **not met**)" in text


def test_the_picture_is_an_svg_of_the_accuracies_and_the_over_optimisation_curve(tmp_path: Path):
    path = tmp_path / "loop-recipes.svg"

    recipes_picture([seed_report(0, rl_right=72), seed_report(1, rl_right=66)], path)

    root = ElementTree.parse(path).getroot()  # noqa: S314 (written just now)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = path.read_text()
    # (matplotlib draws text as paths and names it in a comment beside them)
    assert "KL to SFT" in text and "best-of-8" in text
