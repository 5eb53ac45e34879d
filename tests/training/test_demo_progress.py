"""The demo model's build shows where it is (step of total, time left) on the console and on a page."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from pytest_django import Settings

from config.demo_progress import (
    demo_progress_line,
    demo_progress_path,
    demo_progress_read,
    demo_progress_write,
)


@pytest.mark.slow
def test_a_build_prints_steps_of_total_with_the_time_left_and_leaves_a_ready_progress_file(
    tmp_path: Path,
) -> None:
    out = StringIO()
    call_command(
        "build_demo_model",
        "--quick",
        "--out",
        str(tmp_path / "demo-sft"),
        "--progress-every",
        "0",
        stdout=out,
    )
    lines = [line for line in out.getvalue().splitlines() if line.startswith("Demo model: step")]
    assert lines[0].startswith("Demo model: step 1 of 30")
    assert any(line.endswith("s left") for line in lines)
    assert lines[-1] == "Demo model: step 30 of 30, measuring its accuracy"
    assert "{'loss'" not in out.getvalue()
    progress = demo_progress_read(demo_progress_path(tmp_path / "demo-sft"))
    assert progress is not None and (progress["status"], progress["step"], progress["total"]) == (
        "ready",
        30,
        30,
    )


def test_the_progress_line_reads_as_a_sentence() -> None:
    assert (
        demo_progress_line({"status": "building", "step": 0, "total": 1500}) == "starting (0 of 1500 steps)"
    )
    assert demo_progress_line({"status": "building", "step": 300, "total": 1500, "seconds_left": 250}) == (
        "step 300 of 1500, about 4 min left"
    )
    assert demo_progress_line({"status": "building", "step": 1490, "total": 1500, "seconds_left": 12.4}) == (
        "step 1490 of 1500, about 12 s left"
    )
    assert demo_progress_line({"status": "failed", "error": "MemoryError: "}) == "failed: MemoryError: "


@pytest.mark.django_db
def test_the_demo_model_page_shows_the_build_while_it_runs_and_says_when_it_is_ready(
    client, manager, settings: Settings, tmp_path: Path
) -> None:
    # given a build half-way through
    settings.MODELS_DIR = tmp_path
    model_dir = tmp_path / "demo-sft"
    demo_progress_write(
        demo_progress_path(model_dir), status="building", step=750, total=1500, seconds_left=120
    )
    client.force_login(manager)

    # when the page is opened, then it shows the step, the time left and a bar, and refreshes itself
    page = client.get("/demo-model/").content.decode()
    assert 'data-state="building"' in page
    assert "step 750 of 1500, about 2 min left" in page
    assert '<progress max="100" value="50"' in page
    assert 'http-equiv="refresh"' in page

    # and once the model is saved it says ready and stops refreshing
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "rankwise_demo.json"):
        (model_dir / name).write_text(json.dumps({}))
    page = client.get("/demo-model/").content.decode()
    assert 'data-state="ready"' in page
    assert 'http-equiv="refresh"' not in page


def test_the_demo_model_page_asks_to_sign_in(client) -> None:
    assert client.get("/demo-model/").status_code == 302
