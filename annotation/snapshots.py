"""Statistics off the request path: snapshots computed by a Celery task, read by pages and the API.

Loading a whole project (annotation.stats) or fitting a bootstrap of
Bradley–Terry ratings (annotation.ab_stats) takes seconds at a million
judgments, so neither happens in a request. A task computes them into one
StatsSnapshot row per project and kind; the dashboard, the A/B results page
and `GET /api/projects/{id}/stats` read that row and show when it was
computed.

1. A stored judgment asks for a refresh after its transaction commits
   (`stats_refresh_request`). The snapshot's `refresh_requested_at` is set by
   compare-and-set; only the request that set it schedules the task, with a
   countdown, so a burst of judgments makes one refresh (debounce). A flag
   older than `REFRESH_FLAG_EXPIRY` is taken as lost (a worker died) and set
   again.
2. The task clears the flag as it starts (judgments arriving while it computes
   schedule the next one), computes and stores the payload.
3. A project with no snapshot yet is computed in the request that first asks
   (`stats_snapshot_get`), stored, and marked as computed in that request so
   the page can say so.
4. Managers refresh on demand (`stats_refresh_now`), which schedules the task
   at once.

This module imports neither the statistics nor scipy at import time: the
submit path only needs `stats_refresh_request`.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from annotation.models import Project, StatsSnapshot

logger = logging.getLogger(__name__)

STATS_REFRESH_TASK = "annotation.tasks.stats_snapshot_refresh"
STATS_REFRESH_QUEUE = "default"
# Judgments arriving within this many seconds share one refresh.
REFRESH_DELAY_SECONDS = 5
REFRESH_FLAG_EXPIRY = timedelta(minutes=10)
AB_BOOTSTRAP_ROUNDS = 1000


def snapshot_kinds(*, project: Project) -> list[str]:
    """The snapshots a project has: its statistics, and its A/B results for an A/B session."""
    kinds = [StatsSnapshot.Kind.PROJECT]
    if project.kind == Project.Kind.AB:
        kinds.append(StatsSnapshot.Kind.AB)
    return [str(kind) for kind in kinds]


def ab_results_compute(*, project: Project) -> dict[str, Any]:
    """What the A/B results page shows, as one JSON-serialisable dict."""
    from annotation.ab_stats import bradley_terry_ratings, pair_table, position_bias, scorer_agreement
    from annotation.selectors import ab_scored_votes, ab_votes, completion_scores, project_completion_count
    from annotation.stats import pairwise_agreement

    votes = ab_votes(project=project)
    scores = completion_scores(project=project)
    scorers = scorer_agreement(ab_scored_votes(project=project), scores)
    for row in scorers:
        row["scored"] = len(scores[str(row["scorer"])])
    return {
        "votes_total": len(votes),
        "pairs": pair_table(votes),
        "ratings": bradley_terry_ratings(votes, rounds=AB_BOOTSTRAP_ROUNDS),
        "bias": position_bias(votes),
        "agreement": pairwise_agreement(project=project),
        "rounds": AB_BOOTSTRAP_ROUNDS,
        "scorers": scorers,
        "completions_total": project_completion_count(project=project),
    }


def _compute(*, project: Project, kind: str) -> tuple[dict[str, Any], int]:
    """The payload of one kind and the number of submitted judgments it was computed from."""
    from annotation.stats import project_stats

    if kind == StatsSnapshot.Kind.AB:
        payload = ab_results_compute(project=project)
        return payload, int(payload["votes_total"])
    payload = project_stats(project=project)
    return payload, int(payload["progress"]["judgments_total"])


def _json_ready(value: Any) -> Any:
    """Plain JSON types: numpy scalars and tuples (from the statistics) read back the same from the row."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    return value


