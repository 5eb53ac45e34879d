"""Reads on the annotation side, and the access helpers every door goes through.

An object a person may not see does not exist for them: the helpers raise
Http404, never 403, so ids reveal nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, TypedDict

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import (
    Count,
    Exists,
    F,
    IntegerField,
    OuterRef,
    Prefetch,
    QuerySet,
    Sum,
    Value,
    prefetch_related_objects,
)
from django.db.models.functions import Least
from django.http import Http404
from django.utils import timezone

from annotation.models import (
    Assignment,
    Comparison,
    Completion,
    CompletionScore,
    Judgment,
    Membership,
    Policy,
    Project,
    Task,
    TaskCompletion,
)
from annotation.roles import Role

AnyUser = AbstractBaseUser | AnonymousUser

# Who answers the tasks of each kind of project.
JUDGE_ROLE = {Project.Kind.RANKING: Role.LABELER, Project.Kind.AB: Role.EVALUATOR}


def projects_for_user(*, user: AnyUser, role: str | None = None) -> QuerySet[Project]:
    if not user.is_authenticated:
        return Project.objects.none()
    if user.is_superuser:  # type: ignore[union-attr]
        return Project.objects.all()
    memberships = Membership.objects.filter(user=user)
    if role is not None:
        memberships = memberships.filter(role=role)
    return Project.objects.filter(pk__in=memberships.values("project_id"))


def policies_for_user(*, user: AnyUser) -> QuerySet[Policy]:
    """The policies a person may see and use: those of a project they manage (all, for a superuser).

    A policy belongs to the projects it was registered for or used in
    (Policy.projects); one that belongs to none is a superuser's alone.
    """
    if not user.is_authenticated:
        return Policy.objects.none()
    if user.is_superuser:  # type: ignore[union-attr]
        return Policy.objects.all()
    managed = projects_for_user(user=user, role=Role.MANAGER)
    links = Policy.projects.through.objects.filter(project__in=managed)
    return Policy.objects.filter(pk__in=links.values("policy_id"))


def policy_outside_reach(*, user: AnyUser, policy: Policy) -> bool:
    """Whether the policy belongs to a project the person does not manage (or to no project at all).

    Such a policy is shared with someone else: the person may use it where
    they see it, but changing or deleting it would reach into another project.
    """
    if user.is_authenticated and user.is_superuser:  # type: ignore[union-attr]
        return False
    managed = projects_for_user(user=user, role=Role.MANAGER)
    projects = policy.projects.all()
    return not projects.exists() or projects.exclude(pk__in=managed.values("pk")).exists()


def accounts_administered_by(*, user: AnyUser) -> QuerySet[Any]:
    """The accounts a manager may administer (SECURITY.md, "Accounts").

    Those with at least one project membership, all of them in projects the
    manager manages, that are nobody's manager, not staff, not a superuser
    and not the manager themselves. An account that belongs to no project, or
    also works in a project of someone else, is out of reach: its owner or a
    superuser looks after it. Superusers administer everyone.
    """
    from django.contrib.auth import get_user_model

    accounts = get_user_model().objects.all()
    if not user.is_authenticated:
        return accounts.none()
    if user.is_superuser:  # type: ignore[union-attr]
        return accounts
    managed = projects_for_user(user=user, role=Role.MANAGER)
    memberships = Membership.objects.filter(user=OuterRef("pk"))
    return (
        accounts_addable_to_projects()
        .exclude(pk=user.pk)
        .filter(Exists(memberships))
        .exclude(Exists(memberships.exclude(project__in=managed)))
    )


def accounts_addable_to_projects() -> QuerySet[Any]:
    """Accounts a manager may add to a project of theirs: no one with a manager's, staff or superuser rights."""
    from django.contrib.auth import get_user_model

    return (
        get_user_model()
        .objects.filter(is_superuser=False, is_staff=False)
        .exclude(groups__name=Role.MANAGER)
        .exclude(Exists(Membership.objects.filter(user=OuterRef("pk"), role=Role.MANAGER)))
    )


