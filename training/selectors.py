"""Reads on the training side, and the access helpers every door goes through.

A dataset build is visible only to someone who manages every one of its
projects; for anyone else it does not exist (Http404, never 403).
"""

from __future__ import annotations

import math
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any, TypedDict

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.http import Http404
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from annotation.models import Comparison, Judgment, Membership, Project
from annotation.roles import Role
from annotation.selectors import projects_for_user
from training.models import DatasetBuild, GenerationJob, Job, RewardModel, ScoringJob, TrainingRun

AnyUser = AbstractBaseUser | AnonymousUser

# The options a build is made of: what a copy carries over, what the API shows.
BUILD_OPTION_FIELDS = (
    "date_from",
    "date_to",
    "min_gold_accuracy",
    "exclude_flagged",
    "aggregation",
    "agreement_threshold",
    "ties",
    "margin",
    "format",
    "test_fraction",
    "seed",
    "near_duplicate_threshold",
    "sft_in_preferences",
    "sources",
    "judge_agreement_min",
)
# Options a form or script may leave out: the model's default stands (they came after the first forms).
BUILD_OPTIONAL_FIELDS = ("sft_in_preferences", "sources", "judge_agreement_min")


def build_options_from(data: dict[str, Any]) -> dict[str, Any]:
    """A form's cleaned options as `dataset_build_create` takes them, leaving out optional ones not given."""
    return {
        field: data[field]
        for field in BUILD_OPTION_FIELDS
        if field not in BUILD_OPTIONAL_FIELDS or data.get(field) not in (None, "")
    }


# What people read for a build's fields, on its form and its page.
BUILD_LABELS = {
    "name": _("Name"),
    "projects": _("Projects"),
    "labelers": _("Labelers"),
    "date_from": _("Judged from"),
    "date_to": _("Judged until"),
    "min_gold_accuracy": _("Gold accuracy at least"),
    "exclude_flagged": _("Leave out flagged"),
    "aggregation": _("Aggregation"),
    "agreement_threshold": _("Agreement threshold"),
    "ties": _("Ties"),
    "margin": _("Margin"),
    "format": _("Format"),
    "test_fraction": _("Test share"),
    "seed": _("Seed"),
    "near_duplicate_threshold": _("Near-duplicate threshold"),
    "sft_in_preferences": _("SFT prompts also in the preference rows"),
    "sources": _("Judgments from"),
    "judge_agreement_min": _("Judges' agreement with humans at least"),
}

# --- the files of a build ------------------------------------------------------

# Every output a build can write, in the order the dataset card lists them.
BUILD_OUTPUTS = ("pairs", "pairs_with_ties", "grouped", "sft", "reference")
BUILD_SPLITS = ("train", "test")
BUILD_FILE_FORMATS = ("jsonl", "parquet")
CARD_FILENAME = "README.md"

# Download key -> path inside the build's folder. The only files a request can
# name: nothing from a URL ever becomes part of a path.
BUILD_FILES: dict[str, str] = {
    f"{output}-{split}.{extension}": f"{output}/{split}.{extension}"
    for output in BUILD_OUTPUTS
    for split in BUILD_SPLITS
    for extension in BUILD_FILE_FORMATS
}
BUILD_FILES[CARD_FILENAME] = CARD_FILENAME


def datasets_root() -> Path:
    return Path(settings.ARTIFACTS_DIR) / "datasets"


def dataset_build_dir(*, build_id: int) -> Path:
    """Where a finished build's files live: ARTIFACTS_DIR/datasets/<id>/."""
    return datasets_root() / str(int(build_id))


# --- access --------------------------------------------------------------------


def dataset_builds_for_user(*, user: AnyUser) -> QuerySet[DatasetBuild]:
    """Builds every one of whose projects the user manages (superusers: all builds)."""
    if not user.is_authenticated:
        return DatasetBuild.objects.none()
    through = DatasetBuild.projects.through.objects
    managed = projects_for_user(user=user, role=Role.MANAGER).values("pk")
    has_project = through.filter(datasetbuild_id=OuterRef("pk"))
    has_unmanaged_project = has_project.exclude(project_id__in=managed)
    # A build without projects would pass "manages all of them" vacuously.
    return DatasetBuild.objects.filter(Exists(has_project)).exclude(Exists(has_unmanaged_project))


