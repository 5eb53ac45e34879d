"""Pages people use. Each view finds objects through the access helpers in
selectors (404 for what a person may not see) and calls one service."""

from __future__ import annotations

from datetime import date
from typing import Any

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext
from django.views.decorators.http import require_GET, require_POST

from annotation.models import Judgment, Project, StatsSnapshot
from annotation.pagination import page_of, page_query
from annotation.rendering import markdown_to_safe_html
from annotation.review import (
    JudgmentNotRevisable,
    ReviewConflict,
    ReviewFilters,
    judgment_as_seen,
    judgment_get_for_labeler,
    judgment_get_for_reviewer,
    judgment_review,
    judgment_revise,
    judgments_of_labeler,
    project_get_for_reviewer,
    projects_for_reviewer,
    review_queue,
)
from annotation.roles import Role, role_required
from annotation.selectors import (
    ab_session_get_for_manager,
    assignment_items_in_display_order,
    judgments_today_count,
    project_fraction_done,
    project_get_for_judge,
    project_get_for_user,
    projects_for_user,
    projects_fraction_done,
)
from annotation.services import JudgmentInput, JudgmentInvalid, assignment_claim_next
from annotation.snapshots import snapshot_meta, stats_refresh_now, stats_snapshot_get


def _project_rows(request: HttpRequest, projects: QuerySet[Project]) -> dict[str, Any]:
    """One page of a list of projects, each with its share done, in a fixed number of queries."""
    page = page_of(request, projects)
    fractions = projects_fraction_done(projects=page.object_list)
    rows = [{"project": project, "fraction_done": fractions[project.pk]} for project in page.object_list]
    return {"rows": rows, "page_obj": page, "page_query": page_query(request)}


@login_required
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "annotation/home.html")


@role_required(Role.LABELER)
def label(request: HttpRequest) -> HttpResponse:
    projects = projects_for_user(user=request.user, role=Role.LABELER).filter(
        kind=Project.Kind.RANKING, is_active=True
    )
    context = {**_project_rows(request, projects), "done_today": judgments_today_count(user=request.user)}
    return render(request, "annotation/label.html", context)


@require_GET
@role_required(Role.LABELER)
def label_project(request: HttpRequest, project_id: int) -> HttpResponse:
    """The ranking page's shell; static/js/rank.js claims and shows tasks in it."""
    project = project_get_for_judge(user=request.user, pk=project_id)
    context = {"project": project, "instructions_html": markdown_to_safe_html(project.instructions)}
    return render(request, "annotation/rank.html", context)


@require_POST
@role_required(Role.LABELER)
def label_next(request: HttpRequest, project_id: int) -> HttpResponse:
    """Claim the next task (or the one already leased) and return it as an HTML fragment."""
    project = project_get_for_judge(user=request.user, pk=project_id)
    assignment = assignment_claim_next(project=project, user=request.user)
    context = {
        "project": project,
        "assignment": assignment,
        "done_today": judgments_today_count(user=request.user, project=project),
        "fraction_done": project_fraction_done(project=project),
    }
    if assignment is not None:
        items = assignment_items_in_display_order(assignment=assignment)
        context["cards"] = [
            {"uid": str(item.completion.uid), "letter": chr(ord("A") + index), "text": item.completion.text}
            for index, item in enumerate(items)
        ]
        context["ranks"] = range(1, len(items) + 1)
        context["likert_scale"] = range(1, 8)
        context["prompt"] = assignment.task.prompt
        context["lease_expires_at"] = assignment.lease_expires_at
        context["now"] = timezone.now()
    return render(request, "annotation/_rank_task.html", context)


@role_required(Role.EVALUATOR)
def evaluate(request: HttpRequest) -> HttpResponse:
    projects = projects_for_user(user=request.user, role=Role.EVALUATOR).filter(
        kind=Project.Kind.AB, is_active=True
    )
    return render(request, "annotation/evaluate.html", _project_rows(request, projects))


@require_GET
@role_required(Role.EVALUATOR)
def evaluate_project(request: HttpRequest, project_id: int) -> HttpResponse:
    """The blind A/B page's shell; static/js/ab.js claims and shows the pairs in it."""
    project = project_get_for_judge(user=request.user, pk=project_id)
    context = {"project": project, "instructions_html": markdown_to_safe_html(project.instructions)}
    return render(request, "annotation/ab.html", context)


@require_POST
@role_required(Role.EVALUATOR)
def evaluate_next(request: HttpRequest, project_id: int) -> HttpResponse:
    """Claim the next pair and return it as an HTML fragment that names no policy."""
    project = project_get_for_judge(user=request.user, pk=project_id)
    assignment = assignment_claim_next(project=project, user=request.user)
    context: dict[str, object] = {
        "project": project,
        "assignment": assignment,
        "done_today": judgments_today_count(user=request.user, project=project),
        "fraction_done": project_fraction_done(project=project),
    }
    if assignment is not None:
        left, right = (item.completion for item in assignment_items_in_display_order(assignment=assignment))
        context.update(
            left=left,
            right=right,
            identical=left.text.strip() == right.text.strip(),
            prompt=assignment.task.prompt,
            lease_expires_at=assignment.lease_expires_at,
        )
    return render(request, "annotation/_ab_task.html", context)


