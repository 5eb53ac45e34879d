"""One error contract for the whole JSON API: RFC 9457 problem details.

Every error an API view lets escape — DRF's own (validation, authentication,
permission, not found, method, media type, throttling), Django's (Http404,
PermissionDenied, ValidationError) and the services' domain errors — is
answered here, as `application/problem+json`:

    {"type": "urn:rankwise:problem:<slug>", "title": "...", "status": 400,
     "detail": "...", "errors": {"field": ["message", ...]}}

`errors` (field → messages) comes with validation problems; a few problems
carry extension members (RFC 9457 §3.2): `reason` and `your_answer` on a 409
for an answer that was not stored, `lines` on a refused import. Views raise;
none maps errors itself.

It lives in config because it names the errors of both apps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:rankwise:problem:"


def _messages(value: Any) -> list[str]:
    """Whatever a validator gave for one field, as a flat list of strings."""
    if isinstance(value, Mapping):
        return [f"{key}: {message}" for key, item in value.items() for message in _messages(item)]
    if isinstance(value, list | tuple):
        return [message for item in value for message in _messages(item)]
    return [str(value)]


def field_errors(errors: Any) -> dict[str, list[str]]:
    """Field → messages from a dict of str or lists, a DRF ErrorDetail tree, or a bare list."""
    if isinstance(errors, Mapping):
        return {str(field): _messages(value) for field, value in errors.items()}
    return {"non_field_errors": _messages(errors)}


def problem(
    *,
    status_code: int,
    slug: str,
    title: str,
    detail: str,
    errors: Mapping[str, list[str]] | None = None,
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> Response:
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + slug,
        "title": title,
        "status": status_code,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = dict(errors)
    body.update(extensions)
    return Response(body, status=status_code, headers=dict(headers or {}), content_type=PROBLEM_CONTENT_TYPE)


def _request_answer(context: Mapping[str, Any]) -> Any:
    """The body the client sent, echoed back on a 409 so no answer is lost."""
    request = context.get("request")
    try:
        data = request.data if request is not None else None
    except exceptions.ParseError:
        return None
    return dict(data) if isinstance(data, Mapping) else data


def _domain_problem(exc: Exception, context: Mapping[str, Any]) -> Response | None:
    """The services' errors: each has one status and one slug."""
    from annotation.importing import ImportValidationError
    from annotation.review import JudgmentNotRevisable, ReviewConflict
    from annotation.services import AssignmentNotActive, JudgmentInvalid, LeaseTakenOver, MemberInvalid
    from training.services import DatasetBuildInvalid, QueueUnavailable

    if isinstance(exc, JudgmentInvalid | DatasetBuildInvalid):
        errors = field_errors(exc.errors)
        return problem(
            status_code=400,
            slug="invalid",
            title="The request is not valid",
            detail=f"{len(errors)} field(s) need attention; see errors.",
            errors=errors,
        )
    if isinstance(exc, ImportValidationError):
        grouped: dict[str, list[str]] = {}
        for error in exc.errors:
            where = f"line {error.line}: " if error.line is not None else ""
            grouped.setdefault(error.field or "file", []).append(where + error.message)
        return problem(
            status_code=400,
            slug="import-refused",
            title="The import was refused",
            detail=f"{len(exc.errors)} problem(s); nothing was imported.",
            errors=grouped,
            lines=[{"line": e.line, "field": e.field, "message": e.message} for e in exc.errors],
        )
    if isinstance(exc, LeaseTakenOver):
        return problem(
            status_code=409,
            slug="taken-over",
            title="The task went to someone else",
            detail=str(exc),
            reason="taken_over",
            your_answer=_request_answer(context),
        )
    if isinstance(exc, AssignmentNotActive):
        return problem(
            status_code=409,
            slug="assignment-not-active",
            title="The assignment is no longer active",
            detail=str(exc),
            reason=exc.reason,
            your_answer=_request_answer(context),
        )
    if isinstance(exc, ReviewConflict | JudgmentNotRevisable):
        return problem(status_code=409, slug="conflict", title="Someone got there first", detail=str(exc))
    if isinstance(exc, MemberInvalid):
        return problem(
            status_code=400,
            slug="invalid",
            title="The request is not valid",
            detail=str(exc),
            errors={"username": [str(exc)]},
        )
    if isinstance(exc, QueueUnavailable):
        return problem(
            status_code=503,
            slug="queue-unavailable",
            title="The job queue cannot be reached",
            detail=str(exc),
            headers={"Retry-After": "30"},
        )
    if isinstance(exc, DjangoValidationError):
        errors = field_errors(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
        return problem(
            status_code=400,
            slug="invalid",
            title="The request is not valid",
            detail=" ".join(message for messages in errors.values() for message in messages),
            errors=errors,
        )
    return None


# DRF's exceptions by class: slug and title. Anything else of DRF's keeps its
# own status and default detail under the slug "error".
_DRF_PROBLEMS: list[tuple[type[exceptions.APIException], str, str]] = [
    (exceptions.ParseError, "malformed-body", "The request body could not be read"),
    (exceptions.ValidationError, "invalid", "The request is not valid"),
    (exceptions.NotAuthenticated, "not-authenticated", "Authentication needed"),
    (exceptions.AuthenticationFailed, "authentication-failed", "Authentication failed"),
    (exceptions.PermissionDenied, "forbidden", "Not allowed"),
    (exceptions.NotFound, "not-found", "Not found"),
    (exceptions.MethodNotAllowed, "method-not-allowed", "Method not allowed"),
    (exceptions.NotAcceptable, "not-acceptable", "Not acceptable"),
    (exceptions.UnsupportedMediaType, "unsupported-media-type", "Unsupported media type"),
    (exceptions.Throttled, "throttled", "Too many requests"),
]


def _drf_problem(exc: exceptions.APIException, context: Mapping[str, Any]) -> Response:
    # DRF's handler sets the headers that go with some errors (WWW-Authenticate, Retry-After, Allow).
    base = drf_exception_handler(exc, context)
    headers = {name: value for name, value in base.items() if name.lower() != "content-type"} if base else {}
    slug, title = next(
        ((slug, title) for kind, slug, title in _DRF_PROBLEMS if isinstance(exc, kind)),
        ("error", "Error"),
    )
    if isinstance(exc, exceptions.ValidationError):
        errors = field_errors(exc.detail)
        return problem(
            status_code=exc.status_code,
            slug=slug,
            title=title,
            detail=f"{len(errors)} field(s) need attention; see errors.",
            errors=errors,
            headers=headers,
        )
    detail = " ".join(_messages(exc.detail))
    extra: dict[str, Any] = {}
    if isinstance(exc, exceptions.ParseError):
        extra["errors"] = {"body": [detail]}
    return problem(
        status_code=exc.status_code, slug=slug, title=title, detail=detail, headers=headers, **extra
    )


_DJANGO_TO_DRF: dict[type[Exception], Callable[[Exception], exceptions.APIException]] = {
    Http404: lambda exc: exceptions.NotFound(str(exc) or None),
    PermissionDenied: lambda exc: exceptions.PermissionDenied(str(exc) or None),
}


def problem_exception_handler(exc: Exception, context: Mapping[str, Any]) -> Response | None:
    """REST_FRAMEWORK['EXCEPTION_HANDLER']: every error as problem details.

    An exception this does not know is left to Django (a 500, logged), as DRF's
    own handler does.
    """
    for kind, convert in _DJANGO_TO_DRF.items():
        if isinstance(exc, kind):
            exc = convert(exc)
            break
    if isinstance(exc, exceptions.APIException):
        return _drf_problem(exc, context)
    return _domain_problem(exc, context)
