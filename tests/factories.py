"""Test data for every test module: users, and users holding roles.

    user = UserFactory()                       # no role: an outsider
    labeler = user_with_roles("labeler")       # one role, is_staff synced
    both = user_with_roles("labeler", "evaluator", username="sam")

Every user's password is ``PASSWORD`` so a test can sign in through the real
login form when it needs to.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser, Group
from factory.django import DjangoModelFactory, Password

from annotation.roles import Role
from annotation.services import user_set_roles

PASSWORD = "correct-horse-battery-staple-42"


class UserFactory(DjangoModelFactory):
    """A user with ``PASSWORD``; pass ``roles=[...]`` to put them in role groups."""

    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda user: f"{user.username}@example.com")
    password = Password(PASSWORD)

    @factory.post_generation
    def roles(self, create: bool, extracted: Iterable[str] | None, **kwargs: Any) -> None:
        if not create or not extracted:
            return
        roles_grant(self, extracted)


def roles_grant(user: AbstractUser, roles: Iterable[str]) -> None:
    """Give `user` exactly `roles` through the same service the product uses."""
    roles = list(roles)
    unknown = sorted(set(roles) - set(Role.values))
    if unknown:
        raise ValueError(f"unknown role(s) {unknown}; choose from {Role.values}")
    # A transactional test's flush empties the groups; the service would then
    # silently grant nothing, so make sure they exist.
    for role in roles:
        Group.objects.get_or_create(name=role)
    user_set_roles(user=user, roles=roles)


def user_with_roles(*roles: str, **fields: Any) -> AbstractUser:
    """A saved user holding `roles` (none: an outsider); `fields` go to UserFactory."""
    return UserFactory(roles=list(roles), **fields)
