"""Model judges: a trained reward model that labels a project's tasks like a person, and how builds weigh it.

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

Not built: a causal LM prompted to rank (a generation job with a judge
prompt template). Only reward models judge today.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from annotation.models import (
    LIKERT_MAX,
    LIKERT_MIN,
    Comparison,
    CompletionScore,
    Membership,
    Project,
    Source,
    TaskCompletion,
)
from annotation.roles import Role
from annotation.selectors import projects_for_user
from annotation.services import JudgmentInput, assignment_claim_next, judgment_submit
from training.models import Judge, RewardModel, ScoringJob
from training.selectors import reward_models_for_user

# The Celery task (training.tasks.judge_run) and its queue, published by name.
JUDGE_RUN_TASK_NAME = "training.tasks.judge_run"
JUDGE_RUN_QUEUE = "default"
# Judgments one `judge_run` submits before it publishes itself again, so one judge never holds a worker long.
JUDGMENTS_PER_RUN = 200


def judge_account_name(*, project: Project, reward_model: RewardModel) -> str:
    return f"judge-rm{reward_model.pk}-p{project.pk}"


def judge_attach(
    *,
    project: Project,
    reward_model: RewardModel,
    created_by: AbstractBaseUser | None,
    max_judgments: int | None = None,
) -> Judge:
    """Attach a reward model as a judge of a ranking project; its first run is queued on commit.

    Raises ValidationError (by field) when the creator (when given) does not
    manage the project or may not see the reward model, when the project is
    not a ranking project, or when this reward model already judges it.
    """
    errors: dict[str, str] = {}
    if created_by is not None:
        if not projects_for_user(user=created_by, role=Role.MANAGER).filter(pk=project.pk).exists():
            errors["project"] = "you can attach judges only to projects you manage"
        if not reward_models_for_user(user=created_by).filter(pk=reward_model.pk).exists():
            errors["reward_model"] = "you can use only reward models trained on projects you manage"
    if project.kind != Project.Kind.RANKING:
        errors["project"] = "judges rank the tasks of ranking projects, not A/B sessions"
    if max_judgments is not None and max_judgments < 1:
        errors["max_judgments"] = "must be at least 1, or empty for no limit"
    if (
        "reward_model" not in errors
        and Judge.objects.filter(project=project, reward_model=reward_model).exists()
    ):
        errors["reward_model"] = "this reward model already judges this project"
    if errors:
        raise ValidationError(errors)
    try:
        with transaction.atomic():
            account = get_user_model().objects.create_user(
                username=judge_account_name(project=project, reward_model=reward_model),
                password=None,  # unusable: a judge never signs in
                first_name="Model judge",
                last_name=reward_model.name[:150],
            )
            Membership.objects.create(project=project, user=account, role=Role.LABELER)
            judge = Judge.objects.create(
                project=project,
                reward_model=reward_model,
                account=account,
                max_judgments=max_judgments,
                created_by=created_by,
            )
            transaction.on_commit(lambda: judge_request(judge_id=judge.pk))
    except IntegrityError:
        raise ValidationError({"reward_model": "this reward model already judges this project"}) from None
    return judge


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


def judge_run(*, judge_id: int) -> str:
    """Let the judge rank the tasks it may take; returns what it did.

    Starts a scoring job first when some completion of the project lacks the
    reward model's score (the job's success runs the judge again). Submits at
    most JUDGMENTS_PER_RUN judgments and then publishes itself again, so a
    large project is judged in turns. A judge whose limit is reached, or that
    was switched off, does nothing.
    """
    from training.services.scoring import reward_model_scorer_label, scoring_job_create

    judge = Judge.objects.select_related("project", "reward_model", "account").filter(pk=judge_id).first()
    if judge is None or not judge.active:
        return "inactive"
    project, account = judge.project, judge.account
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

    made = 0
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
        missing = [item for item in items if item.completion_id not in scores]
        if missing:  # completions added after the scores were read: score them first
            scores = _scores(project=project, scorer=scorer)
            if any(item.completion_id not in scores for item in items):
                break
        ranks = judge_ranks(items=items, scores=scores, ties_allowed=project.ties_allowed)
        answer = JudgmentInput(
            ranks=ranks,
            likert=_likert(ranks) if project.likert_enabled else {},
            rationale=f"Ranked by {scorer}: "
            + ", ".join(f"{scores[item.completion_id]:.4g}" for item in items)
            + " (in display order).",
            client_token=f"judge-{assignment.pk}",
        )
        result = judgment_submit(assignment=assignment, user=account, answer=answer, source=Source.MODEL)
        if result.created:
            Judge.objects.filter(pk=judge.pk).update(judgments_made=F("judgments_made") + 1)
        made += 1
    Judge.objects.filter(pk=judge.pk).update(last_run_at=timezone.now(), last_error="")
    if made == JUDGMENTS_PER_RUN:
        transaction.on_commit(lambda: judge_request(judge_id=judge.pk))
    return f"{made} judgments"


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
