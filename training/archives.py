"""A finished run's `model.zip`: written once, when the run finishes, and streamed from disk on download.

The supervisor that records the run's result writes the archive of the
run's final folder next to it (`<run folder>/model.zip`), to a temporary
name first and renamed into place only once the attempt still owns the
run, so a download sees either no archive or a whole one, and a stale
attempt's weights are never archived as the run's. The web process only
opens the file.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

from training.models import TrainingRun

RUN_ARCHIVE_NAME = "model.zip"


def run_archive_path(*, run: TrainingRun) -> Path:
    """Where the run's archive lives (beside its final folder, never inside it)."""
    return run.output_path / RUN_ARCHIVE_NAME


def run_archive_stage(*, final_dir: Path, archive: Path) -> Path:
    """Zip every file of `final_dir` into a temporary file beside `archive`; the caller renames or removes it."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{archive.name}.", suffix=".partial", dir=archive.parent)
    staged = Path(name)
    try:
        with os.fdopen(handle, "wb") as stream, zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as zipped:
            for path in sorted(final_dir.rglob("*")):
                if path.is_file():
                    zipped.write(path, path.relative_to(final_dir))
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def run_archive_publish(*, staged: Path, archive: Path) -> None:
    """Move a staged archive into place in one step (a reader sees the old file or the new one)."""
    os.replace(staged, archive)


def run_archive_write(*, final_dir: Path, archive: Path) -> None:
    """Stage and publish at once (for runs finished before archives were written at the end)."""
    run_archive_publish(staged=run_archive_stage(final_dir=final_dir, archive=archive), archive=archive)
