"""The Celery application: Redis broker, JSON only, queues `default` and `gpu`.

Start workers with, for instance:

    celery -A config worker -Q default --concurrency 2
    RANKWISE_GPUS=0,1 celery -A config worker -Q gpu --concurrency 2 -n gpu-0-1@%h   # per set of GPUs

All settings live in ``config/settings.py`` under the ``CELERY_`` prefix.
"""

from __future__ import annotations

import os
import socket

from celery import Celery
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("rankwise")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_queues = (Queue("default"), Queue("gpu"))
app.autodiscover_tasks()


@app.task(name="rankwise.ping", ignore_result=False)
def ping() -> dict[str, str]:
    """Answer with the worker's host name; used to check a worker is consuming."""
    return {"pong": socket.gethostname()}
