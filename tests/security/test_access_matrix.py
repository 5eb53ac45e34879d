"""Every URL that names an object, for every kind of stranger, by GET and by POST.

The doors are found by walking ``django.urls.get_resolver()``: every pattern
with a parameter is an object door, and
``test_every_id_bearing_url_pattern_is_in_the_matrix`` fails when one appears
that the matrix below does not know, so a new door cannot go untested.

For each door, actor and method the answer must be a refusal — 404 for an
object the actor may not see, 403 where a role gate stops them first, 405 for
a method the view never takes, a redirect to the login page (pages, admin) or
401 (API) for anonymous callers — never a 2xx on someone else's object; and
nothing in the database may change (rows of every model a door can write,
statuses, cancel flags, passwords).

The actors (the owners — the project's manager and the labeler holding the
assignment — are not among them):

- ``other_manager``: manages another project (staff, so the admin lets them in);
- ``labeler``: a labeler *of this project* who holds an assignment of their
  own, so the doors that are theirs too (the ranking page, claiming, which
  returns their own lease and writes nothing) answer 200 and every other one
  must not;
- ``evaluator``: an evaluator member of this (ranking) project;
- ``outsider``: signed in, no role;
- ``anonymous``.

The admin has one kind of shared row on purpose, listed in SECURITY.md: the
role groups (managers may read them); another project's manager may open
those pages. Policies belong to projects (Policy.projects) and are no longer
shared: another project's manager neither sees nor uses this project's
(``test_another_projects_manager_neither_sees_nor_uses_this_projects_policy``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from axes.models import AccessAttempt, AccessFailureLog, AccessLog
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser, Group
from django.contrib.contenttypes.models import ContentType
from django.core.files.uploadedfile import SimpleUploadedFile
from django.http import HttpResponse
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from rest_framework.authtoken.models import Token

from annotation.models import (
    Assignment,
    Comparison,
    Completion,
    CompletionScore,
    Judgment,
    Membership,
    Notice,
    Policy,
    Project,
    Prompt,
    Task,
    Webhook,
    WebhookDelivery,
)
from annotation.roles import Role
from annotation.selectors import assignment_items_in_display_order
from annotation.services import assignment_claim_next
from tests.factories import user_with_roles
from tests.training.test_builds_support import judge, make_manager, project_with_prompts, tasks_of
from training import models as training_models
from training.models import ContinuousTraining, DatasetBuild, Judge, RewardModel, ScoringJob, TrainingRun

# Being added alongside this test (generation jobs); the matrix covers it once it exists.
GenerationJob = getattr(training_models, "GenerationJob", None)

ACTORS = ("other_manager", "labeler", "evaluator", "outsider", "anonymous")
METHODS = ("GET", "POST")
# The roles each actor holds anywhere (role_required gates look at these).
ACTOR_ROLES: dict[str, frozenset[str]] = {
    "other_manager": frozenset({Role.MANAGER}),
    "labeler": frozenset({Role.LABELER}),
    "evaluator": frozenset({Role.EVALUATOR}),
    "outsider": frozenset(),
    "anonymous": frozenset(),
}
# Parameters that name no object: the admin's per-app index and its catch-all
# redirect, and a password reset link's account and token (the token is the
# credential; a forged link answers "invalid" to everyone, tested in test_account_admin).
NOT_OBJECT_PARAMETERS = {"app_label", "url", "uidb64", "token"}
# In the names of this world's projects: no response to a stranger may contain it.
SECRET = "Quokka-4471"


# --- the world -----------------------------------------------------------------------


@dataclass
class World:
    """One project with everything a door can name, its owners, and the actors."""

    project: Project
    ab_project: Project  # a blind A/B session of the same manager; the evaluator actor is no member
    other_project: Project
    manager: AbstractUser
    holder: AbstractUser
    held: Assignment  # the holder's active assignment
    own: Assignment  # the labeler actor's own active assignment
    judgment: Judgment
    build: DatasetBuild
    run: TrainingRun  # queued: a cancel would flip its status
    reward_model: RewardModel
    superuser: AbstractUser
    other_labeler: AbstractUser  # labels only in the other project: the other manager administers her
    actors: dict[str, AbstractUser | None]
    admin_targets: dict[str, Any] = field(default_factory=dict)
    notice_id: int = 0  # a notice of the manager's
    judge_id: int = 0  # a model judge of the ranking project
    membership_id: int = 0  # the labeler actor's membership of the ranking project

    def client(self, actor: str) -> Client:
        client = Client()  # CSRF is checked in test_hardening; here the access rules are
        user = self.actors[actor]
        if user is not None:
            client.force_login(user)
        return client

    def parameters(self, door: Door) -> dict[str, Any]:
        return {
            "project_id": (self.ab_project if door.ab else self.project).pk,
            "assignment_id": self.held.pk,
            "build_id": self.build.pk,
            "run_id": self.run.pk,
            "judgment_id": self.judgment.pk,
            "notice_id": self.notice_id,
            "webhook_id": self.admin_targets.get("annotation.webhook"),
            "judge_id": self.judge_id,
            "membership_id": self.membership_id,
            "job_id": self.admin_targets.get("training.generationjob"),
            "action": "off",
        }


def build_world() -> World:
    """Create the world (needs the database)."""
    project = project_with_prompts(
        ["First question?", "Second question?", "Third question?"],
        name=f"{SECRET} ranking",
        k=3,
        flags=["harmful"],
    )
    manager = make_manager(project, user_with_roles(Role.MANAGER, username="mona"))
    holder = user_with_roles(Role.LABELER, username="holly")
    labeler = user_with_roles(Role.LABELER, username="lee")
    judge_user = user_with_roles(Role.LABELER, username="jude")
    evaluator = user_with_roles(Role.EVALUATOR, username="eve")
    for person, role in ((holder, Role.LABELER), (labeler, Role.LABELER), (judge_user, Role.LABELER)):
        Membership.objects.create(project=project, user=person, role=role)
    Membership.objects.create(project=project, user=evaluator, role=Role.EVALUATOR)

    ab_project = project_with_prompts(
        ["Which is kinder?"], name=f"{SECRET} session", k=2, kind=Project.Kind.AB
    )
    make_manager(ab_project, manager)
    Membership.objects.create(
        project=ab_project, user=user_with_roles(Role.EVALUATOR, username="ava"), role=Role.EVALUATOR
    )
    other_project = Project.objects.create(name="elsewhere", k=2)
    other_manager = make_manager(other_project, user_with_roles(Role.MANAGER, username="otis"))
    other_labeler = user_with_roles(Role.LABELER, username="olga")
    Membership.objects.create(project=other_project, user=other_labeler, role=Role.LABELER)
    outsider = user_with_roles(username="otto")
    superuser = get_user_model().objects.create_superuser("root", "root@example.com", None)

    # Task 1 is judged, task 2 leased to the holder, task 3 to the labeler actor (overlap 1: nothing left).
    judgment = judge(tasks_of(project)[0], judge_user, [1, 2, 3], flags={0: ["harmful"]})
    held = assignment_claim_next(project=project, user=holder)
    own = assignment_claim_next(project=project, user=labeler)
    assert held is not None and own is not None and held.task_id != own.task_id

    build = DatasetBuild.objects.create(
        name="matrix build", created_by=manager, status=DatasetBuild.Status.SUCCEEDED
    )
    build.projects.add(project)
    run = TrainingRun.objects.create(
        name="matrix run",
        kind=TrainingRun.Kind.REWARD,
        dataset_build=build,
        base_model="m",
        created_by=manager,
    )
    finished = TrainingRun.objects.create(
        name="matrix finished run",
        kind=TrainingRun.Kind.REWARD,
        dataset_build=build,
        base_model="m",
        status=TrainingRun.Status.SUCCEEDED,
        created_by=manager,
    )
    reward_model = RewardModel.objects.create(name="matrix rm", run=finished, base_model="m", path="/nowhere")
    Token.objects.create(user=holder)
    attempt = {"user_agent": "x", "ip_address": "127.0.0.1", "username": "holly", "http_accept": "*/*"}
    world = World(
        project=project,
        ab_project=ab_project,
        other_project=other_project,
        manager=manager,
        holder=holder,
        held=held,
        own=own,
        judgment=judgment,
        build=build,
        run=run,
        reward_model=reward_model,
        superuser=superuser,
        other_labeler=other_labeler,
        actors={
            "other_manager": other_manager,
            "labeler": labeler,
            "evaluator": evaluator,
            "outsider": outsider,
            "anonymous": None,
        },
    )
    world.admin_targets = {
        # model label -> the row whose admin pages are tried
        "auth.user": superuser.pk,  # a manager may administer accounts, never a superuser's
        "auth.group": Group.objects.get(name=Role.LABELER).pk,
        "authtoken.tokenproxy": holder.pk,  # DRF's token admin names a token by its user
        "axes.accessattempt": AccessAttempt.objects.create(
            **attempt, get_data="", post_data="", failures_since_start=1
        ).pk,
        "axes.accesslog": AccessLog.objects.create(**attempt).pk,
        "axes.accessfailurelog": AccessFailureLog.objects.create(**attempt).pk,
        "annotation.project": project.pk,
        "annotation.policy": Completion.objects.filter(prompt__project=project).first().policy_id,
        "annotation.prompt": held.task.prompt_id,
        "annotation.task": held.task_id,
        "annotation.assignment": held.pk,
        "annotation.judgment": judgment.pk,
        "annotation.comparison": Comparison.objects.filter(judgment=judgment).first().pk,
        "training.datasetbuild": build.pk,
        "training.trainingrun": run.pk,
        "training.rewardmodel": reward_model.pk,
        "training.scoringjob": ScoringJob.objects.create(
            project=ab_project,
            reward_model=reward_model,
            scorer="reward model: matrix rm",
            created_by=manager,
        ).pk,
    }
    webhook = Webhook.objects.create(
        project=project, url=f"https://hooks.example/{SECRET}", secret=SECRET, events=["run.finished"]
    )
    world.admin_targets["annotation.webhook"] = webhook.pk
    world.admin_targets["annotation.webhookdelivery"] = WebhookDelivery.objects.create(
        webhook=webhook, event="run.finished", payload={"project": SECRET}, next_attempt_at=timezone.now()
    ).pk
    world.notice_id = Notice.objects.create(
        user=manager, project=project, kind="run", object_id=run.pk, outcome="failed", title=SECRET
    ).pk
    world.membership_id = Membership.objects.get(project=project, user=labeler).pk
    world.judge_id = Judge.objects.create(
        project=project,
        reward_model=reward_model,
        account=get_user_model().objects.create_user(username="judge-matrix", password=None),
        created_by=manager,
    ).pk
    if GenerationJob is not None:
        world.admin_targets["training.generationjob"] = GenerationJob.objects.create(
            policy_id=world.admin_targets["annotation.policy"], project=project, created_by=manager
        ).pk
    return world


@pytest.fixture
def world(db: None) -> World:
    return build_world()


def database_state() -> dict[str, Any]:
    """Everything a door could write, as comparable values."""
    User = get_user_model()

    def rows(model: Any, *fields: str) -> list[tuple[Any, ...]]:
        return list(model.objects.order_by("pk").values_list("pk", *fields))

    return {
        "assignments": rows(Assignment, "status", "skip_reason", "lease_expires_at", "user_id"),
        "judgments": rows(Judgment, "ranks", "rationale"),
        "comparisons": Comparison.objects.count(),
        "prompts": rows(Prompt, "text"),
        "completions": rows(Completion, "text", "policy_id"),
        "tasks": rows(Task, "judgment_count"),
        "projects": rows(Project, "name", "is_active", "overlap"),
        "memberships": rows(Membership, "user_id", "role"),
        "webhooks": rows(Webhook, "url", "active", "events"),
        "policies": rows(Policy, "name"),
        "builds": rows(DatasetBuild, "name", "status"),
        "runs": rows(TrainingRun, "status", "cancel_requested"),
        "generation_jobs": rows(GenerationJob, "status", "cancel_requested") if GenerationJob else [],
        "reward_models": rows(RewardModel, "name"),
        "scoring_jobs": rows(ScoringJob, "status", "cancel_requested"),
        "judges": rows(Judge, "active", "reward_model_id"),
        "continuous_training": rows(ContinuousTraining, "every_judgments", "active", "template_run_id"),
        "completion_scores": CompletionScore.objects.count(),
        "users": rows(User, "username", "password", "is_active", "is_staff", "is_superuser"),
        "groups": rows(Group, "name"),
        "tokens": rows(Token, "user_id"),
        "axes": (AccessAttempt.objects.count(), AccessLog.objects.count(), AccessFailureLog.objects.count()),
        "admin_log": LogEntry.objects.count(),
    }


# --- the doors -----------------------------------------------------------------------

Body = Callable[[World], dict[str, Any]]


def _ranking(world: World) -> dict[str, Any]:
    """A valid answer to the holder's assignment: what a stranger would send to steal it."""
    items = assignment_items_in_display_order(assignment=world.held)
    ranks = {str(item.completion.uid): rank for rank, item in enumerate(items, start=1)}
    return {"json": {"ranks": ranks, "client_token": "stolen-1"}}


