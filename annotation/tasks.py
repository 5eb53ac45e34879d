"""Celery tasks of the annotation side: thin wrappers over services."""

from __future__ import annotations

from celery import shared_task

from annotation.services import assignments_expire_stale


@shared_task(name="annotation.tasks.assignments_expire_stale")
def assignments_expire_stale_task() -> int:
    """Return lapsed leases to the pool (claims also do this per task; this keeps counts honest)."""
    return assignments_expire_stale()
