"""`/healthz`: is the database reachable, is the broker reachable."""

from __future__ import annotations

import logging

from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from config.celery import app as celery_app

logger = logging.getLogger(__name__)


def database_reachable() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception:
        logger.warning("health check: database unreachable", exc_info=True)
        return False
    return True


def broker_reachable() -> bool:
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            # ensure_connection can succeed lazily; a round trip proves the broker answers.
            conn.default_channel.client.ping()
    except Exception:
        logger.warning("health check: broker unreachable", exc_info=True)
        return False
    return True


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    report = {
        "database": "ok" if database_reachable() else "unreachable",
        "broker": "ok" if broker_reachable() else "unreachable",
    }
    healthy = all(value == "ok" for value in report.values())
    return JsonResponse(report, status=200 if healthy else 503)
