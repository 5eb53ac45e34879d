"""Writes and reads behind the manager pages of a project: its settings and its members.

Every door (the manager pages, and the admin where it calls them) checks who
the person is with the access helpers in `annotation.selectors`; these
functions check what is asked: settings that hold together, and members a
manager may add, re-role or remove. Each raises Django's ValidationError by
field (or MemberInvalid) and changes nothing then.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils.translation import gettext as _

from annotation.models import MAX_K, MIN_K, Membership, Project
from annotation.roles import Role
from annotation.selectors import JUDGE_ROLE, accounts_addable_to_projects
from annotation.services import MemberInvalid

# Every setting a manager edits, in the order the settings page shows them.
PROJECT_SETTINGS = (
    "name",
    "kind",
    "instructions",
    "is_active",
    "k",
    "overlap",
    "ties_allowed",
    "likert_enabled",
    "flags",
    "rationale_required",
    "task_order",
    "lease_minutes",
    "gold_rate",
    "gold_feedback",
)
FLAGS_MAX = 20
FLAG_LENGTH_MAX = 60


def project_flags_clean(flags: Any) -> list[str]:
    """The flags as stored: stripped, blanks dropped, in the order given; raises ValidationError."""
    if not isinstance(flags, list | tuple) or not all(isinstance(flag, str) for flag in flags):
        raise ValidationError(_("Flags are a list of short names."), code="flags_type")
    cleaned = [flag.strip() for flag in flags if flag.strip()]
    too_long = [flag for flag in cleaned if len(flag) > FLAG_LENGTH_MAX]
    if too_long:
        raise ValidationError(
            _("A flag has at most %(limit)d characters: “%(flag)s” is longer."),
            code="flag_too_long",
            params={"limit": FLAG_LENGTH_MAX, "flag": too_long[0][:FLAG_LENGTH_MAX] + "…"},
        )
    seen: set[str] = set()
    for flag in cleaned:
        if flag.casefold() in seen:
            raise ValidationError(
                _("The flag “%(flag)s” is listed twice."), code="flag_twice", params={"flag": flag}
            )
        seen.add(flag.casefold())
    if len(cleaned) > FLAGS_MAX:
        raise ValidationError(
            _("At most %(limit)d flags."), code="flags_too_many", params={"limit": FLAGS_MAX}
        )
    return cleaned


def project_settings_validate(*, project: Project, has_tasks: bool, kind_was: str, k_was: int) -> None:
    """Raise ValidationError, by field, unless the (unsaved) settings hold together.

    The database's check constraints back each rule; this names the field and
    says why. Kind and K are fixed once the project has tasks: its tasks were
    made with K completions of one kind of judging.
    """
    errors: dict[str, list[str]] = {}

    def add(field: str, message: str) -> None:
        errors.setdefault(field, []).append(message)

    if not MIN_K <= project.k <= MAX_K:
        add("k", _("K is from %(min)d to %(max)d.") % {"min": MIN_K, "max": MAX_K})
    if project.kind == Project.Kind.AB and project.k != 2:
        add("k", _("A blind A/B session judges two outputs at a time: K is 2."))
    if project.overlap < 1:
        add("overlap", _("At least one judgment per task."))
    if project.lease_minutes < 1:
        add("lease_minutes", _("A lease lasts at least one minute."))
    if not 0 <= project.gold_rate <= 1:
        add("gold_rate", _("The gold rate is a share from 0 to 1, e.g. 0.1 for one task in ten."))
    if project.gold_feedback and project.gold_rate == 0:
        add("gold_feedback", _("Gold feedback needs gold tasks: set a gold rate above 0."))
    if has_tasks and project.kind != kind_was:
        add("kind", _("The project has tasks, so its kind cannot change."))
    if has_tasks and project.k != k_was:
        add("k", _("The project has tasks made with K = %(k)d, so K cannot change.") % {"k": k_was})
    try:
        project.flags = project_flags_clean(project.flags)
    except ValidationError as error:
        errors.setdefault("flags", []).extend(error.messages)
    try:
        project.full_clean(exclude=["created_by", *errors])
    except ValidationError as error:
        for field, messages in error.message_dict.items():
            errors.setdefault(field, []).extend(messages)
    if errors:
        raise ValidationError(errors)


def _save(project: Project, *, has_tasks: bool, kind_was: str, k_was: int) -> Project:
    project_settings_validate(project=project, has_tasks=has_tasks, kind_was=kind_was, k_was=k_was)
    try:
        with transaction.atomic():
            project.save()
    except IntegrityError:
        # Two managers picked the same new name at once; the loser is told as the form would.
        raise ValidationError({"name": [_("A project with this name already exists.")]}) from None
    return project


@transaction.atomic
def project_create(*, created_by: AbstractBaseUser, **settings: Any) -> Project:
    """A new project with these settings, managed by its creator (or they could not see it again)."""
    unknown = set(settings) - set(PROJECT_SETTINGS)
    if unknown:
        raise TypeError(f"unknown project settings: {', '.join(sorted(unknown))}")
    project = Project(created_by=created_by, **settings)
    _save(project, has_tasks=False, kind_was=project.kind, k_was=project.k)
    Membership.objects.create(project=project, user=created_by, role=Role.MANAGER)
    return project


@transaction.atomic
def project_update(*, project: Project, **settings: Any) -> Project:
    """Change the project's settings, all or none; the row is locked so two saves do not interleave."""
    unknown = set(settings) - set(PROJECT_SETTINGS)
    if unknown:
        raise TypeError(f"unknown project settings: {', '.join(sorted(unknown))}")
    locked = Project.objects.select_for_update().get(pk=project.pk)
    kind_was, k_was = locked.kind, locked.k
    for name, value in settings.items():
        setattr(locked, name, value)
    _save(locked, has_tasks=locked.tasks.exists(), kind_was=kind_was, k_was=k_was)
    return locked


