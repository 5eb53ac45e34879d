"""Outgoing webhooks: a project's events POSTed as signed JSON to the addresses its managers chose.

Delivery is an outbox:

1. `webhook_event_publish` runs inside the transaction of the event itself
   (a judgment's submit, a build's or run's end) and writes one
   `WebhookDelivery` row per subscribed webhook; the rows commit or roll back
   with the event.
2. On commit, a Celery task per row is handed to the broker. When the broker
   does not answer (Redis restarting), the row stays, marked as never
   published.
3. `webhook_delivery_attempt` (the task) leases the row by compare-and-set,
   POSTs the payload, and records the answer: delivered, or the next attempt
   after an exponential backoff, or given up after the last attempt.
4. `webhook_deliveries_sweep` (beat, and each worker's start) publishes again
   every row whose task was never published or is long overdue — what a
   broker lost is delivered late, never lost.

A receiver may thus see a delivery twice (a sweep racing a late task); the
`X-Rankwise-Delivery` header is the same each time, for it to drop repeats.

Every request is signed (see `webhook_signature` and the README): HMAC-SHA256
with the webhook's secret over ``"<timestamp>.<body>"``, sent as
``X-Rankwise-Signature: t=<timestamp>,v1=<hex digest>``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import requests
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from annotation.models import Judgment, Task, Webhook, WebhookDelivery

logger = logging.getLogger(__name__)

WEBHOOK_DELIVERY_TASK = "annotation.tasks.webhook_delivery_attempt"
WEBHOOK_SWEEP_TASK = "annotation.tasks.webhook_deliveries_sweep"
SIGNATURE_HEADER = "X-Rankwise-Signature"
EVENT_HEADER = "X-Rankwise-Event"
DELIVERY_HEADER = "X-Rankwise-Delivery"
ERROR_MAX_CHARS = 2000
# How long one attempt holds its row: longer than the request's own timeout,
# so a second task for the same row never posts while the first still waits.
LEASE_MARGIN_S = 30


class WebhookEventUnknown(ValueError):
    """An event name that is not one of `Webhook.Event`."""


def webhook_secret_new() -> str:
    return secrets.token_urlsafe(32)


def webhook_signature(*, secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: ``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<body>">``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def webhook_signature_verify(
    *, secret: str, header: str, body: bytes, now: int, tolerance_s: int = 300
) -> bool:
    """What a receiver does: the digest matches and the timestamp is recent (no replays of old requests)."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = webhook_signature(secret=secret, timestamp=timestamp, body=body)
    return hmac.compare_digest(expected, header) and abs(now - timestamp) <= tolerance_s


def webhook_event_publish(
    *, project_id: int, event: str, data: dict[str, Any], now: datetime | None = None
) -> list[int]:
    """Write the event's deliveries for the project's active webhooks that chose it; publish them on commit.

    Call it inside the event's own transaction: the rows are part of it.
    Returns the new deliveries' ids (none when no webhook wants the event).
    """
    if event not in Webhook.Event.values:
        raise WebhookEventUnknown(event)
    now = now or timezone.now()
    webhooks = [
        webhook
        for webhook in Webhook.objects.filter(project_id=project_id, active=True).order_by("id")
        if event in (webhook.events or [])
    ]
    if not webhooks:
        return []
    payload = json.loads(
        json.dumps(
            {"event": event, "created_at": now, "project": project_id, "data": data}, cls=DjangoJSONEncoder
        )
    )
    deliveries = WebhookDelivery.objects.bulk_create(
        WebhookDelivery(webhook=webhook, event=event, payload=payload, next_attempt_at=now)
        for webhook in webhooks
    )
    ids = [delivery.pk for delivery in deliveries]
    transaction.on_commit(lambda: [webhook_delivery_publish(delivery_id=pk) for pk in ids])
    return ids


