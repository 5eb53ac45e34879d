"""Model judges: a trained reward model, or a causal LM prompted to rank, that labels a project's tasks
like a person, and how builds weigh it.

A judge works as a labeler account marked as a model. Attaching one makes an
account with no password (nobody signs in as it) and a labeler membership in
the project, so the judge claims through `annotation.services.
assignment_claim_next` and submits through `judgment_submit`, with the same
leases, overlap and gold tasks as people; its judgments and their comparisons
carry `source = model`, and every per-labeler table lists it like anyone
else (gold accuracy, agreement), marked as a model.

How a reward-model judge ranks: by the reward model's scores of the task's
completions (higher is better; equal scores are a tie where the project
allows ties, else the task's display position breaks them). The scores come
from a scoring job over the project (`scoring_job_create`, on the gpu
queue); `judge_run` starts one when completions lack a score and returns,
and the scoring job's success publishes `judge_run` again
(`judges_after_scoring`). `judge_run` is a Celery task on the default
queue: it needs no model in memory, only the stored scores.

Builds choose (DatasetBuild.sources): humans only (the default), humans and
judges, or humans plus the judges whose agreement with the humans' majority
reaches `judge_agreement_min` on the pairs both judged (the calibration set:
every task some person and the judge both ranked). `judge_calibration` is
that measurement; the dataset card reports it per judge.

How a language-model judge ranks: a causal LM (a policy: local path or hub
id, with its adapter) is shown each task through the judge's prompt
template, its K responses labelled A, B, C…, and the probability it gives
each label as the first token of its answer is its preference (read over
the K rotations of the responses, so no position is favoured; why this and
not free generation: training.judge_process). The readings are written
before the judge claims anything, as JudgeVerdict rows, by a judge job on
the gpu queue (the GPU-job lifecycle of training.services.jobs, the
supervisor of training.services.supervisor, the child program
`python -m training.judge_process`); `judge_run` starts one when open tasks
lack a verdict, and the job's success publishes `judge_run` again. A task
whose answer could not be read is skipped (people take it) and counted on
the judge (`answers_unreadable`), never turned into a ranking.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F, Q, QuerySet
from django.db.models.functions import Least
from django.utils import timezone

from annotation.models import (
    LIKERT_MAX,
    LIKERT_MIN,
    Assignment,
    Comparison,
    CompletionScore,
    Membership,
    Policy,
    Project,
    Source,
    Task,
    TaskCompletion,
)
from annotation.roles import Role
from annotation.selectors import projects_for_user
from annotation.services import JudgmentInput, assignment_claim_next, assignment_skip, judgment_submit
from training.judge_process import DEFAULT_TEMPLATE, JudgePolicySpec, JudgeSpec, template_problems
from training.models import Judge, JudgeJob, JudgeVerdict, RewardModel, ScoringJob
from training.selectors import reward_models_for_user
from training.services.child_events import ChildEvents
from training.services.jobs import JobTask

# The Celery task (training.tasks.judge_run) and its queue, published by name.
JUDGE_RUN_TASK_NAME = "training.tasks.judge_run"
JUDGE_RUN_QUEUE = "default"
# A language-model judge's job: reads the open tasks on the gpu queue (training.judge_process).
JUDGE_JOB_TASK = JobTask("training.tasks.judge_job_execute", "gpu")
# Judgments one `judge_run` submits before it publishes itself again, so one judge never holds a worker long.
JUDGMENTS_PER_RUN = 200


def judge_account_name(
    *, project: Project, reward_model: RewardModel | None = None, policy: Policy | None = None
) -> str:
    if policy is not None:
        return f"judge-lm{policy.pk}-p{project.pk}"
    assert reward_model is not None
    return f"judge-rm{reward_model.pk}-p{project.pk}"


def judge_attach(
    *,
    project: Project,
    reward_model: RewardModel | None = None,
    policy: Policy | None = None,
    prompt_template: str = "",
    created_by: AbstractBaseUser | None,
    max_judgments: int | None = None,
) -> Judge:
    """Attach a reward model, or a causal LM (a model policy) prompted to rank, as a judge of a ranking
    project; its first run is queued on commit.

    Give exactly one of `reward_model` and `policy`; a policy's judge reads
    `prompt_template` (empty: DEFAULT_TEMPLATE), which must hold {prompt}
    and {candidates}. Raises ValidationError (by field) when the creator
    (when given) does not manage the project or may not see the model, when
    the project is not a ranking project, when the template is unusable, or
    when this model already judges the project.
    """
    errors: dict[str, str] = {}
    field = "policy" if policy is not None else "reward_model"
    if (reward_model is None) == (policy is None):
        raise ValidationError({"__all__": "give a reward model or a language model (policy), not both"})
    if created_by is not None:
        if not projects_for_user(user=created_by, role=Role.MANAGER).filter(pk=project.pk).exists():
            errors["project"] = "you can attach judges only to projects you manage"
        if (
            reward_model is not None
            and not reward_models_for_user(user=created_by).filter(pk=reward_model.pk).exists()
        ):
            errors["reward_model"] = "you can use only reward models trained on projects you manage"
        if policy is not None and not judge_policies_for_user(user=created_by).filter(pk=policy.pk).exists():
            errors["policy"] = "you can use only policies of projects you manage"
    if policy is not None:
        if policy.kind != Policy.Kind.MODEL or not policy.base_model:
            errors["policy"] = "a judge must be a model policy (a base model to prompt), not imported outputs"
        prompt_template = prompt_template.strip() or DEFAULT_TEMPLATE
        if problems := template_problems(prompt_template):
            errors["prompt_template"] = "; ".join(problems)
    else:
        prompt_template = ""
    if project.kind != Project.Kind.RANKING:
        errors["project"] = "judges rank the tasks of ranking projects, not A/B sessions"
    if max_judgments is not None and max_judgments < 1:
        errors["max_judgments"] = "must be at least 1, or empty for no limit"
    already = (
        Judge.objects.filter(project=project, policy=policy)
        if policy is not None
        else Judge.objects.filter(project=project, reward_model=reward_model)
    )
    if field not in errors and already.exists():
        errors[field] = (
            f"this {'model' if policy is not None else 'reward model'} already judges this project"
        )
    if errors:
        raise ValidationError(errors)
    name = policy.name if policy is not None else reward_model.name  # type: ignore[union-attr]
    try:
        with transaction.atomic():
            account = get_user_model().objects.create_user(
                username=judge_account_name(project=project, reward_model=reward_model, policy=policy),
                password=None,  # unusable: a judge never signs in
                first_name="Model judge",
                last_name=name[:150],
            )
            Membership.objects.create(project=project, user=account, role=Role.LABELER)
            judge = Judge.objects.create(
                project=project,
                kind=Judge.Kind.LANGUAGE_MODEL if policy is not None else Judge.Kind.REWARD_MODEL,
                reward_model=reward_model,
                policy=policy,
                prompt_template=prompt_template,
                account=account,
                max_judgments=max_judgments,
                created_by=created_by,
            )
            if policy is not None:
                policy.projects.add(project)
            transaction.on_commit(lambda: judge_request(judge_id=judge.pk))
    except IntegrityError:
        raise ValidationError({field: "this model already judges this project"}) from None
    return judge


def judge_policies_for_user(*, user: AbstractBaseUser) -> QuerySet[Policy]:
    """The model policies a manager may attach as judges: the model policies they may use."""
    from annotation.selectors import policies_for_user

    return policies_for_user(user=user).filter(kind=Policy.Kind.MODEL).order_by("name")


def judge_policy_for_base_model(
    *, base_model: str, project: Project, created_by: AbstractBaseUser | None
) -> Policy:
    """The model policy a language-model judge given as a base model (local path or hub id) runs as.

    A model policy the creator may use with this base model and no adapter
    is reused; otherwise one is made, named after the model, once the
    model's config and tokenizer would load (`training.policies`), as a
    policy of `project`. Raises ValidationError (field `base_model`) when
    they would not.
    """
    from config.storage import storage_path_stored
    from training.policies import policy_base_model_problems

    base_model = base_model.strip()
    if not base_model:
        raise ValidationError({"base_model": "give a local path or a hub id"})
    usable = Policy.objects.filter(kind=Policy.Kind.MODEL)
    if created_by is not None:
        usable = judge_policies_for_user(user=created_by)
    stored = storage_path_stored(base_model)
    existing = usable.filter(adapter="", base_model__in={base_model, stored}).order_by("pk").first()
    if existing is not None:
        return existing
    if problems := policy_base_model_problems(base_model):
        raise ValidationError({"base_model": " ".join(str(problem) for problem in problems)})
    stem = base_model.rstrip("/").split("/")[-1].split(":")[-1] or "model"
    name = f"judge {stem}"[:190]
    taken = set(Policy.objects.filter(name__startswith=name).values_list("name", flat=True))
    number = 1
    while (candidate := name if number == 1 else f"{name} {number}") in taken:
        number += 1
    policy = Policy.objects.create(name=candidate, kind=Policy.Kind.MODEL, base_model=stored)
    policy.projects.add(project)
    return policy


def judge_request(*, judge_id: int) -> bool:
    """Publish a run of the judge; a broker that refuses is recorded on the judge."""
    from training.services.jobs import JobTask, task_publish

    return task_publish(
        JobTask(JUDGE_RUN_TASK_NAME, JUDGE_RUN_QUEUE),
        judge_id,
        fail=lambda error: Judge.objects.filter(pk=judge_id).update(last_error=f"run {error}"),
    )


def judges_after_scoring(*, project: Project, reward_model: RewardModel) -> None:
    """A scoring job of `reward_model` over `project` succeeded: its judges run once the caller commits."""
    for judge_id in Judge.objects.filter(project=project, reward_model=reward_model, active=True).values_list(
        "pk", flat=True
    ):
        transaction.on_commit(lambda judge_id=judge_id: judge_request(judge_id=judge_id))


def _scores(*, project: Project, scorer: str) -> dict[int, float]:
    """Completion id → the scorer's score, for the completions of the project's tasks."""
    return dict(
        CompletionScore.objects.filter(
            scorer=scorer,
            completion__in=TaskCompletion.objects.filter(task__project=project).values("completion"),
        ).values_list("completion_id", "score")
    )


def _unscored(*, project: Project, scores: dict[int, float]) -> int:
    completion_ids = set(
        TaskCompletion.objects.filter(task__project=project).values_list("completion_id", flat=True)
    )
    return len(completion_ids - scores.keys())


def judge_ranks(
    *, items: list[TaskCompletion], scores: dict[int, float], ties_allowed: bool
) -> dict[str, int]:
    """Ranks (1 best) from scores: higher scores rank better; equal scores tie where ties are allowed.

    Dense ranks, as people give them: scores 0.9, 0.9, 0.1 rank 1, 1, 2. Where
    ties are not allowed the display position breaks them.
    """
    ordered = sorted(items, key=lambda item: (-scores[item.completion_id], item.position))
    ranks: dict[str, int] = {}
    rank = 0
    previous: float | None = None
    for item in ordered:
        score = scores[item.completion_id]
        if not ties_allowed or previous is None or score != previous:
            rank += 1
        ranks[str(item.completion.uid)] = rank
        previous = score
    return ranks


def _likert(ranks: dict[str, int]) -> dict[str, int]:
    """Ratings that agree with the ranks, best rank at the top of the scale."""
    worst = max(ranks.values())
    span = LIKERT_MAX - LIKERT_MIN
    return {
        uid: LIKERT_MAX - round((rank - 1) * span / max(worst - 1, 1)) if worst > 1 else LIKERT_MAX
        for uid, rank in ranks.items()
    }


# What reading a claimed task gives: ranks and a rationale to submit, a reason to skip it, or None (not ready).
Reading = tuple[dict[str, int], str] | str | None


def judge_run(*, judge_id: int) -> str:
    """Let the judge rank the tasks it may take; returns what it did.

    A reward-model judge starts a scoring job first when some completion of
    the project lacks the reward model's score; a language-model judge starts
    a judge job when some open task lacks its verdict (either job's success
    runs the judge again). Submits at most JUDGMENTS_PER_RUN judgments and
    then publishes itself again, so a large project is judged in turns. A
    judge whose limit is reached, or that was switched off, does nothing.
    """
    judge = (
        Judge.objects.select_related("project", "reward_model", "policy", "account")
        .filter(pk=judge_id)
        .first()
    )
    if judge is None or not judge.active:
        return "inactive"
    if judge.kind == Judge.Kind.LANGUAGE_MODEL:
        return _language_model_judge_run(judge)
    return _reward_model_judge_run(judge)


def _reward_model_judge_run(judge: Judge) -> str:
    from training.services.scoring import reward_model_scorer_label, scoring_job_create

    project = judge.project
    assert judge.reward_model is not None
    scorer = reward_model_scorer_label(reward_model=judge.reward_model)
    scores = _scores(project=project, scorer=scorer)
    if _unscored(project=project, scores=scores):
        live = ScoringJob.objects.filter(
            project=project, reward_model=judge.reward_model, status__in=ScoringJob.LIVE
        )
        if not live.exists():
            try:
                scoring_job_create(project=project, reward_model=judge.reward_model, created_by=None)
            except Exception as error:  # the broker is down, or a job was made meanwhile
                Judge.objects.filter(pk=judge.pk).update(last_error=f"could not start scoring: {error}")
                return "scoring not started"
        return "waiting for scores"

    def read(assignment: Assignment, items: list[TaskCompletion]) -> Reading:
        nonlocal scores
        if any(item.completion_id not in scores for item in items):
            # completions added after the scores were read: score them first
            scores = _scores(project=project, scorer=scorer)
            if any(item.completion_id not in scores for item in items):
                return None
        ranks = judge_ranks(items=items, scores=scores, ties_allowed=project.ties_allowed)
        rationale = (
            f"Ranked by {scorer}: "
            + ", ".join(f"{scores[item.completion_id]:.4g}" for item in items)
            + " (in display order)."
        )
        return ranks, rationale

    return _claim_and_submit(judge, read)


def _open_tasks(judge: Judge) -> QuerySet[Task]:
    """Tasks of the judge's project it may still be given: gold or not yet full, and never assigned to
    it, or leased to it now (a lease taken before the task had a verdict)."""
    project = judge.project
    done_with = Assignment.objects.filter(user_id=judge.account_id, project=project).exclude(
        status=Assignment.Status.ACTIVE
    )
    return (
        Task.objects.filter(project=project)
        .exclude(pk__in=done_with.values("task_id"))
        .filter(Q(is_gold=True) | Q(judgment_count__lt=project.overlap))
    )


def _language_model_judge_run(judge: Judge) -> str:
    project = judge.project
    lacking = _open_tasks(judge).exclude(pk__in=JudgeVerdict.objects.filter(judge=judge).values("task_id"))
    if lacking.exists():
        if JudgeJob.objects.filter(judge=judge, status__in=JudgeJob.LIVE).exists():
            return "waiting for verdicts"
        try:
            judge_job_create(judge=judge)
        except Exception as error:  # the broker is down, or a job was made meanwhile
            Judge.objects.filter(pk=judge.pk).update(last_error=f"could not start the judge job: {error}")
            return "judge job not started"
        return "reading tasks"

    def read(assignment: Assignment, items: list[TaskCompletion]) -> Reading:
        verdict = JudgeVerdict.objects.filter(judge=judge, task_id=assignment.task_id).first()
        if verdict is None:
            return None
        if verdict.scores is None:
            return f"the judge's answer could not be read: {verdict.note}"[:500]
        scores = {int(pk): float(value) for pk, value in verdict.scores.items()}
        if any(item.completion_id not in scores for item in items):
            return "the judge read this task before its responses changed"
        ranks = judge_ranks(items=items, scores=scores, ties_allowed=project.ties_allowed)
        rationale = (
            f"Ranked by {judge.model_name} prompted to judge (probability of naming each best): "
            + ", ".join(f"{scores[item.completion_id]:.3f}" for item in items)
            + " (in display order)."
        )
        return ranks, rationale

    return _claim_and_submit(judge, read)


def _claim_and_submit(judge: Judge, read: Any) -> str:
    """Claim and submit as the judge's account until nothing is left, the limit is reached, or a read is
    not ready; a task whose reading says why it cannot be ranked is skipped (people take it)."""
    project, account = judge.project, judge.account
    made = skipped = 0
    while made < JUDGMENTS_PER_RUN:
        judge.refresh_from_db(fields=["judgments_made", "active", "max_judgments"])
        if not judge.active or (
            judge.max_judgments is not None and judge.judgments_made >= judge.max_judgments
        ):
            break
        assignment = assignment_claim_next(project=project, user=account)
        if assignment is None:
            break
        items = list(assignment.task.items.select_related("completion").order_by("position"))
        reading = read(assignment, items)
        if reading is None:
            break
        if isinstance(reading, str):
            assignment_skip(assignment=assignment, reason=reading)
            skipped += 1
            continue
        ranks, rationale = reading
        answer = JudgmentInput(
            ranks=ranks,
            likert=_likert(ranks) if project.likert_enabled else {},
            rationale=rationale,
            client_token=f"judge-{assignment.pk}",
        )
        result = judgment_submit(assignment=assignment, user=account, answer=answer, source=Source.MODEL)
        if result.created:
            Judge.objects.filter(pk=judge.pk).update(judgments_made=F("judgments_made") + 1)
        made += 1
    Judge.objects.filter(pk=judge.pk).update(last_run_at=timezone.now(), last_error="")
    if made == JUDGMENTS_PER_RUN:
        transaction.on_commit(lambda: judge_request(judge_id=judge.pk))
    return f"{made} judgments" + (f", {skipped} skipped" if skipped else "")


# --- judge jobs: a language-model judge reads the open tasks on the gpu queue ------------------------


def judge_job_dir(*, job_id: int) -> Path:
    """Where a job's specs and process logs go: ARTIFACTS_DIR/judges/<id>/."""
    return Path(settings.ARTIFACTS_DIR) / "judges" / str(int(job_id))