def dataset_build_get_for_user(*, user: AnyUser, pk: Any) -> DatasetBuild:
    """The build with this id if the user manages all its projects; else Http404."""
    try:
        return dataset_builds_for_user(user=user).select_related("created_by").get(pk=int(pk))
    except (DatasetBuild.DoesNotExist, TypeError, ValueError):
        raise Http404("No such dataset build.") from None


def dataset_build_file_path(*, build: DatasetBuild, key: str) -> Path:
    """The file named by an allow-listed key in a finished build's folder; else Http404."""
    relative = BUILD_FILES.get(key)
    if relative is None or build.status != DatasetBuild.Status.SUCCEEDED:
        raise Http404("No such file.")
    path = dataset_build_dir(build_id=build.pk) / relative
    if not path.is_file():
        raise Http404("No such file.")
    return path


def dataset_build_files(*, build: DatasetBuild) -> list[dict[str, Any]]:
    """The downloadable files of a finished build, card first: key, size in bytes."""
    if build.status != DatasetBuild.Status.SUCCEEDED:
        return []
    folder = dataset_build_dir(build_id=build.pk)
    files = []
    for key in (CARD_FILENAME, *(k for k in BUILD_FILES if k != CARD_FILENAME)):
        path = folder / BUILD_FILES[key]
        if path.is_file():
            files.append({"key": key, "size": path.stat().st_size})
    return files


def dataset_build_options(*, build: DatasetBuild) -> dict[str, Any]:
    """The build's projects, labelers and options as JSON-ready values."""
    values: dict[str, Any] = {field: getattr(build, field) for field in BUILD_OPTION_FIELDS}
    for field in ("date_from", "date_to"):
        values[field] = values[field].isoformat() if values[field] else None
    # Through .all(), so a list that prefetched them costs no query per build.
    values["projects"] = sorted(project.pk for project in build.projects.all())
    values["labelers"] = sorted(labeler.pk for labeler in build.labelers.all())
    return values


def project_choices_for_builds(*, user: AnyUser) -> QuerySet[Project]:
    """Projects the user may build datasets from: the ones they manage."""
    return projects_for_user(user=user, role=Role.MANAGER).order_by("name")


def labeler_choices_for_builds(*, user: AnyUser) -> QuerySet[Any]:
    """People who judge in a project the user manages (labelers and evaluators)."""
    managed = projects_for_user(user=user, role=Role.MANAGER).values("pk")
    judges = Membership.objects.filter(project__in=managed, role__in=[Role.LABELER, Role.EVALUATOR])
    return get_user_model().objects.filter(pk__in=judges.values("user_id")).order_by("username")


# --- what a build reads --------------------------------------------------------


def dataset_build_excluded_labelers(*, build: DatasetBuild) -> dict[int, list[int]]:
    """Per project id, the people whose gold accuracy there is below the build's minimum.

    People without gold answers in a project have no accuracy there and are
    kept: the filter leaves out those measured to be below the bar.
    """
    if build.min_gold_accuracy is None:
        return {}
    # Imported here: the statistics pull in scipy, which only this path needs.
    from annotation.stats import gold_accuracy

    excluded: dict[int, list[int]] = {}
    for project in build.projects.order_by("pk"):
        below = [
            user_id
            for user_id, row in gold_accuracy(project=project).items()
            if row["accuracy"] is not None and row["accuracy"] < build.min_gold_accuracy
        ]
        if below:
            excluded[project.pk] = sorted(below)
    return excluded


def _day_start(day: Any) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min), timezone.get_default_timezone())


def _selection(
    *,
    build: DatasetBuild,
    excluded: dict[int, list[int]],
    project: str,
    person: str,
    judgment_id: str,
    judgment_id_max: int,
) -> Q:
    """The build's filters as one Q over rows naming a project, a person and a judgment."""
    query = Q(**{f"{project}__in": build.projects.values("pk"), f"{judgment_id}__lte": judgment_id_max})
    # Days are whole days in the site's TIME_ZONE, both ends included.
    if build.date_from is not None:
        query &= Q(created_at__gte=_day_start(build.date_from))
    if build.date_to is not None:
        query &= Q(created_at__lt=_day_start(build.date_to + timedelta(days=1)))
    labeler_ids = list(build.labelers.values_list("pk", flat=True))
    if labeler_ids:
        query &= Q(**{f"{person}__in": labeler_ids})
    for project_id, user_ids in excluded.items():
        query &= ~Q(**{project: project_id, f"{person}__in": user_ids})
    return query


