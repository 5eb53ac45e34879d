"""The whole loop on the demo task, run the way production runs it, checked against the known truth.

`manage.py simulate_loop` drives it against a running web server, database,
Redis and Celery workers (it starts them itself unless given `--url`):

1. generate — the SFT policy writes K completions for every training prompt
   (a generation job on the `gpu` queue); ranking tasks are made from them.
2. label — simulated labelers of different care claim tasks and submit
   rankings through the JSON API with their own tokens, as any client would.
   Each checks the arithmetic: an answer nearer the true one ranks higher,
   equal distances tie; a labeler with noise p ranks a task at random with
   probability p.
3. build — a dataset build through the API (conversational, grouped rows,
   SFT rows on the same prompts as the preference rows).
4. train — from the same build, through the API, on the `gpu` queue: an SFT
   run on the top-ranked completions, a reward run, a DPO run and an RL run
   against the reward model (RLOO, KL to SFT, the demo's truth watching for
   reward hacking); a best-of-n policy (n samples of SFT, the reward model's
   favourite kept) is registered from the reward model.
5. evaluate — every policy answers held-out problems (generation jobs at a
   near-greedy temperature; best-of-n samples its candidates at the sampling
   temperature); one blind A/B session of all of them with the SFT policy
   (round-robin pairs) is answered by simulated evaluators through the API
   (the right answer wins; both right is a tie, both wrong "both bad"; noise
   p answers at random).
6. report — reward-model accuracy against the truth on held-out problems,
   each policy's accuracy against the truth with its 95% Wilson interval,
   its head-to-head with SFT and its Bradley–Terry rating with a bootstrap
   interval, RL's over-optimisation curve as a table and a picture, how long
   each stage took; JSON, Markdown and SVG.

The manager's own steps (accounts, projects, generation jobs, the A/B
session) call the same services as the admin and the manager pages do; no
API exists for them. Everything a labeler, an evaluator or a training
client does goes over HTTP.

Measurement is not product: the reward model's accuracy against the truth
is computed here, in this process, by scoring held-out completions with the
saved model (training.scoring), because only this harness knows the truth.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from rest_framework.authtoken.models import Token

from annotation.ab_stats import bradley_terry_ratings, pair_table, position_bias, wilson_interval
from annotation.importing import prompts_import
from annotation.models import Completion, Membership, Policy, Project
from annotation.roles import Role
from annotation.selectors import ab_votes
from annotation.services import ab_session_create, user_create
from config.storage import storage_path_resolve
from training.demo.task import DemoProblem, answer_extract, answer_is_correct, demo_problems
from training.models import GenerationJob, TrainingRun
from training.services import generation_job_create

# (name, noise): the share of tasks each one ranks at random.
LABELERS: tuple[tuple[str, float], ...] = (("careful", 0.05), ("average", 0.15), ("hasty", 0.30))
EVALUATORS: tuple[tuple[str, float], ...] = (("careful", 0.05), ("average", 0.15))
USER_PREFIX = "loop-"
# Seeds run side by side in one process share the simulated people's accounts: one creates each.
_PEOPLE_LOCK = threading.Lock()
# A deployed assistant answers a question with one right answer (near) greedily.
EVAL_TEMPERATURE = 0.01
UNPARSEABLE = 10**9  # distance of a completion that states no number: worse than any number
# The recipes the loop compares, in the report's order (keys of the report's `policies`).
POLICY_LABELS: dict[str, str] = {
    "sft": "SFT",
    "sft_top": "SFT on top-ranked",
    "dpo": "DPO",
    "rl": "RL (RLOO)",
    "best_of_n": "best-of-n",
}


class LoopFailed(RuntimeError):
    """A stage could not finish (a job failed, a request was refused); the message says which and why."""


@dataclass
class LoopSettings:
    base_model: str
    base_url: str
    out_dir: Path
    train_prompts: int = 1000
    heldout_prompts: int = 200
    eval_prompts: int = 400
    k: int = 4
    seed: int = 0
    temperature: float = 1.0
    max_new_tokens: int = 32
    reward_hyperparameters: dict[str, Any] = field(default_factory=dict)
    dpo_hyperparameters: dict[str, Any] = field(default_factory=dict)
    # An RL run against the reward model (RLOO, KL to SFT), with the demo's truth watching for
    # reward hacking; empty: no RL stage.
    rl_hyperparameters: dict[str, Any] = field(default_factory=dict)
    # An SFT run on the build's top-ranked completions; empty: no such stage.
    sft_hyperparameters: dict[str, Any] = field(default_factory=dict)
    # Best-of-n with the reward model: n samples of SFT at `best_of_n_temperature`; 0: no such policy.
    best_of_n: int = 0
    best_of_n_temperature: float = 1.0
    peft: str = "full"
    stage_timeout_s: float = 3600.0
    poll_s: float = 1.0


# --- the simulated people (pure, tested on their own) -------------------------------


def distance_to_truth(problem: DemoProblem, text: str) -> int:
    answer = answer_extract(text)
    return UNPARSEABLE if answer is None else abs(answer - problem.answer)


def answer_grade(problem: DemoProblem, text: str) -> int:
    """1 for the right answer, 2 for a wrong one, 3 for a completion that states no number."""
    answer = answer_extract(text)
    if answer is None:
        return 3
    return 1 if answer == problem.answer else 2


def labeler_ranks(
    problem: DemoProblem, completions: dict[str, str], *, noise: float, rng: random.Random
) -> dict[str, int]:
    """Ranks (1 = best, equal = tie) a labeler gives after checking each answer.

    Right answers first, wrong ones next, answers stating no number last;
    answers of one grade tie (a checker knows right from wrong, not which
    wrong answer is less wrong). With probability `noise` the labeler does
    not check and ranks at random, without ties.
    """
    ids = list(completions)
    if rng.random() < noise:
        shuffled = ids[:]
        rng.shuffle(shuffled)
        return {uid: position + 1 for position, uid in enumerate(shuffled)}
    grades = {uid: answer_grade(problem, completions[uid]) for uid in ids}
    levels = sorted(set(grades.values()))
    return {uid: levels.index(grades[uid]) + 1 for uid in ids}


def evaluator_verdict(
    problem: DemoProblem, left: str, right: str, *, noise: float, rng: random.Random
) -> str:
    """ "left", "right", "tie" (both right) or "both_bad" (both wrong); random with probability `noise`."""
    if rng.random() < noise:
        return rng.choice(("left", "right", "tie", "both_bad"))
    left_right, right_right = answer_is_correct(problem, left), answer_is_correct(problem, right)
    if left_right and right_right:
        return "tie"
    if left_right or right_right:
        return "left" if left_right else "right"
    return "both_bad"


def verdict_answer(verdict: str, left_id: str, right_id: str) -> dict[str, Any]:
    """The judgment body the A/B page sends for a verdict (see static/js/ab.js)."""
    ranks = {
        "left": {left_id: 1, right_id: 2},
        "right": {left_id: 2, right_id: 1},
        "tie": {left_id: 1, right_id: 1},
        "both_bad": {},
    }[verdict]
    decisive = verdict in ("left", "right")
    return {"ranks": ranks, "none_acceptable": verdict == "both_bad", "strength": 2 if decisive else None}


# --- HTTP ------------------------------------------------------------------------------


class ApiClient:
    """A JSON client with one person's API token (what any script would use)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (the URL is the server this command was given)
            self.base_url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Token {self.token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = raw.decode(errors="replace")[:500]
            return error.code, payload

    def expect(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200, 201)) -> Any:
        status, payload = self.request(method, path, body)
        if status not in ok:
            raise LoopFailed(f"{method} {path} answered {status}: {payload}")
        return payload


