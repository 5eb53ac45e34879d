"""The supervisor's side of the child programs' events: each one applied to the job's row, fenced.

A GPU job's child program (`training.run_process`, `training.generation_process`,
`training.scoring_process`) imports no Django; it reports events
(`training.events`). The supervisor (`training.services.supervisor`) tails
them and hands each to the job kind's `ChildEvents`, which writes it through
the job's own fenced services: every write names the attempt, and one that
changes nothing means the job is no longer this attempt's. `apply` then
returns False and the supervisor kills the child's process group.

The child's inputs that come from the database (the prompts lacking
completions, the completions lacking scores) are listed here too, written to
a file before the launch (`generation_work`, `scoring_work`): what an earlier
attempt wrote is not done again.

The services are imported where they are used: they import the supervisor,
which is handed these objects by the launchers.
"""

from __future__ import annotations

import collections
from typing import Any

# Log lines kept for the row's log tail.
LOG_LINES_KEPT = 200
# Events that end an attempt: after one is applied, the row no longer being this attempt's is expected.
FINAL_EVENTS = frozenset({"result", "stopped", "error"})


class ChildEvents:
    """Applies one attempt's events; `apply` returns False once the attempt lost the job."""

    what = "job"

    def __init__(self, *, job_id: int, attempt: int) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.finished = False  # a final event was applied: the child's outcome is on the row
        self.applied = 0  # events applied so far

    def log_tail(self) -> str:
        return "\n".join(self.lines)

    def apply(self, event: dict[str, Any]) -> bool:
        kind = event.get("event")
        self.applied += 1
        if self.finished:
            return True  # a heartbeat sent while the child reported its outcome: nothing to write
        if kind == "log":
            self.lines.append(str(event.get("line", "")))
            return True
        if kind == "checkpoint":
            self.lines.append(f"checkpoint saved: {event.get('path')}")
            return True
        handler = getattr(self, f"on_{kind}", None)
        if handler is None:
            return True
        owned = bool(handler(event))
        if owned and kind in FINAL_EVENTS:
            self.finished = True
        return owned

    def on_heartbeat(self, event: dict[str, Any]) -> bool:
        raise NotImplementedError


class RunEvents(ChildEvents):
    what = "run"

    def on_started(self, event: dict[str, Any]) -> bool:
        from training.services.runs import training_run_started

        return training_run_started(
            run_id=self.job_id,
            attempt=self.attempt,
            total_steps=int(event["total_steps"]),
            log_tail=self.log_tail(),
        )

    def on_heartbeat(self, event: dict[str, Any]) -> bool:
        from training.services.runs import training_run_heartbeat

        return training_run_heartbeat(run_id=self.job_id, attempt=self.attempt, log_tail=self.log_tail())

    def on_progress(self, event: dict[str, Any]) -> bool:
        from training.services.runs import training_run_progress

        metrics = {key: value for key, value in (event.get("metrics") or {}).items() if value is not None}
        return training_run_progress(
            run_id=self.job_id,
            attempt=self.attempt,
            step=int(event["step"]),
            total_steps=int(event["total_steps"]),
            metrics=metrics,
            log_tail=self.log_tail(),
        )

    def on_result(self, event: dict[str, Any]) -> bool:
        from training.runner import RunResult
        from training.services.runs import training_run_finish

        result = RunResult(
            status=str(event["status"]),
            metrics={key: value for key, value in (event.get("metrics") or {}).items() if value is not None},
            final_dir=str(event["final_dir"]),
            steps=int(event["steps"]),
            checkpoint_dir=event.get("checkpoint_dir"),
        )
        return training_run_finish(run_id=self.job_id, attempt=self.attempt, result=result)

    def on_stopped(self, event: dict[str, Any]) -> bool:
        from training.services.runs import training_run_mark_cancelled, training_run_requeue_stopped

        if event.get("cause") == "cancel" and training_run_mark_cancelled(
            run_id=self.job_id, attempt=self.attempt
        ):
            return True
        # A stop without a cancel (SIGTERM: a time limit, a worker shutting down) is never `cancelled`.
        return training_run_requeue_stopped(
            run_id=self.job_id,
            attempt=self.attempt,
            reason=f"attempt {self.attempt} stopped by SIGTERM at step {event.get('steps')} "
            f"(a time limit or a worker shutting down); resuming from {event.get('checkpoint_dir')}",
        )

    def on_error(self, event: dict[str, Any]) -> bool:
        from training.services.runs import training_run_fail

        return training_run_fail(
            run_id=self.job_id, error=str(event["error"]), from_statuses=("running",), attempt=self.attempt
        )