def project_by_reference(*, reference: str) -> Project | None:
    """A project by id or, failing that, by exact name: how operators name one on the command line."""
    if reference.isdigit():
        project = Project.objects.filter(pk=int(reference)).first()
        if project is not None:
            return project
    return Project.objects.filter(name=reference).first()


def project_roles_for_user(*, user: AnyUser, project: Project) -> frozenset[str]:
    if not user.is_authenticated:
        return frozenset()
    roles = set(Membership.objects.filter(project=project, user=user).values_list("role", flat=True))
    if user.is_superuser:  # type: ignore[union-attr]
        roles.add(Role.MANAGER)
    return frozenset(roles)


def project_get_for_user(*, user: AnyUser, pk: Any, role: str | None = None) -> Project:
    """The project with this id if the user is a member (holding `role`, if given); else Http404."""
    try:
        project = projects_for_user(user=user, role=role).get(pk=int(pk))
    except (Project.DoesNotExist, TypeError, ValueError):
        raise Http404("No such project.") from None
    return project


def project_get_for_judge(*, user: AnyUser, pk: Any) -> Project:
    """A project the user answers tasks in (labeler of a ranking project, evaluator of an A/B one).

    One query, as every claim starts here: judging needs a membership with the
    judging role, which also answers whether the user may see the project
    (superusers included: they judge only where they hold the role). A row
    per judging role the user holds there; the one matching the kind wins.
    """
    try:
        project_id = int(pk)
    except (TypeError, ValueError):
        raise Http404("No such project.") from None
    if not user.is_authenticated:
        raise Http404("No such project.")
    held = Project.objects.filter(
        pk=project_id, memberships__user=user, memberships__role__in=set(JUDGE_ROLE.values())
    ).annotate(held_role=F("memberships__role"))
    for project in held:
        if project.held_role == JUDGE_ROLE[Project.Kind(project.kind)]:
            return project
    raise Http404("No such project.")


def assignment_get_for_user(*, user: AnyUser, pk: Any) -> Assignment:
    """The person's own assignment; anybody else's is Http404, managers included.

    The bare row: a submit locks and reads the task itself, and joining the
    task, project and prompt here cost a tenth of its Python time.
    """
    if not user.is_authenticated:
        raise Http404("No such assignment.")
    try:
        return Assignment.objects.get(pk=int(pk), user=user)
    except (Assignment.DoesNotExist, TypeError, ValueError):
        raise Http404("No such assignment.") from None


def task_items_prefetch() -> Prefetch:
    """A task's items with their completions, in position order (for prefetch_related)."""
    return Prefetch(
        "items", queryset=TaskCompletion.objects.select_related("completion").order_by("position")
    )


def assignment_items_in_display_order(*, assignment: Assignment) -> list[TaskCompletion]:
    """The task's completions in the order this person sees them (A, B, C, …).

    Items the claim already fetched are not fetched again.
    """
    prefetch_related_objects([assignment.task], task_items_prefetch())
    by_position = {item.position: item for item in assignment.task.items.all()}
    return [by_position[position] for position in assignment.permutation]


def display_label(index: int) -> str:
    return chr(ord("A") + index)


def assignment_payload(*, assignment: Assignment) -> dict[str, Any]:
    """What a client needs to show and answer an assignment.

    Completions are named by their opaque uid and a display letter only;
    nothing here says which policy wrote them.
    """
    task = assignment.task
    project = task.project
    prompt = task.prompt
    items = assignment_items_in_display_order(assignment=assignment)
    return {
        "id": assignment.pk,
        "project": project.pk,
        "status": assignment.status,
        "lease_expires_at": assignment.lease_expires_at.isoformat(),
        "prompt": {"text": prompt.text, "messages": prompt.messages},
        "completions": [
            {"id": str(item.completion.uid), "label": display_label(index), "text": item.completion.text}
            for index, item in enumerate(items)
        ],
        "settings": {
            "kind": project.kind,
            "k": len(items),
            "ties_allowed": project.ties_allowed,
            "likert_enabled": project.likert_enabled,
            "flags": list(project.flags),
            "rationale_required": project.rationale_required,
        },
    }


