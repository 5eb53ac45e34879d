"""The entry of a scoring job's child program.

    python -m training.scoring_process SPEC.json WORK.json

It imports no Django and never touches the database: its supervisor (the
Celery task) wrote WORK.json before the launch, listing the session's
completions that have no score under the job's scorer label yet (the others
are done: a retried attempt resumes there), and applies the events this
program reports (`training.events`) to the job's row, fenced by the attempt.

1. Load the reward model (safetensors only, `training.scoring.reward_model_load`);
   the watch thread heartbeats meanwhile.
2. Report `started` with the completions in the session and those done.
3. Per batch of completions: stop if the stop file says cancel (`stopped`,
   cause "cancel") or SIGTERM came (`stopped`, cause "signal"); render
   prompt and completion as the reward model's dataset build did
   (`training.prompts`); read the rewards; report the batch's scores
   (`batch`): the supervisor writes them and the progress in one transaction.
4. Report `result`: the supervisor marks the job succeeded. An exception is
   an `error` event.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from training.gpu_job_process import ChildChannel, gpu_job_main

if TYPE_CHECKING:
    from training.scoring import ScoringSpec


@dataclass(frozen=True)
class CompletionWork:
    completion_id: int
    text: str
    prompt_text: str
    prompt_messages: list[dict[str, Any]] | None


def completions_from_work(work: dict[str, Any]) -> tuple[int, list[CompletionWork]]:
    """(completions in the session, those still lacking a score), as the supervisor listed them."""
    return int(work["total"]), [CompletionWork(**item) for item in work["completions"]]


def token_limit(spec: ScoringSpec, model: Any) -> int | None:
    """The most tokens a sequence may have: the training length, and never past the model's positions."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    limits = [limit for limit in (spec.max_length, positions) if limit]
    return min(limits) if limits else None


def scoring_job_run(spec: ScoringSpec, work: dict[str, Any], channel: ChildChannel) -> str:
    """Score what the listed completions lack; returns "succeeded", "cancelled" or "stopped" (SIGTERM)."""
    from training.generation import device_pick
    from training.prompts import completion_render, prompt_render
    from training.scoring import reward_model_load, reward_scores

    log = channel.log
    started = time.monotonic()
    # Float32, the precision the reward model was trained in: the scores are compared, not sampled.
    tokenizer, model = reward_model_load(spec.reward_model_path)
    model.to(device_pick())
    limit = token_limit(spec, model)
    log(
        f"job {spec.job_id} attempt {spec.attempt}: reward model loaded in {time.monotonic() - started:.1f} s"
    )

    total, items = completions_from_work(work)
    channel.emit("started", completions_total=total, completions_done=total - len(items))
    log(f"{len(items)} of {total} completions lack a score from {spec.scorer}")
    written = 0
    for start in range(0, len(items), spec.completions_per_batch):
        if channel.cancel_asked():
            log(f"cancelled after {written} scores")
            channel.emit("stopped", cause="cancel")
            return "cancelled"
        if channel.signalled.is_set():
            log(f"stopped by SIGTERM after {written} scores")
            channel.emit("stopped", cause="signal")
            return "stopped"
        batch = items[start : start + spec.completions_per_batch]
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
        )
        channel.emit(
            "batch", scores={item.completion_id: value for item, value in zip(batch, values, strict=True)}
        )
        written += len(batch)
        log(f"scored {written} of {len(items)}")
    channel.emit("result")
    log(f"succeeded: {written} scores in {time.monotonic() - started:.1f} s")
    return "succeeded"


def main(argv: list[str] | None = None) -> int:
    def load(path: str) -> Any:
        from training.scoring import ScoringSpec

        return ScoringSpec.from_json(path)

    return gpu_job_main(
        argv, module="training.scoring_process", kind="scoring", load=load, run=scoring_job_run
    )


if __name__ == "__main__":
    sys.exit(main())