def _upload(world: World) -> dict[str, Any]:
    line = {"prompt": "Injected?", "completions": [{"text": str(n), "policy": f"p{n}"} for n in range(3)]}
    return {"form": {"file": SimpleUploadedFile("prompts.jsonl", json.dumps(line).encode())}}


@dataclass(frozen=True)
class Door:
    kind: str  # "page" | "api" | "admin"
    methods: tuple[str, ...] | None = None  # what the view takes (405 otherwise); None: any
    role: str | None = None  # the role_required gate, if any
    key: str = ""  # the file key of a download door
    ab: bool = False  # the door is about a blind A/B session: it names the A/B project
    post: Body = lambda world: {"form": {}}
    # actor -> methods they may legitimately use (the door is theirs too)
    own: dict[str, tuple[str, ...]] = field(default_factory=dict)


DOORS: dict[str, Door] = {
    # annotation pages
    "label/<int:project_id>/": Door("page", ("GET",), Role.LABELER, own={"labeler": ("GET",)}),
    "label/<int:project_id>/next": Door("page", ("POST",), Role.LABELER, own={"labeler": ("POST",)}),
    "manage/projects/<int:project_id>/": Door("page", ("GET",), Role.MANAGER),
    "manage/projects/<int:project_id>/stats/refresh": Door("page", ("POST",), Role.MANAGER),
    # a labeler's own judgment, revised until it is reviewed
    "label/judgments/<int:judgment_id>/revise": Door("page", ("GET", "POST")),
    # review: the project's reviewers and managers only
    "review/<int:project_id>/": Door("page", ("GET",)),
    "review/judgments/<int:judgment_id>": Door(
        "page", ("POST",), post=lambda world: {"form": {"decision": "reject", "reason": "taken over"}}
    ),
    # blind A/B pages: the evaluator actor holds the role but is no member of the session
    "evaluate/<int:project_id>/": Door("page", ("GET",), Role.EVALUATOR, ab=True),
    "evaluate/<int:project_id>/next": Door("page", ("POST",), Role.EVALUATOR, ab=True),
    "manage/projects/<int:project_id>/results": Door("page", ("GET",), Role.MANAGER, ab=True),
    # reward-model scoring of an A/B session: attaching a model the session's manager may use
    "ab-sessions/<int:project_id>/scoring": Door(
        "page",
        ("GET", "POST"),
        Role.MANAGER,
        ab=True,
        post=lambda world: {"form": {"reward_model": world.reward_model.pk}},
    ),
    "ab-sessions/<int:project_id>/scoring/status": Door("page", ("GET",), Role.MANAGER, ab=True),
    # the session page: adding an evaluator a manager may add (the evaluator actor, by name)
    "ab-sessions/<int:project_id>/": Door(
        "page",
        ("GET", "POST"),
        Role.MANAGER,
        ab=True,
        post=lambda world: {"form": {"username": world.actors["evaluator"].username}},  # type: ignore[union-attr]
    ),
    # annotation API
    "api/projects/<int:project_id>/": Door("api", ("GET",), own={"labeler": ("GET",), "evaluator": ("GET",)}),
    "api/projects/<int:project_id>/next": Door("api", ("POST",), own={"labeler": ("POST",)}),
    "api/projects/<int:project_id>/import": Door("api", ("POST",), post=_upload),
    "api/projects/<int:project_id>/stats": Door("api", ("GET",)),
    "api/projects/<int:project_id>/judgments": Door("api", ("GET",)),
    "api/assignments/<int:assignment_id>/judgment": Door("api", ("POST",), post=_ranking),
    "api/assignments/<int:assignment_id>/skip": Door(
        "api", ("POST",), post=lambda world: {"json": {"reason": "taken"}}
    ),
    # dataset builds
    "datasets/<int:build_id>/": Door("page"),
    "datasets/<int:build_id>/status": Door("page"),
    "datasets/<int:build_id>/files/<str:key>": Door("page", key="README.md"),
    "api/dataset-builds/<int:build_id>/": Door("api", ("GET",)),
    # training runs
    "notices/<int:notice_id>/": Door("page", ("GET",)),
    "manage/projects/<int:project_id>/webhooks": Door("page", ("GET", "POST"), Role.MANAGER),
    "manage/projects/<int:project_id>/webhooks/<int:webhook_id>/toggle": Door(
        "page", ("POST",), Role.MANAGER
    ),
    # a project's manager pages
    "manage/projects/<int:project_id>/settings": Door(
        "page", ("GET", "POST"), Role.MANAGER, post=lambda world: {"form": {"name": "taken over", "k": 2}}
    ),
    "manage/projects/<int:project_id>/members": Door(
        "page",
        ("GET", "POST"),
        Role.MANAGER,
        post=lambda world: {"form": {"username": "olga", "role": "labeler"}},
    ),
    "manage/projects/<int:project_id>/members/<int:membership_id>": Door(
        "page", ("POST",), Role.MANAGER, post=lambda world: {"form": {"action": "remove"}}
    ),
    "manage/projects/<int:project_id>/import": Door("page", ("GET", "POST"), Role.MANAGER, post=_upload),
    # generation jobs: managers of the job's project
    "generation/<int:job_id>/": Door("page", ("GET",), Role.MANAGER),
    "generation/<int:job_id>/status": Door("page", ("GET",), Role.MANAGER),
    "generation/<int:job_id>/cancel": Door("page", ("POST",), Role.MANAGER),
    # model judges and continuous mode of a ranking project: its managers only
    "projects/<int:project_id>/judges": Door(
        "page",
        ("GET", "POST"),
        Role.MANAGER,
        post=lambda world: {"form": {"reward_model": world.reward_model.pk}},
    ),
    "projects/<int:project_id>/judges/<int:judge_id>/<str:action>": Door("page", ("POST",), Role.MANAGER),
    "projects/<int:project_id>/continuous": Door(
        "page",
        ("GET", "POST"),
        Role.MANAGER,
        post=lambda world: {"form": {"template_run": world.run.pk, "every_judgments": 1, "active": "on"}},
    ),
    "api/projects/<int:project_id>/judges": Door(
        "api", ("GET", "POST"), post=lambda world: {"json": {"reward_model": world.reward_model.pk}}
    ),
    "training/runs/<int:run_id>/": Door("page"),
    "training/runs/<int:run_id>/status": Door("page"),
    "training/runs/<int:run_id>/curves": Door("page", ("GET",)),
    "training/runs/<int:run_id>/cancel": Door("page", ("POST",), Role.MANAGER),
    "training/runs/<int:run_id>/files/<str:key>": Door("page", key="log.txt"),
    "api/training-runs/<int:run_id>/": Door("api", ("GET",)),
    "api/training-runs/<int:run_id>/cancel": Door("api", ("POST",)),
    # admin doors that are not a model's change/history/delete pages
    "admin/r/<path:content_type_id>/<path:object_id>/": Door("admin"),
    "admin/auth/user/<id>/password/": Door(
        "admin",
        post=lambda world: {"form": {"password1": "N3w-pass-phrase!", "password2": "N3w-pass-phrase!"}},
    ),
    "admin/annotation/project/<int:project_id>/import/": Door("admin", post=_upload),
}

