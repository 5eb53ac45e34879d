"""What a person may do comes from their project memberships.

A membership holds one role in one project (a person may hold several):

- manager: runs the project — members, imports, dataset builds, training
  runs, A/B sessions, its dashboards;
- labeler: ranks completions in a ranking project;
- evaluator: votes in a blind A/B session;
- reviewer: accepts or rejects the project's judgments (a manager may too).

Pages and the API ask the same question: does the person hold the role in
the project (404 otherwise), and, for a page listing projects, in any
project (403 otherwise). One right is account-wide: the `manager` group lets
a person run projects at all — create them, use the admin — before they
manage any (a staff user with the permissions below, never a superuser).
The `labeler` and `evaluator` groups grant nothing; they only label
accounts in the admin.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, Group, Permission
from django.core.exceptions import PermissionDenied
from django.db import models
from django.http import HttpRequest, HttpResponse
from django.utils.translation import gettext_lazy as _


class Role(models.TextChoices):
    MANAGER = "manager", _("Manager")
    LABELER = "labeler", _("Labeler")
    EVALUATOR = "evaluator", _("Evaluator")
    REVIEWER = "reviewer", _("Reviewer")


# Apps whose every model a manager may administer, plus user accounts.
MANAGER_APPS = ("annotation", "training")
MANAGER_USER_PERMISSIONS = ("add_user", "change_user", "view_user", "view_group")

AnyUser = AbstractBaseUser | AnonymousUser


def user_roles(user: AnyUser) -> frozenset[str]:
    """The roles a user holds in any project, plus manager for the manager group and superusers."""
    if not user.is_authenticated:
        return frozenset()
    cached = getattr(user, "_rankwise_roles", None)
    if cached is None:
        from annotation.models import Membership

        names = set(Membership.objects.filter(user=user).values_list("role", flat=True).distinct())
        if user.is_superuser or user.groups.filter(name=Role.MANAGER).exists():  # type: ignore[union-attr]
            names.add(Role.MANAGER)
        cached = frozenset(names)
        user._rankwise_roles = cached  # type: ignore[union-attr]
    return cached


def user_has_role(user: AnyUser, role: str) -> bool:
    return role in user_roles(user)


def role_required(role: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Require login (redirect) and the role (403 for a signed-in user without it)."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not request.user.is_authenticated:
                from django.contrib.auth.views import redirect_to_login

                return redirect_to_login(request.get_full_path())
            if not user_has_role(request.user, role):
                raise PermissionDenied
            return view(request, *args, **kwargs)

        return wrapped

    return decorator


def roles_sync_permissions(**kwargs: Any) -> None:
    """Make sure every role group exists and grant the manager group every
    permission of the product's apps and user accounts.

    Runs after every migrate, and after every flush (which also empties the
    groups the data migration made), so the roles are always there.
    """
    for role in Role.values:
        Group.objects.get_or_create(name=role)
    manager = Group.objects.get(name=Role.MANAGER)
    wanted = Permission.objects.filter(content_type__app_label__in=MANAGER_APPS) | Permission.objects.filter(
        content_type__app_label="auth", codename__in=MANAGER_USER_PERMISSIONS
    )
    manager.permissions.add(*wanted)
