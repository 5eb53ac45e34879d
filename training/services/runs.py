"""Training runs: create, publish, claim, launch (`accelerate launch` of `training.run_process`), and the run's fenced writes.

A run moves queued → running → succeeded | failed | cancelled with the GPU
jobs' lifecycle (`training.services.jobs`); its process group is watched by
`training.services.supervisor`.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from annotation.models import Policy
from config.storage import storage_path_resolve, storage_path_stored
from training.archives import run_archive_path, run_archive_publish, run_archive_stage
from training.job_events import job_ended
from training.models import DatasetBuild, RewardModel, TrainingRun, TrainingRunMetric
from training.placement import DeviceLease
from training.run_settings import run_settings_problems
from training.selectors import dataset_build_dir
from training.services.child_events import RunEvents
from training.services.jobs import (
    TRAINING_RUN_TASK,
    broker_check,
    job_cancel,
    job_claim,
    job_fail,
    job_mark_cancelled,
    job_owned,
    job_requeue,
    job_stop_reason,
    jobs_reap,
    task_publish,
)
from training.services.supervisor import gpu_job_devices, gpu_job_process_run

logger = logging.getLogger(__name__)


def training_run_files(*, build: DatasetBuild) -> dict[str, str | None]:
    """The dataset files a run reads: TRL pairs (train, test), grouped K-wise rows (train, test) and SFT rows."""
    folder = dataset_build_dir(build_id=build.pk)

    def present(path: Path) -> str | None:
        return str(path) if path.exists() and path.stat().st_size else None

    return {
        "train_file": str(folder / "pairs" / "train.jsonl"),
        "test_file": present(folder / "pairs" / "test.jsonl"),
        "grouped_train_file": present(folder / "grouped" / "train.jsonl"),
        "grouped_test_file": present(folder / "grouped" / "test.jsonl"),
        "sft_train_file": present(folder / "sft" / "train.jsonl"),
        "sft_test_file": present(folder / "sft" / "test.jsonl"),
    }


def training_run_spec(*, run: TrainingRun) -> Any:
    """The RunSpec for this run (validated: a bad hyper-parameter raises ValueError naming it)."""
    from training.runner import RunSpec

    return RunSpec.with_defaults(
        kind=run.kind,
        peft=run.peft,
        run_id=run.pk or 0,
        base_model=storage_path_resolve(run.base_model),
        output_dir=str(run.output_path)
        if run.output_dir
        else str(Path(settings.ARTIFACTS_DIR) / "runs" / "pending"),
        attempt=run.attempts,
        trainer=run.trainer,
        # The grouped trainer reads margins from the ranks the way the build chose to.
        grouped_margin=run.dataset_build.margin,
        # RL: the reward model's final folder, resolved on this host.
        reward_model_path=storage_path_resolve(run.against_reward_model.path)
        if run.against_reward_model_id and run.against_reward_model
        else None,
        **training_run_files(build=run.dataset_build),
        **run.hyperparameters,
    )


def training_run_create(
    *,
    dataset_build: DatasetBuild,
    kind: str,
    base_model: str,
    created_by: AbstractBaseUser | None,
    peft: str = "lora",
    hyperparameters: dict[str, Any] | None = None,
    name: str = "",
    gpus: int = 1,
    distributed: str = TrainingRun.Distributed.DDP,
    trainer: str = TrainingRun.Trainer.GROUPED,
    against_reward_model: RewardModel | None = None,
) -> TrainingRun:
    """Create a queued run and enqueue it once the transaction commits.

    An RL run names the trained reward model it is optimised against
    (`against_reward_model`); other kinds take none.

    Checks the broker first, so an unreachable queue leaves nothing behind,
    and validates the hyper-parameters as the run process will (ValidationError).
    """
    if dataset_build.status != DatasetBuild.Status.SUCCEEDED:
        raise ValidationError({"dataset_build": "the dataset build has not succeeded yet"})
    if gpus > settings.TRAINING_MAX_GPUS:
        raise ValidationError(
            {
                "gpus": f"at most {settings.TRAINING_MAX_GPUS}: no GPU worker owns more "
                f"(TRAINING_MAX_GPUS); asked for {gpus}"
            }
        )
    if kind == TrainingRun.Kind.RL and against_reward_model is None:
        raise ValidationError({"against_reward_model": "an RL run needs a trained reward model"})
    if kind != TrainingRun.Kind.RL and against_reward_model is not None:
        raise ValidationError({"against_reward_model": "only RL runs are optimised against a reward model"})
    run = TrainingRun(
        name=name or f"{kind} on {dataset_build.name or f'build {dataset_build.pk}'}",
        kind=kind,
        dataset_build=dataset_build,
        base_model=storage_path_stored(base_model),
        peft=peft,
        trainer=trainer,
        hyperparameters=dict(hyperparameters or {}),
        gpus=gpus,
        distributed=distributed,
        created_by=created_by,
        against_reward_model=against_reward_model,
    )
    run.full_clean(exclude=["created_by"])
    # Each bad setting is named on its own field (the form shows it there); only run settings may be given,
    # so no caller reaches the spec's files and paths through the hyper-parameters.
    problems = run_settings_problems(run.hyperparameters)
    if problems:
        raise ValidationError(problems)
    try:
        training_run_spec(run=run)
    except (TypeError, ValueError) as error:
        raise ValidationError({"hyperparameters": str(error)}) from None
    broker_check()
    with transaction.atomic():
        run.save()
        run.output_dir = storage_path_stored(Path(settings.ARTIFACTS_DIR) / "runs" / str(run.pk))
        run.save(update_fields=["output_dir"])
        transaction.on_commit(lambda: training_run_enqueue(run_id=run.pk))
    return run


def training_run_enqueue(*, run_id: int) -> bool:
    """Publish the run's task on the gpu queue; a run that cannot be queued is failed, saying why."""
    return task_publish(
        TRAINING_RUN_TASK,
        run_id,
        fail=lambda error: training_run_fail(run_id=run_id, error=error, from_statuses=("queued",)),
    )


