"""Generation jobs: a policy writes n completions per prompt, through a real worker and real processes.

Worker tests run the whole path (service → Celery → `training.generation_process`);
the others call the process's loop in this process, which is the same code
without the start-up cost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from annotation.importing import prompt_content_hash
from annotation.models import Completion, Policy, Project, Prompt, Task
from annotation.roles import Role
from tests.factories import user_with_roles
from tests.training.child_here import run_child_here
from tests.training.test_builds_support import make_manager
from training.generation import prompt_seed
from training.generation_process import generation_job_run
from training.models import BestOfN, DatasetBuild, GenerationJob, RewardModel, TrainingRun
from training.services import (
    QueueUnavailable,
    best_of_n_policy_create,
    generation_job_cancel,
    generation_job_claim,
    generation_job_create,
    generation_job_spec,
    generation_jobs_reap,
)
from training.services.child_events import GenerationEvents, generation_work

JOB_TIMEOUT_S = 120
SAMPLING = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.95}
CHAT_PROMPT = [{"role": "user", "content": "Mia has 3 apples and buys 4 more. How many apples?"}]

worker_test = pytest.mark.django_db(transaction=True)


# --- helpers ----------------------------------------------------------------------


def project_of(prompts: list[str | list[dict[str, str]]], *, name: str = "gen", **fields: Any) -> Project:
    project = Project.objects.create(name=name, **fields)
    for number, spec in enumerate(prompts):
        chat = isinstance(spec, list)
        Prompt.objects.create(
            project=project,
            external_id=f"{name}-{number}",
            text="" if chat else spec,
            messages=spec if chat else None,
            content_hash=prompt_content_hash(spec),
        )
    return project


def policy_of(model_dir: Path, name: str = "sft", *, project: Project | None = None) -> Policy:
    """A model policy, registered for `project` when given (a manager generates only with their projects')."""
    policy = Policy.objects.create(name=name, kind=Policy.Kind.MODEL, base_model=str(model_dir))
    if project is not None:
        policy.projects.add(project)
    return policy


def counts(policy: Policy, project: Project) -> dict[int, int]:
    """Completions per prompt of the project written by the policy (0 included)."""
    written = Counter(
        Completion.objects.filter(policy=policy, prompt__project=project).values_list("prompt_id", flat=True)
    )
    return {pk: written[pk] for pk in project.prompts.values_list("pk", flat=True)}


def texts(policy: Policy, project: Project) -> dict[tuple[int, int], str]:
    """(prompt id, sample index) → text."""
    return {
        (c.prompt_id, c.generation_settings["sample_index"]): c.text
        for c in Completion.objects.filter(policy=policy, prompt__project=project)
    }


def wait_for(job: GenerationJob, statuses: tuple[str, ...], timeout: float = JOB_TIMEOUT_S) -> GenerationJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.status in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job.pk} still {job.status} after {timeout} s: {job.error}\n{job.log_tail}")


def run_here(job: GenerationJob) -> str:
    """Claim the job and run its process's loop in this process, as one attempt would."""
    claimed = generation_job_claim(job_id=job.pk)
    assert claimed is not None
    spec = generation_job_spec(job=claimed)
    outcome = run_child_here(
        GenerationEvents(job_id=job.pk, attempt=claimed.attempts),
        generation_job_run,
        spec,
        generation_work(project_id=spec.project_id, policy_id=spec.policy_id, n=spec.n),
    )
    job.refresh_from_db()
    return outcome


def queued_job(policy: Policy, project: Project, **fields: Any) -> GenerationJob:
    """A job row as generation_job_create saves it, without publishing it (no worker here)."""
    return GenerationJob.objects.create(policy=policy, project=project, **{**SAMPLING, **fields})