class GenerationEvents(ChildEvents):
    what = "generation"

    def on_started(self, event: dict[str, Any]) -> bool:
        from training.services.generation import generation_job_started

        return generation_job_started(
            job_id=self.job_id,
            attempt=self.attempt,
            prompts_total=int(event["prompts_total"]),
            prompts_done=int(event["prompts_done"]),
        )

    def on_heartbeat(self, event: dict[str, Any]) -> bool:
        from training.services.generation import generation_job_heartbeat

        return generation_job_heartbeat(job_id=self.job_id, attempt=self.attempt)

    def on_batch(self, event: dict[str, Any]) -> bool:
        from training.services.generation import generation_job_write_batch

        completions = {
            int(prompt_id): [(str(text), dict(settings)) for text, settings in kept]
            for prompt_id, kept in event["completions"].items()
        }
        stored = generation_job_write_batch(job_id=self.job_id, attempt=self.attempt, completions=completions)
        if stored is None:
            return False
        self.lines.append(f"wrote {stored} completions for {len(completions)} prompts")
        return True

    def on_result(self, event: dict[str, Any]) -> bool:
        from training.services.generation import generation_job_finish

        return generation_job_finish(job_id=self.job_id, attempt=self.attempt)

    def on_stopped(self, event: dict[str, Any]) -> bool:
        from training.models import GenerationJob
        from training.services.generation import generation_job_enqueue

        return _stopped(
            GenerationJob, self, event, enqueue=lambda job_id: generation_job_enqueue(job_id=job_id)
        )

    def on_error(self, event: dict[str, Any]) -> bool:
        from training.services.generation import generation_job_fail

        return generation_job_fail(
            job_id=self.job_id, error=str(event["error"]), from_statuses=("running",), attempt=self.attempt
        )


class ScoringEvents(ChildEvents):
    what = "scoring"

    def on_started(self, event: dict[str, Any]) -> bool:
        from training.services.scoring import scoring_job_started

        return scoring_job_started(
            job_id=self.job_id,
            attempt=self.attempt,
            completions_total=int(event["completions_total"]),
            completions_done=int(event["completions_done"]),
        )

    def on_heartbeat(self, event: dict[str, Any]) -> bool:
        from training.services.scoring import scoring_job_heartbeat

        return scoring_job_heartbeat(job_id=self.job_id, attempt=self.attempt)

    def on_batch(self, event: dict[str, Any]) -> bool:
        from training.services.scoring import scoring_job_write_batch

        scores = {int(completion_id): float(score) for completion_id, score in event["scores"].items()}
        stored = scoring_job_write_batch(job_id=self.job_id, attempt=self.attempt, scores=scores)
        if stored is None:
            return False
        self.lines.append(f"wrote {stored} scores")
        return True

    def on_result(self, event: dict[str, Any]) -> bool:
        from training.services.scoring import scoring_job_finish

        return scoring_job_finish(job_id=self.job_id, attempt=self.attempt)

    def on_stopped(self, event: dict[str, Any]) -> bool:
        from training.models import ScoringJob
        from training.services.scoring import scoring_job_enqueue

        return _stopped(ScoringJob, self, event, enqueue=lambda job_id: scoring_job_enqueue(job_id=job_id))

    def on_error(self, event: dict[str, Any]) -> bool:
        from training.services.scoring import scoring_job_fail

        return scoring_job_fail(
            job_id=self.job_id, error=str(event["error"]), from_statuses=("running",), attempt=self.attempt
        )


def _stopped(model: Any, events: ChildEvents, event: dict[str, Any], *, enqueue: Any) -> bool:
    """A job's child stopped between batches: cancelled if a cancel was asked for, else back in the
    queue with its attempt given back (SIGTERM); what it wrote stays written."""
    from training.services.jobs import job_mark_cancelled, job_requeue

    if event.get("cause") == "cancel" and job_mark_cancelled(
        model, job_id=events.job_id, attempt=events.attempt
    ):
        return True
    return job_requeue(
        model,
        job_id=events.job_id,
        attempt=events.attempt,
        reason=f"attempt {events.attempt} stopped by SIGTERM (a time limit or a worker shutting down); "
        "resuming with what is not done yet",
        give_back=True,
        enqueue=enqueue,
    )


# --- the children's inputs ---------------------------------------------------------------------------


def generation_work(*, project_id: int, policy_id: int, n: int) -> dict[str, Any]:
    """The project's prompts that have fewer than `n` completions from the policy, in prompt order."""
    from django.db.models import Count, Q

    from annotation.models import Prompt

    prompts = Prompt.objects.filter(project_id=project_id)
    lacking = (
        prompts.annotate(existing=Count("completions", filter=Q(completions__policy_id=policy_id)))
        .filter(existing__lt=n)
        .order_by("pk")
        .values("pk", "text", "messages", "content_hash", "existing")
    )
    return {
        "total": prompts.count(),
        "prompts": [
            {
                "prompt_id": row["pk"],
                "text": row["text"],
                "messages": row["messages"],
                "content_hash": row["content_hash"],
                "existing": row["existing"],
            }
            for row in lacking.iterator(chunk_size=2000)
        ],
    }


def scoring_work(*, project_id: int, scorer: str) -> dict[str, Any]:
    """The session's completions that have no score under `scorer` yet, in id order."""
    from annotation.models import Completion

    completions = Completion.objects.filter(prompt__project_id=project_id)
    lacking = (
        completions.exclude(scores__scorer=scorer)
        .order_by("pk")
        .values("pk", "text", "prompt__text", "prompt__messages")
    )
    return {
        "total": completions.count(),
        "completions": [
            {
                "completion_id": row["pk"],
                "text": row["text"],
                "prompt_text": row["prompt__text"],
                "prompt_messages": row["prompt__messages"],
            }
            for row in lacking.iterator(chunk_size=2000)
        ],
    }
