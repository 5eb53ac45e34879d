"""Celery tasks of the annotation side: thin wrappers over services."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.signals import worker_ready
from django.db import connections

from annotation.services import assignments_expire_stale
from annotation.snapshots import STATS_REFRESH_QUEUE, STATS_REFRESH_TASK, stats_snapshot_refresh
from annotation.webhooks import (
    WEBHOOK_DELIVERY_TASK,
    WEBHOOK_SWEEP_TASK,
    webhook_deliveries_sweep,
    webhook_delivery_attempt,
)


@shared_task(name="annotation.tasks.assignments_expire_stale")
def assignments_expire_stale_task() -> int:
    """Return lapsed leases to the pool (claims also do this per task; this keeps counts honest)."""
    return assignments_expire_stale()


@shared_task(name=STATS_REFRESH_TASK, queue=STATS_REFRESH_QUEUE, ignore_result=True)
def stats_snapshot_refresh_task(project_id: int) -> int:
    """Recompute a project's statistics (and A/B results) into its snapshots; returns how many."""
    return len(stats_snapshot_refresh(project_id=int(project_id)))


@shared_task(name=WEBHOOK_DELIVERY_TASK, queue="default", ignore_result=True)
def webhook_delivery_attempt_task(delivery_id: int) -> str:
    """One attempt at one webhook delivery; the service schedules the next one itself when it fails."""
    return webhook_delivery_attempt(delivery_id=int(delivery_id))


@shared_task(name=WEBHOOK_SWEEP_TASK, queue="default", ignore_result=True)
def webhook_deliveries_sweep_task() -> list[int]:
    """Publish again the webhook deliveries whose message the broker lost (or never took)."""
    return webhook_deliveries_sweep()


@worker_ready.connect
def _webhook_deliveries_sweep_on_start(sender: Any = None, **kwargs: Any) -> None:
    # A worker starting after a broker outage need not wait for beat's next sweep.
    try:
        webhook_deliveries_sweep()
    except Exception:  # a worker must start even when the database is not there yet
        logging.getLogger(__name__).exception("webhook sweep at worker start failed")
    finally:
        # The worker's main process runs no tasks: it keeps no connection open for this one query.
        connections.close_all()
