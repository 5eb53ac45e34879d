"""Generation jobs and best-of-n policies: completions for a project's prompts from a policy."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count, F
from django.db.models.functions import Least
from django.utils import timezone

from annotation.models import Completion, Policy, Project, Prompt
from annotation.roles import Role
from annotation.selectors import policies_for_user, projects_for_user
from annotation.services import ab_session_open, tasks_create_for_project
from config.storage import storage_path_resolve
from training.job_events import job_ended
from training.models import BestOfN, DatasetBuild, GenerationJob, RewardModel, TrainingRun
from training.placement import DeviceLease
from training.services.child_events import GenerationEvents, generation_work
from training.services.jobs import (
    GENERATION_JOB_TASK,
    QueueUnavailable,
    broker_check,
    job_cancel,
    job_claim,
    job_fail,
    job_heartbeat,
    job_mark_cancelled,
    job_owned,
    job_stop_reason,
    jobs_reap,
    task_publish,
    validation_errors,
)
from training.services.supervisor import child_work_write, gpu_job_devices, gpu_job_process_run

# --- generation jobs ------------------------------------------------------------
#
# A generation job is a GPU job like a training run, and follows the same
# rules: the row is the source of truth, every transition is a
# compare-and-set, the Celery task only claims the job and waits for the
# job's own process (`python -m training.generation_process SPEC.json`),
# which writes progress, heartbeats and its outcome itself. Attempts, the
# heartbeat timeout and the time limits are the training runs' settings.
#
# Completions are written in the same transaction as the progress, one batch
# of prompts at a time, under a lock on those prompts' rows, topping each
# prompt up to `n` completions from the policy: a retry, a second delivery or
# a second job for the same policy can never give a prompt more than `n`.


def generation_job_dir(*, job_id: int) -> Path:
    """Where a job's specs and process logs go: ARTIFACTS_DIR/generation/<id>/."""
    return Path(settings.ARTIFACTS_DIR) / "generation" / str(int(job_id))


def policy_prompt_format(*, policy: Policy) -> str:
    """How a policy reads prompts: "chat", "text", or "auto" (chat prompts through the chat template).

    An explicit `prompt_format` in the policy's generation settings wins; a
    policy registered by a DPO run reads prompts as its dataset build wrote
    them; otherwise "auto" (the process also looks for the demo model's
    report, which says it was trained on chat).
    """
    explicit = (policy.generation_settings or {}).get("prompt_format")
    if explicit in ("chat", "text"):
        return str(explicit)
    run = TrainingRun.objects.filter(policy=policy).select_related("dataset_build").first()
    if run is not None:
        return "chat" if run.dataset_build.format == DatasetBuild.Format.CONVERSATIONAL else "text"
    return "auto"


def generation_job_validate(*, job: GenerationJob, created_by: AbstractBaseUser | None) -> None:
    """Raise ValidationError (by field) unless the unsaved job can run.

    The policy must be a model or a best-of-n policy (an imported source has
    nothing to generate with); a creator, when given, must manage the project.
    """
    errors: dict[str, str] = {}
    policy = job.policy
    if policy.kind == Policy.Kind.IMPORTED:
        errors["policy"] = "an imported policy has no model to generate with"
    elif policy.kind == Policy.Kind.BEST_OF_N:
        link = BestOfN.objects.filter(policy=policy).select_related("base_policy").first()
        if link is None:
            errors["policy"] = "this best-of-n policy has no base policy and reward model"
        elif not link.base_policy.base_model:
            errors["policy"] = "the best-of-n policy's base policy has no base model"
    elif not policy.base_model:
        errors["policy"] = "the policy has no base model to generate with"
    if created_by is not None:
        managed = projects_for_user(user=created_by, role=Role.MANAGER).filter(pk=job.project_id)
        if not managed.exists():
            errors["project"] = "you can generate only for projects you manage"
        if not policies_for_user(user=created_by).filter(pk=job.policy_id).exists():
            errors.setdefault("policy", "you can generate only with policies of projects you manage")
    try:
        job.full_clean(exclude=["created_by"])
    except ValidationError as error:
        errors.update(validation_errors(error))
    if errors:
        raise ValidationError(errors)