# admin/<app>/<model>/<id>/[change/|history/|delete/]: derived from the resolver, one target row per model.
ADMIN_OBJECT_ROUTE = re.compile(r"^admin/(\w+)/(\w+)/<path:object_id>/(change/|history/|delete/|)$")
ADMIN_BODIES: dict[str, dict[str, Any]] = {
    "change/": {"name": "taken over", "text": "taken over", "username": "taken-over"},
    "delete/": {"post": "yes"},
}
# Rows every manager may open in the admin, whatever their project (see the module docstring),
# and the methods tried on them: the role groups are read-only for managers, so a POST must
# still be refused.
ADMIN_SHARED = {"auth.group": ("GET", "POST")}


def walk(patterns: list[Any], prefix: str = "", parameters: frozenset[str] = frozenset()) -> Iterator[Any]:
    """(route, parameter names) of every URL pattern, prefixes included."""
    for pattern in patterns:
        names = parameters | frozenset(pattern.pattern.regex.groupindex)
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            yield from walk(pattern.url_patterns, route, names)
        else:
            assert isinstance(pattern, URLPattern)
            yield route, names


def id_bearing_routes() -> list[str]:
    return sorted(
        route for route, names in walk(get_resolver().url_patterns) if names - NOT_OBJECT_PARAMETERS
    )


