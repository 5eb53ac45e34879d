"""A language-model judge: its prompt template, how its answer becomes a ranking, and its job's child program.

    python -m training.judge_process SPEC.json WORK.json

The child imports no Django and never touches the database: its supervisor
(the Celery task, `training.judges`) wrote WORK.json before the launch,
listing the project's open tasks that have no verdict from the judge yet (a
retried attempt resumes there), and applies the events this program reports
(`training.events`) to the job's row, fenced by the attempt. The template
helpers at the top are pure Python: the web process checks a manager's
template with them.

How the judge's answer is read — label likelihoods, not free generation:

The judge is shown the task's prompt and its K responses labelled A, B, C…
and asked which is best. Instead of letting it write an answer and parsing
the text, the program reads the model's next-token distribution right where
the answer starts and takes, per label, the probability of that label's
token (with and without a leading space, whichever the tokenizer uses),
renormalised over the K labels (numbers 1, 2, 3… instead of letters for a
tokenizer that cannot tell capital letters apart). Why:

- tiny and base models rarely follow an output format: free text such as
  "I think the first one, because…" or an endless repetition would leave
  most tasks unreadable, while every causal LM has a distribution over the
  label tokens, so every task gets a reading from one forward pass;
- probabilities give a full ranking (and ties where they are equal), not
  only a winner, and they are deterministic: no sampling seed;
- letters favour the positions models prefer (often "A"), so each task is
  read K times, the responses rotated one place each time, and a response's
  score is the mean probability that the judge names it best over the K
  readings: every response is seen once under every label.

A reading that is not a probability distribution (non-finite numbers, e.g.
an overflow in half precision), or that prefers no response once positions
are balanced (a model that always names "A"), is reported as unreadable
with the reason;
the supervisor skips such a task (people take it) and counts it on the
judge, and never turns it into a ranking. A tokenizer that gives two labels
the same token cannot be read at all: the job fails saying so.

1. Load the policy (base model and adapter); the watch thread heartbeats.
2. Report `started` with the open tasks and those already read.
3. Per batch of tasks: stop if the stop file says cancel (`stopped`, cause
   "cancel") or SIGTERM came (`stopped`, cause "signal"); render each
   rotation through the template (and the model's chat template where it
   reads chat); read the label probabilities; report the batch's verdicts
   (`batch`): the supervisor writes them and the progress in one transaction.
4. Report `result`: the supervisor marks the job succeeded and runs the judge.
"""

from __future__ import annotations

import json
import math
import string
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.gpu_job_process import ChildChannel, gpu_job_main
from training.prompts import ROLE_NAMES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# --- the prompt template --------------------------------------------------------------

LABELS = string.ascii_uppercase
# Labels for a tokenizer that cannot tell capital letters apart (a tiny one trained without them).
NUMBER_LABELS = "123456789"
# Placeholders a template must hold, and those it may.
TEMPLATE_REQUIRED = ("prompt", "candidates")
TEMPLATE_OPTIONAL = ("labels", "count")
DEFAULT_TEMPLATE = (
    "You are judging {count} responses to the same request. Read the request and the responses, "
    "then say which response is the best: the most helpful, correct and clear.\n\n"
    "Request:\n{prompt}\n\n"
    "{candidates}\n\n"
    "Which response is the best? Answer with one letter ({labels}).\n"
    "Answer:"
)
# Characters of one response shown to the judge; the rest is cut (and the prompt kept whole).
CANDIDATE_MAX_CHARS = 4000
# Mean probabilities this close are one preference: no ranking can be read from them.
SAME_PREFERENCE = 1e-9
# Tasks read and written together (one transaction, one progress step), and sequences per forward pass.
TASKS_PER_BATCH = 16
SEQUENCES_PER_FORWARD = 8


def template_problems(template: str) -> list[str]:
    """What is wrong with a judge prompt template (empty: nothing).

    A template is Python format text: {prompt} (the task's prompt) and
    {candidates} (the labelled responses) are required; {labels} ("A, B, C")
    and {count} may be used; literal braces are written doubled ({{ }}).
    """
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        return [f"the template cannot be read ({error}); write literal braces doubled: {{{{ and }}}}"]
    problems = []
    missing = [name for name in TEMPLATE_REQUIRED if name not in fields]
    if missing:
        problems.append("the template must contain " + " and ".join("{" + name + "}" for name in missing))
    allowed = set(TEMPLATE_REQUIRED + TEMPLATE_OPTIONAL)
    unknown = sorted({name for name in fields if name not in allowed})
    if unknown:
        shown = ", ".join("{" + name + "}" for name in unknown)
        problems.append(
            f"unknown placeholder(s) {shown}: use {{prompt}}, {{candidates}}, {{labels}} and {{count}}"
        )
    return problems


