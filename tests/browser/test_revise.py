"""A labeler revises an unreviewed judgment from their history, in real Chromium: comparisons replaced."""

from __future__ import annotations

import pytest

from annotation.models import Comparison, Judgment
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.browser.test_ranking_page import open_task, uid_of, wait_for_next
from tests.factories import user_with_roles

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_labeler_revises_a_judgment_and_its_comparisons_are_replaced(open_page, live_server, make_project):
    project = make_project(tasks=2, k=3, name="revisable")
    labeler = add_member(project, user_with_roles(Role.LABELER, username="second-thoughts"), Role.LABELER)
    page, watch = open_page(labeler)
    current = open_task(page, live_server, project)
    a, c = uid_of(page, "A"), uid_of(page, "C")
    for letter, rank in {"a": 1, "b": 2, "c": 3}.items():
        page.keyboard.press(letter)
        page.keyboard.press(str(rank))
    page.keyboard.press("Control+Enter")
    wait_for_next(page, current)
    judgment = Judgment.objects.get()
    assert Comparison.objects.get(judgment=judgment, chosen__uid=a, rejected__uid=c)

    # when she opens her history and puts C first instead of A
    page.click("nav >> text=History")
    page.click("article.history-item >> text=Revise")
    page.select_option(f"select[name=rank_{a}]", "3")
    page.select_option(f"select[name=rank_{c}]", "1")
    page.click("text=Save the revision")
    page.wait_for_selector("text=Your judgment is revised.")

    # then the judgment is at version 2 and its comparisons say C over A, never A over C
    judgment.refresh_from_db()
    assert judgment.version == 2 and judgment.ranks[c] == 1
    assert Comparison.objects.filter(judgment=judgment, chosen__uid=c, rejected__uid=a).count() == 1
    assert not Comparison.objects.filter(judgment=judgment, chosen__uid=a, rejected__uid=c).exists()
    assert Comparison.objects.filter(judgment=judgment).count() == 3
    assert "version 2" in page.inner_text("article.history-item")
    assert watch.errors == []
