"""The JSON API. Each view parses input, finds objects through the access
helpers (404 for anything the caller may not see) and calls one service."""

from __future__ import annotations

import json
from collections.abc import Iterator

from django.db.models import Prefetch
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.decorators import api_view, parser_classes
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from annotation.importing import prompts_import
from annotation.models import Judgment, Membership, Project, StatsSnapshot, TaskCompletion
from annotation.pagination import (
    CURSOR_PARAMETERS,
    OldestFirstCursorPagination,
    api_page,
    paginated_schema,
)
from annotation.roles import Role
from annotation.selectors import (
    assignment_get_for_user,
    assignment_payload,
    judgment_gold_feedback,
    project_get_for_judge,
    project_get_for_user,
    projects_for_user,
)
from annotation.serializers import (
    AssignmentSerializer,
    ConflictSerializer,
    ImportFailureSerializer,
    ImportReportSerializer,
    ImportRequestSerializer,
    JudgmentRequestSerializer,
    JudgmentResponseSerializer,
    ProblemSerializer,
    ProjectSerializer,
    SkipRequestSerializer,
)
from annotation.services import (
    assignment_claim_next,
    assignment_skip,
    judgment_submit,
)
from annotation.snapshots import snapshot_meta, stats_snapshot_get
from config.problems import PROBLEM_CONTENT_TYPE as PROBLEM


def _roles_by_project(request: Request, projects: list[Project]) -> dict[int, set[str]]:
    roles: dict[int, set[str]] = {project.pk: set() for project in projects}
    memberships = Membership.objects.filter(user=request.user, project__in=projects)
    for project_id, role in memberships.values_list("project_id", "role"):
        roles[project_id].add(role)
    if request.user.is_superuser:
        for project_roles in roles.values():
            project_roles.add(Role.MANAGER)
    return roles


@extend_schema(
    responses=paginated_schema(ProjectSerializer, "Project"),
    operation_id="projects_list",
    parameters=CURSOR_PARAMETERS,
)
@api_view(["GET"])
def project_list(request: Request) -> Response:
    """The projects you are a member of, with your roles in each, oldest first, a page at a time."""

    def serialize(projects: list[Project]) -> list[object]:
        context = {"roles_by_project": _roles_by_project(request, projects)}
        return ProjectSerializer(projects, many=True, context=context).data

    return api_page(
        request, projects_for_user(user=request.user), serialize, pagination=OldestFirstCursorPagination
    )


@extend_schema(responses=ProjectSerializer)
@api_view(["GET"])
def project_detail(request: Request, project_id: int) -> Response:
    project = project_get_for_user(user=request.user, pk=project_id)
    context = {"roles_by_project": _roles_by_project(request, [project])}
    return Response(ProjectSerializer(project, context=context).data)


@extend_schema(
    request=None,
    responses={
        200: AssignmentSerializer,
        204: OpenApiResponse(description="Nothing left for you in this project right now."),
    },
)
@api_view(["POST"])
def project_claim_next(request: Request, project_id: int) -> Response:
    """Lease the next task to you. Calling again while you hold a lease returns the same assignment."""
    project = project_get_for_judge(user=request.user, pk=project_id)
    assignment = assignment_claim_next(project=project, user=request.user)
    if assignment is None:
        return Response(status=status.HTTP_204_NO_CONTENT)
    return Response(assignment_payload(assignment=assignment))


@extend_schema(
    request=JudgmentRequestSerializer,
    responses={
        200: JudgmentResponseSerializer,
        201: JudgmentResponseSerializer,
        (400, PROBLEM): ProblemSerializer,
        (409, PROBLEM): ConflictSerializer,
    },
)
@api_view(["POST"])
def assignment_judgment(request: Request, assignment_id: int) -> Response:
    """Submit your answer. 201 when stored, 200 when this client token was stored before,
    409 (with your answer echoed) when the lease ran out and the task was taken over."""
    assignment = assignment_get_for_user(user=request.user, pk=assignment_id)
    serializer = JudgmentRequestSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    result = judgment_submit(assignment=assignment, user=request.user, answer=serializer.to_answer())
    body: dict[str, object] = {
        "judgment": result.judgment.pk,
        "comparisons": result.comparisons,
        "created": result.created,
    }
    if (gold := judgment_gold_feedback(judgment=result.judgment)) is not None:
        body["gold"] = gold
    return Response(body, status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK)


