"""Roles are Django groups; a user may hold several.

- manager: imports data, builds datasets, starts training runs, creates users
  (a staff user with the permissions below, never a superuser);
- labeler: ranks completions;
- evaluator: votes in blind A/B sessions.
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


# Apps whose every model a manager may administer, plus user accounts.
MANAGER_APPS = ("annotation", "training")
MANAGER_USER_PERMISSIONS = ("add_user", "change_user", "view_user", "view_group")

AnyUser = AbstractBaseUser | AnonymousUser


def user_roles(user: AnyUser) -> frozenset[str]:
    """The roles a user holds; a superuser counts as a manager."""
    if not user.is_authenticated:
        return frozenset()
    cached = getattr(user, "_rankwise_roles", None)
    if cached is None:
        names = set(user.groups.filter(name__in=Role.values).values_list("name", flat=True))  # type: ignore[union-attr]
        if user.is_superuser:  # type: ignore[union-attr]
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