def stats_snapshot_compute(*, project: Project, kind: str) -> StatsSnapshot:
    """Compute one snapshot now and store it (replacing the previous one)."""
    started = time.perf_counter()
    payload, seen = _compute(project=project, kind=kind)
    values = {
        "payload": _json_ready(payload),
        "computed_at": timezone.now(),
        "judgments_seen": seen,
        "compute_seconds": time.perf_counter() - started,
    }
    try:
        with transaction.atomic():
            snapshot, _created = StatsSnapshot.objects.update_or_create(
                project=project, kind=kind, defaults=values
            )
    except IntegrityError:  # another process created the row first; ours is as new
        StatsSnapshot.objects.filter(project=project, kind=kind).update(**values)
        snapshot = StatsSnapshot.objects.get(project=project, kind=kind)
    return snapshot


def stats_snapshot_refresh(*, project_id: int) -> list[StatsSnapshot]:
    """The task's work: clear the refresh flags, then compute every snapshot of the project."""
    project = Project.objects.filter(pk=project_id).first()
    if project is None:  # deleted since the refresh was asked for
        return []
    StatsSnapshot.objects.filter(project=project).update(refresh_requested_at=None)
    return [stats_snapshot_compute(project=project, kind=kind) for kind in snapshot_kinds(project=project)]


def stats_snapshot_get(*, project: Project, kind: str) -> StatsSnapshot:
    """The stored snapshot; a project without one yet gets it computed now.

    The returned row has `computed_in_request` set, True when this request
    paid for the computation (the page says so).
    """
    snapshot = StatsSnapshot.objects.filter(project=project, kind=kind).first()
    if snapshot is not None:
        snapshot.computed_in_request = False  # type: ignore[attr-defined]
        return snapshot
    snapshot = stats_snapshot_compute(project=project, kind=kind)
    snapshot.computed_in_request = True  # type: ignore[attr-defined]
    return snapshot


def _publish(*, project_id: int, countdown: int) -> bool:
    from config.celery import app as celery_app

    try:
        celery_app.send_task(
            STATS_REFRESH_TASK, args=(project_id,), queue=STATS_REFRESH_QUEUE, countdown=countdown
        )
    except Exception:  # kombu raises several kinds when the broker is gone
        logger.warning("could not schedule a statistics refresh of project %s", project_id, exc_info=True)
        return False
    return True


def stats_refresh_request(*, project_id: int) -> bool:
    """Ask for a refresh after new judgments; True when this call scheduled the task.

    Called after the judgment's transaction commits: one short UPDATE, and a
    publish only when no refresh is pending. A project with no snapshot yet
    has nothing to refresh (its first reader computes it).
    """
    now = timezone.now()
    flagged = StatsSnapshot.objects.filter(
        Q(refresh_requested_at__isnull=True) | Q(refresh_requested_at__lt=now - REFRESH_FLAG_EXPIRY),
        project_id=project_id,
    ).update(refresh_requested_at=now)
    if not flagged:
        return False
    if not _publish(project_id=project_id, countdown=REFRESH_DELAY_SECONDS):
        # Let the next judgment try again rather than wait for the flag to expire.
        StatsSnapshot.objects.filter(project_id=project_id, refresh_requested_at=now).update(
            refresh_requested_at=None
        )
        return False
    return True


def stats_refresh_now(*, project: Project) -> bool:
    """A manager's "Refresh": schedule the task at once; False when the job queue cannot be reached."""
    StatsSnapshot.objects.filter(project=project).update(refresh_requested_at=timezone.now())
    return _publish(project_id=project.pk, countdown=0)


def snapshot_meta(snapshot: StatsSnapshot) -> dict[str, Any]:
    """When and from how much a snapshot was computed, for pages and the API."""
    return {
        "computed_at": snapshot.computed_at.isoformat(),
        "judgments_seen": snapshot.judgments_seen,
        "compute_seconds": round(snapshot.compute_seconds, 3),
        "computed_in_request": bool(getattr(snapshot, "computed_in_request", False)),
        "refresh_pending": snapshot.refresh_requested_at is not None,
    }