def dataset_build_judgment_id_max(*, build: DatasetBuild) -> int:
    """The newest judgment of the build's projects now: later ones stay out of this build."""
    latest = (
        Judgment.objects.filter(task__project__in=build.projects.values("pk"))
        .order_by("-id")
        .values_list("id", flat=True)
        .first()
    )
    return latest or 0


def dataset_build_comparisons(
    *, build: DatasetBuild, excluded: dict[int, list[int]], judgment_id_max: int
) -> QuerySet[Comparison]:
    """The comparisons the build's filters select (flags are checked row by row)."""
    return Comparison.objects.filter(
        _selection(
            build=build,
            excluded=excluded,
            project="project_id",
            person="labeler_id",
            judgment_id="judgment_id",
            judgment_id_max=judgment_id_max,
        )
    )


def dataset_build_judgments(
    *, build: DatasetBuild, excluded: dict[int, list[int]], judgment_id_max: int
) -> QuerySet[Judgment]:
    """The judgments behind those comparisons: same filters, rankings only ("none acceptable" has none)."""
    return Judgment.objects.filter(
        _selection(
            build=build,
            excluded=excluded,
            project="task__project_id",
            person="user_id",
            judgment_id="id",
            judgment_id_max=judgment_id_max,
        ),
        none_acceptable=False,
    )


# --- training runs ----------------------------------------------------------------

# The filters the run list accepts; nothing else from the query string reaches the ORM.
RUN_LIST_FILTERS = {"status": TrainingRun.Status.values, "kind": TrainingRun.Kind.values}


def training_runs_for_user(*, user: AnyUser) -> QuerySet[TrainingRun]:
    """Runs over dataset builds the user may see (a manager of all of the build's projects)."""
    return TrainingRun.objects.filter(dataset_build__in=dataset_builds_for_user(user=user))


def training_run_get_for_user(*, user: AnyUser, pk: Any) -> TrainingRun:
    try:
        return training_runs_for_user(user=user).select_related("dataset_build", "policy").get(pk=int(pk))
    except (TrainingRun.DoesNotExist, TypeError, ValueError):
        raise Http404("No such training run.") from None


