"""How many human rankings a reward model needs, by task order, and what labeler-aware aggregation buys.

`manage.py simulate_loop --label-budget 100,200,400,800 --order random,uncertainty --seeds 0,1`
(and `--aggregation-check`) runs these experiments on the demo task instead of the whole loop, with the
same stack: generation and scoring jobs and reward runs on the `gpu` queue, simulated labelers over the API.

Learning curve (per seed, per order)
    1. One pool of SFT samples (K per training problem) is generated once; each (order, seed) gets
       its own ranking project holding a copy of the pool, overlap 1, served in that order, with
       random ranks drawn from the seed.
    2. For each budget in ascending order, the simulated labelers (taking turns, over the API) rank
       until the project holds that many rankings; a dataset build of everything ranked so far feeds
       a reward run; the reward model's accuracy against the truth is measured on held-out problems
       (right answer scored above a wrong one), as in the whole loop.
    3. With the uncertainty order, that reward model is then attached to the project (a scoring job),
       so the next rankings go to the tasks it is least sure about. The first budget is served in
       random order under both orders (nothing has scored the tasks yet).
    Epochs scale with the budget so that every run takes about as many optimizer steps.
    Goal: uncertainty reaches random's accuracy at the largest budget with at most 60% of its labels
    (mean over seeds).

Aggregation check
    The simulated labelers plus one who answers at random half of the time rank the first problems
    with overlap 2 and then 3; the same rankings are built with majority and with Dawid–Skene. Over
    every pair of a task whose answers differ in grade (right, wrong, no number), a build's label
    agrees with the truth when it has a row for the pair and its chosen side is the better grade;
    a pair without a row agrees with nothing. Goal: Dawid–Skene ≥ majority + 5 points.

Measurement is not product: the truth is known only here.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.db import transaction

from annotation.ab_stats import wilson_interval
from annotation.models import Completion, Membership, Project, Prompt, Task
from annotation.roles import Role
from annotation.services import prompt_copy, tasks_create_for_project
from config.storage import storage_path_resolve
from training.demo.loop import (
    LABELERS,
    ApiClient,
    Loop,
    LoopFailed,
    _interval_dict,
    _percent,
    answer_grade,
    labeler_ranks,
)
from training.demo.task import DemoProblem
from training.models import DatasetBuild
from training.selectors import dataset_build_dir

# A labeler who does not check half of the time, for the aggregation check.
CARELESS: tuple[str, float] = ("coin", 0.5)
AGGREGATION_OVERLAPS = (2, 3)
# Optimizer steps every reward run of the learning curve aims at (epochs = steps × batch / rankings).
TARGET_STEPS = 600
MAX_EPOCHS = 80
LABEL_SHARE_GOAL = 0.6
AGGREGATION_GAIN_GOAL_POINTS = 5.0


@dataclass
class LabelEfficiencySettings:
    budgets: list[int] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    aggregation_check: bool = False
    aggregation_prompts: int = 300

    def validate(self) -> None:
        if self.budgets and (sorted(set(self.budgets)) != self.budgets or self.budgets[0] < 1):
            raise ValueError("label budgets must be increasing positive numbers, e.g. 100,200,400,800")
        unknown = sorted(set(self.orders) - set(Project.TaskOrder.values))
        if unknown:
            raise ValueError(f"unknown task order(s) {unknown}; choose from {Project.TaskOrder.values}")
        if self.budgets and not self.orders:
            raise ValueError("a learning curve needs at least one task order")


class LabelEfficiency(Loop):
    """The experiments above; `experiment()` returns their report (also written as JSON, Markdown, SVG)."""

    def experiment(self, plan: LabelEfficiencySettings) -> dict[str, Any]:
        plan.validate()
        settings = self.settings
        with transaction.atomic():
            self._manager_and_sft()
            self.pool = self._project("pool", problems=self.train, k=settings.k)
            self.heldout_project = self._project("held-out", problems=self.heldout, k=settings.k)
        self.api = ApiClient(settings.base_url, self.manager_token)
        self.labelers = {
            name: self._person(f"labeler-{name}", Role.LABELER) for name, _noise in (*LABELERS, CARELESS)
        }
        with self.stage("generate"):
            for project in (self.pool, self.heldout_project):
                self._generate(
                    policy=self.sft, project=project, n=settings.k, temperature=settings.temperature
                )
        result: dict[str, Any] = {"settings": {**plan.__dict__}, "k": settings.k}
        if plan.budgets:
            result["curves"] = self._learning_curves(plan)
            result["curve_summary"] = curve_summary(result["curves"], plan)
        if plan.aggregation_check:
            with self.stage("aggregation check"):
                result["aggregation"] = [
                    self._aggregation_check(overlap, plan.aggregation_prompts)
                    for overlap in AGGREGATION_OVERLAPS
                ]
        result["stages"] = [stage.__dict__ for stage in self.report.stages]
        return result

    # -- learning curves --

    def _learning_curves(self, plan: LabelEfficiencySettings) -> list[dict[str, Any]]:
        points = []
        for seed, order in itertools.product(plan.seeds, plan.orders):
            project = self._copy_pool(f"{order} seed {seed}", order=order, seed=seed, overlap=1)
            rngs = {name: random.Random(f"{seed}:labeler:{name}") for name, _ in LABELERS}  # noqa: S311
            for budget in plan.budgets:
                with self.stage(f"{order}, seed {seed}: label to {budget}"):
                    self._label_until(project, budget=budget, people=list(LABELERS), rngs=rngs)
                with self.stage(f"{order}, seed {seed}: reward model on {budget}"):
                    build = self._build(
                        self.api,
                        project=project,
                        name=f"{project.name} {budget}",
                        test_fraction=0.0,
                        seed=seed,
                    )
                    run = self._train(
                        self.api,
                        build=build,
                        kind="reward",
                        hyperparameters=self._scaled(budget),
                        name=f"{project.name} {budget}",
                    )
                    accuracy = self._heldout_accuracy(run)
                points.append({"seed": seed, "order": order, "budget": budget, "run": run["id"], **accuracy})
                self.say(f"  {order}, seed {seed}, {budget} rankings: {_percent(accuracy['value'])}")
                if order == Project.TaskOrder.UNCERTAINTY and budget != plan.budgets[-1]:
                    with self.stage(f"{order}, seed {seed}: score the queue after {budget}"):
                        self._score(project, reward_model_id=run["reward_model"], what="scoring the queue")
        return points

    def _scaled(self, rankings: int) -> dict[str, Any]:
        hyperparameters = dict(self.settings.reward_hyperparameters)
        batch = int(hyperparameters.get("per_device_train_batch_size", 8))
        epochs = math.ceil(TARGET_STEPS * batch / max(rankings, 1))
        hyperparameters["num_train_epochs"] = max(
            int(hyperparameters.get("num_train_epochs", 1)), min(epochs, MAX_EPOCHS)
        )
        return hyperparameters

    def _heldout_accuracy(self, run: dict[str, Any]) -> dict[str, Any]:
        from training.models import RewardModel
        from training.scoring import reward_model_load

        reward_model = RewardModel.objects.get(pk=run["reward_model"])
        tokenizer, model = reward_model_load(storage_path_resolve(reward_model.path))
        right_vs_wrong, _nearer = self._pair_accuracy(tokenizer, model, self.heldout_project)
        return right_vs_wrong

    # -- projects and people --

    def _copy_pool(
        self, name: str, *, order: str, seed: int, overlap: int, limit: int | None = None
    ) -> Project:
        """A ranking project holding a copy of the pool's prompts and SFT samples, served in `order`."""
        with transaction.atomic():
            project = Project.objects.create(
                name=f"Loop {self.tag}: {name}",
                kind=Project.Kind.RANKING,
                k=self.settings.k,
                overlap=overlap,
                ties_allowed=True,
                task_order=order,
                instructions=self.pool.instructions,
                created_by=self.manager,
            )
            Membership.objects.create(project=project, user=self.manager, role=Role.MANAGER)
            for user, _token in self.labelers.values():
                Membership.objects.create(project=project, user=user, role=Role.LABELER)
            sources = list(
                self.pool.prompts.order_by("id")[:limit] if limit else self.pool.prompts.order_by("id")
            )
            copies = Prompt.objects.bulk_create(
                prompt_copy(source=source, project=project) for source in sources
            )
            copy_of = {source.pk: copy for source, copy in zip(sources, copies, strict=True)}
            Completion.objects.bulk_create(
                Completion(
                    prompt=copy_of[completion.prompt_id],
                    policy=completion.policy,
                    text=completion.text,
                    generation_settings=completion.generation_settings,
                )
                for completion in Completion.objects.filter(prompt__in=sources, policy=self.sft).order_by(
                    "id"
                )
            )
            tasks_create_for_project(project=project)
            draw = random.Random(f"{seed}:order")  # noqa: S311 (simulation, not secrets)
            tasks = list(Task.objects.filter(project=project).order_by("id"))
            for task in tasks:
                task.random_rank = draw.random()
            Task.objects.bulk_update(tasks, ["random_rank"])
        return project

    def _label_until(
        self,
        project: Project,
        *,
        budget: int | None,
        people: list[tuple[str, float]],
        rngs: dict[str, random.Random],
    ) -> int:
        """The people take turns claiming and ranking over the API until `budget` rankings (or none left)."""
        done = Task.objects.filter(project=project).values_list("judgment_count", flat=True)
        count = sum(done)
        finished: set[str] = set()
        turn = itertools.cycle(people)
        clients = {name: ApiClient(self.settings.base_url, self.labelers[name][1]) for name, _noise in people}
        while (budget is None or count < budget) and len(finished) < len(people):
            name, noise = next(turn)
            if name in finished:
                continue
            api = clients[name]
            status, assignment = api.request("POST", f"/api/projects/{project.pk}/next")
            if status == 204:
                finished.add(name)
                continue
            if status != 200:
                raise LoopFailed(f"labeler {name}: claim answered {status}: {assignment}")
            problem = self.truth[assignment["prompt"]["messages"][0]["content"]]
            completions = {c["id"]: c["text"] for c in assignment["completions"]}
            ranks = labeler_ranks(problem, completions, noise=noise, rng=rngs[name])
            api.expect(
                "POST",
                f"/api/assignments/{assignment['id']}/judgment",
                {"ranks": ranks, "active_seconds": 20.0, "client_token": f"{project.pk}-{count}"},
            )
            count += 1
        return count

    # -- aggregation check --

    def _aggregation_check(self, overlap: int, prompts: int) -> dict[str, Any]:
        seed = self.settings.seed
        project = self._copy_pool(
            f"aggregation, overlap {overlap}", order="fill", seed=seed, overlap=overlap, limit=prompts
        )
        people = [*LABELERS, CARELESS]
        rngs = {name: random.Random(f"{seed}:aggregation:{overlap}:{name}") for name, _ in people}  # noqa: S311
        rankings = self._label_until(project, budget=None, people=people, rngs=rngs)
        truth_pairs = truth_ordered_pairs(project, self.truth)
        result: dict[str, Any] = {"overlap": overlap, "rankings": rankings, "truth_pairs": len(truth_pairs)}
        for aggregation in ("majority", "dawid_skene"):
            build = self._build(
                self.api,
                project=project,
                name=f"{project.name} {aggregation}",
                aggregation=aggregation,
                test_fraction=0.0,
                format="standard",
            )
            rows = build_pair_rows(build["id"])
            result[aggregation] = pair_label_agreement(rows, truth_pairs, self.truth)
            if aggregation == "dawid_skene":
                summary = DatasetBuild.objects.get(pk=build["id"]).summary
                result["reliability"] = summary["dawid_skene"]["labelers"]
        noise = dict(people)
        for row in result.get("reliability", []):
            row["noise"] = noise.get(row["username"].removeprefix("loop-labeler-"))
        result["gain_points"] = round(100 * (result["dawid_skene"]["value"] - result["majority"]["value"]), 1)
        return result


