"""Celery tasks of the annotation side: thin wrappers over services."""

from __future__ import annotations

from celery import shared_task

from annotation.services import assignments_expire_stale
from annotation.snapshots import STATS_REFRESH_QUEUE, STATS_REFRESH_TASK, stats_snapshot_refresh


@shared_task(name="annotation.tasks.assignments_expire_stale")
def assignments_expire_stale_task() -> int:
    """Return lapsed leases to the pool (claims also do this per task; this keeps counts honest)."""
    return assignments_expire_stale()


@shared_task(name=STATS_REFRESH_TASK, queue=STATS_REFRESH_QUEUE, ignore_result=True)
def stats_snapshot_refresh_task(project_id: int) -> int:
    """Recompute a project's statistics (and A/B results) into its snapshots; returns how many."""
    return len(stats_snapshot_refresh(project_id=project_id))