def door_for(route: str) -> tuple[Door, str | None]:
    """The door of a route and, for an admin object page, its model label."""
    if route in DOORS:
        return DOORS[route], None
    match = ADMIN_OBJECT_ROUTE.match(route)
    if match is None:
        raise KeyError(route)
    label = f"{match.group(1)}.{match.group(2)}"
    body = ADMIN_BODIES.get(match.group(3), {})
    return Door("admin", post=lambda world: {"form": body}), label


def url_of(route: str, world: World, door: Door, label: str | None) -> str:
    values: dict[str, Any] = {**world.parameters(door), "key": door.key}
    if label is not None:
        values["object_id"] = world.admin_targets[label]
    elif route.startswith("admin/r/"):
        values["content_type_id"] = ContentType.objects.get_for_model(Project).pk
        values["object_id"] = world.project.pk
    elif route.startswith("admin/auth/user/"):
        values["id"] = world.superuser.pk
    return "/" + re.sub(r"<(?:\w+:)?(\w+)>", lambda m: str(values[m.group(1)]), route)


def send(client: Client, method: str, url: str, door: Door, world: World) -> HttpResponse:
    if method == "GET":
        return client.get(url)
    body = door.post(world)
    if "json" in body:
        return client.post(url, json.dumps(body["json"]), content_type="application/json")
    return client.post(url, body["form"])


