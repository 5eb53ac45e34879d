"""Whether a base model can load, decided when a run is submitted rather than 25 s into its process.

Runs from the web process, so nothing here imports torch or transformers: the
checks read the files a model folder must hold (config.json with a
model_type, a tokenizer, safetensors weights) or, for a hub id, the local
Hugging Face cache (and, unless the hub is offline, the hub's config.json).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

CONFIG_FILENAME = "config.json"
TOKENIZER_FILENAMES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# What huggingface_hub accepts as a repo id: "name" or "owner/name".
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def _folder_problem(folder: Path, shown: str) -> str | None:
    if not folder.is_dir():
        return f"{shown} is a file, not a model folder"
    config_file = folder / CONFIG_FILENAME
    if not config_file.is_file():
        return f"{shown} has no {CONFIG_FILENAME}: not a saved Hugging Face model"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{shown}/{CONFIG_FILENAME} cannot be read: {error}"
    if not isinstance(config, dict) or not config.get("model_type"):
        return f"{shown}/{CONFIG_FILENAME} names no model_type"
    if not any((folder / name).is_file() for name in TOKENIZER_FILENAMES):
        return f"{shown} has no tokenizer ({', '.join(TOKENIZER_FILENAMES)})"
    if not any(folder.glob("*.safetensors")):
        return f"{shown} has no .safetensors weights (models are loaded from safetensors only)"
    return None


def _hub_offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_problem(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, CONFIG_FILENAME)
    if isinstance(cached, str):
        return None
    if _hub_offline():
        return (
            f"{repo_id!r} is neither a folder on this server nor a model in its Hugging Face cache "
            "(and the hub is offline here)"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        hf_hub_download(repo_id, CONFIG_FILENAME)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{repo_id!r} is neither a folder on this server nor a model the hub serves: {first_line}"
    return None


def base_model_problem(name_or_path: str) -> str | None:
    """Why `name_or_path` (a folder on this host or a hub id) cannot be a base model; None when it can."""
    from config.storage import storage_path_resolve

    shown = name_or_path.strip()
    if not shown:
        return "give a model folder or a hub id"
    resolved = Path(storage_path_resolve(shown))
    if resolved.exists():
        return _folder_problem(resolved, shown)
    looks_like_a_path = shown.startswith(("/", ".", "~")) or ":" in shown or shown.count("/") > 1
    if looks_like_a_path or not HUB_ID.match(shown):
        return f"no model folder at {shown} on this server"
    return _hub_problem(shown)
