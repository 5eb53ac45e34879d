"""Fixtures shared by the whole suite: personas, clients, a real Celery worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
from celery.utils.nodenames import host_format
from django.contrib.auth.models import AbstractBaseUser, AbstractUser
from django.db import connection
from django.test import Client
from pytest_django import Settings

from annotation.roles import Role
from config.celery import app as celery_app
from tests.factories import user_with_roles

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_NAME = "test@%h"
WORKER_START_TIMEOUT_S = 60
WORKER_STOP_TIMEOUT_S = 20


def pytest_configure(config: pytest.Config) -> None:
    # WhiteNoise warns once per start that STATIC_ROOT is empty; tests never
    # run collectstatic, and the app's own files are served by the finders.
    config.addinivalue_line("filterwarnings", "ignore:No directory at:UserWarning")


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: Settings) -> None:
    # PBKDF2 at production strength costs a noticeable fraction of a second per
    # user; tests check who may sign in, not the hash.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


# --- personas ------------------------------------------------------------------


@pytest.fixture
def manager(db: None) -> AbstractUser:
    return user_with_roles(Role.MANAGER, username="maria")


@pytest.fixture
def labeler(db: None) -> AbstractUser:
    return user_with_roles(Role.LABELER, username="lee")


@pytest.fixture
def evaluator(db: None) -> AbstractUser:
    return user_with_roles(Role.EVALUATOR, username="eve")


@pytest.fixture
def outsider(db: None) -> AbstractUser:
    """An account with no role: may see nothing."""
    return user_with_roles(username="otto")


# --- clients -------------------------------------------------------------------


@pytest.fixture
def csrf_client() -> Client:
    """The suite's client: CSRF checks enforced, as in a browser."""
    return Client(enforce_csrf_checks=True)


@pytest.fixture
def login() -> Callable[[Client, AbstractBaseUser], Client]:
    """`login(client, user)` signs `user` in without the login form."""

    def _login(client: Client, user: AbstractBaseUser) -> Client:
        client.force_login(user)
        return client

    return _login


# --- a real Celery worker ------------------------------------------------------


def worker_database_url(settings_dict: dict[str, object]) -> str:
    """DATABASE_URL with its database name swapped for the test database's.

    Host, credentials and options (``?sslmode=…``) stay as the suite was given them.
    """
    name = str(settings_dict["NAME"])
    if "sqlite" in str(settings_dict["ENGINE"]):
        return f"sqlite:///{name}"
    given = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(given._replace(path="/" + quote(name, safe="")))


@pytest.fixture(scope="session")
def celery_worker(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `celery worker` process on both queues, reading the test database.

    Yields the worker's node name. Tests that need it to see their rows use
    ``@pytest.mark.django_db(transaction=True)``: the worker is another process
    and cannot see an uncommitted test transaction.
    """
    node = host_format(WORKER_NAME)
    env = {**os.environ, "DATABASE_URL": worker_database_url(connection.settings_dict)}
    # Messages left by an earlier, interrupted run would be executed first.
    celery_app.control.purge()
    log_path = tmp_path_factory.mktemp("celery") / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "-Q",
                "default,gpu",
                "--concurrency",
                "1",
                "--pool",
                "solo",
                "-n",
                WORKER_NAME,
                "--loglevel",
                "INFO",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_worker(worker, node, log_path)
        yield node
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _wait_for_worker(worker: subprocess.Popen[bytes], node: str, log_path: Path) -> None:
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            pytest.fail(
                f"the Celery worker exited with status {worker.returncode} before answering:\n"
                + _tail(log_path)
            )
        if celery_app.control.ping(destination=[node], timeout=0.5):
            return
    pytest.fail(
        f"the Celery worker {node} did not answer a ping within {WORKER_START_TIMEOUT_S} s:\n"
        + _tail(log_path)
    )


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
