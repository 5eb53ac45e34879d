"""A training run's stand-in for the placement tests: `python -m tests.training.placement_probe RUN ATTEMPT`.

Appends `start RUN DEVICES` to $PLACEMENT_RECORD once running (its cards are held by then),
waits for $PLACEMENT_RELEASE_DIR/RUN, appends `end RUN DEVICES` (its cards are still held),
and marks its attempt succeeded.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def record(line: str) -> None:
    # One short append per line: lines from concurrent probes never interleave.
    with open(os.environ["PLACEMENT_RECORD"], "a") as file:
        file.write(line + "\n")


def main() -> None:
    run_id, attempt = int(sys.argv[1]), int(sys.argv[2])
    devices = os.environ["CUDA_VISIBLE_DEVICES"]
    record(f"start {run_id} {devices}")
    release = Path(os.environ["PLACEMENT_RELEASE_DIR"], str(run_id))
    while not release.exists():
        time.sleep(0.05)
    record(f"end {run_id} {devices}")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from training.models import TrainingRun

    TrainingRun.objects.filter(pk=run_id, attempts=attempt, status="running").update(status="succeeded")


if __name__ == "__main__":
    main()
