"""The navigation bar: each role sees the entries it can use, and only those."""

from __future__ import annotations

from dataclasses import dataclass

from django.http import HttpRequest
from django.urls import reverse
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _

from annotation.notifications import notices_unread_count
from annotation.roles import Role, user_roles


@dataclass(frozen=True)
class NavItem:
    label: str | Promise
    url_name: str
    role: str | tuple[str, ...] | None  # any of these roles; None: every signed-in user


NAV_ITEMS = (
    NavItem(_("Home"), "home", None),
    NavItem(_("Label"), "label", Role.LABELER),
    NavItem(_("History"), "label-history", Role.LABELER),
    NavItem(_("Evaluate"), "evaluate", Role.EVALUATOR),
    NavItem(_("Review"), "review", (Role.REVIEWER, Role.MANAGER)),
    NavItem(_("Manage"), "manage", Role.MANAGER),
    NavItem(_("Datasets"), "dataset-build-list", Role.MANAGER),
    NavItem(_("Training"), "training-run-list", Role.MANAGER),
    NavItem(_("Admin"), "admin:index", Role.MANAGER),
    NavItem(_("API"), "api-docs", Role.MANAGER),
)


def _shown_to(item: NavItem, roles: frozenset[str]) -> bool:
    if item.role is None:
        return True
    wanted = {item.role} if isinstance(item.role, str) else set(item.role)
    return bool(wanted & roles)


def navigation(request: HttpRequest) -> dict[str, object]:
    roles = user_roles(request.user)
    if not request.user.is_authenticated:
        return {"nav_items": [], "user_roles": roles}
    items = [
        {
            "label": item.label,
            "url": reverse(item.url_name),
            "active": request.resolver_match is not None
            and request.resolver_match.view_name == item.url_name,
        }
        for item in NAV_ITEMS
        if _shown_to(item, roles)
        # The admin lets in staff only: a project's manager without the
        # account-wide manager right runs it from the manager pages.
        and (item.url_name != "admin:index" or request.user.is_staff)  # type: ignore[union-attr]
    ]
    return {
        "nav_items": items,
        "user_roles": roles,
        "notices_unread": notices_unread_count(user=request.user),
    }
