"""Chat prompts through the whole chain with modern models and their own chat templates.

import → ranking → conversational build → reward and DPO runs → generation → scoring,
for a Llama, a Qwen2 and a Gemma model (tiny, random weights, real chat templates).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from annotation.models import Completion, CompletionScore, Policy, Prompt
from annotation.roles import Role
from tests.factories import user_with_roles
from tests.training.modern_models import FAMILIES, modern_model_dirs  # noqa: F401
from tests.training.test_builds_support import (
    judge,
    make_manager,
    project_with_prompts,
    read_rows,
    run_build,
    tasks_of,
)
from training.models import DatasetBuild, GenerationJob, RewardModel, ScoringJob, TrainingRun

SYSTEM = {"role": "system", "content": "You are a careful assistant who answers briefly."}
QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the river stone.",
    "Tell me a story about a cat and a paper boat.",
    "Summarise the paper in two sentences, please.",
    "What is 3 plus 4?",
    "Answer with one word: yes or no.",
    "Hello! How can you help me today?",
    "What colour is the cloud over the garden?",
]
ANSWERS = ["Paris, the capital.", "A stone, an apple tree.", "I do not know, sorry."]
TINY = {
    "max_steps": 3,
    "logging_steps": 1,
    "save_steps": 100,
    "per_device_train_batch_size": 2,
    "max_length": 128,
}
# Per job: a shared 2-core machine queues the DPO run behind the reward run on one worker.
TIMEOUT_S = 420

worker_test = pytest.mark.django_db(transaction=True)


def chat(question: str) -> list[dict[str, str]]:
    return [SYSTEM, {"role": "user", "content": question}]


def ranked_chat_build(family: str, **options: Any) -> DatasetBuild:
    """A conversational build of chat prompts with a system turn, each ranked by two people."""
    project = project_with_prompts(
        [chat(question) for question in QUESTIONS],
        name=f"chat-{family}",
        k=3,
        answers=[ANSWERS] * len(QUESTIONS),
    )
    people = [user_with_roles(Role.LABELER, username=f"{family}-judge{index}") for index in range(2)]
    for task in tasks_of(project):
        for person in people:
            judge(task, person, [1, 2, 3])
    manager = user_with_roles(Role.MANAGER, username=f"{family}-manager")
    return run_build(
        created_by=manager, projects=[project], name=f"{family} build", format="conversational", **options
    )


def tokenizer_of(model_dir: Path) -> Any:
    from training.runner import RunSpec, _tokenizer_load

    spec = RunSpec.with_defaults(
        kind="dpo", run_id=0, base_model=str(model_dir), train_file="-", test_file=None, output_dir="-"
    )
    return _tokenizer_load(spec)


# --- one conversation, every stage --------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("family", FAMILIES)
def test_a_conversation_is_the_same_tokens_in_the_build_training_generation_and_scoring(
    family: str,
    modern_model_dirs: dict[str, Path],  # noqa: F811
) -> None:
    from trl.data_utils import _tokenize

    from training.grouped import dpo_group_features, reward_group_features
    from training.prompts import completion_render, prompt_render, prompt_token_ids, reward_input_ids

    # given a conversational build of chat prompts, and the family's tokenizer as the runner loads it
    build = ranked_chat_build(family)
    tokenizer = tokenizer_of(modern_model_dirs[family])
    grouped = read_rows(build, "grouped", "train")[0]
    prompt = Prompt.objects.get(project__in=build.projects.all(), messages=grouped["prompt"])

    # build: the row holds the prompt's own turns (system included) and each answer as an assistant turn
    assert grouped["prompt"] == chat(prompt.messages[1]["content"])
    assert all(
        c == [{"role": "assistant", "content": a}]
        for c, a in zip(grouped["completions"], ANSWERS, strict=True)
    )

    # generation: the prompt through the model's template, with the generation prompt
    generation_ids, used = prompt_token_ids(
        tokenizer, text=prompt.text, messages=prompt.messages, prompt_format="auto"
    )
    assert used == "chat"
    rendered = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(generation_ids) == rendered
    assert SYSTEM["content"] in rendered

    # DPO training (TRL's tokenisation and the grouped trainer's): the same prompt ids, and each
    # sequence is the prompt's ids followed by the completion's
    trl_prompt_ids = _tokenize(tokenizer, grouped["prompt"], add_generation_prompt=True, tools=None)[
        "input_ids"
    ]
    assert list(trl_prompt_ids) == generation_ids
    dpo = dpo_group_features(grouped, tokenizer, max_length=None, truncation_mode="keep_end", tie_loss=False)
    for sequence, prompt_len in zip(dpo["input_ids"], dpo["prompt_lens"], strict=True):
        assert prompt_len == len(generation_ids)
        assert sequence[:prompt_len] == generation_ids

    # reward training and scoring: the same ids, which are the DPO sequences too
    reward = reward_group_features(
        grouped, tokenizer, max_length=None, margin="none", with_margin=False, tie_loss=False
    )
    scoring = [
        reward_input_ids(
            tokenizer,
            prompt_render(text=prompt.text, messages=prompt.messages, conversational=True),
            completion_render(answer, conversational=True),
        )
        for answer in ANSWERS
    ]
    assert reward["input_ids"] == scoring == dpo["input_ids"]
    pair = read_rows(build, "pairs", "train")[0]
    trl_reward_ids = _tokenize(tokenizer, pair["prompt"] + pair["chosen"], tools=None)["input_ids"]
    assert list(trl_reward_ids) in scoring
    # the reply ends the assistant turn as the template ends it
    assert tokenizer.decode(scoring[0]).startswith(rendered)


# --- the whole chain through the worker ---------------------------------------------


def wait_for(row: Any, terminal: tuple[str, ...], timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row.refresh_from_db()
        if row.status in terminal:
            return row
        time.sleep(0.2)
    raise AssertionError(f"{row} still {row.status} after {timeout} s: {row.error}\n{row.log_tail}")


@worker_test
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("family", FAMILIES)
def test_chat_prompts_train_a_reward_model_and_a_dpo_policy_that_then_writes_and_scores_completions(
    celery_worker: str,
    family: str,
    modern_model_dirs: dict[str, Path],  # noqa: F811
) -> None:
    from training.services import generation_job_create, scoring_job_create, training_run_create

    # given a conversational build of ranked chat prompts
    build = ranked_chat_build(family, test_fraction=0.25)
    manager = build.created_by
    base_model = str(modern_model_dirs[family])

    # when a reward run and a DPO run train on it with the grouped trainers
    runs = {
        kind: training_run_create(
            dataset_build=build,
            kind=kind,
            base_model=base_model,
            created_by=manager,
            hyperparameters=dict(TINY),
        )
        for kind in ("reward", "dpo")
    }

    # then both succeed, registering a reward model and a policy
    for kind, run in runs.items():
        run = wait_for(run, TrainingRun.TERMINAL)
        assert run.status == TrainingRun.Status.SUCCEEDED, f"{kind}: {run.error}\n{run.log_tail}"
    reward_model = RewardModel.objects.get(run=runs["reward"])
    policy = Policy.objects.get(training_runs=runs["dpo"])

    # when the DPO policy writes two completions for each of new chat prompts
    fresh = project_with_prompts(
        [chat(question) for question in QUESTIONS[:3]], name=f"fresh-{family}", k=2, answers=[["a", "b"]] * 3
    )
    make_manager(fresh, manager)
    job = generation_job_create(
        policy=policy,
        project=fresh,
        n=2,
        seed=3,
        created_by=manager,
        max_new_tokens=6,
        temperature=1.0,
        top_p=0.95,
    )
    job = wait_for(job, GenerationJob.TERMINAL)

    # then it wrote them through the chat template
    assert job.status == GenerationJob.Status.SUCCEEDED, job.error + job.log_tail
    written = Completion.objects.filter(policy=policy, prompt__project=fresh)
    assert written.count() == 6
    assert {c.generation_settings["prompt_format"] for c in written} == {"chat"}

    # and the reward model scores every completion of the project
    scoring = wait_for(
        scoring_job_create(project=fresh, reward_model=reward_model, created_by=manager), ScoringJob.TERMINAL
    )
    assert scoring.status == ScoringJob.Status.SUCCEEDED, scoring.error + scoring.log_tail
    scored = CompletionScore.objects.filter(completion__prompt__project=fresh)
    assert scored.count() == Completion.objects.filter(prompt__project=fresh).count() == 12