def judge_job_create(*, judge: Judge) -> JudgeJob:
    """Queue a job that reads every open task of the judge's project lacking its verdict.

    Raises QueueUnavailable when the broker does not answer, ValidationError
    when a job of this judge is already live; either way nothing is created.
    The job is queued once the caller's transaction commits.
    """
    from training.services.jobs import broker_check

    if judge.kind != Judge.Kind.LANGUAGE_MODEL:
        raise ValidationError({"judge": "only a language-model judge reads tasks in a judge job"})
    broker_check()
    try:
        with transaction.atomic():
            job = JudgeJob.objects.create(judge=judge, project_id=judge.project_id)
            transaction.on_commit(lambda: judge_job_enqueue(job_id=job.pk))
    except IntegrityError:  # a live job holds the one slot (see the model's constraint)
        raise ValidationError({"judge": "this judge is already reading the project's tasks"}) from None
    return job


def judge_job_enqueue(*, job_id: int) -> bool:
    """Publish the job's task on the gpu queue; a job that cannot be queued is failed, saying why."""
    from training.services.jobs import task_publish

    return task_publish(
        JUDGE_JOB_TASK,
        job_id,
        fail=lambda error: judge_job_fail(job_id=job_id, error=error, from_statuses=("queued",)),
    )


def judge_job_fail(
    *,
    job_id: int,
    error: str,
    from_statuses: tuple[str, ...] = ("queued", "running"),
    attempt: int | None = None,
) -> bool:
    """Fail the job (compare-and-set), keeping the reason; the judge's page shows it as the judge's error."""
    from training.services.jobs import job_fail

    failed = job_fail(JudgeJob, job_id=job_id, error=error, from_statuses=from_statuses, attempt=attempt)
    if failed:
        Judge.objects.filter(jobs__pk=job_id).update(
            last_error=f"judge job {job_id} failed: {error.strip().splitlines()[-1] if error.strip() else ''}"[
                :2000
            ]
        )
    return failed


