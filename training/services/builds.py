"""Dataset builds: create, publish, run (queued → running → succeeded | failed), fail, reap, delete.

Each step is a compare-and-set on the row, so a task delivered twice runs the
build once. The files themselves are written by `training.builds`.
"""

from __future__ import annotations

import logging
import shutil
import traceback
from collections.abc import Iterable
from datetime import date, datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from annotation.models import Project
from annotation.roles import Role
from annotation.selectors import projects_for_user
from annotation.services import labeler_reliability_record
from training.models import DatasetBuild
from training.selectors import BUILD_OPTION_FIELDS, dataset_build_dir
from training.services.jobs import (
    DATASET_BUILD_TASK,
    broker_check,
    job_fail,
    job_start,
    job_succeed,
    task_publish,
    validation_errors,
)

logger = logging.getLogger(__name__)


class DatasetBuildInvalid(ValueError):
    """The options do not make a build; `errors` maps a field to what is wrong with it."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{name}: {message}" for name, message in errors.items()))
        self.errors = errors


@transaction.atomic
def dataset_build_create(
    *,
    created_by: AbstractBaseUser,
    name: str,
    projects: Iterable[Project],
    labelers: Iterable[AbstractBaseUser] = (),
    date_from: date | None = None,
    date_to: date | None = None,
    min_gold_accuracy: float | None = None,
    exclude_flagged: bool = False,
    aggregation: str = DatasetBuild.Aggregation.EVERY_VOTE,
    agreement_threshold: float = 0.5,
    ties: str = DatasetBuild.Ties.DROP,
    margin: str = DatasetBuild.Margin.NONE,
    format: str = DatasetBuild.Format.STANDARD,
    test_fraction: float = 0.1,
    seed: int = 0,
    near_duplicate_threshold: float = 0.6,
    sft_in_preferences: bool = True,
    sources: str = DatasetBuild.Sources.HUMANS,
    judge_agreement_min: float = 0.7,
) -> DatasetBuild:
    """Save a build and queue it on the `default` queue once the transaction commits.

    The creator must manage every project of the build (the same rule that
    decides who may see it afterwards). Raises DatasetBuildInvalid.
    """
    # A build that cannot be queued would sit in `queued` for ever: refuse up front.
    broker_check()
    projects = list(projects)
    errors: dict[str, str] = {}
    if not projects:
        errors["projects"] = "choose at least one project"
    else:
        managed = set(projects_for_user(user=created_by, role=Role.MANAGER).values_list("pk", flat=True))
        if any(project.pk not in managed for project in projects):
            errors["projects"] = "you can build datasets only from projects you manage"
    build = DatasetBuild(
        name=name.strip(),
        created_by=created_by,
        date_from=date_from,
        date_to=date_to,
        min_gold_accuracy=min_gold_accuracy,
        exclude_flagged=exclude_flagged,
        aggregation=aggregation,
        agreement_threshold=agreement_threshold,
        ties=ties,
        margin=margin,
        format=format,
        test_fraction=test_fraction,
        seed=seed,
        near_duplicate_threshold=near_duplicate_threshold,
        sft_in_preferences=sft_in_preferences,
        sources=sources,
        judge_agreement_min=judge_agreement_min,
    )
    try:
        build.full_clean(exclude=["created_by"])
    except ValidationError as error:
        errors.update(validation_errors(error))
    if errors:
        raise DatasetBuildInvalid(errors)
    build.save()
    build.projects.set(projects)
    build.labelers.set(list(labelers))
    dataset_build_enqueue(build=build)
    return build


def dataset_build_copy(*, build: DatasetBuild, created_by: AbstractBaseUser, name: str = "") -> DatasetBuild:
    """A new build with the same projects, filters and options (e.g. to rebuild after new judgments)."""
    return dataset_build_create(
        created_by=created_by,
        name=name or f"{build.name} (rebuild)"[:200],
        projects=build.projects.all(),
        labelers=build.labelers.all(),
        **{field: getattr(build, field) for field in BUILD_OPTION_FIELDS},
    )


def dataset_build_enqueue(*, build: DatasetBuild) -> None:
    """Send the build to a worker after the current transaction commits (`dataset_build_publish`)."""
    build_id = build.pk
    transaction.on_commit(lambda: dataset_build_publish(build_id=build_id))


def dataset_build_publish(*, build_id: int) -> bool:
    """Publish the build's task on the default queue; a build that cannot be queued is failed, saying why.

    The broker is checked before the build is made, but it can go away
    between that check and the commit; a build nobody will ever run must not
    sit in `queued`.
    """
    return task_publish(
        DATASET_BUILD_TASK,
        build_id,
        fail=lambda error: dataset_build_fail(build_id=build_id, error=error, from_statuses=("queued",)),
    )


def dataset_build_progress(*, build_id: int, progress: float) -> None:
    """Record how far a running build is (0–1); a build no longer running is left alone."""
    DatasetBuild.objects.filter(pk=build_id, status=DatasetBuild.Status.RUNNING).update(
        progress=min(max(float(progress), 0.0), 1.0)
    )


def dataset_build_fail(
    *, build_id: int, error: str, from_statuses: tuple[str, ...] = ("running", "queued")
) -> bool:
    """Mark a build failed with the error (compare-and-set from the given statuses); False if it was not in one."""
    return job_fail(DatasetBuild, job_id=build_id, error=error, from_statuses=from_statuses)


def dataset_build_run(*, build_id: int) -> DatasetBuild | None:
    """Run a queued build to its end; what a worker does with the task.

    1. Compare-and-set queued → running: a second delivery of the task, or a
       build already started elsewhere, changes nothing and returns None.
    2. Write the files (`training.builds`), moving the progress on the row.
    3. Compare-and-set running → succeeded with counts, summary and hash; on
       any error, running → failed with the error text. No folder is left by
       a failed build.
    """
    if not job_start(DatasetBuild, job_id=build_id, progress=0.0):
        logger.info("dataset build %s is not queued; nothing to do", build_id)
        return None
    build = DatasetBuild.objects.get(pk=build_id)
    try:
        # Imported here: it needs numpy, pyarrow and datasets, which the web process never loads.
        from training.builds import dataset_build_write

        result = dataset_build_write(
            build=build, progress=lambda share: dataset_build_progress(build_id=build_id, progress=share)
        )
    except Exception as error:
        logger.exception("dataset build %s failed", build_id)
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        dataset_build_fail(build_id=build_id, error=f"{detail}\n\n{traceback.format_exc()}")
        build.refresh_from_db()
        return build
    finished = job_succeed(
        DatasetBuild,
        job_id=build_id,
        progress=1.0,
        counts=result.counts,
        summary=result.summary,
        content_hash=result.content_hash,
    )
    if not finished:
        # Someone marked it failed meanwhile (a reaper, an admin): the row wins; drop the files.
        shutil.rmtree(dataset_build_dir(build_id=build_id), ignore_errors=True)
    elif (result.summary.get("dawid_skene") or {}).get("labelers"):
        # The dashboards show each labeler's reliability as this build estimated it.
        labeler_reliability_record(
            project_ids=list(build.projects.values_list("pk", flat=True)),
            labelers=result.summary["dawid_skene"]["labelers"],
            source=f"Dawid–Skene, dataset build {build_id}",
        )
    build.refresh_from_db()
    return build


def dataset_build_delete(*, build: DatasetBuild) -> None:
    """Delete the row and its files."""
    folder = dataset_build_dir(build_id=build.pk)
    build.delete()
    shutil.rmtree(folder, ignore_errors=True)


def dataset_builds_reap(*, now: datetime | None = None) -> list[int]:
    """Fail builds still `running` past the build time limit: their worker died mid-build.

    A build streams at tens of thousands of rows a second, so the limit
    (DATASET_BUILD_TIME_LIMIT_S, the task's own hard limit too) is far beyond
    any healthy build; the row then says what happened instead of spinning.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.DATASET_BUILD_TIME_LIMIT_S)
    stuck = list(
        DatasetBuild.objects.filter(status=DatasetBuild.Status.RUNNING, started_at__lt=cutoff).values_list(
            "pk", flat=True
        )
    )
    limit = settings.DATASET_BUILD_TIME_LIMIT_S
    return [
        build_id
        for build_id in stuck
        if dataset_build_fail(
            build_id=build_id,
            error=f"the build did not finish within {limit} s (its worker probably stopped); rebuild it",
        )
    ]
