"""The app's processes on one machine: Redis (when none answers), a Celery worker per queue, the web server.

`manage.py rundemo` and `manage.py simulate_loop` both start them through
`LocalStack`, which stops every process it started, and only those.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import redis
from django.conf import settings

REDIS_INSTALL_STEPS = (
    "  Debian/Ubuntu:  sudo apt-get install redis-server\n"
    "  Fedora:         sudo dnf install redis\n"
    "  macOS:          brew install redis\n"
)
REDIS_INSTALL_HINT = (
    "Redis is not answering at {url} and no `redis-server` program was found on PATH to start one.\n"
    "Install Redis (the `redis-server` program), then run the command again:\n"
    + REDIS_INSTALL_STEPS
    + "or point REDIS_URL at a Redis server you already run."
)
REDIS_REMOTE_HINT = (
    "Redis is not answering at {url}. Rankwise starts a Redis server only on this machine "
    "(a redis:// URL on 127.0.0.1 or localhost);\n"
    "start Redis on that host, or unset REDIS_URL to use a local one.\n"
    "To run Redis on this machine, install it (the `redis-server` program):\n" + REDIS_INSTALL_STEPS
)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


class StackError(RuntimeError):
    """A process of the stack could not start or stopped on its own; the message says which and why."""


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def port_free(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def cpu_share_environment(jobs: int) -> dict[str, str]:
    """Thread counts that share this machine's cores between `jobs` jobs running at once.

    torch (through OpenMP and MKL) starts one thread per core in every job's
    process; several jobs at once on a machine without a GPU would then run
    cores-times-jobs threads that wait for each other. Each job gets its share
    of the cores instead (at least one). Nothing changes for one job at a
    time, nor where the person already chose (OMP_NUM_THREADS set).
    """
    if jobs <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


class LocalStack:
    """Start the app's processes as children, watch them, stop them in order.

    Each child gets its own session, so a terminal's Ctrl-C reaches only the
    parent, which then stops the children: web and workers first (a worker
    finishes its current task), Redis last, since the workers need it until
    they have stopped.
    """

    def __init__(self, *, say: Callable[[str], Any] = print, log: IO[bytes] | None = None) -> None:
        self.say = say
        self.log = log  # children's output goes here; None keeps the terminal's
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        # Children that end by themselves when their work is done (a one-off build).
        self.finite: set[str] = set()

    def spawn(
        self,
        name: str,
        command: list[str],
        *,
        output: IO[bytes] | None = None,
        finite: bool = False,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a child in its own session; `output` overrides the stack's log for this one, `env`
        adds to (or overrides) the environment it inherits."""
        stdout = output if output is not None else self.log
        process = subprocess.Popen(
            command,
            start_new_session=True,
            cwd=settings.BASE_DIR,
            env={**os.environ, **env} if env else None,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
        )
        self.children.append((name, process))
        if finite:
            self.finite.add(name)
        return process

    def start_redis_if_needed(self) -> None:
        url = settings.REDIS_URL
        if redis_answers(url):
            self.say(f"Redis: using the server at {url}")
            return
        parsed = urlparse(url)
        binary = shutil.which("redis-server")
        if parsed.scheme != "redis" or parsed.hostname not in LOCAL_HOSTS:
            raise StackError(REDIS_REMOTE_HINT.format(url=url))
        if binary is None:
            raise StackError(REDIS_INSTALL_HINT.format(url=url))
        port = parsed.port or 6379
        data_dir = Path(settings.VAR_DIR) / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"Redis: none answered at {url}; starting {binary} on port {port}")
        host = "::1" if parsed.hostname == "::1" else "127.0.0.1"
        process = self.spawn(
            "redis",
            [
                binary,
                "--bind",
                host,
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data_dir),
            ],
        )
        deadline = time.monotonic() + 15
        while not redis_answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"redis-server did not start on port {port} (is the port taken?)")
            time.sleep(0.2)

    def start_workers(self, *, beat: bool = True, name_suffix: str = "%h", gpu_jobs: int = 1) -> None:
        """The `default` queue's worker (with the beat) and the `gpu` queue's, running `gpu_jobs` jobs
        at once (one by default, as on a machine with one GPU)."""
        celery = [sys.executable, "-m", "celery", "-A", "config", "worker", "--loglevel", "INFO"]
        default = [*celery, "-Q", "default", "--concurrency", "2", "-n", f"default@{name_suffix}"]
        self.spawn("worker-default", [*default, "--beat"] if beat else default)
        self.spawn(
            "worker-gpu",
            [*celery, "-Q", "gpu", "--concurrency", str(gpu_jobs), "-n", f"gpu@{name_suffix}"],
            env=cpu_share_environment(gpu_jobs),
        )

    def start_web(self, host: str, port: int) -> None:
        self.spawn("web", [sys.executable, "manage.py", "runserver", f"{host}:{port}", "--noreload"])

    def wait_healthy(self, base_url: str, *, timeout_s: float = 60) -> None:
        """Wait until /healthz says the database and the broker answer (or a child died)."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{base_url}/healthz", timeout=5) as response:  # noqa: S310 (local URL)
                    if json.loads(response.read()) == {"database": "ok", "broker": "ok"}:
                        return
            except (urllib.error.URLError, OSError, ValueError) as error:
                last = str(error)
            time.sleep(0.5)
        raise StackError(f"the web server at {base_url} was not healthy after {timeout_s:.0f} s ({last})")

    def exit_status(self, name: str) -> int | None:
        """The exit status of the named child once it has ended (None while it runs)."""
        for child_name, process in self.children:
            if child_name == name:
                return process.poll()
        return None

    def check_alive(self) -> None:
        """Raise for a service that stopped; a one-off child reports its own end (its progress file)."""
        for name, process in self.children:
            if name not in self.finite and process.poll() is not None:
                raise StackError(f"{name} exited with status {process.returncode}")

    def stop_all(self) -> None:
        redis_children = [child for child in self.children if child[0] == "redis"]
        others = [child for child in self.children if child[0] != "redis"]
        for group in (others, redis_children):
            for _name, process in group:
                if process.poll() is None:
                    process.terminate()
            for name, process in group:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.say(f"{name} did not stop in 30 s; killing it")
                    process.kill()
                    process.wait()
        self.children.clear()
