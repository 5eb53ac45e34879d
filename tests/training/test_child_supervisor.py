"""A generation job's supervisor with a fake child program (no torch, no worker): the child's batches
are written fenced by its attempt; a child whose job was taken over is killed and nothing it reports
is written; a child that reports nothing before it dies sends its job back to the queue; a cancel
reaches the child through its supervisor; SIGTERM sends the job back with its attempt given back."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from annotation.models import Completion, Policy
from annotation.roles import Role
from tests.factories import user_with_roles
from tests.training.test_builds_support import make_manager, project_with_prompts
from training.models import GenerationJob
from training.services import generation_job_execute

WAIT_S = 60

# A generation child that reports what a real one would, without a model: started, then (once the
# test creates `release`) one completion for every listed prompt, then its result; or, first,
# `stopped` when the stop file (a cancel) or SIGTERM asks it to.
FAKE_CHILD = """
import json, sys, time
from pathlib import Path
from training.gpu_job_process import ChildChannel

spec, work, release = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
assert "django" not in sys.modules
channel = ChildChannel()
channel.on_sigterm()
channel.start()
channel.emit("started", prompts_total=work["total"], prompts_done=work["total"] - len(work["prompts"]))
channel.log("loading the model")
while not release.exists():
    if channel.cancel_asked() or channel.signalled.is_set():
        channel.emit("stopped", cause="cancel" if channel.cancel_asked() else "signal")
        channel.stop()
        sys.exit(0)
    time.sleep(0.05)