def judge_job_spec(*, job: JudgeJob) -> JudgeSpec:
    """The JudgeSpec of the job's current attempt (what its process reads)."""
    from config.storage import storage_path_resolve
    from training.services.generation import policy_prompt_format

    judge = Judge.objects.select_related("policy").get(pk=job.judge_id)
    policy = judge.policy
    assert policy is not None
    return JudgeSpec(
        job_id=job.pk,
        attempt=job.attempts,
        judge_id=judge.pk,
        policy=JudgePolicySpec(
            base_model=storage_path_resolve(policy.base_model),
            adapter=storage_path_resolve(policy.adapter),
            prompt_format=policy_prompt_format(policy=policy),
        ),
        template=judge.prompt_template or DEFAULT_TEMPLATE,
    )


def judge_work(*, judge: Judge) -> dict[str, Any]:
    """The open tasks lacking the judge's verdict, with their prompts and responses in position order."""
    judge = Judge.objects.select_related("project").get(pk=judge.pk)
    open_tasks = _open_tasks(judge)
    lacking = (
        open_tasks.exclude(pk__in=JudgeVerdict.objects.filter(judge=judge).values("task_id"))
        .select_related("prompt")
        .order_by("pk")
    )
    items: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for task_id, completion_id, text in (
        TaskCompletion.objects.filter(task__in=lacking.values("pk"))
        .order_by("task_id", "position")
        .values_list("task_id", "completion_id", "completion__text")
    ):
        items[task_id].append((completion_id, text))
    return {
        "total": open_tasks.count(),
        "tasks": [
            {
                "task_id": task.pk,
                "prompt_text": task.prompt.text,
                "prompt_messages": task.prompt.messages,
                "completions": items[task.pk],
            }
            for task in lacking.iterator(chunk_size=500)
        ],
    }


