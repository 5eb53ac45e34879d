"""Typed readers for settings that come from the environment.

Each helper fails loudly, naming the variable and the offending value, so a
typo in a deployment surfaces at start-up instead of as odd behaviour later.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _raw(name: str, environ: Mapping[str, str] | None) -> str | None:
    return (os.environ if environ is None else environ).get(name)


def env_str(name: str, default: str | None = None, *, environ: Mapping[str, str] | None = None) -> str:
    value = _raw(name, environ)
    if value is None or value == "":
        if default is None:
            raise ImproperlyConfigured(f"The environment variable {name} is required and is not set.")
        return default
    return value


def env_bool(name: str, default: bool, *, environ: Mapping[str, str] | None = None) -> bool:
    value = _raw(name, environ)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name}={value!r} is not a boolean; use one of 1/0, true/false, yes/no, on/off."
    )


def env_int(
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    value = _raw(name, environ)
    if value is None or value.strip() == "":
        result = default
    else:
        try:
            result = int(value.strip())
        except ValueError:
            raise ImproperlyConfigured(f"{name}={value!r} is not an integer.") from None
    if minimum is not None and result < minimum:
        raise ImproperlyConfigured(f"{name}={result} is below the minimum of {minimum}.")
    return result


def env_list(name: str, default: list[str], *, environ: Mapping[str, str] | None = None) -> list[str]:
    """A comma-separated list; blanks around items are ignored, empty items are an error."""
    value = _raw(name, environ)
    if value is None:
        return list(default)
    if value.strip() == "":
        return []
    items = [item.strip() for item in value.split(",")]
    if any(item == "" for item in items):
        raise ImproperlyConfigured(f"{name}={value!r} has an empty item; separate values with single commas.")
    return items


def env_path(name: str, default: Path, *, environ: Mapping[str, str] | None = None) -> Path:
    value = _raw(name, environ)
    if value is None or value.strip() == "":
        return default
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ImproperlyConfigured(f"{name}={value!r} must be an absolute path.")
    return path


_DATABASE_SCHEMES = ("sqlite", "postgres", "postgresql", "pgsql")


def env_database(name: str, default: str, *, environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """A database URL parsed by dj-database-url, limited to the engines Rankwise supports."""
    import dj_database_url

    url = env_str(name, default, environ=environ)
    scheme = url.split(":", 1)[0].lower()
    if scheme not in _DATABASE_SCHEMES:
        raise ImproperlyConfigured(
            f"{name} uses the scheme {scheme!r}; Rankwise supports sqlite:/// and postgres:// URLs."
        )
    try:
        config = dict(dj_database_url.parse(url))
    except ValueError as error:
        raise ImproperlyConfigured(f"{name} is not a valid database URL: {error}") from None
    if not config.get("NAME"):
        raise ImproperlyConfigured(f"{name}={url!r} names no database.")
    return config


def env_redis_url(name: str, default: str, *, environ: Mapping[str, str] | None = None) -> str:
    url = env_str(name, default, environ=environ)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ImproperlyConfigured(f"{name}={url!r} is not a Redis URL (redis://, rediss:// or unix://).")
    return url
