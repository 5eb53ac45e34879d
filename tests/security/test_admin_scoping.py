"""What another project's manager can learn from the admin and the manager pages: nothing."""

from __future__ import annotations

import pytest
from django.test import Client

from annotation.models import Membership, Policy, Project
from annotation.roles import Role
from tests.factories import user_with_roles
from tests.training.test_builds_support import judge, make_manager, project_with_prompts, tasks_of
from training.models import GenerationJob

SECRET = "Zanzibar-7731"


@pytest.fixture
def two_managers(db: None) -> dict[str, object]:
    # A's ranking project, judged once, and A's A/B session; B's manager elsewhere.
    project = project_with_prompts(["One?", "Two?"], name=f"{SECRET} ranking", k=3)
    manager_a = make_manager(project, user_with_roles(Role.MANAGER, username="manager-a"))
    labeler = user_with_roles(Role.LABELER, username="labeler-a")
    Membership.objects.create(project=project, user=labeler, role=Role.LABELER)
    judge(tasks_of(project)[0], labeler, [1, 2, 3])
    ab = project_with_prompts(["Kinder?"], name=f"{SECRET} session", k=2, kind=Project.Kind.AB)
    make_manager(ab, manager_a)
    policy = project.prompts.first().completions.first().policy
    GenerationJob.objects.create(policy=policy, project=project, created_by=manager_a)
    other = Project.objects.create(name="Elsewhere", k=2)
    manager_b = make_manager(other, user_with_roles(Role.MANAGER, username="manager-b"))
    return {"project": project, "manager_a": manager_a, "manager_b": manager_b, "policy": policy}


@pytest.mark.django_db
def test_the_filters_still_offer_a_managers_own_projects(two_managers) -> None:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(two_managers["manager_a"])
    for url in ("/admin/annotation/task/", "/admin/annotation/comparison/", "/admin/annotation/judgment/"):
        assert f"{SECRET} ranking" in client.get(url).content.decode(), url


@pytest.mark.django_db
def test_another_projects_policy_does_not_exist_for_a_manager_in_the_admin(two_managers) -> None:  # type: ignore[no-untyped-def]
    policy: Policy = two_managers["policy"]
    client = Client()
    client.force_login(two_managers["manager_b"])

    listing = client.get("/admin/annotation/policy/")
    assert listing.status_code == 200 and policy.name not in listing.content.decode()
    for page in ("change/", "delete/", "history/"):
        response = client.get(f"/admin/annotation/policy/{policy.pk}/{page}")
        assert response.status_code == 302 and response["Location"] == "/admin/", page  # "doesn't exist"
    posted = client.post(f"/admin/annotation/policy/{policy.pk}/delete/", {"post": "yes"})
    assert posted.status_code == 302
    assert Policy.objects.filter(pk=policy.pk).exists()


@pytest.mark.django_db
def test_a_policy_shared_with_another_project_is_read_only_there_and_names_only_ones_own_project(
    two_managers,
) -> None:  # type: ignore[no-untyped-def]
    # given a policy of A's project that B's project uses too
    policy: Policy = two_managers["policy"]
    policy.projects.add(Project.objects.get(name="Elsewhere"))
    client = Client()
    client.force_login(two_managers["manager_b"])

    # then B sees it, with B's project only, and may neither change nor delete it
    listing = client.get("/admin/annotation/policy/").content.decode()
    assert policy.name in listing and "Elsewhere" in listing and SECRET not in listing
    change = client.get(f"/admin/annotation/policy/{policy.pk}/change/")
    assert change.status_code == 200 and SECRET not in change.content.decode()
    assert 'name="name"' not in change.content.decode()  # the view page of a read-only row
    renamed = client.post(f"/admin/annotation/policy/{policy.pk}/change/", {"name": "taken over"})
    assert renamed.status_code == 403
    page = client.get(f"/admin/annotation/policy/{policy.pk}/delete/")
    posted = client.post(f"/admin/annotation/policy/{policy.pk}/delete/", {"post": "yes"})
    assert page.status_code == 403 and SECRET not in page.content.decode()
    assert posted.status_code == 403
    policy.refresh_from_db()
    assert policy.name != "taken over"


@pytest.mark.django_db
def test_a_policy_used_only_in_a_managers_own_projects_lists_what_its_deletion_takes(two_managers) -> None:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(two_managers["manager_a"])
    page = client.get(f"/admin/annotation/policy/{two_managers['policy'].pk}/delete/")
    assert page.status_code == 200
    assert SECRET in page.content.decode()


@pytest.mark.django_db
def test_a_ranking_projects_results_page_is_not_found_rather_than_a_server_error(two_managers) -> None:  # type: ignore[no-untyped-def]
    # The results page is for A/B sessions; a judged K=3 ranking project crashed it.
    client = Client()
    client.force_login(two_managers["manager_a"])
    response = client.get(f"/manage/projects/{two_managers['project'].pk}/results")
    assert response.status_code == 404