def judge_job_execute(*, job_id: int) -> None:
    """Run one delivery of the job's task: hold its GPU, claim it, launch its process, wait, clean up after a crash."""
    from training.services.supervisor import gpu_job_devices

    with gpu_job_devices(JudgeJob, job_id=job_id, gpus=1, what="judge job") as lease:
        if lease is not None:
            _judge_job_launch(job_id=job_id, lease=lease)


def _judge_job_launch(*, job_id: int, lease: Any) -> None:
    from training.services.jobs import job_claim
    from training.services.supervisor import child_work_write, gpu_job_process_run

    job = job_claim(JudgeJob, job_id=job_id)
    if job is None:
        return
    attempt = job.attempts
    try:
        spec = judge_job_spec(job=job)
        work = judge_work(judge=job.judge)
    except Exception as error:  # e.g. the policy is gone, or its template was broken by hand
        judge_job_fail(job_id=job_id, error=f"{type(error).__name__}: {error}", attempt=attempt)
        return
    folder = judge_job_dir(job_id=job_id)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / f"spec-attempt-{attempt}.json"
    spec.to_json(spec_path)
    work_path = child_work_write(folder / f"work-attempt-{attempt}.json", work)
    gpu_job_process_run(
        JudgeJob,
        job_id=job_id,
        attempt=attempt,
        command=[sys.executable, "-m", "training.judge_process", str(spec_path), str(work_path)],
        lease=lease,
        log_path=folder / f"process-attempt-{attempt}.log",
        what="judge",
        retry_note="retrying the tasks not read yet",
        enqueue=lambda queued_id: judge_job_enqueue(job_id=queued_id),
        events=JudgeJobEvents(job_id=job_id, attempt=attempt),
    )


