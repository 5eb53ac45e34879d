"""The whole loop, small: every stage runs for real (web server, database, Redis, a Celery worker,
the JSON API) and the reward model learns what the simulated labelers taught it.

The full-size run, with the goals against the truth on held-out problems, is `make loop`.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from annotation.models import Comparison, Judgment, Policy, Project
from training.demo.loop import Loop, LoopSettings, report_write
from training.models import DatasetBuild, GenerationJob, TrainingRun

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.worker,
    pytest.mark.slow,
    pytest.mark.timeout(1200),
]


@pytest.fixture(scope="module")
def loop_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.demo.model import demo_model_build, demo_model_is_complete
    from training.management.commands.simulate_loop import QUICK_MODEL

    # A model `simulate_loop --quick` built already (MODELS_DIR/demo-sft-quick, the same settings),
    # named here, saves building one on a busy machine.
    built = os.environ.get("LOOP_TEST_MODEL")
    if built and demo_model_is_complete(Path(built)):
        return Path(built)
    out_dir = tmp_path_factory.mktemp("loop") / "sft"
    demo_model_build(out_dir=out_dir, **QUICK_MODEL)
    return out_dir


def test_every_stage_of_the_loop_runs_and_the_reward_model_beats_chance(
    loop_model: Path, live_server, celery_worker: str, tmp_path: Path
):
    from training.management.commands.simulate_loop import (
        DPO_HYPERPARAMETERS,
        QUICK,
        QUICK_BEST_OF_N,
        QUICK_REWARD_HYPERPARAMETERS,
        QUICK_SFT_HYPERPARAMETERS,
    )
    from training.models import BestOfN

    # given a running server and worker, and a small SFT policy
    # (no RL run: its process is tested in test_sft_rl.py, its report and picture in test_loop_people.py)
    settings = LoopSettings(
        base_model=str(loop_model),
        base_url=live_server.url,
        out_dir=tmp_path,
        reward_hyperparameters=QUICK_REWARD_HYPERPARAMETERS,
        dpo_hyperparameters=DPO_HYPERPARAMETERS,
        sft_hyperparameters=QUICK_SFT_HYPERPARAMETERS,
        best_of_n=QUICK_BEST_OF_N,
        stage_timeout_s=600,
        poll_s=0.5,
        **QUICK,
    )

    # when the loop runs
    report = Loop(settings, say=lambda line: None).run()
    json_path, markdown_path = report_write(report, tmp_path)

    # then every stage ran, in order
    assert [stage.name for stage in report.stages] == [
        "generate",
        "label",
        "build",
        "train SFT on top-ranked",
        "train reward model",
        "train DPO policy",
        "generate held-out answers",
        "score reward model against truth",
        "blind A/B",
        "reward model on the A/B votes",
    ]
    assert set(GenerationJob.objects.values_list("status", flat=True)) == {GenerationJob.Status.SUCCEEDED}
    assert DatasetBuild.objects.get().status == DatasetBuild.Status.SUCCEEDED
    assert sorted(TrainingRun.objects.values_list("kind", "status")) == [
        ("dpo", "succeeded"),
        ("reward", "succeeded"),
        ("sft", "succeeded"),
    ]
    # the SFT run trained on the build's top-ranked completions, which share prompts with the pairs
    sft_run = TrainingRun.objects.get(kind="sft")
    assert sft_run.dataset_build.sft_in_preferences
    assert report.dataset_build["counts"]["sft"]["train"] > 0
    # and best-of-n is the existing policy kind: SFT's samples, the loop's reward model picking
    best_of_n = BestOfN.objects.get()
    assert best_of_n.n == QUICK_BEST_OF_N
    assert best_of_n.base_policy.name == report.policies["sft"]["policy"]
    assert best_of_n.reward_model.run.kind == "reward"
    assert best_of_n.policy.kind == Policy.Kind.BEST_OF_N

    # every training task was ranked once, through the API, as its C(4,2) comparisons
    train = Project.objects.get(name__endswith=": train")
    # (a prompt all of whose samples are one text gets no task: nothing to rank)
    assert report.labeling["judgments"] == train.tasks.count() >= 0.8 * QUICK["train_prompts"]
    assert Judgment.objects.filter(task__project=train).count() == train.tasks.count()
    # (a task shows up to K = 4 different texts: a prompt whose samples repeat gets a smaller one)
    pairs = sum(
        len(task.items.all()) * (len(task.items.all()) - 1) // 2
        for task in train.tasks.prefetch_related("items")
    )
    assert Comparison.objects.filter(judgment__task__project=train).count() == pairs

    # every policy answered every evaluation problem and was measured against the truth
    keys = ["sft", "sft_top", "dpo", "best_of_n"]
    for key in keys:
        measure = report.policies[key]
        assert measure["trials"] == QUICK["eval_prompts"], (key, measure)
        assert measure["low"] <= measure["value"] <= measure["high"]
        assert key == "sft" or "gain_points" in measure

    # one A/B session holds all four policies; every task got its vote, and nothing was left unanswered
    # (a prompt on which a pair wrote the same text is left out of the session: nothing to compare)
    session = Project.objects.get(kind=Project.Kind.AB)
    assert session.ab_policies.count() == len(keys)
    assert set(report.ab["names"]) == set(keys)
    assert 0 < report.ab["votes"] == session.tasks.count() <= QUICK["eval_prompts"]
    assert sum(row["votes"] for row in report.ab["pair_table"]) == report.ab["votes"]
    for key in keys[1:]:
        row = report.ab["versus_sft"][key]
        assert row["wins"] + row["losses"] + row["ties"] + row["both_bad"] == row["votes"]
    # Bradley–Terry ratings with intervals, for the policies that met in a vote
    rated = {row["policy"] for row in report.ab["ratings"]}
    assert rated and rated <= set(report.ab["names"].values())
    assert all(row["low"] <= row["high"] for row in report.ab["ratings"])

    # the reward model learned the labelers' preferences: on the training problems it scores the
    # right answer above a wrong one more often than a coin would
    seen = report.reward_model["accuracy_train_right_vs_wrong"]
    print("reward model on the training problems:", seen)
    assert seen["trials"] >= 30, seen
    assert seen["low"] > 0.5, seen
    # and it was attached to the A/B session, whose every completion a scoring job scored
    assert report.ab["reward_model_agreement"]["votes"] is not None

    # and the report is written, as JSON, Markdown and a picture beside them
    assert json.loads(json_path.read_text())["goals"]
    text = markdown_path.read_text()
    assert text.startswith("# Rankwise loop report")
    assert "## Recipes compared" in text and "| best-of-2 |" in text and "(loop-recipes.svg)" in text
    picture = ElementTree.parse(tmp_path / "loop-recipes.svg").getroot()  # noqa: S314 (written just now)
    assert picture.tag == "{http://www.w3.org/2000/svg}svg"


def test_the_label_efficiency_experiment_follows_the_uncertainty_order_and_compares_aggregations(
    loop_model: Path, live_server, celery_worker: str, tmp_path: Path
):
    from annotation.models import Task
    from training.demo.label_efficiency import LabelEfficiency, LabelEfficiencySettings
    from training.demo.label_efficiency import report_write as label_efficiency_write
    from training.management.commands.simulate_loop import QUICK, QUICK_REWARD_HYPERPARAMETERS
    from training.models import ScoringJob

    # given a running server and worker, and a small SFT policy
    settings = LoopSettings(
        base_model=str(loop_model),
        base_url=live_server.url,
        out_dir=tmp_path,
        reward_hyperparameters={**QUICK_REWARD_HYPERPARAMETERS, "num_train_epochs": 1},
        stage_timeout_s=600,
        poll_s=0.5,
        **QUICK,
    )
    plan = LabelEfficiencySettings(
        budgets=[6, 12], orders=["uncertainty"], seeds=[0], aggregation_check=True, aggregation_prompts=8
    )

    # when the experiment runs
    result = LabelEfficiency(settings, say=lambda line: None).experiment(plan)
    markdown = label_efficiency_write(result, tmp_path)

    # then a reward model was trained and measured at each budget
    assert [(p["order"], p["budget"]) for p in result["curves"]] == [("uncertainty", 6), ("uncertainty", 12)]
    assert all(p["trials"] > 0 for p in result["curves"])
    # and after the first six rankings the queue followed the first reward model's uncertainty
    project = Project.objects.get(task_order="uncertainty")
    assert ScoringJob.objects.get(project=project).status == ScoringJob.Status.SUCCEEDED
    judged = list(
        Judgment.objects.filter(task__project=project).order_by("id").values_list("task_id", flat=True)
    )
    first, second = judged[:6], judged[6:]
    open_after_first = Task.objects.filter(project=project).exclude(pk__in=first)
    least_sure = list(
        open_after_first.order_by("uncertainty", "random_rank").values_list("pk", flat=True)[:6]
    )
    assert second == least_sure
    # and the aggregation check built the same rankings both ways, with each labeler's reliability
    for check in result["aggregation"]:
        assert check["majority"]["trials"] == check["dawid_skene"]["trials"] == check["truth_pairs"] > 0
        assert {row["username"] for row in check["reliability"]} == {
            "loop-labeler-careful",
            "loop-labeler-average",
            "loop-labeler-hasty",
            "loop-labeler-coin",
        }
    text = markdown.read_text()
    assert "majority vs Dawid–Skene (overlap 2)" in text and (tmp_path / "label-efficiency.svg").exists()