# --- measures (pure) ------------------------------------------------------------------------


def truth_ordered_pairs(project: Project, truth: dict[str, DemoProblem]) -> dict[tuple[str, str, str], int]:
    """Every pair of a task's completions whose grades differ: (prompt, text a, text b) -> the better text's index 0/1.

    Texts rather than ids, because build rows carry texts; a and b in the task's position order.
    """
    pairs = {}
    for task in (
        Task.objects.filter(project=project).select_related("prompt").prefetch_related("items__completion")
    ):
        prompt = task.prompt.messages[0]["content"] if task.prompt.messages else task.prompt.text
        problem = truth[prompt]
        items = sorted(task.items.all(), key=lambda item: item.position)
        for first, second in itertools.combinations(items, 2):
            a, b = first.completion.text, second.completion.text
            grade_a, grade_b = answer_grade(problem, a), answer_grade(problem, b)
            if grade_a != grade_b:
                pairs[(prompt, a, b)] = 0 if grade_a < grade_b else 1
    return pairs


def build_pair_rows(build_id: int) -> list[dict[str, Any]]:
    folder = dataset_build_dir(build_id=build_id) / "pairs"
    rows = []
    for split in ("train", "test"):
        path = folder / f"{split}.jsonl"
        if path.exists():
            rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return rows