def judge_job_started(*, job_id: int, attempt: int, tasks_total: int, tasks_done: int) -> bool:
    """Record the counts an attempt found; False if the job is no longer this attempt's."""
    from training.services.jobs import job_owned

    rows = job_owned(JudgeJob, job_id=job_id, attempt=attempt)
    return (
        rows.update(
            tasks_total=tasks_total, tasks_done=min(tasks_done, tasks_total), heartbeat_at=timezone.now()
        )
        == 1
    )


@transaction.atomic
def judge_job_write_batch(*, job_id: int, attempt: int, verdicts: dict[int, dict[str, Any]]) -> int | None:
    """Store a batch's verdicts (task id → {"scores": {completion id: score}} or {"note": why unreadable})
    and move the progress, in one transaction.

    Only tasks of the job's project are written, each once per judge (a
    retried attempt's second reading of a task is dropped). Unreadable ones
    are counted on the judge. Returns how many were written, or None
    (nothing written) when the job is no longer this attempt's. A score that
    is not a finite number raises ValueError: a broken model must fail the
    job, not rank by NaN.
    """
    from training.services.jobs import job_owned

    job = (
        job_owned(JudgeJob, job_id=job_id, attempt=attempt)
        .select_for_update()
        .only("pk", "project_id", "judge_id")
        .first()
    )
    if job is None:
        return None
    rows = []
    known = set(
        Task.objects.filter(pk__in=list(verdicts), project_id=job.project_id).values_list("pk", flat=True)
    )
    done = set(
        JudgeVerdict.objects.filter(judge_id=job.judge_id, task_id__in=known).values_list(
            "task_id", flat=True
        )
    )
    for task_id in sorted(known - done):
        verdict = verdicts[task_id]
        scores = verdict.get("scores")
        if scores is not None:
            scores = {str(int(pk)): float(value) for pk, value in scores.items()}
            if not all(math.isfinite(value) for value in scores.values()):
                raise ValueError(f"the judge gave no finite reading for task {task_id}")
        rows.append(
            JudgeVerdict(
                judge_id=job.judge_id,
                task_id=task_id,
                scores=scores,
                note=str(verdict.get("note", ""))[:2000],
            )
        )
    JudgeVerdict.objects.bulk_create(rows)
    unreadable = sum(1 for row in rows if row.scores is None)
    if unreadable:
        Judge.objects.filter(pk=job.judge_id).update(answers_unreadable=F("answers_unreadable") + unreadable)
    JudgeJob.objects.filter(pk=job_id).update(
        tasks_done=Least(F("tasks_done") + len(verdicts), F("tasks_total")), heartbeat_at=timezone.now()
    )
    return len(rows)