def generation_job_create(
    *,
    policy: Policy,
    project: Project,
    n: int,
    created_by: AbstractBaseUser | None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
) -> GenerationJob:
    """Create a queued job that gives every prompt of `project` `n` completions from `policy`.

    Prompts that already have `n` completions from the policy are left
    alone, so calling this again for a project that grew generates only
    what is missing. When the job succeeds on a ranking project, tasks are
    made for the prompts that reached K completions.

    Raises ValidationError (by field) and QueueUnavailable (the broker does
    not answer); either way nothing is created. The job is queued once the
    caller's transaction commits.
    """
    job = GenerationJob(
        policy=policy,
        project=project,
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        created_by=created_by,
    )
    generation_job_validate(job=job, created_by=created_by)
    try:
        broker_check()
    except QueueUnavailable:
        raise QueueUnavailable(
            "The job queue (Redis) cannot be reached, so the generation job was not created. "
            "Check that Redis is running and REDIS_URL points at it, then try again."
        ) from None
    with transaction.atomic():
        job.save()
        # What the policy writes into the project makes it one of the project's policies.
        policy.projects.add(project)
        transaction.on_commit(lambda: generation_job_enqueue(job_id=job.pk))
    return job


def generation_job_enqueue(*, job_id: int) -> bool:
    """Publish the job's task on the gpu queue; a job that cannot be queued is failed, saying why."""
    return task_publish(
        GENERATION_JOB_TASK,
        job_id,
        fail=lambda error: generation_job_fail(job_id=job_id, error=error, from_statuses=("queued",)),
    )


def generation_job_claim(*, job_id: int, now: datetime | None = None) -> GenerationJob | None:
    """Move the job to `running` for this delivery, or return None if another delivery owns it (`job_claim`)."""
    return cast("GenerationJob | None", job_claim(GenerationJob, job_id=job_id, now=now))


def generation_job_spec(*, job: GenerationJob) -> Any:
    """The GenerationSpec of the job's current attempt (what its process reads), with this worker's backend."""
    from training.generation import BestOfNSpec, GenerationSpec, PolicySpec, generation_backend_name

    policy = job.policy
    best_of_n = None
    if policy.kind == Policy.Kind.BEST_OF_N:
        link = BestOfN.objects.select_related("base_policy", "reward_model__run__dataset_build").get(
            policy=policy
        )
        best_of_n = BestOfNSpec(
            n=link.n,
            reward_model_id=link.reward_model_id,
            reward_model_path=storage_path_resolve(link.reward_model.path),
            base_policy_id=link.base_policy_id,
            conversational=link.reward_model.run.dataset_build.format == DatasetBuild.Format.CONVERSATIONAL,
        )
        policy = link.base_policy
    return GenerationSpec(
        job_id=job.pk,
        attempt=job.attempts,
        policy_id=job.policy_id,
        project_id=job.project_id,
        n=job.n,
        temperature=job.temperature,
        top_p=job.top_p,
        max_new_tokens=job.max_new_tokens,
        seed=job.seed,
        policy=PolicySpec(
            base_model=storage_path_resolve(policy.base_model),
            adapter=storage_path_resolve(policy.adapter),
            prompt_format=policy_prompt_format(policy=policy),
        ),
        best_of_n=best_of_n,
        backend=generation_backend_name(),
    )


def generation_job_execute(*, job_id: int) -> None:
    """Run one delivery of the job's task: claim it, launch its process, wait, clean up after a crash.

    The process records success, cancellation and its own errors. If it
    dies without doing so (killed, out of memory), the job goes back to
    `queued` while attempts remain (the next attempt skips the prompts
    already done), or fails with the reason. Its GPU is held before the claim.
    """
    with gpu_job_devices(GenerationJob, job_id=job_id, gpus=1, what="generation job") as lease:
        if lease is not None:
            _generation_job_launch(job_id=job_id, lease=lease)


