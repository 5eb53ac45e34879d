"""Accounts: signing in, lockout, roles and what each role sees, accounts made by managers only."""

from __future__ import annotations

import re
from collections.abc import Callable
from io import StringIO

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AbstractUser, Group
from django.core.management import call_command
from django.core.management.base import CommandError
from django.http import HttpResponse
from django.test import Client

from annotation.management.commands.demo_users import DEMO_USERS
from annotation.models import Membership, Project
from annotation.roles import Role
from tests.factories import PASSWORD, user_with_roles

LOGIN_URL = "/accounts/login/"
NAV_URLS = ("/label/", "/evaluate/", "/manage/", "/admin/")

Login = Callable[[Client, AbstractBaseUser], Client]

pytestmark = pytest.mark.django_db


def csrf_token(client: Client, page: str) -> str:
    """Open `page` as a browser would and return the CSRF token its cookie carries."""
    response = client.get(page)
    assert response.status_code == 200, f"{page} answered {response.status_code}"
    return client.cookies["csrftoken"].value


def sign_in(client: Client, username: str, password: str) -> HttpResponse:
    """Submit the real login form, CSRF token included."""
    token = csrf_token(client, LOGIN_URL)
    return client.post(LOGIN_URL, {"username": username, "password": password, "csrfmiddlewaretoken": token})


# --- signing in ------------------------------------------------------------------


def test_a_good_login_redirects_home(csrf_client: Client, labeler: AbstractUser) -> None:
    response = sign_in(csrf_client, "lee", PASSWORD)

    assert response.status_code == 302
    assert response.url == "/"
    assert csrf_client.get("/").context["user"] == labeler


def test_a_login_without_the_csrf_token_is_refused(csrf_client: Client, labeler: AbstractUser) -> None:
    response = csrf_client.post(LOGIN_URL, {"username": "lee", "password": PASSWORD})

    assert response.status_code == 403


def test_a_wrong_password_shows_the_form_again(csrf_client: Client, labeler: AbstractUser) -> None:
    response = sign_in(csrf_client, "lee", "not-the-password")

    assert response.status_code == 200
    assert response.context["form"].errors
    assert 'class="error" role="alert"' in response.content.decode()


def test_repeated_wrong_passwords_lock_the_account_even_for_the_right_one(
    csrf_client: Client, labeler: AbstractUser
) -> None:
    # given as many failures as the limit allows
    for _ in range(settings.AXES_FAILURE_LIMIT):
        sign_in(csrf_client, "lee", "not-the-password")

    # when the right password comes next
    response = sign_in(csrf_client, "lee", PASSWORD)

    # then it is refused with the locked-out page
    assert response.status_code == 429
    assert "Too many failed sign-in attempts" in response.content.decode()
    assert "_auth_user_id" not in csrf_client.session


def test_one_fewer_failure_than_the_limit_does_not_lock_the_account(
    csrf_client: Client, labeler: AbstractUser
) -> None:
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        sign_in(csrf_client, "lee", "not-the-password")

    response = sign_in(csrf_client, "lee", PASSWORD)

    assert response.status_code == 302


def test_the_lockout_is_per_username_and_address(
    csrf_client: Client, labeler: AbstractUser, evaluator: AbstractUser
) -> None:
    # given the labeler locked out from this address
    for _ in range(settings.AXES_FAILURE_LIMIT):
        sign_in(csrf_client, "lee", "not-the-password")
    assert sign_in(csrf_client, "lee", PASSWORD).status_code == 429

    # when another person signs in from the same address
    response = sign_in(Client(enforce_csrf_checks=True), "eve", PASSWORD)

    # then they get in
    assert response.status_code == 302
    assert response.url == "/"


# --- roles and what each role sees ---------------------------------------------------


def test_the_role_groups_exist_after_migrations() -> None:
    assert set(Group.objects.values_list("name", flat=True)) >= {"manager", "labeler", "evaluator"}


def working_in_a_project(user: AbstractUser, persona: str) -> AbstractUser:
    """Labelers and evaluators work only where they are members (annotation.roles): give them a project."""
    if persona in (Role.LABELER, Role.EVALUATOR):
        project = Project.objects.create(name=f"{persona}'s project", k=2)
        Membership.objects.create(project=project, user=user, role=persona)
    return user


def nav_links(client: Client) -> set[str]:
    """The links in the page's navigation bar (not the rest of the page)."""
    page = client.get("/").content.decode()
    nav = re.search(r"<nav\b.*?</nav>", page, flags=re.DOTALL)
    assert nav is not None, "the home page has no <nav>"
    return set(re.findall(r'href="([^"]+)"', nav.group(0)))


