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
       random order under both orders (nothing has scored the tasks yet): the same tasks, ranked
       the same way by the same seeded labelers, so one reward run serves both orders there (the
       rankings are compared first; a run is trained for each order when they differ).
    The orders take turns budget by budget, so a run stopped early still compares them.
    Epochs scale with the budget so that every run takes about as many optimizer steps (or pass
    `--reward-hyperparameters '{"max_steps": N}'` for exactly N steps per run on a busy machine).
    Each point also says what its rankings held, measured with the truth after they were made (never
    used to choose tasks): how many of the ranked tasks show a right and a wrong answer, and how many
    of their pairs differ in grade (a pair of one grade is a tie to the labelers, dropped by the build).
    Goal: uncertainty reaches random's accuracy at the largest budget with at most 60% of its labels
    (mean over seeds; each seed is reported too). Put 60% of the largest budget among the budgets
    (e.g. 100,200,480,800) to measure the goal itself rather than a budget either side of it.

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
from annotation.models import Completion, Judgment, Membership, Project, Prompt, Task, TaskCompletion
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
            # A policy is used only in the projects it belongs to.
            self.sft.projects.add(self.pool, self.heldout_project)
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
        self.result = result
        # The aggregation check first: it trains nothing, so its tables are there early. The report is
        # written again after each step, so a run stopped early still leaves what it measured.
        if plan.aggregation_check:
            with self.stage("aggregation check"):
                result["aggregation"] = []
                for overlap in AGGREGATION_OVERLAPS:
                    result["aggregation"].append(self._aggregation_check(overlap, plan.aggregation_prompts))
                    self._checkpoint()
        if plan.budgets:
            result["curves"] = []
            self._learning_curves(plan, result["curves"])
            result["curve_summary"] = curve_summary(result["curves"], plan)
        result["stages"] = [stage.__dict__ for stage in self.report.stages]
        return result

    def _checkpoint(self) -> None:
        """The report so far, written where the finished one goes (overwritten at the end)."""
        result = self.result
        if result.get("curves"):
            result["curve_summary"] = curve_summary(
                result["curves"], LabelEfficiencySettings(**result["settings"])
            )
        result["stages"] = [stage.__dict__ for stage in self.report.stages]
        report_write(result, self.settings.out_dir)

    # -- learning curves --

    def _learning_curves(self, plan: LabelEfficiencySettings, points: list[dict[str, Any]]) -> None:
        for seed in plan.seeds:
            # The first budget's rankings, reward run and accuracy, by their content (see the module's text).
            first: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, Any]]] = {}
            projects = {
                order: self._copy_pool(f"{order} seed {seed}", order=order, seed=seed, overlap=1)
                for order in plan.orders
            }
            labelers = {
                order: {name: random.Random(f"{seed}:labeler:{name}") for name, _ in LABELERS}  # noqa: S311
                for order in plan.orders
            }
            tasks = Task.objects.filter(project=projects[plan.orders[0]], is_gold=False).count()
            if tasks < plan.budgets[-1]:
                # Identical samples are merged, so a pool holds fewer tasks than prompts (about half
                # of them with the demo policy): past the pool, every order ranks every task alike.
                raise LoopFailed(
                    f"the pool holds {tasks} tasks, fewer than the largest budget {plan.budgets[-1]}: "
                    "give more training prompts (--train-prompts) or smaller budgets"
                )
            # Budget by budget, every order in turn: a run stopped early still compares the orders.
            for budget in plan.budgets:
                for order in plan.orders:
                    project, rngs = projects[order], labelers[order]
                    with self.stage(f"{order}, seed {seed}: label to {budget}"):
                        rankings = self._label_until(project, budget=budget, people=list(LABELERS), rngs=rngs)
                    held = rankings_held(project, self.truth)
                    signature = rankings_signature(project) if budget == plan.budgets[0] else None
                    shared = first.get(signature) if signature is not None else None
                    if shared is not None:
                        run, accuracy = shared
                        self.say(
                            f"  {order}, seed {seed}, {budget}: the same rankings as before; run {run['id']}"
                        )
                    else:
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
                            held["build_counts"] = build["counts"]
                        if signature is not None:
                            first[signature] = (run, accuracy)
                    points.append(
                        {
                            "seed": seed,
                            "order": order,
                            "budget": budget,
                            "rankings": rankings,
                            "run": run["id"],
                            "steps": run.get("total_steps"),
                            **accuracy,
                            "held": held,
                        }
                    )
                    self.say(f"  {order}, seed {seed}, {budget} rankings: {_percent(accuracy['value'])}")
                    self._checkpoint()
                    if order == Project.TaskOrder.UNCERTAINTY and budget != plan.budgets[-1]:
                        with self.stage(f"{order}, seed {seed}: score the queue after {budget}"):
                            self._score(
                                project, reward_model_id=run["reward_model"], what="scoring the queue"
                            )

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
                # The sources are the pool's first prompts by id: a range, not a long IN list (SQLite).
                for completion in Completion.objects.filter(
                    prompt__project=self.pool, prompt_id__lte=sources[-1].pk, policy=self.sft
                ).order_by("id")
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
            # In text order, not in the order shown (a per-person permutation): the same seeded labeler
            # then gives the same task the same ranks in every project, so the orders differ only in
            # which tasks they serve.
            completions = {
                c["id"]: c["text"] for c in sorted(assignment["completions"], key=lambda c: c["text"])
            }
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