# --- the run -------------------------------------------------------------------------


@dataclass
class StageTiming:
    name: str
    seconds: float


@dataclass
class LoopReport:
    settings: dict[str, Any]
    stages: list[StageTiming] = field(default_factory=list)
    labeling: dict[str, Any] = field(default_factory=dict)
    dataset_build: dict[str, Any] = field(default_factory=dict)
    reward_model: dict[str, Any] = field(default_factory=dict)
    policies: dict[str, Any] = field(default_factory=dict)
    # The RL run's over-optimisation watch: (step, KL, proxy reward, true score) on held-out prompts.
    rl_watch: list[dict[str, Any]] = field(default_factory=list)
    # The best-of-n policy: n, sampling temperature, reward model.
    best_of_n: dict[str, Any] = field(default_factory=dict)
    ab: dict[str, Any] = field(default_factory=dict)
    goals: list[dict[str, Any]] = field(default_factory=list)
    total_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _head_to_head(table: list[dict[str, Any]], policy: str, opponent: str) -> dict[str, Any]:
    """`policy`'s wins, losses, ties and both-bad against `opponent` in a pair table, and its win rate."""
    row = next((r for r in table if {r["policy"], r["opponent"]} == {policy, opponent}), None)
    if row is None:
        wins = losses = ties = both_bad = 0
    else:
        first = row["policy"] == policy
        wins = row["wins_first"] if first else row["wins_second"]
        losses = row["wins_second"] if first else row["wins_first"]
        ties, both_bad = row["ties"], row["both_bad"]
    return {
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "both_bad": both_bad,
        "votes": wins + losses + ties + both_bad,
        "win_rate": _interval_dict(wins, wins + losses),
    }


def _interval_dict(successes: int, trials: int) -> dict[str, Any]:
    interval = wilson_interval(successes, trials)
    return {
        "value": successes / trials if trials else None,
        "successes": successes,
        "trials": trials,
        "low": interval[0] if interval else None,
        "high": interval[1] if interval else None,
    }


