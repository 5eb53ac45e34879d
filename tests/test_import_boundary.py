"""The web process stays light: nothing it loads pulls in the machine-learning stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HEAVY_MODULES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")

# What a web process does: load the WSGI application, then every module of the
# human side (views, admin, API, commands, migrations), then finalize the Celery
# app as publishing a task would.
IMPORT_EVERYTHING_THE_WEB_LOADS = f"""
import importlib, json, pkgutil, sys
import config.wsgi
import annotation
for module in pkgutil.walk_packages(annotation.__path__, "annotation."):
    importlib.import_module(module.name)
from config.celery import app
app.finalize()
print(json.dumps({{
    "annotation": sorted(name for name in sys.modules if name.startswith("annotation.")),
    "heavy": sorted(name for name in {HEAVY_MODULES!r} if name in sys.modules),
}}))
"""


def test_the_web_process_never_imports_torch_or_transformers() -> None:
    # given a fresh interpreter, so nothing an earlier test imported counts
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERYTHING_THE_WEB_LOADS],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    # when it has loaded everything the web side has
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])

    # then the walk really covered the app, and none of the heavy stack came along
    assert {"annotation.views", "annotation.admin", "annotation.management.commands.rundemo"} <= set(
        loaded["annotation"]
    )
    assert loaded["heavy"] == []
