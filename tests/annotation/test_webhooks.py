"""Outgoing webhooks: signed JSON to a local receiver, retried with backoff, nothing lost when the broker is away."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import transaction
from django.utils import timezone

from annotation import webhooks
from annotation.models import Project, Webhook, WebhookDelivery
from annotation.services import JudgmentInput, assignment_claim_next, judgment_submit
from annotation.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    webhook_deliveries_sweep,
    webhook_event_publish,
    webhook_signature,
    webhook_signature_verify,
)
from config.celery import app as celery_app
from tests.annotation.conftest import add_member

SECRET = "a-shared-secret"
# Generous: the machine running the suite may be busy; a delivery normally lands within a second.
DELIVERY_WAIT_S = 120


# --- a local receiver ------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP server on a free local port that answers each POST with the next status of `answers`."""

    answers: list[int] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    url: str = ""

    def next_status(self) -> int:
        return self.answers.pop(0) if self.answers else 200


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.requests.append(Received(headers=dict(self.headers.items()), body=body))
            status = state.next_status()
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/rankwise"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DELIVERY_WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"waited {DELIVERY_WAIT_S} s for {what}")


def _submit_one(project: Project, labeler) -> int:  # type: ignore[no-untyped-def]
    assignment = assignment_claim_next(project=project, user=labeler)
    assert assignment is not None
    uids = [str(item.completion.uid) for item in assignment.task.items.order_by("position")]
    answer = JudgmentInput(ranks={uid: rank for rank, uid in enumerate(uids, start=1)}, client_token="t-1")
    return judgment_submit(assignment=assignment, user=labeler, answer=answer).judgment.pk