def body_of(response: HttpResponse) -> str:
    if response.streaming:
        return b"".join(response.streaming_content).decode(errors="replace")
    return response.content.decode(errors="replace")


# --- what must happen ----------------------------------------------------------------


def refusals(door: Door, label: str | None, actor: str, method: str) -> set[int]:
    """The statuses that count as a refusal for this door, actor and method."""
    if door.kind == "api":
        if actor == "anonymous":
            return {401}
        return {405} if door.methods and method not in door.methods else {404}
    if door.kind == "page":
        if door.methods and method not in door.methods:
            return {405}  # require_GET/require_POST come first, before the sign-in check
        if actor == "anonymous":
            return {302}
        if door.role and door.role not in ACTOR_ROLES[actor]:
            return {403}
        return {404}
    # admin: non-staff are sent to the admin's login page; staff get a redirect to
    # the index ("doesn't exist"), 403 (no permission on the model) or 404.
    if actor != "other_manager":
        return {302}
    return {302, 403, 404}


def redirect_is_a_refusal(response: HttpResponse, door: Door, actor: str, url: str) -> bool:
    location = response["Location"]
    if door.kind == "page":
        return location.startswith("/accounts/login/")
    if actor != "other_manager":
        return location.startswith("/admin/login/")
    # Staff: the admin index, or (the bare /<id>/ URL) the object's own change page, itself refused.
    return location in ("/admin/", f"{url}change/")


