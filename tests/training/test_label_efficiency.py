"""The label-efficiency measures: pair labels against the truth, the learning-curve summary, the report."""

from __future__ import annotations

from pathlib import Path

from training.demo.label_efficiency import (
    LabelEfficiencySettings,
    curve_summary,
    pair_label_agreement,
    report_markdown,
    report_write,
    results_merge,
)
from training.demo.task import DemoProblem

SUM = DemoProblem(id="p1", prompt="Mia has 7 apples and gets 5 more. How many?", answer=12)
TRUTH = {SUM.prompt: SUM}
RIGHT, WRONG, NONE = "The answer is 12.", "The answer is 13.", "Apples are red."
# (prompt, a, b) -> index of the better of a and b, for every pair whose grades differ
PAIRS = {(SUM.prompt, RIGHT, WRONG): 0, (SUM.prompt, WRONG, NONE): 0, (SUM.prompt, NONE, RIGHT): 1}


def row(chosen: str, rejected: str) -> dict[str, str]:
    return {"prompt": f"User: {SUM.prompt}\n\nAssistant:\n", "chosen": chosen, "rejected": rejected}


def test_a_build_agrees_with_the_truth_only_on_the_pairs_it_labels_the_truths_way() -> None:
    rows = [row(RIGHT, WRONG), row(NONE, WRONG)]  # one right, one wrong, one pair without a row
    measure = pair_label_agreement(rows, PAIRS, TRUTH)
    assert (measure["successes"], measure["trials"]) == (1, 3)
    assert measure["rows_with_truth"] == 2 and measure["precision"] == 0.5


def test_conversational_rows_are_read_too_and_rows_without_a_truth_are_ignored() -> None:
    conversational = {
        "prompt": [{"role": "user", "content": SUM.prompt}],
        "chosen": [{"role": "assistant", "content": RIGHT}],
        "rejected": [{"role": "assistant", "content": NONE}],
    }
    tie_of_two_wrong = row(WRONG, "The answer is 14.")
    measure = pair_label_agreement([conversational, tie_of_two_wrong], PAIRS, TRUTH)
    assert (measure["successes"], measure["rows_with_truth"]) == (1, 1)


def plan() -> LabelEfficiencySettings:
    return LabelEfficiencySettings(budgets=[100, 200, 400], orders=["random", "uncertainty"], seeds=[0, 1])


def point(order: str, seed: int, budget: int, value: float) -> dict[str, object]:
    return {
        "order": order,
        "seed": seed,
        "budget": budget,
        "value": value,
        "low": value - 0.05,
        "high": value + 0.05,
        "run": 1,
    }


def curves(uncertainty: list[float]) -> list[dict[str, object]]:
    random_values = [0.6, 0.7, 0.8]
    return [
        point(order, seed, budget, value)
        for seed in (0, 1)
        for order, values in (("random", random_values), ("uncertainty", uncertainty))
        for budget, value in zip((100, 200, 400), values, strict=True)
    ]


def test_the_summary_finds_the_budget_where_uncertainty_reaches_randoms_best() -> None:
    summary = curve_summary(curves([0.65, 0.81, 0.85]), plan())
    assert summary["target"] == 0.8
    assert summary["uncertainty_budget_needed"] == 200
    assert summary["label_share"] == 0.5 and summary["met"]
    # read between the points: 0.65 at 100, 0.81 at 200 cross 0.8 at 100 + 100 × 0.15 / 0.16
    assert round(summary["crossing"], 2) == 193.75
    assert summary["per_seed"][0]["uncertainty_budget_needed"] == 200


def test_each_seed_is_judged_alone_too() -> None:
    points = curves([0.65, 0.81, 0.85])
    for p in points:  # seed 1's uncertainty only gets there at the largest budget
        if p["seed"] == 1 and p["order"] == "uncertainty" and p["budget"] == 200:
            p["value"] = 0.75
    summary = curve_summary(points, plan())
    assert summary["uncertainty_budget_needed"] == 400 and not summary["met"]  # mean at 200: 0.78
    assert summary["per_seed"][0]["met"] and not summary["per_seed"][1]["met"]


def test_a_budget_not_measured_for_every_seed_yet_has_no_mean() -> None:
    points = [p for p in curves([0.65, 0.81, 0.85]) if not (p["seed"] == 1 and p["budget"] == 400)]
    summary = curve_summary(points, plan())
    assert 400 not in summary["means"]["random"] and "target" not in summary


def test_runs_of_one_seed_each_merge_into_one_report() -> None:
    points = curves([0.65, 0.81, 0.85])
    runs = [
        {
            "settings": {**plan().__dict__, "seeds": [seed]},
            "k": 4,
            "curves": [p for p in points if p["seed"] == seed],
            "stages": [{"name": "generate", "seconds": 1.0}],
        }
        for seed in (1, 0)
    ]
    runs[0]["aggregation"] = [{"overlap": 2}]
    merged = results_merge(runs)
    assert merged["settings"]["seeds"] == [0, 1] and len(merged["curves"]) == 12
    assert merged["curves"][0]["seed"] == 0 and merged["aggregation"] == [{"overlap": 2}]
    assert merged["curve_summary"] == curve_summary(points, plan())
    assert [stage["name"] for stage in merged["stages"]] == ["run 1: generate", "run 2: generate"]


def test_the_summary_says_so_when_uncertainty_never_gets_there() -> None:
    summary = curve_summary(curves([0.6, 0.7, 0.75]), plan())
    assert summary["uncertainty_budget_needed"] is None and not summary["met"]


def test_the_report_has_the_tables_the_goal_and_a_picture(tmp_path: Path) -> None:
    result = {
        "settings": plan().__dict__,
        "k": 4,
        "curves": curves([0.65, 0.81, 0.85]),
        "stages": [{"name": "generate", "seconds": 1.0}],
    }
    result["curves"][2]["rankings"] = 380  # random, seed 0, budget 400: the pool ran out first
    result["curve_summary"] = curve_summary(result["curves"], plan())
    markdown = report_write(result, tmp_path)
    text = markdown.read_text()
    assert "| 200 | 70.0% | 81.0% |" in text
    assert "reached at 200 rankings (50%); the line between the budgets crosses it at about 194 (48%" in text
    assert "**met**" in text and "Seed 1 alone" in text
    assert "| random | 0 | 400 (380 made: pool exhausted) | 80.0% |" in text
    svg = (tmp_path / "label-efficiency.svg").read_text()
    assert svg.startswith("<?xml") and "held-out accuracy" in svg
    assert "label-efficiency.svg" in report_markdown(result)
