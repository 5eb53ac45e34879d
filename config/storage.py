"""File paths as the database keeps them: relative to a storage root, so hosts may mount shared
storage at different places.

A path under `ARTIFACTS_DIR` is stored as `artifacts:<relative path>`, one under `MODELS_DIR` as
`models:<relative path>`; each host resolves them against its own settings. Anything else (a hub
id such as `org/model`, which never holds a colon, or a path outside both roots) is kept and
resolved as given. Both apps use these two functions, and nothing else builds a stored path.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

# Prefix -> the setting naming its root. Models first: MODELS_DIR may lie under ARTIFACTS_DIR's
# parent but never inside it in the defaults; the longer match wins anyway.
STORAGE_ROOTS = {"artifacts": "ARTIFACTS_DIR", "models": "MODELS_DIR"}


def _roots() -> list[tuple[str, Path]]:
    roots = [(prefix, Path(getattr(settings, name)).resolve()) for prefix, name in STORAGE_ROOTS.items()]
    # The deepest root first, should one lie inside the other.
    return sorted(roots, key=lambda root: len(root[1].parts), reverse=True)


def storage_path_stored(path: str | Path, *, roots: list[tuple[str, Path]] | None = None) -> str:
    """What the database keeps for `path`: `artifacts:…` / `models:…` under a root, else `path` as given."""
    value = str(path)
    if not value or not Path(value).is_absolute():
        return value
    absolute = Path(value).resolve()
    for prefix, root in roots if roots is not None else _roots():
        if absolute == root or root in absolute.parents:
            return f"{prefix}:{absolute.relative_to(root).as_posix()}"
    return value


def storage_path_resolve(stored: str) -> str:
    """`stored` as a path on this host (its roots from this host's settings); other values unchanged."""
    prefix, colon, relative = stored.partition(":")
    if colon and prefix in STORAGE_ROOTS:
        root = Path(getattr(settings, STORAGE_ROOTS[prefix]))
        return str(root / relative) if relative not in ("", ".") else str(root)
    return stored
