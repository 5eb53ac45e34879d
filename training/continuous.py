"""Continuous mode: the reward model that orders a project's queue keeps up with its judgments.

A manager turns it on for a ranking project by naming a template: a reward
run trained on a build that reads the project. From then on the beat runs
`continuous_training_tick` (training.tasks, default queue, every minute),
which moves each active project's cycle one step at most:

    idle      the project has `every_judgments` more human judgments than at
              the last start → a copy of the template run's build (same
              options; it reads every judgment up to now)        → building
    building  the build succeeded → a reward run with the template's base
              model, PEFT, trainer, GPUs and hyper-parameters    → training
    training  the run succeeded → its reward model scores the project (a
              scoring job; its success refreshes the tasks' uncertainty, so
              an `uncertainty` queue follows the new model)      → scoring
    scoring   the scoring job ended                              → idle

A build, run or scoring job that fails (or is cancelled) ends the cycle:
the state goes back to idle with the reason in `last_error`, and the next
cycle starts once enough new judgments arrive again. Each step locks the
row (select_for_update, skip_locked), so two beats never start two cycles.
The jobs are ordinary jobs, started by the services every page uses and
listed with the others; the template run's creator is their creator.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction

from annotation.models import Judgment, Project, Source
from annotation.roles import Role
from annotation.selectors import projects_for_user
from training.models import ContinuousTraining, DatasetBuild, ScoringJob, TrainingRun
from training.selectors import training_runs_for_user


def human_judgments(*, project: Project) -> int:
    return Judgment.objects.filter(task__project=project, source=Source.HUMAN).count()


def continuous_training_set(
    *,
    project: Project,
    template_run: TrainingRun,
    every_judgments: int,
    created_by: AbstractBaseUser | None,
    active: bool = True,
) -> ContinuousTraining:
    """Turn continuous mode on (or change it) for a ranking project; ValidationError by field.

    The template must be a reward run the person may see whose build reads
    this project. The count starts from the judgments the project has now.
    """
    errors: dict[str, str] = {}
    if created_by is not None:
        if not projects_for_user(user=created_by, role=Role.MANAGER).filter(pk=project.pk).exists():
            errors["project"] = "you can set continuous mode only on projects you manage"
        if not training_runs_for_user(user=created_by).filter(pk=template_run.pk).exists():
            errors["template_run"] = "you can copy only runs trained on projects you manage"
    if project.kind != Project.Kind.RANKING:
        errors["project"] = "continuous mode orders the queue of a ranking project, not an A/B session"
    if template_run.kind != TrainingRun.Kind.REWARD:
        errors["template_run"] = "the template must be a reward run"
    elif not template_run.dataset_build.projects.filter(pk=project.pk).exists():
        errors["template_run"] = "the template run's dataset build must read this project"
    if every_judgments < 1:
        errors["every_judgments"] = "must be at least 1"
    if errors:
        raise ValidationError(errors)
    mode, _ = ContinuousTraining.objects.update_or_create(
        project=project,
        defaults={
            "template_run": template_run,
            "every_judgments": every_judgments,
            "active": active,
            "created_by": created_by,
        },
        create_defaults={
            "template_run": template_run,
            "every_judgments": every_judgments,
            "active": active,
            "created_by": created_by,
            "judgments_at_last_start": human_judgments(project=project),
        },
    )
    return mode


def _cycle_end(mode: ContinuousTraining, *, error: str = "") -> None:
    mode.state = ContinuousTraining.State.IDLE
    mode.last_error = error
    mode.save(update_fields=["state", "last_error", "updated_at"])


def _step(mode: ContinuousTraining) -> str:
    """Move one project's cycle at most one step; returns what happened (for logs and tests)."""
    from training.services import (
        dataset_build_copy,
        scoring_job_create,
        training_run_create,
    )

    template = mode.template_run
    owner = template.created_by
    if mode.state == ContinuousTraining.State.IDLE:
        if not mode.active:
            return "off"
        judged = human_judgments(project=mode.project)
        if judged - mode.judgments_at_last_start < mode.every_judgments:
            return "waiting"
        if owner is None:
            _cycle_end(mode, error="the template run has no creator to start new jobs as")
            return "failed"
        build = dataset_build_copy(
            build=template.dataset_build,
            created_by=owner,
            name=f"{mode.project.name}: continuous {mode.cycles + 1} ({judged} judgments)"[:200],
        )
        mode.current_build, mode.current_run, mode.current_scoring = build, None, None
        mode.judgments_at_last_start = judged
        mode.cycles += 1
        mode.state = ContinuousTraining.State.BUILDING
        mode.last_error = ""
        mode.save()
        return "build started"
    if mode.state == ContinuousTraining.State.BUILDING:
        build = mode.current_build
        if build is None:
            _cycle_end(mode, error="the cycle's dataset build was deleted")
            return "failed"
        if build.status not in DatasetBuild.FINISHED_STATUSES:
            return "building"
        if build.status != DatasetBuild.Status.SUCCEEDED:
            _cycle_end(mode, error=f"dataset build {build.pk} {build.status}: {build.error[-500:]}")
            return "failed"
        run = training_run_create(
            dataset_build=build,
            kind=TrainingRun.Kind.REWARD,
            base_model=template.base_model,
            created_by=owner,
            peft=template.peft,
            hyperparameters=template.hyperparameters,
            name=f"{mode.project.name}: continuous reward {mode.cycles}"[:200],
            gpus=template.gpus,
            distributed=template.distributed,
            trainer=template.trainer,
        )
        mode.current_run = run
        mode.state = ContinuousTraining.State.TRAINING
        mode.save(update_fields=["current_run", "state", "updated_at"])
        return "run started"
    if mode.state == ContinuousTraining.State.TRAINING:
        run = mode.current_run
        if run is None:
            _cycle_end(mode, error="the cycle's training run was deleted")
            return "failed"
        if run.status not in TrainingRun.TERMINAL:
            return "training"
        reward_model = (
            getattr(run, "reward_model", None) if run.status == TrainingRun.Status.SUCCEEDED else None
        )
        if reward_model is None:
            _cycle_end(mode, error=f"training run {run.pk} {run.status}: {run.error[-500:]}")
            return "failed"
        job = scoring_job_create(project=mode.project, reward_model=reward_model, created_by=None)
        mode.current_scoring = job
        mode.state = ContinuousTraining.State.SCORING
        mode.save(update_fields=["current_scoring", "state", "updated_at"])
        return "scoring started"
    job = mode.current_scoring
    if job is not None and job.status not in ScoringJob.TERMINAL:
        return "scoring"
    failed = job is None or job.status != ScoringJob.Status.SUCCEEDED
    _cycle_end(mode, error=f"scoring job {job.pk if job else '?'} did not succeed" if failed else "")
    return "failed" if failed else "done"


def continuous_training_tick() -> dict[int, str]:
    """One step for every project in continuous mode; project id → what happened."""
    done: dict[int, Any] = {}
    for mode_id in ContinuousTraining.objects.exclude(
        state=ContinuousTraining.State.IDLE, active=False
    ).values_list("pk", flat=True):
        with transaction.atomic():
            mode = (
                ContinuousTraining.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("project", "template_run__dataset_build", "template_run__created_by")
                .filter(pk=mode_id)
                .first()
            )
            if mode is None:  # another beat holds it
                continue
            try:
                with transaction.atomic():  # a savepoint: a failed step leaves nothing half-made
                    done[mode.project_id] = _step(mode)
            except Exception as error:  # a job that cannot be started (broker down, invalid settings)
                _cycle_end(mode, error=f"{type(error).__name__}: {error}")
                done[mode.project_id] = "failed"
    return done
