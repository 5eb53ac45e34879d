"""Load a model's config and tokenizer with `transformers`, offline, and say what failed: one JSON line.

Run by `training.policies` in a child process (`python -I policy_probe.py
'{"model": ..., "chat": ...}'`) when a policy is registered, so the web
process never imports transformers (tests/test_import_boundary.py). The
child hides torch from the import system: configs and tokenizers do not need
it, no weights are loaded, and the check starts in about half the time.

The answer's `problem` is a code the web side words (and translates):
`config` (the config does not load), `architecture` (a model type this
transformers does not know), `remote_code` (the model needs its own code,
which is never run), `not_causal` (the architecture cannot generate),
`not_cached` (a hub id missing from the local cache), `tokenizer` (the
tokenizer does not load), `no_chat_template` (asked for, and absent); or
null when all of it loads.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
from typing import Any

HEAVY = ("torch",)


def _hide(names: tuple[str, ...]) -> None:
    find_spec = importlib.machinery.PathFinder.find_spec

    def hidden(cls: Any, name: str, path: Any = None, target: Any = None) -> Any:
        if name.split(".")[0] in names:
            return None
        return find_spec(name, path, target)

    importlib.machinery.PathFinder.find_spec = classmethod(hidden)  # type: ignore[method-assign,assignment]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:500]


def probe(model: str, *, chat: bool) -> dict[str, Any]:
    """What loading `model`'s config and tokenizer offline says (see the module's docstring)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    answer: dict[str, Any] = {"problem": None, "detail": "", "model_type": "", "chat_template": False}
    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        text = str(error)
        if "trust_remote_code" in text:
            answer["problem"] = "remote_code"
        elif "does not recognize this architecture" in text or "Unrecognized model" in text:
            answer["problem"] = "architecture"
        elif "local_files_only" in text or "offline" in text.lower() or "cached" in text:
            answer["problem"] = "not_cached"
        else:
            answer["problem"] = "config"
        answer["detail"] = _first_line(error)
        return answer
    model_type = str(getattr(config, "model_type", "") or "")
    answer["model_type"] = model_type
    if model_type not in CONFIG_MAPPING_NAMES:
        answer["problem"] = "architecture"
        return answer
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        answer["problem"] = "not_causal"
        return answer
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # whatever the tokenizer's own code raises is the answer
        answer["problem"] = "tokenizer"
        answer["detail"] = f"{type(error).__name__}: {_first_line(error)}"
        return answer
    answer["chat_template"] = bool(getattr(tokenizer, "chat_template", None))
    if chat and not answer["chat_template"]:
        answer["problem"] = "no_chat_template"
    return answer


def main(argv: list[str]) -> int:
    request = json.loads(argv[1])
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _hide(HEAVY)
    answer = probe(request["model"], chat=bool(request.get("chat")))
    answer["torch_loaded"] = "torch" in sys.modules
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
