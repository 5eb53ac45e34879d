"""The entry of a generation job's own process.

    python -m training.generation_process SPEC.json

The Celery task starts this process and waits for it; the process writes its
own progress, heartbeat and terminal state to the job's row (through
`training.services`), so a worker that dies mid-job loses nothing.

1. Load the policy (for a best-of-n policy: its base policy and the reward model).
2. List the project's prompts that have fewer than `n` completions from the
   policy; those with enough are done (a retried attempt resumes here).
3. Per batch of prompts lacking the same number of completions: stop if the
   job was cancelled or taken over; sample (each prompt encoded once, its
   samples expanded with `num_return_sequences`); for best-of-n, score the
   candidates and keep the best of each group of `n`; write the batch's
   completions and the progress in one transaction.
4. Mark the job succeeded (which makes ranking tasks), or failed with the error.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from training.gpu_job_process import Heartbeat, attempt_stop, gpu_job_main

if TYPE_CHECKING:
    from training.generation import GenerationSpec


@dataclass(frozen=True)
class PromptWork:
    prompt_id: int
    text: str
    messages: list[dict[str, Any]] | None
    content_hash: str
    existing: int  # completions the policy already has for it


def prompts_to_generate(spec: GenerationSpec) -> tuple[int, list[PromptWork]]:
    """(prompts in the project, those still lacking completions from the policy), in prompt order."""
    from django.db.models import Count, Q

    from annotation.models import Prompt

    prompts = Prompt.objects.filter(project_id=spec.project_id)
    lacking = (
        prompts.annotate(existing=Count("completions", filter=Q(completions__policy_id=spec.policy_id)))
        .filter(existing__lt=spec.n)
        .order_by("pk")
        .values_list("pk", "text", "messages", "content_hash", "existing")
    )
    return prompts.count(), [PromptWork(*row) for row in lacking.iterator(chunk_size=2000)]


def batches(spec: GenerationSpec, work: list[PromptWork]) -> Iterator[list[PromptWork]]:
    """Prompts lacking the same number of completions, at most `sequences_per_batch` samples a batch."""
    by_missing: dict[int, list[PromptWork]] = defaultdict(list)
    for item in work:
        by_missing[spec.n - item.existing].append(item)
    for missing in sorted(by_missing, reverse=True):
        size = max(1, spec.sequences_per_batch // (missing * spec.samples_per_completion))
        group = by_missing[missing]
        for start in range(0, len(group), size):
            yield group[start : start + size]


def generation_job_run(spec: GenerationSpec, *, log: Any = print) -> str:
    """Generate what the job's prompts lack; returns "succeeded", "cancelled" or "lost".

    "lost": the job is no longer this attempt's (taken over, failed by hand):
    nothing more is written and the row is left to whoever owns it.
    """
    from training.generation import (
        best_index,
        policy_load,
        prompt_format_resolve,
        prompt_seed,
        prompt_token_ids,
        sample_seed,
        samples_generate,
    )
    from training.services import (
        generation_job_finish,
        generation_job_heartbeat,
        generation_job_mark_cancelled,
        generation_job_started,
        generation_job_stop_reason,
        generation_job_write_batch,
    )

    started = time.monotonic()
    heartbeat = Heartbeat(lambda: generation_job_heartbeat(job_id=spec.job_id, attempt=spec.attempt))
    tokenizer, model = policy_load(spec.policy)
    prompt_format = prompt_format_resolve(spec.policy)
    scorer = None
    if spec.best_of_n is not None:
        from training.prompts import completion_render, prompt_render
        from training.scoring import reward_model_load

        scorer = reward_model_load(spec.best_of_n.reward_model_path)
        scorer[1].to(next(model.parameters()).device)
    log(f"job {spec.job_id} attempt {spec.attempt}: policy loaded in {time.monotonic() - started:.1f} s")

    total, work = prompts_to_generate(spec)
    if not generation_job_started(
        job_id=spec.job_id, attempt=spec.attempt, prompts_total=total, prompts_done=total - len(work)
    ):
        return "lost"
    log(f"{len(work)} of {total} prompts lack completions")
    sampling = {"temperature": spec.temperature, "top_p": spec.top_p, "max_new_tokens": spec.max_new_tokens}
    per = spec.samples_per_completion
    written = 0
    for batch in batches(spec, work):
        outcome = attempt_stop(
            stop_reason=lambda: generation_job_stop_reason(job_id=spec.job_id, attempt=spec.attempt),
            mark_cancelled=lambda: generation_job_mark_cancelled(job_id=spec.job_id, attempt=spec.attempt),
            heartbeat=heartbeat,
            log=log,
            done=f"{written} completions",
        )
        if outcome is not None:
            return outcome
        missing = spec.n - batch[0].existing
        encoded = [
            prompt_token_ids(tokenizer, text=p.text, messages=p.messages, prompt_format=prompt_format)
            for p in batch
        ]
        seeds = [prompt_seed(job_seed=spec.seed, prompt_hash=p.content_hash) for p in batch]
        # Completion i of a prompt is the i-th of the policy's completions for
        # it; for best-of-n, its candidates are samples i·per … i·per + per − 1.
        indices = [list(range(p.existing, spec.n)) for p in batch]
        sample_seeds = [
            [sample_seed(prompt_seed=seed, index=i * per + j) for i in wanted for j in range(per)]
            for seed, wanted in zip(seeds, indices, strict=True)
        ]
        samples = samples_generate(
            tokenizer,
            model,
            [ids for ids, _format in encoded],
            sample_seeds,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_new_tokens=spec.max_new_tokens,
            on_step=heartbeat,
        )
        scores: list[list[float]] = [[] for _ in batch]
        if scorer is not None and spec.best_of_n is not None:
            from training.scoring import reward_scores

            conversational = spec.best_of_n.conversational
            rendered = [
                prompt_render(text=p.text, messages=p.messages, conversational=conversational) for p in batch
            ]
            flat = reward_scores(
                scorer[0],
                scorer[1],
                [rendered[row] for row, texts in enumerate(samples) for _ in texts],
                [
                    completion_render(text, conversational=conversational)
                    for texts in samples
                    for text in texts
                ],
                on_batch=heartbeat,
            )
            width = missing * per  # every prompt of a batch has this many samples
            scores = [flat[row * width : (row + 1) * width] for row in range(len(batch))]

        completions: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        for row, p in enumerate(batch):
            common = {
                **sampling,
                "seed": seeds[row],
                "job_seed": spec.seed,
                "generation_job": spec.job_id,
                "prompt_format": encoded[row][1],
            }
            kept: list[tuple[str, dict[str, Any]]] = []
            for position, index in enumerate(indices[row]):
                candidates = samples[row][position * per : (position + 1) * per]
                if scorer is None:
                    kept.append((candidates[0], {**common, "sample_index": index}))
                    continue
                assert spec.best_of_n is not None
                candidate_scores = scores[row][position * per : (position + 1) * per]
                best = best_index(candidate_scores)
                kept.append(
                    (
                        candidates[best],
                        {
                            **common,
                            "sample_index": index,
                            "best_of_n": {
                                "n": per,
                                "base_policy": spec.best_of_n.base_policy_id,
                                "reward_model": spec.best_of_n.reward_model_id,
                                "kept": best,
                                "sample_indices": [index * per + j for j in range(per)],
                                "scores": candidate_scores,
                                "candidates": candidates,
                            },
                        },
                    )
                )
            completions[p.prompt_id] = kept
        stored = generation_job_write_batch(job_id=spec.job_id, attempt=spec.attempt, completions=completions)
        if stored is None:
            log("the job is no longer this attempt's; the batch was not written")
            return "lost"
        written += stored
        log(f"wrote {stored} completions for {len(batch)} prompts lacking {missing}")
    if not generation_job_finish(job_id=spec.job_id, attempt=spec.attempt):
        return "lost"
    log(f"succeeded: {written} completions in {time.monotonic() - started:.1f} s")
    return "succeeded"


def main(argv: list[str] | None = None) -> int:
    def load(path: str) -> Any:
        from training.generation import GenerationSpec

        return GenerationSpec.from_json(path)

    def fail(**values: Any) -> bool:
        from training.services import generation_job_fail

        return generation_job_fail(**values)

    return gpu_job_main(
        argv,
        module="training.generation_process",
        kind="generation",
        load=load,
        run=generation_job_run,
        fail=fail,
    )


if __name__ == "__main__":
    sys.exit(main())