def training_run_claim(*, run_id: int, now: datetime | None = None) -> TrainingRun | None:
    """Move the run to `running` for this delivery, or return None if another delivery owns it.

    The GPU jobs' claim (`job_claim`): a queued run is claimed by
    compare-and-set, a running one only when its heartbeat stopped, and each
    claim is one attempt more; the attempt number fences every later write.
    """
    return cast("TrainingRun | None", job_claim(TrainingRun, job_id=run_id, now=now))


# accelerate's configuration for each multi-GPU strategy, shipped with the code.
ACCELERATE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "accelerate"


def training_run_accelerate_config(*, distributed: str) -> Path:
    """The shipped `accelerate launch --config_file` of a multi-GPU strategy (ddp, fsdp, deepspeed_zero2/3)."""
    return ACCELERATE_CONFIG_DIR / f"{TrainingRun.Distributed(distributed).value}.yaml"


def training_run_command(*, run: TrainingRun, spec_path: Path) -> list[str]:
    """`accelerate launch` of the run process: one process per GPU (or CPU process where there is none).

    Several processes share the work as the run's strategy says (the shipped
    configuration files: torch.distributed with NCCL on GPUs, gloo on CPUs).
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    if run.gpus > 1:
        command += ["--config_file", str(training_run_accelerate_config(distributed=run.distributed))]
    if not run.distributed.startswith("deepspeed") or run.gpus == 1:
        # DeepSpeed takes its precision from its own file, and refuses it twice.
        command += ["--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "--num_processes", str(run.gpus)]
    return [*command, "-m", "training.run_process", str(spec_path)]


def training_run_execute(*, run_id: int) -> None:
    """Run one delivery of the run's task: claim it, launch its process group, wait, clean up after it.

    The process records success, cancellation and its own errors, each
    fenced by its attempt. If any process of the group dies without the run
    recording an outcome (killed, out of memory), the whole group is killed
    and the run goes back to `queued` while attempts remain, to resume from
    its newest complete checkpoint, or fails with the reason
    (`gpu_job_process_run`). The run's GPUs are held before the claim
    (`gpu_job_devices`): a run waiting for cards stays queued.
    """
    row = TrainingRun.objects.filter(pk=run_id).values("gpus").first()
    if row is None:
        return
    with gpu_job_devices(TrainingRun, job_id=run_id, gpus=row["gpus"], what="run") as lease:
        if lease is not None:
            _training_run_launch(run_id=run_id, lease=lease)


def _training_run_launch(*, run_id: int, lease: DeviceLease) -> None:
    run = training_run_claim(run_id=run_id)
    if run is None:
        return
    attempt = run.attempts
    try:
        spec = training_run_spec(run=run)
        output = run.output_path
        output.mkdir(parents=True, exist_ok=True)
        spec_path = output / f"spec-attempt-{attempt}.json"
        spec.to_json(spec_path)
    except Exception as error:
        training_run_fail(run_id=run_id, error=f"{type(error).__name__}: {error}", attempt=attempt)
        return
    gpu_job_process_run(
        TrainingRun,
        job_id=run_id,
        attempt=attempt,
        command=training_run_command(run=run, spec_path=spec_path),
        lease=lease,
        log_path=output / f"process-attempt-{attempt}.log",
        what="run",
        retry_note="retrying from the last checkpoint",
        enqueue=lambda queued_id: training_run_enqueue(run_id=queued_id),
        events=RunEvents(job_id=run_id, attempt=attempt),
    )


def training_run_started(*, run_id: int, attempt: int, total_steps: int, log_tail: str) -> bool:
    """Record the steps the attempt will train; False if the run is no longer this attempt's."""
    rows = job_owned(TrainingRun, job_id=run_id, attempt=attempt)
    return rows.update(total_steps=total_steps, log_tail=log_tail, heartbeat_at=timezone.now()) == 1