def _generation_job_launch(*, job_id: int, lease: DeviceLease) -> None:
    job = generation_job_claim(job_id=job_id)
    if job is None:
        return
    attempt = job.attempts
    try:
        spec = generation_job_spec(job=job)
    except Exception as error:  # e.g. the best-of-n link or its reward model is gone
        generation_job_fail(job_id=job_id, error=f"{type(error).__name__}: {error}", attempt=attempt)
        return
    # The worker's backend is the job's record of how this attempt samples.
    GenerationJob.objects.filter(pk=job_id, attempts=attempt).update(backend=spec.backend)
    folder = generation_job_dir(job_id=job_id)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / f"spec-attempt-{attempt}.json"
    spec.to_json(spec_path)
    work_path = child_work_write(
        folder / f"work-attempt-{attempt}.json",
        generation_work(project_id=spec.project_id, policy_id=spec.policy_id, n=spec.n),
    )
    gpu_job_process_run(
        GenerationJob,
        job_id=job_id,
        attempt=attempt,
        command=[sys.executable, "-m", "training.generation_process", str(spec_path), str(work_path)],
        lease=lease,
        log_path=folder / f"process-attempt-{attempt}.log",
        what="generation",
        retry_note="retrying the prompts not done yet",
        enqueue=lambda queued_id: generation_job_enqueue(job_id=queued_id),
        events=GenerationEvents(job_id=job_id, attempt=attempt),
    )


def _owned(*, job_id: int, attempt: int) -> Any:
    """The job's row while it is running this attempt (empty otherwise)."""
    return job_owned(GenerationJob, job_id=job_id, attempt=attempt)


def generation_job_started(*, job_id: int, attempt: int, prompts_total: int, prompts_done: int) -> bool:
    """Record the prompt counts an attempt found; False if the job is no longer this attempt's."""
    return (
        _owned(job_id=job_id, attempt=attempt).update(
            prompts_total=prompts_total,
            prompts_done=min(prompts_done, prompts_total),
            heartbeat_at=timezone.now(),
        )
        == 1
    )


def generation_job_heartbeat(*, job_id: int, attempt: int) -> bool:
    """Say the attempt is alive; False if the job is no longer this attempt's."""
    return job_heartbeat(GenerationJob, job_id=job_id, attempt=attempt)


def generation_job_stop_reason(*, job_id: int, attempt: int) -> str | None:
    """Why the attempt should stop between batches: "cancel" (asked to), "lost" (no longer its job), or None."""
    return job_stop_reason(GenerationJob, job_id=job_id, attempt=attempt)