def _expected_signature(header: str, body: bytes) -> bool:
    """The receiver's check, written from the README rather than with the app's helper."""
    parts = dict(part.split("=", 1) for part in header.split(","))
    digest = hmac.new(SECRET.encode(), parts["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(digest, parts["v1"])


# --- signing ---------------------------------------------------------------------


def test_a_signature_verifies_with_the_secret_and_fails_on_another_body_secret_or_an_old_timestamp():
    body = b'{"event":"judgment.submitted"}'
    header = webhook_signature(secret=SECRET, timestamp=1_700_000_000, body=body)

    assert webhook_signature_verify(secret=SECRET, header=header, body=body, now=1_700_000_010)
    assert not webhook_signature_verify(secret=SECRET, header=header, body=body + b" ", now=1_700_000_010)
    assert not webhook_signature_verify(secret="another", header=header, body=body, now=1_700_000_010)
    assert not webhook_signature_verify(secret=SECRET, header=header, body=body, now=1_700_009_999)
    assert not webhook_signature_verify(secret=SECRET, header="v1=abc", body=body, now=1_700_000_010)


# --- the outbox ------------------------------------------------------------------


@pytest.mark.django_db
def test_an_event_writes_a_delivery_for_each_active_webhook_that_chose_it(make_project, monkeypatch):
    project = make_project(tasks=1)
    wanted = Webhook.objects.create(
        project=project, url="http://example.test/a", secret=SECRET, events=["run.finished"]
    )
    Webhook.objects.create(
        project=project, url="http://example.test/b", secret=SECRET, events=["build.finished"]
    )
    Webhook.objects.create(
        project=project, url="http://example.test/c", secret=SECRET, events=["run.finished"], active=False
    )
    published: list[int] = []
    monkeypatch.setattr(
        webhooks,
        "webhook_delivery_publish",
        lambda *, delivery_id, countdown=0: published.append(delivery_id),
    )

    with transaction.atomic():
        ids = webhook_event_publish(project_id=project.pk, event="run.finished", data={"run": 7})

    delivery = WebhookDelivery.objects.get()
    assert ids == [delivery.pk]
    assert delivery.webhook == wanted
    assert delivery.payload["data"] == {"run": 7}
    assert delivery.payload["event"] == "run.finished"


@pytest.mark.django_db(transaction=True)
def test_an_event_whose_transaction_rolls_back_leaves_no_delivery_and_publishes_nothing(
    make_project, monkeypatch
):
    project = make_project(tasks=1)
    Webhook.objects.create(
        project=project, url="http://example.test/a", secret=SECRET, events=["run.finished"]
    )
    published: list[int] = []
    monkeypatch.setattr(
        webhooks,
        "webhook_delivery_publish",
        lambda *, delivery_id, countdown=0: published.append(delivery_id),
    )

    with pytest.raises(RuntimeError), transaction.atomic():
        webhook_event_publish(project_id=project.pk, event="run.finished", data={})
        raise RuntimeError("the event itself failed")

    assert not WebhookDelivery.objects.exists()
    assert published == []


@pytest.mark.django_db(transaction=True)
def test_a_committed_event_is_published_once_committed(make_project, monkeypatch):
    project = make_project(tasks=1)
    Webhook.objects.create(
        project=project, url="http://example.test/a", secret=SECRET, events=["run.finished"]
    )
    published: list[int] = []
    monkeypatch.setattr(
        webhooks,
        "webhook_delivery_publish",
        lambda *, delivery_id, countdown=0: published.append(delivery_id),
    )

    with transaction.atomic():
        (delivery_id,) = webhook_event_publish(project_id=project.pk, event="run.finished", data={})
        assert published == []

    assert published == [delivery_id]


# --- deliveries through a real worker ------------------------------------------------


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_submitted_judgment_reaches_the_receiver_signed(celery_worker, make_project, labeler, receiver):
    # given a project with a webhook for submitted judgments
    project = make_project(tasks=2)
    add_member(project, labeler)
    Webhook.objects.create(project=project, url=receiver.url, secret=SECRET, events=["judgment.submitted"])

    # when a labeler submits a judgment
    judgment_id = _submit_one(project, labeler)

    # then the receiver gets it once, signed with the secret
    _wait_for(lambda: WebhookDelivery.objects.filter(delivered_at__isnull=False).exists(), "the delivery")
    (request,) = receiver.requests
    assert request.headers[EVENT_HEADER] == "judgment.submitted"
    assert _expected_signature(request.headers[SIGNATURE_HEADER], request.body)
    assert webhook_signature_verify(
        secret=SECRET, header=request.headers[SIGNATURE_HEADER], body=request.body, now=int(time.time())
    )
    payload = json.loads(request.body)
    assert payload["event"] == "judgment.submitted"
    assert payload["project"] == project.pk
    assert payload["data"]["judgment"] == judgment_id
    assert payload["data"]["labeler"] == labeler.username
    delivery = WebhookDelivery.objects.get()
    assert payload["id"] == str(delivery.uid) == request.headers[DELIVERY_HEADER]
    assert (delivery.attempts, delivery.last_status_code, delivery.last_error) == (1, 200, "")


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(celery_worker, make_project, receiver):
    # given a receiver that fails twice, then answers
    project = make_project(tasks=1)
    Webhook.objects.create(project=project, url=receiver.url, secret=SECRET, events=["build.finished"])
    receiver.answers = [503, 500]

    # when an event is published
    with transaction.atomic():
        webhook_event_publish(project_id=project.pk, event="build.finished", data={"build": 3})

    # then the third attempt delivers it: the same delivery, signed again each time
    _wait_for(
        lambda: WebhookDelivery.objects.filter(delivered_at__isnull=False).exists(), "the third attempt"
    )
    delivery = WebhookDelivery.objects.get()
    assert delivery.attempts == 3
    assert delivery.last_status_code == 200
    assert len(receiver.requests) == 3
    assert {request.headers[DELIVERY_HEADER] for request in receiver.requests} == {str(delivery.uid)}
    assert all(_expected_signature(r.headers[SIGNATURE_HEADER], r.body) for r in receiver.requests)


@pytest.mark.django_db(transaction=True)
def test_a_receiver_that_never_answers_is_given_up_after_the_last_attempt(
    make_project, receiver, settings, monkeypatch
):
    # given a receiver that always fails and a one-attempt budget (attempted here, in the test's process)
    settings.WEBHOOK_MAX_ATTEMPTS = 1
    monkeypatch.setattr(webhooks, "webhook_delivery_publish", lambda *, delivery_id, countdown=0: True)
    project = make_project(tasks=1)
    Webhook.objects.create(project=project, url=receiver.url, secret=SECRET, events=["run.finished"])
    receiver.answers = [500]
    with transaction.atomic():
        (delivery_id,) = webhook_event_publish(project_id=project.pk, event="run.finished", data={})

    # when it is attempted
    outcome = webhooks.webhook_delivery_attempt(delivery_id=delivery_id)

    # then it is logged as given up, with the receiver's answer
    delivery = WebhookDelivery.objects.get()
    assert outcome == "gave_up"
    assert delivery.gave_up_at is not None
    assert delivery.last_status_code == 500
    assert "HTTP 500" in delivery.last_error
    assert webhooks.webhook_delivery_attempt(delivery_id=delivery_id) == "skipped"


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_an_event_committed_while_the_broker_is_down_is_delivered_by_the_sweep(
    celery_worker, make_project, labeler, receiver, monkeypatch
):
    # given a project with a webhook, and a broker that does not answer: the
    # test process publishes to a closed port (the shared Redis keeps running)
    project = make_project(tasks=2)
    add_member(project, labeler)
    Webhook.objects.create(project=project, url=receiver.url, secret=SECRET, events=["judgment.submitted"])
    with _broker_at("redis://127.0.0.1:1/0"):
        # when a judgment is submitted: it is stored, its delivery too, but no task reaches the broker
        judgment_id = _submit_one(project, labeler)
    delivery = WebhookDelivery.objects.get()
    assert delivery.published_at is None
    assert delivery.delivered_at is None
    time.sleep(1)
    assert receiver.requests == []

    # then once the broker is back, the sweep publishes it and the worker delivers it
    assert webhook_deliveries_sweep() == [delivery.pk]
    _wait_for(
        lambda: WebhookDelivery.objects.filter(delivered_at__isnull=False).exists(), "the swept delivery"
    )
    (request,) = receiver.requests
    assert json.loads(request.body)["data"]["judgment"] == judgment_id
    assert webhook_deliveries_sweep() == []


@pytest.mark.django_db
def test_the_sweep_leaves_deliveries_whose_task_is_on_its_way_or_done(make_project, monkeypatch, settings):
    project = make_project(tasks=1)
    webhook = Webhook.objects.create(
        project=project, url="http://example.test/a", secret=SECRET, events=["run.finished"]
    )
    now = timezone.now()
    grace = timezone.timedelta(seconds=settings.WEBHOOK_SWEEP_GRACE_S + 1)

    def delivery(**fields):  # type: ignore[no-untyped-def]
        return WebhookDelivery.objects.create(webhook=webhook, event="run.finished", payload={}, **fields)

    never_published = delivery(next_attempt_at=now)
    lost = delivery(next_attempt_at=now - grace, published_at=now - grace)
    delivery(next_attempt_at=now, published_at=now)  # queued a moment ago
    delivery(next_attempt_at=now - grace, published_at=now - grace, delivered_at=now)
    delivery(next_attempt_at=now - grace, published_at=now - grace, gave_up_at=now)
    delivery(next_attempt_at=now - grace, published_at=now - grace, leased_until=now + grace)  # being posted
    published: list[int] = []
    monkeypatch.setattr(
        webhooks,
        "webhook_delivery_publish",
        lambda *, delivery_id, countdown=0: published.append(delivery_id) or True,
    )

    assert sorted(webhook_deliveries_sweep(now=now)) == sorted([never_published.pk, lost.pk])


@contextmanager
def _broker_at(url: str) -> Iterator[None]:
    """Point the test process's Celery app at another broker for a while (publishing only).

    The app's connection and producer pools are set aside and put back
    afterwards: kombu keeps pools per broker address, and closing the real
    one would leave the rest of the session publishing to a closed pool.
    """
    saved = (celery_app.conf.broker_url, celery_app._pool, celery_app.amqp._producer_pool)
    celery_app.conf.broker_url = url
    celery_app._pool = None
    celery_app.amqp._producer_pool = None
    try:
        yield
    finally:
        celery_app.conf.broker_url, celery_app._pool, celery_app.amqp._producer_pool = saved


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_delivery_whose_message_the_broker_lost_is_delivered_by_the_sweep(
    celery_worker, make_project, receiver, settings
):
    # given a delivery handed to the broker long ago and never attempted: its
    # message went with a Redis restart
    project = make_project(tasks=1)
    webhook = Webhook.objects.create(
        project=project, url=receiver.url, secret=SECRET, events=["run.finished"]
    )
    long_ago = timezone.now() - timezone.timedelta(seconds=settings.WEBHOOK_SWEEP_GRACE_S + 60)
    lost = WebhookDelivery.objects.create(
        webhook=webhook,
        event="run.finished",
        payload={"event": "run.finished", "project": project.pk, "data": {"run": 1}},
        next_attempt_at=long_ago,
        published_at=long_ago,
    )

    # when the sweep runs (beat does every minute; a worker at its start)
    assert webhook_deliveries_sweep() == [lost.pk]

    # then the worker delivers it
    _wait_for(
        lambda: WebhookDelivery.objects.filter(delivered_at__isnull=False).exists(), "the swept delivery"
    )
    (request,) = receiver.requests
    assert request.headers[DELIVERY_HEADER] == str(lost.uid)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",
        "http://localhost/",
        "http://10.0.0.5/hook",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
    ],
)
def test_a_private_address_is_refused_when_private_addresses_are_off(url, settings):
    settings.WEBHOOK_PRIVATE_ADDRESSES = False

    assert webhooks.webhook_address_refused(url=url)


def test_a_public_address_or_private_addresses_allowed_pass(settings):
    settings.WEBHOOK_PRIVATE_ADDRESSES = False
    assert webhooks.webhook_address_refused(url="https://93.184.215.14/hook") == ""
    settings.WEBHOOK_PRIVATE_ADDRESSES = True
    assert webhooks.webhook_address_refused(url="http://127.0.0.1/") == ""


@pytest.mark.django_db(transaction=True)
def test_a_delivery_to_a_private_address_is_given_up_without_a_request(
    make_project, receiver, settings, monkeypatch
):
    settings.WEBHOOK_PRIVATE_ADDRESSES = False
    monkeypatch.setattr(webhooks, "webhook_delivery_publish", lambda *, delivery_id, countdown=0: True)
    project = make_project(tasks=1)
    Webhook.objects.create(project=project, url=receiver.url, secret=SECRET, events=["run.finished"])
    with transaction.atomic():
        (delivery_id,) = webhook_event_publish(project_id=project.pk, event="run.finished", data={})

    assert webhooks.webhook_delivery_attempt(delivery_id=delivery_id) == "gave_up"

    assert receiver.requests == []
    assert "not a public address" in WebhookDelivery.objects.get().last_error