def training_run_device_settings(*, run: TrainingRun) -> dict[str, Any]:
    """What the run's process chose for its device (`training.model_settings`): the row's copy, else
    the file the process wrote into the run's folder; {} before it started."""
    import json

    from training.model_settings import DEVICE_SETTINGS_FILENAME

    if run.device_settings:
        return dict(run.device_settings)
    if not run.output_dir:
        return {}
    try:
        recorded = json.loads((run.output_path / DEVICE_SETTINGS_FILENAME).read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def training_run_eta_seconds(*, run: TrainingRun, now: datetime | None = None) -> float | None:
    """Seconds left, from the pace so far; None before the first step or once the run is over."""
    if run.status != TrainingRun.Status.RUNNING or not run.started_at or not run.step or not run.total_steps:
        return None
    elapsed = ((now or timezone.now()) - run.started_at).total_seconds()
    return max(0.0, elapsed / run.step * (run.total_steps - run.step))


def training_run_metric_series(*, run: TrainingRun) -> dict[str, list[tuple[int, float]]]:
    """Each logged metric as (step, value) points, training and evaluation alike."""
    series: dict[str, list[tuple[int, float]]] = {}
    for step, values in run.metric_rows.order_by("step", "id").values_list("step", "values"):
        for name, value in values.items():
            if isinstance(value, int | float):
                series.setdefault(name, []).append((step, float(value)))
    return series


# Artifact key -> how it is produced; the only names a download URL can carry.
RUN_FILES = ("model.zip", "metrics.json", "log.txt")


def training_run_final_dir(*, run: TrainingRun) -> Path:
    return run.output_path / "final"


# --- reward models and scoring jobs ------------------------------------------------


def reward_models_for_user(*, user: AnyUser) -> QuerySet[RewardModel]:
    """Reward models from runs the user may see (trained on data from projects they manage)."""
    return RewardModel.objects.filter(run__in=training_runs_for_user(user=user))


# Fewer optimizer steps than this teach a model next to nothing: the run form says so first.
FEW_STEPS = 20


def training_run_steps_estimate(
    *, build: DatasetBuild, trainer: str, hyperparameters: dict[str, Any]
) -> int | None:
    """How many optimizer steps these settings give on one GPU (more GPUs give fewer); None if unknown.

    `max_steps` wins when set; otherwise the epochs over the build's train
    rows the trainer reads (grouped rows for the grouped trainers, whose
    batch counts groups; pairs for TRL's).
    """
    max_steps = int(hyperparameters.get("max_steps") or -1)
    if max_steps > 0:
        return max_steps
    output = "grouped" if trainer in ("", TrainingRun.Trainer.GROUPED) else "pairs"
    rows = (build.counts or {}).get(output, {}).get("train")
    if rows is None:
        return None
    per_step = int(hyperparameters.get("per_device_train_batch_size") or 8) * int(
        hyperparameters.get("gradient_accumulation_steps") or 1
    )
    epochs = float(hyperparameters.get("num_train_epochs") or 1.0)
    return max(1, math.ceil(math.ceil(rows / per_step) * epochs))


def training_run_few_steps(
    *, build: DatasetBuild, trainer: str, hyperparameters: dict[str, Any]
) -> int | None:
    """The step count when the epochs give fewer than FEW_STEPS, else None.

    An explicit `max_steps` is a deliberate choice (a smoke test, a resumed
    schedule) and is never second-guessed.
    """
    if int(hyperparameters.get("max_steps") or -1) > 0:
        return None
    steps = training_run_steps_estimate(build=build, trainer=trainer, hyperparameters=hyperparameters)
    return steps if steps is not None and steps < FEW_STEPS else None


def generation_jobs_for_project(*, project: Project) -> QuerySet[GenerationJob]:
    """The project's generation jobs, oldest first (the caller has checked who may see the project)."""
    return GenerationJob.objects.filter(project=project).select_related("policy").order_by("pk")


def scoring_jobs_for_session(*, project: Project) -> QuerySet[ScoringJob]:
    """The session's scoring jobs, newest first (the caller has checked who may see the session)."""
    return ScoringJob.objects.filter(project=project).select_related("reward_model", "created_by")


def generation_jobs_for_user(*, user: AnyUser) -> QuerySet[GenerationJob]:
    """Generation jobs on the projects the user manages, newest first."""
    managed = projects_for_user(user=user, role=Role.MANAGER)
    return GenerationJob.objects.filter(project__in=managed).select_related("policy", "project")


def generation_job_get_for_user(*, user: AnyUser, pk: Any) -> GenerationJob:
    """A generation job on a project the user manages; any other is Http404."""
    try:
        return generation_jobs_for_user(user=user).get(pk=int(pk))
    except (GenerationJob.DoesNotExist, TypeError, ValueError):
        raise Http404("No such generation job.") from None


class JobStatusPayload(TypedDict):
    """What every job's status endpoint answers (static/js/job.js polls it on the job's page)."""

    id: int | None
    kind: str
    status: str
    status_display: str
    terminal: bool
    progress: float
    step: int | None
    total_steps: int | None
    eta_seconds: float | None
    attempts: int | None
    error: str
    log_tail: str
    details: dict[str, Any]


def job_status_payload(job: Job | None) -> JobStatusPayload:
    """A job's state in the one shape every kind shares: a dataset build, a training run, a
    generation or a scoring job.

    `step` and `total_steps` count what the kind counts (training steps, prompts,
    completions scored; none for a build); `details` holds what only the kind
    has. None (no job yet) reads as a terminal job without a status: a page has
    nothing to poll.
    """
    payload = JobStatusPayload(
        id=None,
        kind="",
        status="",
        status_display="",
        terminal=True,
        progress=0.0,
        step=None,
        total_steps=None,
        eta_seconds=None,
        attempts=None,
        error="",
        log_tail="",
        details={},
    )
    if job is None:
        return payload
    payload.update(
        id=job.pk,
        status=job.status,
        status_display=str(job.get_status_display()),  # type: ignore[attr-defined]
        terminal=job.is_terminal,
        progress=round(float(job.progress), 4),  # type: ignore[attr-defined]
        error=job.error,
        attempts=getattr(job, "attempts", None),
        log_tail=getattr(job, "log_tail", ""),
    )
    if isinstance(job, DatasetBuild):
        payload.update(kind="dataset_build", details={"counts": job.counts, "content_hash": job.content_hash})
    elif isinstance(job, TrainingRun):
        payload.update(
            kind="training_run",
            step=job.step,
            total_steps=job.total_steps,
            eta_seconds=training_run_eta_seconds(run=job),
        )
    elif isinstance(job, GenerationJob):
        payload.update(
            kind="generation_job",
            step=job.prompts_done,
            total_steps=job.prompts_total,
            details={"completions_written": job.completions_written},
        )
    elif isinstance(job, ScoringJob):
        payload.update(kind="scoring_job", step=job.completions_done, total_steps=job.completions_total)
    return payload
