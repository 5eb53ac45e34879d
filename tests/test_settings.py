"""Settings come from the environment and stop start-up loudly when a value is wrong."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import env_bool, env_database, env_int, env_list, env_path, env_redis_url

REPO_ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/rankwise"


# --- the typed helpers ---------------------------------------------------------


def test_it_rejects_a_non_boolean_debug_value() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"DEBUG='maybe' is not a boolean"):
        env_bool("DEBUG", False, environ={"DEBUG": "maybe"})


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("Yes", True), ("off", False), ("", False)])
def test_it_reads_the_usual_spellings_of_a_boolean(raw: str, expected: bool) -> None:
    assert env_bool("DEBUG", not expected, environ={"DEBUG": raw}) is expected


def test_it_rejects_an_integer_that_is_not_a_number() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"AXES_FAILURE_LIMIT='abc' is not an integer"):
        env_int("AXES_FAILURE_LIMIT", 5, environ={"AXES_FAILURE_LIMIT": "abc"})


def test_it_rejects_an_integer_below_its_minimum() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"AXES_FAILURE_LIMIT=0 is below the minimum of 1"):
        env_int("AXES_FAILURE_LIMIT", 5, minimum=1, environ={"AXES_FAILURE_LIMIT": "0"})


def test_it_reads_an_integer_and_falls_back_to_the_default_when_unset() -> None:
    assert env_int("AXES_FAILURE_LIMIT", 5, minimum=1, environ={"AXES_FAILURE_LIMIT": " 7 "}) == 7
    assert env_int("AXES_FAILURE_LIMIT", 5, minimum=1, environ={}) == 5


def test_it_rejects_a_list_with_an_empty_item() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"ALLOWED_HOSTS=.* has an empty item"):
        env_list("ALLOWED_HOSTS", [], environ={"ALLOWED_HOSTS": "a.example.com,,b.example.com"})


def test_it_reads_a_comma_separated_list_ignoring_blanks_around_items() -> None:
    hosts = env_list("ALLOWED_HOSTS", [], environ={"ALLOWED_HOSTS": "a.example.com, b.example.com"})
    assert hosts == ["a.example.com", "b.example.com"]


def test_it_rejects_a_relative_path() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"VAR_DIR='relative/var' must be an absolute path"):
        env_path("VAR_DIR", Path("/srv/rankwise"), environ={"VAR_DIR": "relative/var"})


def test_it_rejects_a_database_url_with_an_unsupported_scheme() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"DATABASE_URL uses the scheme 'mysql'"):
        env_database(
            "DATABASE_URL", "sqlite:////tmp/x.sqlite3", environ={"DATABASE_URL": "mysql://u@h/rankwise"}
        )


def test_it_rejects_a_database_url_that_names_no_database() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"DATABASE_URL=.* names no database"):
        env_database(
            "DATABASE_URL",
            "sqlite:////tmp/x.sqlite3",
            environ={"DATABASE_URL": "postgres://postgres@db:5432"},
        )


def test_it_reads_a_postgres_database_url() -> None:
    config = env_database(
        "DATABASE_URL", "sqlite:////tmp/x.sqlite3", environ={"DATABASE_URL": PRODUCTION_DATABASE_URL}
    )
    assert config["ENGINE"] == "django.db.backends.postgresql"
    assert config["NAME"] == "rankwise"


def test_it_rejects_a_redis_url_that_is_not_redis() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"REDIS_URL='http://127.0.0.1:6379/0' is not a Redis URL"):
        env_redis_url(
            "REDIS_URL", "redis://127.0.0.1:6379/0", environ={"REDIS_URL": "http://127.0.0.1:6379/0"}
        )


# --- the settings module, imported in a clean environment ------------------------


def run_python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the venv's Python in the repository with exactly `env` (plus PATH), like `env -i`."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "config.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def import_settings(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_python(["-c", "import django; django.setup()"], env)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The last line of a traceback: the exception and its message."""
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""


def test_settings_refuse_to_start_without_a_secret_key_when_debug_is_off(tmp_path: Path) -> None:
    result = import_settings(
        {"DEBUG": "0", "ALLOWED_HOSTS": "rankwise.example.com", "VAR_DIR": str(tmp_path)}
    )

    assert result.returncode != 0
    assert error_line(result).startswith("django.core.exceptions.ImproperlyConfigured: SECRET_KEY")


def test_settings_refuse_to_start_without_allowed_hosts_when_debug_is_off(tmp_path: Path) -> None:
    result = import_settings(
        {"DEBUG": "0", "SECRET_KEY": secrets.token_urlsafe(50), "VAR_DIR": str(tmp_path)}
    )

    assert result.returncode != 0
    assert error_line(result).startswith("django.core.exceptions.ImproperlyConfigured: ALLOWED_HOSTS")


def test_settings_start_with_debug_on_and_nothing_else_set(tmp_path: Path) -> None:
    result = import_settings({"DEBUG": "1", "VAR_DIR": str(tmp_path)})

    assert result.returncode == 0, result.stderr


def production_env(secret_key: str, var_dir: Path) -> dict[str, str]:
    return {
        "DEBUG": "0",
        "SECRET_KEY": secret_key,
        "ALLOWED_HOSTS": "rankwise.example.com",
        "DATABASE_URL": PRODUCTION_DATABASE_URL,
        "VAR_DIR": str(var_dir),
    }


DEPLOY_CHECK = ["manage.py", "check", "--deploy", "--fail-level", "WARNING"]


def test_the_deploy_check_passes_with_production_values(tmp_path: Path) -> None:
    result = run_python(DEPLOY_CHECK, production_env(secrets.token_urlsafe(50), tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_deploy_check_fails_with_a_short_secret_key(tmp_path: Path) -> None:
    result = run_python(DEPLOY_CHECK, production_env("too-short", tmp_path))

    assert result.returncode != 0
    assert "security.W009" in result.stderr
