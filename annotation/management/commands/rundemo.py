"""Run everything the demo needs in one terminal: Redis (if none answers),
Celery workers for the `default` and `gpu` queues, and the web server.

With --demo it also resets the demo accounts and, when the demo model is
missing, builds it in the background: the app answers at once (labeling and
A/B need no model), and the address and accounts are printed last, together,
once the web server answers. Ctrl-C (or SIGTERM) stops every process this
command started, and only those.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotation.management.commands.demo_users import demo_accounts_lines, demo_accounts_reset
from training.demo.stack import LocalStack, StackError

# Seconds between progress lines where the console cannot rewrite one line in place.
PROGRESS_EVERY_S = 30.0


class Command(BaseCommand):
    help = "Start Redis if needed, a Celery worker per queue and the web server; Ctrl-C stops them all."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--demo",
            action="store_true",
            help="reset the demo accounts, build the demo model in the background if missing, "
            "and end with the address and the accounts",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.stopping = False
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        base = f"http://{options['host']}:{options['port']}"
        progress_path: Path | None = None
        services_log = None
        if options["demo"]:
            # The services' own output goes to a file, so that nothing scrolls
            # the accounts and the address away.
            log_dir = Path(settings.VAR_DIR) / "logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            services_log = (log_dir / "services.log").open("ab")
        stack = LocalStack(say=self.stdout.write, log=services_log)
        try:
            stack.start_redis_if_needed()
            stack.start_workers()
            stack.start_web(options["host"], options["port"])
            lines: list[str] = []
            if options["demo"]:
                progress_path = self._demo_model_start(stack, base, lines)
                stack.wait_healthy(base)
                lines.append(f"Logs of the web server, workers and Redis: {services_log.name}")  # type: ignore[union-attr]
                lines += demo_accounts_lines(demo_accounts_reset())
            lines.append(f"Rankwise is running on {base}/ (health: {base}/healthz). Press Ctrl-C to stop.")
            self.stdout.write(self.style.SUCCESS("\n" + "\n".join(lines) + "\n"))
            self._watch(stack, progress_path)
            self.stdout.write("\nStopping…")
        except StackError as error:
            raise CommandError(f"{error}; stopping the demo") from None
        finally:
            stack.stop_all()
            if services_log is not None:
                services_log.close()

    def _demo_model_start(self, stack: LocalStack, base: str, lines: list[str]) -> Path | None:
        """Start the demo model's build in the background unless it is there; say where to watch it."""
        from config.demo_progress import demo_model_dir, demo_model_is_complete, demo_progress_path

        model_dir = demo_model_dir()
        if demo_model_is_complete(model_dir):
            lines.append(f"Demo model: ready ({model_dir}).")
            return None
        log_path = Path(settings.VAR_DIR) / "logs" / "demo-model.log"
        with log_path.open("ab") as log:
            stack.spawn(
                "demo-model",
                [sys.executable, "manage.py", "build_demo_model", "--progress-every", str(PROGRESS_EVERY_S)],
                output=log,
                finite=True,
            )
        lines.append(
            f"Demo model: building in the background (a few minutes on a CPU); progress at "
            f"{base}/demo-model/ and below, its log in {log_path}. Labeling and A/B work meanwhile."
        )
        return demo_progress_path(model_dir)

    def _watch(self, stack: LocalStack, progress_path: Path | None) -> None:
        """Keep the services alive; show the model build's progress on one line until it ends."""
        from config.demo_progress import demo_progress_line, demo_progress_read, demo_progress_write

        shown, last_print = "", 0.0
        in_place = self.stdout.isatty()
        while not self.stopping:
            stack.check_alive()
            if progress_path is not None:
                progress = demo_progress_read(progress_path) or {"status": "building", "step": 0, "total": 0}
                ended = stack.exit_status("demo-model")
                if ended is not None and progress.get("status") not in ("ready", "failed"):
                    # Killed from outside (out of memory, a signal): the build could not say so itself.
                    progress = {"status": "failed", "error": f"the build process exited with status {ended}"}
                    demo_progress_write(progress_path, **progress)
                line = f"Demo model: {demo_progress_line(progress)}"
                finished = progress.get("status") in ("ready", "failed")
                due = finished or time.monotonic() - last_print >= PROGRESS_EVERY_S
                if line != shown and (in_place or due):
                    if in_place:
                        self.stdout.write(f"\r{line:<78}", ending="\n" if finished else "")
                    else:
                        self.stdout.write(line)
                    shown, last_print = line, time.monotonic()
                if finished:
                    progress_path = None
            time.sleep(0.5)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