def webhook_delivery_publish(*, delivery_id: int, countdown: float = 0) -> bool:
    """Hand the delivery's task to the broker; False (and the row left for the sweep) when it does not answer."""
    from config.celery import app as celery_app

    try:
        celery_app.send_task(
            WEBHOOK_DELIVERY_TASK,
            kwargs={"delivery_id": delivery_id},
            queue="default",
            countdown=countdown or None,
        )
    except Exception as error:  # any broker failure: the row is the truth, the sweep publishes it again
        logger.warning("webhook delivery %s not published (%s); the sweep will retry", delivery_id, error)
        return False
    WebhookDelivery.objects.filter(pk=delivery_id).update(published_at=timezone.now())
    return True


def webhook_address_refused(*, url: str) -> str:
    """Why the worker must not post to `url` (empty when it may): its host is a private address.

    A manager chooses the address and the worker posts from inside the
    network, so without this a webhook could reach the database, Redis or a
    cloud metadata service. Loopback, private, link-local and reserved
    addresses are refused unless `WEBHOOK_PRIVATE_ADDRESSES` is on (the
    default with DEBUG, for receivers on one's own machine). The name is
    resolved here and again by the HTTP client: a DNS server that answers
    differently the second time is not defended against.
    """
    if settings.WEBHOOK_PRIVATE_ADDRESSES:
        return ""
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return ""  # the request itself reports a name that does not resolve, and is retried
    for address in sorted(addresses):
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            return f"{host} is {address}, not a public address (WEBHOOK_PRIVATE_ADDRESSES is off)"
    return ""


def _backoff_s(attempts: int) -> float:
    """Seconds before attempt `attempts + 1`: base × 2^(attempts − 1), capped."""
    return min(
        settings.WEBHOOK_RETRY_BASE_S * 2 ** max(attempts - 1, 0),
        settings.WEBHOOK_RETRY_MAX_S,
    )


def webhook_delivery_attempt(*, delivery_id: int, now: datetime | None = None) -> str:
    """Make one attempt at a delivery that is due; returns what happened, for logs and tests.

    The row is leased by compare-and-set first, so a second task for the same
    delivery (a sweep's, a redelivered message) does nothing while this one
    posts, and nothing once it was delivered.
    """
    now = now or timezone.now()
    timeout_s = settings.WEBHOOK_TIMEOUT_S
    claimed = (
        WebhookDelivery.objects.filter(
            pk=delivery_id, delivered_at__isnull=True, gave_up_at__isnull=True, next_attempt_at__lte=now
        )
        .filter(Q(leased_until__isnull=True) | Q(leased_until__lt=now))
        .update(
            attempts=F("attempts") + 1,
            leased_until=now + timedelta(seconds=timeout_s + LEASE_MARGIN_S),
        )
    )
    if claimed != 1:
        return "skipped"
    delivery = WebhookDelivery.objects.select_related("webhook").filter(pk=delivery_id).first()
    if delivery is None:  # its webhook was deleted meanwhile
        return "skipped"
    webhook = delivery.webhook
    if not webhook.active:
        WebhookDelivery.objects.filter(pk=delivery_id).update(
            gave_up_at=now, leased_until=None, last_error="The webhook was switched off."
        )
        return "gave_up"

    refused = webhook_address_refused(url=webhook.url)
    if refused:
        WebhookDelivery.objects.filter(pk=delivery_id).update(
            gave_up_at=now, leased_until=None, last_error=refused
        )
        return "gave_up"

    body = json.dumps({"id": str(delivery.uid), **delivery.payload}, separators=(",", ":")).encode()
    timestamp = int(timezone.now().timestamp())
    status_code: int | None = None
    error = ""
    try:
        response = requests.post(
            webhook.url,
            data=body,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "Rankwise-Webhooks/1",
                SIGNATURE_HEADER: webhook_signature(secret=webhook.secret, timestamp=timestamp, body=body),
                EVENT_HEADER: delivery.event,
                DELIVERY_HEADER: str(delivery.uid),
            },
            timeout=timeout_s,
            allow_redirects=False,
        )
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}: {response.text[:500]}"
    except requests.RequestException as failure:
        error = f"{type(failure).__name__}: {failure}"

    finished = timezone.now()
    if not error:
        WebhookDelivery.objects.filter(pk=delivery_id).update(
            delivered_at=finished, last_status_code=status_code, last_error="", leased_until=None
        )
        return "delivered"
    if delivery.attempts >= settings.WEBHOOK_MAX_ATTEMPTS:
        WebhookDelivery.objects.filter(pk=delivery_id).update(
            gave_up_at=finished,
            last_status_code=status_code,
            last_error=error[-ERROR_MAX_CHARS:],
            leased_until=None,
        )
        return "gave_up"
    wait_s = _backoff_s(delivery.attempts)
    WebhookDelivery.objects.filter(pk=delivery_id).update(
        next_attempt_at=finished + timedelta(seconds=wait_s),
        last_status_code=status_code,
        last_error=error[-ERROR_MAX_CHARS:],
        leased_until=None,
    )
    webhook_delivery_publish(delivery_id=delivery_id, countdown=wait_s)
    return "retry"