def prompt_as_text(*, text: str, messages: list[dict[str, Any]] | None) -> str:
    """A task's prompt as the judge reads it: its text, or its chat turns as "Role: content"."""
    if messages is None:
        return text.strip()
    return "\n\n".join(
        f"{ROLE_NAMES.get(str(m['role']), str(m['role']).title())}: {str(m['content']).strip()}"
        for m in messages
    )


def judge_prompt_render(
    template: str,
    *,
    prompt: str,
    candidates: list[str],
    max_chars: int = CANDIDATE_MAX_CHARS,
    alphabet: str = LABELS,
) -> str:
    """The template filled in for one ordering of the candidates (labelled A, B, C… in this order)."""
    if len(candidates) > len(alphabet):
        raise ValueError(f"a judge labels at most {len(alphabet)} responses, got {len(candidates)}")
    labels = alphabet[: len(candidates)]
    shown = []
    for label, text in zip(labels, candidates, strict=True):
        body = text.strip()
        if len(body) > max_chars:
            body = body[:max_chars] + " […]"
        shown.append(f"Response {label}:\n{body}")
    return template.format(
        prompt=prompt, candidates="\n\n".join(shown), labels=", ".join(labels), count=len(candidates)
    )


def rotations(count: int) -> list[list[int]]:
    """The K orderings a task is read in: rotation r shows candidate (r + i) mod K under label i."""
    return [[(r + i) % count for i in range(count)] for r in range(count)]


def verdict_from_readings(readings: list[list[float]], orders: list[list[int]]) -> list[float] | str:
    """Each candidate's mean probability of being named best, or why the readings cannot be used.

    `readings[r][i]`: the probability of label i in rotation r (already
    normalised over the labels); `orders[r][i]`: the candidate shown under it.
    """
    count = len(orders[0])
    totals = [0.0] * count
    for probabilities, order in zip(readings, orders, strict=True):
        if len(probabilities) != count or not all(math.isfinite(p) and p >= 0 for p in probabilities):
            return f"the model's label probabilities are not numbers: {probabilities}"
        for label_index, candidate in enumerate(order):
            totals[candidate] += probabilities[label_index]
    means = [total / len(orders) for total in totals]
    if max(means) - min(means) <= SAME_PREFERENCE:
        # Only a preference for a position (or none at all): a ranking from it would be made up.
        return "the model prefers no response over another once positions are balanced"
    return means


# --- the spec --------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgePolicySpec:
    """The judge's model: a base model (local path or hub id), an optional adapter, how it reads prompts."""

    base_model: str
    adapter: str = ""
    # chat: through the tokenizer's chat template (if it has one); text: never; auto: when it has one.
    prompt_format: str = "auto"


@dataclass(frozen=True)
class JudgeSpec:
    """Everything a judge job's process needs, written by the task as JSON next to its log."""

    job_id: int
    attempt: int
    judge_id: int
    policy: JudgePolicySpec
    template: str = DEFAULT_TEMPLATE
    candidate_max_chars: int = CANDIDATE_MAX_CHARS
    tasks_per_batch: int = TASKS_PER_BATCH
    sequences_per_forward: int = SEQUENCES_PER_FORWARD

    def __post_init__(self) -> None:
        problems = template_problems(self.template)
        if problems:
            raise ValueError("; ".join(problems))
        if self.tasks_per_batch < 1 or self.sequences_per_forward < 1 or self.candidate_max_chars < 1:
            raise ValueError("batch sizes and the character limit must be at least 1")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> JudgeSpec:
        data = json.loads(Path(path).read_text())
        data["policy"] = JudgePolicySpec(**data["policy"])
        return cls(**data)


# --- reading the model ------------------------------------------------------------------


@dataclass(frozen=True)
class TaskWork:
    task_id: int
    prompt_text: str
    prompt_messages: list[dict[str, Any]] | None
    # (completion id, text) in the task's position order.
    completions: list[tuple[int, str]]


