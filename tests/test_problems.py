"""One error contract: every error of every API endpoint is RFC 9457 problem details."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.exceptions import ValidationError as DjangoValidationError
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework import exceptions
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.test import APIClient, APIRequestFactory

from annotation.importing import ImportError_, ImportValidationError
from annotation.services import AssignmentNotActive, JudgmentInvalid, LeaseTakenOver
from config.problems import PROBLEM_CONTENT_TYPE, problem_exception_handler
from tests.factories import user_with_roles
from training.services import DatasetBuildInvalid, QueueUnavailable

# Documentation, not endpoints that answer errors of their own.
NOT_ENDPOINTS = {"api/schema/", "api/docs/", "api/redoc/"}
MISSING_ID = 987654


def _routes(resolver: URLResolver | None = None, prefix: str = "") -> Iterator[str]:
    for pattern in (resolver or get_resolver()).url_patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern, route)
        elif isinstance(pattern, URLPattern):
            yield route


def api_routes() -> list[str]:
    return sorted({route for route in _routes() if route.startswith("api/") and route not in NOT_ENDPOINTS})


def _url(route: str) -> str:
    return "/" + re.sub(
        r"<(?:\w+:)?(\w+)>", lambda match: "x" if match.group(1) == "key" else str(MISSING_ID), route
    )


def assert_problem(response: Any, where: str) -> None:
    assert response["Content-Type"] == PROBLEM_CONTENT_TYPE, (
        where,
        response.status_code,
        response["Content-Type"],
    )
    body = json.loads(response.content)
    assert {"type", "title", "status", "detail"} <= set(body), (where, body)
    assert body["status"] == response.status_code, (where, body)
    assert body["type"].startswith("urn:rankwise:problem:") and body["title"] and body["detail"], (
        where,
        body,
    )
    if "errors" in body:
        assert all(
            isinstance(messages, list) and all(isinstance(m, str) for m in messages)
            for messages in body["errors"].values()
        ), (where, body)


def test_the_walk_finds_the_api() -> None:
    routes = api_routes()
    assert "api/projects/" in routes and "api/dataset-builds/" in routes and len(routes) >= 10


@pytest.mark.django_db
@pytest.mark.parametrize("route", api_routes())
def test_every_error_of_every_api_endpoint_is_problem_details(route: str) -> None:
    # given a stranger to everything, and no one at all
    url = _url(route)
    anonymous = APIClient()
    stranger = APIClient()
    stranger.force_authenticate(user_with_roles(username="nobody-here"))
    answers = []

    # when each calls the endpoint with every method, and with a body that is no JSON
    for client in (anonymous, stranger):
        for method in ("get", "post", "put", "patch", "delete"):
            answers.append((method, getattr(client, method)(url)))
        answers.append(("bad json", client.post(url, data="{not json", content_type="application/json")))

    # then every error, whatever its cause, has the one envelope
    errors = [(method, response) for method, response in answers if response.status_code >= 400]
    assert errors, route
    for method, response in errors:
        assert_problem(response, f"{method} {url}")
    assert {response.status_code for _method, response in answers[:6]} <= {401, 403, 404, 405}


@pytest.mark.django_db
def test_a_body_that_is_no_json_is_a_problem_naming_the_body(manager: Any) -> None:
    client = APIClient()
    client.force_authenticate(manager)

    response = client.post("/api/dataset-builds/", data="{nope", content_type="application/json")

    assert response.status_code == 400
    assert_problem(response, "bad body")
    assert list(response.json()["errors"]) == ["body"]


@pytest.mark.django_db
def test_a_validation_error_lists_every_field_with_its_messages(manager: Any) -> None:
    client = APIClient()
    client.force_authenticate(manager)

    response = client.post("/api/dataset-builds/", {"name": ""}, format="json")

    assert response.status_code == 400
    assert_problem(response, "invalid build")
    assert {"name", "projects"} <= set(response.json()["errors"])


def _handled(exc: Exception, data: Any = None) -> Any:
    request = APIRequestFactory().post("/api/x", data or {}, format="json")
    response = problem_exception_handler(exc, {"request": Request(request, parsers=[JSONParser()])})
    assert response is not None
    response.accepted_renderer = JSONRenderer()
    response.accepted_media_type = "application/json"
    response.renderer_context = {}
    response.render()
    return response


@pytest.mark.parametrize(
    ("exc", "status", "slug"),
    [
        (JudgmentInvalid({"ranks": "every completion needs a rank"}), 400, "invalid"),
        (DatasetBuildInvalid({"test_fraction": "must be below 1"}), 400, "invalid"),
        (DjangoValidationError({"max_steps": ["must be positive"]}), 400, "invalid"),
        (
            ImportValidationError([ImportError_(line=2, field="prompt", message="must be a string")]),
            400,
            "import-refused",
        ),
        (LeaseTakenOver("someone else has it"), 409, "taken-over"),
        (AssignmentNotActive("submitted", "already submitted"), 409, "assignment-not-active"),
        (QueueUnavailable("Redis is down"), 503, "queue-unavailable"),
        (exceptions.Throttled(wait=12), 429, "throttled"),
        (exceptions.NotAuthenticated(), 401, "not-authenticated"),
        (exceptions.MethodNotAllowed("DELETE"), 405, "method-not-allowed"),
    ],
)
def test_each_kind_of_error_maps_to_one_status_and_type(exc: Exception, status: int, slug: str) -> None:
    response = _handled(exc, {"ranks": {"a": 1}})

    assert response.status_code == status
    assert_problem(response, slug)
    assert json.loads(response.content)["type"] == "urn:rankwise:problem:" + slug


def test_a_conflict_echoes_the_answer_and_a_throttle_says_when_to_come_back() -> None:
    conflict = json.loads(_handled(LeaseTakenOver("gone"), {"ranks": {"a": 1}, "rationale": "kept"}).content)
    assert conflict["reason"] == "taken_over" and conflict["your_answer"]["rationale"] == "kept"

    throttled = _handled(exceptions.Throttled(wait=12))
    assert throttled["Retry-After"] == "12"


def test_a_refused_import_keeps_every_line_and_field() -> None:
    errors = [
        ImportError_(line=2, field="prompt", message="bad"),
        ImportError_(line=5, field="completions", message="few"),
    ]
    body = json.loads(_handled(ImportValidationError(errors)).content)

    assert body["lines"] == [
        {"line": 2, "field": "prompt", "message": "bad"},
        {"line": 5, "field": "completions", "message": "few"},
    ]
    assert body["errors"] == {"prompt": ["line 2: bad"], "completions": ["line 5: few"]}