def test_every_id_bearing_url_pattern_is_in_the_matrix() -> None:
    unknown = []
    for route in id_bearing_routes():
        try:
            door_for(route)
        except KeyError:
            unknown.append(route)
    assert not unknown, (
        "URL patterns with an object id that the access matrix does not cover; add them to DOORS "
        f"(or, for a new admin model, to the admin targets) in {__name__}: {unknown}"
    )
    stale = sorted(set(DOORS) - set(id_bearing_routes()))
    assert not stale, f"DOORS lists routes that no longer exist: {stale}"


@pytest.mark.django_db
def test_every_admin_model_with_object_pages_has_a_target_row(world: World) -> None:
    labels = {label for route in id_bearing_routes() if (label := door_for(route)[1]) is not None}
    assert labels == set(world.admin_targets), "give each admin model a row to try in build_world()"


@pytest.mark.django_db
@pytest.mark.parametrize("actor", ACTORS)
def test_no_actor_reaches_an_object_that_is_not_theirs_by_any_door(world: World, actor: str) -> None:
    # given the world and one actor's client
    client = world.client(actor)
    problems: list[str] = []
    tried = 0

    for route in id_bearing_routes():
        door, label = door_for(route)
        url = url_of(route, world, door, label)
        for method in METHODS:
            shared = actor == "other_manager" and label in ADMIN_SHARED
            if shared and method not in ADMIN_SHARED[label]:
                continue  # a method a shared row's page is not tried with (ADMIN_SHARED)
            before = database_state()

            # when
            response = send(client, method, url, door, world)
            tried += 1

            # then: a refusal (or, on the actor's own doors, a plain answer), and nothing written
            status = response.status_code
            if method in door.own.get(actor, ()):
                if status != 200:
                    problems.append(f"{method} {url}: {status}, expected 200 (the actor's own door)")
            elif shared:
                if status not in {200} | refusals(door, label, actor, method):
                    problems.append(f"{method} {url}: {status} on a shared admin row")
            elif status not in refusals(door, label, actor, method):
                problems.append(
                    f"{method} {url}: {status}, expected one of {sorted(refusals(door, label, actor, method))}"
                )
            elif status == 302 and not redirect_is_a_refusal(response, door, actor, url):
                problems.append(f"{method} {url}: redirected to {response['Location']}")
            if method not in door.own.get(actor, ()) and SECRET in body_of(response):
                problems.append(f"{method} {url}: the answer names this world's project")
            after = database_state()
            if after != before:
                changed = sorted(name for name in before if before[name] != after[name])
                problems.append(f"{method} {url}: changed {changed}")

    assert tried > 100
    assert not problems, f"{actor}:\n" + "\n".join(problems)


