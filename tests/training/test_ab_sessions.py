"""Managers create blind A/B sessions; outputs a policy lacks are generated before anything is shown."""

from __future__ import annotations

import pytest

from annotation.models import Policy, Project
from annotation.roles import Role
from tests.annotation.test_ab import source_prompts
from tests.factories import user_with_roles
from tests.training.test_builds_support import make_manager
from training.models import GenerationJob


@pytest.fixture
def manager(db):  # type: ignore[no-untyped-def]
    return user_with_roles(Role.MANAGER, username="host")


def _post(client, manager, source, policies):  # type: ignore[no-untyped-def]
    make_manager(source, manager)
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
def test_missing_outputs_of_a_model_policy_are_generated_first_and_no_session_is_made(client, manager):
    sft = Policy.objects.create(name="sft", kind=Policy.Kind.MODEL, base_model="/models/sft")
    dpo = Policy.objects.create(
        name="dpo", kind=Policy.Kind.MODEL, base_model="/models/sft", adapter="/runs/1"
    )
    source = source_prompts(3, [sft])[0].project  # dpo has answered nothing yet
    response = _post(client, manager, source, [sft, dpo])
    assert response.status_code == 202
    assert not Project.objects.filter(kind="ab").exists()
    job = GenerationJob.objects.get()
    assert (job.policy, job.project, job.n) == (dpo, source, 1)


@pytest.mark.django_db
def test_an_imported_policy_without_outputs_is_refused_by_name(client, manager):
    first = Policy.objects.create(name="vendor-a", kind=Policy.Kind.IMPORTED)
    second = Policy.objects.create(name="vendor-b", kind=Policy.Kind.IMPORTED)
    source = source_prompts(2, [first])[0].project
    response = _post(client, manager, source, [first, second])
    assert response.status_code == 200
    assert "imported:vendor-b cannot generate" in response.content.decode()
    assert not GenerationJob.objects.exists()
