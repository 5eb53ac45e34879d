"""Training runs end to end: a real Celery worker on the gpu queue, real run processes, tiny models."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.db import transaction

from annotation.models import Policy
from annotation.roles import Role
from config.storage import storage_path_resolve
from tests.factories import user_with_roles
from tests.training.test_builds_support import judge, make_manager, project_with_prompts, tasks_of
from training.models import DatasetBuild, RewardModel, TrainingRun, TrainingRunMetric
from training.services import (
    QueueUnavailable,
    dataset_build_create,
    dataset_build_run,
    training_run_cancel,
    training_run_claim,
    training_run_create,
    training_run_enqueue,
    training_runs_reap,
)

RUN_TIMEOUT_S = 240
TINY = {
    "max_steps": 4,
    "logging_steps": 1,
    "save_steps": 2,
    "per_device_train_batch_size": 2,
    "max_length": 96,
}


@pytest.fixture
def build(db):  # type: ignore[no-untyped-def]
    """A succeeded dataset build: 16 prompts of 3 completions, ranked by two people."""
    project = project_with_prompts([f"What is {n} plus {n + 1}?" for n in range(16)], name="runs", k=3)
    people = [user_with_roles(Role.LABELER, username=f"judge{index}") for index in range(2)]
    for task in tasks_of(project):
        for person in people:
            judge(task, person, [1, 2, 3])
    manager = make_manager(project, user_with_roles(Role.MANAGER, username="trainer"))
    build = dataset_build_create(
        created_by=manager, name="runs build", projects=[project], test_fraction=0.25
    )
    # Run it here; in tests with a live worker, the worker may have taken it already.
    dataset_build_run(build_id=build.pk)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while build.status not in DatasetBuild.FINISHED_STATUSES and time.monotonic() < deadline:
        time.sleep(0.1)
        build.refresh_from_db()
    assert build.status == DatasetBuild.Status.SUCCEEDED, build.error
    return build


def wait_for(run: TrainingRun, statuses: tuple[str, ...], timeout: float = RUN_TIMEOUT_S) -> TrainingRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.status in statuses:
            return run
        time.sleep(0.2)
    raise AssertionError(
        f"run {run.pk} still {run.status} after {timeout} s; error={run.error!r}\n{run.log_tail}"
    )


def create(build, tiny_model_dir, **fields):  # type: ignore[no-untyped-def]
    fields.setdefault("kind", "reward")
    fields.setdefault("hyperparameters", dict(TINY))
    return training_run_create(
        dataset_build=build, base_model=str(tiny_model_dir), created_by=build.created_by, **fields
    )


worker_test = pytest.mark.django_db(transaction=True)


def start_from_admin(client, build, tiny_model_dir, kind: str, **fields):  # type: ignore[no-untyped-def]
    """A manager picks the build in the admin, runs the action, and submits the run form."""
    client.force_login(build.created_by)
    action = client.post(
        "/admin/training/datasetbuild/", {"action": f"start_{kind}_run", "_selected_action": [build.pk]}
    )
    assert action.status_code == 302, action.content
    form_page = client.get(action["Location"])
    assert form_page.status_code == 200
    assert form_page.context["form"].initial == {"kind": kind, "dataset_build": build.pk}
    values = {
        "kind": kind,
        "dataset_build": build.pk,
        "base_model": str(tiny_model_dir),
        "peft": "lora",
        "trainer": "grouped",
        "gpus": 1,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_length": 96,
        "beta": 0.1,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "seed": 0,
        "max_steps": 4,
        "logging_steps": 1,
        "save_steps": 2,
        **fields,
    }
    created = client.post(action["Location"], values)
    assert created.status_code == 302, created.context["form"].errors
    return TrainingRun.objects.get(pk=int(created["Location"].rstrip("/").split("/")[-1]))


@worker_test
def test_a_reward_run_started_from_the_admin_action_succeeds_and_registers_a_reward_model(
    celery_worker, client, build, tiny_model_dir
):
    run = wait_for(start_from_admin(client, build, tiny_model_dir, "reward"), TrainingRun.TERMINAL)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert run.attempts == 1
    assert run.step == run.total_steps == 4
    assert {"pairwise_accuracy", "ece", "tie_rate"} <= set(run.metrics)
    assert TrainingRunMetric.objects.filter(run=run).exists()
    reward_model = RewardModel.objects.get(run=run)
    # paths are stored relative to the artifacts folder, and resolve on this host
    assert (run.output_dir, reward_model.path) == (
        f"artifacts:runs/{run.pk}",
        f"artifacts:runs/{run.pk}/final",
    )
    assert (Path(storage_path_resolve(reward_model.path)) / "adapter_model.safetensors").exists()
    # the run page shows the result, and the model downloads as an attachment
    page = client.get(f"/training/runs/{run.pk}/")
    assert b"pairwise_accuracy" in page.content
    download = client.get(f"/training/runs/{run.pk}/files/model.zip")
    assert download["Content-Disposition"].startswith("attachment;")
    assert b"".join(download.streaming_content)[:2] == b"PK"  # streamed from the archive the run wrote


@worker_test
def test_a_dpo_run_started_from_the_admin_action_succeeds_and_registers_a_policy(
    celery_worker, client, build, tiny_model_dir
):
    run = wait_for(start_from_admin(client, build, tiny_model_dir, "dpo"), TrainingRun.TERMINAL)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert {"reward_accuracy", "reward_margin"} <= set(run.metrics)
    policy = Policy.objects.get(training_runs=run)
    assert policy.base_model == str(tiny_model_dir)
    assert policy.adapter == f"artifacts:runs/{run.pk}/final"
    assert Path(storage_path_resolve(policy.adapter), "adapter_model.safetensors").exists()


@pytest.mark.django_db
def test_a_labeler_cannot_start_a_run_by_any_door(client, build, tiny_model_dir):
    labeler = user_with_roles(Role.LABELER, username="curious")
    client.force_login(labeler)
    assert client.get("/training/runs/new").status_code == 403
    assert (
        client.post(
            "/admin/training/datasetbuild/", {"action": "start_reward_run", "_selected_action": [build.pk]}
        ).status_code
        == 302
    )
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(labeler)
    response = api.post(
        "/api/training-runs/",
        {"dataset_build": build.pk, "kind": "reward", "base_model": str(tiny_model_dir)},
        format="json",
    )
    assert response.status_code == 404
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_another_projects_manager_sees_no_run(client, build, tiny_model_dir, monkeypatch):
    monkeypatch.setattr("training.services.runs.training_run_enqueue", lambda *, run_id: True)
    run = TrainingRun.objects.create(name="x", kind="reward", dataset_build=build, base_model="m")
    stranger = user_with_roles(Role.MANAGER, username="stranger")
    client.force_login(stranger)
    for url in (
        f"/training/runs/{run.pk}/",
        f"/training/runs/{run.pk}/status",
        f"/api/training-runs/{run.pk}/",
        f"/training/runs/{run.pk}/files/log.txt",
    ):
        assert client.get(url).status_code == 404, url
    assert client.post(f"/training/runs/{run.pk}/cancel").status_code == 404
    run.refresh_from_db()
    assert not run.cancel_requested


@pytest.mark.django_db
def test_the_api_starts_a_run_and_names_a_bad_hyperparameter(build, tiny_model_dir, monkeypatch):
    from rest_framework.test import APIClient

    monkeypatch.setattr("training.services.runs.training_run_enqueue", lambda *, run_id: True)
    api = APIClient()
    api.force_authenticate(build.created_by)
    bad = api.post(
        "/api/training-runs/",
        {
            "dataset_build": build.pk,
            "kind": "reward",
            "base_model": str(tiny_model_dir),
            "hyperparameters": {"learning_rat": 0.1},
        },
        format="json",
    )
    assert bad.status_code == 400
    assert "learning_rat" in str(bad.json())
    good = api.post(
        "/api/training-runs/",
        {
            "dataset_build": build.pk,
            "kind": "dpo",
            "base_model": str(tiny_model_dir),
            "hyperparameters": {"max_steps": 2},
        },
        format="json",
    )
    assert good.status_code == 201, good.json()
    assert good.json()["status"] == "queued"
    cancelled = api.post(f"/api/training-runs/{good.json()['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled"


def _kill_run_process(run: TrainingRun) -> None:
    """SIGKILL the run's whole process group (accelerate launch and the trainer) once it is running."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.status == TrainingRun.Status.RUNNING and run.process_id:
            os.killpg(run.process_id, signal.SIGKILL)
            return
        time.sleep(0.05)
    raise AssertionError("the run never started")