@transaction.atomic
def judge_job_finish(*, job_id: int, attempt: int) -> bool:
    """Mark the attempt's job succeeded and run its judge once this commits; False if no longer this attempt's."""
    from training.job_events import job_ended
    from training.services.jobs import job_owned

    now = timezone.now()
    finished = (
        job_owned(JudgeJob, job_id=job_id, attempt=attempt).update(
            status=JudgeJob.Status.SUCCEEDED, tasks_done=F("tasks_total"), heartbeat_at=now, finished_at=now
        )
        == 1
    )
    if finished:
        job_ended(JudgeJob, job_id=job_id)
        judge_id = JudgeJob.objects.filter(pk=job_id).values_list("judge_id", flat=True).get()
        transaction.on_commit(lambda: judge_request(judge_id=judge_id))
    return finished


def judge_job_cancel(*, job: JudgeJob) -> JudgeJob:
    """A queued job is cancelled at once; a running one stops after its current batch (verdicts written stay)."""
    from training.services.jobs import job_cancel

    job_cancel(JudgeJob, job_id=job.pk)
    job.refresh_from_db()
    return job


def judge_jobs_reap(*, now: Any = None) -> list[int]:
    """Jobs whose heartbeat stopped: back to the queue while attempts remain, else failed. Returns their ids."""
    from training.services.jobs import jobs_reap

    return jobs_reap(
        JudgeJob,
        retry_note="retrying the tasks not read yet",
        enqueue=lambda job_id: judge_job_enqueue(job_id=job_id),
        now=now,
    )