def project_fraction_done(*, project: Project) -> float:
    """Share of wanted judgments stored: each regular task counts up to its overlap; gold excluded."""
    totals = Task.objects.filter(project=project, is_gold=False).aggregate(
        tasks=Count("pk"), counted=Sum(Least("judgment_count", Value(project.overlap)))
    )
    wanted = totals["tasks"] * project.overlap
    return (totals["counted"] or 0) / wanted if wanted else 0.0


def projects_fraction_done(*, projects: Iterable[Project]) -> dict[int, float]:
    """`project_fraction_done` of several projects in one query (for lists of projects)."""
    by_project = {project.pk: project for project in projects}
    fractions = dict.fromkeys(by_project, 0.0)
    rows = (
        Task.objects.filter(project_id__in=by_project, is_gold=False)
        .values("project_id")
        .annotate(
            tasks=Count("pk"),
            counted=Sum(Least("judgment_count", F("project__overlap"), output_field=IntegerField())),
        )
        .order_by()
    )
    for row in rows:
        wanted = row["tasks"] * by_project[row["project_id"]].overlap
        fractions[row["project_id"]] = (row["counted"] or 0) / wanted if wanted else 0.0
    return fractions


def judgments_today_count(*, user: AnyUser, project: Project | None = None) -> int:
    """Judgments the person stored since local midnight (settings.TIME_ZONE)."""
    if not user.is_authenticated:
        return 0
    midnight = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    judgments = Judgment.objects.filter(user=user, created_at__gte=midnight)
    if project is not None:
        judgments = judgments.filter(task__project=project)
    return judgments.count()


def ab_votes(*, project: Project) -> list[Any]:
    """The session's votes as annotation.ab_stats.Vote, from stored judgments.

    Left is what the person saw on the left (the assignment's permutation);
    "both bad" is a judgment with none acceptable, a tie one with equal ranks.
    Votes rejected in review (annotation.review) do not count.
    """
    from annotation.ab_stats import Vote

    # Plain values, not model instances: at 100k votes the instances were most of the time.
    items = _ab_items(project=project)
    votes = []
    for task_id, prompt_id, permutation, ranks, none_acceptable in (
        Judgment.objects.filter(task__project=project)
        .exclude(review=Judgment.Review.REJECTED)
        .order_by("id")
        .values_list("task_id", "task__prompt_id", "assignment__permutation", "ranks", "none_acceptable")
        .iterator(chunk_size=5000)
    ):
        by_position = items[task_id]
        (left_uid, left_policy), (right_uid, right_policy) = (
            by_position[position] for position in permutation
        )
        if none_acceptable:
            outcome = "both_bad"
        else:
            left_rank, right_rank = ranks[left_uid], ranks[right_uid]
            outcome = "tie" if left_rank == right_rank else ("left" if left_rank < right_rank else "right")
        votes.append(Vote(str(prompt_id), left_policy, right_policy, outcome))
    return votes


def _policy_label(name: str, kind: str) -> str:
    """`str(policy)` from its values (Policy.__str__)."""
    return f"imported:{name}" if kind == Policy.Kind.IMPORTED else name


def _ab_items(*, project: Project) -> dict[int, dict[int, tuple[str, str]]]:
    """Task id -> position -> (completion uid, policy label), for the whole session in one query."""
    items: dict[int, dict[int, tuple[str, str]]] = {}
    for task_id, position, uid, name, kind in (
        TaskCompletion.objects.filter(task__project=project)
        .values_list(
            "task_id", "position", "completion__uid", "completion__policy__name", "completion__policy__kind"
        )
        .iterator(chunk_size=5000)
    ):
        items.setdefault(task_id, {})[position] = (str(uid), _policy_label(name, kind))
    return items


