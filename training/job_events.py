"""What the rest of the product hears when a job ends: in-app notices and outgoing webhooks.

`job_ended` is called once per terminal transition (succeeded, failed,
cancelled) of a dataset build, training run, generation or scoring job, right
after the compare-and-set that made it, inside the same transaction: the
notices and webhook deliveries commit with the new status or not at all, and
a transition that lost its race (a redelivery, a reaper) calls nothing.
"""

from __future__ import annotations

from typing import Any

from django.urls import reverse

from annotation.models import Notice, Webhook
from annotation.notifications import notice_job_ended
from annotation.webhooks import webhook_event_publish
from training.models import DatasetBuild, GenerationJob, JudgeJob, ScoringJob, TrainingRun


def _describe(job: Any) -> tuple[str, str, str, list[int]]:
    """(notice kind, title, page URL, project ids) of a job row."""
    if isinstance(job, TrainingRun):
        projects = list(job.dataset_build.projects.values_list("pk", flat=True))
        return Notice.Kind.RUN, job.name, reverse("training-run-detail", args=[job.pk]), projects
    if isinstance(job, DatasetBuild):
        projects = list(job.projects.values_list("pk", flat=True))
        return Notice.Kind.BUILD, job.name, reverse("dataset-build-detail", args=[job.pk]), projects
    if isinstance(job, GenerationJob):
        title = f"#{job.pk} {job.policy.name}"
        return (
            Notice.Kind.GENERATION,
            title,
            reverse("generation-job-detail", args=[job.pk]),
            [job.project_id],
        )
    if isinstance(job, ScoringJob):
        title = f"#{job.pk} {job.scorer}"
        return (
            Notice.Kind.SCORING,
            title,
            reverse("ab-session-scoring", args=[job.project_id]),
            [job.project_id],
        )
    raise TypeError(f"not a job: {job!r}")


def _webhook_data(job: Any, outcome: str, url: str) -> tuple[str, dict[str, Any]] | None:
    """The webhook event of a job's end, if its kind has one (builds and runs)."""
    if not isinstance(job, (TrainingRun, DatasetBuild)):
        return None
    common = {
        "id": job.pk,
        "name": job.name,
        "status": outcome,
        "error": job.error[-2000:] if outcome == "failed" else "",
        "finished_at": job.finished_at,
        "url": url,
    }
    if isinstance(job, TrainingRun):
        return Webhook.Event.RUN_FINISHED, {
            "run": {**common, "kind": job.kind, "dataset_build": job.dataset_build_id}
        }
    if isinstance(job, DatasetBuild):
        return Webhook.Event.BUILD_FINISHED, {"build": {**common, "content_hash": job.content_hash}}
    return None


def job_ended(model: type[Any], *, job_id: int) -> None:
    """Tell the job's starter and its projects' managers, and publish the webhook event, for a job that just ended.

    Call it inside the transaction of the transition, after the compare-and-set succeeded. A model
    judge's job tells nobody: the judge starts it by itself, and its outcome shows on the judges page
    (a failure as the judge's last error).
    """
    if model is JudgeJob:
        return
    job = model.objects.get(pk=job_id)
    outcome = str(job.status)
    if outcome not in (Notice.Outcome.SUCCEEDED, Notice.Outcome.FAILED, Notice.Outcome.CANCELLED):
        return
    kind, title, url, projects = _describe(job)
    for project_id in projects or [None]:
        notice_job_ended(
            kind=kind,
            object_id=job.pk,
            outcome=outcome,
            title=title,
            url=url,
            project_id=project_id,
            started_by_id=job.created_by_id,
        )
    event = _webhook_data(job, outcome, url)
    if event is not None:
        name, data = event
        for project_id in projects:
            webhook_event_publish(project_id=project_id, event=name, data=data)