@transaction.atomic
def generation_job_write_batch(
    *, job_id: int, attempt: int, completions: dict[int, list[tuple[str, dict[str, Any]]]]
) -> int | None:
    """Store a batch's completions (prompt id -> [(text, generation settings)]) and move the progress.

    1. Lock the job's row (still running this attempt, or nothing is
       written and None is returned), then the batch's prompts, in id order.
    2. Per prompt, keep only as many new completions (in order) as it lacks
       of `n` from the policy now: another attempt may have written some.
    3. Insert them and move `prompts_done` in the same transaction.

    Returns the number of completions written.
    """
    job = (
        _owned(job_id=job_id, attempt=attempt)
        .select_for_update()
        .only("pk", "policy_id", "project_id", "n")
        .first()
    )
    if job is None:
        return None
    prompt_ids = list(
        Prompt.objects.select_for_update(no_key=True)
        .filter(pk__in=list(completions), project_id=job.project_id)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    have = dict(
        Completion.objects.filter(prompt_id__in=prompt_ids, policy_id=job.policy_id)
        .values("prompt_id")
        .annotate(count=Count("pk"))
        .values_list("prompt_id", "count")
    )
    rows: list[Completion] = []
    done = 0
    for prompt_id in prompt_ids:
        existing = have.get(prompt_id, 0)
        new = completions[prompt_id][: max(job.n - existing, 0)]
        rows += [
            Completion(prompt_id=prompt_id, policy_id=job.policy_id, text=text, generation_settings=settings_)
            for text, settings_ in new
        ]
        # Every prompt of a batch lacked completions when the attempt began.
        done += existing + len(new) >= job.n
    Completion.objects.bulk_create(rows)
    GenerationJob.objects.filter(pk=job_id).update(
        prompts_done=Least(F("prompts_done") + done, F("prompts_total")),
        completions_written=F("completions_written") + len(rows),
        heartbeat_at=timezone.now(),
    )
    return len(rows)


@transaction.atomic
def generation_job_finish(*, job_id: int, attempt: int) -> bool:
    """Mark the attempt's job succeeded; make the tasks its completions allow (a ranking project's, or an A/B session's pairs once it has every output).

    False (and nothing changed) if the job is no longer this attempt's.
    """
    now = timezone.now()
    finished = _owned(job_id=job_id, attempt=attempt).update(
        status=GenerationJob.Status.SUCCEEDED,
        prompts_done=F("prompts_total"),
        heartbeat_at=now,
        finished_at=now,
    )
    if finished != 1:
        return False
    job_ended(GenerationJob, job_id=job_id)
    job = GenerationJob.objects.select_related("project").get(pk=job_id)
    if job.project.kind == Project.Kind.RANKING:
        made = tasks_create_for_project(project=job.project)
        GenerationJob.objects.filter(pk=job_id).update(tasks_created=made)
    elif ab_session_open(project=job.project):
        # The last of an A/B session's outputs: its pairs are made now.
        GenerationJob.objects.filter(pk=job_id).update(tasks_created=job.project.tasks.count())
    return True


def generation_job_mark_cancelled(*, job_id: int, attempt: int) -> bool:
    """The attempt stopped because a cancel was asked for: running → cancelled."""
    return job_mark_cancelled(GenerationJob, job_id=job_id, attempt=attempt)


def generation_job_fail(
    *,
    job_id: int,
    error: str,
    from_statuses: tuple[str, ...] = ("queued", "running"),
    attempt: int | None = None,
) -> bool:
    """Fail the job (compare-and-set from the given statuses, and this attempt if given), keeping the reason."""
    return job_fail(GenerationJob, job_id=job_id, error=error, from_statuses=from_statuses, attempt=attempt)


def generation_job_cancel(*, job: GenerationJob) -> GenerationJob:
    """A queued job is cancelled at once; a running one stops after its current batch.

    Completions already written stay (they are whole: a batch is one transaction).
    """
    job_cancel(GenerationJob, job_id=job.pk)
    job.refresh_from_db()
    return job


def generation_jobs_reap(*, now: datetime | None = None) -> list[int]:
    """Jobs whose heartbeat stopped: back to the queue while attempts remain, else failed. Returns their ids."""
    return jobs_reap(
        GenerationJob,
        retry_note="retrying the prompts not done yet",
        enqueue=lambda job_id: generation_job_enqueue(job_id=job_id),
        now=now,
    )


@transaction.atomic
def best_of_n_policy_create(
    *, base_policy: Policy, reward_model: RewardModel, n: int, name: str = ""
) -> Policy:
    """A policy that samples `n` completions from `base_policy` and keeps the one `reward_model` scores highest.

    Raises ValidationError when the base policy cannot generate (imported, or
    itself best-of-n), n is outside 2–64, or the name is taken.
    """
    errors: dict[str, str] = {}
    if base_policy.kind != Policy.Kind.MODEL or not base_policy.base_model:
        errors["base_policy"] = "the base policy must be a model policy with a base model"
    if not 2 <= int(n) <= 64:
        errors["n"] = "best-of-n samples from 2 to 64 candidates"
    name = (name or f"best-of-{n} {base_policy.name} by {reward_model.name}")[:200]
    if Policy.objects.filter(name=name).exists():
        errors["name"] = f"a policy named {name!r} already exists"
    if errors:
        raise ValidationError(errors)
    policy = Policy.objects.create(
        name=name,
        kind=Policy.Kind.BEST_OF_N,
        base_model=base_policy.base_model,
        adapter=base_policy.adapter,
        generation_settings={
            "best_of_n": {"n": int(n), "base_policy": base_policy.pk, "reward_model": reward_model.pk}
        },
    )
    BestOfN.objects.create(policy=policy, base_policy=base_policy, reward_model=reward_model, n=int(n))
    # It stands on the reward model: it belongs where the reward model's training data came from.
    policy.projects.add(*reward_model.run.dataset_build.projects.all())
    return policy
