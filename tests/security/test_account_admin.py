"""What a manager may do to accounts in the admin (SECURITY.md, "Accounts").

A manager administers the accounts whose every project membership is in a
project they manage (and that have at least one): never another manager's,
a staff member's or a superuser's, never one that also works elsewhere and
never one that belongs to no project. Nobody but a superuser sets another
person's password; a manager sends the owner a reset link instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser
from django.core import mail
from django.test import Client

from annotation.models import Membership, Project
from annotation.roles import Role
from tests.factories import PASSWORD, user_with_roles

NEW_PASSWORD = "N3w-pass-phrase-for-takeover!"


@dataclass
class Accounts:
    project_a: Project
    project_b: Project
    manager_a: AbstractUser
    manager_b: AbstractUser
    labeler_a: AbstractUser  # only in A
    labeler_b: AbstractUser  # only in B: the one account B's manager administers
    evaluator_b: AbstractUser  # only in B
    shared: AbstractUser  # labels in A and B
    loner: AbstractUser  # holds a role but belongs to no project
    outsider: AbstractUser  # no role, no project
    superuser: AbstractUser


@pytest.fixture
def accounts(db: None) -> Accounts:
    project_a = Project.objects.create(name="Project Aardvark", k=2)
    project_b = Project.objects.create(name="Project Bumblebee", k=2)
    people = Accounts(
        project_a=project_a,
        project_b=project_b,
        manager_a=user_with_roles(Role.MANAGER, username="manager-a"),
        manager_b=user_with_roles(Role.MANAGER, username="manager-b"),
        labeler_a=user_with_roles(Role.LABELER, username="labeler-a"),
        labeler_b=user_with_roles(Role.LABELER, username="labeler-b"),
        evaluator_b=user_with_roles(Role.EVALUATOR, username="evaluator-b"),
        shared=user_with_roles(Role.LABELER, username="shared-labeler"),
        loner=user_with_roles(Role.LABELER, username="loner"),
        outsider=user_with_roles(username="outsider"),
        superuser=get_user_model().objects.create_superuser("root", "root@example.com", PASSWORD),
    )
    for project, user, role in (
        (project_a, people.manager_a, Role.MANAGER),
        (project_b, people.manager_b, Role.MANAGER),
        (project_a, people.labeler_a, Role.LABELER),
        (project_b, people.labeler_b, Role.LABELER),
        (project_b, people.evaluator_b, Role.EVALUATOR),
        (project_a, people.shared, Role.LABELER),
        (project_b, people.shared, Role.LABELER),
    ):
        Membership.objects.create(project=project, user=user, role=role)
    return people


def signed_in(user: AbstractUser) -> Client:
    client = Client()
    client.force_login(user)
    return client


def can_sign_in(user: AbstractUser, password: str) -> bool:
    user.refresh_from_db()
    return user.check_password(password)


@pytest.mark.django_db
def test_another_projects_manager_cannot_set_a_managers_password_and_take_the_account_over(
    accounts: Accounts,
) -> None:
    # given B's manager in the admin
    client = signed_in(accounts.manager_b)
    url = f"/admin/auth/user/{accounts.manager_a.pk}/password/"

    # when they post a new password for A's manager, as the outside check did
    response = client.post(
        url, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD, "usable_password": "true"}
    )

    # then it is refused, the password is unchanged, and A's project stays A's
    assert response.status_code in (403, 404), response.status_code
    assert not can_sign_in(accounts.manager_a, NEW_PASSWORD)
    assert can_sign_in(accounts.manager_a, PASSWORD)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "target", ["manager_a", "manager_b", "labeler_a", "labeler_b", "shared", "loner", "outsider", "superuser"]
)
def test_a_manager_sets_nobodys_password_not_even_their_own_labelers(accounts: Accounts, target: str) -> None:
    user = getattr(accounts, target)
    client = signed_in(accounts.manager_b)
    url = f"/admin/auth/user/{user.pk}/password/"

    assert client.get(url).status_code in (403, 404)
    response = client.post(
        url, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD, "usable_password": "true"}
    )

    assert response.status_code in (403, 404)
    assert not can_sign_in(user, NEW_PASSWORD)


@pytest.mark.django_db
def test_a_superuser_still_sets_passwords(accounts: Accounts) -> None:
    client = signed_in(accounts.superuser)
    url = f"/admin/auth/user/{accounts.labeler_b.pk}/password/"
    response = client.post(
        url, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD, "usable_password": "true"}
    )
    assert response.status_code == 302
    assert can_sign_in(accounts.labeler_b, NEW_PASSWORD)


ADMINISTERED_BY_B = {"labeler_b", "evaluator_b"}
ACCOUNT_PAGES = ("change/", "history/", "delete/", "")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "target",
    [
        "manager_a",
        "manager_b",
        "labeler_a",
        "labeler_b",
        "evaluator_b",
        "shared",
        "loner",
        "outsider",
        "superuser",
    ],
)
def test_a_manager_opens_only_the_accounts_of_people_who_work_only_in_their_projects(
    accounts: Accounts, target: str
) -> None:
    user = getattr(accounts, target)
    client = signed_in(accounts.manager_b)
    for page in ACCOUNT_PAGES:
        url = f"/admin/auth/user/{user.pk}/{page}"
        response = client.get(url)
        if page == "":
            # The bare URL only redirects to the change page, which answers for itself.
            assert response.status_code == 302 and response["Location"] == f"{url}change/"
        elif target in ADMINISTERED_BY_B:
            # Managers deactivate accounts; deleting one is a superuser's (no delete permission).
            expected = 403 if page == "delete/" else 200
            assert response.status_code == expected, (url, response.status_code)
        else:
            assert response.status_code in (302, 403, 404), (url, response.status_code)
            if response.status_code == 302:
                assert response["Location"] == "/admin/", (url, response["Location"])
            assert user.username not in response.content.decode()
    listed = {account.username for account in client.get("/admin/auth/user/").context["cl"].result_list}
    assert (user.username in listed) == (target in ADMINISTERED_BY_B)


@pytest.mark.django_db
def test_a_manager_cannot_edit_an_account_they_do_not_administer(accounts: Accounts) -> None:
    client = signed_in(accounts.manager_b)
    before = get_user_model().objects.values_list("pk", "username", "email", "is_active").order_by("pk")
    snapshot = list(before)
    for user in (accounts.manager_a, accounts.shared, accounts.loner, accounts.labeler_a):
        client.post(
            f"/admin/auth/user/{user.pk}/change/",
            {"username": "taken", "email": "attacker@example.com", "is_active": "on"},
        )
        client.post(f"/admin/auth/user/{user.pk}/delete/", {"post": "yes"})
    assert list(before.all()) == snapshot


@pytest.mark.django_db
def test_a_manager_sends_their_labeler_a_password_reset_link_that_only_the_owner_receives(
    accounts: Accounts,
) -> None:
    # given B's manager and B's labeler, who has an email address
    client = signed_in(accounts.manager_b)

    # when the manager runs the reset action on the labeler, and on accounts they do not administer
    response = client.post(
        "/admin/auth/user/",
        {
            "action": "password_reset_send",
            "_selected_action": [accounts.labeler_b.pk, accounts.manager_a.pk, accounts.shared.pk],
        },
    )

    # then one mail goes to the labeler alone, and its link lets the owner choose a password
    assert response.status_code == 302
    assert [message.to for message in mail.outbox] == [[accounts.labeler_b.email]]
    link = re.search(r"http://testserver(/accounts/reset/\S+/)", mail.outbox[0].body)
    assert link is not None, mail.outbox[0].body
    owner = Client()
    form = owner.get(link.group(1), follow=True)
    assert form.status_code == 200
    done = owner.post(
        form.redirect_chain[-1][0], {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD}
    )
    assert done.status_code == 302
    assert can_sign_in(accounts.labeler_b, NEW_PASSWORD)


@pytest.mark.django_db
def test_a_manager_creates_an_account_into_one_of_their_projects(accounts: Accounts) -> None:
    client = signed_in(accounts.manager_b)

    # A's project is not offered: choosing it is refused and creates nobody
    refused = client.post(
        "/admin/auth/user/add/",
        {
            "username": "newcomer",
            "password1": NEW_PASSWORD,
            "password2": NEW_PASSWORD,
            "usable_password": "true",
            "project": accounts.project_a.pk,
            "role": Role.LABELER,
        },
    )
    assert refused.status_code == 200
    assert "Project Aardvark" not in refused.content.decode()
    assert not get_user_model().objects.filter(username="newcomer").exists()

    created = client.post(
        "/admin/auth/user/add/",
        {
            "username": "newcomer",
            "password1": NEW_PASSWORD,
            "password2": NEW_PASSWORD,
            "usable_password": "true",
            "project": accounts.project_b.pk,
            "role": Role.LABELER,
        },
    )
    assert created.status_code == 302, created.context["adminform"].form.errors
    newcomer = get_user_model().objects.get(username="newcomer")
    assert list(Membership.objects.filter(user=newcomer).values_list("project", "role")) == [
        (accounts.project_b.pk, Role.LABELER)
    ]
    assert newcomer.groups.filter(name=Role.LABELER).exists()
    # and the manager can go on administering the account they made
    assert client.get(f"/admin/auth/user/{newcomer.pk}/change/").status_code == 200


@pytest.mark.django_db
def test_a_manager_cannot_create_a_manager_account(accounts: Accounts) -> None:
    client = signed_in(accounts.manager_b)
    response = client.post(
        "/admin/auth/user/add/",
        {
            "username": "second-boss",
            "password1": NEW_PASSWORD,
            "password2": NEW_PASSWORD,
            "usable_password": "true",
            "project": accounts.project_b.pk,
            "role": Role.MANAGER,
        },
    )
    assert response.status_code == 200
    assert not get_user_model().objects.filter(username="second-boss").exists()


@pytest.mark.django_db
def test_adding_a_member_finds_outside_accounts_only_by_their_exact_username(accounts: Accounts) -> None:
    # The project's member form looks people up; a manager must be able to add
    # someone they were told about without being able to list everybody.
    client = signed_in(accounts.manager_b)
    url = "/admin/autocomplete/"
    params = {"app_label": "annotation", "model_name": "membership", "field_name": "user"}

    def found(term: str) -> set[str]:
        response = client.get(url, {**params, "term": term})
        assert response.status_code == 200
        return {row["text"] for row in response.json()["results"]}

    assert found("labeler") == {"labeler-b"}
    assert found("loner") == {"loner"}
    assert found("labeler-a") == {"labeler-a"}
    assert found("manager-a") == set()
    assert found("root") == set()


@pytest.mark.django_db
@pytest.mark.parametrize("actor", ["manager_b", "labeler_a", "outsider", None])
def test_a_forged_reset_link_sets_no_password(accounts: Accounts, actor: str | None) -> None:
    client = signed_in(getattr(accounts, actor)) if actor else Client()
    from django.utils.encoding import force_bytes
    from django.utils.http import urlsafe_base64_encode

    uid = urlsafe_base64_encode(force_bytes(accounts.manager_a.pk))
    page = client.get(f"/accounts/reset/{uid}/forged-token/", follow=True)
    assert page.status_code == 200 and not page.context["validlink"]
    client.post(
        f"/accounts/reset/{uid}/set-password/", {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD}
    )
    assert not can_sign_in(accounts.manager_a, NEW_PASSWORD)
