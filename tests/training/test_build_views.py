"""The doors to dataset builds: pages, downloads, the JSON API and the admin, and who may use them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import AbstractUser
from django.test import Client
from pytest_django import Settings

from annotation.models import Project
from annotation.roles import Role
from tests.factories import user_with_roles
from tests.training.test_builds_support import judge, make_manager, project_with_prompts, run_build, tasks_of
from training.models import DatasetBuild

pytestmark = pytest.mark.django_db

Login = Callable[[Client, AbstractUser], Client]
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def artifacts(settings: Settings, tmp_path: Path) -> Path:
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


@pytest.fixture
def project(labeler: AbstractUser) -> Project:
    project = project_with_prompts(["Why is the sky blue?", "Write a haiku about rain."], name="colours", k=3)
    project.memberships.create(user=labeler, role=Role.LABELER)
    for task in tasks_of(project):
        judge(task, labeler, [1, 2, 3])
    return project


@pytest.fixture
def build(manager: AbstractUser, project: Project) -> DatasetBuild:
    """A finished build of `project`, by its manager."""
    return run_build(created_by=manager, projects=[project], name="colours v1", test_fraction=0.0)


def csrf_token(client: Client) -> str:
    client.get("/datasets/new")
    return client.cookies["csrftoken"].value


# --- downloads -------------------------------------------------------------------------


def test_a_manager_of_the_project_downloads_a_file_as_an_attachment(
    csrf_client: Client, login: Login, manager: AbstractUser, build: DatasetBuild
) -> None:
    response = login(csrf_client, manager).get(f"/datasets/{build.pk}/files/pairs-train.jsonl")

    assert response.status_code == 200
    assert response["Content-Disposition"] == f'attachment; filename="dataset-{build.pk}-pairs-train.jsonl"'
    rows = [json.loads(line) for line in b"".join(response.streaming_content).decode().splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"prompt", "chosen", "rejected"}


def test_the_card_and_the_parquet_files_download_too(
    csrf_client: Client, login: Login, manager: AbstractUser, build: DatasetBuild
) -> None:
    client = login(csrf_client, manager)
    for key in ("README.md", "pairs-test.parquet", "grouped-train.jsonl", "sft-train.parquet"):
        assert client.get(f"/datasets/{build.pk}/files/{key}").status_code == 200, key


@pytest.mark.parametrize("who", ["labeler", "outsider", "other_manager", "anonymous_api"])
def test_nobody_but_a_manager_of_every_project_of_the_build_gets_its_files(
    csrf_client: Client,
    login: Login,
    build: DatasetBuild,
    labeler: AbstractUser,
    outsider: AbstractUser,
    who: str,
) -> None:
    # given someone who labels the project, has no role, or manages another project only
    if who == "other_manager":
        person = user_with_roles(Role.MANAGER, username="mo")
        make_manager(project_with_prompts(["Other?"], name="other", k=2), person)
    else:
        person = labeler if who == "labeler" else outsider
    if who != "anonymous_api":
        login(csrf_client, person)

    # when they ask for the build, its status or a file
    urls = [
        f"/datasets/{build.pk}/files/pairs-train.jsonl",
        f"/datasets/{build.pk}/",
        f"/datasets/{build.pk}/status",
        f"/api/dataset-builds/{build.pk}/",
    ]
    codes = [csrf_client.get(url).status_code for url in urls]

    # then it does not exist for them (anonymous: sign in first)
    if who == "anonymous_api":
        assert codes[:3] == [302, 302, 302] and codes[3] in (401, 403)
    else:
        assert codes == [404, 404, 404, 404]


def test_a_build_with_a_project_the_manager_does_not_manage_is_hidden_from_them(
    csrf_client: Client, login: Login, manager: AbstractUser, project: Project
) -> None:
    # given a build of two projects made by someone managing both
    other = project_with_prompts(["Other question?"], name="other", k=2)
    boss = user_with_roles(Role.MANAGER, username="boss")
    both = run_build(created_by=boss, projects=[project, other])
    make_manager(project, manager)  # maria manages only the first

    # then maria sees neither it nor its files
    client = login(csrf_client, manager)
    assert client.get(f"/datasets/{both.pk}/").status_code == 404
    assert client.get(f"/datasets/{both.pk}/files/README.md").status_code == 404
    assert "boss" not in client.get("/datasets/").content.decode()


@pytest.mark.parametrize(
    "key", ["pairs-train.csv", "README", "hf", "pairs-validation.jsonl", "..%2F..%2Fsettings.py"]
)
def test_an_unknown_file_key_is_404(
    csrf_client: Client, login: Login, manager: AbstractUser, build: DatasetBuild, key: str
) -> None:
    response = login(csrf_client, manager).get(f"/datasets/{build.pk}/files/{key}")

    assert response.status_code == 404


def test_a_file_of_an_output_the_build_did_not_write_is_404(
    csrf_client: Client, login: Login, manager: AbstractUser, build: DatasetBuild
) -> None:
    # ties were dropped and no prompt has a reference: those outputs are absent
    client = login(csrf_client, manager)
    assert client.get(f"/datasets/{build.pk}/files/pairs_with_ties-train.jsonl").status_code == 404
    assert client.get(f"/datasets/{build.pk}/files/reference-train.jsonl").status_code == 404


# --- pages -----------------------------------------------------------------------------


def test_a_manager_creates_a_build_from_the_page_and_it_is_queued_on_commit(
    csrf_client: Client,
    login: Login,
    manager: AbstractUser,
    project: Project,
    labeler: AbstractUser,
    django_capture_on_commit_callbacks: Any,
) -> None:
    # given
    make_manager(project, manager)
    client = login(csrf_client, manager)
    form = client.get("/datasets/new").content.decode()
    assert project.name in form and "lee" in form  # the project and its labeler are choices

    # when
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(
            "/datasets/new",
            {
                "csrfmiddlewaretoken": client.cookies["csrftoken"].value,
                "name": "from the page",
                "projects": [project.pk],
                "labelers": [labeler.pk],
                "aggregation": "majority",
                "agreement_threshold": "0.7",
                "ties": "keep",
                "margin": "rank_gap",
                "format": "conversational",
                "test_fraction": "0.2",
                "seed": "3",
                "near_duplicate_threshold": "0.8",
            },
        )

    # then the build exists with those options, queued, its task sent once committed
    build = DatasetBuild.objects.get(name="from the page")
    assert response.status_code == 302 and response["Location"] == f"/datasets/{build.pk}/"
    assert build.status == DatasetBuild.Status.QUEUED and build.created_by == manager
    assert (build.aggregation, build.agreement_threshold, build.ties, build.margin, build.format) == (
        "majority",
        0.7,
        "keep",
        "rank_gap",
        "conversational",
    )
    assert list(build.projects.all()) == [project] and list(build.labelers.all()) == [labeler]
    assert len(callbacks) == 1


def test_a_build_whose_task_cannot_be_published_is_failed_with_the_reason_never_left_queued(
    csrf_client: Client,
    login: Login,
    manager: AbstractUser,
    project: Project,
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given a broker that answered the health check but refuses the message at commit
    from kombu.exceptions import OperationalError

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("Error 111 connecting to redis: Connection refused.")

    monkeypatch.setattr("config.celery.app.send_task", refuse)
    make_manager(project, manager)
    client = login(csrf_client, manager)

    # when a build is made from the page
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/datasets/new",
            {
                "csrfmiddlewaretoken": csrf_token(client),
                "name": "never queued",
                "projects": [project.pk],
                "aggregation": "every_vote",
                "agreement_threshold": "0.5",
                "ties": "drop",
                "margin": "none",
                "format": "standard",
                "test_fraction": "0.1",
                "seed": "0",
                "near_duplicate_threshold": "0.6",
            },
        )

    # then its page shows it failed, saying why
    build = DatasetBuild.objects.get(name="never queued")
    assert response.status_code == 302 and response["Location"] == f"/datasets/{build.pk}/"
    assert build.status == DatasetBuild.Status.FAILED
    assert "could not be queued" in build.error and "Connection refused" in build.error


def test_the_form_refuses_a_project_the_manager_does_not_manage(
    csrf_client: Client, login: Login, manager: AbstractUser, project: Project
) -> None:
    client = login(csrf_client, manager)
    response = client.post(
        "/datasets/new",
        {"csrfmiddlewaretoken": csrf_token(client), "name": "sneaky", "projects": [project.pk]},
    )

    assert response.status_code == 200
    assert not DatasetBuild.objects.filter(name="sneaky").exists()


def test_the_form_reports_options_out_of_range(
    csrf_client: Client, login: Login, manager: AbstractUser, project: Project
) -> None:
    make_manager(project, manager)
    client = login(csrf_client, manager)
    response = client.post(
        "/datasets/new",
        {
            "csrfmiddlewaretoken": csrf_token(client),
            "name": "bad",
            "projects": [project.pk],
            "aggregation": "every_vote",
            "agreement_threshold": "0.5",
            "ties": "drop",
            "margin": "none",
            "format": "standard",
            "test_fraction": "1.5",
            "seed": "0",
            "near_duplicate_threshold": "0.6",
        },
    )

    assert response.status_code == 200
    assert "The test fraction must be at least 0 and below 1." in response.content.decode()
    assert not DatasetBuild.objects.exists()


def test_the_list_and_detail_pages_show_the_build_its_progress_and_files(
    csrf_client: Client, login: Login, manager: AbstractUser, build: DatasetBuild
) -> None:
    client = login(csrf_client, manager)

    listing = client.get("/datasets/").content.decode()
    detail = client.get(f"/datasets/{build.pk}/").content.decode()

    assert "colours v1" in listing and 'href="/datasets/new"' in listing
    assert f'data-job-status-url="/datasets/{build.pk}/status"' in detail
    assert 'data-job-terminal="true"' in detail and "<progress" in detail
    assert f"/datasets/{build.pk}/files/pairs-train.jsonl" in detail and build.content_hash in detail
    assert '<script src="/static/js/job.js" defer></script>' in detail
    assert "<script>" not in detail and "onclick" not in detail
    assert 'href="/datasets/"' in detail  # the Datasets navigation entry


def test_the_status_endpoint_answers_with_the_rows_state(
    csrf_client: Client, login: Login, manager: AbstractUser, build: DatasetBuild
) -> None:
    state = login(csrf_client, manager).get(f"/datasets/{build.pk}/status").json()

    assert state == {
        "id": build.pk,
        "kind": "dataset_build",
        "status": "succeeded",
        "status_display": "Succeeded",
        "terminal": True,
        "progress": 1.0,
        "step": None,
        "total_steps": None,
        "eta_seconds": None,
        "attempts": None,
        "error": "",
        "log_tail": "",
        "details": {"counts": build.counts, "content_hash": build.content_hash},
    }


def test_the_pages_ask_for_the_manager_role(csrf_client: Client, login: Login, labeler: AbstractUser) -> None:
    client = login(csrf_client, labeler)

    assert client.get("/datasets/").status_code == 403
    assert client.get("/datasets/new").status_code == 403


# --- the JSON API ----------------------------------------------------------------------


def test_the_api_creates_a_build_and_reads_it_back(
    csrf_client: Client,
    login: Login,
    manager: AbstractUser,
    project: Project,
    django_capture_on_commit_callbacks: Any,
) -> None:
    make_manager(project, manager)
    client = login(csrf_client, manager)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(
            "/api/dataset-builds/",
            {"name": "from the API", "projects": [project.pk], "aggregation": "majority", "seed": 5},
            content_type="application/json",
            headers={"X-CSRFToken": csrf_token(client)},
        )

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "queued" and body["options"]["aggregation"] == "majority"
    assert body["options"]["seed"] == 5 and body["options"]["projects"] == [project.pk]
    assert len(callbacks) == 1
    read = client.get(f"/api/dataset-builds/{body['id']}/").json()
    assert read["name"] == "from the API" and read["files"] == []
    assert [item["id"] for item in client.get("/api/dataset-builds/").json()["results"]] == [body["id"]]


def test_the_api_lists_the_files_of_a_finished_build_with_their_links(
    csrf_client: Client, login: Login, manager: AbstractUser, build: DatasetBuild
) -> None:
    body = login(csrf_client, manager).get(f"/api/dataset-builds/{build.pk}/").json()

    keys = [file["key"] for file in body["files"]]
    assert keys[0] == "README.md" and "pairs-train.jsonl" in keys and "grouped-test.parquet" in keys
    assert body["files"][0]["url"].endswith(f"/datasets/{build.pk}/files/README.md")
    assert body["counts"] == build.counts


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"name": "x", "projects": []}, "projects"),
        ({"name": "x", "projects": ["PROJECT"], "test_fraction": 1.0}, "test_fraction"),
        ({"name": "x", "projects": ["PROJECT"], "aggregation": "median"}, "aggregation"),
        ({"name": "x", "projects": ["PROJECT"], "labelers": [999999]}, "labelers"),
        ({"name": "x", "projects": ["OTHER"]}, "projects"),
    ],
)
def test_the_api_answers_400_for_options_that_make_no_build(
    csrf_client: Client,
    login: Login,
    manager: AbstractUser,
    project: Project,
    payload: dict[str, Any],
    field: str,
) -> None:
    make_manager(project, manager)
    other = project_with_prompts(["Other?"], name="other", k=2)
    ids = {"PROJECT": project.pk, "OTHER": other.pk}
    payload = {**payload, "projects": [ids[p] for p in payload["projects"]]}
    client = login(csrf_client, manager)

    response = client.post(
        "/api/dataset-builds/",
        payload,
        content_type="application/json",
        headers={"X-CSRFToken": csrf_token(client)},
    )

    assert response.status_code == 400
    assert field in response.json()["errors"]
    assert not DatasetBuild.objects.exists()


# --- the admin -------------------------------------------------------------------------


def test_the_admin_rebuild_action_queues_a_copy_with_the_same_options(
    csrf_client: Client,
    login: Login,
    manager: AbstractUser,
    project: Project,
    django_capture_on_commit_callbacks: Any,
) -> None:
    original = run_build(
        created_by=manager,
        projects=[project],
        name="original",
        aggregation="majority",
        margin="rank_gap",
        seed=9,
        exclude_flagged=True,
    )
    client = login(csrf_client, manager)
    token = client.get("/admin/training/datasetbuild/") and client.cookies["csrftoken"].value

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(
            "/admin/training/datasetbuild/",
            {"csrfmiddlewaretoken": token, "action": "rebuild", "_selected_action": [original.pk]},
        )

    assert response.status_code == 302
    copy = DatasetBuild.objects.exclude(pk=original.pk).get()
    assert copy.name == "original (rebuild)" and copy.status == DatasetBuild.Status.QUEUED
    assert (copy.aggregation, copy.margin, copy.seed, copy.exclude_flagged) == (
        "majority",
        "rank_gap",
        9,
        True,
    )
    assert list(copy.projects.all()) == [project]
    assert len(callbacks) == 1


def test_the_admin_add_form_creates_a_build_through_the_service(
    csrf_client: Client,
    login: Login,
    manager: AbstractUser,
    project: Project,
    django_capture_on_commit_callbacks: Any,
) -> None:
    make_manager(project, manager)
    client = login(csrf_client, manager)
    client.get("/admin/training/datasetbuild/add/")

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(
            "/admin/training/datasetbuild/add/",
            {
                "csrfmiddlewaretoken": client.cookies["csrftoken"].value,
                "name": "from the admin",
                "projects": [project.pk],
                "aggregation": "every_vote",
                "agreement_threshold": "0.5",
                "ties": "drop",
                "margin": "none",
                "format": "standard",
                "test_fraction": "0.1",
                "seed": "0",
                "near_duplicate_threshold": "0.6",
            },
        )

    assert response.status_code == 302, response.content.decode()[:2000]
    build = DatasetBuild.objects.get(name="from the admin")
    assert build.created_by == manager and list(build.projects.all()) == [project]
    assert len(callbacks) == 1
    # and its page is read-only afterwards
    page = client.get(f"/admin/training/datasetbuild/{build.pk}/change/").content.decode()
    assert 'name="name"' not in page


# --- the web process stays light ---------------------------------------------------------

IMPORT_THE_TRAINING_WEB_SIDE = """
import json, sys
import config.wsgi
import config.urls
import training.admin, training.api, training.forms, training.models, training.selectors
import training.services, training.tasks, training.urls, training.views
from config.celery import app
app.finalize()
heavy = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "pyarrow")
print(json.dumps(sorted(name for name in heavy if name in sys.modules)))
"""


def test_the_training_web_modules_import_no_machine_learning_stack_and_no_pyarrow() -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_THE_TRAINING_WEB_SIDE],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
