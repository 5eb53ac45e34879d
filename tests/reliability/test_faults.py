"""Faults in the services the app depends on: Redis gone, PostgreSQL restarted.

- Redis down: labeling (the ranking page, claims, submits) goes on; /healthz
  says the broker is unreachable (503); starting a training run (page or API)
  or a dataset build (API) says the queue is unreachable and leaves no row behind.
- PostgreSQL restarted under a running gunicorn: the app recovers by itself
  (CONN_HEALTH_CHECKS), at most one request fails, none after.
- A killed run process (a worker or GPU machine dying mid-run) is covered by
  tests/training/test_runs.py::test_a_killed_run_process_is_retried_and_finishes_never_stuck_running
  (and ::test_a_killed_run_on_its_last_attempt_fails_with_the_reason, and the
  heartbeat reaper test there).

Every process these tests start is private (its own port, its own data
directory) and stopped at the end, by its own pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.contrib.auth.models import AbstractUser
from django.test import Client
from pytest_django import Settings

from annotation.models import Judgment, Membership, Project
from annotation.roles import Role
from config.celery import app as celery_app
from tests.factories import user_with_roles
from tests.training.test_builds_support import judge, project_with_prompts, run_build, tasks_of
from training.demo.stack import port_free
from training.models import DatasetBuild, TrainingRun

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30

pytestmark = pytest.mark.slow


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- (a) Redis is down ------------------------------------------------------------------


@pytest.fixture
def private_redis(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A redis-server of this test's own, with the app (settings and Celery) pointed at it.

    Yields a handle whose `.stop()` stops that server.
    """
    if shutil.which("redis-server") is None:
        pytest.skip("the redis-server program is not installed")
    port = port_free()
    url = f"redis://127.0.0.1:{port}/0"
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    class Handle:
        def stop(self) -> None:
            stop(server)
            wait_until(lambda: not answers(), 5, "redis to stop")

    try:
        wait_until(answers, START_TIMEOUT_S, "the private redis-server to answer")
        # The health check and the publishers build their connections from the Celery app's
        # configuration, which reads Django's settings: patched first, so the undo restores the
        # suite's values and not the ones set just below.
        monkeypatch.setattr(celery_app.conf, "broker_url", url)
        monkeypatch.setattr(celery_app.conf, "result_backend", url)
        settings.REDIS_URL = settings.CELERY_BROKER_URL = settings.CELERY_RESULT_BACKEND = url
        forget_broker_connections()  # no pooled connection to the suite's Redis may be reused
        yield Handle()
    finally:
        stop(server)
        forget_broker_connections()  # rebuilt from the restored configuration on next use


def forget_broker_connections() -> None:
    """Drop every cached connection and the result backend, so the next use rebuilds them from the config."""
    celery_app._pool = None
    celery_app.amqp._producer_pool = None
    # The result backend is cached on the app (per thread unless thread-safe); a backend
    # left pointing at the private Redis would break every later `.get()` in the suite.
    celery_app._backend_cache = None
    if hasattr(celery_app._local, "backend"):
        del celery_app._local.backend


@pytest.fixture
def labeling(db: None) -> dict[str, Any]:
    # overlap 2: the build's judge and the labeler each get every task
    project = project_with_prompts(["Why is the sky blue?", "Name a prime."], name="faults", k=3, overlap=2)
    labeler = user_with_roles(Role.LABELER, username="lina")
    Membership.objects.create(project=project, user=labeler, role=Role.LABELER)
    return {"project": project, "labeler": labeler}


@pytest.fixture
def succeeded_build(labeling: dict[str, Any], settings: Settings, tmp_path: Path) -> DatasetBuild:
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    project: Project = labeling["project"]
    judge_user = user_with_roles(Role.LABELER, username="jo")
    for task in tasks_of(project):
        judge(task, judge_user, [1, 2, 3])
    manager = user_with_roles(Role.MANAGER, username="mani")
    build = run_build(created_by=manager, projects=[project], name="faults build", test_fraction=0.0)
    assert build.status == DatasetBuild.Status.SUCCEEDED, build.error
    return build


def csrf_token(client: Client) -> str:
    client.get("/")
    return client.cookies["csrftoken"].value


