"""Build the offline demo SFT policy: a small GPT-2 trained from scratch on arithmetic problems."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from config.demo_progress import demo_model_dir


def _looks_like_a_model(directory: Path) -> bool:
    return (directory / "config.json").is_file() or (directory / "rankwise_demo.json").is_file()


class Command(BaseCommand):
    help = (
        "Train the demo SFT policy (own tokenizer, random GPT-2, TRL SFT on noisy arithmetic answers) "
        "and save it with safetensors; skips a complete model already at --out unless --force."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--out", type=Path, default=None, help="target folder (default: MODELS_DIR/demo-sft)"
        )
        parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--noise", type=float, default=0.4, help="share of the sums the teacher mostly gets wrong"
        )
        parser.add_argument("--quick", action="store_true", help="a tiny model in seconds (for tests)")
        parser.add_argument("--force", action="store_true", help="rebuild over an existing model")
        parser.add_argument(
            "--progress-every",
            type=float,
            default=10.0,
            help="seconds between progress lines on the console (the progress file follows every step)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        # The demo model is built from generated data; nothing may reach the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Imported here, not at module level, so listing commands stays light.
        from config.demo_progress import demo_progress_line, demo_progress_path, demo_progress_write
        from training.demo.model import (
            DEMO_DEFAULT_STEPS,
            DEMO_QUICK_SETTINGS,
            demo_model_build,
            demo_model_is_complete,
            demo_report_read,
        )

        out_dir: Path = options["out"] or demo_model_dir()
        if demo_model_is_complete(out_dir) and not options["force"]:
            accuracy = demo_report_read(out_dir).get("accuracy")
            self.stdout.write(
                self.style.WARNING(
                    f"A demo model already exists at {out_dir} (held-out accuracy {accuracy}); "
                    "not overwriting it. Use --force to rebuild."
                )
            )
            return

        if out_dir.is_dir() and any(out_dir.iterdir()) and not _looks_like_a_model(out_dir):
            # --force replaces a model folder, never an arbitrary one (say, MODELS_DIR itself).
            raise CommandError(
                f"{out_dir} holds files but no model; refusing to replace it. Pick another --out."
            )

        build_options: dict[str, Any] = dict(DEMO_QUICK_SETTINGS) if options["quick"] else {}
        build_options.setdefault("steps", DEMO_DEFAULT_STEPS)
        if options["steps"] is not None:
            build_options["steps"] = options["steps"]
        self.stdout.write(f"Building the demo model at {out_dir} ({build_options['steps']} steps)…")
        progress_path = demo_progress_path(out_dir)
        started = time.monotonic()
        shown = [-1.0]

        def progress(step: int, total: int) -> None:
            elapsed = time.monotonic() - started
            # Steps run at an even pace once the first few are done; the
            # estimate starts after them.
            left = elapsed / step * (total - step) if step >= 3 else None
            fields = {"status": "building", "step": step, "total": total, "seconds_left": left}
            demo_progress_write(progress_path, **fields)
            if step >= total or time.monotonic() - shown[0] >= options["progress_every"]:
                shown[0] = time.monotonic()
                self.stdout.write(f"Demo model: {demo_progress_line(fields)}")

        try:
            report = demo_model_build(
                out_dir=out_dir,
                seed=options["seed"],
                noise=options["noise"],
                progress=progress,
                **build_options,
            )
        except Exception as error:
            demo_progress_write(progress_path, status="failed", error=f"{type(error).__name__}: {error}")
            raise
        demo_progress_write(
            progress_path, status="ready", step=report.steps, total=report.steps, accuracy=report.accuracy
        )
        loss = "n/a" if report.final_loss is None else f"{report.final_loss:.4f}"
        self.stdout.write(
            self.style.SUCCESS(
                f"Demo model saved to {report.out_dir}\n"
                f"  time:               {report.seconds:.1f} s\n"
                f"  steps:              {report.steps}\n"
                f"  final loss:         {loss}\n"
                f"  held-out accuracy:  {report.accuracy:.1%} "
                f"({report.eval_problems} test problems, greedy)\n"
                f"  training answers right: {report.train_labels_correct:.1%} (confusing sums: {report.noise:.0%})\n"
                f"  size:               {report.parameters:,} parameters, "
                f"{report.n_layer} layers × {report.n_embd}, vocabulary {report.vocab_size}"
            )
        )