@transaction.atomic
def training_run_progress(
    *, run_id: int, attempt: int, step: int, total_steps: int, metrics: dict[str, float], log_tail: str
) -> bool:
    """Record a step and its metrics; False (and nothing written) if the run is no longer this attempt's."""
    step = min(step, total_steps) if total_steps else step
    moved = job_owned(TrainingRun, job_id=run_id, attempt=attempt).update(
        step=step, total_steps=max(total_steps, step), log_tail=log_tail, heartbeat_at=timezone.now()
    )
    if moved != 1:
        return False
    if metrics:
        TrainingRunMetric.objects.create(run_id=run_id, step=step, values=metrics)
    return True


def training_run_heartbeat(*, run_id: int, attempt: int, log_tail: str | None = None) -> bool:
    """Say the attempt is alive (and what it printed last); False if the run is no longer this attempt's."""
    fields: dict[str, Any] = {"heartbeat_at": timezone.now()}
    if log_tail is not None:
        fields["log_tail"] = log_tail
    return job_owned(TrainingRun, job_id=run_id, attempt=attempt).update(**fields) == 1


def training_run_stop_reason(*, run_id: int, attempt: int) -> str | None:
    """Why the attempt should stop at its next step: "cancel" (asked to), "lost" (no longer its run), or None."""
    return job_stop_reason(TrainingRun, job_id=run_id, attempt=attempt)


def training_run_mark_cancelled(*, run_id: int, attempt: int) -> bool:
    """The attempt stopped because a cancel was asked for: running → cancelled (never without the ask)."""
    return job_mark_cancelled(TrainingRun, job_id=run_id, attempt=attempt)


def training_run_requeue_stopped(*, run_id: int, attempt: int, reason: str) -> bool:
    """The attempt stopped on a signal with a checkpoint saved: back to `queued`, the attempt given back.

    A cancel asked for meanwhile wins: the run is cancelled instead. False if
    the run is no longer this attempt's.
    """
    return job_requeue(
        TrainingRun,
        job_id=run_id,
        attempt=attempt,
        reason=reason,
        give_back=True,
        enqueue=lambda queued_id: training_run_enqueue(run_id=queued_id),
    )


