"""The Celery app of the placement tests' GPU workers: the production app, whose training runs
start a probe instead of a trainer (`celery -A tests.training.placement_worker worker`).

The probe records the `CUDA_VISIBLE_DEVICES` it was given, then waits until the test lets
it end (a file named after its run appears), then marks its run succeeded. Everything
else — the task, the placement, the claim, the process group — is the production path.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init

from config.celery import app

__all__ = ["app"]


def probe_command(*, run: Any, spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "tests.training.placement_probe", str(run.pk), str(run.attempts)]


@worker_process_init.connect
def probe_instead_of_trainer(**kwargs: Any) -> None:
    # In each pool process, once Django is set up (the services import models).
    import training.services

    training.services.runs.training_run_command = probe_command