def _prompt_text(prompt: Any) -> str:
    """The problem's text from a standard-format row prompt ("User: …\\n\\nAssistant:\\n")."""
    if isinstance(prompt, list):
        return prompt[-1]["content"]
    text = str(prompt)
    return text.removeprefix("User: ").rsplit("\n\nAssistant:", 1)[0]


def pair_label_agreement(
    rows: list[dict[str, Any]], truth_pairs: dict[tuple[str, str, str], int], truth: dict[str, DemoProblem]
) -> dict[str, Any]:
    """How many truth-ordered pairs a build labels the truth's way (a missing row agrees with nothing)."""
    labelled: dict[tuple[str, str, str], bool] = {}
    for row in rows:
        prompt = _prompt_text(row["prompt"])
        chosen, rejected = row["chosen"], row["rejected"]
        if isinstance(chosen, list):
            chosen, rejected = chosen[0]["content"], rejected[0]["content"]
        for key, better in (((prompt, chosen, rejected), 0), ((prompt, rejected, chosen), 1)):
            if key in truth_pairs:
                labelled[key] = truth_pairs[key] == better
    right = sum(labelled.values())
    measure = _interval_dict(right, len(truth_pairs))
    interval = wilson_interval(right, len(labelled))
    measure["rows_with_truth"] = len(labelled)
    measure["precision"] = right / len(labelled) if labelled else None
    measure["precision_low"], measure["precision_high"] = interval if interval else (None, None)
    return measure