def tasks_from_work(work: dict[str, Any]) -> tuple[int, list[TaskWork]]:
    """(open tasks of the project, those still lacking a verdict), as the supervisor listed them."""
    return int(work["total"]), [
        TaskWork(
            task_id=int(item["task_id"]),
            prompt_text=str(item["prompt_text"]),
            prompt_messages=item["prompt_messages"],
            completions=[(int(pk), str(text)) for pk, text in item["completions"]],
        )
        for item in work["tasks"]
    ]


def label_token_ids(
    tokenizer: PreTrainedTokenizerBase, count: int, alphabet: str = LABELS
) -> list[list[int]]:
    """Per label, the token of "X" and of " X" (one or two ids: a form that takes more than one token,
    such as a space and then the letter, starts with something else); raises when a label has no token
    of its own or two labels share one."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids: list[list[int]] = []
    for label in alphabet[:count]:
        variants: list[int] = []
        for text in (label, " " + label):
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1 and encoded[0] != unknown and encoded[0] not in variants:
                variants.append(int(encoded[0]))
        if not variants:
            raise ValueError(f"the tokenizer has no token for the label {label!r}")
        ids.append(variants)
    seen: dict[int, str] = {}
    for label, variants in zip(alphabet, ids, strict=False):
        for token in variants:
            if token in seen:
                raise ValueError(
                    f"the tokenizer gives the labels {seen[token]!r} and {label!r} the same token ({token}): "
                    "the judge's answer between them cannot be read"
                )
            seen[token] = label
    return ids


def labels_pick(tokenizer: PreTrainedTokenizerBase, count: int) -> tuple[str, list[list[int]]]:
    """The label alphabet for `count` responses: capital letters, else numbers when the tokenizer cannot
    tell the letters apart; raises, saying why, when it can tell neither apart."""
    problems = []
    for alphabet in (LABELS, NUMBER_LABELS):
        if count > len(alphabet):
            problems.append(f"{alphabet[:3]}…: only {len(alphabet)} labels")
            continue
        try:
            return alphabet, label_token_ids(tokenizer, count, alphabet)
        except ValueError as error:
            problems.append(str(error))
    raise ValueError("no labels the judge's answer can be read by: " + "; ".join(problems))


def judge_input_ids(tokenizer: PreTrainedTokenizerBase, rendered: str, *, prompt_format: str) -> list[int]:
    """The rendered judge prompt as token ids, ending where the answer's first token goes.

    Through the chat template (one user turn and the generation prompt) when
    the tokenizer has one and the policy does not read plain text; else the
    text with the tokenizer's own special tokens.
    """
    uses_chat = prompt_format != "text" and bool(getattr(tokenizer, "chat_template", None))
    if uses_chat:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": rendered}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(chat, add_special_tokens=False)["input_ids"])
    return list(tokenizer(rendered)["input_ids"])


def context_limit(tokenizer: PreTrainedTokenizerBase, model: Any) -> int | None:
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    limits = [int(positions)] if positions else []
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max and model_max < 1_000_000:
        limits.append(int(model_max))
    return min(limits) if limits else None


def label_probabilities(
    tokenizer: PreTrainedTokenizerBase,
    model: Any,
    sequences: list[list[int]],
    label_ids: list[list[int]],
    *,
    batch_size: int,
) -> list[list[float]]:
    """For each sequence, the probability of each label as the next token, renormalised over the labels.

    Sequences are padded on the right and each is read at its own last
    token, so the padding never reaches the reading and positions stay as
    they would be alone.
    """
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = int(pad_id if pad_id is not None else 0)
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        last = torch.tensor([len(ids) - 1 for ids in chunk], device=logits.device)
        rows = logits[torch.arange(len(chunk), device=logits.device), last].float()
        log_probs = torch.log_softmax(rows, dim=-1)
        per_label = torch.stack(
            [torch.logsumexp(log_probs[:, variants], dim=-1) for variants in label_ids], dim=-1
        )
        out.extend(torch.softmax(per_label, dim=-1).cpu().tolist())
    return out


def task_sequences(
    spec: JudgeSpec, tokenizer: PreTrainedTokenizerBase, task: TaskWork, *, limit: int | None, alphabet: str
) -> tuple[list[list[int]], list[list[int]], bool]:
    """(token ids per rotation, the rotations, whether any was cut to the model's context)."""
    orders = rotations(len(task.completions))
    prompt = prompt_as_text(text=task.prompt_text, messages=task.prompt_messages)
    sequences = []
    cut = False
    for order in orders:
        rendered = judge_prompt_render(
            spec.template,
            prompt=prompt,
            candidates=[task.completions[index][1] for index in order],
            max_chars=spec.candidate_max_chars,
            alphabet=alphabet,
        )
        ids = judge_input_ids(tokenizer, rendered, prompt_format=spec.policy.prompt_format)
        if limit is not None and len(ids) > limit:
            # The question and the labels sit at the end: keep the end.
            ids = ids[-limit:]
            cut = True
        sequences.append(ids)
    return sequences, orders, cut


def judge_job_run(spec: JudgeSpec, work: dict[str, Any], channel: ChildChannel) -> str:
    """Read the listed tasks; returns "succeeded", "cancelled" or "stopped" (SIGTERM)."""
    from training.generation import PolicySpec, policy_load

    log = channel.log
    started = time.monotonic()
    tokenizer, model = policy_load(
        PolicySpec(
            base_model=spec.policy.base_model,
            adapter=spec.policy.adapter,
            prompt_format=spec.policy.prompt_format,
        )
    )
    limit = context_limit(tokenizer, model)
    log(f"job {spec.job_id} attempt {spec.attempt}: judge model loaded in {time.monotonic() - started:.1f} s")

    total, items = tasks_from_work(work)
    channel.emit("started", tasks_total=total, tasks_done=total - len(items))
    log(f"{len(items)} of {total} open tasks lack a verdict")
    labels_by_count: dict[int, tuple[str, list[list[int]]]] = {}
    done = unreadable = 0
    for start in range(0, len(items), spec.tasks_per_batch):
        if channel.cancel_asked():
            log(f"cancelled after {done} tasks")
            channel.emit("stopped", cause="cancel")
            return "cancelled"
        if channel.signalled.is_set():
            log(f"stopped by SIGTERM after {done} tasks")
            channel.emit("stopped", cause="signal")
            return "stopped"
        batch = items[start : start + spec.tasks_per_batch]
        verdicts: dict[int, dict[str, Any]] = {}
        sequences: list[list[int]] = []
        plan: list[tuple[TaskWork, list[list[int]], int, int]] = []
        for task in batch:
            count = len(task.completions)
            if count < 2:
                verdicts[task.task_id] = {"note": "a task with fewer than two responses has nothing to rank"}
                continue
            if count not in labels_by_count:
                labels_by_count[count] = labels_pick(tokenizer, count)
                log(f"{count} responses are labelled {', '.join(labels_by_count[count][0][:count])}")
            ids, orders, cut = task_sequences(
                spec, tokenizer, task, limit=limit, alphabet=labels_by_count[count][0]
            )
            if cut:
                log(f"task {task.task_id}: the judge prompt was cut to the model's {limit} tokens")
            plan.append((task, orders, len(sequences), count))
            sequences.extend(ids)
        by_count: dict[int, list[int]] = {}
        for position, (_, _, _, count) in enumerate(plan):
            by_count.setdefault(count, []).append(position)
        readings: dict[int, list[list[float]]] = {}
        for count, positions in by_count.items():
            rows = [
                sequences[plan[p][2] + r] for p in positions for r in range(count)
            ]  # every rotation of every task with this many labels
            probabilities = label_probabilities(
                tokenizer, model, rows, labels_by_count[count][1], batch_size=spec.sequences_per_forward
            )
            for index, p in enumerate(positions):
                readings[p] = probabilities[index * count : (index + 1) * count]
        for position, (task, orders, _, _) in enumerate(plan):
            verdict = verdict_from_readings(readings[position], orders)
            if isinstance(verdict, str):
                verdicts[task.task_id] = {"note": verdict}
            else:
                verdicts[task.task_id] = {
                    "scores": {
                        str(pk): value for (pk, _), value in zip(task.completions, verdict, strict=True)
                    }
                }
        unreadable += sum(1 for value in verdicts.values() if "scores" not in value)
        channel.emit("batch", verdicts=verdicts)
        done += len(batch)
        log(f"read {done} of {len(items)} tasks ({unreadable} unreadable)")
    channel.emit("result")
    log(f"succeeded: {done} tasks read, {unreadable} unreadable, in {time.monotonic() - started:.1f} s")
    return "succeeded"


def main(argv: list[str] | None = None) -> int:
    return gpu_job_main(
        argv, module="training.judge_process", kind="judge", load=JudgeSpec.from_json, run=judge_job_run
    )


if __name__ == "__main__":
    sys.exit(main())