@pytest.mark.django_db
def test_the_owners_do_get_through_so_the_refusals_above_are_about_who_asks(world: World) -> None:
    # The same URLs answer their owners: the refusals are access rules, not broken URLs.
    manager = Client()
    manager.force_login(world.manager)
    holder = Client()
    holder.force_login(world.holder)
    for url in (
        f"/manage/projects/{world.project.pk}/",
        f"/api/projects/{world.project.pk}/stats",
        f"/api/projects/{world.project.pk}/judgments",
        f"/datasets/{world.build.pk}/",
        f"/datasets/{world.build.pk}/status",
        f"/api/dataset-builds/{world.build.pk}/",
        f"/training/runs/{world.run.pk}/",
        f"/training/runs/{world.run.pk}/status",
        f"/training/runs/{world.run.pk}/files/log.txt",
        f"/api/training-runs/{world.run.pk}/",
        f"/admin/annotation/assignment/{world.held.pk}/change/",
        f"/admin/training/trainingrun/{world.run.pk}/change/",
        f"/ab-sessions/{world.ab_project.pk}/scoring",
        f"/ab-sessions/{world.ab_project.pk}/scoring/status",
        f"/ab-sessions/{world.ab_project.pk}/",
    ):
        assert manager.get(url).status_code == 200, url
    assert holder.post(f"/api/projects/{world.project.pk}/next").json()["id"] == world.held.pk
    answer = _ranking(world)["json"]
    stored = holder.post(
        f"/api/assignments/{world.held.pk}/judgment", json.dumps(answer), content_type="application/json"
    )
    assert stored.status_code == 201
    assert manager.post(f"/api/training-runs/{world.run.pk}/cancel").json()["status"] == "cancelled"


@pytest.mark.django_db
def test_another_projects_manager_neither_sees_nor_uses_this_projects_policy(world: World) -> None:
    # given a model policy registered for this world's project
    policy = Policy.objects.create(name=f"{SECRET} sft", kind=Policy.Kind.MODEL, base_model="/models/sft")
    policy.projects.add(world.project)
    client = world.client("other_manager")
    before = database_state()

    # then no page, form or admin list of the other manager names it
    for url in ("/policies/", "/generation/", "/ab-sessions/new", "/admin/annotation/policy/"):
        response = client.get(url)
        assert response.status_code == 200, url
        assert SECRET not in body_of(response), url
    assert client.get("/admin/training/generationjob/add/").status_code == 200
    assert SECRET not in body_of(client.get("/admin/training/generationjob/add/"))

    # and using it by its id is refused everywhere: a generation job (page and admin), an A/B session
    other_project = world.other_project
    job = {"policy": policy.pk, "project": other_project.pk, "n": 1, "temperature": 1, "top_p": 1}
    job |= {"max_new_tokens": 8, "seed": 0}
    page = client.post("/generation/", job)
    assert page.status_code == 400 and "policy" in page.context["form"].errors
    admin_add = client.post("/admin/training/generationjob/add/", job)
    assert admin_add.status_code == 200 and "policy" in admin_add.context["adminform"].form.errors
    session = {"name": "taken", "source_project": other_project.pk, "policies": [policy.pk, policy.pk]}
    session |= {"votes_per_pair": 1, "max_new_tokens": 8, "seed": 0}
    refused = client.post("/ab-sessions/new", session)
    assert refused.status_code == 200 and "policies" in refused.context["form"].errors
    assert database_state() == before

    # while this project's manager sees and may use it
    owner = Client()
    owner.force_login(world.manager)
    assert policy.name in body_of(owner.get("/policies/"))
    assert policy in owner.get("/generation/").context["form"].fields["policy"].queryset


