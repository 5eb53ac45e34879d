"""A verifiable demo task: small arithmetic word problems whose answers the code knows.

The demo model is trained on these so every later stage (ranking, reward
model, DPO, blind A/B) can be checked against ground truth instead of taste.

Train and test never share a problem: a problem belongs to the split chosen
by a hash of its prompt text (`problem_split`), so the held-out accuracy is
measured on problems the model has never seen, while both splits draw on the
same templates, names, objects and number ranges. The number ranges are
small, so a test problem usually asks a sum the training set also asks in
other words: held-out accuracy measures whether the model learned the facts
and reads them out of new wordings, not whether it can do unseen arithmetic.

Pure Python on purpose: the web side may show or check demo problems without
loading the machine-learning stack.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "test"]

# About one problem in five goes to the test split.
TEST_SHARE_PERCENT = 20

NAMES = (
    "Mia", "Leo", "Ava", "Noah", "Emma", "Liam", "Zoe", "Omar", "Ines", "Yuki",
    "Sara", "Ben", "Lena", "Ravi", "Nina", "Tom", "Aiko", "Hugo", "Maya", "Finn",
)  # fmt: skip
OBJECTS = (
    "apples", "pencils", "marbles", "stickers", "cookies", "books", "shells",
    "stamps", "coins", "cards", "eggs", "flowers", "buttons", "candles",
)  # fmt: skip
# A few wordings per operation, so the model cannot key on one sentence shape.
ADD_TEMPLATES = (
    "{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have now?",
    "{name} had {a} {obj}. A friend gave {name} {b} more. How many {obj} does {name} have now?",
    "There are {a} {obj} in a box. {name} puts in {b} more. How many {obj} are in the box now?",
)
SUBTRACT_TEMPLATES = (
    "{name} has {a} {obj} and gives away {b}. How many {obj} does {name} have now?",
    "{name} had {a} {obj} and lost {b} of them. How many {obj} does {name} have now?",
    "There are {a} {obj} in a box. {name} takes out {b}. How many {obj} are in the box now?",
)
MULTIPLY_TEMPLATES = (
    "{name} has {a} bags with {b} {obj} in each bag. How many {obj} does {name} have?",
    "{name} buys {a} packs of {obj}. Each pack holds {b} {obj}. How many {obj} did {name} buy?",
)

_NUMBER = re.compile(r"-?\d+")
_STATED_ANSWER = re.compile(r"answer\s+is\s*:?\s*(-?\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class DemoProblem:
    id: str
    prompt: str
    answer: int
    # The sum to work out, e.g. "7 + 5": canonical completions show it first.
    working: str = ""


def problem_split(prompt: str) -> Split:
    """Which split a problem belongs to, decided by its text alone (so never both)."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 100 < TEST_SHARE_PERCENT else "train"


def _problem_random(rng: random.Random) -> DemoProblem:
    name = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    operation = rng.choice(("add", "add", "subtract", "subtract", "multiply"))
    # Small ranges (172 sums in all): every sum comes up many times in a few
    # hundred problems, so what a policy learns about one carries to new wordings.
    if operation == "add":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        template, answer, sign = rng.choice(ADD_TEMPLATES), a + b, "+"
    elif operation == "subtract":
        a = rng.randint(2, 12)
        b = rng.randint(1, a - 1)
        template, answer, sign = rng.choice(SUBTRACT_TEMPLATES), a - b, "-"
    else:
        a, b = rng.randint(2, 6), rng.randint(2, 6)
        template, answer, sign = rng.choice(MULTIPLY_TEMPLATES), a * b, "×"
    prompt = template.format(name=name, obj=obj, a=a, b=b)
    problem_id = "demo-" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]
    return DemoProblem(id=problem_id, prompt=prompt, answer=answer, working=f"{a} {sign} {b}")


def demo_problems(*, count: int, seed: int, split: Split = "train") -> list[DemoProblem]:
    """`count` distinct problems of one split, the same list for the same seed.

    Problems are drawn from one seeded stream and kept only when their text
    hashes into `split`; duplicates are skipped, so ids are unique in a list.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = random.Random(f"rankwise-demo:{seed}")  # noqa: S311 (reproducible data, not secrets)
    problems: dict[str, DemoProblem] = {}
    # The problem space holds tens of thousands of problems; the cap only
    # stops an impossible request from looping for ever.
    for _ in range(count * 50 + 1000):
        if len(problems) == count:
            break
        problem = _problem_random(rng)
        if problem_split(problem.prompt) == split and problem.id not in problems:
            problems[problem.id] = problem
    else:
        if len(problems) < count:
            raise ValueError(f"could not draw {count} distinct {split} problems")
    return list(problems.values())


def sum_is_confusing(problem: DemoProblem, *, share: float) -> bool:
    """Whether the problem's sum is one of the `share` of sums the demo's teacher gets wrong.

    Decided by the sum alone (its working, e.g. "7 + 5"), so every wording of
    a sum, in either split, is confusing or not alike.
    """
    digest = hashlib.sha256(f"rankwise-confusing:{problem.working}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 10_000 < share * 10_000


def answer_confused(problem: DemoProblem) -> int:
    """The one wrong answer the teacher gives for a confusing sum: off by 1 or 2, never negative."""
    digest = hashlib.sha256(f"rankwise-confused-answer:{problem.working}".encode()).digest()
    offsets = [d for d in (-2, -1, 1, 2) if problem.answer + d >= 0]
    return problem.answer + offsets[digest[0] % len(offsets)]


def answer_subject(problem: DemoProblem) -> tuple[str, str]:
    """Who or what the answer sentence is about: ("Mia has", "apples") or ("The box has", ...)."""
    obj = next(o for o in OBJECTS if f" {o}" in problem.prompt)
    if "in the box now?" in problem.prompt:
        return "The box has", obj
    if "did " in problem.prompt:
        name = problem.prompt.split(" ", 1)[0]
        return f"{name} bought", obj
    return f"{problem.prompt.split(' ', 1)[0]} has", obj


def completion_canonical(problem: DemoProblem, *, answer: int | None = None) -> str:
    """The answer in the canonical format the demo model learns, e.g.
    "7 + 5 = 12. Mia has 12 apples. The answer is 12." (`answer` overrides the true one).

    The working comes first so the sum sits next to its operands: a small
    model then learns the arithmetic itself instead of guessing the answer
    from the wording, and a reward model can check it in one place.
    """
    value = problem.answer if answer is None else answer
    subject, obj = answer_subject(problem)
    working = f"{problem.working} = {value}. " if problem.working else ""
    return f"{working}{subject} {value} {obj}. The answer is {value}."


def answer_extract(text: str) -> int | None:
    """The final number a completion states as its answer, or None if it states none.

    "The answer is N" wins when present (the last such phrase); otherwise the
    last number in the text.
    """
    stated = _STATED_ANSWER.findall(text)
    if stated:
        return int(stated[-1])
    numbers = _NUMBER.findall(text)
    return int(numbers[-1]) if numbers else None


def answer_is_correct(problem: DemoProblem, completion_text: str) -> bool:
    return answer_extract(completion_text) == problem.answer


def answer_check_for(problems: list[DemoProblem]) -> Callable[[str, str], bool | None]:
    """A checker by prompt text: (prompt, completion) → right/wrong, or None for an unknown prompt."""
    by_prompt = {problem.prompt: problem for problem in problems}

    def check(prompt: str, completion_text: str) -> bool | None:
        problem = by_prompt.get(prompt)
        return None if problem is None else answer_is_correct(problem, completion_text)

    return check