@pytest.mark.django_db(transaction=True)
def test_with_redis_down_labeling_goes_on_and_health_and_training_say_the_queue_is_unreachable(
    private_redis: Any, labeling: dict[str, Any], succeeded_build: DatasetBuild, tmp_path: Path
) -> None:
    # A base model folder that passes the submission check (config, tokenizer, safetensors): only the queue is down.
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    (model / "tokenizer.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    project: Project = labeling["project"]
    manager: AbstractUser = succeeded_build.created_by
    labeler = Client(enforce_csrf_checks=True)
    labeler.force_login(labeling["labeler"])
    boss = Client(enforce_csrf_checks=True)
    boss.force_login(manager)
    assert labeler.get("/healthz").json() == {"database": "ok", "broker": "ok"}  # it is the private one

    # given Redis stops
    private_redis.stop()

    # when a labeler works through the page and the API, then nothing of it needs the queue
    token = csrf_token(labeler)
    assert labeler.get(f"/label/{project.pk}/").status_code == 200
    fragment = labeler.post(f"/label/{project.pk}/next", HTTP_X_CSRFTOKEN=token)
    assert fragment.status_code == 200 and b'class="response"' in fragment.content
    claimed = labeler.post(f"/api/projects/{project.pk}/next", HTTP_X_CSRFTOKEN=token)
    assert claimed.status_code == 200
    body = claimed.json()
    answer = {
        "ranks": {completion["id"]: rank for rank, completion in enumerate(body["completions"], start=1)},
        "client_token": "redis-down-1",
    }
    stored = labeler.post(
        f"/api/assignments/{body['id']}/judgment",
        json.dumps(answer),
        content_type="application/json",
        HTTP_X_CSRFTOKEN=token,
    )
    assert stored.status_code == 201, stored.content
    assert Judgment.objects.filter(user=labeling["labeler"]).count() == 1

    # and the health check names the broker
    health = labeler.get("/healthz")
    assert health.status_code == 503
    assert health.json() == {"database": "ok", "broker": "unreachable"}

    # and starting a training run, from the page or the API, says why it cannot, leaving no run
    runs_before = TrainingRun.objects.count()
    token = csrf_token(boss)
    page = boss.post(
        "/training/runs/new",
        {
            "kind": "reward",
            "dataset_build": succeeded_build.pk,
            "base_model": str(model),
            "peft": "lora",
            "gpus": 1,
            "num_train_epochs": 1,
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_length": 64,
            "beta": 0.1,
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.05,
            "seed": 0,
            "logging_steps": 1,
            "save_steps": 1,
        },
        HTTP_X_CSRFTOKEN=token,
    )
    assert page.status_code == 503
    assert "The job queue (Redis) cannot be reached" in page.content.decode()
    api = boss.post(
        "/api/training-runs/",
        json.dumps({"dataset_build": succeeded_build.pk, "kind": "dpo", "base_model": str(model)}),
        content_type="application/json",
        HTTP_X_CSRFTOKEN=token,
    )
    assert api.status_code == 503
    assert "Redis" in api.json()["detail"] and "was not created" in api.json()["detail"]
    assert TrainingRun.objects.count() == runs_before


# --- (b) PostgreSQL restarts under a running app ---------------------------------------------


class PrivatePostgres:
    """A PostgreSQL cluster in a temporary directory, on a free port, run as the `postgres` user when we are root."""

    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.log = root / "postgres.log"
        self.port = port_free()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def run(self, *command: str) -> None:
        done = subprocess.run([*self.as_postgres, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}"
            )

    def init(self) -> None:
        for folder in (self.data.parent, self.sockets):
            folder.mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            shutil.chown(self.data.parent, "postgres")
            shutil.chown(self.sockets, "postgres")
        self.run(
            _find("initdb") or "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"
        )

    def pg_ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.run(
            _find("pg_ctl") or "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            action,
            *extra,
        )

    def state(self, database: str) -> tuple[Any, int]:
        """When the server started, and how many connections to `database` are open."""
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            row = connection.execute(
                "SELECT pg_postmaster_start_time(), count(*) FILTER (WHERE datname = %s) FROM pg_stat_activity",
                [database],
            ).fetchone()
        assert row is not None
        return row[0], int(row[1])

    def url(self, name: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"


def _find(program: str) -> str | None:
    for folder in ("", "/usr/lib/postgresql/15/bin/", "/usr/local/bin/"):
        path = shutil.which(folder + program) if folder else shutil.which(program)
        if path:
            return path
    return None


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if not (_find("initdb") and _find("pg_ctl")):
        pytest.skip("initdb and pg_ctl are not installed")
    # Not under pytest's tmp dir: the postgres user must be able to reach the data directory.
    root = Path(tempfile.mkdtemp(prefix="rankwise-pg-"))
    os.chmod(root, 0o755)  # noqa: S103 — nothing secret in it
    cluster = PrivatePostgres(root)
    try:
        cluster.init()
        cluster.pg_ctl("start")
        with psycopg.connect(cluster.url("postgres"), autocommit=True) as connection:
            connection.execute("CREATE DATABASE rankwise_faults")
        yield cluster
    finally:
        with contextlib.suppress(RuntimeError):
            cluster.pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(root, ignore_errors=True)


def app_environment(database_url: str, tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DEBUG": "0",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1",
        "SECURE_SSL_REDIRECT": "0",
        "SESSION_COOKIE_SECURE": "0",
        "CSRF_COOKIE_SECURE": "0",
        "DATABASE_URL": database_url,
        "DATABASE_CONN_MAX_AGE": "600",  # persistent connections: the ones a restart breaks
        "VAR_DIR": str(tmp),
        "LOG_LEVEL": "WARNING",
    }


def get(url: str, token: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Token {token}"})  # noqa: S310 (local http)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0  # no answer at all


def test_after_a_postgres_restart_the_app_recovers_by_itself(
    private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    # given gunicorn (persistent connections, two threads) serving from the private cluster
    env = app_environment(private_postgres.url("rankwise_faults"), tmp_path)
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput"], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    made = subprocess.run(
        [
            *manage,
            "shell",
            "-c",
            "from annotation.services import user_create; from rest_framework.authtoken.models import Token;"
            "user, _ = user_create(username='pat', roles=['labeler']); print(Token.objects.create(user=user).key)",
        ],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    token = made.stdout.strip().splitlines()[-1]
    port = port_free()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "gunicorn.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "config.wsgi",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            "2",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: get(f"{base}/healthz", token) == 200, START_TIMEOUT_S, "gunicorn to answer")
        urls = [f"{base}/api/projects/", f"{base}/healthz"]
        before = [get(url, token) for url in urls * 3]
        assert before == [200] * 6
        started, held = private_postgres.state("rankwise_faults")
        assert held >= 1  # gunicorn keeps its connections open between requests

        # when PostgreSQL restarts (every open connection is cut)
        private_postgres.pg_ctl("restart", "-m", "fast")
        restarted, held = private_postgres.state("rankwise_faults")
        assert restarted > started and held == 0  # a new server: the app's connections are gone

        # then, without restarting the app, at most one request fails and none after it
        after = [get(url, token) for url in urls * 5]
        failed = [index for index, status in enumerate(after) if status != 200]
        assert len(failed) <= 1, after
        assert all(status == 200 for status in after[(failed[0] + 1 if failed else 0) :]), after
        assert server.poll() is None, "gunicorn died"
    finally:
        stop(server)
        log.close()


@pytest.mark.django_db(transaction=True)
def test_with_redis_down_a_dataset_build_from_the_api_says_the_queue_is_unreachable(
    private_redis: Any, labeling: dict[str, Any]
) -> None:
    project: Project = labeling["project"]
    manager = user_with_roles(Role.MANAGER, username="bea")
    Membership.objects.create(project=project, user=manager, role=Role.MANAGER)
    client = Client()
    client.force_login(manager)
    private_redis.stop()

    response = client.post(
        "/api/dataset-builds/",
        json.dumps({"name": "while redis is down", "projects": [project.pk]}),
        content_type="application/json",
    )

    assert response.status_code == 503, response.content
    assert "Redis" in response.json()["detail"] and "was not created" in response.json()["detail"]
    assert not DatasetBuild.objects.exists()
