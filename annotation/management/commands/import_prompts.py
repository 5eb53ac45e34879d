"""Import prompts (with optional completions) from a JSON Lines file into a project."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from annotation.importing import ImportReport, ImportValidationError, import_limit, prompts_import
from annotation.models import Project
from annotation.selectors import project_by_reference


def _line_count(path: Path) -> int:
    """Lines in the file, for the progress bar's total; reads in blocks, holds none of it."""
    count = 0
    last = b"\n"
    with path.open("rb") as file:
        while block := file.read(1024 * 1024):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _project(reference: str) -> Project:
    project = project_by_reference(reference=reference)
    if project is None:
        raise CommandError(f"no project with the id or name {reference!r}")
    return project


class Command(BaseCommand):
    help = (
        "Import prompts, with optional completions, from a JSON Lines file (or - for stdin). "
        "All or nothing: any bad line is reported with every other and nothing is written."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project", help="project id or exact name")
        parser.add_argument("file", help="JSON Lines file, or - to read standard input")

    def handle(self, *args: Any, **options: Any) -> None:
        project = _project(options["project"])
        quiet = options["verbosity"] == 0
        if options["file"] == "-":
            report = self._import(project, sys.stdin.buffer, total=None, quiet=quiet)
        else:
            path = Path(options["file"])
            if not path.is_file():
                raise CommandError(f"no such file: {path}")
            with path.open("rb") as file:
                # An oversized file fails at once; counting its lines first would only delay that.
                too_big = path.stat().st_size > import_limit("IMPORT_MAX_BYTES")
                total = None if too_big else _line_count(path)
                report = self._import(project, file, total=total, quiet=quiet)
        self._print_report(project, report)

    def _import(self, project: Project, stream: IO[bytes], *, total: int | None, quiet: bool) -> ImportReport:
        # tqdm writes carriage returns itself; the OutputWrapper around self.stderr
        # would add a line ending to each write, so the bar goes to the stream inside it.
        bar_stream = getattr(self.stderr, "_out", sys.stderr)
        with tqdm(total=total, unit=" lines", desc="reading", file=bar_stream, disable=quiet) as bar:
            try:
                return prompts_import(project=project, data=stream, progress=bar.update)
            except ImportValidationError as error:
                bar.close()
                for problem in error.errors:
                    self.stderr.write(str(problem))
                count = len(error.errors)
                raise CommandError(
                    f"{count} problem{'' if count == 1 else 's'} in the file; nothing was imported"
                ) from None

    def _print_report(self, project: Project, report: ImportReport) -> None:
        for line, reason in report.duplicates:
            self.stdout.write(f"line {line}: duplicate: {reason}")
        for line, reason in report.without_task:
            self.stdout.write(f"line {line}: no task: {reason}")
        self.stdout.write(
            self.style.SUCCESS(
                f"imported into {project.name}: {report.prompts_created} prompts, "
                f"{report.completions_created} completions, {report.policies_created} new policies, "
                f"{report.tasks_created} tasks; {len(report.duplicates)} duplicates skipped"
            )
        )
