"""Pagination of every list that can grow: cursors in the JSON API, numbered pages on pages people use.

A cursor (DRF's CursorPagination) stays right while rows are added at the
head of the list, and costs one indexed query whatever the page; pages keep
Django's Paginator, whose page numbers people can share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django.core.paginator import Page, Paginator
from django.db.models import QuerySet
from django.http import HttpRequest
from drf_spectacular.utils import OpenApiParameter, inline_serializer
from rest_framework import serializers
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response

API_PAGE_SIZE = 50
API_MAX_PAGE_SIZE = 200
PAGE_SIZE = 50
# The query parameters of every cursor-paginated list, for `extend_schema(parameters=...)`.
CURSOR_PARAMETERS = [
    OpenApiParameter("cursor", str, description="The page to read, as given in `next` or `previous`."),
    OpenApiParameter(
        "page_size", int, description=f"Rows per page (default {API_PAGE_SIZE}, at most {API_MAX_PAGE_SIZE})."
    ),
]


class IdCursorPagination(CursorPagination):
    """Newest first by id (ids only grow, so the cursor is unique and stable)."""

    ordering = "-pk"
    page_size = API_PAGE_SIZE
    page_size_query_param = "page_size"
    max_page_size = API_MAX_PAGE_SIZE


class OldestFirstCursorPagination(IdCursorPagination):
    ordering = "pk"


def api_page(
    request: Request,
    queryset: QuerySet[Any],
    serialize: Callable[[list[Any]], Any],
    *,
    pagination: type[CursorPagination] = IdCursorPagination,
) -> Response:
    """One page of `queryset` as `{"next", "previous", "results"}`; `serialize` turns the page's rows into results."""
    paginator = pagination()
    rows = paginator.paginate_queryset(queryset, request) or []
    return paginator.get_paginated_response(serialize(list(rows)))


def page_of(request: HttpRequest, rows: QuerySet[Any] | Iterable[Any], *, per_page: int = PAGE_SIZE) -> Page:
    """The page the query string asks for (`?page=`); a number out of range gives the last page."""
    return Paginator(rows, per_page).get_page(request.GET.get("page"))  # type: ignore[arg-type]


def page_query(request: HttpRequest) -> str:
    """The query string without `page`, for the links of the other pages (filters stay)."""
    query = request.GET.copy()
    query.pop("page", None)
    return query.urlencode()


def paginated_schema(serializer: type[serializers.Serializer], name: str) -> serializers.Serializer:
    """The schema of one cursor page of `serializer` rows, for `extend_schema(responses=...)`."""
    return inline_serializer(
        name=f"Paginated{name}List",
        fields={
            "next": serializers.URLField(allow_null=True, help_text="The next page, or null on the last."),
            "previous": serializers.URLField(
                allow_null=True, help_text="The page before, or null on the first."
            ),
            "results": serializer(many=True),
        },
    )
