"""Registering a model policy from a local folder or a hub id, checked when it is registered.

The check loads the model's config and tokenizer with `transformers`,
offline (a hub id only from this host's Hugging Face cache), never its
weights. The web process never imports torch or transformers
(tests/test_import_boundary.py), so the loading runs in a child process
(training/policy_probe.py); the files are looked at here first, so the
common mistakes (no such folder, no config.json, an adapter given as the
model, no weights) are named without starting it. What the check cannot
catch (a corrupt weights file) still fails the first generation job, which
says why.

A policy belongs to projects (Policy.projects): a manager sees and uses
only the policies of projects they manage (`policies_for_user`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils.translation import gettext as _

from annotation.models import Policy, Project
from annotation.selectors import policies_for_user as _policies_for_user
from config.storage import storage_path_resolve, storage_path_stored

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# A tokenizer is there when one of these is: the fast tokenizer's file, or a slow one's vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
PROBE = Path(__file__).with_name("policy_probe.py")
# Loading a config and a tokenizer takes about 3 s on a quiet host (11-14 s on two cores under a load
# of 15). The page answers "try again" before gunicorn's default 30 s worker timeout would cut it off.
PROBE_TIMEOUT_S = 25


def policies_for_user(*, user: Any) -> QuerySet[Policy]:
    """The policies a manager sees and may use: those of the projects they manage, newest first."""
    return _policies_for_user(user=user).order_by("-created_at", "-id")


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


def model_folder_problems(folder: Path, *, shown: str, weights: bool = True) -> list[str]:
    """What the files of this folder already show to be missing ([] when the loading check may start)."""
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
    if weights and not any(folder.glob("*.safetensors")):
        problems.append(
            _("%(path)s has no weights: models are loaded from .safetensors files only.") % {"path": shown}
        )
    return problems


def _model_type(folder: Path) -> str:
    config, _error = _read_json(folder / "config.json")
    return str(config.get("model_type", "")) if isinstance(config, dict) else ""


def policy_load_problems(model: str, *, shown: str, model_type: str = "", chat: bool = False) -> list[str]:
    """Load the config and tokenizer of `model` (a folder or a cached hub id) offline in a child process.

    [] when both load (and, when `chat`, the tokenizer has a chat template);
    otherwise what failed, in words.
    """
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    try:
        done = subprocess.run(
            [sys.executable, "-I", str(PROBE), json.dumps({"model": model, "chat": chat})],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return [
            _("Loading the config and tokenizer of %(path)s took more than %(seconds)d s; try again.")
            % {"path": shown, "seconds": PROBE_TIMEOUT_S}
        ]
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        last = (done.stderr.strip().splitlines() or [""])[-1][:500]
        return [_("The loading check of %(path)s failed: %(error)s") % {"path": shown, "error": last}]
    problem, detail = answer.get("problem"), answer.get("detail", "")
    model_type = answer.get("model_type") or model_type
    words = {
        "config": _("The config of %(path)s does not load: %(error)s"),
        "architecture": _(
            "config.json in %(path)s names the model type “%(type)s”, an architecture this server's "
            "transformers does not know."
        ),
        "remote_code": _(
            "%(path)s needs its own Python code to load (trust_remote_code), which this server never runs."
        ),
        "not_causal": _(
            "%(path)s is a “%(type)s” model, not a causal language model: it cannot write completions."
        ),
        "not_cached": _(
            "The hub model %(path)s is not in this server's Hugging Face cache, and the app works offline: "
            "download it first (huggingface-cli download %(path)s) or give a local folder."
        ),
        "tokenizer": _("The tokenizer of %(path)s does not load: %(error)s"),
        "no_chat_template": _(
            "The tokenizer of %(path)s has no chat template, but the prompt format is Chat: "
            "choose Plain text or Automatic, or give a tokenizer with a chat template."
        ),
    }
    if problem is None:
        return []
    template = words.get(problem, _("The config of %(path)s does not load: %(error)s"))
    return [template % {"path": shown, "type": model_type or "?", "error": detail}]


def policy_base_model_problems(base_model: str, *, chat: bool = False, weights: bool = True) -> list[str]:
    """Problems of a base model given as a local folder or a hub id ([] when it would load)."""
    value = base_model.strip()
    if not value:
        return [_("Give a local folder or a hub id.")]
    if _is_path(value) or Path(value).is_dir():
        folder = Path(storage_path_resolve(os.path.expanduser(value))) if _is_path(value) else Path(value)
        if problems := model_folder_problems(folder, shown=value, weights=weights):
            return problems
        return policy_load_problems(str(folder), shown=value, model_type=_model_type(folder), chat=chat)
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
    if problems := model_folder_problems(snapshot, shown=value, weights=weights):
        return problems
    return policy_load_problems(value, shown=value, model_type=_model_type(snapshot), chat=chat)


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
    if not any(folder.glob("*.safetensors")):
        return [
            _("%(path)s has no weights: models are loaded from .safetensors files only.") % {"path": value}
        ]
    return []


def _stored(value: str) -> str:
    value = value.strip()
    if value.startswith(("/", "~", ".")):
        return storage_path_stored(Path(os.path.expanduser(value)).resolve())
    return value


PROMPT_FORMATS = ("auto", "chat", "text")


def policy_projects_add(*, policy: Policy, projects: Iterable[Project]) -> None:
    """The policy belongs to these projects too (a policy used in a project belongs to it)."""
    through = Policy.projects.through
    through.objects.bulk_create(
        [through(policy_id=policy.pk, project_id=project.pk) for project in projects],
        ignore_conflicts=True,
    )


def policy_register(
    *,
    name: str,
    base_model: str,
    projects: Iterable[Project],
    adapter: str = "",
    prompt_format: str = "auto",
) -> Policy:
    """A model policy of `projects`, once its base model's config and tokenizer (and adapter) load.

    Raises ValidationError by field. A blank name takes the folder's (or hub
    id's) last part. Paths under the storage roots are kept relative to them
    (config.storage). The check runs before any transaction is opened: it
    takes seconds.
    """
    projects = list(projects)
    errors: dict[str, list[str]] = {}
    if not projects:
        errors["projects"] = [_("Choose at least one project the policy is for.")]
    if prompt_format not in PROMPT_FORMATS:
        errors["prompt_format"] = [
            _("The prompt format is one of: %(formats)s.") % {"formats": ", ".join(PROMPT_FORMATS)}
        ]
    name = name.strip() or (adapter.strip() or base_model.strip()).rstrip("/").split("/")[-1].split(":")[-1]
    if Policy.objects.filter(name=name).exists():
        errors["name"] = [_("A policy named “%(name)s” already exists.") % {"name": name}]
    if problems := policy_adapter_problems(adapter):
        errors["adapter"] = problems
    if problems := policy_base_model_problems(base_model, chat=prompt_format == "chat"):
        errors["base_model"] = problems
    if errors:
        raise ValidationError(errors)
    try:
        with transaction.atomic():
            policy = Policy.objects.create(
                name=name,
                kind=Policy.Kind.MODEL,
                base_model=_stored(base_model),
                adapter=_stored(adapter),
                # An explicit format wins over "auto" (training.services.policy_prompt_format).
                generation_settings={} if prompt_format == "auto" else {"prompt_format": prompt_format},
            )
            policy_projects_add(policy=policy, projects=projects)
            return policy
    except IntegrityError:
        raise ValidationError(
            {"name": [_("A policy named “%(name)s” already exists.") % {"name": name}]}
        ) from None