def _task_texts(items: Any) -> list[tuple[str, list[str]]]:
    """(prompt text, completion texts in position order) per task, from TaskCompletion rows.

    One joined query: a prefetch would send every id in one IN list, deeper than SQLite allows.
    """
    by_task: dict[int, tuple[str, list[str]]] = {}
    for item in items.select_related("task__prompt", "completion").order_by("task_id", "position"):
        prompt = item.task.prompt
        text = prompt.messages[0]["content"] if prompt.messages else prompt.text
        by_task.setdefault(item.task_id, (text, []))[1].append(item.completion.text)
    return list(by_task.values())


def truth_ordered_pairs(project: Project, truth: dict[str, DemoProblem]) -> dict[tuple[str, str, str], int]:
    """Every pair of a task's completions whose grades differ: (prompt, text a, text b) -> the better text's index 0/1.

    Texts rather than ids, because build rows carry texts; a and b in the task's position order.
    """
    pairs = {}
    for prompt, texts in _task_texts(TaskCompletion.objects.filter(task__project=project)):
        problem = truth[prompt]
        for a, b in itertools.combinations(texts, 2):
            grade_a, grade_b = answer_grade(problem, a), answer_grade(problem, b)
            if grade_a != grade_b:
                pairs[(prompt, a, b)] = 0 if grade_a < grade_b else 1
    return pairs


def rankings_signature(project: Project) -> tuple[Any, ...]:
    """What a project's rankings say, independent of ids: (labeler, prompt, ((text, rank), …)) sorted."""
    rows = []
    for judgment in Judgment.objects.filter(task__project=project).select_related("user", "task__prompt"):
        # Ranks are keyed by the completions' uids.
        texts = {
            str(uid): text
            for uid, text in Completion.objects.filter(uid__in=list(judgment.ranks)).values_list(
                "uid", "text"
            )
        }
        prompt = judgment.task.prompt
        rows.append(
            (
                judgment.user.username,
                prompt.messages[0]["content"] if prompt.messages else prompt.text,
                tuple(sorted((texts[uid], rank) for uid, rank in judgment.ranks.items())),
            )
        )
    return tuple(sorted(rows))


def rankings_held(project: Project, truth: dict[str, DemoProblem]) -> dict[str, Any]:
    """What the ranked tasks of a project held, by the truth (measured after the fact, never to choose).

    tasks: ranked tasks; right_and_wrong: of those, tasks showing a right and a wrong answer (what the
    accuracy measures); graded_pairs: pairs whose answers differ in grade (a labeler who checks orders
    them; the other pairs are ties to them, dropped by the build); pairs: all pairs of the ranked tasks.
    """
    items = TaskCompletion.objects.filter(task__project=project, task__judgment_count__gt=0)
    tasks = right_and_wrong = graded = pairs = 0
    for prompt, texts in _task_texts(items):
        grades = [answer_grade(truth[prompt], text) for text in texts]
        tasks += 1
        right_and_wrong += 1 in grades and 2 in grades
        for a, b in itertools.combinations(grades, 2):
            pairs += 1
            graded += a != b
    return {"tasks": tasks, "right_and_wrong": right_and_wrong, "graded_pairs": graded, "pairs": pairs}


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