class JudgeJobEvents(ChildEvents):
    """A judge job's child events, applied through the fenced services above."""

    what = "judge"

    def on_started(self, event: dict[str, Any]) -> bool:
        return judge_job_started(
            job_id=self.job_id,
            attempt=self.attempt,
            tasks_total=int(event["tasks_total"]),
            tasks_done=int(event["tasks_done"]),
        )

    def on_heartbeat(self, event: dict[str, Any]) -> bool:
        from training.services.jobs import job_heartbeat

        return job_heartbeat(JudgeJob, job_id=self.job_id, attempt=self.attempt)

    def on_batch(self, event: dict[str, Any]) -> bool:
        verdicts = {int(task_id): dict(value) for task_id, value in event["verdicts"].items()}
        stored = judge_job_write_batch(job_id=self.job_id, attempt=self.attempt, verdicts=verdicts)
        if stored is None:
            return False
        unreadable = sum(1 for value in verdicts.values() if value.get("scores") is None)
        self.lines.append(f"wrote {stored} verdicts ({unreadable} unreadable in the batch)")
        return True

    def on_result(self, event: dict[str, Any]) -> bool:
        return judge_job_finish(job_id=self.job_id, attempt=self.attempt)

    def on_stopped(self, event: dict[str, Any]) -> bool:
        from training.services.child_events import _stopped

        return _stopped(JudgeJob, self, event, enqueue=lambda job_id: judge_job_enqueue(job_id=job_id))

    def on_error(self, event: dict[str, Any]) -> bool:
        return judge_job_fail(
            job_id=self.job_id, error=str(event["error"]), from_statuses=("running",), attempt=self.attempt
        )


# --- calibration: how far a judge agrees with people ---------------------------------


