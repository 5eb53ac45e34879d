"""Review: a project's reviewers (and managers) accept or reject its judgments.

A rejected judgment stays, with its comparisons, for audit; dataset builds
leave its comparisons out (training.selectors), and its task goes back to
the queue for someone else: the assignment gives up its slot and the task's
judgment count drops by one. Each judgment is reviewed once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count, F, QuerySet
from django.http import Http404
from django.utils import timezone

from annotation.models import Assignment, Comparison, Judgment, Project, Task
from annotation.roles import Role
from annotation.selectors import AnyUser, assignment_items_in_display_order, display_label, projects_for_user
from annotation.services import JudgmentInput, comparisons_from_judgment, judgment_validate

REVIEW_ROLES = (Role.REVIEWER, Role.MANAGER)


class ReviewConflict(Exception):
    """Someone reviewed this judgment first; nothing was changed."""


class JudgmentNotRevisable(Exception):
    """The judgment was reviewed already (or is someone else's): it cannot change any more."""


# --- reads ---------------------------------------------------------------------------


def projects_for_reviewer(*, user: AnyUser) -> QuerySet[Project]:
    """Projects whose judgments the user may review: as their reviewer or their manager."""
    reviewed = projects_for_user(user=user, role=Role.REVIEWER).values("pk")
    managed = projects_for_user(user=user, role=Role.MANAGER).values("pk")
    return Project.objects.filter(pk__in=reviewed.union(managed)).order_by("name")


def project_get_for_reviewer(*, user: AnyUser, pk: Any) -> Project:
    try:
        return projects_for_reviewer(user=user).get(pk=int(pk))
    except (Project.DoesNotExist, TypeError, ValueError):
        raise Http404("No such project.") from None


def judgment_get_for_reviewer(*, user: AnyUser, pk: Any) -> Judgment:
    try:
        return Judgment.objects.select_related("task", "assignment").get(
            pk=int(pk), task__project__in=projects_for_reviewer(user=user)
        )
    except (Judgment.DoesNotExist, TypeError, ValueError):
        raise Http404("No such judgment.") from None


@dataclass(frozen=True)
class ReviewFilters:
    review: str = Judgment.Review.PENDING  # "" for every judgment
    labeler_id: int | None = None
    date_from: date | None = None
    date_to: date | None = None
    gold: bool | None = None  # only gold tasks, only regular ones, or both
    disagreeing: bool = False  # only judgments that another person's judgment of the task contradicts


def review_queue(*, project: Project, filters: ReviewFilters) -> QuerySet[Judgment]:
    """The project's judgments the filters select, oldest first (days in the site's time zone)."""
    judgments = Judgment.objects.filter(task__project=project).select_related(
        "user", "reviewed_by", "assignment", "task__prompt"
    )
    if filters.review:
        judgments = judgments.filter(review=filters.review)
    if filters.labeler_id is not None:
        judgments = judgments.filter(user_id=filters.labeler_id)
    zone = timezone.get_current_timezone()
    if filters.date_from is not None:
        judgments = judgments.filter(
            created_at__gte=datetime.combine(filters.date_from, datetime.min.time(), zone)
        )
    if filters.date_to is not None:
        end = datetime.combine(filters.date_to + timedelta(days=1), datetime.min.time(), zone)
        judgments = judgments.filter(created_at__lt=end)
    if filters.gold is not None:
        judgments = judgments.filter(task__is_gold=filters.gold)
    if filters.disagreeing:
        judgments = judgments.filter(pk__in=_disagreeing_judgment_ids(project=project))
    return judgments.order_by("created_at", "id")


def _outcome(ranks: dict[str, int], a: str, b: str) -> int | None:
    if ranks.get(a) is None or ranks.get(b) is None:
        return None
    return (ranks[a] > ranks[b]) - (ranks[a] < ranks[b])


def _disagreeing_judgment_ids(*, project: Project) -> list[int]:
    """Judgments with a pair of responses that another person's judgment of the same task orders otherwise.

    Only tasks judged by two people or more are read (rejected judgments
    do not count), so the cost follows the overlapping part of the project.
    """
    judged = Judgment.objects.filter(task__project=project).exclude(review=Judgment.Review.REJECTED)
    shared_tasks = judged.values("task_id").annotate(n=Count("id")).filter(n__gte=2).values("task_id")
    by_task: dict[int, list[tuple[int, int, dict[str, int]]]] = {}
    for pk, task_id, user_id, ranks in judged.filter(task_id__in=shared_tasks).values_list(
        "id", "task_id", "user_id", "ranks"
    ):
        by_task.setdefault(task_id, []).append((pk, user_id, ranks))
    found = []
    for judgments in by_task.values():
        for pk, user_id, ranks in judgments:
            for _other_pk, other_user, other_ranks in judgments:
                if other_user == user_id:
                    continue
                pairs = itertools.combinations(sorted(set(ranks) & set(other_ranks)), 2)
                if any(_outcome(ranks, a, b) != _outcome(other_ranks, a, b) for a, b in pairs):
                    found.append(pk)
                    break
    return found


def judgment_as_seen(*, judgment: Judgment) -> list[dict[str, Any]]:
    """The responses in the order the labeler saw them, each with the rank, rating and flags given."""
    rows = []
    for index, item in enumerate(assignment_items_in_display_order(assignment=judgment.assignment)):
        uid = str(item.completion.uid)
        rows.append(
            {
                "letter": display_label(index),
                "text": item.completion.text,
                "rank": judgment.ranks.get(uid),
                "likert": judgment.likert.get(uid),
                "flags": judgment.flags.get(uid, []),
            }
        )
    return rows


def judgments_of_labeler(*, user: AnyUser) -> QuerySet[Judgment]:
    """A person's own judgments, newest first: their history."""
    return (
        Judgment.objects.filter(user_id=user.pk)
        .select_related("task__project", "task__prompt", "assignment", "reviewed_by")
        .order_by("-created_at", "-id")
    )


def judgment_get_for_labeler(*, user: AnyUser, pk: Any) -> Judgment:
    try:
        return judgments_of_labeler(user=user).get(pk=int(pk))
    except (Judgment.DoesNotExist, TypeError, ValueError):
        raise Http404("No such judgment.") from None


# --- writes --------------------------------------------------------------------------


def judgment_revise(*, judgment: Judgment, user: AbstractBaseUser, answer: JudgmentInput) -> Judgment:
    """Replace a labeler's own answer, and its comparisons, while nobody has reviewed it.

    1. Under the task's row lock, re-read the judgment: it must be the
       person's and still pending review (JudgmentNotRevisable otherwise).
    2. Check the answer as a submit would (JudgmentInvalid).
    3. In the same transaction: new ranks, ratings, flags, "none acceptable"
       and rationale, the version plus one, and the comparisons replaced.
    """
    with transaction.atomic():
        task = (
            Task.objects.select_for_update(no_key=True, of=("self",))
            .select_related("project")
            .get(pk=judgment.task_id)
        )
        current = Judgment.objects.filter(
            pk=judgment.pk, user_id=user.pk, review=Judgment.Review.PENDING
        ).first()
        if current is None:
            raise JudgmentNotRevisable("This judgment was reviewed already; it can no longer change.")
        items = list(task.items.select_related("completion").order_by("position"))
        answer = replace(answer, client_token=current.client_token)
        judgment_validate(
            answer=answer, project=task.project, uids=[str(item.completion.uid) for item in items]
        )
        current.ranks = answer.ranks
        current.likert = answer.likert
        current.flags = {uid: names for uid, names in answer.flags.items() if names}
        current.none_acceptable = answer.none_acceptable
        current.rationale = answer.rationale.strip()
        current.version += 1
        current.save(update_fields=["ranks", "likert", "flags", "none_acceptable", "rationale", "version"])
        Comparison.objects.filter(judgment=current).delete()
        Comparison.objects.bulk_create(
            comparisons_from_judgment(
                judgment=current, items=items, likert_margins=task.project.likert_enabled
            )
        )
    return current


def judgment_review(
    *,
    judgment: Judgment,
    reviewer: AbstractBaseUser,
    accept: bool,
    reason: str = "",
    now: datetime | None = None,
) -> Judgment:
    """Accept, or reject with a reason, a judgment nobody has reviewed yet.

    1. Under the task's row lock (the lock judgment_submit takes), move the
       judgment from pending by compare-and-set; ReviewConflict when another
       review got there first.
    2. On a rejection, the assignment gives up its slot (status rejected) and
       the task's judgment count drops by one, so the queue serves the task
       to someone else; the labeler who was rejected never gets it again.
    """
    reason = reason.strip()
    if not accept and not reason:
        raise ValidationError({"reason": "say why the judgment is rejected"})
    now = now or timezone.now()
    with transaction.atomic():
        Task.objects.select_for_update(no_key=True).filter(pk=judgment.task_id).first()
        changed = Judgment.objects.filter(pk=judgment.pk, review=Judgment.Review.PENDING).update(
            review=Judgment.Review.ACCEPTED if accept else Judgment.Review.REJECTED,
            reviewed_by=reviewer,
            reviewed_at=now,
            review_reason=reason,
        )
        if changed != 1:
            raise ReviewConflict("This judgment was reviewed already.")
        if not accept:
            Assignment.objects.filter(pk=judgment.assignment_id, status=Assignment.Status.SUBMITTED).update(
                status=Assignment.Status.REJECTED
            )
            Task.objects.filter(pk=judgment.task_id, judgment_count__gt=0).update(
                judgment_count=F("judgment_count") - 1
            )
    judgment.refresh_from_db()
    return judgment