def training_run_finish(*, run_id: int, attempt: int, result: Any) -> bool:
    """Record the attempt's trained result and register what it made (a RewardModel or a Policy).

    The final folder is zipped once here, into the run's folder, so that a
    download streams `model.zip` from disk: staged under a temporary name
    before the transaction (no row lock held while zipping) and renamed into
    place only once the attempt is known to still own the run. False, with
    nothing registered and nothing archived, if the run is no longer this
    attempt's: a stale attempt's weights are never the run's result.
    """
    row = job_owned(TrainingRun, job_id=run_id, attempt=attempt).only("id", "output_dir").first()
    if row is None:
        return False
    archive = run_archive_path(run=row)
    staged: Path | None = None
    final_dir = Path(result.final_dir) if result.final_dir else None
    if row.output_dir and final_dir is not None and final_dir.is_dir():
        try:
            staged = run_archive_stage(final_dir=final_dir, archive=archive)
        except OSError:
            # The weights are registered all the same; the download says the archive is missing.
            logger.exception("run %s: could not write %s", run_id, archive)
    try:
        return _training_run_finish_record(run_id=run_id, attempt=attempt, result=result, staged=staged)
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)  # renamed away when the run was this attempt's


@transaction.atomic
def _training_run_finish_record(*, run_id: int, attempt: int, result: Any, staged: Path | None) -> bool:
    now = timezone.now()
    run = job_owned(TrainingRun, job_id=run_id, attempt=attempt).select_for_update().first()
    if run is None:
        return False
    if staged is not None:
        run_archive_publish(staged=staged, archive=run_archive_path(run=run))
    run.status = TrainingRun.Status.SUCCEEDED
    run.step = run.total_steps = max(run.total_steps, result.steps)
    if run.kind == TrainingRun.Kind.REWARD:
        RewardModel.objects.create(
            name=f"rm-{run.pk}",
            run=run,
            base_model=run.base_model,
            path=storage_path_stored(result.final_dir),
            metrics=result.metrics,
        )
    else:
        run.policy = Policy.objects.create(
            name=f"{run.kind}-{run.pk}",
            kind=Policy.Kind.MODEL,
            base_model=run.base_model,
            adapter=storage_path_stored(result.final_dir) if run.peft != TrainingRun.Peft.FULL else "",
            generation_settings={},
        )
        if run.peft == TrainingRun.Peft.FULL:
            run.policy.base_model = storage_path_stored(result.final_dir)
            run.policy.save(update_fields=["base_model"])
        # The policy belongs to the projects whose judgments trained it.
        run.policy.projects.add(*run.dataset_build.projects.all())
    run.metrics = result.metrics
    run.heartbeat_at = run.finished_at = now
    run.save()
    job_ended(TrainingRun, job_id=run_id)
    return True


def training_run_fail(
    *,
    run_id: int,
    error: str,
    from_statuses: tuple[str, ...] = ("queued", "running"),
    attempt: int | None = None,
) -> bool:
    """Fail the run (compare-and-set from the given statuses, and this attempt if given), keeping the reason."""
    return job_fail(TrainingRun, job_id=run_id, error=error, from_statuses=from_statuses, attempt=attempt)


def training_run_cancel(*, run: TrainingRun) -> TrainingRun:
    """A queued run is cancelled at once; a running one is asked to stop at its next step."""
    job_cancel(TrainingRun, job_id=run.pk)
    run.refresh_from_db()
    return run


def training_runs_reap(*, now: datetime | None = None) -> list[int]:
    """Runs whose heartbeat stopped: back to the queue while attempts remain, else failed. Returns their ids."""
    return jobs_reap(
        TrainingRun,
        retry_note="retrying from the last checkpoint",
        enqueue=lambda run_id: training_run_enqueue(run_id=run_id),
        now=now,
    )
