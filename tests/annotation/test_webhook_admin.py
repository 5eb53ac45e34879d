"""A project's managers keep its webhooks in the admin: only their projects, a secret made for them, the log."""

from __future__ import annotations

import pytest
from django.utils import timezone

from annotation import webhooks
from annotation.models import Webhook, WebhookDelivery
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.factories import user_with_roles

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_projects(make_project):  # type: ignore[no-untyped-def]
    mine = make_project(tasks=1, k=2, name="mine")
    theirs = make_project(tasks=1, k=2, name="theirs")
    me = user_with_roles(Role.MANAGER, username="boss")
    add_member(mine, me, Role.MANAGER)
    return mine, theirs, me


def test_a_manager_adds_a_webhook_to_their_project_and_gets_a_generated_secret(client, two_projects):
    mine, _theirs, me = two_projects
    client.force_login(me)

    response = client.post(
        "/admin/annotation/webhook/add/",
        {
            "project": mine.pk,
            "url": "https://hooks.example/rankwise",
            "events": ["judgment.submitted", "run.finished"],
            "secret": "",
            "active": "on",
        },
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    webhook = Webhook.objects.get()
    assert (webhook.project, webhook.created_by) == (mine, me)
    assert webhook.events == ["judgment.submitted", "run.finished"]
    assert len(webhook.secret) >= 32


def test_a_manager_cannot_add_a_webhook_to_another_project_nor_see_its_webhooks(client, two_projects):
    _mine, theirs, me = two_projects
    theirs_hook = Webhook.objects.create(project=theirs, url="https://x.example/", secret="s", events=[])
    client.force_login(me)

    refused = client.post(
        "/admin/annotation/webhook/add/",
        {"project": theirs.pk, "url": "https://evil.example/", "events": ["run.finished"], "secret": "x"},
    )

    assert refused.status_code == 200  # the form again, with the project refused
    assert Webhook.objects.count() == 1
    assert b"x.example" not in client.get("/admin/annotation/webhook/").content
    assert client.get(f"/admin/annotation/webhook/{theirs_hook.pk}/change/").status_code in (302, 404)


def test_the_delivery_log_shows_a_managers_deliveries_and_retries_a_given_up_one(
    client, two_projects, monkeypatch
):
    mine, theirs, me = two_projects
    published: list[int] = []
    monkeypatch.setattr(
        webhooks,
        "webhook_delivery_publish",
        lambda *, delivery_id, countdown=0: published.append(delivery_id),
    )
    now = timezone.now()
    mine_hook = Webhook.objects.create(project=mine, url="https://mine.example/", secret="s", events=[])
    theirs_hook = Webhook.objects.create(project=theirs, url="https://theirs.example/", secret="s", events=[])
    given_up = WebhookDelivery.objects.create(
        webhook=mine_hook, event="run.finished", payload={}, next_attempt_at=now, attempts=12, gave_up_at=now
    )
    WebhookDelivery.objects.create(webhook=theirs_hook, event="run.finished", payload={}, next_attempt_at=now)
    client.force_login(me)

    log = client.get("/admin/annotation/webhookdelivery/")
    assert log.context["cl"].result_count == 1

    client.post(
        "/admin/annotation/webhookdelivery/",
        {"action": "deliveries_retry", "_selected_action": [given_up.pk]},
    )

    given_up.refresh_from_db()
    assert (given_up.gave_up_at, given_up.attempts) == (None, 0)
    assert published == [given_up.pk]


# --- the project's webhook page ------------------------------------------------------


def test_a_manager_adds_a_webhook_on_the_projects_page_and_switches_it_off(csrf_client, login, two_projects):
    mine, _theirs, me = two_projects
    client = login(csrf_client, me)
    page = client.get(f"/manage/projects/{mine.pk}/webhooks")
    assert page.status_code == 200
    token = client.cookies["csrftoken"].value

    added = client.post(
        f"/manage/projects/{mine.pk}/webhooks",
        {"csrfmiddlewaretoken": token, "url": "https://hooks.example/in", "events": ["build.finished"]},
    )

    assert added.status_code == 302
    webhook = Webhook.objects.get()
    assert (webhook.project, webhook.events, webhook.active) == (mine, ["build.finished"], True)
    assert webhook.secret
    listing = client.get(f"/manage/projects/{mine.pk}/webhooks").content.decode()
    assert "https://hooks.example/in" in listing and webhook.secret in listing

    client.post(f"/manage/projects/{mine.pk}/webhooks/{webhook.pk}/toggle", {"csrfmiddlewaretoken": token})
    webhook.refresh_from_db()
    assert webhook.active is False


def test_another_projects_webhook_page_and_toggle_answer_404(csrf_client, login, two_projects):
    _mine, theirs, me = two_projects
    theirs_hook = Webhook.objects.create(project=theirs, url="https://x.example/", secret="s", events=[])
    client = login(csrf_client, me)
    client.get("/")  # a CSRF cookie

    assert client.get(f"/manage/projects/{theirs.pk}/webhooks").status_code == 404
    toggled = client.post(
        f"/manage/projects/{theirs.pk}/webhooks/{theirs_hook.pk}/toggle",
        {"csrfmiddlewaretoken": client.cookies["csrftoken"].value},
    )
    assert toggled.status_code == 404
    theirs_hook.refresh_from_db()
    assert theirs_hook.active is True
