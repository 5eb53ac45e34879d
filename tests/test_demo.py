"""`manage.py rundemo`: starts Redis, both workers and the web server; Ctrl-C stops them all."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from celery import Celery

from training.demo.stack import port_free

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 60


def answers(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def demo_env(tmp_path: Path, redis_port: int, **overrides: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CELERY_")}
    env.update(
        DEBUG="1",
        DATABASE_URL=f"sqlite:///{tmp_path / 'demo.sqlite3'}",
        REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        VAR_DIR=str(tmp_path / "var"),
        DJANGO_SETTINGS_MODULE="config.settings",
    )
    env.update(overrides)
    return env


def log_tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def rundemo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int, Path]]:
    """A migrated SQLite demo database, then `rundemo` with no Redis running on its port.

    Yields the process, the web port, the Redis port and the log file. Kills
    whatever is left if a test stops half-way.
    """
    web_port, redis_port = port_free(), port_free()
    assert not answers(redis_port)
    env = demo_env(tmp_path, redis_port)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    log_path = tmp_path / "rundemo.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "rundemo", "--port", str(web_port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, web_port, redis_port, log_path
    finally:
        if process.poll() is None:
            leftovers = psutil.Process(process.pid).children(recursive=True)
            process.kill()
            process.wait()
            for child in leftovers:
                child.kill()


def wait_until_ready(
    process: subprocess.Popen[bytes], web_port: int, redis_port: int, log_path: Path
) -> None:
    """Until /healthz is all ok and both workers answer a ping (bounded)."""
    probe = Celery("probe", broker=f"redis://127.0.0.1:{redis_port}/0")
    host = socket.gethostname()
    deadline = time.monotonic() + START_TIMEOUT_S
    health: tuple[int, bytes] | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"rundemo exited with status {process.returncode}:\n{log_tail(log_path)}")
        try:
            health = get(web_port, "/healthz")
        except OSError:
            health = None
        if health and health[0] == 200 and json.loads(health[1]) == {"database": "ok", "broker": "ok"}:
            workers = {name for reply in probe.control.ping(timeout=1) for name in reply}
            if {f"default@{host}", f"gpu@{host}"} <= workers:
                return
        time.sleep(0.5)
    pytest.fail(
        f"rundemo was not ready in {START_TIMEOUT_S} s (last /healthz: {health}):\n{log_tail(log_path)}"
    )


def test_rundemo_starts_everything_and_ctrl_c_stops_every_process_it_started(
    rundemo: tuple[subprocess.Popen[bytes], int, int, Path],
) -> None:
    # given a running demo
    process, web_port, redis_port, log_path = rundemo
    wait_until_ready(process, web_port, redis_port, log_path)
    assert get(web_port, "/accounts/login/")[0] == 200
    children = psutil.Process(process.pid).children(recursive=True)
    command_lines = [" ".join(child.cmdline()) for child in children]
    assert any("redis-server" in line for line in command_lines), command_lines
    assert any("runserver" in line for line in command_lines), command_lines
    for queue in ("default", "gpu"):
        assert any(f"-Q {queue} " in line for line in command_lines), command_lines

    # when Ctrl-C reaches rundemo
    os.kill(process.pid, signal.SIGINT)

    # then it exits cleanly, leaving nothing behind
    assert process.wait(timeout=STOP_TIMEOUT_S) == 0, log_tail(log_path)
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], [" ".join(child.cmdline()) for child in alive]
    assert not answers(web_port)
    assert not answers(redis_port)


def run_rundemo_expecting_failure(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "rundemo", "--port", str(port_free())],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_rundemo_says_what_to_install_when_redis_server_is_not_on_path(tmp_path: Path) -> None:
    # given no Redis on the port and a PATH without redis-server
    env = demo_env(tmp_path, port_free(), PATH=str(Path(sys.executable).parent))

    # when
    result = run_rundemo_expecting_failure(env)

    # then
    assert result.returncode != 0
    assert "no `redis-server` program was found" in result.stderr
    assert "apt-get install redis-server" in result.stderr


def test_rundemo_does_not_try_to_start_redis_for_a_remote_host(tmp_path: Path) -> None:
    # given a REDIS_URL on another machine (a documentation address nobody answers on)
    env = demo_env(tmp_path, port_free(), REDIS_URL="redis://192.0.2.1:6379/0")

    # when
    result = run_rundemo_expecting_failure(env)

    # then
    assert result.returncode != 0
    assert "redis://192.0.2.1:6379/0" in result.stderr
    assert "starts a Redis server only on this machine" in result.stderr
    assert "apt-get install redis-server" in result.stderr


def test_rundemo_demo_serves_at_once_builds_the_model_in_the_background_and_ends_with_address_and_accounts(
    tmp_path: Path,
) -> None:
    # given a migrated demo database without a demo model
    web_port, redis_port = port_free(), port_free()
    env = demo_env(tmp_path, redis_port)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    log_path = tmp_path / "rundemo.log"

    # when the demo starts
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "rundemo", "--demo", "--port", str(web_port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_ready(process, web_port, redis_port, log_path)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Rankwise is running" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)

        # then the login page is served while the model is still being built by a child of the demo
        assert get(web_port, "/accounts/login/")[0] == 200
        children = psutil.Process(process.pid).children(recursive=True)
        assert any("build_demo_model" in " ".join(child.cmdline()) for child in children)
        assert not (tmp_path / "var" / "models" / "demo-sft" / "config.json").exists()
        # and the banner ends with the accounts and the address, together
        text = log_path.read_text()
        banner = text[text.index("Demo accounts") : text.index("Press Ctrl-C to stop.")]
        for username in ("manager", "labeler", "evaluator"):
            assert f"  {username} " in banner
        assert f"http://127.0.0.1:{web_port}/demo-model/" in text[: text.index("Demo accounts")]
        # (the services log to a file, so nothing of theirs comes after it)
        assert "INFO" not in text[text.index("Press Ctrl-C to stop.") :]

        # and Ctrl-C stops the build too
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0, log_tail(log_path)
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], [" ".join(child.cmdline()) for child in alive]
    finally:
        if process.poll() is None:
            leftovers = psutil.Process(process.pid).children(recursive=True)
            process.kill()
            process.wait()
            for child in leftovers:
                child.kill()


def test_a_demo_model_build_killed_from_outside_is_reported_failed_while_the_app_keeps_serving(
    tmp_path: Path,
) -> None:
    # given the demo running with its model building in the background
    web_port, redis_port = port_free(), port_free()
    env = demo_env(tmp_path, redis_port)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    log_path = tmp_path / "rundemo.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "rundemo", "--demo", "--port", str(web_port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_ready(process, web_port, redis_port, log_path)
        build = next(
            child
            for child in psutil.Process(process.pid).children(recursive=True)
            if "build_demo_model" in " ".join(child.cmdline())
        )

        # when the build is killed from outside (as the out-of-memory killer would)
        build.kill()

        # then the demo says the build failed, on the console and in the progress file, and keeps serving
        progress_file = tmp_path / "var" / "models" / "demo-sft.progress.json"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and "failed" not in log_path.read_text():
            time.sleep(0.2)
        assert "Demo model: failed: the build process exited with status -9" in log_path.read_text()
        assert json.loads(progress_file.read_text())["status"] == "failed"
        assert process.poll() is None
        assert get(web_port, "/accounts/login/")[0] == 200
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0, log_tail(log_path)
    finally:
        if process.poll() is None:
            leftovers = psutil.Process(process.pid).children(recursive=True)
            process.kill()
            process.wait()
            for child in leftovers:
                child.kill()
