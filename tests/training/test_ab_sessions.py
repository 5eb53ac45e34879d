"""Managers create blind A/B sessions; outputs a policy lacks are generated before anything is shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from annotation.importing import prompts_import
from annotation.models import Completion, Policy, Project, TaskCompletion
from annotation.rendering import completion_text_key
from annotation.roles import Role
from annotation.services import ab_session_create, ab_session_open
from tests.annotation.test_ab import source_prompts
from tests.factories import user_with_roles
from tests.training.test_builds_support import make_manager
from tests.training.test_generation import wait_for, worker_test
from training.models import GenerationJob


@pytest.fixture
def manager(db):  # type: ignore[no-untyped-def]
    return user_with_roles(Role.MANAGER, username="host")


def _post(client, manager, source, policies):  # type: ignore[no-untyped-def]
    make_manager(source, manager)
    source.policies.add(*policies)  # the policies are the source project's (registered for it)
    client.force_login(manager)
    return client.post(
        "/ab-sessions/new",
        {
            "name": "sft vs dpo",
            "source_project": source.pk,
            "policies": [p.pk for p in policies],
            "votes_per_pair": 2,
            "max_new_tokens": 32,
            "seed": 0,
        },
    )


@pytest.mark.django_db
def test_a_session_with_every_output_present_is_created_at_once(client, manager):
    policies = [Policy.objects.create(name="sft"), Policy.objects.create(name="dpo")]
    source = source_prompts(3, policies)[0].project
    response = _post(client, manager, source, policies)
    assert response.status_code == 302
    session = Project.objects.get(name="sft vs dpo")
    assert (session.kind, session.k, session.overlap, session.tasks.count()) == ("ab", 2, 2, 3)


@pytest.mark.django_db
def test_an_imported_policy_without_outputs_is_refused_by_name(client, manager):
    first = Policy.objects.create(name="vendor-a", kind=Policy.Kind.IMPORTED)
    second = Policy.objects.create(name="vendor-b", kind=Policy.Kind.IMPORTED)
    source = source_prompts(2, [first])[0].project
    response = _post(client, manager, source, [first, second])
    assert response.status_code == 200
    assert "imported:vendor-b cannot generate" in response.content.decode()
    assert not GenerationJob.objects.exists()


# --- the session's outputs live in the session ------------------------------------------------


def _source_snapshot(project: Project) -> dict[str, object]:
    """Everything a ranking project's labelers could see change: prompts, completions, tasks and their items."""
    return {
        "prompts": sorted(project.prompts.values_list("pk", "text")),
        "completions": sorted(
            Completion.objects.filter(prompt__project=project).values_list("pk", "policy_id", "text")
        ),
        "tasks": sorted(project.tasks.values_list("pk", "judgment_count")),
        "items": sorted(
            TaskCompletion.objects.filter(task__project=project).values_list("task_id", "completion_id")
        ),
    }


def _k4_source_with_one_prompt_of_two_completions(manager) -> Project:  # type: ignore[no-untyped-def]
    source = Project.objects.create(name="helpful", k=4)
    make_manager(source, manager)
    line = {
        "id": "haiku",
        "prompt": "What is 2 plus 3?",
        "completions": [{"text": "5.", "policy": "vendor-a"}, {"text": "Five.", "policy": "vendor-b"}],
    }
    prompts_import(project=source, data=(json.dumps(line) + "\n").encode())
    return source


@worker_test
def test_creating_a_session_generates_into_the_session_and_leaves_the_source_project_unchanged(
    client, celery_worker: str, tiny_model_dir: Path
) -> None:
    # given a K=4 ranking project holding one prompt with two completions
    manager = user_with_roles(Role.MANAGER, username="ab-host")
    source = _k4_source_with_one_prompt_of_two_completions(manager)
    before = _source_snapshot(source)
    sft = Policy.objects.create(name="sft", kind=Policy.Kind.MODEL, base_model=str(tiny_model_dir))
    other = Policy.objects.create(
        name="sft-hot",
        kind=Policy.Kind.MODEL,
        base_model=str(tiny_model_dir),
        generation_settings={"prompt_format": "text"},
    )

    # when a manager creates an A/B session of two model policies on that project
    response = _post(client, manager, source, [sft, other])
    jobs = list(GenerationJob.objects.order_by("pk"))
    for job in jobs:
        wait_for(job, GenerationJob.TERMINAL)

    # then the outputs were generated into the session, which opened by itself
    session = Project.objects.get(kind=Project.Kind.AB)
    assert response.status_code == 302
    assert [(job.status, job.project_id) for job in jobs] == [("succeeded", session.pk)] * 2
    assert session.opened_at is not None
    outputs = Completion.objects.filter(prompt__project=session)
    assert sorted(outputs.values_list("policy__name", flat=True)) == ["sft", "sft-hot"]
    # (one pair, unless the two policies happened to write the same text)
    assert session.tasks.count() == len({completion_text_key(c.text) for c in outputs}) - 1
    # and the source project is exactly as it was: no completion and no ranking task was added
    assert _source_snapshot(source) == before
    assert source.tasks.count() == 0


@pytest.mark.django_db
def test_a_session_lacking_outputs_waits_closed_and_queues_jobs_on_its_own_prompts(
    client, manager, monkeypatch
):
    # given a K=4 project with one prompt answered by two imported sources only
    monkeypatch.setattr("training.services.generation.generation_job_enqueue", lambda *, job_id: True)
    source = _k4_source_with_one_prompt_of_two_completions(manager)
    before = _source_snapshot(source)
    sft = Policy.objects.create(name="sft", kind=Policy.Kind.MODEL, base_model="/models/sft")
    dpo = Policy.objects.create(name="dpo", kind=Policy.Kind.MODEL, base_model="/models/dpo")

    # when a session of the two model policies is created
    response = _post(client, manager, source, [sft, dpo])

    # then the session exists, has no pairs yet, and its jobs write into its own prompts
    session = Project.objects.get(kind=Project.Kind.AB)
    assert response.status_code == 302
    assert (session.opened_at, session.tasks.count()) == (None, 0)
    assert sorted(session.ab_policies.values_list("name", flat=True)) == ["dpo", "sft"]
    assert {job.project_id for job in GenerationJob.objects.all()} == {session.pk}
    assert session.prompts.count() == 1
    assert _source_snapshot(source) == before
    assert "opens by itself" in client.get(response.url, follow=True).content.decode()


@pytest.mark.django_db
def test_a_session_opens_when_the_last_missing_output_is_written(manager):
    # given a session whose second policy has answered nothing yet
    sft, dpo = Policy.objects.create(name="sft"), Policy.objects.create(name="dpo")
    prompts = source_prompts(3, [sft])
    session = ab_session_create(
        name="waiting",
        policies=[sft, dpo],
        prompts=prompts,
        votes_per_pair=1,
        created_by=manager,
        outputs_missing_allowed=True,
    )
    assert (session.opened_at, session.tasks.count()) == (None, 0)

    # when its outputs arrive and the session is asked to open
    for number, prompt in enumerate(session.prompts.order_by("pk")):
        Completion.objects.create(prompt=prompt, policy=dpo, text=f"Other answer {number}.")
    opened = ab_session_open(project=session)

    # then every prompt is one pair of the two policies, and opening again changes nothing
    session.refresh_from_db()
    assert opened and session.opened_at is not None
    assert session.tasks.count() == 3
    for task in session.tasks.all():
        assert sorted(task.completions.values_list("policy__name", flat=True)) == ["dpo", "sft"]
    assert ab_session_open(project=session) is False
    assert session.tasks.count() == 3