@pytest.mark.parametrize(
    ("persona", "visible"),
    [
        ("manager", {"/manage/", "/admin/"}),
        ("labeler", {"/label/"}),
        ("evaluator", {"/evaluate/"}),
        ("outsider", set()),
    ],
)
def test_each_role_sees_only_its_own_navigation(
    persona: str, visible: set[str], request: pytest.FixtureRequest, csrf_client: Client, login: Login
) -> None:
    login(csrf_client, working_in_a_project(request.getfixturevalue(persona), persona))

    links = nav_links(csrf_client)

    assert links & set(NAV_URLS) == visible
    assert "/" in links


def test_a_person_with_several_roles_sees_each_roles_navigation(csrf_client: Client, login: Login) -> None:
    person = user_with_roles()
    project = Project.objects.create(name="both", k=2)
    for role in (Role.LABELER, Role.EVALUATOR):
        Membership.objects.create(project=project, user=person, role=role)
    login(csrf_client, person)

    assert nav_links(csrf_client) & set(NAV_URLS) == {"/label/", "/evaluate/"}


@pytest.mark.parametrize("url", ["/manage/", "/evaluate/"])
def test_a_labeler_is_forbidden_other_roles_pages(
    url: str, csrf_client: Client, login: Login, labeler: AbstractUser
) -> None:
    login(csrf_client, labeler)

    assert csrf_client.get(url).status_code == 403


@pytest.mark.parametrize(
    ("persona", "url"),
    [("labeler", "/label/"), ("evaluator", "/evaluate/"), ("manager", "/manage/")],
)
def test_each_role_opens_its_own_page(
    persona: str, url: str, request: pytest.FixtureRequest, csrf_client: Client, login: Login
) -> None:
    login(csrf_client, working_in_a_project(request.getfixturevalue(persona), persona))

    assert csrf_client.get(url).status_code == 200


@pytest.mark.parametrize("url", ["/", "/label/", "/evaluate/", "/manage/"])
def test_an_anonymous_visitor_is_sent_to_the_login_page(url: str, csrf_client: Client) -> None:
    response = csrf_client.get(url)

    assert response.status_code == 302
    assert response.url == f"{LOGIN_URL}?next={url}"


@pytest.mark.parametrize("url", ["/accounts/signup/", "/accounts/register/"])
def test_there_is_no_sign_up_page(url: str, csrf_client: Client) -> None:
    assert csrf_client.get(url).status_code == 404


# --- accounts are made by a manager or an operator --------------------------------------


def test_create_user_makes_an_account_whose_printed_password_signs_in(csrf_client: Client) -> None:
    # given
    out = StringIO()

    # when
    call_command("create_user", "alice", "--role", "labeler", stdout=out)

    # then
    password = re.search(r"^password: (\S+)$", out.getvalue(), flags=re.MULTILINE)
    assert password is not None, out.getvalue()
    alice = get_user_model().objects.get(username="alice")
    assert set(alice.groups.values_list("name", flat=True)) == {"labeler"}
    assert not alice.is_staff
    assert sign_in(csrf_client, "alice", password.group(1)).status_code == 302


def test_create_user_with_a_project_makes_the_roles_memberships_there_so_the_person_can_work(
    csrf_client: Client,
) -> None:
    # given a project, named as an operator would
    project = Project.objects.create(name="Demo: helpful answers", k=2)
    out = StringIO()

    # when an account is made in it as a labeler and an evaluator
    call_command(
        "create_user",
        "alice",
        "--role",
        "labeler",
        "--role",
        "evaluator",
        "--project",
        project.name,
        stdout=out,
    )

    # then those are its roles there, and its pages open
    alice = get_user_model().objects.get(username="alice")
    assert set(Membership.objects.filter(user=alice).values_list("project", "role")) == {
        (project.pk, Role.LABELER),
        (project.pk, Role.EVALUATOR),
    }
    csrf_client.force_login(alice)
    assert csrf_client.get("/label/").status_code == 200
    assert "member of no project" not in out.getvalue()


def test_create_user_without_a_project_says_the_labeler_cannot_work_yet() -> None:
    out = StringIO()
    call_command("create_user", "alice", "--role", "labeler", stdout=out)
    assert "member of no project yet" in out.getvalue()