@pytest.fixture
def no_publish(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    published: list[int] = []
    monkeypatch.setattr(
        "training.services.generation.generation_job_enqueue", lambda *, job_id: published.append(job_id)
    )
    return published


@pytest.fixture(scope="session")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full sequence-classification model over the tiny model (random score head), saved as the runner would."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("reward-model")
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    info = {"kind": "reward", "base_model": str(tiny_model_dir), "peft": "full", "metrics": {}}
    (folder / "rankwise_run.json").write_text(json.dumps(info))
    return folder


def reward_model_row(path: Path) -> RewardModel:
    build = DatasetBuild.objects.create(name="rm data", status=DatasetBuild.Status.SUCCEEDED)
    run = TrainingRun.objects.create(
        name="rm", kind="reward", dataset_build=build, base_model="tiny", status="succeeded", peft="full"
    )
    return RewardModel.objects.create(name="rm-tiny", run=run, base_model="tiny", path=str(path))


# --- through the worker -------------------------------------------------------------


@worker_test
def test_a_job_fills_a_ranking_project_with_n_seeded_samples_per_prompt_and_makes_its_tasks(
    celery_worker: str, tiny_model_dir: Path
) -> None:
    # given a ranking project with K=2, a text and a chat prompt, and one policy
    project = project_of(["What is 2 plus 3?", "What is 7 minus 4?", CHAT_PROMPT], k=2)
    manager = make_manager(project, user_with_roles(Role.MANAGER, username="gen-manager"))
    policy = policy_of(tiny_model_dir, project=project)

    # when a manager asks for two samples per prompt
    job = generation_job_create(policy=policy, project=project, n=2, seed=7, created_by=manager, **SAMPLING)
    job = wait_for(job, GenerationJob.TERMINAL)

    # then every prompt has exactly two, each recording its settings and seeds
    assert job.status == GenerationJob.Status.SUCCEEDED, job.error + job.log_tail
    assert (job.attempts, job.prompts_done, job.prompts_total, job.completions_written) == (1, 3, 3, 6)
    assert set(counts(policy, project).values()) == {2}
    for completion in Completion.objects.filter(policy=policy).select_related("prompt"):
        settings = completion.generation_settings
        assert {k: settings[k] for k in SAMPLING} == SAMPLING
        assert settings["generation_job"] == job.pk
        assert settings["job_seed"] == 7
        assert settings["seed"] == prompt_seed(job_seed=7, prompt_hash=completion.prompt.content_hash)
        assert settings["prompt_format"] == ("chat" if completion.prompt.is_chat else "text")
    indices = Counter(c.generation_settings["sample_index"] for c in Completion.objects.filter(policy=policy))
    assert indices == {0: 3, 1: 3}
    # and the two samples of each prompt became its ranking task
    assert job.tasks_created == 3
    for task in Task.objects.filter(project=project):
        assert sorted(task.completions.values_list("policy_id", flat=True)) == [policy.pk, policy.pk]


@worker_test
def test_a_job_killed_mid_way_is_retried_and_never_duplicates_completions(
    celery_worker: str, tiny_model_dir: Path
) -> None:
    # given four prompts, two of which already have one of the two completions wanted
    # (as an earlier attempt would have left them)
    project = project_of([f"What is {n} plus 1?" for n in range(4)], name="resume")
    policy = policy_of(tiny_model_dir)
    first, second, third, fourth = project.prompts.order_by("pk")
    earlier = [
        Completion.objects.create(prompt=prompt, policy=policy, text="from before", generation_settings={})
        for prompt in (third, fourth)
    ]
    job = generation_job_create(policy=policy, project=project, n=2, created_by=None, **SAMPLING)

    # when its child program is killed while it starts (the supervisor writes what a child
    # reports, and a child samples these prompts faster than a test can catch it later)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.process_id or job.status in GenerationJob.TERMINAL:
            break
        time.sleep(0.02)
    assert job.status == GenerationJob.Status.RUNNING and job.process_id, job.error
    assert counts(policy, project) == {first.pk: 0, second.pk: 0, third.pk: 1, fourth.pk: 1}
    os.killpg(job.process_id, signal.SIGKILL)
    job = wait_for(job, GenerationJob.TERMINAL)

    # then the retry topped up only the prompts still lacking, to exactly two each
    assert job.status == GenerationJob.Status.SUCCEEDED, job.error + job.log_tail
    assert job.attempts == 2, job.error + job.log_tail
    assert "killed by signal 9" in job.error  # the first attempt's fate is kept
    assert set(counts(policy, project).values()) == {2}
    assert all(Completion.objects.filter(pk=c.pk).exists() for c in earlier)
    topped_up = Completion.objects.filter(prompt__in=[third, fourth], policy=policy).exclude(
        text="from before"
    )
    assert [c.generation_settings["sample_index"] for c in topped_up] == [1, 1]


# --- the process's loop, here -------------------------------------------------------


@worker_test
def test_the_same_seed_writes_the_same_texts_and_another_seed_others(tiny_model_dir: Path) -> None:
    project = project_of(["What is 2 plus 3?", CHAT_PROMPT, "What is 9 minus 1?"])
    one, same, other = (policy_of(tiny_model_dir, name) for name in ("one", "same", "other"))

    for policy, seed in ((one, 11), (same, 11), (other, 12)):
        assert run_here(queued_job(policy, project, n=2, seed=seed)) == "succeeded"

    assert len(texts(one, project)) == 6
    assert texts(one, project) == texts(same, project)
    assert texts(one, project) != texts(other, project)


@worker_test
def test_running_a_finished_jobs_process_again_writes_nothing(tiny_model_dir: Path) -> None:
    project = project_of(["What is 2 plus 3?", "What is 4 plus 4?"])
    policy = policy_of(tiny_model_dir)
    job = queued_job(policy, project, n=3)
    assert run_here(job) == "succeeded"
    before = texts(policy, project)

    # the same job delivered again after a crash that lost its success
    GenerationJob.objects.filter(pk=job.pk).update(status="queued")
    assert run_here(job) == "succeeded"

    assert (job.attempts, job.completions_written) == (2, 6)
    assert set(counts(policy, project).values()) == {3}
    assert texts(policy, project) == before


@worker_test
def test_best_of_n_keeps_the_candidate_its_reward_model_scores_highest(
    tiny_model_dir: Path, reward_model_dir: Path
) -> None:
    from training.builds import prompt_render
    from training.scoring import reward_model_load, reward_scores

    # given a best-of-4 policy over the tiny model and a (random) reward model
    project = project_of(["What is 2 plus 3?", CHAT_PROMPT], name="bon")
    base = policy_of(tiny_model_dir)
    reward_model = reward_model_row(reward_model_dir)
    best_of_4 = best_of_n_policy_create(base_policy=base, reward_model=reward_model, n=4)
    assert best_of_4.kind == Policy.Kind.BEST_OF_N
    assert BestOfN.objects.get(policy=best_of_4).base_policy == base

    # when it writes one completion per prompt
    assert run_here(queued_job(best_of_4, project, n=1, seed=5)) == "succeeded"

    # then each kept text is the best of the four candidates, scored as the reward model scores them
    tokenizer, model = reward_model_load(str(reward_model_dir))
    completions = list(Completion.objects.filter(policy=best_of_4).select_related("prompt"))
    assert len(completions) == 2
    for completion in completions:
        record = completion.generation_settings["best_of_n"]
        assert (record["n"], record["base_policy"], record["reward_model"]) == (4, base.pk, reward_model.pk)
        assert record["sample_indices"] == [0, 1, 2, 3]
        scores, candidates = record["scores"], record["candidates"]
        assert len(scores) == len(candidates) == 4
        assert completion.text == candidates[record["kept"]]
        assert scores[record["kept"]] == max(scores)
        prompt = prompt_render(
            text=completion.prompt.text, messages=completion.prompt.messages, conversational=False
        )
        rescored = reward_scores(tokenizer, model, [prompt] * 4, candidates)
        assert rescored == pytest.approx(scores, abs=1e-4)


@worker_test
def test_cancel_stops_a_running_job_before_its_next_batch_and_a_queued_one_at_once(
    tiny_model_dir: Path,
) -> None:
    project = project_of(["What is 2 plus 3?"])
    policy = policy_of(tiny_model_dir)

    queued = generation_job_cancel(job=queued_job(policy, project, n=1))
    assert queued.status == GenerationJob.Status.CANCELLED
    assert generation_job_claim(job_id=queued.pk) is None

    running = queued_job(policy, project, n=1)
    claimed = generation_job_claim(job_id=running.pk)
    assert claimed is not None
    generation_job_cancel(job=claimed)
    spec = generation_job_spec(job=claimed)
    outcome = run_child_here(
        GenerationEvents(job_id=claimed.pk, attempt=claimed.attempts),
        generation_job_run,
        spec,
        generation_work(project_id=spec.project_id, policy_id=spec.policy_id, n=spec.n),
        cancel=True,  # the supervisor saw the cancel and created the stop file
    )
    assert outcome == "cancelled"
    claimed.refresh_from_db()
    assert claimed.status == GenerationJob.Status.CANCELLED
    assert not Completion.objects.exists()


@worker_test
def test_a_policy_trained_on_chat_gets_even_text_prompts_through_the_chat_template(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from training.generation import prompt_token_ids

    # given a copy of the model whose demo report says it was trained on chat (as the demo model's does)
    demo = tmp_path / "demo"
    shutil.copytree(tiny_model_dir, demo)
    (demo / "rankwise_demo.json").write_text(json.dumps({"prompt_format": "chat"}))
    project = project_of(["What is 2 plus 3?"])
    policy = policy_of(demo)

    assert run_here(queued_job(policy, project, n=1)) == "succeeded"

    assert Completion.objects.get(policy=policy).generation_settings["prompt_format"] == "chat"
    tokenizer = AutoTokenizer.from_pretrained(demo)
    ids, used = prompt_token_ids(tokenizer, text="What is 2 plus 3?", messages=None, prompt_format="chat")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert (ids, used) == (tokenizer(rendered, add_special_tokens=False)["input_ids"], "chat")
    assert rendered.endswith("<|assistant|>\n")


@pytest.mark.django_db
def test_a_dpo_policy_reads_prompts_as_its_dataset_build_wrote_them(tiny_model_dir: Path) -> None:
    from training.services import policy_prompt_format

    for build_format, expected in (("conversational", "chat"), ("standard", "text")):
        build = DatasetBuild.objects.create(name=build_format, status="succeeded", format=build_format)
        policy = policy_of(tiny_model_dir, f"dpo-{build_format}")
        TrainingRun.objects.create(
            name=build_format, kind="dpo", dataset_build=build, base_model="m", policy=policy
        )
        assert policy_prompt_format(policy=policy) == expected
    explicit = Policy.objects.create(
        name="explicit", base_model="m", generation_settings={"prompt_format": "chat"}
    )
    assert policy_prompt_format(policy=explicit) == "chat"
    assert policy_prompt_format(policy=policy_of(tiny_model_dir, "plain")) == "auto"


@worker_test
def test_a_policy_whose_model_cannot_load_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    from training.events import EVENTS_FILE_ENV, EventReader
    from training.generation_process import main

    policy = Policy.objects.create(name="gone", base_model=str(tmp_path / "no-such-model"))
    job = queued_job(policy, project_of(["What is 2 plus 3?"]), n=1)
    claimed = generation_job_claim(job_id=job.pk)
    assert claimed is not None
    generation_job_spec(job=claimed).to_json(tmp_path / "spec.json")
    (tmp_path / "work.json").write_text('{"total": 1, "prompts": []}')
    os.environ[EVENTS_FILE_ENV] = str(tmp_path / "events.jsonl")
    try:
        assert main([str(tmp_path / "spec.json"), str(tmp_path / "work.json")]) == 1
    finally:
        del os.environ[EVENTS_FILE_ENV]
    applier = GenerationEvents(job_id=job.pk, attempt=claimed.attempts)
    assert all(applier.apply(event) for event in EventReader(tmp_path / "events.jsonl").read())

    job.refresh_from_db()
    assert job.status == GenerationJob.Status.FAILED
    assert "no-such-model" in job.error


# --- creation and claims -----------------------------------------------------------


@pytest.mark.django_db
def test_an_unreachable_broker_is_refused_and_nothing_is_created(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("config.health.broker_reachable", lambda: False)
    project = project_of(["What is 2 plus 3?"])
    with pytest.raises(QueueUnavailable, match="generation job was not created"):
        generation_job_create(policy=policy_of(tiny_model_dir), project=project, n=2, created_by=None)
    assert not GenerationJob.objects.exists()


@pytest.mark.django_db
def test_a_policy_that_cannot_generate_or_a_project_not_managed_is_refused(
    tiny_model_dir: Path, no_publish: list[int]
) -> None:
    project = project_of(["What is 2 plus 3?"])
    imported = Policy.objects.create(name="people", kind=Policy.Kind.IMPORTED)
    with pytest.raises(ValidationError) as refused:
        generation_job_create(policy=imported, project=project, n=2, created_by=None)
    assert "policy" in refused.value.message_dict

    stranger = user_with_roles(Role.MANAGER, username="stranger")
    with pytest.raises(ValidationError) as refused:
        generation_job_create(
            policy=policy_of(tiny_model_dir), project=project, n=0, temperature=9, created_by=stranger
        )
    assert {"project", "policy", "n", "temperature"} <= set(refused.value.message_dict)
    assert not GenerationJob.objects.exists()
    assert no_publish == []


@pytest.mark.django_db
def test_a_job_is_claimed_once_and_taken_over_only_when_its_heartbeat_stopped(
    tiny_model_dir: Path, settings: Any
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    job = queued_job(policy_of(tiny_model_dir), project_of(["What is 2 plus 3?"]), n=1)
    assert generation_job_claim(job_id=job.pk) is not None
    assert generation_job_claim(job_id=job.pk) is None

    stale = timezone.now() - timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S + 1)
    GenerationJob.objects.filter(pk=job.pk).update(heartbeat_at=stale)
    assert generation_job_claim(job_id=job.pk) is not None
    job.refresh_from_db()
    assert (job.status, job.attempts) == (GenerationJob.Status.RUNNING, 2)


@pytest.mark.django_db
def test_the_reaper_requeues_a_silent_job_and_fails_it_when_out_of_attempts(
    tiny_model_dir: Path, settings: Any, django_capture_on_commit_callbacks: Any, no_publish: list[int]
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    policy, project = policy_of(tiny_model_dir), project_of(["What is 2 plus 3?"])
    old = timezone.now() - timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S + 5)
    retry = queued_job(policy, project, status="running", attempts=1, heartbeat_at=old)
    spent = queued_job(
        policy, project, status="running", attempts=settings.TRAINING_MAX_ATTEMPTS, heartbeat_at=old
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert sorted(generation_jobs_reap()) == sorted([retry.pk, spent.pk])
    retry.refresh_from_db()
    spent.refresh_from_db()
    assert (retry.status, spent.status) == ("queued", "failed")
    assert no_publish == [retry.pk]


# --- the admin ------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_manager_starts_a_job_from_the_admin_form_and_a_bad_setting_is_named(
    client: Any, tiny_model_dir: Path, no_publish: list[int], django_capture_on_commit_callbacks: Any
) -> None:
    project = project_of(["What is 2 plus 3?"])
    manager = make_manager(project, user_with_roles(Role.MANAGER, username="admin-manager"))
    policy = policy_of(tiny_model_dir, project=project)
    client.force_login(manager)
    values = {
        "policy": policy.pk,
        "project": project.pk,
        "n": 4,
        "top_p": 0.9,
        "max_new_tokens": 16,
        "seed": 3,
    }

    bad = client.post("/admin/training/generationjob/add/", {**values, "temperature": 0})
    assert bad.status_code == 200
    assert "temperature" in bad.context["adminform"].form.errors
    assert not GenerationJob.objects.exists()

    with django_capture_on_commit_callbacks(execute=True):
        made = client.post("/admin/training/generationjob/add/", {**values, "temperature": 0.7})
    assert made.status_code == 302, made.context["adminform"].form.errors
    job = GenerationJob.objects.get()
    assert (job.n, job.temperature, job.top_p, job.max_new_tokens, job.seed) == (4, 0.7, 0.9, 16, 3)
    assert (job.created_by, job.status) == (manager, GenerationJob.Status.QUEUED)
    assert no_publish == [job.pk]
    assert client.get(f"/admin/training/generationjob/{job.pk}/change/").status_code == 200

    stranger = user_with_roles(Role.MANAGER, username="other-manager")
    client.force_login(stranger)
    assert client.get(f"/admin/training/generationjob/{job.pk}/change/").status_code == 302  # not found
