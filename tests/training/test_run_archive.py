"""A run's model.zip is written once, when the run finishes, and every download streams that file."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from django.test import Client
from pytest_django import Settings

from annotation.roles import Role
from tests.factories import user_with_roles
from tests.training.test_builds_support import make_manager, project_with_prompts
from training.archives import run_archive_path
from training.models import DatasetBuild, TrainingRun
from training.runner import RunResult
from training.services import training_run_claim, training_run_finish


@pytest.fixture
def run(db: None, settings: Settings, tmp_path: Path) -> TrainingRun:
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    project = project_with_prompts(["Which is kinder?"], k=2)
    manager = make_manager(project, user_with_roles(Role.MANAGER, username="mgr"))
    build = DatasetBuild.objects.create(name="b", created_by=manager, status="succeeded")
    build.projects.set([project])
    run = TrainingRun.objects.create(
        name="r",
        kind="reward",
        dataset_build=build,
        base_model="m",
        trainer="trl",
        created_by=manager,
        output_dir=str(tmp_path / "artifacts" / "runs" / "1"),
    )
    training_run_claim(run_id=run.pk)
    run.refresh_from_db()
    final = run.output_path / "final"
    (final / "nested").mkdir(parents=True)
    (final / "adapter_model.safetensors").write_bytes(b"weights" * 1000)
    (final / "nested" / "tokenizer.json").write_text("{}")
    return run


def result(run: TrainingRun) -> RunResult:
    return RunResult(
        status="succeeded", metrics={}, final_dir=str(run.output_path / "final"), steps=4, checkpoint_dir=None
    )


def manager_client(run: TrainingRun) -> Client:
    client = Client()
    client.force_login(run.created_by)
    return client


def leftovers(run: TrainingRun) -> list[str]:
    return sorted(path.name for path in run.output_path.iterdir() if path.name.endswith(".partial"))


def test_the_archive_is_written_once_at_the_finish_and_streamed_on_every_download(
    run: TrainingRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert training_run_finish(run_id=run.pk, attempt=1, result=result(run))
    archive = run_archive_path(run=run)
    assert archive.is_file() and leftovers(run) == []
    with zipfile.ZipFile(archive) as zipped:
        assert sorted(zipped.namelist()) == ["adapter_model.safetensors", "nested/tokenizer.json"]
        assert zipped.read("adapter_model.safetensors") == b"weights" * 1000
    written = archive.stat()

    # the web process zips nothing: any archive built during a download fails the test
    def no_zipping(*args: object, **kwargs: object) -> None:
        raise AssertionError("the download built an archive")

    monkeypatch.setattr(zipfile, "ZipFile", no_zipping)
    client = manager_client(run)
    bodies = []
    for _ in range(2):
        response = client.get(f"/training/runs/{run.pk}/files/model.zip")
        assert response.status_code == 200
        assert response.streaming  # a FileResponse reading the file, not a body held in memory
        assert response["Content-Disposition"] == f'attachment; filename="run-{run.pk}-model.zip"'
        assert response["Content-Type"] == "application/zip"
        bodies.append(b"".join(response.streaming_content))
    monkeypatch.undo()

    assert bodies[0] == bodies[1] == archive.read_bytes()
    after = archive.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        written.st_ino,
        written.st_mtime_ns,
        written.st_size,
    )
    assert zipfile.ZipFile(io.BytesIO(bodies[0])).testzip() is None


def test_a_download_before_the_archive_exists_says_so(run: TrainingRun) -> None:
    # a run recorded as succeeded whose archive was never written (e.g. finished before archives existed)
    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.SUCCEEDED)
    response = manager_client(run).get(f"/training/runs/{run.pk}/files/model.zip")
    assert response.status_code == 409
    assert b"archive has not been written yet" in response.content


def test_a_run_not_yet_succeeded_has_no_model_to_download(run: TrainingRun) -> None:
    assert manager_client(run).get(f"/training/runs/{run.pk}/files/model.zip").status_code == 404


def test_a_stale_attempt_archives_nothing(run: TrainingRun) -> None:
    TrainingRun.objects.filter(pk=run.pk).update(attempts=2)
    assert not training_run_finish(run_id=run.pk, attempt=1, result=result(run))
    assert not run_archive_path(run=run).exists()
    assert leftovers(run) == []


def test_a_finish_whose_archive_cannot_be_written_still_records_the_run(
    run: TrainingRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(**kwargs: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("training.services.runs.run_archive_stage", full_disk)
    assert training_run_finish(run_id=run.pk, attempt=1, result=result(run))
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.SUCCEEDED
    assert not run_archive_path(run=run).exists()