@require_GET
@role_required(Role.MANAGER)
def ab_results(request: HttpRequest, project_id: int) -> HttpResponse:
    """Win rates, ratings with intervals, position bias, and agreement of the evaluators and of scorers.

    Read from the session's snapshot (annotation.snapshots), computed by a background task.
    """
    from annotation.chart_data import interval_chart

    project = ab_session_get_for_manager(user=request.user, pk=project_id)
    snapshot = stats_snapshot_get(project=project, kind=StatsSnapshot.Kind.AB)
    results = snapshot.payload
    ratings = results["ratings"]
    context = {
        **results,
        "project": project,
        "snapshot": snapshot_meta(snapshot),
        "snapshot_at": snapshot.computed_at,
        "ratings_chart": interval_chart(
            rows=[
                {"label": row["policy"], "value": row["rating"], "low": row["low"], "high": row["high"]}
                for row in ratings
            ],
            value_label=gettext("Rating"),
            interval_label=gettext("Interval"),
        ),
        "several_pairs": len(results["pairs"]) > 1,
    }
    return render(request, "annotation/ab_results.html", context)


@require_POST
@role_required(Role.MANAGER)
def project_stats_refresh(request: HttpRequest, project_id: int) -> HttpResponse:
    """A manager's "Refresh" of the statistics: the background task runs at once."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    if stats_refresh_now(project=project):
        messages.success(request, gettext("The figures are being recomputed; reload the page in a moment."))
    else:
        messages.error(
            request, gettext("The job queue cannot be reached, so the figures were not recomputed.")
        )
    if request.POST.get("next") == "results" and project.kind == Project.Kind.AB:
        return redirect("ab-results", project.pk)
    return redirect("project-dashboard", project.pk)


@role_required(Role.MANAGER)
def manage(request: HttpRequest) -> HttpResponse:
    projects = projects_for_user(user=request.user, role=Role.MANAGER)
    return render(request, "annotation/manage.html", _project_rows(request, projects))


@require_GET
@role_required(Role.MANAGER)
def project_dashboard(request: HttpRequest, project_id: int) -> HttpResponse:
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    snapshot = stats_snapshot_get(project=project, kind=StatsSnapshot.Kind.PROJECT)
    stats = snapshot.payload
    context = {
        "project": project,
        "stats": stats,
        "snapshot": snapshot_meta(snapshot),
        "snapshot_at": snapshot.computed_at,
        "charts": dashboard_charts(stats=stats, project=project),
    }
    return render(request, "annotation/dashboard.html", context)


def dashboard_charts(*, stats: dict, project: Project) -> dict[str, object]:
    from annotation.chart_data import category_chart

    days = stats["judgments_per_day"]
    cumulative, total = [], 0
    for day in days:
        total += day["judgments"]
        cumulative.append(total)
    wanted = stats["progress"]["judgments_wanted"]
    labelers = [row for row in stats["labelers"] if row["agreement_rate"] is not None]
    day_labels = [day["date"] for day in days]
    return {
        "throughput": category_chart(
            kind="bar",
            labels=day_labels,
            series=[{"label": gettext("Judgments"), "values": [day["judgments"] for day in days]}],
            integer=True,
        ),
        "progress": category_chart(
            kind="line",
            labels=day_labels,
            series=[{"label": gettext("Judgments stored"), "values": cumulative}],
            integer=True,
            target=wanted or None,
            target_label=gettext("judgments wanted"),
        ),
        "agreement": category_chart(
            kind="bar",
            labels=[row["username"] for row in labelers],
            series=[
                {
                    "label": gettext("Agreement with others"),
                    "values": [row["agreement_rate"] for row in labelers],
                }
            ],
            percent=True,
        ),
    }


# --- review ----------------------------------------------------------------------------

REVIEW_PAGE_SIZE = 50


def _review_filters(query: Any) -> ReviewFilters:
    """The queue's filters from the query string; a value that does not parse is ignored."""

    def day(name: str) -> date | None:
        try:
            return date.fromisoformat(query.get(name, ""))
        except ValueError:
            return None

    review = query.get("review", Judgment.Review.PENDING)
    labeler = query.get("labeler", "")
    gold = {"yes": True, "no": False}.get(query.get("gold", ""))
    return ReviewFilters(
        review=review if review in Judgment.Review.values else "",
        labeler_id=int(labeler) if labeler.isdigit() else None,
        date_from=day("from"),
        date_to=day("to"),
        gold=gold,
        disagreeing=query.get("disagreeing") == "yes",
    )


