"""SFT and RL runs: from the API and the run form to a registered policy, with a real worker and tiny models."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from annotation.models import Policy
from annotation.roles import Role
from config.storage import storage_path_resolve
from tests.factories import user_with_roles
from tests.training.test_builds_support import (
    build_folder,
    judge,
    make_manager,
    project_with_prompts,
    read_rows,
    run_build,
    tasks_of,
)
from tests.training.test_runs import RUN_TIMEOUT_S, TINY, create, wait_for, worker_test
from training.demo.task import completion_canonical, demo_problems
from training.demo.truth import prompt_answer, true_scorer
from training.models import DatasetBuild, RewardModel, TrainingRun, TrainingRunMetric
from training.rl import TRUE_SCORERS, true_scorer_check
from training.runner import RunSpec
from training.services import dataset_build_create, dataset_build_run, training_run_cancel

# Four sampled completions per prompt, two prompts per step; short samples keep the tiny runs fast.
RL_TINY = {
    **TINY,
    "per_device_train_batch_size": 4,
    "rl_num_generations": 2,
    "rl_max_completion_length": 12,
    "rl_watch_steps": 2,
    "rl_watch_prompts": 3,
}


@pytest.fixture
def build(db):  # type: ignore[no-untyped-def]
    """A succeeded build of 16 demo problems (whose answers the demo's true scorer knows), 3 completions each."""
    problems = demo_problems(count=16, seed=5)
    answers = [
        [completion_canonical(p), completion_canonical(p, answer=p.answer + 1), f"About {p.answer + 3}."]
        for p in problems
    ]
    project = project_with_prompts([p.prompt for p in problems], name="sft-rl", k=3, answers=answers)
    people = [user_with_roles(Role.LABELER, username=f"sft-rl-judge{index}") for index in range(2)]
    for task in tasks_of(project):
        for person in people:
            judge(task, person, [1, 2, 3])
    manager = make_manager(project, user_with_roles(Role.MANAGER, username="sft-rl-trainer"))
    built = dataset_build_create(
        created_by=manager, name="sft-rl build", projects=[project], test_fraction=0.25
    )
    dataset_build_run(build_id=built.pk)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while built.status not in DatasetBuild.FINISHED_STATUSES and time.monotonic() < deadline:
        time.sleep(0.1)
        built.refresh_from_db()
    assert built.status == DatasetBuild.Status.SUCCEEDED, built.error
    return built


def api_client(user):  # type: ignore[no-untyped-def]
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(user)
    return api


@pytest.fixture
def reward_model(celery_worker, build, tiny_model_dir) -> RewardModel:  # type: ignore[no-untyped-def]
    """A reward model trained on the build by a real reward run."""
    run = wait_for(create(build, tiny_model_dir, kind="reward"), TrainingRun.TERMINAL)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    return RewardModel.objects.get(run=run)


def metric_names(run: TrainingRun) -> set[str]:
    return {
        name
        for values in TrainingRunMetric.objects.filter(run=run).values_list("values", flat=True)
        for name in values
    }


def form_values(build, tiny_model_dir, kind: str, **fields):  # type: ignore[no-untyped-def]
    return {
        "kind": kind,
        "dataset_build": build.pk,
        "base_model": str(tiny_model_dir),
        "peft": "lora",
        "gpus": 1,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_length": 96,
        "beta": 0.1,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "seed": 0,
        "max_steps": 4,
        "logging_steps": 1,
        "save_steps": 2,
        **fields,
    }


def start_from_form(client, build, values) -> TrainingRun:  # type: ignore[no-untyped-def]
    client.force_login(build.created_by)
    response = client.post("/training/runs/new", values)
    assert response.status_code == 302, response.context["form"].errors
    return TrainingRun.objects.get(pk=int(response["Location"].rstrip("/").split("/")[-1]))


def assert_registered_policy(run: TrainingRun, tiny_model_dir: Path) -> Policy:
    policy = Policy.objects.get(training_runs=run)
    assert policy.name == f"{run.kind}-{run.pk}"
    assert policy.base_model == str(tiny_model_dir)
    assert policy.adapter == f"artifacts:runs/{run.pk}/final"
    final = Path(storage_path_resolve(policy.adapter))
    assert (final / "adapter_model.safetensors").exists()
    assert json.loads((final / "rankwise_run.json").read_text())["kind"] == run.kind
    return policy


# --- SFT ---------------------------------------------------------------------------------


@worker_test
def test_an_sft_run_started_from_the_api_succeeds_registers_a_policy_and_shows_its_metrics(
    celery_worker, client, build, tiny_model_dir
):
    # given a manager's API client
    api = api_client(build.created_by)

    # when they start an SFT run on the build
    response = api.post(
        "/api/training-runs/",
        {
            "dataset_build": build.pk,
            "kind": "sft",
            "base_model": str(tiny_model_dir),
            "hyperparameters": TINY,
        },
        format="json",
    )
    assert response.status_code == 201, response.json()
    run = wait_for(TrainingRun.objects.get(pk=response.json()["id"]), TrainingRun.TERMINAL)

    # then it trained on the build's SFT rows and registered a policy
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    assert run.step == run.total_steps == 4
    assert {"train_loss", "eval_loss"} <= set(run.metrics)
    assert {"loss", "mean_token_accuracy"} <= metric_names(run)
    assert_registered_policy(run, tiny_model_dir)
    assert api.get(f"/api/training-runs/{run.pk}/").json()["policy"] == run.policy_id
    client.force_login(build.created_by)
    page = client.get(f"/training/runs/{run.pk}/").content.decode()
    assert 'data-curve="mean_token_accuracy"' in page


@worker_test
def test_an_sft_run_started_from_the_run_form_succeeds(celery_worker, client, build, tiny_model_dir):
    run = wait_for(
        start_from_form(client, build, form_values(build, tiny_model_dir, "sft")), TrainingRun.TERMINAL
    )
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    # SFT has no β: the form does not send it
    assert "beta" not in run.hyperparameters
    assert_registered_policy(run, tiny_model_dir)


# --- RL ----------------------------------------------------------------------------------


@worker_test
def test_an_rl_run_started_from_the_api_succeeds_against_the_reward_model_and_records_the_watch(
    celery_worker, client, build, tiny_model_dir, reward_model
):
    # given a trained reward model and a manager's API client
    api = api_client(build.created_by)

    # when an RL run against it is started, with the demo's truth as the true scorer
    response = api.post(
        "/api/training-runs/",
        {
            "dataset_build": build.pk,
            "kind": "rl",
            "base_model": str(tiny_model_dir),
            "against_reward_model": reward_model.pk,
            "rl_num_generations": 2,
            "rl_temperature": 0.9,
            "rl_max_completion_length": 12,
            "true_scorer": "demo_arithmetic",
            "hyperparameters": {key: RL_TINY[key] for key in RL_TINY if not key.startswith("rl_")}
            | {"beta": 0.05, "rl_watch_steps": 2, "rl_watch_prompts": 3},
        },
        format="json",
    )
    assert response.status_code == 201, response.json()
    assert response.json()["against_reward_model"] == reward_model.pk
    run = wait_for(TrainingRun.objects.get(pk=response.json()["id"]), TrainingRun.TERMINAL)

    # then it succeeded, registered a policy and logged the live RL metrics and the watch's points
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    assert run.hyperparameters["rl_temperature"] == 0.9
    assert_registered_policy(run, tiny_model_dir)
    assert {"proxy_reward", "kl", "true_score"} <= set(run.metrics)
    names = metric_names(run)
    assert {"reward", "kl", "entropy", "completions/mean_length"} <= names
    assert {"reward_model/score_p10", "reward_model/score_p50", "reward_model/score_p90"} <= names
    assert {"watch/proxy_reward", "watch/kl", "watch/true_score"} <= names
    watch_steps = sorted(
        step
        for step, values in TrainingRunMetric.objects.filter(run=run).values_list("step", "values")
        if "watch/kl" in values
    )
    assert watch_steps == [2, 4]
    # and the run page shows them, the over-optimisation chart included
    client.force_login(build.created_by)
    page = client.get(f"/training/runs/{run.pk}/").content.decode()
    for curve in ("reward", "kl", "entropy", "reward_model/score_distribution", "watch/reward_vs_kl"):
        assert f'data-curve="{curve}"' in page, curve
    curves = client.get(f"/training/runs/{run.pk}/curves").json()["curves"]
    watch = next(item for item in curves if item["name"] == "watch/reward_vs_kl")["chart"]
    assert len(watch["series"]) == 2  # proxy reward and true score, each against KL
    assert all(len(series["points"]) == 2 for series in watch["series"])


@worker_test
def test_an_rl_run_started_from_the_run_form_succeeds(
    celery_worker, client, build, tiny_model_dir, reward_model
):
    values = form_values(
        build,
        tiny_model_dir,
        "rl",
        against_reward_model=reward_model.pk,
        per_device_train_batch_size=4,
        rl_num_generations=2,
        rl_temperature=1.0,
        rl_max_completion_length=12,
        rl_watch_steps=2,
        rl_watch_prompts=3,
        beta=0.05,
    )
    run = wait_for(start_from_form(client, build, values), TrainingRun.TERMINAL)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    assert run.against_reward_model == reward_model
    assert run.hyperparameters["rl_num_generations"] == 2
    assert "true_scorer" not in run.hyperparameters  # none chosen
    assert "true_score" not in run.metrics
    assert_registered_policy(run, tiny_model_dir)
    # run again starts from the same reward model
    again = client.get(f"/training/runs/new?from_run={run.pk}")
    assert again.context["form"].initial["against_reward_model"] == reward_model.pk


@worker_test
def test_cancel_stops_a_running_rl_run_within_a_few_steps(celery_worker, build, tiny_model_dir, reward_model):
    run = create(
        build,
        tiny_model_dir,
        kind="rl",
        against_reward_model=reward_model,
        hyperparameters={**RL_TINY, "max_steps": 400, "rl_watch_steps": 1000},
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while run.step < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
        run.refresh_from_db()
    training_run_cancel(run=run)
    run = wait_for(run, TrainingRun.TERMINAL)
    assert run.status == TrainingRun.Status.CANCELLED
    assert run.step < 400
    assert run.policy is None


# --- validation --------------------------------------------------------------------------


@pytest.mark.django_db
def test_an_rl_run_is_refused_without_a_reward_model_or_with_bad_settings_naming_the_field(
    client, build, tiny_model_dir, monkeypatch
):
    monkeypatch.setattr("training.services.runs.training_run_enqueue", lambda *, run_id: True)
    api = api_client(build.created_by)
    base = {"dataset_build": build.pk, "kind": "rl", "base_model": str(tiny_model_dir)}

    missing = api.post("/api/training-runs/", base, format="json")
    assert missing.status_code == 400
    assert "against_reward_model" in missing.json()["errors"]

    reward_run = TrainingRun.objects.create(name="rm", kind="reward", dataset_build=build, base_model="m")
    reward_model = RewardModel.objects.create(name="rm-x", run=reward_run, base_model="m", path="artifacts:x")
    with_model = {**base, "against_reward_model": reward_model.pk}
    odd_batch = api.post(
        "/api/training-runs/",
        {**with_model, "rl_num_generations": 3, "hyperparameters": {"per_device_train_batch_size": 4}},
        format="json",
    )
    assert odd_batch.status_code == 400
    assert "rl_num_generations" in str(odd_batch.json())
    unknown_scorer = api.post(
        "/api/training-runs/", {**with_model, "true_scorer": "os:system"}, format="json"
    )
    assert unknown_scorer.status_code == 400
    assert "true_scorer" in str(unknown_scorer.json())
    too_cold = api.post("/api/training-runs/", {**with_model, "rl_temperature": 0}, format="json")
    assert too_cold.status_code == 400
    assert "rl_temperature" in str(too_cold.json())
    assert not TrainingRun.objects.filter(kind="rl").exists()

    # another manager cannot optimise against a reward model they may not see
    stranger = user_with_roles(Role.MANAGER, username="stranger")
    refused = api_client(stranger).post("/api/training-runs/", with_model, format="json")
    assert refused.status_code == 404

    # and the form says the same
    client.force_login(build.created_by)
    response = client.post("/training/runs/new", form_values(build, tiny_model_dir, "rl"))
    assert response.status_code == 200
    assert "against_reward_model" in response.context["form"].errors


@pytest.mark.django_db
def test_a_reward_model_is_refused_for_kinds_other_than_rl(build, tiny_model_dir, monkeypatch):
    from django.core.exceptions import ValidationError

    monkeypatch.setattr("training.services.runs.training_run_enqueue", lambda *, run_id: True)
    reward_run = TrainingRun.objects.create(name="rm", kind="reward", dataset_build=build, base_model="m")
    reward_model = RewardModel.objects.create(name="rm-y", run=reward_run, base_model="m", path="artifacts:y")
    with pytest.raises(ValidationError) as error:
        create(build, tiny_model_dir, kind="dpo", against_reward_model=reward_model)
    assert "against_reward_model" in error.value.message_dict


def test_run_specs_check_the_new_kinds_settings():
    common = {"run_id": 1, "base_model": "m", "train_file": "t.jsonl", "test_file": None, "output_dir": "o"}
    with pytest.raises(ValueError, match="sft_train_file"):
        RunSpec(kind="sft", **common)
    with pytest.raises(ValueError, match="reward_model_path"):
        RunSpec(kind="rl", **common)
    with pytest.raises(ValueError, match="rl_num_generations"):
        RunSpec(kind="rl", reward_model_path="rm", rl_num_generations=1, **common)
    with pytest.raises(ValueError, match="true_scorer"):
        RunSpec(kind="rl", reward_model_path="rm", true_scorer="anything.else:callable", **common)
    spec = RunSpec.with_defaults(kind="rl", reward_model_path="rm", **common)
    assert spec.beta == 0.05  # RLOO's KL coefficient
    assert RunSpec.with_defaults(kind="sft", sft_train_file="s.jsonl", **common).learning_rate == 2e-4


# --- the demo's truth as a true scorer -----------------------------------------------------


def test_the_demo_true_scorer_knows_each_problems_answer_from_its_prompt_alone():
    assert "demo_arithmetic" in TRUE_SCORERS
    true_scorer_check("demo_arithmetic")
    score = true_scorer()
    for problem in demo_problems(count=100, seed=3):
        rendered = f"User: {problem.prompt}\n\nAssistant:\n"
        assert prompt_answer(rendered) == problem.answer
        assert score(rendered, completion_canonical(problem)) == 1.0
        assert score(rendered, completion_canonical(problem, answer=problem.answer + 1)) == 0.0
    assert score("What is the capital of France?", "Paris") is None


# --- the build's SFT rows ------------------------------------------------------------------


@pytest.mark.django_db
def test_a_prompts_reference_answer_is_also_an_sft_row():
    # given a prompt with a reference answer, whose top-ranked completion is another text
    project = project_with_prompts(
        [{"prompt": "Capital of France?", "metadata": {"reference": "Paris."}}],
        k=3,
        answers=[["Lyon.", "Nice.", "Paris."]],
        name="refs",
    )
    person = user_with_roles(Role.LABELER, username="ref-judge")
    (task,) = tasks_of(project)
    judge(task, person, [1, 2, 3])
    manager = make_manager(project, user_with_roles(Role.MANAGER, username="ref-manager"))

    # when it is built
    built = run_build(created_by=manager, projects=[project], test_fraction=0.0)
    assert built.status == DatasetBuild.Status.SUCCEEDED, built.error

    # then the SFT rows hold the top-ranked completion and the reference
    from training.selectors import dataset_build_dir

    rows = [
        json.loads(line)
        for line in (dataset_build_dir(build_id=built.pk) / "sft" / "train.jsonl").read_text().splitlines()
    ]
    assert [row["completion"] for row in rows] == ["Lyon.", "Paris."]


@pytest.mark.django_db
def test_sft_and_preference_rows_share_prompts_unless_the_build_keeps_them_apart():
    # given 24 distinct prompts, each ranked once
    problems = demo_problems(count=24, seed=9)
    answers = [
        [completion_canonical(p), completion_canonical(p, answer=p.answer + 2), "No idea."] for p in problems
    ]
    project = project_with_prompts([p.prompt for p in problems], name="apart", k=3, answers=answers)
    person = user_with_roles(Role.LABELER, username="apart-judge")
    for task in tasks_of(project):
        judge(task, person, [1, 2, 3])
    manager = user_with_roles(Role.MANAGER, username="apart-manager")

    def prompts_of(built: DatasetBuild, output: str) -> set[str]:
        return {row["prompt"] for row in read_rows(built, output, "train")}

    # when built with the default, and with SFT and preference prompts kept apart
    together = run_build(created_by=manager, projects=[project], test_fraction=0.0)
    apart = run_build(created_by=manager, projects=[project], test_fraction=0.0, sft_in_preferences=False)

    # then by default every prompt gives both kinds of rows
    assert prompts_of(together, "sft") == prompts_of(together, "pairs") == prompts_of(together, "grouped")
    assert len(prompts_of(together, "sft")) == 24
    # and kept apart, each prompt gives one kind only, about half and half
    sft, pairs = prompts_of(apart, "sft"), prompts_of(apart, "pairs")
    assert not sft & pairs
    assert not sft & prompts_of(apart, "grouped")
    assert sft | pairs == prompts_of(together, "sft")
    assert 4 <= len(sft) <= 20
    # and each card says which
    assert "| sft_in_preferences | true |" in (build_folder(together) / "README.md").read_text().lower()
    assert "| sft_in_preferences | false |" in (build_folder(apart) / "README.md").read_text().lower()


@worker_test
def test_kill_9_of_an_rl_run_is_retried_and_resumes_from_its_checkpoint(
    celery_worker, build, tiny_model_dir, reward_model
):
    # given an RL run past its first checkpoint (step 2)
    run = create(
        build,
        tiny_model_dir,
        kind="rl",
        against_reward_model=reward_model,
        hyperparameters={**RL_TINY, "max_steps": 12, "rl_watch_steps": 1000},
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (run.step < 3 or not run.process_id) and time.monotonic() < deadline:
        time.sleep(0.05)
        run.refresh_from_db()
    assert run.status == TrainingRun.Status.RUNNING and run.step < 12, (run.status, run.step)

    # when its whole process group is killed
    os.killpg(run.process_id, signal.SIGKILL)

    # then the next attempt resumes from the checkpoint and finishes, registering one policy
    run = wait_for(run, TrainingRun.TERMINAL)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    assert run.attempts == 2
    assert "resuming from checkpoint checkpoint-" in run.log_tail
    assert Policy.objects.filter(training_runs=run).count() == 1


def test_sft_and_rl_runs_take_conversational_rows(tmp_path, tiny_model_dir):
    """The run process alone (no worker): chat prompts and completions, as conversational builds write them."""
    from training.runner import PrintReporter, run_training

    problems = demo_problems(count=24, seed=11)

    def user(problem):  # type: ignore[no-untyped-def]
        return [{"role": "user", "content": problem.prompt}]

    def assistant(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    def write(name: str, rows: list[dict]) -> str:  # type: ignore[type-arg]
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    pairs = [
        {
            "prompt": user(p),
            "chosen": assistant(completion_canonical(p)),
            "rejected": assistant(completion_canonical(p, answer=p.answer + 1)),
        }
        for p in problems
    ]
    common = {
        "run_id": 1,
        "base_model": str(tiny_model_dir),
        "train_file": write("pairs-train.jsonl", pairs[:16]),
        "test_file": write("pairs-test.jsonl", pairs[16:]),
        "max_steps": 2,
        "logging_steps": 1,
        "save_steps": 2,
        "per_device_train_batch_size": 4,
        "max_length": 96,
    }
    sft_rows = [{"prompt": user(p), "completion": assistant(completion_canonical(p))} for p in problems]
    sft = RunSpec.with_defaults(
        kind="sft", output_dir=str(tmp_path / "sft"), sft_train_file=write("sft.jsonl", sft_rows), **common
    )
    reward = RunSpec.with_defaults(kind="reward", output_dir=str(tmp_path / "rm"), trainer="trl", **common)
    assert run_training(sft, PrintReporter()).status == "succeeded"
    reward_result = run_training(reward, PrintReporter())
    rl = RunSpec.with_defaults(
        kind="rl",
        output_dir=str(tmp_path / "rl"),
        reward_model_path=reward_result.final_dir,
        rl_num_generations=2,
        rl_max_completion_length=8,
        rl_watch_steps=1,
        rl_watch_prompts=2,
        true_scorer="demo_arithmetic",
        **common,
    )
    result = run_training(rl, PrintReporter())
    assert result.status == "succeeded"
    assert {"proxy_reward", "kl", "true_score"} <= set(result.metrics)


def test_the_loop_report_gives_rl_accuracy_and_the_over_optimisation_table():
    from training.demo.loop import report_markdown

    measure = {"value": 0.5, "successes": 50, "trials": 100, "low": 0.4, "high": 0.6}
    report = {
        "settings": {
            "train_prompts": 10,
            "k": 4,
            "temperature": 1.0,
            "heldout_prompts": 5,
            "eval_prompts": 100,
            "base_model": "m",
            "seed": 0,
        },
        "goals": [
            {
                "goal": "RL accuracy minus SFT accuracy (held-out)",
                "target": "≥ +10 points",
                "reached": 12.0,
                "met": True,
            }
        ],
        "reward_model": {
            "accuracy_right_vs_wrong": measure,
            "accuracy_nearer_vs_farther": measure,
            "accuracy_train_right_vs_wrong": measure,
            "run_metrics": {},
        },
        "policies": {
            "sft": measure,
            "dpo": measure,
            "gain_points": 0.0,
            "rl": {**measure, "value": 0.62, "successes": 62},
            "rl_gain_points": 12.0,
        },
        "rl_watch": [
            {"step": 10, "kl": 0.5, "proxy_reward": 0.25, "true_score": 0.55},
            {"step": 20, "kl": 1.25, "proxy_reward": 0.75, "true_score": 0.6},
        ],
        "ab": {
            "votes": 0,
            "dpo_wins": 0,
            "sft_wins": 0,
            "ties": 0,
            "both_bad": 0,
            "dpo_win_rate": {"value": None},
            "position_bias": {"left_share": None, "low": None, "high": None},
            "ratings": [],
            "names": {},
            "evaluators": [],
        },
        "labeling": {"labelers": []},
        "stages": [],
        "total_seconds": 60.0,
    }

    text = report_markdown(report)

    assert "| RL accuracy minus SFT accuracy (held-out) | ≥ +10 points | +12.0 points | yes |" in text
    assert "- RL gain over SFT: +12.0 points" in text
    assert "| 20 | 1.250 | 0.750 | 60.0% |" in text