completions = {p["prompt_id"]: [[f"answer to {p['prompt_id']}", {"sample_index": 0}]] for p in work["prompts"]}
channel.emit("batch", completions=completions)
channel.emit("result")
channel.stop()
"""


@pytest.fixture
def job(db: None, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GenerationJob:
    """A queued job for one completion of each of three prompts, whose child is FAKE_CHILD."""
    settings.TRAINING_HEARTBEAT_TIMEOUT_S = 2  # the child heartbeats every 0.2 s
    settings.ARTIFACTS_DIR = str(tmp_path / "artifacts")
    project = project_with_prompts([f"What is {n} plus 1?" for n in range(3)], name="fake", k=2)
    make_manager(project, user_with_roles(Role.MANAGER, username="m"))
    policy = Policy.objects.create(name="fake", base_model="m")
    monkeypatch.setattr("training.services.generation.generation_job_enqueue", lambda *, job_id: True)

    from training.services import supervisor

    real = supervisor.gpu_job_process_run

    def with_fake_child(model: Any, *, command: list[str], **values: Any) -> None:
        spec_path, work_path = command[-2:]
        fake = [sys.executable, "-c", FAKE_CHILD, spec_path, work_path, str(tmp_path / "release")]
        real(model, command=fake, **values)

    monkeypatch.setattr("training.services.generation.gpu_job_process_run", with_fake_child)
    return GenerationJob.objects.create(
        policy=policy, project=project, n=1, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0
    )


def supervise_in_thread(job: GenerationJob) -> threading.Thread:
    def execute() -> None:
        try:
            generation_job_execute(job_id=job.pk)
        finally:
            connection.close()

    thread = threading.Thread(target=execute, daemon=True)
    thread.start()
    return thread


def wait_until(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {WAIT_S} s"
        time.sleep(0.05)


@pytest.mark.django_db(transaction=True)
def test_the_childs_batches_and_result_are_written_by_its_supervisor(
    job: GenerationJob, tmp_path: Path
) -> None:
    supervisor = supervise_in_thread(job)
    wait_until(lambda: GenerationJob.objects.get(pk=job.pk).prompts_total == 3, "the started event")
    (tmp_path / "release").touch()
    supervisor.join(WAIT_S)

    job.refresh_from_db()
    assert (job.status, job.attempts, job.prompts_done, job.completions_written) == ("succeeded", 1, 3, 3)
    assert Completion.objects.filter(policy=job.policy).count() == 3


@pytest.mark.django_db(transaction=True)
def test_a_child_whose_job_was_taken_over_is_killed_and_nothing_it_reports_is_written(
    job: GenerationJob, tmp_path: Path
) -> None:
    # given attempt 1's child, started
    supervisor = supervise_in_thread(job)
    wait_until(lambda: GenerationJob.objects.get(pk=job.pk).prompts_total == 3, "the started event")

    # when attempt 2 takes the job over, and then the child would report its batch
    GenerationJob.objects.filter(pk=job.pk).update(attempts=2)
    supervisor.join(WAIT_S)
    (tmp_path / "release").touch()

    # then the supervisor killed it, and nothing of attempt 1 is written
    assert not supervisor.is_alive()
    job.refresh_from_db()
    assert (job.status, job.attempts, job.completions_written) == ("running", 2, 0)
    assert not Completion.objects.filter(policy=job.policy).exists()


@pytest.mark.django_db(transaction=True)
def test_a_child_that_dies_before_reporting_an_outcome_sends_its_job_back_to_the_queue(
    job: GenerationJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requeued: list[int] = []
    monkeypatch.setattr(
        "training.services.generation.generation_job_enqueue", lambda *, job_id: requeued.append(job_id)
    )
    supervisor = supervise_in_thread(job)
    wait_until(lambda: GenerationJob.objects.get(pk=job.pk).prompts_total == 3, "the started event")

    # when the child is killed (kill -9) before its batch
    import psutil

    (child,) = [
        process
        for process in psutil.process_iter(["cmdline"])
        if str(tmp_path / "release") in (process.info["cmdline"] or [])
    ]
    child.kill()
    supervisor.join(WAIT_S)

    # then the job is queued again for another attempt, with what happened kept
    job.refresh_from_db()
    assert (job.status, job.attempts) == ("queued", 1)
    assert "killed by signal 9" in job.error
    assert requeued == [job.pk]


def child_of(tmp_path: Path) -> Any:
    import psutil

    (child,) = [
        process
        for process in psutil.process_iter(["cmdline"])
        if str(tmp_path / "release") in (process.info["cmdline"] or [])
    ]
    return child


@pytest.mark.django_db(transaction=True)
def test_a_cancel_reaches_the_child_through_its_supervisor_and_the_job_is_cancelled(
    job: GenerationJob, tmp_path: Path
) -> None:
    from training.services import generation_job_cancel

    supervisor = supervise_in_thread(job)
    wait_until(lambda: GenerationJob.objects.get(pk=job.pk).prompts_total == 3, "the started event")

    generation_job_cancel(job=GenerationJob.objects.get(pk=job.pk))
    supervisor.join(WAIT_S)

    job.refresh_from_db()
    assert (job.status, job.attempts) == ("cancelled", 1)
    assert not Completion.objects.filter(policy=job.policy).exists()


@pytest.mark.django_db(transaction=True)
def test_sigterm_to_the_child_sends_the_job_back_with_its_attempt_given_back_never_cancelled(
    job: GenerationJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requeued: list[int] = []
    monkeypatch.setattr(
        "training.services.generation.generation_job_enqueue", lambda *, job_id: requeued.append(job_id)
    )
    supervisor = supervise_in_thread(job)
    wait_until(lambda: GenerationJob.objects.get(pk=job.pk).prompts_total == 3, "the started event")

    child_of(tmp_path).terminate()
    supervisor.join(WAIT_S)

    job.refresh_from_db()
    assert (job.status, job.attempts, job.attempts_given_back) == ("queued", 1, 1)
    assert "stopped by SIGTERM" in job.error
    assert requeued == [job.pk]


def test_a_jobs_process_key_names_its_database_so_another_deployment_on_the_host_is_never_taken_for_leftovers(
    settings: Any,
) -> None:
    from django.db import connections

    from training.services.supervisor import _job_key

    here = _job_key(GenerationJob, 1)
    assert here.endswith(":training.generationjob:1")
    original = connections["default"].settings_dict["NAME"]
    connections["default"].settings_dict["NAME"] = f"{original}-another-deployment"
    try:
        elsewhere = _job_key(GenerationJob, 1)
    finally:
        connections["default"].settings_dict["NAME"] = original
    assert elsewhere != here and elsewhere.endswith(":training.generationjob:1")
    assert _job_key(GenerationJob, 1) == here