def webhook_deliveries_sweep(*, now: datetime | None = None) -> list[int]:
    """Publish again the deliveries a broker may have lost; returns their ids.

    Due are rows never published (the broker was down at commit time) and rows
    whose next attempt is overdue by more than `WEBHOOK_SWEEP_GRACE_S` (their
    message vanished, e.g. with a Redis restart), unless an attempt holds them.
    """
    now = now or timezone.now()
    grace = timedelta(seconds=settings.WEBHOOK_SWEEP_GRACE_S)
    due = (
        WebhookDelivery.objects.filter(delivered_at__isnull=True, gave_up_at__isnull=True)
        .filter(Q(published_at__isnull=True) | Q(next_attempt_at__lt=now - grace))
        .filter(Q(leased_until__isnull=True) | Q(leased_until__lt=now))
        .order_by("next_attempt_at", "id")
        .values_list("id", "next_attempt_at")[: settings.WEBHOOK_SWEEP_BATCH]
    )
    published = []
    for delivery_id, next_attempt_at in due:
        wait_s = max((next_attempt_at - now).total_seconds(), 0)
        if webhook_delivery_publish(delivery_id=delivery_id, countdown=wait_s):
            published.append(delivery_id)
    return published


def judgment_webhook_data(*, judgment: Judgment, task: Task, comparisons: int) -> dict[str, Any]:
    """The `judgment.submitted` event's data: who ranked which prompt how (ranks keyed by completion uid)."""
    return {
        "judgment": judgment.pk,
        "task": task.pk,
        "prompt": task.prompt_id,
        "labeler": judgment.user.get_username(),
        "ranks": judgment.ranks,
        "none_acceptable": judgment.none_acceptable,
        "comparisons": comparisons,
        "version": judgment.version,
    }


def webhook_deliveries_retry(*, ids: list[int], now: datetime | None = None) -> list[int]:
    """A manager's "try again now": undelivered deliveries (given up or waiting) get a new attempt budget."""
    now = now or timezone.now()
    pending = WebhookDelivery.objects.filter(pk__in=ids, delivered_at__isnull=True).filter(
        Q(leased_until__isnull=True) | Q(leased_until__lt=now)
    )
    retried = sorted(pending.values_list("pk", flat=True))
    WebhookDelivery.objects.filter(pk__in=retried).update(gave_up_at=None, attempts=0, next_attempt_at=now)
    for delivery_id in retried:
        webhook_delivery_publish(delivery_id=delivery_id)
    return retried


def webhook_create(
    *, project: Any, url: str, events: list[str], secret: str = "", created_by: Any = None
) -> Webhook:
    """A new active webhook of the project; an empty secret gets a random one."""
    unknown = set(events) - set(Webhook.Event.values)
    if unknown:
        raise WebhookEventUnknown(", ".join(sorted(unknown)))
    return Webhook.objects.create(
        project=project,
        url=url,
        events=list(events),
        secret=secret or webhook_secret_new(),
        created_by=created_by,
    )