@extend_schema(
    request=SkipRequestSerializer, responses={200: AssignmentSerializer, (409, PROBLEM): ConflictSerializer}
)
@api_view(["POST"])
def assignment_skip_view(request: Request, assignment_id: int) -> Response:
    """Give the task back (with an optional reason); it will not be offered to you again."""
    assignment = assignment_get_for_user(user=request.user, pk=assignment_id)
    serializer = SkipRequestSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    assignment = assignment_skip(assignment=assignment, reason=serializer.validated_data["reason"])
    return Response(assignment_payload(assignment=assignment))


@extend_schema(
    request={"multipart/form-data": ImportRequestSerializer},
    responses={201: ImportReportSerializer, (400, PROBLEM): ImportFailureSerializer},
)
@api_view(["POST"])
@parser_classes([MultiPartParser])
def project_import(request: Request, project_id: int) -> Response:
    """Import prompts (and completions) from a JSONL file. All or nothing: any bad line writes nothing."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    serializer = ImportRequestSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    report = prompts_import(project=project, data=serializer.validated_data["file"])
    return Response(
        {
            "prompts_created": report.prompts_created,
            "completions_created": report.completions_created,
            "policies_created": report.policies_created,
            "tasks_created": report.tasks_created,
            "duplicates": [{"line": line, "reason": reason} for line, reason in report.duplicates],
            "repeated_texts": report.repeated_texts,
            "without_task": [{"line": line, "reason": reason} for line, reason in report.without_task],
        },
        status=status.HTTP_201_CREATED,
    )


@extend_schema(responses={200: OpenApiTypes.OBJECT})
@api_view(["GET"])
def project_stats_view(request: Request, project_id: int) -> Response:
    """Progress, throughput, timing, agreement and gold accuracy of the project.

    Read from the project's snapshot, recomputed in the background a few seconds after new
    judgments; `snapshot` says when it was computed and from how many judgments."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    snapshot = stats_snapshot_get(project=project, kind=StatsSnapshot.Kind.PROJECT)
    return Response({**snapshot.payload, "snapshot": snapshot_meta(snapshot)})


def _judgment_lines(project: Project) -> Iterator[str]:
    judgments = (
        Judgment.objects.filter(task__project=project)
        .select_related("user", "task__prompt")
        .prefetch_related(
            Prefetch(
                "task__items",
                queryset=TaskCompletion.objects.select_related("completion__policy").prefetch_related(
                    "completion__scores"
                ),
            )
        )
        .order_by("id")
    )
    for judgment in judgments.iterator(chunk_size=500):
        items = sorted(judgment.task.items.all(), key=lambda item: item.position)
        row = {
            "judgment": judgment.pk,
            "task": judgment.task_id,
            "prompt_id": judgment.task.prompt.external_id or None,
            "labeler": judgment.user.get_username(),
            # "human", or "model" for a model judge's judgment (training.judges).
            "source": judgment.source,
            "created_at": judgment.created_at.isoformat(),
            "is_gold": judgment.task.is_gold,
            "completions": [
                {
                    "id": str(item.completion.uid),
                    "policy": str(item.completion.policy),
                    "rank": judgment.ranks.get(str(item.completion.uid)),
                    "likert": judgment.likert.get(str(item.completion.uid)),
                    "flags": judgment.flags.get(str(item.completion.uid), []),
                    # What scorers (e.g. an attached reward model) gave it; managers only, like the export.
                    "scores": {score.scorer: score.score for score in item.completion.scores.all()},
                }
                for item in items
            ],
            "none_acceptable": judgment.none_acceptable,
            "rationale": judgment.rationale,
            "active_seconds": judgment.active_seconds,
        }
        yield json.dumps(row, ensure_ascii=False) + "\n"


@extend_schema(responses={(200, "application/x-ndjson"): OpenApiTypes.STR})
@api_view(["GET"])
def project_judgments_export(request: Request, project_id: int) -> StreamingHttpResponse:
    """Every judgment of the project as JSON Lines, streamed (memory does not grow with the project)."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    response = StreamingHttpResponse(_judgment_lines(project), content_type="application/x-ndjson")
    response["Content-Disposition"] = f'attachment; filename="project-{project.pk}-judgments.jsonl"'
    return response