class Loop:
    """One run of the loop; `run()` returns the report (also written as JSON and Markdown)."""

    def __init__(
        self,
        settings: LoopSettings,
        *,
        say: Callable[[str], Any] = print,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.say = say
        # Set by whoever runs several loops at once when one of them failed: the others give up at
        # their next wait instead of running on for nothing.
        self.stop = stop or threading.Event()
        self.tag = f"{time.strftime('%Y%m%d-%H%M%S')}-s{settings.seed}"
        self.report = LoopReport(settings={**asdict(settings), "out_dir": str(settings.out_dir)})
        self.train = demo_problems(count=settings.train_prompts, seed=settings.seed, split="train")
        test = demo_problems(
            count=settings.heldout_prompts + settings.eval_prompts, seed=settings.seed, split="test"
        )
        self.heldout, self.evaluation = test[: settings.heldout_prompts], test[settings.heldout_prompts :]
        self.truth: dict[str, DemoProblem] = {p.prompt: p for p in (*self.train, *test)}

    # -- plumbing --

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"[{name}] …")
        started = time.monotonic()
        yield
        seconds = round(time.monotonic() - started, 1)
        self.report.stages.append(StageTiming(name, seconds))
        self.say(f"[{name}] done in {seconds:.1f} s")

    def wait_for(self, what: str, poll: Callable[[], tuple[bool, str]]) -> None:
        """Poll until `poll()` says done; its text is shown when it changes."""
        deadline = time.monotonic() + self.settings.stage_timeout_s
        last = ""
        while True:
            done, text = poll()
            if text != last:
                self.say(f"  {what}: {text}")
                last = text
            if done:
                return
            if time.monotonic() > deadline:
                raise LoopFailed(f"{what} did not finish in {self.settings.stage_timeout_s:.0f} s ({text})")
            if self.stop.wait(self.settings.poll_s):
                raise LoopFailed(f"stopped while waiting for {what}: another seed's loop failed")

    def _manager_and_sft(self) -> None:
        """The manager's account and token, and the SFT policy registered by them."""
        self.manager, self.manager_token = self._person("manager", Role.MANAGER)
        self.sft = Policy.objects.create(
            name=f"loop {self.tag} sft",
            kind=Policy.Kind.MODEL,
            base_model=self.settings.base_model,
            generation_settings={"prompt_format": "chat"},
        )

    def _person(self, name: str, role: str) -> tuple[Any, str]:
        User = get_user_model()
        username = f"{USER_PREFIX}{name}"
        with _PEOPLE_LOCK:
            user = (
                User.objects.filter(username=username).first()
                or user_create(username=username, roles=[role])[0]
            )
            token, _ = Token.objects.get_or_create(user=user)
        return user, token.key

    def _project(self, name: str, *, problems: list[DemoProblem], k: int) -> Project:
        project = Project.objects.create(
            name=f"Loop {self.tag}: {name}",
            kind=Project.Kind.RANKING,
            k=k,
            overlap=1,
            ties_allowed=True,
            instructions="Rank the answers: right ones first, then wrong ones, then ones that state no number.",
            created_by=self.manager,
        )
        Membership.objects.create(project=project, user=self.manager, role=Role.MANAGER)
        lines = (
            json.dumps({"id": problem.id, "prompt": [{"role": "user", "content": problem.prompt}]}) + "\n"
            for problem in problems
        )
        prompts_import(project=project, data="".join(lines).encode())
        return project

    def _generate(self, *, policy: Policy, project: Project, n: int, temperature: float) -> GenerationJob:
        job = generation_job_create(
            policy=policy,
            project=project,
            n=n,
            created_by=self.manager,
            temperature=temperature,
            max_new_tokens=self.settings.max_new_tokens,
            seed=self.settings.seed,
        )

        def poll() -> tuple[bool, str]:
            job.refresh_from_db()
            if job.status in (GenerationJob.Status.FAILED, GenerationJob.Status.CANCELLED):
                raise LoopFailed(f"generation job {job.pk} {job.status}: {job.error}")
            return (
                job.status == GenerationJob.Status.SUCCEEDED,
                f"job {job.pk} {job.status}, {job.prompts_done}/{job.prompts_total} prompts",
            )

        self.wait_for(f"{policy} on {project.name}", poll)
        return job

    # -- stages --

    def run(self) -> LoopReport:
        started = time.monotonic()
        settings = self.settings
        with transaction.atomic():
            self._manager_and_sft()
            self.train_project = self._project("train", problems=self.train, k=settings.k)
            self.heldout_project = self._project("held-out", problems=self.heldout, k=settings.k)
            self.eval_project = self._project("evaluation prompts", problems=self.evaluation, k=2)
            # The SFT policy is registered for the loop's projects, so their manager may use it.
            self.sft.projects.add(self.train_project, self.heldout_project, self.eval_project)
        manager_api = ApiClient(settings.base_url, self.manager_token)

        with self.stage("generate"):
            job = self._generate(
                policy=self.sft, project=self.train_project, n=settings.k, temperature=settings.temperature
            )
            self.report.labeling["tasks"] = job.tasks_created
        with self.stage("label"):
            self._label()
        with self.stage("build"):
            build = self._build(manager_api, sft_in_preferences=True)
        # Every policy the loop trains or registers, by report key, SFT first (see POLICY_LABELS).
        self.policies: dict[str, Policy] = {"sft": self.sft}
        if settings.sft_hyperparameters:
            with self.stage("train SFT on top-ranked"):
                sft_run = self._train(
                    manager_api, build=build, kind="sft", hyperparameters=settings.sft_hyperparameters
                )
            self.policies["sft_top"] = Policy.objects.get(pk=sft_run["policy"])
        with self.stage("train reward model"):
            reward_run = self._train(manager_api, build=build, kind="reward")
        with self.stage("train DPO policy"):
            dpo_run = self._train(manager_api, build=build, kind="dpo")
        self.dpo = self.policies["dpo"] = Policy.objects.get(pk=dpo_run["policy"])
        self.rl: Policy | None = None
        if settings.rl_hyperparameters:
            with self.stage("train RL policy"):
                rl_run = self._train(
                    manager_api,
                    build=build,
                    kind="rl",
                    hyperparameters=settings.rl_hyperparameters,
                    extra={
                        "against_reward_model": reward_run["reward_model"],
                        "true_scorer": "demo_arithmetic",
                    },
                )
            self.rl = self.policies["rl"] = Policy.objects.get(pk=rl_run["policy"])
            self._rl_watch(rl_run["id"])
        if settings.best_of_n:
            self.policies["best_of_n"] = self._best_of_n(reward_model_id=reward_run["reward_model"])
        with self.stage("generate held-out answers"):
            self._generate(
                policy=self.sft, project=self.heldout_project, n=settings.k, temperature=settings.temperature
            )
            for key, policy in self.policies.items():
                temperature = settings.best_of_n_temperature if key == "best_of_n" else EVAL_TEMPERATURE
                self._generate(policy=policy, project=self.eval_project, n=1, temperature=temperature)
        with self.stage("score reward model against truth"):
            self._reward_accuracy(reward_run)
        with self.stage("blind A/B"):
            self._policy_accuracy()
            session = self._ab()
        with self.stage("reward model on the A/B votes"):
            self._reward_agreement(session, reward_model_id=reward_run["reward_model"])
        self.report.total_seconds = round(time.monotonic() - started, 1)
        self._goals()
        return self.report

    def _best_of_n(self, *, reward_model_id: int) -> Policy:
        """The manager registers best-of-n with the loop's reward model over the SFT policy."""
        from training.models import RewardModel
        from training.services import best_of_n_policy_create

        n = self.settings.best_of_n
        policy = best_of_n_policy_create(
            base_policy=self.sft,
            reward_model=RewardModel.objects.get(pk=reward_model_id),
            n=n,
            name=f"loop {self.tag} best-of-{n}",
        )
        self.report.best_of_n = {
            "policy": str(policy),
            "n": n,
            "temperature": self.settings.best_of_n_temperature,
            "reward_model": reward_model_id,
        }
        return policy

    def _label(self) -> None:
        people = [(name, noise, *self._person(f"labeler-{name}", Role.LABELER)) for name, noise in LABELERS]
        for _, _, user, _ in people:
            Membership.objects.get_or_create(project=self.train_project, user=user, role=Role.LABELER)
        results = self._in_threads(
            [(name, noise, token, self.train_project.pk) for name, noise, _, token in people],
            self._labeler_work,
        )
        self.report.labeling["labelers"] = results
        self.report.labeling["judgments"] = sum(r["judgments"] for r in results)

    def _labeler_work(self, name: str, noise: float, token: str, project_id: int) -> dict[str, Any]:
        api = ApiClient(self.settings.base_url, token)
        rng = random.Random(f"{self.settings.seed}:labeler:{name}")  # noqa: S311 (simulation, not secrets)
        judgments = agree = 0
        while True:
            status, assignment = api.request("POST", f"/api/projects/{project_id}/next")
            if status == 204:
                break
            if status != 200:
                raise LoopFailed(f"labeler {name}: claim answered {status}: {assignment}")
            problem = self.truth[assignment["prompt"]["messages"][0]["content"]]
            completions = {c["id"]: c["text"] for c in assignment["completions"]}
            ranks = labeler_ranks(problem, completions, noise=noise, rng=rng)
            honest = labeler_ranks(problem, completions, noise=0.0, rng=rng)
            agree += ranks == honest
            api.expect(
                "POST",
                f"/api/assignments/{assignment['id']}/judgment",
                {"ranks": ranks, "active_seconds": 20.0, "client_token": uuid.uuid4().hex},
            )
            judgments += 1
        return {"name": name, "noise": noise, "judgments": judgments, "matches_truth": agree}

    def _in_threads(
        self, jobs: list[tuple[Any, ...]], work: Callable[..., dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """`work(*args)` for every job at once, one simulated person per thread; their results in order."""
        from django.db import connection

        def run(args: tuple[Any, ...]) -> dict[str, Any]:
            try:
                return work(*args)
            finally:
                connection.close()  # each thread opened its own

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            try:
                return list(pool.map(run, jobs))
            except Exception as error:
                raise LoopFailed(f"a simulated person stopped: {error}") from error

    def _build(
        self, api: ApiClient, *, project: Project | None = None, name: str = "", **options: Any
    ) -> dict[str, Any]:
        build = api.expect(
            "POST",
            "/api/dataset-builds/",
            {
                "name": name or f"loop {self.tag}",
                "projects": [(project or self.train_project).pk],
                "format": "conversational",
                "ties": "drop",
                "test_fraction": 0.1,
                "seed": self.settings.seed,
                **options,
            },
        )

        def poll() -> tuple[bool, str]:
            nonlocal build
            build = api.expect("GET", f"/api/dataset-builds/{build['id']}/")
            if build["status"] == "failed":
                raise LoopFailed(f"dataset build {build['id']} failed: {build['error']}")
            return build["status"] == "succeeded", f"build {build['id']} {build['status']}"

        self.wait_for("dataset build", poll)
        self.report.dataset_build = {
            "id": build["id"],
            "counts": build["counts"],
            "hash": build["content_hash"],
        }
        return build

    def _train(
        self,
        api: ApiClient,
        *,
        build: dict[str, Any],
        kind: str,
        hyperparameters: dict[str, Any] | None = None,
        name: str = "",
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if hyperparameters is None:
            hyperparameters = (
                self.settings.reward_hyperparameters
                if kind == "reward"
                else self.settings.dpo_hyperparameters
            )
        run = api.expect(
            "POST",
            "/api/training-runs/",
            {
                "name": name or f"loop {self.tag} {kind}",
                "kind": kind,
                "dataset_build": build["id"],
                "base_model": self.settings.base_model,
                "peft": self.settings.peft,
                "trainer": TrainingRun.Trainer.GROUPED,
                "hyperparameters": hyperparameters,
                **(extra or {}),
            },
        )

        def poll() -> tuple[bool, str]:
            nonlocal run
            run = api.expect("GET", f"/api/training-runs/{run['id']}/")
            if run["status"] in ("failed", "cancelled"):
                raise LoopFailed(f"{kind} run {run['id']} {run['status']}: {run['error']}")
            return run[
                "status"
            ] == "succeeded", f"run {run['id']} {run['status']} step {run['step']}/{run['total_steps']}"

        self.wait_for(f"{kind} run", poll)
        return run

    def _reward_accuracy(self, run: dict[str, Any]) -> None:
        """The reward model's pairwise accuracy against the truth, on held-out and on training prompts."""
        from training.models import RewardModel
        from training.scoring import reward_model_load

        reward_model = RewardModel.objects.get(pk=run["reward_model"])
        tokenizer, model = reward_model_load(storage_path_resolve(reward_model.path))
        heldout = self._pair_accuracy(tokenizer, model, self.heldout_project)
        seen = self._pair_accuracy(tokenizer, model, self.train_project)
        self.report.reward_model = {
            "run": run["id"],
            "accuracy_right_vs_wrong": heldout[0],
            "accuracy_nearer_vs_farther": heldout[1],
            "accuracy_train_right_vs_wrong": seen[0],
            "accuracy_train_nearer_vs_farther": seen[1],
            "run_metrics": run["metrics"],
        }

    def _pair_accuracy(
        self, tokenizer: Any, model: Any, project: Project
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Over pairs of a project's SFT samples whose distances to the truth differ, how often the
        nearer one scores higher: (pairs with one right answer, all such pairs)."""
        from training.scoring import reward_scores

        completions = list(
            Completion.objects.filter(prompt__project=project, policy=self.sft).select_related("prompt")
        )
        scores = reward_scores(
            tokenizer,
            model,
            [c.prompt.messages for c in completions],
            [[{"role": "assistant", "content": c.text}] for c in completions],
            batch_size=64,
        )
        score = {c.pk: s for c, s in zip(completions, scores, strict=True)}
        groups: dict[int, list[Completion]] = {}
        for completion in completions:
            groups.setdefault(completion.prompt_id, []).append(completion)
        right_vs_wrong = [0, 0]
        nearer = [0, 0]
        for group in groups.values():
            problem = self.truth[group[0].prompt.messages[0]["content"]]
            for i, a in enumerate(group):
                for b in group[i + 1 :]:
                    da, db = distance_to_truth(problem, a.text), distance_to_truth(problem, b.text)
                    if da == db:
                        continue
                    better, worse = (a, b) if da < db else (b, a)
                    hit = score[better.pk] > score[worse.pk]
                    nearer[0] += hit
                    nearer[1] += 1
                    if da == 0 or db == 0:
                        right_vs_wrong[0] += hit
                        right_vs_wrong[1] += 1
        return _interval_dict(*right_vs_wrong), _interval_dict(*nearer)

    def _rl_watch(self, run_id: int) -> None:
        """The RL run's over-optimisation points, as its run page plots them."""
        from training.models import TrainingRunMetric

        for step, values in (
            TrainingRunMetric.objects.filter(run_id=run_id)
            .order_by("step", "id")
            .values_list("step", "values")
        ):
            if "watch/kl" in values:
                self.report.rl_watch.append(
                    {
                        "step": step,
                        "kl": values["watch/kl"],
                        "proxy_reward": values.get("watch/proxy_reward"),
                        "true_score": values.get("watch/true_score"),
                    }
                )

    def _policy_accuracy(self) -> None:
        """Each policy's share of right answers on the evaluation problems, and its gain over SFT."""
        for key, policy in self.policies.items():
            completions = Completion.objects.filter(prompt__project=self.eval_project, policy=policy)
            right = sum(
                answer_is_correct(self.truth[c.prompt.messages[0]["content"]], c.text)
                for c in completions.select_related("prompt")
            )
            self.report.policies[key] = {"policy": str(policy), **_interval_dict(right, completions.count())}
        sft = self.report.policies["sft"]["value"]
        for key in self.policies:
            value = self.report.policies[key]["value"]
            if key != "sft":
                self.report.policies[key]["gain_points"] = (
                    None if sft is None or value is None else round(100 * (value - sft), 1)
                )
        # The first figures the report had, kept where they were for readers of the JSON.
        self.report.policies["gain_points"] = self.report.policies["dpo"]["gain_points"]
        if self.rl:
            self.report.policies["rl_gain_points"] = self.report.policies["rl"]["gain_points"]

    def _ab(self) -> Project:
        """One blind session of every policy: ab_session_create pairs them round robin over the prompts
        (prompt i on pair i mod C(P,2)), so each pair gets the same share; the simulated evaluators
        answer through the API. Head-to-head with SFT per policy, Bradley–Terry ratings over all pairs."""
        session = ab_session_create(
            name=f"Loop {self.tag}: {', '.join(POLICY_LABELS[key] for key in self.policies)}",
            policies=list(self.policies.values()),
            prompts=list(self.eval_project.prompts.order_by("id")),
            votes_per_pair=1,
            created_by=self.manager,
        )
        people = [
            (name, noise, *self._person(f"evaluator-{name}", Role.EVALUATOR)) for name, noise in EVALUATORS
        ]
        for _, _, user, _ in people:
            Membership.objects.get_or_create(project=session, user=user, role=Role.EVALUATOR)
        results = self._in_threads(
            [(name, noise, token, session.pk) for name, noise, _, token in people], self._evaluator_work
        )
        votes = ab_votes(project=session)
        table = pair_table(votes)
        names = {key: str(policy) for key, policy in self.policies.items()}
        versus_sft = {key: _head_to_head(table, names[key], names["sft"]) for key in names if key != "sft"}
        dpo = versus_sft["dpo"]
        self.report.ab = {
            "session": session.pk,
            "evaluators": results,
            "votes": len(votes),
            "pairs": len(self.policies) * (len(self.policies) - 1) // 2,
            # DPO against SFT, as the first report had it (now their pair's votes in the session)
            "dpo_wins": dpo["wins"],
            "sft_wins": dpo["losses"],
            "ties": dpo["ties"],
            "both_bad": dpo["both_bad"],
            "dpo_win_rate": dpo["win_rate"],
            "versus_sft": versus_sft,
            "pair_table": table,
            "ratings": bradley_terry_ratings(votes, rounds=1000, seed=self.settings.seed),
            "position_bias": position_bias(votes),
            "names": names,
        }
        return session

    def _reward_agreement(self, session: Project, *, reward_model_id: int) -> None:
        """The manager attaches the reward model to the session: a scoring job on the gpu queue scores
        both sides of every pair; how often it sides with the evaluators is the results page's figure."""
        from annotation.ab_stats import scorer_agreement
        from annotation.selectors import ab_scored_votes, completion_scores

        self._score(session, reward_model_id=reward_model_id, what="scoring the A/B session")
        rows = scorer_agreement(ab_scored_votes(project=session), completion_scores(project=session))
        row = rows[0] if rows else {}
        self.report.ab["reward_model_agreement"] = {
            key: row.get(key) for key in ("agreement", "low", "high", "votes", "agree", "scorer_tie_rate")
        }

    def _score(self, project: Project, *, reward_model_id: int, what: str) -> None:
        """The manager attaches a reward model to the project; wait for its scoring job on the gpu queue."""
        from training.models import RewardModel, ScoringJob
        from training.services import scoring_job_create

        job = scoring_job_create(
            project=project, reward_model=RewardModel.objects.get(pk=reward_model_id), created_by=self.manager
        )

        def poll() -> tuple[bool, str]:
            job.refresh_from_db()
            if job.status in (ScoringJob.Status.FAILED, ScoringJob.Status.CANCELLED):
                raise LoopFailed(f"scoring job {job.pk} {job.status}: {job.error}")
            done = job.status == ScoringJob.Status.SUCCEEDED
            return (
                done,
                f"job {job.pk} {job.status}, {job.completions_done}/{job.completions_total} completions",
            )

        self.wait_for(what, poll)

    def _evaluator_work(self, name: str, noise: float, token: str, project_id: int) -> dict[str, Any]:
        api = ApiClient(self.settings.base_url, token)
        rng = random.Random(f"{self.settings.seed}:evaluator:{name}")  # noqa: S311 (simulation, not secrets)
        votes = 0
        while True:
            status, assignment = api.request("POST", f"/api/projects/{project_id}/next")
            if status == 204:
                break
            if status != 200:
                raise LoopFailed(f"evaluator {name}: claim answered {status}: {assignment}")
            problem = self.truth[assignment["prompt"]["messages"][0]["content"]]
            left, right = assignment["completions"]
            verdict = evaluator_verdict(problem, left["text"], right["text"], noise=noise, rng=rng)
            api.expect(
                "POST",
                f"/api/assignments/{assignment['id']}/judgment",
                {**verdict_answer(verdict, left["id"], right["id"]), "client_token": uuid.uuid4().hex},
            )
            votes += 1
        return {"name": name, "noise": noise, "votes": votes}

    def _goals(self) -> None:
        reward = self.report.reward_model["accuracy_right_vs_wrong"]["value"]
        gain = self.report.policies["gain_points"]
        win = self.report.ab["dpo_win_rate"]
        self.report.goals = [
            {
                "goal": "reward model picks the right answer over a wrong one (held-out)",
                "target": "≥ 75%",
                "reached": reward,
                "met": reward is not None and reward >= 0.75,
            },
            {
                "goal": "DPO accuracy minus SFT accuracy (held-out)",
                "target": "≥ +10 points",
                "reached": gain,
                "met": gain is not None and gain >= 10,
            },
            *(
                [
                    {
                        "goal": "RL accuracy minus SFT accuracy (held-out)",
                        "target": "≥ +10 points",
                        "reached": self.report.policies.get("rl_gain_points"),
                        "met": (self.report.policies.get("rl_gain_points") or 0) >= 10,
                    }
                ]
                if "rl" in self.report.policies
                else []
            ),
            {
                "goal": "A/B win rate of DPO over SFT (their pairs in the session), 95% interval",
                "target": "lower bound > 50%",
                "reached": [win["low"], win["high"]],
                "met": win["low"] is not None and win["low"] > 0.5,
            },
            {
                "goal": "whole loop on this machine",
                "target": "< 20 minutes",
                "reached": self.report.total_seconds,
                "met": self.report.total_seconds < 20 * 60,
            },
        ]


# --- the report as Markdown and SVG ---------------------------------------------------------

PICTURE = "loop-recipes.svg"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _interval_text(measure: dict[str, Any]) -> str:
    if measure["value"] is None:
        return "n/a (no trials)"
    return (
        f"{_percent(measure['value'])} ({measure['successes']}/{measure['trials']}; "
        f"95% CI {_percent(measure['low'])}–{_percent(measure['high'])})"
    )


def _interval_short(measure: dict[str, Any] | None) -> str:
    if not measure or measure.get("value") is None:
        return "n/a"
    return f"{_percent(measure['value'])} ({_percent(measure['low'])}–{_percent(measure['high'])})"


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def _agreement_text(agreement: dict[str, Any]) -> str:
    if agreement.get("agreement") is None:
        return "n/a"
    return (
        f"{_percent(agreement['agreement'])} ({agreement['agree']}/{agreement['votes']}; "
        f"95% CI {_percent(agreement['low'])}–{_percent(agreement['high'])})"
    )


def _policy_keys(report: dict[str, Any]) -> list[str]:
    """The report's policies in POLICY_LABELS order (a report may lack some)."""
    return [key for key in POLICY_LABELS if isinstance(report["policies"].get(key), dict)]


def _label(report: dict[str, Any], key: str) -> str:
    if key == "best_of_n" and report.get("best_of_n"):
        return f"best-of-{report['best_of_n']['n']}"
    return POLICY_LABELS.get(key, key)


def _rating_of(report: dict[str, Any], key: str) -> dict[str, Any] | None:
    name = report["ab"].get("names", {}).get(key)
    return next((row for row in report["ab"].get("ratings", []) if row["policy"] == name), None)


def _rating_text(rating: dict[str, Any] | None) -> str:
    return "n/a" if rating is None else f"{rating['rating']:.0f} ({rating['low']:.0f}–{rating['high']:.0f})"


def _head_to_head_text(row: dict[str, Any] | None) -> str:
    if not row:
        return "—"
    return f"{row['wins']}–{row['losses']} ({row['ties']} ties, {row['both_bad']} both bad)"


def recipes_table(report: dict[str, Any]) -> list[str]:
    """One row per policy: accuracy against the truth, gain over SFT, head-to-head with SFT, rating."""
    versus = report["ab"].get("versus_sft", {})
    lines = [
        "| policy | right answers (95% CI) | gain over SFT (points) | A/B vs SFT: won–lost | "
        "A/B win rate vs SFT (95% CI) | Bradley–Terry (95% CI) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in _policy_keys(report):
        measure = report["policies"][key]
        lines.append(
            f"| {_label(report, key)} | {_interval_short(measure)} | "
            f"{'—' if key == 'sft' else _points(measure.get('gain_points'))} | "
            f"{_head_to_head_text(versus.get(key))} | "
            f"{'—' if key == 'sft' else _interval_short((versus.get(key) or {}).get('win_rate'))} | "
            f"{_rating_text(_rating_of(report, key))} |"
        )
    return lines


def watch_table(watch: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| step | KL to SFT | proxy reward (reward model) | true score (share right) |",
        "| --- | --- | --- | --- |",
    ]
    for point in watch:
        true = point.get("true_score")
        lines.append(
            f"| {point['step']} | {point['kl']:.3f} | {point['proxy_reward']:.3f} | "
            f"{'n/a' if true is None else _percent(true)} |"
        )
    return lines


def report_markdown(report: dict[str, Any], *, picture: str | None = None) -> str:
    """The report for people: goals first, then each stage's figures and timings."""
    settings = report["settings"]
    lines = [
        "# Rankwise loop report",
        "",
        f"Demo task: arithmetic word problems. {settings['train_prompts']} training prompts × K={settings['k']} "
        f"SFT samples (temperature {settings['temperature']}), {settings['heldout_prompts']} held-out prompts "
        f"for the reward model, {settings['eval_prompts']} held-out prompts for the policies. "
        f"Base model: `{Path(settings['base_model']).name}`; seed {settings['seed']}.",
        "",
        "## Goals",
        "",
        "| goal | target | reached | met |",
        "| --- | --- | --- | --- |",
    ]
    for goal in report["goals"]:
        lines.append(f"| {goal['goal']} | {goal['target']} | {_goal_reached(goal)} | {_goal_met(goal)} |")
    reward = report["reward_model"]
    policies = report["policies"]
    ab = report["ab"]
    if ab.get("versus_sft"):
        best_of_n = report.get("best_of_n") or {}
        lines += [
            "",
            "## Recipes compared",
            "",
            f"Right answers: each policy answers the {settings['eval_prompts']} held-out problems once, at "
            f"temperature {EVAL_TEMPERATURE}"
            + (
                f" (best-of-{best_of_n['n']} samples its candidates from SFT at temperature "
                f"{best_of_n['temperature']} and keeps the reward model's favourite)"
                if best_of_n
                else ""
            )
            + "; 95% Wilson intervals. A/B: one blind session of all of them, round-robin pairs "
            f"({len(_policy_keys(report))} policies, {ab.get('pairs', 'n/a')} pairs, {ab['votes']} votes: a "
            "prompt on which a pair wrote the same text gets no vote); won–lost counts the decisive votes "
            "against SFT; Bradley–Terry ratings on the Elo scale (mean 1000) with 95% bootstrap "
            "intervals over prompts.",
            "",
            *recipes_table(report),
        ]
        if picture:
            lines += ["", f"![accuracy per recipe and the over-optimisation curve]({picture})"]
    lines += [
        "",
        "## Reward model against the truth (held-out problems)",
        "",
        f"- right answer scored above a wrong one: {_interval_text(reward['accuracy_right_vs_wrong'])}",
        f"- nearer answer scored above a farther one: {_interval_text(reward['accuracy_nearer_vs_farther'])}",
        f"- the same on the training problems (what it was taught): "
        f"{_interval_text(reward['accuracy_train_right_vs_wrong'])}",
        f"- on the build's test pairs (the labelers' noisy preferences, not the truth): "
        f"{_percent(reward['run_metrics'].get('pairwise_accuracy'))}, with "
        f"{_percent(reward['run_metrics'].get('tie_rate'))} scored as ties: pairs of identical answers "
        "that a labeler ranking at random put in an order, which count as misses",
        "",
        f"## Policies against the truth (held-out problems, temperature {EVAL_TEMPERATURE})",
        "",
        f"- SFT: {_interval_text(policies['sft'])}",
        f"- DPO: {_interval_text(policies['dpo'])}",
        f"- gain: {policies['gain_points']:+.1f} points"
        if policies["gain_points"] is not None
        else "- gain: n/a",
        "",
    ]
    if "rl" in policies:
        gain = policies.get("rl_gain_points")
        lines += [
            f"- RL (RLOO against the reward model): {_interval_text(policies['rl'])}",
            f"- RL gain over SFT: {gain:+.1f} points" if gain is not None else "- RL gain over SFT: n/a",
            "",
        ]
    for key in ("sft_top", "best_of_n"):
        if key in policies:
            lines += [
                f"- {_label(report, key)}: {_interval_text(policies[key])}, "
                f"{_points(policies[key].get('gain_points'))} points over SFT",
                "",
            ]
    if report.get("rl_watch"):
        lines += [
            "## RL against the reward model: proxy reward and truth against KL (held-out prompts)",
            "",
            *watch_table(report["rl_watch"]),
            "",
        ]
    lines += _ab_lines(report)
    labeling = report["labeling"]
    lines += [
        "",
        "## Simulated people",
        "",
        "| who | noise (share answered at random) | answers | answers equal to the truth's ranking |",
        "| --- | --- | --- | --- |",
    ]
    for person in labeling["labelers"]:
        lines.append(
            f"| labeler {person['name']} | {person['noise']:.0%} | {person['judgments']} | "
            f"{_percent(person['matches_truth'] / person['judgments'] if person['judgments'] else None)} |"
        )
    for person in ab["evaluators"]:
        lines.append(f"| evaluator {person['name']} | {person['noise']:.0%} | {person['votes']} | |")
    counts = (report.get("dataset_build") or {}).get("counts")
    if counts:
        lines += ["", f"Dataset build rows: {json.dumps(counts, sort_keys=True)}."]
    lines += ["", "## Stages", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {stage['name']} | {stage['seconds']:.1f} |" for stage in report["stages"]]
    lines += [f"| **total** | **{report['total_seconds']:.1f}** |", ""]
    return "\n".join(lines)


def _goal_reached(goal: dict[str, Any]) -> str:
    reached = goal["reached"]
    if isinstance(reached, list):
        return f"{_percent(reached[0])}–{_percent(reached[1])}"
    if isinstance(reached, float) and goal["target"].endswith("%"):
        return _percent(reached)
    if goal["goal"].startswith("whole loop"):
        return f"{reached / 60:.1f} min"
    if goal["goal"].startswith(("DPO accuracy", "RL accuracy")):
        return "n/a" if reached is None else f"{reached:+.1f} points"
    return str(reached)


def _goal_met(goal: dict[str, Any]) -> str:
    return "yes" if goal["met"] else "**no**"


def _ab_lines(report: dict[str, Any]) -> list[str]:
    ab = report["ab"]
    names = ab.get("names", {})
    label = {
        value: _label(report, key) if key in POLICY_LABELS else key.upper() for key, value in names.items()
    }
    several = len(names) > 2
    lines = [
        "## Blind A/B: every policy with SFT, round-robin pairs" if several else "## Blind A/B: DPO vs SFT",
        "",
        f"{ab['votes']} votes. DPO against SFT: DPO won {ab['dpo_wins']}, SFT won {ab['sft_wins']}, "
        f"{ab['ties']} ties (both right), {ab['both_bad']} both bad (both wrong).",
        "",
        f"- DPO win rate over decisive votes: {_interval_text(ab['dpo_win_rate'])}",
        f"- the reward model sided with the evaluators on "
        f"{_agreement_text(ab.get('reward_model_agreement') or {})} of the decisive votes "
        "(scored by a scoring job on the gpu queue, as the results page shows it)",
        f"- left side won {_percent(ab['position_bias']['left_share'])} of decisive votes "
        f"(95% CI {_percent(ab['position_bias']['low'])}–{_percent(ab['position_bias']['high'])})",
        "",
    ]
    if several and ab.get("pair_table"):
        lines += [
            "| pair | won–lost | ties | both bad | win rate (95% CI) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in ab["pair_table"]:
            first, second = (
                label.get(row["policy"], row["policy"]),
                label.get(row["opponent"], row["opponent"]),
            )
            rate = (
                "n/a"
                if row["win_rate"] is None
                else f"{_percent(row['win_rate'])} ({_percent(row['win_rate_low'])}–"
                f"{_percent(row['win_rate_high'])})"
            )
            lines.append(
                f"| {first} vs {second} | {row['wins_first']}–{row['wins_second']} | {row['ties']} | "
                f"{row['both_bad']} | {rate} |"
            )
        lines.append("")
    lines += [
        "| policy | Bradley–Terry rating | 95% CI (bootstrap over prompts) |",
        "| --- | --- | --- |",
    ]
    for row in ab["ratings"]:
        lines.append(
            f"| {label.get(row['policy'], row['policy'])} | {row['rating']:.0f} | "
            f"{row['low']:.0f}–{row['high']:.0f} |"
        )
    return lines


def recipes_picture(reports: list[dict[str, Any]], path: Path) -> None:
    """The recipes as an SVG: left, each policy's share of right answers with its 95% interval, per
    seed; right, RL's over-optimisation curve — proxy reward (solid) and true score (dashed) against
    KL to SFT — per seed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (accuracy, curve) = pyplot.subplots(1, 2, figsize=(11.0, 4.2))
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    keys = [key for key in POLICY_LABELS if any(key in _policy_keys(report) for report in reports)]
    width = 0.8 / max(1, len(reports))
    for index, report in enumerate(reports):
        colour = colours[index % len(colours)]
        seed = report["settings"]["seed"]
        xs, values, errors = [], [], [[], []]
        for position, key in enumerate(keys):
            measure = report["policies"].get(key)
            if not isinstance(measure, dict) or measure.get("value") is None:
                continue
            xs.append(position - 0.4 + width * (index + 0.5))
            values.append(measure["value"])
            errors[0].append(measure["value"] - measure["low"])
            errors[1].append(measure["high"] - measure["value"])
        accuracy.bar(xs, values, width=width * 0.9, color=colour, alpha=0.8, label=f"seed {seed}")
        accuracy.errorbar(xs, values, yerr=errors, fmt="none", ecolor="black", capsize=3, linewidth=1)
    accuracy.set_xticks(range(len(keys)), [_label(reports[0], key) for key in keys], rotation=20, ha="right")
    accuracy.set_ylabel("right answers, held-out problems")
    accuracy.set_ylim(0, 1)
    accuracy.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    accuracy.set_title("accuracy against the truth (95% CI)")
    accuracy.grid(axis="y", alpha=0.3)
    accuracy.legend(loc="lower right")

    truth = curve.twinx()
    drawn = False
    for index, report in enumerate(reports):
        watch = report.get("rl_watch") or []
        if not watch:
            continue
        drawn = True
        colour = colours[index % len(colours)]
        seed = report["settings"]["seed"]
        kls = [point["kl"] for point in watch]
        curve.plot(
            kls,
            [point["proxy_reward"] for point in watch],
            color=colour,
            marker="o",
            label=f"proxy reward, seed {seed}",
        )
        known = [(point["kl"], point["true_score"]) for point in watch if point.get("true_score") is not None]
        if known:
            truth.plot(
                [kl for kl, _ in known],
                [score for _, score in known],
                color=colour,
                marker="s",
                linestyle="--",
                label=f"true score, seed {seed}",
            )
    curve.set_xlabel("KL to SFT (held-out prompts)")
    curve.set_ylabel("proxy reward (reward model score)")
    truth.set_ylabel("true score (share right)")
    truth.set_ylim(0, 1)
    truth.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    curve.set_title("RL against the reward model: over-optimisation")
    curve.grid(alpha=0.3)
    if drawn:
        handles = curve.get_legend_handles_labels()
        more = truth.get_legend_handles_labels()
        curve.legend(handles[0] + more[0], handles[1] + more[1], fontsize="small", loc="best")
    else:
        curve.text(0.5, 0.5, "no RL run", ha="center", va="center", transform=curve.transAxes)
    figure.tight_layout()
    figure.savefig(path, format="svg", metadata={"Date": None})
    pyplot.close(figure)


def report_write(report: LoopReport, out_dir: Path) -> tuple[Path, Path]:
    """loop-report.json, loop-report.md and the picture (loop-recipes.svg) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = report.as_dict()
    json_path, markdown_path = out_dir / "loop-report.json", out_dir / "loop-report.md"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    recipes_picture([data], out_dir / PICTURE)
    markdown_path.write_text(report_markdown(data, picture=PICTURE), encoding="utf-8")
    return json_path, markdown_path


# --- several seeds -----------------------------------------------------------------------------


def seeds_summary(reports: list[dict[str, Any]], *, total_seconds: float, at_once: int = 1) -> dict[str, Any]:
    """The seeds side by side: per policy, each seed's accuracy and both seeds pooled (a Wilson
    interval over all their problems: it covers which problems were drawn, not how training varies
    between seeds), the mean gain over SFT, and the whole run's wall time (`at_once` seeds ran at
    the same time)."""
    keys = [key for key in POLICY_LABELS if all(key in _policy_keys(report) for report in reports)]
    policies: dict[str, Any] = {}
    for key in keys:
        measures = [report["policies"][key] for report in reports]
        gains = [m.get("gain_points") for m in measures]
        policies[key] = {
            "label": _label(reports[0], key),
            "pooled": _interval_dict(
                sum(m["successes"] for m in measures), sum(m["trials"] for m in measures)
            ),
            "mean_gain_points": None
            if key == "sft" or any(g is None for g in gains)
            else round(sum(gains) / len(gains), 1),
        }
    return {
        "seeds": [report["settings"]["seed"] for report in reports],
        "policies": policies,
        "total_seconds": round(total_seconds, 1),
        "at_once": at_once,
        "reports": reports,
    }


def seeds_markdown(summary: dict[str, Any], *, picture: str | None = None) -> str:
    reports = summary["reports"]
    seeds = summary["seeds"]
    minutes = summary["total_seconds"] / 60
    at_once = summary.get("at_once", 1)
    how = (
        "one seed after the other"
        if at_once == 1
        else f"{at_once} seeds at a time, side by side, the gpu worker running {at_once} jobs at once"
    )
    lines = [
        f"# Rankwise loop report: seeds {', '.join(map(str, seeds))}",
        "",
        f"The whole loop once per seed (new problems, rankings, runs and A/B session each time), "
        f"{how}; {minutes:.1f} minutes in all, the stack's start included (goal: under 20: "
        f"{'met' if minutes < 20 else '**not met**'}). Each seed's full report is in `seed-<n>/`.",
        "",
        "## Right answers on held-out problems, per seed",
        "",
        "| policy | "
        + " | ".join(f"seed {seed} (95% CI)" for seed in seeds)
        + " | pooled (95% CI) | mean gain over SFT (points) |",
        "| --- | " + " | ".join("---" for _ in seeds) + " | --- | --- |",
    ]
    for key, row in summary["policies"].items():
        cells = [_interval_short(report["policies"][key]) for report in reports]
        gain = "—" if key == "sft" else _points(row["mean_gain_points"])
        lines.append(f"| {row['label']} | {' | '.join(cells)} | {_interval_short(row['pooled'])} | {gain} |")
    lines += [
        "",
        "## Blind A/B with SFT (one session per seed, round-robin pairs)",
        "",
        "| policy | "
        + " | ".join(f"seed {seed}: win rate vs SFT (95% CI)" for seed in seeds)
        + " | "
        + " | ".join(f"seed {seed}: Bradley–Terry (95% CI)" for seed in seeds)
        + " |",
        "| --- | " + " | ".join("---" for _ in seeds * 2) + " |",
    ]
    for key, row in summary["policies"].items():
        rates = [
            "—"
            if key == "sft"
            else _interval_short((report["ab"].get("versus_sft", {}).get(key) or {}).get("win_rate"))
            for report in reports
        ]
        ratings = [_rating_text(_rating_of(report, key)) for report in reports]
        lines.append(f"| {row['label']} | {' | '.join(rates)} | {' | '.join(ratings)} |")
    lines += [
        "",
        "## Goals, per seed",
        "",
        "| goal | target | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "| --- | --- | " + " | ".join("---" for _ in seeds) + " |",
    ]
    for position, goal in enumerate(reports[0]["goals"]):
        cells = []
        for report in reports:
            other = report["goals"][position]
            cells.append(f"{_goal_reached(other)} ({'met' if other['met'] else '**not met**'})")
        lines.append(f"| {goal['goal']} | {goal['target']} | {' | '.join(cells)} |")
    for report in reports:
        if report.get("rl_watch"):
            lines += [
                "",
                f"## Over-optimisation, seed {report['settings']['seed']}: proxy reward and truth against KL",
                "",
                *watch_table(report["rl_watch"]),
            ]
    if picture:
        lines += ["", f"![accuracy per recipe and the over-optimisation curve]({picture})"]
    stage_names = [stage["name"] for stage in reports[0]["stages"]]
    lines += [
        "",
        "## Stages (seconds)",
        "",
        "| stage | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "| --- | " + " | ".join("---" for _ in seeds) + " |",
    ]
    for name in stage_names:
        cells = [
            next((f"{stage['seconds']:.1f}" for stage in report["stages"] if stage["name"] == name), "—")
            for report in reports
        ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines.append(
        "| **loop** | " + " | ".join(f"**{report['total_seconds']:.1f}**" for report in reports) + " |"
    )
    lines += ["", f"Whole run, stack start included: {summary['total_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def seeds_write(summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """loop-report.json, loop-report.md and loop-recipes.svg for all seeds in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out_dir / "loop-report.json", out_dir / "loop-report.md"
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    recipes_picture(summary["reports"], out_dir / PICTURE)
    markdown_path.write_text(seeds_markdown(summary, picture=PICTURE), encoding="utf-8")
    return json_path, markdown_path
