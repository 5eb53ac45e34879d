"""Registering a model policy from a local folder or a hub id, checked when it is registered.

The check runs in the web process, which never imports torch or
transformers (tests/test_import_boundary.py), so it reads the files
`transformers` would load offline instead of loading them: the model's
config.json (valid JSON naming a model type), its tokenizer files, and an
adapter's adapter_config.json. A hub id is looked up in this host's Hugging
Face cache only (offline by default, DESIGN.md). What it cannot catch (a
corrupt weights file) still fails the first generation job, which says why.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils.translation import gettext as _

from annotation.models import Policy
from config.storage import storage_path_resolve, storage_path_stored

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# A tokenizer is there when one of these is: the fast tokenizer's file, or a slow one's vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def policies_for_user(*, user: Any) -> QuerySet[Policy]:
    """The policies a manager sees and may use: all of them, as in the A/B session form and the admin.

    Policies are shared between projects (one model serves many); what uses
    them inside another manager's project stays out of sight there.
    """
    return Policy.objects.order_by("-created_at", "-id")


def _hub_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(home / "hub")
    return dirs


def _hub_snapshot(hub_id: str) -> Path | None:
    """The newest cached snapshot of a hub model holding a config.json, or None."""
    folder = "models--" + hub_id.replace("/", "--")
    for cache in _hub_cache_dirs():
        snapshots = cache / folder / "snapshots"
        if snapshots.is_dir():
            found = sorted(
                (path for path in snapshots.iterdir() if (path / "config.json").exists()),
                key=lambda path: path.stat().st_mtime,
                reverse=True,
            )
            if found:
                return found[0]
    return None


def _is_path(value: str) -> bool:
    prefix, colon, _rest = value.partition(":")
    return value.startswith(("/", ".", "~")) or bool(colon and prefix in ("models", "artifacts"))


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, str(error)


def model_folder_problems(folder: Path, *, shown: str) -> list[str]:
    """What keeps `transformers` from loading this folder's config and tokenizer offline ([] when nothing)."""
    if not folder.exists():
        return [_("%(path)s does not exist on this server.") % {"path": shown}]
    if not folder.is_dir():
        return [_("%(path)s is a file; give the folder that holds config.json.") % {"path": shown}]
    problems = []
    config_path = folder / "config.json"
    if not config_path.exists():
        if (folder / "adapter_config.json").exists():
            return [
                _(
                    "%(path)s is a PEFT adapter, not a model: put it under Adapter and its base model "
                    "under Base model."
                )
                % {"path": shown}
            ]
        problems.append(_("%(path)s has no config.json: it is not a saved model.") % {"path": shown})
    else:
        config, error = _read_json(config_path)
        if error is not None:
            problems.append(
                _("config.json in %(path)s does not read as JSON: %(error)s")
                % {"path": shown, "error": error}
            )
        elif not isinstance(config, dict) or not config.get("model_type"):
            problems.append(_("config.json in %(path)s names no model_type.") % {"path": shown})
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        problems.append(
            _("%(path)s has no tokenizer (none of %(files)s).")
            % {"path": shown, "files": ", ".join(TOKENIZER_FILES)}
        )
    elif (folder / "tokenizer.json").exists():
        _tokenizer, error = _read_json(folder / "tokenizer.json")
        if error is not None:
            problems.append(
                _("tokenizer.json in %(path)s does not read as JSON: %(error)s")
                % {"path": shown, "error": error}
            )
    return problems


def policy_base_model_problems(base_model: str) -> list[str]:
    """Problems of a base model given as a local folder or a hub id ([] when it would load)."""
    value = base_model.strip()
    if not value:
        return [_("Give a local folder or a hub id.")]
    if _is_path(value):
        return model_folder_problems(Path(storage_path_resolve(os.path.expanduser(value))), shown=value)
    if Path(value).is_dir():
        return model_folder_problems(Path(value), shown=value)
    if not HUB_ID.match(value):
        return [
            _("“%(value)s” is neither a folder on this server nor a hub id like org/model.")
            % {"value": value}
        ]
    snapshot = _hub_snapshot(value)
    if snapshot is None:
        return [
            _(
                "The hub model %(id)s is not in this server's Hugging Face cache, and the app works offline: "
                "download it first (huggingface-cli download %(id)s) or give a local folder."
            )
            % {"id": value}
        ]
    return model_folder_problems(snapshot, shown=value)


def policy_adapter_problems(adapter: str) -> list[str]:
    value = adapter.strip()
    if not value:
        return []
    folder = Path(storage_path_resolve(os.path.expanduser(value)))
    if not folder.is_dir():
        return [_("The adapter folder %(path)s does not exist on this server.") % {"path": value}]
    config, error = _read_json(folder / "adapter_config.json")
    if error is not None or not isinstance(config, dict):
        return [
            _("%(path)s has no readable adapter_config.json: it is not a PEFT adapter.") % {"path": value}
        ]
    return []


def _stored(value: str) -> str:
    value = value.strip()
    if value.startswith(("/", "~", ".")):
        return storage_path_stored(Path(os.path.expanduser(value)).resolve())
    return value


PROMPT_FORMATS = ("auto", "chat", "text")


@transaction.atomic
def policy_register(*, name: str, base_model: str, adapter: str = "", prompt_format: str = "auto") -> Policy:
    """A model policy, once its base model (and adapter) would load; raises ValidationError by field.

    A blank name takes the folder's (or hub id's) last part. Paths under the
    storage roots are kept relative to them (config.storage).
    """
    errors: dict[str, list[str]] = {}
    if problems := policy_base_model_problems(base_model):
        errors["base_model"] = problems
    if problems := policy_adapter_problems(adapter):
        errors["adapter"] = problems
    name = name.strip() or (adapter.strip() or base_model.strip()).rstrip("/").split("/")[-1].split(":")[-1]
    if prompt_format not in PROMPT_FORMATS:
        errors["prompt_format"] = [
            _("The prompt format is one of: %(formats)s.") % {"formats": ", ".join(PROMPT_FORMATS)}
        ]
    if Policy.objects.filter(name=name).exists():
        errors["name"] = [_("A policy named “%(name)s” already exists.") % {"name": name}]
    if errors:
        raise ValidationError(errors)
    try:
        with transaction.atomic():
            return Policy.objects.create(
                name=name,
                kind=Policy.Kind.MODEL,
                base_model=_stored(base_model),
                adapter=_stored(adapter),
                # An explicit format wins over "auto" (training.services.policy_prompt_format).
                generation_settings={} if prompt_format == "auto" else {"prompt_format": prompt_format},
            )
    except IntegrityError:
        raise ValidationError(
            {"name": [_("A policy named “%(name)s” already exists.") % {"name": name}]}
        ) from None
