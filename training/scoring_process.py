"""The entry of a scoring job's own process.

    python -m training.scoring_process SPEC.json

The Celery task starts this process and waits for it; the process writes its
own progress, heartbeat and terminal state to the job's row (through
`training.services`), so a worker that dies mid-job loses nothing.

1. Load the reward model (safetensors only, `training.scoring.reward_model_load`).
2. List the session's completions that have no score under the job's scorer
   label yet; the others are done (a retried attempt resumes here).
3. Per batch of completions: stop if the job was cancelled or taken over;
   render prompt and completion as the reward model's dataset build did;
   read the rewards (`training.scoring.reward_scores`); write the batch's
   scores and the progress in one transaction.
4. Mark the job succeeded, or failed with the error.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from training.gpu_job_process import Heartbeat, attempt_stop, gpu_job_main

if TYPE_CHECKING:
    from training.scoring import ScoringSpec


@dataclass(frozen=True)
class CompletionWork:
    completion_id: int
    text: str
    prompt_text: str
    prompt_messages: list[dict[str, Any]] | None


def completions_to_score(spec: ScoringSpec) -> tuple[int, list[CompletionWork]]:
    """(completions in the session, those still lacking a score under the job's label), in id order."""
    from annotation.models import Completion

    completions = Completion.objects.filter(prompt__project_id=spec.project_id)
    lacking = (
        completions.exclude(scores__scorer=spec.scorer)
        .order_by("pk")
        .values_list("pk", "text", "prompt__text", "prompt__messages")
    )
    return completions.count(), [CompletionWork(*row) for row in lacking.iterator(chunk_size=2000)]


def token_limit(spec: ScoringSpec, model: Any) -> int | None:
    """The most tokens a sequence may have: the training length, and never past the model's positions."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    limits = [limit for limit in (spec.max_length, positions) if limit]
    return min(limits) if limits else None


def scoring_job_run(spec: ScoringSpec, *, log: Any = print) -> str:
    """Score what the session's completions lack; returns "succeeded", "cancelled" or "lost".

    "lost": the job is no longer this attempt's (taken over, failed by hand):
    nothing more is written and the row is left to whoever owns it.
    """
    from training.generation import device_pick
    from training.prompts import completion_render, prompt_render
    from training.scoring import reward_model_load, reward_scores
    from training.services import (
        scoring_job_finish,
        scoring_job_heartbeat,
        scoring_job_mark_cancelled,
        scoring_job_started,
        scoring_job_stop_reason,
        scoring_job_write_batch,
    )

    started = time.monotonic()
    heartbeat = Heartbeat(lambda: scoring_job_heartbeat(job_id=spec.job_id, attempt=spec.attempt))
    # Float32, the precision the reward model was trained in: the scores are compared, not sampled.
    tokenizer, model = reward_model_load(spec.reward_model_path)
    model.to(device_pick())
    limit = token_limit(spec, model)
    log(
        f"job {spec.job_id} attempt {spec.attempt}: reward model loaded in {time.monotonic() - started:.1f} s"
    )

    total, work = completions_to_score(spec)
    if not scoring_job_started(
        job_id=spec.job_id, attempt=spec.attempt, completions_total=total, completions_done=total - len(work)
    ):
        return "lost"
    log(f"{len(work)} of {total} completions lack a score from {spec.scorer}")
    written = 0
    for start in range(0, len(work), spec.completions_per_batch):
        outcome = attempt_stop(
            stop_reason=lambda: scoring_job_stop_reason(job_id=spec.job_id, attempt=spec.attempt),
            mark_cancelled=lambda: scoring_job_mark_cancelled(job_id=spec.job_id, attempt=spec.attempt),
            heartbeat=heartbeat,
            log=log,
            done=f"{written} scores",
        )
        if outcome is not None:
            return outcome
        batch = work[start : start + spec.completions_per_batch]
        values = reward_scores(
            tokenizer,
            model,
            [
                prompt_render(
                    text=item.prompt_text, messages=item.prompt_messages, conversational=spec.conversational
                )
                for item in batch
            ],
            [completion_render(item.text, conversational=spec.conversational) for item in batch],
            batch_size=spec.batch_size,
            max_length=limit,
            on_batch=heartbeat,
        )
        stored = scoring_job_write_batch(
            job_id=spec.job_id,
            attempt=spec.attempt,
            scores={item.completion_id: value for item, value in zip(batch, values, strict=True)},
        )
        if stored is None:
            log("the job is no longer this attempt's; the batch was not written")
            return "lost"
        written += stored
        log(f"scored {written} of {len(work)}")
    if not scoring_job_finish(job_id=spec.job_id, attempt=spec.attempt):
        return "lost"
    log(f"succeeded: {written} scores in {time.monotonic() - started:.1f} s")
    return "succeeded"


def main(argv: list[str] | None = None) -> int:
    def load(path: str) -> Any:
        from training.scoring import ScoringSpec

        return ScoringSpec.from_json(path)

    def fail(**values: Any) -> bool:
        from training.services import scoring_job_fail

        return scoring_job_fail(**values)

    return gpu_job_main(
        argv, module="training.scoring_process", kind="scoring", load=load, run=scoring_job_run, fail=fail
    )


if __name__ == "__main__":
    sys.exit(main())
