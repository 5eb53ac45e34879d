"""The demo's content matches the demo model: arithmetic prompts for demo-sft to answer, ranked by the demo labeler."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from annotation.management.commands.seed_demo import (
    ARITHMETIC_HELDOUT_PROJECT,
    ARITHMETIC_PROJECT,
    DEMO_SFT_POLICY,
)
from annotation.models import Membership, Policy, Project
from tests.training.test_generation import SAMPLING, queued_job, run_here
from training.demo.task import problem_split


def seed() -> None:
    call_command("demo_users", "--quiet-passwords", stdout=StringIO())
    call_command("seed_demo", stdout=StringIO())


@pytest.mark.django_db
def test_the_demo_seeds_arithmetic_prompts_the_demo_model_answers_and_registers_it_as_a_policy() -> None:
    seed()

    policy = Policy.objects.get(name=DEMO_SFT_POLICY)
    assert (policy.kind, policy.base_model) == (Policy.Kind.MODEL, "models:demo-sft")
    arithmetic = Project.objects.get(name=ARITHMETIC_PROJECT)
    heldout = Project.objects.get(name=ARITHMETIC_HELDOUT_PROJECT)
    # the model's task: chat prompts, training problems to rank, test problems for the A/B session
    for project, split in ((arithmetic, "train"), (heldout, "test")):
        prompts = list(project.prompts.all())
        assert prompts and all(prompt.is_chat for prompt in prompts)
        assert {problem_split(prompt.messages[0]["content"]) for prompt in prompts} == {split}
    assert arithmetic.k == 4 and arithmetic.tasks.count() == 0  # demo-sft's samples make the tasks
    assert set(policy.projects.all()) == {arithmetic, heldout}  # so the demo's manager sees and uses it
    roles = set(Membership.objects.filter(project=arithmetic).values_list("user__username", "role"))
    assert {("manager", "manager"), ("labeler", "labeler")} <= roles
    assert set(Membership.objects.filter(project=heldout).values_list("user__username", "role")) == {
        ("manager", "manager")
    }
    # and seeding again changes nothing
    seed()
    assert Project.objects.filter(name__startswith="Demo: arithmetic").count() == 2
    assert arithmetic.prompts.count() == 40


@pytest.mark.django_db(transaction=True)
def test_samples_of_the_demo_policy_become_the_arithmetic_projects_ranking_tasks(
    tiny_model_dir: Path,
) -> None:
    # given the seeded demo, with demo-sft standing for a built model
    seed()
    Policy.objects.filter(name=DEMO_SFT_POLICY).update(base_model=str(tiny_model_dir))
    arithmetic = Project.objects.get(name=ARITHMETIC_PROJECT)

    # when a generation job asks demo-sft for four samples a prompt
    job = queued_job(
        Policy.objects.get(name=DEMO_SFT_POLICY), arithmetic, n=4, **{**SAMPLING, "max_new_tokens": 12}
    )
    assert run_here(job) == "succeeded"

    # then the prompts with four different samples are ranking tasks of demo-sft's answers
    tasks = list(arithmetic.tasks.all())
    assert tasks
    for task in tasks:
        assert set(task.completions.values_list("policy__name", flat=True)) == {DEMO_SFT_POLICY}
        assert task.completions.count() == 4