def ab_session_get_for_manager(*, user: AnyUser, pk: Any) -> Project:
    """A blind A/B session the user manages; any other project, or one they do not manage, is Http404."""
    project = project_get_for_user(user=user, pk=pk, role=Role.MANAGER)
    if project.kind != Project.Kind.AB:
        raise Http404("No such A/B session.")
    return project


def ab_scored_votes(*, project: Project) -> list[Any]:
    """The session's votes as annotation.ab_stats.ScoredVote: the completion chosen and the one rejected.

    A decisive vote or a tie is its judgment's one comparison; "both bad"
    (none acceptable) makes no comparison and takes the task's two completions.
    Completions are named by their opaque uid, as the scores are. Votes
    rejected in review do not count.
    """
    from annotation.ab_stats import ScoredVote

    votes = [
        ScoredVote(
            str(chosen_uid),
            str(rejected_uid),
            _policy_label(chosen_name, chosen_kind),
            _policy_label(rejected_name, rejected_kind),
            "tie" if is_tie else "decisive",
        )
        for chosen_uid, rejected_uid, chosen_name, chosen_kind, rejected_name, rejected_kind, is_tie in (
            Comparison.objects.filter(project=project)
            .exclude(judgment__review=Judgment.Review.REJECTED)
            .order_by("judgment_id", "id")
            .values_list(
                "chosen__uid",
                "rejected__uid",
                "chosen__policy__name",
                "chosen__policy__kind",
                "rejected__policy__name",
                "rejected__policy__kind",
                "is_tie",
            )
            .iterator(chunk_size=5000)
        )
    ]
    both_bad = (
        Judgment.objects.filter(task__project=project, none_acceptable=True)
        .exclude(review=Judgment.Review.REJECTED)
        .order_by("id")
        .values_list("task_id", flat=True)
    )
    items = _ab_items(project=project) if both_bad.exists() else {}
    for task_id in both_bad:
        (first_uid, first_policy), (second_uid, second_policy) = (
            items[task_id][position] for position in sorted(items[task_id])
        )
        votes.append(ScoredVote(first_uid, second_uid, first_policy, second_policy, "both_bad"))
    return votes


def completion_scores(*, project: Project) -> dict[str, dict[str, float]]:
    """Every score given to the project's completions: scorer -> completion uid -> score."""
    scores: dict[str, dict[str, float]] = {}
    rows = CompletionScore.objects.filter(completion__prompt__project=project).values_list(
        "scorer", "completion__uid", "score"
    )
    for scorer, uid, score in rows.iterator(chunk_size=2000):
        scores.setdefault(scorer, {})[str(uid)] = score
    return scores


def project_completion_count(*, project: Project) -> int:
    return Completion.objects.filter(prompt__project=project).count()


class GoldFeedback(TypedDict):
    """What a labeler is told right after a gold task, where the project shows it."""

    expected: dict[str, int]  # completion uid -> the gold rank (1 is best)
    matched: bool  # every pair of completions has the gold outcome (better, worse or tie)


def judgment_gold_feedback(*, judgment: Judgment) -> GoldFeedback | None:
    """The expected ranking of the gold task just judged; None unless the task is gold and its project shows it."""
    task = judgment.task
    if not (task.is_gold and task.gold_ranks and task.project.gold_feedback):
        return None
    uids = [
        str(uid)
        for uid in TaskCompletion.objects.filter(task=task)
        .order_by("position")
        .values_list("completion__uid", flat=True)
    ]
    expected = dict(zip(uids, task.gold_ranks, strict=False))
    given = judgment.ranks

    def outcome(ranks: dict[str, int], a: str, b: str) -> int | None:
        if ranks.get(a) is None or ranks.get(b) is None:
            return None
        return (ranks[a] > ranks[b]) - (ranks[a] < ranks[b])

    matched = all(outcome(given, a, b) == outcome(expected, a, b) for a, b in itertools.combinations(uids, 2))
    return {"expected": expected, "matched": matched}