@worker_test
def test_a_killed_run_process_is_retried_and_finishes_never_stuck_running(
    celery_worker, build, tiny_model_dir
):
    run = create(build, tiny_model_dir)
    _kill_run_process(run)
    run = wait_for(run, TrainingRun.TERMINAL)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert run.attempts == 2
    assert "killed by signal 9" in run.error  # the first attempt's fate is kept


@worker_test
def test_a_killed_run_on_its_last_attempt_fails_with_the_reason(
    celery_worker, build, tiny_model_dir, settings
):
    # given a run that already used all but one of its attempts
    run = TrainingRun.objects.create(
        name="last try",
        kind="reward",
        dataset_build=build,
        base_model=str(tiny_model_dir),
        hyperparameters=dict(TINY),
        attempts=settings.TRAINING_MAX_ATTEMPTS - 1,
    )
    TrainingRun.objects.filter(pk=run.pk).update(
        output_dir=str(Path(settings.ARTIFACTS_DIR) / "runs" / str(run.pk))
    )
    training_run_enqueue(run_id=run.pk)
    _kill_run_process(run)
    run = wait_for(run, TrainingRun.TERMINAL)
    assert run.status == TrainingRun.Status.FAILED
    assert "killed by signal 9" in run.error


def trainers_of(run: TrainingRun) -> dict[int, str]:
    """The processes training `run` (not their launchers): pid -> the spec file, which names the attempt."""
    import psutil

    found = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []  # a zombie has none: it is dead
        specs = [arg for arg in cmdline if arg.startswith(f"{run.output_path}/spec-attempt-")]
        if "training.run_process" in cmdline and "accelerate.commands.launch" not in cmdline and specs:
            found[process.pid] = specs[0]
    return found


