"""The entry of a generation job's child program.

    python -m training.generation_process SPEC.json WORK.json

It imports no Django and never touches the database: its supervisor (the
Celery task) wrote WORK.json before the launch, listing the project's
prompts that still lack completions from the policy (those with enough are
done: a retried attempt resumes there), and applies the events this program
reports (`training.events`) to the job's row, fenced by the attempt.

1. Load the policy (for a best-of-n policy: its base policy and the reward
   model); the watch thread heartbeats meanwhile.
2. Report `started` with the prompts in the project and those done.
3. Per batch of prompts lacking the same number of completions: stop if the
   stop file says cancel (`stopped`, cause "cancel") or SIGTERM came
   (`stopped`, cause "signal"); sample (each prompt encoded once, its samples
   expanded with `num_return_sequences`); for best-of-n, score the candidates
   and keep the best of each group of `n`; report the batch's completions
   (`batch`): the supervisor writes them and the progress in one transaction.
4. Report `result`: the supervisor marks the job succeeded (which makes
   ranking tasks). An exception is an `error` event.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from training.gpu_job_process import ChildChannel, gpu_job_main

if TYPE_CHECKING:
    from training.generation import GenerationSpec


@dataclass(frozen=True)
class PromptWork:
    prompt_id: int
    text: str
    messages: list[dict[str, Any]] | None
    content_hash: str
    existing: int  # completions the policy already has for it


def prompts_from_work(work: dict[str, Any]) -> tuple[int, list[PromptWork]]:
    """(prompts in the project, those still lacking completions), as the supervisor listed them."""
    return int(work["total"]), [PromptWork(**item) for item in work["prompts"]]


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


def generation_job_run(spec: GenerationSpec, work: dict[str, Any], channel: ChildChannel) -> str:
    """Generate what the listed prompts lack; returns "succeeded", "cancelled" or "stopped" (SIGTERM)."""
    from training.generation import (
        best_index,
        generation_backend_load,
        prompt_format_resolve,
        prompt_seed,
        sample_seed,
    )
    from training.prompts import completion_render, prompt_render, prompt_token_ids

    log = channel.log
    started = time.monotonic()
    backend = generation_backend_load(spec.policy, backend=spec.backend)
    tokenizer = backend.tokenizer
    prompt_format = prompt_format_resolve(spec.policy)
    scorer = None
    if spec.best_of_n is not None:
        from training.generation import device_pick
        from training.scoring import reward_model_load

        scorer = reward_model_load(spec.best_of_n.reward_model_path)
        scorer[1].to(device_pick())
    log(
        f"job {spec.job_id} attempt {spec.attempt}: policy loaded in {time.monotonic() - started:.1f} s "
        f"({backend.name} backend)"
    )

    total, prompts = prompts_from_work(work)
    channel.emit("started", prompts_total=total, prompts_done=total - len(prompts))
    log(f"{len(prompts)} of {total} prompts lack completions")
    sampling = {"temperature": spec.temperature, "top_p": spec.top_p, "max_new_tokens": spec.max_new_tokens}
    per = spec.samples_per_completion
    written = 0
    for batch in batches(spec, prompts):
        if channel.cancel_asked():
            log(f"cancelled after {written} completions")
            channel.emit("stopped", cause="cancel")
            return "cancelled"
        if channel.signalled.is_set():
            log(f"stopped by SIGTERM after {written} completions")
            channel.emit("stopped", cause="signal")
            return "stopped"
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
        samples = backend.generate(
            [ids for ids, _format in encoded],
            sample_seeds,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_new_tokens=spec.max_new_tokens,
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
        channel.emit("batch", completions=completions)
        written += sum(len(kept) for kept in completions.values())
        log(f"sampled {written} completions; this batch: {len(batch)} prompts lacking {missing}")
    channel.emit("result")
    log(f"succeeded: {written} completions in {time.monotonic() - started:.1f} s")
    return "succeeded"


def main(argv: list[str] | None = None) -> int:
    def load(path: str) -> Any:
        from training.generation import GenerationSpec

        return GenerationSpec.from_json(path)

    return gpu_job_main(
        argv, module="training.generation_process", kind="generation", load=load, run=generation_job_run
    )


if __name__ == "__main__":
    sys.exit(main())