@login_required
def review(request: HttpRequest) -> HttpResponse:
    """The projects whose judgments the person reviews (as reviewer or manager)."""
    projects = projects_for_reviewer(user=request.user)
    return render(request, "annotation/review_projects.html", {"projects": projects})


@require_GET
@login_required
def review_project(request: HttpRequest, project_id: int) -> HttpResponse:
    """The review queue: each judgment as its labeler saw it, filtered, with accept and reject."""
    project = project_get_for_reviewer(user=request.user, pk=project_id)
    filters = _review_filters(request.GET)
    judgments = list(review_queue(project=project, filters=filters)[:REVIEW_PAGE_SIZE])
    context = {
        "project": project,
        "filters": filters,
        "rows": [
            {"judgment": judgment, "responses": judgment_as_seen(judgment=judgment)} for judgment in judgments
        ],
        "labelers": get_user_model()
        .objects.filter(judgments__task__project=project)
        .distinct()
        .order_by("username"),
        "reviews": Judgment.Review.choices,
        "query": request.GET.urlencode(),
        "page_size": REVIEW_PAGE_SIZE,
    }
    return render(request, "annotation/review.html", context)


@require_POST
@login_required
def review_decide(request: HttpRequest, judgment_id: int) -> HttpResponse:
    """Accept or reject one judgment, then back to the queue with the same filters."""
    judgment = judgment_get_for_reviewer(user=request.user, pk=judgment_id)
    accept = request.POST.get("decision") == "accept"
    try:
        judgment_review(
            judgment=judgment, reviewer=request.user, accept=accept, reason=request.POST.get("reason", "")
        )
    except ValidationError:
        messages.error(request, gettext("Say why you reject the judgment."))
    except ReviewConflict:
        messages.warning(request, gettext("Someone reviewed this judgment first; it is unchanged."))
    else:
        if accept:
            messages.success(request, gettext("Judgment accepted."))
        else:
            messages.success(request, gettext("Judgment rejected: its task is open to someone else."))
    # Only our own filter names travel back, re-encoded: never a URL from the request.
    query = QueryDict(mutable=True)
    for name in ("review", "labeler", "from", "to", "gold", "disagreeing"):
        if value := request.POST.get(f"filter_{name}", ""):
            query[name] = value
    target = reverse("review-project", args=[judgment.task.project_id])
    return redirect(f"{target}?{query.urlencode()}" if query else target)


# --- a labeler's history and revisions ---------------------------------------------------

HISTORY_PAGE_SIZE = 100


@login_required
def label_history(request: HttpRequest) -> HttpResponse:
    """The person's own judgments, newest first, with their review and a way to revise the unreviewed."""
    judgments = list(judgments_of_labeler(user=request.user)[:HISTORY_PAGE_SIZE])
    rows = [
        {"judgment": judgment, "responses": judgment_as_seen(judgment=judgment)} for judgment in judgments
    ]
    return render(request, "annotation/label_history.html", {"rows": rows, "page_size": HISTORY_PAGE_SIZE})


@login_required
def label_revise(request: HttpRequest, judgment_id: int) -> HttpResponse:
    """Change a judgment not yet reviewed: the same answer fields as the ranking page, as a plain form."""
    judgment = judgment_get_for_labeler(user=request.user, pk=judgment_id)
    project = judgment.task.project
    responses = judgment_as_seen(judgment=judgment)
    uids = [
        str(item.completion.uid) for item in assignment_items_in_display_order(assignment=judgment.assignment)
    ]
    errors: dict[str, str] = {}
    if request.method == "POST":

        def number(name: str) -> int | None:
            value = request.POST.get(name, "")
            return int(value) if value.isdigit() else None

        ranks = {uid: rank for uid in uids if (rank := number(f"rank_{uid}")) is not None}
        likert = {uid: value for uid in uids if (value := number(f"likert_{uid}")) is not None}
        flags = {
            uid: request.POST.getlist(f"flags_{uid}") for uid in uids if request.POST.getlist(f"flags_{uid}")
        }
        answer = JudgmentInput(
            ranks=ranks,
            likert=likert if project.likert_enabled else {},
            flags=flags,
            none_acceptable=request.POST.get("none_acceptable") == "on",
            rationale=request.POST.get("rationale", ""),
            client_token=judgment.client_token,
        )
        try:
            judgment_revise(judgment=judgment, user=request.user, answer=answer)
        except JudgmentNotRevisable as error:
            messages.warning(request, str(error))
            return redirect("label-history")
        except JudgmentInvalid as error:
            errors = error.errors
        else:
            messages.success(request, gettext("Your judgment is revised."))
            return redirect("label-history")
    for response, uid in zip(responses, uids, strict=True):
        response["uid"] = uid
    context = {
        "judgment": judgment,
        "project": project,
        "responses": responses,
        "rank_choices": range(1, len(uids) + 1),
        "likert_choices": range(1, 8),
        "errors": errors,
    }
    return render(request, "annotation/label_revise.html", context, status=400 if errors else 200)
