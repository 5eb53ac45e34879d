"""Success, info, warning and error messages look different from each other in real Chromium."""

from __future__ import annotations

import pytest

from annotation.roles import Role
from tests.factories import user_with_roles

pytestmark = pytest.mark.django_db(transaction=True)


def test_each_message_level_has_its_own_look(open_page, live_server):
    page, _watch = open_page(user_with_roles(Role.MANAGER, username="looker"))
    looks = page.evaluate(
        """() => ["success", "info", "warning", "error"].map((level) => {
            const item = document.createElement("li");
            item.className = "message " + level;
            document.querySelector("main").appendChild(item);
            const style = getComputedStyle(item);
            return style.backgroundColor + " " + style.borderLeftColor;
        })"""
    )
    assert len(set(looks)) == 4, looks