# --- members -------------------------------------------------------------------------


def member_roles_for_project(*, project: Project) -> list[str]:
    """The roles a manager gives in this project: who judges its kind, and reviewers.

    Managers are made by a superuser (SECURITY.md, "Accounts"): a manager
    never gives, changes or takes away the manager role.
    """
    return [JUDGE_ROLE[Project.Kind(project.kind)], Role.REVIEWER]


def project_memberships(*, project: Project) -> QuerySet[Membership]:
    """The project's memberships, managers first, then by username."""
    from django.db.models import Case, IntegerField, Value, When

    return (
        Membership.objects.filter(project=project)
        .select_related("user")
        .annotate(
            manager_first=Case(
                When(role=Role.MANAGER, then=Value(0)), default=Value(1), output_field=IntegerField()
            )
        )
        .order_by("manager_first", "user__username", "role")
    )


def _role_check(project: Project, role: str) -> None:
    allowed = member_roles_for_project(project=project)
    if role not in allowed:
        names = ", ".join(str(Role(value).label) for value in allowed)
        raise MemberInvalid(_("In this project a manager gives these roles: %(roles)s.") % {"roles": names})


def project_member_add_with_role(*, project: Project, username: str, role: str) -> Membership:
    """Give the account named exactly `username` a role in the project.

    The account must be one a manager may add (no manager, staff or
    superuser: accounts_addable_to_projects), found by exact username only,
    so nobody is listed. Raises MemberInvalid, saying why.
    """
    _role_check(project, role)
    name = username.strip()
    user = accounts_addable_to_projects().filter(username=name).first()
    if user is None:
        raise MemberInvalid(_("No account that can be added is named “%(name)s”.") % {"name": name})
    membership, created = Membership.objects.get_or_create(project=project, user=user, role=role)
    if not created:
        raise MemberInvalid(
            _("%(name)s is already a %(role)s here.") % {"name": name, "role": Role(role).label.lower()}
        )
    return membership


def _membership_check(membership: Membership) -> None:
    if membership.role == Role.MANAGER:
        raise MemberInvalid(_("Managers are given and taken away by a superuser, not on this page."))
    if not accounts_addable_to_projects().filter(pk=membership.user_id).exists():
        raise MemberInvalid(_("This account has a manager's rights; a superuser looks after it."))


@transaction.atomic
def project_member_role_change(*, membership: Membership, role: str) -> Membership:
    """The member's role becomes `role`; if they already hold it, this membership simply goes."""
    _membership_check(membership)
    _role_check(membership.project, role)
    if membership.role == role:
        return membership
    held = Membership.objects.filter(project_id=membership.project_id, user_id=membership.user_id, role=role)
    if held.exists():
        membership.delete()
        return held.get()
    Membership.objects.filter(pk=membership.pk).update(role=role)
    membership.role = role
    return membership


def project_member_remove(*, membership: Membership) -> None:
    """Take the role away. Their judgments stay; their open lease expires as any other would."""
    _membership_check(membership)
    membership.delete()


def membership_get_for_manager(*, user: Any, pk: Any) -> Membership:
    """A membership of a project the user manages; any other is Http404."""
    from django.http import Http404

    from annotation.selectors import projects_for_user

    try:
        return Membership.objects.select_related("project", "user").get(
            pk=int(pk), project__in=projects_for_user(user=user, role=Role.MANAGER)
        )
    except (Membership.DoesNotExist, TypeError, ValueError):
        raise Http404("No such member.") from None