def _reach(means: dict[int, float], target: float) -> tuple[int | None, float | None]:
    """The first budget whose accuracy reaches `target`, and where the line between that budget and the
    one before it crosses `target` (a read of the curve between measured points; None when not reached)."""
    previous: tuple[int, float] | None = None
    for budget, value in sorted(means.items()):
        if value >= target:
            if previous is None or previous[1] >= target:
                return budget, float(budget)
            (b0, v0) = previous
            return budget, b0 + (target - v0) * (budget - b0) / (value - v0)
        previous = (budget, value)
    return None, None


def curve_summary(points: list[dict[str, Any]], plan: LabelEfficiencySettings) -> dict[str, Any]:
    """Mean accuracy per (order, budget) over seeds, and the labels each order needs to reach random's best.

    The goal is judged on the means at the measured budgets; each seed is judged alone too, and the
    crossing between two budgets (linear) is given as a read of the curve, not as a measurement.
    """

    def by_budget(order: str, seeds: list[int]) -> dict[int, float]:
        out = {}
        for budget in plan.budgets:
            values = [
                p["value"]
                for p in points
                if p["order"] == order
                and p["budget"] == budget
                and p["seed"] in seeds
                and p["value"] is not None
            ]
            if len(values) == len(seeds):
                out[budget] = sum(values) / len(values)
        return out

    means: dict[str, dict[int, float]] = {}
    for order in plan.orders:
        values = by_budget(order, plan.seeds)
        if values:
            means[order] = values
    summary: dict[str, Any] = {"means": {order: dict(by) for order, by in means.items()}}
    largest = plan.budgets[-1]

    def judge(random_curve: dict[int, float], uncertainty_curve: dict[int, float]) -> dict[str, Any] | None:
        if largest not in random_curve or not uncertainty_curve:
            return None
        target = random_curve[largest]
        needed, crossing = _reach(uncertainty_curve, target)
        return {
            "target": target,
            "uncertainty_budget_needed": needed,
            "label_share": needed / largest if needed else None,
            "crossing": crossing,
            "crossing_share": crossing / largest if crossing else None,
            "met": bool(needed and needed / largest <= LABEL_SHARE_GOAL),
            "complete": max(uncertainty_curve) == largest,
        }

    if "random" in means and "uncertainty" in means:
        verdict = judge(means["random"], means["uncertainty"])
        if verdict:
            summary.update(verdict)
        per_seed = {}
        for seed in plan.seeds:
            verdict = judge(by_budget("random", [seed]), by_budget("uncertainty", [seed]))
            if verdict:
                per_seed[seed] = verdict
        summary["per_seed"] = per_seed
    return summary


