"""The demo task's truth as an RL run's true scorer (registered as "demo_arithmetic" in training.rl).

An RL run's over-optimisation watch scores its held-out samples with the
reward model (the proxy) and, where the truth is known, with a true scorer.
For the demo's arithmetic problems the truth follows from the prompt: it
names the operation (by its template) and both numbers. A completion scores
1 when the answer it states is the true one, 0 otherwise; a prompt that is no
demo problem scores None (unknown).

Only `training.rl.true_scorer_load` imports this module, and only for a run
whose spec names it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

from training.demo import task as demo_task

_OPERATIONS: tuple[tuple[tuple[str, ...], Callable[[int, int], int]], ...] = (
    (demo_task.ADD_TEMPLATES, operator.add),
    (demo_task.SUBTRACT_TEMPLATES, operator.sub),
    (demo_task.MULTIPLY_TEMPLATES, operator.mul),
)


def _template_pattern(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for field, group in (
        ("{a}", r"(?P<a>\d+)"),
        ("{b}", r"(?P<b>\d+)"),
        ("{name}", r"\w+"),
        ("{obj}", r"\w+"),
    ):
        escaped = re.escape(field)
        pattern = pattern.replace(escaped, group, 1).replace(escaped, r"\w+" if field != "{a}" else r"\d+")
    return re.compile(pattern)


_PATTERNS = [
    (_template_pattern(template), operation) for templates, operation in _OPERATIONS for template in templates
]


def prompt_answer(prompt: Any) -> int | None:
    """The true answer of the demo problem a prompt (text, rendered chat, or messages) asks, or None."""
    if isinstance(prompt, list):
        prompt = " ".join(str(turn.get("content", "")) for turn in prompt if isinstance(turn, dict))
    if not isinstance(prompt, str):
        return None
    for pattern, operation in _PATTERNS:
        match = pattern.search(prompt)
        if match:
            return operation(int(match.group("a")), int(match.group("b")))
    return None


def true_scorer() -> Callable[[Any, Any], float | None]:
    """(prompt, completion) → 1.0 for the true answer, 0.0 for another, None for a prompt of no demo problem."""

    def score(prompt: Any, completion: Any) -> float | None:
        answer = prompt_answer(prompt)
        if answer is None:
            return None
        if isinstance(completion, list):
            completion = " ".join(
                str(turn.get("content", "")) for turn in completion if isinstance(turn, dict)
            )
        return 1.0 if demo_task.answer_extract(str(completion)) == answer else 0.0

    return score
