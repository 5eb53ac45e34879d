"""Run everything the demo needs in one terminal: Redis (if none answers),
Celery workers for the `default` and `gpu` queues, and the web server.

Ctrl-C (or SIGTERM) stops every process this command started, and only those.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from config.stack import LocalStack, StackError


class Command(BaseCommand):
    help = "Start Redis if needed, a Celery worker per queue and the web server; Ctrl-C stops them all."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)

    def handle(self, *args: Any, **options: Any) -> None:
        self.stopping = False
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        stack = LocalStack(say=self.stdout.write)
        try:
            stack.start_redis_if_needed()
            stack.start_workers()
            stack.start_web(options["host"], options["port"])
            self.stdout.write(
                self.style.SUCCESS(
                    f"\nRankwise is running on http://{options['host']}:{options['port']}/ "
                    f"(health: http://{options['host']}:{options['port']}/healthz). Press Ctrl-C to stop.\n"
                )
            )
            while not self.stopping:
                stack.check_alive()
                time.sleep(0.5)
            self.stdout.write("\nStopping…")
        except StackError as error:
            raise CommandError(f"{error}; stopping the demo") from None
        finally:
            stack.stop_all()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