def results_merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs of the experiments (e.g. one process per seed against one server).

    Curves and aggregation checks are put together, the seeds are the union, the summary is computed
    again; the runs must share budgets and orders (the first run's other settings stand).
    """
    if not results:
        raise ValueError("nothing to merge")
    settings = dict(results[0]["settings"])
    for other in results[1:]:
        for key in ("budgets", "orders"):
            if other["settings"].get(key) and settings.get(key) and other["settings"][key] != settings[key]:
                raise ValueError(f"the runs differ in {key}: {settings[key]} and {other['settings'][key]}")
            settings[key] = settings.get(key) or other["settings"].get(key)
    settings["seeds"] = sorted({seed for result in results for seed in result["settings"].get("seeds", [])})
    merged: dict[str, Any] = {"settings": settings, "k": results[0]["k"]}
    curves = [point for result in results for point in result.get("curves", [])]
    if curves:
        merged["curves"] = sorted(
            curves, key=lambda p: (p["seed"], settings["orders"].index(p["order"]), p["budget"])
        )
        merged["curve_summary"] = curve_summary(merged["curves"], LabelEfficiencySettings(**settings))
    checks = [check for result in results for check in result.get("aggregation", [])]
    if checks:
        merged["aggregation"] = checks
    merged["stages"] = [
        {**stage, "name": f"run {number}: {stage['name']}"}
        for number, result in enumerate(results, start=1)
        for stage in result.get("stages", [])
    ]
    return merged


# --- the report -----------------------------------------------------------------------------


def report_markdown(result: dict[str, Any]) -> str:
    lines = ["# Label efficiency on the demo task", ""]
    if result.get("curves"):
        plan = result["settings"]
        summary = result["curve_summary"]
        lines += [
            "## Reward-model accuracy against the number of human rankings",
            "",
            "Held-out accuracy: the right answer scored above a wrong one (95% Wilson interval). "
            "What the ranked tasks held, by the truth, measured after the fact: the share of ranked tasks "
            "showing a right and a wrong answer, and the pairs per ranking whose answers differ in grade "
            "(the others are ties to a checking labeler and are dropped from the build).",
            f"Orders: {', '.join(plan['orders'])}; seeds: {', '.join(map(str, plan['seeds']))}; K = {result['k']}; "
            f"optimizer steps per reward run: {_steps_text(result['curves'])}.",
            "",
            "| order | seed | rankings | accuracy | 95% CI | tasks with right & wrong | graded pairs per ranking | run |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        orders = list(plan["orders"])
        for point in sorted(
            result["curves"], key=lambda p: (p["seed"], orders.index(p["order"]), p["budget"])
        ):
            held = point.get("held") or {}
            tasks = held.get("tasks") or 0
            share = _percent(held["right_and_wrong"] / tasks) if tasks else "—"
            per_ranking = f"{held['graded_pairs'] / tasks:.2f}" if tasks else "—"
            lines.append(
                f"| {point['order']} | {point['seed']} | {_rankings_text(point)} | {_percent(point['value'])} | "
                f"{_percent(point['low'])}–{_percent(point['high'])} | {share} | {per_ranking} | {point['run']} |"
            )
        lines += ["", "Mean over seeds:", "", "| rankings | " + " | ".join(plan["orders"]) + " |"]
        lines.append("| --- |" + " --- |" * len(plan["orders"]))
        for budget in plan["budgets"]:
            cells = [_percent(summary["means"].get(order, {}).get(budget)) for order in plan["orders"]]
            lines.append(f"| {budget} | " + " | ".join(cells) + " |")
        largest = plan["budgets"][-1]
        if "target" in summary:
            lines += [
                "",
                _goal_line(
                    f"Goal (mean of seeds): uncertainty reaches random's accuracy at {largest}", summary
                ),
            ]
        for seed, verdict in summary.get("per_seed", {}).items():
            lines.append(
                _goal_line(f"Seed {seed} alone: uncertainty reaches random's accuracy at {largest}", verdict)
            )
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


def _rankings_text(point: dict[str, Any]) -> str:
    """The budget, and the rankings actually made when the pool ran out first."""
    made = point.get("rankings")
    if made is None or made == point["budget"]:
        return str(point["budget"])
    return f"{point['budget']} ({made} made: pool exhausted)"


def _steps_text(points: list[dict[str, Any]]) -> str:
    steps = sorted({p["steps"] for p in points if p.get("steps")})
    if not steps:
        return "not recorded"
    return str(steps[0]) if len(steps) == 1 else f"{steps[0]}–{steps[-1]}"


def _goal_line(head: str, verdict: dict[str, Any]) -> str:
    """One sentence: where uncertainty reached random's top accuracy, and whether within the goal's share."""
    needed = verdict["uncertainty_budget_needed"]
    text = f"- {head} ({_percent(verdict['target'])}) with at most {LABEL_SHARE_GOAL:.0%} of the labels: "
    if needed:
        text += f"reached at {needed} rankings ({verdict['label_share']:.0%})"
        if verdict.get("crossing") and verdict["crossing"] < needed:
            text += (
                f"; the line between the budgets crosses it at about {verdict['crossing']:.0f} "
                f"({verdict['crossing_share']:.0%}, read between points, not measured)"
            )
        return text + (" — **met**" if verdict["met"] else " — **not met**")
    if not verdict.get("complete", True):
        return text + "not reached at the budgets measured so far (the run stopped early)"
    return text + "never reached within the budgets — **not met**"


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
    summary = result["curve_summary"]
    if "target" in summary:
        axes.axhline(summary["target"], color="tab:grey", linestyle=":", linewidth=1)
        axes.axvline(
            LABEL_SHARE_GOAL * plan["budgets"][-1],
            color="tab:red",
            linestyle=":",
            linewidth=1,
            label=f"{LABEL_SHARE_GOAL:.0%} of {plan['budgets'][-1]}",
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
    if result.get("curves"):
        curves_picture(result, out_dir / "label-efficiency.svg")
    return markdown