def test_create_user_refuses_a_project_that_does_not_exist() -> None:
    with pytest.raises(CommandError, match=r"no project with the id or name 'nowhere'"):
        call_command("create_user", "alice", "--role", "labeler", "--project", "nowhere", stdout=StringIO())
    assert not get_user_model().objects.filter(username="alice").exists()


def test_create_user_rejects_an_unknown_role() -> None:
    with pytest.raises(CommandError, match=r"invalid choice: 'wizard'"):
        call_command("create_user", "alice", "--role", "wizard", stdout=StringIO())

    assert not get_user_model().objects.filter(username="alice").exists()


def test_create_user_rejects_a_username_that_is_taken(labeler: AbstractUser) -> None:
    with pytest.raises(CommandError, match=r"a user named 'LEE' already exists"):
        call_command("create_user", "LEE", "--role", "evaluator", stdout=StringIO())


def manages_and_labels(manager: AbstractUser, labeler: AbstractUser) -> None:
    """A project managed by `manager` where `labeler` labels: the labeler's account is the manager's to administer."""
    project = Project.objects.create(name="accounts", k=2)
    Membership.objects.create(project=project, user=manager, role=Role.MANAGER)
    Membership.objects.create(project=project, user=labeler, role=Role.LABELER)


def test_a_manager_lists_the_accounts_of_their_projects_but_not_superusers_nor_themselves(
    csrf_client: Client, login: Login, manager: AbstractUser, labeler: AbstractUser
) -> None:
    # given
    get_user_model().objects.create_superuser("rootroot", "root@example.com", PASSWORD)
    manages_and_labels(manager, labeler)
    assert manager.is_staff and not manager.is_superuser
    login(csrf_client, manager)

    # when
    response = csrf_client.get("/admin/auth/user/")

    # then
    assert response.status_code == 200
    listed = {user.username for user in response.context["cl"].result_list}
    assert listed == {"lee"}
    assert "rootroot" not in response.content.decode()


def test_a_manager_cannot_open_a_superusers_account(
    csrf_client: Client, login: Login, manager: AbstractUser
) -> None:
    root = get_user_model().objects.create_superuser("rootroot", "root@example.com", PASSWORD)
    login(csrf_client, manager)

    response = csrf_client.get(f"/admin/auth/user/{root.pk}/change/")

    assert response.status_code == 302
    assert response.url == "/admin/"


def test_a_manager_cannot_make_anyone_a_superuser(
    csrf_client: Client, login: Login, manager: AbstractUser, labeler: AbstractUser
) -> None:
    # given
    manages_and_labels(manager, labeler)
    login(csrf_client, manager)
    url = f"/admin/auth/user/{labeler.pk}/change/"
    token = csrf_token(csrf_client, url)

    # when the manager posts the change form with the superuser and staff boxes ticked
    response = csrf_client.post(
        url,
        {
            "csrfmiddlewaretoken": token,
            "username": "lee",
            "email": "lee@changed.example.com",
            "is_active": "on",
            "is_superuser": "on",
            "is_staff": "on",
            "groups": [Group.objects.get(name="labeler").pk],
            "date_joined_0": "2025-01-01",
            "date_joined_1": "00:00:00",
        },
    )

    # then the change is saved, without the flags
    assert response.status_code == 302, response.context["adminform"].form.errors
    labeler.refresh_from_db()
    assert labeler.email == "lee@changed.example.com"
    assert not labeler.is_superuser
    assert not labeler.is_staff


def demo_passwords() -> dict[str, str]:
    out = StringIO()
    call_command("demo_users", stdout=out)
    usernames = {username for username, _roles in DEMO_USERS}
    passwords = {}
    for line in out.getvalue().splitlines():
        fields = line.split()
        if fields and fields[0] in usernames:
            passwords[fields[0]] = fields[-1]
    assert set(passwords) == usernames, out.getvalue()
    return passwords


def test_demo_users_prints_new_passwords_at_every_run() -> None:
    # given a first run
    first = demo_passwords()

    # when it runs again
    second = demo_passwords()

    # then every password changed, and only the new one signs in
    for username in first:
        assert second[username] != first[username]
        assert sign_in(Client(enforce_csrf_checks=True), username, first[username]).status_code == 200
        assert sign_in(Client(enforce_csrf_checks=True), username, second[username]).status_code == 302


def test_demo_users_gives_each_demo_account_its_role() -> None:
    demo_passwords()

    for username, roles in DEMO_USERS:
        user = get_user_model().objects.get(username=username)
        assert set(user.groups.values_list("name", flat=True)) == set(roles)
