"""Run everything the demo needs in one terminal: Redis (if none answers),
Celery workers for the `default` and `gpu` queues, and the web server.

Ctrl-C (or SIGTERM) stops every process this command started, and only those.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlparse

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

REDIS_INSTALL_STEPS = (
    "  Debian/Ubuntu:  sudo apt-get install redis-server\n"
    "  Fedora:         sudo dnf install redis\n"
    "  macOS:          brew install redis\n"
)
REDIS_INSTALL_HINT = (
    "Redis is not answering at {url} and no `redis-server` program was found on PATH to start one.\n"
    "Install Redis (the `redis-server` program), then run `make demo` again:\n"
    + REDIS_INSTALL_STEPS
    + "or point REDIS_URL at a Redis server you already run."
)
REDIS_REMOTE_HINT = (
    "Redis is not answering at {url}. rundemo starts a Redis server only on this machine "
    "(a redis:// URL on 127.0.0.1 or localhost);\n"
    "start Redis on that host, or unset REDIS_URL to use a local one.\n"
    "To run Redis on this machine, install it (the `redis-server` program):\n" + REDIS_INSTALL_STEPS
)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


class Command(BaseCommand):
    help = "Start Redis if needed, a Celery worker per queue and the web server; Ctrl-C stops them all."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)

    def handle(self, *args: Any, **options: Any) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = False
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            self._start_redis_if_needed()
            self._start_workers()
            self._start_web(options["host"], options["port"])
            self.stdout.write(
                self.style.SUCCESS(
                    f"\nRankwise is running on http://{options['host']}:{options['port']}/ "
                    f"(health: http://{options['host']}:{options['port']}/healthz). Press Ctrl-C to stop.\n"
                )
            )
            self._watch()
        finally:
            self._stop_all()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        # Each child gets its own session so the terminal's Ctrl-C reaches
        # only this command, which then stops the children in order.
        process = subprocess.Popen(command, start_new_session=True, cwd=settings.BASE_DIR)
        self.children.append((name, process))
        return process

    def _start_redis_if_needed(self) -> None:
        url = settings.REDIS_URL
        if redis_answers(url):
            self.stdout.write(f"Redis: using the server at {url}")
            return
        parsed = urlparse(url)
        binary = shutil.which("redis-server")
        if parsed.scheme != "redis" or parsed.hostname not in LOCAL_HOSTS:
            raise CommandError(REDIS_REMOTE_HINT.format(url=url))
        if binary is None:
            raise CommandError(REDIS_INSTALL_HINT.format(url=url))
        port = parsed.port or 6379
        data_dir = Path(settings.VAR_DIR) / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.stdout.write(f"Redis: none answered at {url}; starting {binary} on port {port}")
        process = self._spawn(
            "redis",
            [
                binary,
                "--bind",
                "::1" if parsed.hostname == "::1" else "127.0.0.1",
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
                raise CommandError(f"redis-server did not start on port {port} (is the port taken?)")
            time.sleep(0.2)

    def _start_workers(self) -> None:
        celery = [sys.executable, "-m", "celery", "-A", "config", "worker", "--loglevel", "INFO"]
        self._spawn(
            "worker-default", [*celery, "-Q", "default", "--concurrency", "2", "-n", "default@%h", "--beat"]
        )
        # One GPU job at a time per worker, as on a real GPU machine.
        self._spawn("worker-gpu", [*celery, "-Q", "gpu", "--concurrency", "1", "-n", "gpu@%h"])

    def _start_web(self, host: str, port: int) -> None:
        self._spawn("web", [sys.executable, "manage.py", "runserver", f"{host}:{port}", "--noreload"])

    def _watch(self) -> None:
        while not self.stopping:
            for name, process in self.children:
                if process.poll() is not None:
                    raise CommandError(f"{name} exited with status {process.returncode}; stopping the demo")
            time.sleep(0.5)
        self.stdout.write("\nStopping…")

    def _stop_all(self) -> None:
        # Web and workers together (a worker finishes its current task first),
        # then Redis, which the workers need until they have stopped.
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
                    self.stderr.write(f"{name} did not stop in 30 s; killing it")
                    process.kill()
                    process.wait()
        self.children.clear()