@contextmanager
def trainers_sampled(run: TrainingRun) -> Iterator[list[dict[int, str]]]:
    """Sample the process table while the block runs; yields the samples of `run`'s trainers."""
    samples: list[dict[int, str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(trainers_of(run))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()


def wait_for_step(run: TrainingRun, step: int) -> TrainingRun:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.status == TrainingRun.Status.RUNNING and run.step >= step:
            return run
        assert run.status not in TrainingRun.TERMINAL, run.error
        time.sleep(0.05)
    raise AssertionError(f"run {run.pk} never reached step {step}")


@worker_test
@pytest.mark.parametrize("gpus", [1, 2])
def test_kill_9_of_the_launcher_kills_its_trainers_and_the_retry_resumes_with_never_two_trainers(
    celery_worker, build, tiny_model_dir, gpus
):
    # given a run training mid-way, with a checkpoint at step 2; with two processes, torch's
    # launcher starts each trainer in a session of its own
    run = create(build, tiny_model_dir, hyperparameters={**TINY, "max_steps": 40}, gpus=gpus)
    with trainers_sampled(run) as samples:
        run = wait_for_step(run, 3)

        # when its recorded process (`accelerate launch`) is killed, and only that one
        os.kill(run.process_id, signal.SIGKILL)
        run = wait_for(run, TrainingRun.TERMINAL)

    # then its trainers died with it, and the retry resumed and finished the run alone
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert (run.attempts, run.step) == (2, 40)
    assert "killed by signal 9" in run.error
    assert "resuming from checkpoint" in (run.output_path / "process-attempt-2.log").read_text()
    assert all(len(set(sample.values())) <= 1 for sample in samples), "two attempts trained at once"
    assert max(len(sample) for sample in samples) == gpus
    assert RewardModel.objects.filter(run=run).count() == 1


@worker_test
def test_sigterm_to_the_run_process_saves_a_checkpoint_and_requeues_the_run_with_its_attempt_given_back(
    celery_worker, build, tiny_model_dir
):
    # given a run training mid-way that saves no checkpoint of its own (enough steps that it is still
    # training when the test, which learns its step from the supervisor, sends the signal)
    run = create(build, tiny_model_dir, hyperparameters={**TINY, "max_steps": 200, "save_steps": 1000})
    with trainers_sampled(run) as samples:
        run = wait_for_step(run, 2)

        # when its trainer gets SIGTERM (a time limit, a worker shutting down)
        (trainer,) = trainers_of(run)
        os.kill(trainer, signal.SIGTERM)
        run = wait_for(run, TrainingRun.TERMINAL)

    # then it stopped with a checkpoint, went back to the queue without using up an attempt, and resumed
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert (run.attempts, run.attempts_given_back) == (2, 1)
    assert "stopped by SIGTERM" in run.error
    assert "resuming from checkpoint" in (run.output_path / "process-attempt-2.log").read_text()
    assert max(len(sample) for sample in samples) == 1


@worker_test
def test_a_worker_shutting_down_stops_its_run_which_another_worker_resumes_with_the_attempt_given_back(
    celery_worker, build, tiny_model_dir, settings, tmp_path
):
    import subprocess
    import sys

    from celery.utils.nodenames import host_format
    from django.db import connection

    from tests.conftest import REPO_ROOT, _wait_for_worker, worker_database_url
    from training.tasks import training_run_execute

    # given a run training on a worker of its own (prefork, as in production), saving no checkpoint itself
    env = {**os.environ, "DATABASE_URL": worker_database_url(connection.settings_dict)}
    command = [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", "gpu-leaving"]
    command += ["--concurrency", "1", "-n", "leaving@%h", "--loglevel", "INFO"]
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_worker(worker, host_format("leaving@%h"), tmp_path / "worker.log")
        run = TrainingRun.objects.create(
            name="leaving",
            kind="reward",
            dataset_build=build,
            base_model=str(tiny_model_dir),
            hyperparameters={**TINY, "max_steps": 40, "save_steps": 1000},
        )
        TrainingRun.objects.filter(pk=run.pk).update(
            output_dir=str(Path(settings.ARTIFACTS_DIR) / "runs" / str(run.pk))
        )
        training_run_execute.apply_async((run.pk,), queue="gpu-leaving")
        run = wait_for_step(run, 2)

        # when that worker is told to shut down (warm)
        worker.terminate()
        assert worker.wait(timeout=RUN_TIMEOUT_S) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    run = wait_for(run, TrainingRun.TERMINAL)

    # then the run saved a checkpoint, went back to the queue, and the other worker resumed it
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert (run.attempts, run.attempts_given_back) == (2, 1)
    assert "stopped by SIGTERM" in run.error
    assert "resuming from checkpoint" in (run.output_path / "process-attempt-2.log").read_text()


@worker_test
def test_a_second_delivery_of_the_same_message_does_nothing(celery_worker, build, tiny_model_dir):
    from config.celery import ping

    run = wait_for(create(build, tiny_model_dir), TrainingRun.TERMINAL)
    assert training_run_enqueue(run_id=run.pk)
    ping.apply_async(queue="gpu").get(timeout=60)  # the solo worker handled the duplicate before this
    run.refresh_from_db()
    assert (run.status, run.attempts) == (TrainingRun.Status.SUCCEEDED, 1)
    assert RewardModel.objects.filter(run=run).count() == 1


@worker_test
def test_cancel_stops_a_running_run_within_a_few_steps(celery_worker, build, tiny_model_dir):
    run = create(build, tiny_model_dir, hyperparameters={**TINY, "max_steps": 400})
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while run.step < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
        run.refresh_from_db()
    training_run_cancel(run=run)
    run = wait_for(run, TrainingRun.TERMINAL)
    assert run.status == TrainingRun.Status.CANCELLED
    assert run.step < 400


@worker_test
def test_a_two_process_run_through_the_ddp_configuration_completes_on_a_worker_without_gpus(
    celery_worker, build, tiny_model_dir
):
    run = wait_for(create(build, tiny_model_dir, gpus=2, distributed="ddp"), TrainingRun.TERMINAL)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    log = (run.output_path / "process-attempt-1.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=''" in log  # the worker owns no GPU: its processes see none
    assert "process rank 0 of 2 started" in log
    assert "process rank 1 of 2 started" in log


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_transaction_enqueues_nothing(build, tiny_model_dir, monkeypatch):
    published = []
    monkeypatch.setattr(
        "training.services.runs.training_run_enqueue", lambda *, run_id: published.append(run_id)
    )
    with pytest.raises(RuntimeError), transaction.atomic():
        create(build, tiny_model_dir)
        raise RuntimeError("the admin request failed after the run was saved")
    assert published == []
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_an_unreachable_queue_is_said_clearly_and_leaves_no_run(build, tiny_model_dir, monkeypatch):
    monkeypatch.setattr("config.health.broker_reachable", lambda: False)
    with pytest.raises(QueueUnavailable, match="Redis"):
        create(build, tiny_model_dir)
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_bad_hyperparameters_are_refused_naming_the_field(build, tiny_model_dir):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="learning_rate"):
        create(build, tiny_model_dir, hyperparameters={"learning_rate": -1})
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_a_run_is_claimed_once_even_when_delivered_twice(build, tiny_model_dir):
    run = TrainingRun.objects.create(name="x", kind="reward", dataset_build=build, base_model="m")
    assert training_run_claim(run_id=run.pk) is not None
    assert training_run_claim(run_id=run.pk) is None
    run.refresh_from_db()
    assert (run.status, run.attempts) == (TrainingRun.Status.RUNNING, 1)


@pytest.mark.django_db
def test_the_reaper_requeues_a_run_whose_heartbeat_stopped_and_fails_it_when_out_of_attempts(
    build, settings, django_capture_on_commit_callbacks, monkeypatch
):
    from datetime import timedelta

    from django.utils import timezone

    enqueued = []
    monkeypatch.setattr(
        "training.services.runs.training_run_enqueue", lambda *, run_id: enqueued.append(run_id)
    )
    old = timezone.now() - timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S + 5)
    retry = TrainingRun.objects.create(
        name="r",
        kind="reward",
        dataset_build=build,
        base_model="m",
        status="running",
        attempts=1,
        heartbeat_at=old,
    )
    spent = TrainingRun.objects.create(
        name="s",
        kind="reward",
        dataset_build=build,
        base_model="m",
        status="running",
        attempts=settings.TRAINING_MAX_ATTEMPTS,
        heartbeat_at=old,
    )
    alive = TrainingRun.objects.create(
        name="a",
        kind="reward",
        dataset_build=build,
        base_model="m",
        status="running",
        attempts=1,
        heartbeat_at=timezone.now(),
    )
    with django_capture_on_commit_callbacks(execute=True):
        reaped = training_runs_reap()
    assert sorted(reaped) == sorted([retry.pk, spent.pk])
    for run in (retry, spent, alive):
        run.refresh_from_db()
    assert (retry.status, spent.status, alive.status) == ("queued", "failed", "running")
    assert "heartbeat stopped" in spent.error
    assert enqueued == [retry.pk]


@pytest.mark.django_db
def test_a_build_left_running_by_a_dead_worker_is_failed_by_the_reaper(build, settings):
    from datetime import timedelta

    from django.utils import timezone

    from training.services import dataset_builds_reap

    stuck = DatasetBuild.objects.create(
        name="stuck",
        created_by=build.created_by,
        status="running",
        started_at=timezone.now() - timedelta(seconds=settings.DATASET_BUILD_TIME_LIMIT_S + 1),
    )
    fresh = DatasetBuild.objects.create(
        name="fresh", created_by=build.created_by, status="running", started_at=timezone.now()
    )
    assert dataset_builds_reap() == [stuck.pk]
    stuck.refresh_from_db()
    fresh.refresh_from_db()
    assert (stuck.status, fresh.status) == ("failed", "running")
    assert "did not finish" in stuck.error
