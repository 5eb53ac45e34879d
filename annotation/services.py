"""Writes on the annotation side. Views, admin actions, commands and tasks call these."""

from __future__ import annotations

import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser, Group
from django.contrib.auth.password_validation import validate_password
from django.db import transaction

from annotation.roles import Role


def password_generate() -> str:
    """A random password that passes the configured validators (~96 bits)."""
    return secrets.token_urlsafe(16)


@transaction.atomic
def user_create(
    *,
    username: str,
    roles: list[str],
    email: str = "",
    password: str | None = None,
) -> tuple[AbstractUser, str]:
    """Create a user holding `roles`; returns the user and the password set.

    Without a password one is generated, so no account ever has a default one.
    Raises ValueError for an unknown role or a taken username, and Django's
    ValidationError for a password the validators reject.
    """
    unknown = sorted(set(roles) - set(Role.values))
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(unknown)}; choose from {', '.join(Role.values)}")
    if not roles:
        raise ValueError(f"a user needs at least one role: {', '.join(Role.values)}")
    User = get_user_model()
    if User.objects.filter(username__iexact=username).exists():
        raise ValueError(f"a user named {username!r} already exists")
    user = User(username=username, email=email)
    password = password or password_generate()
    validate_password(password, user)
    user.set_password(password)
    user.save()
    user_set_roles(user=user, roles=roles)
    return user, password


@transaction.atomic
def user_set_roles(*, user: AbstractUser, roles: list[str]) -> None:
    """Replace the user's role groups; managers get admin access (is_staff), others lose it."""
    role_groups = Group.objects.filter(name__in=Role.values)
    user.groups.remove(*role_groups.exclude(name__in=roles))
    user.groups.add(*role_groups.filter(name__in=roles))
    user_sync_staff(user=user)


def user_sync_staff(*, user: AbstractUser) -> None:
    """A manager needs the admin; nobody else does. Superusers keep theirs."""
    is_manager = user.groups.filter(name=Role.MANAGER).exists()
    staff = is_manager or user.is_superuser
    if user.is_staff != staff:
        user.is_staff = staff
        user.save(update_fields=["is_staff"])
    if hasattr(user, "_rankwise_roles"):
        del user._rankwise_roles
