"""The event protocol of GPU child programs, and the child's side of its link to the supervisor
(no Django, no torch): whole lines only, heartbeats from the start, a stop when the supervisor dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from training.events import (
    EVENTS_FILE_ENV,
    HEARTBEAT_ENV,
    STOP_FILE_ENV,
    SUPERVISOR_ENV,
    EventReader,
    EventWriter,
    process_alive,
    process_identity,
)
from training.gpu_job_process import EXIT_ORPHANED

WAIT_S = 60


def test_the_reader_returns_each_whole_line_once_and_keeps_a_half_written_one_for_later(
    tmp_path: Path,
) -> None:
    # given a writer and a reader on one file
    path = tmp_path / "events.jsonl"
    writer, reader = EventWriter(path), EventReader(path)
    writer.emit("started", total_steps=4)
    writer.emit("progress", step=1, total_steps=4, metrics={"loss": float("nan"), "lr": 0.5})

    # when a line is only half written
    with path.open("ab") as file:
        file.write(b'{"event": "log", "li')
    first = reader.read()
    with path.open("ab") as file:
        file.write(b'ne": "hello"}\n')
    second = reader.read()

    # then every event comes once, whole, and NaN (no JSON for it) is None
    assert [event["event"] for event in first] == ["started", "progress"]
    assert first[1]["metrics"] == {"loss": None, "lr": 0.5}
    assert [(event["event"], event["line"]) for event in second] == [("log", "hello")]
    assert reader.read() == []


def test_an_unknown_event_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown event"):
        EventWriter(tmp_path / "events.jsonl").emit("finished")


def test_a_process_is_named_by_its_pid_and_start_time() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = process_identity(process.pid)
        assert process_alive(identity)
        assert process_alive(process_identity())
        # the same pid with another start time is another process
        assert not process_alive(f"{process.pid}:1")
    finally:
        process.kill()
        process.wait()
    assert not process_alive(identity)


CHILD = """
import sys, time
from training.gpu_job_process import ChildChannel
channel = ChildChannel()
channel.start()
while not channel.cancel_asked():
    time.sleep(0.05)
channel.emit("stopped", cause="cancel")
channel.stop()
"""


def start_child(tmp_path: Path, supervisor: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        EVENTS_FILE_ENV: str(tmp_path / "events.jsonl"),
        STOP_FILE_ENV: str(tmp_path / "stop"),
        SUPERVISOR_ENV: supervisor,
        HEARTBEAT_ENV: "0.1",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def events_of(tmp_path: Path) -> list[str]:
    path = tmp_path / "events.jsonl"
    return [json.loads(line)["event"] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_child_heartbeats_from_its_start_and_stops_when_its_supervisor_is_gone(tmp_path: Path) -> None:
    # given a child whose supervisor is a process of its own
    supervisor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    child = start_child(tmp_path, process_identity(supervisor.pid))
    try:
        deadline = time.monotonic() + WAIT_S
        while events_of(tmp_path).count("heartbeat") < 3:
            assert time.monotonic() < deadline, "no heartbeats"
            assert child.poll() is None, child.communicate()[0]
            time.sleep(0.05)

        # when the supervisor is killed
        supervisor.kill()
        supervisor.wait()
        output, _ = child.communicate(timeout=WAIT_S)
    finally:
        for process in (supervisor, child):
            if process.poll() is None:
                process.kill()
                process.wait()

    # then the child stopped by itself, at once, without reporting an outcome
    assert child.returncode == EXIT_ORPHANED, output
    assert "supervisor" in output
    assert set(events_of(tmp_path)) == {"heartbeat"}


def test_a_cancel_reaches_the_child_through_the_stop_file(tmp_path: Path) -> None:
    child = start_child(tmp_path, process_identity())
    try:
        (tmp_path / "stop").touch()
        output, _ = child.communicate(timeout=WAIT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, output
    assert "stopped" in events_of(tmp_path)