def dataset_build_judges(
    *, build: Any, comparisons: QuerySet[Comparison]
) -> tuple[dict[int, list[int]], list[dict[str, Any]]]:
    """Which judges' votes a build leaves out, per project, and each judge's calibration for the card.

    `comparisons`: the build's selection before judges are filtered (its
    projects, days and judgment cut-off, less rejected judgments). Humans only
    leaves every judge out; humans and judges keeps them all; calibrated
    keeps a judge whose agreement with the humans' majority reaches the
    build's `judge_agreement_min` (a judge with no shared pair is left out).
    """
    from training.models import DatasetBuild

    judges = list(
        Judge.objects.filter(project__in=build.projects.all()).values_list(
            "project_id", "account_id", "account__username"
        )
    )
    if not judges:
        return {}, []
    calibrations = {row.user_id: row for row in judge_calibration(comparisons=comparisons)}
    left_out: dict[int, list[int]] = defaultdict(list)
    report = []
    for project_id, account_id, username in sorted(judges):
        calibration = calibrations.get(account_id)
        agreement = calibration.agreement if calibration else None
        if build.sources == DatasetBuild.Sources.HUMANS_AND_MODELS:
            kept = True
        elif build.sources == DatasetBuild.Sources.CALIBRATED_MODELS:
            kept = agreement is not None and agreement >= build.judge_agreement_min
        else:
            kept = False
        if not kept:
            left_out[project_id].append(account_id)
        report.append(
            {
                "project_id": project_id,
                "user_id": account_id,
                "username": username,
                "pairs_shared_with_humans": calibration.pairs if calibration else 0,
                "agreement_with_humans": None if agreement is None else round(agreement, 4),
                "kept": kept,
            }
        )
    return dict(left_out), report


@dataclass(frozen=True)
class JudgeCalibration:
    user_id: int
    username: str
    pairs: int  # pairs that the judge and at least one person judged, with a human majority
    agreed: int

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.pairs if self.pairs else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "username": self.username,
            "pairs": self.pairs,
            "agreed": self.agreed,
            "agreement": self.agreement,
        }


def _outcome(comparison: dict[str, Any]) -> tuple[tuple[int, int], int]:
    """((task-independent) pair key, outcome): +1 the lower id won, -1 the higher id won, 0 a tie."""
    a, b = comparison["chosen_id"], comparison["rejected_id"]
    key = (min(a, b), max(a, b))
    if comparison["is_tie"]:
        return key, 0
    return key, 1 if a == key[0] else -1


def judge_calibration(*, comparisons: QuerySet[Comparison]) -> list[JudgeCalibration]:
    """Each model judge's agreement with the people's majority, over `comparisons` (e.g. a build's selection).

    The calibration set: every (task, pair) that the judge and at least one
    person judged, where the people's votes have a strict majority outcome
    (better, worse or tie). Agreement is the share of those the judge got the
    same way.
    """
    human: dict[tuple[int, tuple[int, int]], list[int]] = defaultdict(list)
    model: dict[int, dict[tuple[int, tuple[int, int]], int]] = defaultdict(dict)
    names: dict[int, str] = {}
    rows = comparisons.values(
        "task_id", "chosen_id", "rejected_id", "is_tie", "source", "labeler_id", "labeler__username"
    )
    for row in rows.iterator(chunk_size=2000):
        key, outcome = _outcome(row)
        if row["source"] == Source.MODEL:
            model[row["labeler_id"]][(row["task_id"], key)] = outcome
            names[row["labeler_id"]] = row["labeler__username"]
        else:
            human[(row["task_id"], key)].append(outcome)
    majority: dict[tuple[int, tuple[int, int]], int] = {}
    for pair, votes in human.items():
        counts = {outcome: votes.count(outcome) for outcome in set(votes)}
        best = max(counts.values())
        winners = [outcome for outcome, count in counts.items() if count == best]
        if len(winners) == 1:
            majority[pair] = winners[0]
    calibrations = []
    for user_id, outcomes in sorted(model.items()):
        shared = [pair for pair in outcomes if pair in majority]
        calibrations.append(
            JudgeCalibration(
                user_id=user_id,
                username=names[user_id],
                pairs=len(shared),
                agreed=sum(1 for pair in shared if outcomes[pair] == majority[pair]),
            )
        )
    return calibrations