def admin_changelists() -> list[str]:
    from django.contrib import admin

    return sorted(
        f"/admin/{model._meta.app_label}/{model._meta.model_name}/" for model in admin.site._registry
    )


@pytest.mark.django_db
def test_another_projects_manager_finds_no_trace_of_this_project_in_any_admin_list_or_filter(
    world: World,
) -> None:
    # Every change list with every filter sidebar, and each list filtered by this
    # world's projects by hand: the rows are scoped, and so must the filter choices be.
    client = world.client("other_manager")
    problems = []
    for url in admin_changelists():
        for query in (
            "",
            f"?project__id__exact={world.project.pk}",
            f"?task__project__id__exact={world.project.pk}",
        ):
            response = client.get(url + query)
            if response.status_code not in (200, 302, 400, 403):  # 400: a lookup the list does not offer
                problems.append(f"{url}{query}: {response.status_code}")
            if SECRET in body_of(response):
                problems.append(f"{url}{query}: names this world's project")
    assert not problems, "\n".join(problems)


ACCOUNT_PAGES = ("change/", "history/", "delete/", "password/")


@pytest.mark.django_db
@pytest.mark.parametrize("actor", ACTORS)
def test_account_pages_of_every_kind_of_user_answer_only_whoever_may_administer_them(
    world: World, actor: str
) -> None:
    # given every kind of account: a superuser, this project's manager, its labeler and
    # evaluator, someone with no project, and the other project's own labeler and manager
    targets = {
        "superuser": world.superuser,
        "manager": world.manager,
        "holder": world.holder,
        "evaluator": world.actors["evaluator"],
        "outsider": world.actors["outsider"],
        "other_labeler": world.other_labeler,
        "other_manager": world.actors["other_manager"],
    }
    client = world.client(actor)
    problems = []
    for name, account in targets.items():
        for page in ACCOUNT_PAGES:
            url = f"/admin/auth/user/{account.pk}/{page}"
            before = database_state()
            response = client.get(url)
            posted = client.post(
                url,
                {
                    "password1": "N3w-pass-phrase!",
                    "password2": "N3w-pass-phrase!",
                    "usable_password": "true",
                    "username": "taken-over",
                    "post": "yes",
                },
            )
            if database_state() != before:
                problems.append(f"POST {url} ({name}) changed the database")
            # The other manager administers their own labeler: the change and history pages
            # open; deleting and setting passwords are a superuser's.
            administered = (
                actor == "other_manager" and name == "other_labeler" and page in ("change/", "history/")
            )
            for method, answer in (("GET", response), ("POST", posted)):
                if administered and method == "GET":
                    if answer.status_code != 200:
                        problems.append(f"GET {url} ({name}): {answer.status_code}, expected 200")
                    continue
                if administered:
                    continue  # a change form posted with missing fields: re-shown, nothing written (checked above)
                if actor in ("labeler", "evaluator", "outsider", "anonymous"):
                    ok = answer.status_code == 302 and answer["Location"].startswith("/admin/login/")
                else:
                    ok = answer.status_code in (403, 404) or (
                        answer.status_code == 302 and answer["Location"] == "/admin/"
                    )
                if not ok:
                    problems.append(f"{method} {url} ({name}): {answer.status_code}")
                if name != "other_manager" and account.username in body_of(answer):
                    problems.append(f"{method} {url} ({name}): the answer names the account")
    assert not problems, f"{actor}:\n" + "\n".join(problems)
