"""`/healthz` reports whether the database and the broker answer."""

from __future__ import annotations

import pytest
from django.test import Client

from config.celery import app as celery_app
from training.demo.stack import port_free


def closed_port() -> int:
    """A local port nothing listens on (it was free a moment ago and is closed again)."""
    return port_free()


@pytest.mark.django_db
def test_it_reports_ok_when_the_database_and_redis_answer(csrf_client: Client) -> None:
    response = csrf_client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"database": "ok", "broker": "ok"}


@pytest.mark.django_db
def test_it_answers_503_naming_the_broker_when_redis_is_unreachable(
    csrf_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a broker URL on a port where nothing listens
    # (the health check opens its connection from the Celery app's configuration)
    monkeypatch.setattr(celery_app.conf, "broker_url", f"redis://127.0.0.1:{closed_port()}/0")

    # when (the test client re-raises any exception a view lets escape)
    response = csrf_client.get("/healthz")

    # then
    assert response.status_code == 503
    assert response.json() == {"database": "ok", "broker": "unreachable"}


def test_it_answers_503_naming_the_database_when_it_is_unreachable(csrf_client: Client) -> None:
    # Without the django_db mark pytest-django refuses every query, which the
    # check sees exactly as it would see a database that is down.
    response = csrf_client.get("/healthz")

    assert response.status_code == 503
    assert response.json() == {"database": "unreachable", "broker": "ok"}


@pytest.mark.django_db
def test_it_is_never_cached(csrf_client: Client) -> None:
    response = csrf_client.get("/healthz")

    assert "no-cache" in response.headers["Cache-Control"]
