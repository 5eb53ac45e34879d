"""Progress of a demo model build, written by `build_demo_model` and read by `rundemo` and the demo model page.

Kept apart from training.demo.model so that reading it imports nothing heavy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from django.conf import settings

DEMO_REPORT_FILENAME = "rankwise_demo.json"
# Files whose presence makes a saved demo model complete; the report is
# written last, so a build that died part-way never counts as done.
DEMO_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", DEMO_REPORT_FILENAME)


def demo_model_dir() -> Path:
    """Where `make demo` builds the demo SFT policy."""
    return Path(settings.MODELS_DIR) / "demo-sft"


def demo_progress_path(out_dir: Path) -> Path:
    """Where a build into `out_dir` writes its progress: beside the model folder."""
    return Path(out_dir).with_name(Path(out_dir).name + ".progress.json")


def demo_progress_write(path: Path, **fields: Any) -> None:
    """Replace the progress file whole (write, then rename), so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps({**fields, "updated_at": time.time()}) + "\n")
    staging.replace(path)


def demo_progress_read(path: Path) -> dict[str, Any] | None:
    """The last progress written, or None when no build has started."""
    try:
        return dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return None


def demo_progress_line(progress: dict[str, Any]) -> str:
    """One line for people: 'step 120 of 1500, about 4 min left'."""
    status = progress.get("status")
    if status == "ready":
        return "ready"
    if status == "failed":
        return f"failed: {progress.get('error', 'unknown error')}"
    step, total = int(progress.get("step", 0)), int(progress.get("total", 0))
    if not total:
        return "starting"
    if step == 0:
        return f"starting (0 of {total} steps)"
    left = progress.get("seconds_left")
    if step >= total:
        when = "measuring its accuracy"
    elif left is None:
        when = "estimating the time left"
    elif left < 90:
        when = f"about {round(left)} s left"
    else:
        when = f"about {round(left / 60)} min left"
    return f"step {step} of {total}, {when}"


def demo_model_is_complete(out_dir: Path) -> bool:
    return all((Path(out_dir) / name).is_file() for name in DEMO_MODEL_FILES)