def curve_summary(points: list[dict[str, Any]], plan: LabelEfficiencySettings) -> dict[str, Any]:
    """Mean accuracy per (order, budget) over seeds, and the labels each order needs to reach random's best."""
    means: dict[str, dict[int, float]] = {}
    for order in plan.orders:
        for budget in plan.budgets:
            values = [
                p["value"]
                for p in points
                if p["order"] == order and p["budget"] == budget and p["value"] is not None
            ]
            if values:
                means.setdefault(order, {})[budget] = sum(values) / len(values)
    summary: dict[str, Any] = {"means": {order: dict(by) for order, by in means.items()}}
    if "random" in means and "uncertainty" in means and plan.budgets[-1] in means["random"]:
        target = means["random"][plan.budgets[-1]]
        reached = [budget for budget, value in sorted(means["uncertainty"].items()) if value >= target]
        needed = reached[0] if reached else None
        summary.update(
            {
                "target": target,
                "uncertainty_budget_needed": needed,
                "label_share": needed / plan.budgets[-1] if needed else None,
                "met": bool(needed and needed / plan.budgets[-1] <= LABEL_SHARE_GOAL),
            }
        )
    return summary


# --- the report -----------------------------------------------------------------------------


def report_markdown(result: dict[str, Any]) -> str:
    lines = ["# Label efficiency on the demo task", ""]
    if "curves" in result:
        plan = result["settings"]
        summary = result["curve_summary"]
        lines += [
            "## Reward-model accuracy against the number of human rankings",
            "",
            "Held-out accuracy: the right answer scored above a wrong one (95% Wilson interval).",
            f"Orders: {', '.join(plan['orders'])}; seeds: {', '.join(map(str, plan['seeds']))}; K = {result['k']}.",
            "",
            "| order | seed | rankings | accuracy | 95% CI |",
            "| --- | --- | --- | --- | --- |",
        ]
        for point in result["curves"]:
            lines.append(
                f"| {point['order']} | {point['seed']} | {point['budget']} | {_percent(point['value'])} | "
                f"{_percent(point['low'])}–{_percent(point['high'])} |"
            )
        lines += ["", "Mean over seeds:", "", "| rankings | " + " | ".join(plan["orders"]) + " |"]
        lines.append("| --- |" + " --- |" * len(plan["orders"]))
        for budget in plan["budgets"]:
            cells = [_percent(summary["means"].get(order, {}).get(budget)) for order in plan["orders"]]
            lines.append(f"| {budget} | " + " | ".join(cells) + " |")
        if "target" in summary:
            needed = summary["uncertainty_budget_needed"]
            lines += [
                "",
                f"Goal: uncertainty reaches random's accuracy at {plan['budgets'][-1]} rankings "
                f"({_percent(summary['target'])}) with at most {LABEL_SHARE_GOAL:.0%} of the labels: "
                + (
                    f"reached at {needed} rankings ({summary['label_share']:.0%}) — "
                    + ("**met**" if summary["met"] else "**not met**")
                    if needed
                    else "never reached within the budgets — **not met**"
                ),
            ]
        lines += ["", "![learning curves](label-efficiency.svg)", ""]
    for check in result.get("aggregation", []):
        lines += [
            f"## Pair labels against the truth: majority vs Dawid–Skene (overlap {check['overlap']})",
            "",
            f"{check['rankings']} rankings by four simulated labelers (one answers at random half of the time); "
            f"{check['truth_pairs']} pairs whose answers differ in grade. Agreement counts a pair the build "
            "has no row for as not agreeing; precision is over the pairs it has a row for.",
            "",
            "| aggregation | agrees with the truth | 95% CI | rows with a truth | precision |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name in ("majority", "dawid_skene"):
            measure = check[name]
            lines.append(
                f"| {name} | {_percent(measure['value'])} ({measure['successes']}/{measure['trials']}) | "
                f"{_percent(measure['low'])}–{_percent(measure['high'])} | {measure['rows_with_truth']} | "
                f"{_percent(measure['precision'])} |"
            )
        met = check["gain_points"] >= AGGREGATION_GAIN_GOAL_POINTS
        lines += [
            "",
            f"Dawid–Skene minus majority: {check['gain_points']:+.1f} points "
            f"(goal ≥ +{AGGREGATION_GAIN_GOAL_POINTS:.0f}: {'**met**' if met else '**not met**'}).",
            "",
            "| labeler | noise (share answered at random) | votes | estimated reliability |",
            "| --- | --- | --- | --- |",
        ]
        for row in check.get("reliability", []):
            noise = "—" if row.get("noise") is None else f"{row['noise']:.0%}"
            lines.append(f"| {row['username']} | {noise} | {row['votes']} | {row['reliability']:.3f} |")
        lines.append("")
    lines += ["## Stages", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {stage['name']} | {stage['seconds']:.1f} |" for stage in result.get("stages", [])]
    return "\n".join(lines) + "\n"


def curves_picture(result: dict[str, Any], path: Path) -> None:
    """The learning curves as an SVG: accuracy against rankings, one line per order and seed, means bold."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    plan = result["settings"]
    figure, axes = pyplot.subplots(figsize=(6.4, 4.0))
    colours = {"random": "tab:grey", "uncertainty": "tab:blue", "fill": "tab:green"}
    for order in plan["orders"]:
        colour = colours.get(order, "tab:orange")
        for seed in plan["seeds"]:
            points = [p for p in result["curves"] if p["order"] == order and p["seed"] == seed]
            axes.plot(
                [p["budget"] for p in points],
                [p["value"] for p in points],
                color=colour,
                alpha=0.35,
                marker=".",
            )
        means = result["curve_summary"]["means"].get(order, {})
        axes.plot(
            list(means),
            list(means.values()),
            color=colour,
            linewidth=2.2,
            marker="o",
            label=f"{order} (mean)",
        )
    axes.set_xscale("log", base=2)
    axes.set_xticks(plan["budgets"], [str(b) for b in plan["budgets"]])
    axes.set_xlabel("human rankings")
    axes.set_ylabel("held-out accuracy (right over wrong)")
    axes.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="svg", metadata={"Date": None})
    pyplot.close(figure)


def report_write(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "label-efficiency.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    markdown = out_dir / "label-efficiency.md"
    markdown.write_text(report_markdown(result), encoding="utf-8")
    if "curves" in result:
        curves_picture(result, out_dir / "label-efficiency.svg")
    return markdown
