"""The prompt-format contract: how a prompt and a completion are rendered and tokenised, at every stage.

Dataset builds write prompts as `prompt_render` renders them; training reads
those rows; generation prompts a policy as it was trained (`prompt_token_ids`);
scoring and best-of-n read rewards from the same renderings
(`reward_input_ids`, the ids TRL's RewardTrainer trains on). Keeping them in
one module keeps the stages in agreement.

Two shapes (`conversational`):

- standard: a prompt is text. A plain prompt is "text\\n"; a chat prompt is
  its turns as "Role: content", blank-line separated, ending in "Assistant:".
  A completion is its text.
- conversational: a prompt is a list of {role, content} (a plain prompt is one
  user turn); a completion is one assistant turn.

Importable without Django, torch or the Parquet stack: GPU children (which
import no Django) and the web process both use it. Tokenisers are passed in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
# How a policy reads prompts. chat: always through the tokenizer's chat
# template (if it has one); text: never; auto: for chat prompts only.
PROMPT_FORMATS = ("chat", "text", "auto")
# The demo model's report (written next to its weights) says which format it was trained on.
DEMO_REPORT_FILENAME = "rankwise_demo.json"

Rendered = str | list[dict[str, str]]
Text = str | list[dict[str, Any]]


# --- rendering --------------------------------------------------------------------------------


def prompt_render(*, text: str, messages: list[dict[str, Any]] | None, conversational: bool) -> Rendered:
    """A prompt as the dataset holds it (see the module's docstring)."""
    if conversational:
        if messages is None:
            return [{"role": "user", "content": text}]
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if messages is None:
        return text.rstrip() + "\n"
    turns = [f"{ROLE_NAMES.get(str(m['role']), str(m['role']).title())}: {m['content']}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"]) + "\n"


def completion_render(text: str, *, conversational: bool) -> str | list[dict[str, str]]:
    """A completion as the dataset holds it: its text, or one assistant turn."""
    return [{"role": "assistant", "content": text}] if conversational else text


# --- prompting a policy -------------------------------------------------------------------------


def prompt_format_resolve(*, prompt_format: str, base_model: str) -> str:
    """A policy's prompt format; "auto" becomes what the demo model's report says it was trained on."""
    if prompt_format != "auto":
        return prompt_format
    report = Path(base_model) / DEMO_REPORT_FILENAME
    if report.is_file():
        trained_on = json.loads(report.read_text()).get("prompt_format")
        if trained_on in ("chat", "text"):
            return str(trained_on)
    return "auto"


def prompt_uses_chat(
    tokenizer: PreTrainedTokenizerBase, *, messages: list[dict[str, Any]] | None, prompt_format: str
) -> bool:
    """Whether to render a prompt with the chat template: when there is one, and the
    policy reads chat (`chat`) or the prompt is chat (`auto`)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    return prompt_format == "chat" or (prompt_format == "auto" and messages is not None)


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    *,
    text: str,
    messages: list[dict[str, Any]] | None,
    prompt_format: str,
) -> tuple[list[int], str]:
    """The prompt's token ids and the format used ("chat" or "text").

    Rendered as the dataset builds render it (`prompt_render`), so a policy
    trained on a build is prompted as it was trained: chat turns through the
    tokenizer's template with the generation prompt (the template adds any
    special tokens), text as "prompt\\n" with the tokenizer's own special tokens.
    """
    if prompt_uses_chat(tokenizer, messages=messages, prompt_format=prompt_format):
        turns = prompt_render(text=text, messages=messages, conversational=True)
        rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"]), "chat"
    rendered_text = prompt_render(text=text, messages=messages, conversational=False)
    return list(tokenizer(rendered_text)["input_ids"]), "text"


# --- reading a reward -----------------------------------------------------------------------------


def is_conversational(value: Text) -> bool:
    return isinstance(value, list)


def reward_input_ids(tokenizer: PreTrainedTokenizerBase, prompt: Text, completion: Text) -> list[int]:
    """The token ids TRL's RewardTrainer builds for one rendered prompt and completion.

    Standard rows: the completion gets the EOS unless it ends with it, and
    `prompt + completion` is tokenised with the tokenizer's own special
    tokens. Conversational rows: prompt and completion turns through the chat
    template, no generation prompt, no EOS added (the template ends the turn).
    """
    if is_conversational(prompt) != is_conversational(completion):
        raise ValueError("prompt and completion must both be text or both be lists of messages")
    if is_conversational(completion):
        rendered = tokenizer.apply_chat_template(
            list(prompt) + list(completion), tokenize=True, return_dict=True, tools=None
        )
        return list(rendered["input_ids"])
    eos = tokenizer.eos_token
    assert isinstance(completion, str) and isinstance(prompt, str)
    if eos is not None and not completion.endswith(eos):
        completion = completion + eos
    return list(tokenizer(text=prompt + completion)["input_ids"])
