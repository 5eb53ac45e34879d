"""Writes on the annotation side. Views, admin actions, commands and tasks call these."""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AbstractUser, Group
from django.contrib.auth.password_validation import validate_password
from django.db import IntegrityError, transaction
from django.db.models import (
    Count,
    Exists,
    F,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
    Value,
    prefetch_related_objects,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from annotation.models import (
    LIKERT_MAX,
    LIKERT_MIN,
    Assignment,
    Comparison,
    Completion,
    CompletionScore,
    Judgment,
    LabelerReliability,
    Membership,
    Policy,
    Project,
    Prompt,
    QueueCounter,
    Source,
    Task,
    TaskCompletion,
    Webhook,
)
from annotation.rendering import completion_text_key
from annotation.roles import Role
from annotation.selectors import accounts_addable_to_projects, task_items_prefetch
from annotation.snapshots import stats_refresh_request
from annotation.webhooks import judgment_webhook_data, webhook_event_publish


def password_generate() -> str:
    """A random password that passes the configured validators (~96 bits)."""
    return secrets.token_urlsafe(16)


@transaction.atomic
def user_create(
    *,
    username: str,
    roles: list[str],
    email: str = "",
    password: str | None = None,
    project: Project | None = None,
) -> tuple[AbstractUser, str]:
    """Create a user holding `roles`; returns the user and the password set.

    With a project, the user holds the roles there (a membership each): what
    a person may do comes from memberships (annotation.roles), so without
    one only the manager role (the right to run projects) means anything yet.
    Without a password one is generated, so no account ever has a default one.
    Raises ValueError for an unknown role or a taken username, and Django's
    ValidationError for a password the validators reject.
    """
    unknown = sorted(set(roles) - set(Role.values))
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(unknown)}; choose from {', '.join(Role.values)}")
    if not roles:
        raise ValueError(f"a user needs at least one role: {', '.join(Role.values)}")
    User = get_user_model()
    if User.objects.filter(username__iexact=username).exists():
        raise ValueError(f"a user named {username!r} already exists")
    user = User(username=username, email=email)
    password = password or password_generate()
    validate_password(password, user)
    user.set_password(password)
    user.save()
    user_set_roles(user=user, roles=roles)
    if project is not None:
        Membership.objects.bulk_create(Membership(project=project, user=user, role=role) for role in roles)
    return user, password


@transaction.atomic
def user_set_roles(*, user: AbstractUser, roles: list[str]) -> None:
    """Replace the user's role groups; managers get admin access (is_staff), others lose it."""
    role_groups = Group.objects.filter(name__in=Role.values)
    user.groups.remove(*role_groups.exclude(name__in=roles))
    user.groups.add(*role_groups.filter(name__in=roles))
    user_sync_staff(user=user)


def user_sync_staff(*, user: AbstractUser) -> None:
    """A manager needs the admin; nobody else does. Superusers keep theirs."""
    is_manager = user.groups.filter(name=Role.MANAGER).exists()
    staff = is_manager or user.is_superuser
    if user.is_staff != staff:
        user.is_staff = staff
        user.save(update_fields=["is_staff"])
    if hasattr(user, "_rankwise_roles"):
        del user._rankwise_roles


class MemberInvalid(ValueError):
    """The person cannot be added to the project with that role (the message says why)."""


def project_member_add(*, project: Project, username: str, role: str) -> Membership:
    """Give the account named exactly `username` a judging role in the project; returns the membership.

    Managers add people, never managers: the account must be one a manager
    may add to a project (accounts_addable_to_projects), found by its exact
    username only, so the form lists nobody. The role must be the one that
    judges this kind of project (labeler: ranking; evaluator: A/B).
    Raises MemberInvalid, saying why, and changes nothing then.
    """
    wanted = Role.EVALUATOR if project.kind == Project.Kind.AB else Role.LABELER
    if role != wanted:
        raise MemberInvalid(f"people judge this project as {wanted}s")
    user = accounts_addable_to_projects().filter(username=username.strip()).first()
    if user is None:
        raise MemberInvalid(f"no account that can be added is named {username.strip()!r}")
    membership, _created = Membership.objects.get_or_create(project=project, user=user, role=role)
    return membership


# --- tasks -------------------------------------------------------------------


def _pick_diverse(completions: list[Completion], k: int) -> list[Completion]:
    """Up to k completions with different texts, one per policy in turn before repeating a policy.

    A completion whose text (completion_text_key) was already picked is passed
    over: a task that shows one text twice invites "X over X" comparisons.
    """
    by_policy: dict[int, list[Completion]] = {}
    for completion in completions:
        by_policy.setdefault(completion.policy_id, []).append(completion)
    queues = [list(group) for _policy, group in sorted(by_policy.items())]
    picked: list[Completion] = []
    texts: set[str] = set()
    while len(picked) < k and any(queues):
        for queue in queues:
            while queue and len(picked) < k:
                completion = queue.pop(0)
                key = completion_text_key(completion.text)
                if key not in texts:
                    texts.add(key)
                    picked.append(completion)
                    break
    return picked


def _distinct_texts(completions: list[Completion]) -> bool:
    return len({completion_text_key(completion.text) for completion in completions}) == len(completions)


def _dense_ranks(ranks: list[int]) -> list[int]:
    """Renumber ranks 1, 2, … keeping their order and ties: [3, 1, 3] -> [2, 1, 2]."""
    levels = {rank: index for index, rank in enumerate(sorted(set(ranks)), start=1)}
    return [levels[rank] for rank in ranks]


# A task shows up to K different texts; with fewer than two there is nothing to rank.
MIN_TASK_TEXTS = 2


@transaction.atomic
def tasks_create_for_project(*, project: Project, batch_size: int = 1000) -> int:
    """Make one task per prompt that has no task yet and at least K completions.

    A task shows up to K completions, from as many different policies as there
    are (round-robin over policies, oldest first), and never the same text
    twice (completion_text_key). A prompt whose K or more completions hold
    fewer than K different texts gets a smaller task of the different ones
    (sampled outputs often repeat: dropping such prompts would throw away
    most of a low-temperature policy's rankings); one with a single text gets
    none, as there is nothing to rank. A prompt whose metadata holds
    `gold_ranks` (one rank per completion, in import order) becomes a gold
    task over its first K completions, their ranks renumbered from 1, when
    those K differ. Rows are written in batches. Returns the number of tasks made.
    """
    prompts = (
        Prompt.objects.filter(project=project, tasks__isnull=True)
        .prefetch_related(Prefetch("completions", queryset=Completion.objects.order_by("id")))
        .order_by("id")
    )
    created = 0
    pending: list[tuple[Task, list[Completion]]] = []

    def flush() -> None:
        if project.kind == Project.Kind.AB:
            _ab_sides_draw(
                [(task, [completion.policy_id for completion in chosen]) for task, chosen in pending]
            )
        Task.objects.bulk_create([task for task, _chosen in pending])
        TaskCompletion.objects.bulk_create(
            TaskCompletion(task=task, completion=completion, position=position)
            for task, chosen in pending
            for position, completion in enumerate(chosen)
        )
        pending.clear()

    for prompt in prompts.iterator(chunk_size=batch_size):
        completions = list(prompt.completions.all())
        if len(completions) < project.k:
            continue
        gold_ranks = prompt.metadata.get("gold_ranks") if isinstance(prompt.metadata, dict) else None
        if gold_ranks:
            chosen = completions[: project.k]
            if not _distinct_texts(chosen):
                continue
            task = Task(
                project=project,
                prompt=prompt,
                is_gold=True,
                gold_ranks=_dense_ranks([int(rank) for rank in gold_ranks[: project.k]]),
            )
        else:
            chosen = _pick_diverse(completions, project.k)
            if len(chosen) < MIN_TASK_TEXTS:
                continue
            task = Task(project=project, prompt=prompt)
        pending.append((task, chosen))
        created += 1
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return created


# Below any disagreement step (half a pair: 1 / (2 × C(K, 2) × scorer pairs) ≥ 1/216 for K ≤ 9 and
# three scorers): within one disagreement, the newest model's separation (0 to 1) orders the tasks
# without crossing into another.
DISAGREEMENT_GAP_WEIGHT = 1e-3


def _separation(scores: list[float]) -> float:
    """How well one reward model separates a task's completions: 1 − 4 × the mean, over all C(K, 2)
    pairs, of p(1 − p), p = σ(s_i − s_j) the Bradley–Terry probability that one is preferred.

    p(1 − p) is the variance of the pair's label under the model, and the curvature a label on that
    pair adds to the Bradley–Terry loss: 1/4 where the model cannot tell the two apart, near 0 where
    it is sure. Averaged over every pair, a task whose completions are all close scores near 0, while
    one with a single tied pair among clearly separated ones scores near 1 − 1/C(K, 2) (the smallest
    gap alone would put it first, though labelers tie such pairs anyway). Computed as the mean of
    tanh²(d/2), d = s_i − s_j, which equals 1 − 4p(1 − p) pair by pair.
    Scores alone cannot tell a pair the model is unsure of from two equally good answers, so a task
    whose answers are all equally good still comes first (the disagreement order looks at how the
    models differ instead).
    """
    pairs = list(itertools.combinations(scores, 2))
    return sum(math.tanh((first - second) / 2) ** 2 for first, second in pairs) / len(pairs)


def _discordance(first: list[float], second: list[float]) -> float:
    """How differently two scorers order the same completions: the share of pairs they order the
    opposite way (a pair one ties and the other does not counts half); 0 agree, 1 reversed."""
    pairs = list(itertools.combinations(range(len(first)), 2))
    discordant = 0.0
    for i, j in pairs:
        a = (first[i] > first[j]) - (first[i] < first[j])
        b = (second[i] > second[j]) - (second[i] < second[j])
        if a * b < 0:
            discordant += 1
        elif a != b:
            discordant += 0.5
    return discordant / len(pairs)


@transaction.atomic
def tasks_uncertainty_refresh(
    *, project: Project, scorer: str, other_scorers: Sequence[str] = (), batch_size: int = 2000
) -> int:
    """Store, on each task of the project, how unsure the reward models are about it: the uncertainty
    and disagreement orders.

    `scorer` is the newest reward model's label (annotation.CompletionScore);
    `other_scorers` the labels of earlier reward models that scored the
    project, newest first (the training side chooses them).

    1. Uncertainty: the newest scorer's separation S of the task's
       completions (`_separation`: 1 − 4 × the mean over all pairs of
       p(1 − p) under Bradley–Terry; 0 when it can tell no pair apart,
       toward 1 when every pair is clear). Lowest first: where the reward
       model is unsure about most pairs, a person's ranking teaches it most;
       one tied pair among clear ones (often two equally good answers, which
       labelers tie) does not put a task first.
    2. Disagreement, when at least one other scorer scored every completion
       of the task: D, the mean over pairs of those scorers (the newest
       included) of the share of the task's completion pairs they order the
       opposite way (0: they agree; 1: one reverses the other). Stored as
       −D + DISAGREEMENT_GAP_WEIGHT × S: the largest disagreement first, the
       newest model's least separated tasks first among equal ones. A task
       no other scorer covers stores S, as under uncertainty (so those come
       after every task the models disagree on).
    3. A task with a completion the newest scorer has not scored gets None
       in both (served after the scored ones).

    Replaces what an earlier refresh stored, so the newest reward models
    order the queue. Returns how many tasks got a value.
    """
    labels = [scorer, *[label for label in other_scorers if label != scorer]]
    scores: dict[str, dict[int, float]] = {label: {} for label in labels}
    for label, completion_id, score in CompletionScore.objects.filter(
        completion__prompt__project=project, scorer__in=labels
    ).values_list("scorer", "completion_id", "score"):
        scores[label][completion_id] = score
    newest = scores[scorer]
    items: dict[int, list[int]] = {}
    for task_id, completion_id in TaskCompletion.objects.filter(task__project=project).values_list(
        "task_id", "completion_id"
    ):
        items.setdefault(task_id, []).append(completion_id)
    updates = []
    scored = 0
    for task_id, completion_ids in items.items():
        separation = disagreement = None
        if len(completion_ids) >= 2 and all(pk in newest for pk in completion_ids):
            separation = _separation([newest[pk] for pk in completion_ids])
            covering = [
                [scores[label][pk] for pk in completion_ids]
                for label in labels
                if all(pk in scores[label] for pk in completion_ids)
            ]
            if len(covering) >= 2:
                pairs = list(itertools.combinations(covering, 2))
                mean = sum(_discordance(a, b) for a, b in pairs) / len(pairs)
                disagreement = -mean + DISAGREEMENT_GAP_WEIGHT * separation
            else:
                disagreement = separation
            scored += 1
        updates.append(Task(pk=task_id, uncertainty=separation, disagreement=disagreement))
    Task.objects.bulk_update(updates, ["uncertainty", "disagreement"], batch_size=batch_size)
    return scored


def labeler_reliability_record(*, project_ids: list[int], labelers: list[dict[str, Any]], source: str) -> int:
    """Store each labeler's estimated reliability in every one of the projects where they judged.

    `labelers` rows carry `user_id`, `votes` and `reliability` (as a Dawid–Skene
    build reports them); a newer estimate replaces the stored one. Returns
    how many rows were written.
    """
    by_user = {int(row["user_id"]): row for row in labelers}
    judged = (
        Comparison.objects.filter(project_id__in=project_ids, labeler_id__in=list(by_user))
        .values_list("project_id", "labeler_id")
        .distinct()
    )
    rows = [
        LabelerReliability(
            project_id=project_id,
            user_id=user_id,
            reliability=min(max(float(by_user[user_id]["reliability"]), 0.0), 1.0),
            votes=int(by_user[user_id]["votes"]),
            source=source[:200],
        )
        for project_id, user_id in judged.order_by("project_id", "labeler_id")
    ]
    LabelerReliability.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["project", "user"],
        update_fields=["reliability", "votes", "source", "computed_at"],
    )
    return len(rows)


# --- the queue ---------------------------------------------------------------

_random = secrets.SystemRandom()
# Claims try this many locked-or-full candidates before giving up for now.
_CLAIM_CANDIDATES = 20


def _live_assignments(now: datetime) -> Q:
    """Assignments that hold a slot: submitted, or active with a lease still running."""
    return Q(status=Assignment.Status.SUBMITTED) | Q(
        status=Assignment.Status.ACTIVE, lease_expires_at__gt=now
    )


def _wants_gold(*, project: Project, user: AbstractBaseUser) -> bool:
    """Whether the next task should be gold, so the person's gold share tracks the project's rate."""
    if project.gold_rate <= 0:
        return False
    # One row kept by the database as assignments come and go (annotation.counters),
    # not the person's history counted again on every claim.
    shown, gold = QueueCounter.objects.filter(project=project, user=user).values_list(
        "shown", "shown_gold"
    ).first() or (0, 0)
    return gold < project.gold_rate * (shown + 1)


def _claim_candidates(
    *, project: Project, user: AbstractBaseUser, gold: bool, now: datetime
) -> QuerySet[Task]:
    live = (
        Assignment.objects.filter(_live_assignments(now), task=OuterRef("pk"))
        .order_by()
        .values("task")
        .annotate(n=Count("pk"))
        .values("n")
    )
    tasks = Task.objects.filter(project=project, is_gold=gold).exclude(
        Exists(Assignment.objects.filter(task=OuterRef("pk"), user=user))
    )
    if not gold:
        # Gold tasks go to everyone once; regular ones stop at the overlap.
        tasks = (
            tasks.filter(judgment_count__lt=project.overlap)
            .alias(live=Coalesce(Subquery(live), Value(0)))
            .filter(live__lt=project.overlap)
        )
    return tasks.order_by(*_claim_order(project))


def _claim_order(project: Project) -> tuple[Any, ...]:
    """The project's task order, each matching an index of Task (see its Meta)."""
    if project.task_order == Project.TaskOrder.RANDOM:
        return ("random_rank", "id")
    if project.task_order == Project.TaskOrder.UNCERTAINTY:
        # Least sure first; tasks the reward model has not scored after them, at random.
        return (F("uncertainty").asc(nulls_last=True), "random_rank", "id")
    if project.task_order == Project.TaskOrder.DISAGREEMENT:
        # Where the newest reward models disagree most first (tasks_uncertainty_refresh).
        return (F("disagreement").asc(nulls_last=True), "random_rank", "id")
    # Closest to done first, so finished tasks (and datasets) arrive early.
    return ("-judgment_count", "id")


def _free_slot(*, task: Task, project: Project, now: datetime) -> int | None:
    """Under the task's row lock: expire stale leases, then the lowest free slot (None if full).

    Read first, and write (and read again) only when a lease is stale: that
    saves a statement on nearly every claim. A read without stale leases holds
    under the lock: a stale lease comes back to life only by a late submit,
    which takes this lock too, and a skip or the reaper only frees slots, so a
    read that raced one of them is merely conservative.
    """
    live = Assignment.objects.filter(task=task, status__in=Assignment.LIVE_STATUSES).order_by()
    rows = list(live.values_list("slot", "status", "lease_expires_at"))
    if any(status == Assignment.Status.ACTIVE and expires <= now for _slot, status, expires in rows):
        live.filter(status=Assignment.Status.ACTIVE, lease_expires_at__lte=now).update(
            status=Assignment.Status.EXPIRED
        )
        rows = list(live.values_list("slot", "status", "lease_expires_at"))
    used = {slot for slot, _status, _expires in rows}
    if task.is_gold:
        return max(used, default=-1) + 1
    return next((slot for slot in range(project.overlap) if slot not in used), None)


def _display_order(*, items: list[TaskCompletion], task: Task, slot: int) -> tuple[list[int], int | None]:
    """The order this person sees the task's completions in, and (A/B) the policy on the left.

    Ranking: a uniformly random permutation. A/B: the side drawn for the task
    when it was made (`ab_left_position`), mirrored for odd slots so that a
    task's votes are balanced too. The draws are a shuffled, balanced sequence
    per pair of policies, so what one person sees is a random sequence of
    sides whichever tasks they get, and nothing here depends on other claims.
    A task made before sides were drawn gets a fresh coin flip.
    """
    positions = {item.position: item.completion.policy_id for item in items}
    if task.project.kind != Project.Kind.AB or sorted(positions) != [0, 1]:
        permutation = sorted(positions)
        _random.shuffle(permutation)
        return permutation, None
    left = task.ab_left_position if task.ab_left_position is not None else _random.randrange(2)
    left ^= slot % 2
    return [left, 1 - left], positions[left]


def _ab_sides_draw(tasks: list[tuple[Task, list[int]]]) -> None:
    """Set `ab_left_position` on unsaved A/B tasks, given each task's policy ids by position.

    For each pair of policies, half of its tasks (the odd one out by a coin)
    show the lower policy id on the left, in a shuffled order.
    """
    groups: dict[tuple[int, ...], list[tuple[Task, list[int]]]] = {}
    for task, policy_ids in tasks:
        groups.setdefault(tuple(sorted(policy_ids)), []).append((task, policy_ids))
    for pair, members in groups.items():
        lower = pair[0]
        lefts = [True, False] * (len(members) // 2) + [bool(_random.randrange(2))] * (len(members) % 2)
        _random.shuffle(lefts)
        for (task, policy_ids), lower_on_left in zip(members, lefts, strict=True):
            task.ab_left_position = 0 if (policy_ids[0] == lower) == lower_on_left else 1


def _lock_task_with_free_slot(
    *, candidates: QuerySet[Task], project: Project, now: datetime
) -> tuple[Task | None, int]:
    """Lock the best candidate that still has a free slot.

    First pass: SKIP LOCKED, so parallel claimers spread over tasks. If every
    candidate was locked, wait for the best one: otherwise people racing for
    the last tasks would be told "nothing left" while slots remain. Waiting on
    a single row, holding no other, cannot deadlock.
    """
    # The prompt comes along (the client shows it); only the task row is locked.
    candidates = candidates.select_related("prompt")
    skipping = candidates.select_for_update(skip_locked=True, no_key=True, of=("self",))
    tried: list[int] = []
    for _attempt in range(_CLAIM_CANDIDATES):
        task = skipping.exclude(pk__in=tried).first()
        if task is None:
            break
        slot = _free_slot(task=task, project=project, now=now)
        if slot is not None:
            return task, slot
        tried.append(task.pk)
    if tried:
        # We hold locks on full tasks; waiting now could deadlock. Rare: try again later.
        return None, 0
    task = candidates.select_for_update(no_key=True, of=("self",)).first()
    if task is not None:
        slot = _free_slot(task=task, project=project, now=now)
        if slot is not None:
            return task, slot
    return None, 0


# Claims of one person lost to their own other tab before one gets through (each loss means that
# tab's claim went through, so a few are plenty).
_CLAIM_RACE_RETRIES = 3


def assignment_claim_next(
    *, project: Project, user: AbstractBaseUser, now: datetime | None = None
) -> Assignment | None:
    """Lease the next task of the project to this person, or None when nothing is left for them.

    1. A person holding a live lease in the project gets that assignment back;
       one whose lease ran out has it expired first. The database holds one
       active lease per person and project, so of two simultaneous claims by
       one person (two tabs) the second fails to insert and returns the
       first's lease.
    2. Candidates: tasks they never had, with a free slot; gold first when
       their gold share is below the project's rate; then in the project's
       task order (fill: most judged first; random; uncertainty), a stored
       order that an index serves.
    3. The candidate row is locked with SKIP LOCKED (PostgreSQL), so parallel
       claims spread over tasks instead of queueing on one; on SQLite the
       IMMEDIATE transaction serializes claims.
    4. Under the lock, stale leases of that task expire and the lowest free
       slot is taken; unique constraints back both rules.
    """
    now = now or timezone.now()
    for _attempt in range(_CLAIM_RACE_RETRIES):
        try:
            return _assignment_claim_next(project=project, user=user, now=now)
        except IntegrityError:
            # Another claim of the same person (a second tab) won the race for
            # "one active lease per person and project". Claiming again returns
            # their lease, or, when that tab has already skipped or submitted
            # it, the next task.
            continue
    return _assignment_claim_next(project=project, user=user, now=now)


def _assignment_claim_next(*, project: Project, user: AbstractBaseUser, now: datetime) -> Assignment | None:
    with transaction.atomic():
        # At most one row: the database allows one active lease per person and project.
        current = Assignment.objects.filter(
            project=project, user=user, status=Assignment.Status.ACTIVE
        ).first()
        if current is not None and current.lease_expires_at > now:
            # Joined here rather than above: most claims find no lease, and the join costs them all.
            current.task = Task.objects.select_related("prompt").get(pk=current.task_id)
            current.task.project = project
            return current
        if current is not None:
            # Their own lease ran out: it gives its slot back before they take another.
            Assignment.objects.filter(pk=current.pk, status=Assignment.Status.ACTIVE).update(
                status=Assignment.Status.EXPIRED
            )
        wants_gold = _wants_gold(project=project, user=user)
        kinds = [True, False] if wants_gold else [False]
        for gold in kinds:
            candidates = _claim_candidates(project=project, user=user, gold=gold, now=now)
            task, slot = _lock_task_with_free_slot(candidates=candidates, project=project, now=now)
            if task is None:
                continue
            # The caller shows the assignment: project, prompt and completions
            # ride along, so showing it costs no further queries.
            task.project = project
            prefetch_related_objects([task], task_items_prefetch())
            permutation, left_policy_id = _display_order(items=list(task.items.all()), task=task, slot=slot)
            return Assignment.objects.create(
                task=task,
                project=project,
                user=user,
                slot=slot,
                permutation=permutation,
                left_policy_id=left_policy_id,
                leased_at=now,
                lease_expires_at=now + timedelta(minutes=project.lease_minutes),
            )
        return None


class AssignmentNotActive(Exception):
    """The assignment was already submitted, skipped or taken over."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def assignment_skip(*, assignment: Assignment, reason: str = "", now: datetime | None = None) -> Assignment:
    """Give the task back: the lease ends now and the person will not be offered it again."""
    now = now or timezone.now()
    reason = reason.strip()[:500]
    changed = Assignment.objects.filter(pk=assignment.pk, status=Assignment.Status.ACTIVE).update(
        status=Assignment.Status.SKIPPED, skip_reason=reason, finished_at=now
    )
    # With what a client shows of it, read in the same query.
    assignment.refresh_from_db(
        from_queryset=Assignment.objects.select_related("task__project", "task__prompt")
    )
    if changed != 1:
        raise AssignmentNotActive(
            assignment.status, f"This assignment is {assignment.status}; it cannot be skipped."
        )
    return assignment


def assignments_expire_stale(*, now: datetime | None = None) -> int:
    """Mark every lapsed lease expired, returning its slot to the pool. Returns how many."""
    now = now or timezone.now()
    return Assignment.objects.filter(status=Assignment.Status.ACTIVE, lease_expires_at__lte=now).update(
        status=Assignment.Status.EXPIRED
    )


# --- judgments and comparisons ----------------------------------------------


class JudgmentInvalid(ValueError):
    """The answer does not fit the task; `errors` maps a field to what is wrong with it."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors.items()))
        self.errors = errors


class LeaseTakenOver(Exception):
    """The lease expired and someone else took the task; the answer was not stored."""


@dataclass(frozen=True)
class JudgmentInput:
    ranks: dict[str, int]
    client_token: str
    likert: dict[str, int] = field(default_factory=dict)
    flags: dict[str, list[str]] = field(default_factory=dict)
    none_acceptable: bool = False
    rationale: str = ""
    active_seconds: float | None = None
    strength: int | None = None  # A/B: 1 slightly, 2 clearly better

    def as_dict(self) -> dict[str, Any]:
        return {
            "ranks": self.ranks,
            "likert": self.likert,
            "flags": self.flags,
            "none_acceptable": self.none_acceptable,
            "rationale": self.rationale,
            "active_seconds": self.active_seconds,
            "strength": self.strength,
            "client_token": self.client_token,
        }


_TOKEN_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
CLIENT_TOKEN_RULE = "must be 1–64 characters of letters, digits, '-' or '_'"  # noqa: S105


def _client_token_valid(token: object) -> bool:
    return isinstance(token, str) and 1 <= len(token) <= 64 and set(token) <= _TOKEN_CHARS


MAX_RATIONALE = 10_000
MAX_ACTIVE_SECONDS = 24 * 3600


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def judgment_validate(*, answer: JudgmentInput, project: Project, uids: list[str]) -> None:
    """Check an answer against the task's completions and the project's rules; raise JudgmentInvalid."""
    errors: dict[str, str] = {}
    k = len(uids)
    expected = set(uids)
    token = answer.client_token
    if not _client_token_valid(token):
        errors["client_token"] = CLIENT_TOKEN_RULE

    ranks = answer.ranks
    if not isinstance(ranks, dict):
        errors["ranks"] = "must be an object mapping each completion id to its rank"
    elif answer.none_acceptable and not ranks:
        pass  # "none acceptable" may come without a ranking
    elif set(ranks) != expected:
        missing, unknown = expected - set(ranks), set(ranks) - expected
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} completion(s): {', '.join(sorted(missing))}")
        if unknown:
            parts.append(f"unknown completion id(s): {', '.join(sorted(map(str, unknown)))}")
        errors["ranks"] = "; ".join(parts)
    elif not all(_is_int(rank) and 1 <= rank <= k for rank in ranks.values()):
        errors["ranks"] = f"every rank must be a whole number from 1 (best) to {k}"
    elif not project.ties_allowed and len(set(ranks.values())) != k:
        errors["ranks"] = "this project does not allow ties: give every completion a different rank"

    likert = answer.likert
    if not isinstance(likert, dict):
        errors["likert"] = "must be an object mapping each completion id to a rating"
    elif (project.likert_enabled and not answer.none_acceptable) or likert:
        if not project.likert_enabled:
            errors["likert"] = "this project does not collect Likert ratings"
        elif set(likert) != expected:
            errors["likert"] = f"rate every completion of the task ({k}), and only those"
        elif not all(_is_int(value) and LIKERT_MIN <= value <= LIKERT_MAX for value in likert.values()):
            errors["likert"] = f"ratings are whole numbers from {LIKERT_MIN} to {LIKERT_MAX}"
        elif "ranks" not in errors and isinstance(ranks, dict) and ranks:
            for a in uids:
                for b in uids:
                    if ranks[a] < ranks[b] and likert[a] < likert[b]:
                        errors["likert"] = (
                            "a completion ranked better cannot have a lower rating than a worse one"
                        )

    flags = answer.flags
    allowed_flags = set(project.flags)
    if not isinstance(flags, dict):
        errors["flags"] = "must be an object mapping completion ids to lists of flags"
    else:
        for uid, names in flags.items():
            if uid not in expected:
                errors["flags"] = f"unknown completion id {uid!r}"
            elif not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                errors["flags"] = "each completion's flags must be a list of flag names"
            elif set(names) - allowed_flags:
                unknown_flags = ", ".join(sorted(set(names) - allowed_flags))
                errors["flags"] = (
                    f"unknown flag(s) {unknown_flags}; this project has: {', '.join(project.flags)}"
                )

    # PostgreSQL text cannot hold NUL; refused here rather than failing the insert.
    if (
        not isinstance(answer.rationale, str)
        or len(answer.rationale) > MAX_RATIONALE
        or "\x00" in answer.rationale
    ):
        errors["rationale"] = f"must be text of at most {MAX_RATIONALE} characters, without NUL characters"
    elif project.rationale_required and not answer.rationale.strip():
        errors["rationale"] = "this project asks for a rationale with every answer"

    if answer.strength is not None:
        if project.kind != Project.Kind.AB:
            errors["strength"] = "only A/B sessions record how much better a response is"
        elif answer.strength not in (1, 2) or isinstance(answer.strength, bool):
            errors["strength"] = "1 (slightly better) or 2 (clearly better)"
        elif answer.none_acceptable or (
            # only valid ranks are hashable whole numbers; bad ones are reported under "ranks"
            "ranks" not in errors and isinstance(ranks, dict) and len(set(ranks.values())) < 2
        ):
            errors["strength"] = "a tie or 'both bad' has no strength"

    seconds = answer.active_seconds
    if seconds is not None and (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or (isinstance(seconds, float) and not math.isfinite(seconds))  # a huge int would overflow float()
        or not 0 <= seconds <= MAX_ACTIVE_SECONDS
    ):
        errors["active_seconds"] = f"must be a number of seconds from 0 to {MAX_ACTIVE_SECONDS}"
    if errors:
        raise JudgmentInvalid(errors)


def comparisons_from_judgment(
    *, judgment: Judgment, items: list[TaskCompletion], likert_margins: bool
) -> list[Comparison]:
    """Every pair (i, j) of the task's completions as an unsaved Comparison.

    Lower rank wins; equal ranks are a tie (kept in position order, no margin).
    The margin is the rank gap, or the Likert gap when the project rates.
    "None acceptable" yields no pairs.
    """
    if judgment.none_acceptable:
        return []
    ranks = judgment.ranks
    comparisons = []
    ordered = sorted(items, key=lambda item: item.position)
    for i, first in enumerate(ordered):
        for second in ordered[i + 1 :]:
            a, b = first.completion, second.completion
            rank_a, rank_b = ranks[str(a.uid)], ranks[str(b.uid)]
            tie = rank_a == rank_b
            chosen, rejected = (a, b) if rank_a <= rank_b else (b, a)
            margin: float | None = None
            if not tie:
                if judgment.strength is not None:
                    margin = float(judgment.strength)
                elif likert_margins:
                    margin = float(judgment.likert[str(chosen.uid)] - judgment.likert[str(rejected.uid)])
                else:
                    margin = float(abs(rank_a - rank_b))
            comparisons.append(
                Comparison(
                    judgment=judgment,
                    project_id=judgment.task.project_id,
                    task_id=judgment.task_id,
                    prompt_id=judgment.task.prompt_id,
                    chosen=chosen,
                    rejected=rejected,
                    is_tie=tie,
                    margin=margin,
                    labeler_id=judgment.user_id,
                    created_at=judgment.created_at,
                    source=judgment.source,
                )
            )
    return comparisons


@dataclass(frozen=True)
class SubmitResult:
    judgment: Judgment
    created: bool
    comparisons: int


def judgment_submit(
    *,
    assignment: Assignment,
    user: AbstractBaseUser,
    answer: JudgmentInput,
    now: datetime | None = None,
    source: str = Source.HUMAN,
) -> SubmitResult:
    """Store a person's answer and its C(K,2) comparisons in one transaction.

    `source` marks a model judge's answer (training.judges submits with
    Source.MODEL through this same path); every page and the API submit as a
    person.

    Idempotent per client token: a retry returns the judgment already stored.
    The lease is re-checked under the task's row lock. An answer after the
    lease ran out is still taken while nobody else holds the slot; once the
    task was taken over it raises LeaseTakenOver and stores nothing.
    """
    now = now or timezone.now()
    if assignment.user_id != user.pk:
        raise AssignmentNotActive("not_yours", "This assignment belongs to someone else.")
    if not _client_token_valid(answer.client_token):
        # Before the lookup below: the database refuses some strings (NUL) outright.
        raise JudgmentInvalid({"client_token": CLIENT_TOKEN_RULE})
    with transaction.atomic():
        # Only the task's row is locked, as claims lock it: that orders this
        # submit with any claim that would expire the lease and hand the slot
        # on. (Locking the joined project row too would queue every submit of
        # the project behind one another.)
        task = (
            Task.objects.select_for_update(no_key=True, of=("self",))
            .select_related("project")
            .get(pk=assignment.task_id)
        )
        project = task.project
        # Looked up under the lock, so a retry sent while the first request is
        # still being stored waits for it and gets its judgment back.
        previous = Judgment.objects.filter(user=user, client_token=answer.client_token).first()
        if previous is not None:
            if previous.assignment_id != assignment.pk:
                raise JudgmentInvalid({"client_token": "already used for another assignment"})
            return SubmitResult(previous, created=False, comparisons=previous.comparisons.count())

        items = list(task.items.select_related("completion").order_by("position"))
        judgment_validate(answer=answer, project=project, uids=[str(item.completion.uid) for item in items])

        # The usual case is one compare-and-set: the lease is still running.
        finished = Assignment.objects.filter(
            pk=assignment.pk, status=Assignment.Status.ACTIVE, lease_expires_at__gt=now
        ).update(status=Assignment.Status.SUBMITTED, finished_at=now)
        if finished != 1:
            _late_submit_check(assignment=assignment, task=task, project=project, now=now)
            Assignment.objects.filter(pk=assignment.pk).update(
                status=Assignment.Status.SUBMITTED, finished_at=now
            )

        judgment = Judgment.objects.create(
            assignment=assignment,
            task=task,
            user=user,
            ranks=answer.ranks,
            likert=answer.likert,
            flags={uid: names for uid, names in answer.flags.items() if names},
            none_acceptable=answer.none_acceptable,
            rationale=answer.rationale.strip(),
            active_seconds=answer.active_seconds,
            strength=answer.strength,
            client_token=answer.client_token,
            source=source,
        )
        comparisons = Comparison.objects.bulk_create(
            comparisons_from_judgment(judgment=judgment, items=items, likert_margins=project.likert_enabled)
        )
        Task.objects.filter(pk=task.pk).update(judgment_count=F("judgment_count") + 1)
        webhook_event_publish(
            project_id=project.pk,
            event=Webhook.Event.JUDGMENT_SUBMITTED,
            data=judgment_webhook_data(judgment=judgment, task=task, comparisons=len(comparisons)),
            now=now,
        )
        # What the row now holds, without reading it back: it is locked, and these are our writes.
        assignment.status = Assignment.Status.SUBMITTED
        assignment.finished_at = now
        # The project's statistics are recomputed off the request path (annotation.snapshots).
        project_id = project.pk
        transaction.on_commit(lambda: stats_refresh_request(project_id=project_id))
        return SubmitResult(judgment, created=True, comparisons=len(comparisons))


def _late_submit_check(*, assignment: Assignment, task: Task, project: Project, now: datetime) -> None:
    """Under the task's lock, for an assignment whose lease is not running: may its answer still be stored?

    Raises AssignmentNotActive when it was submitted or skipped already, and
    LeaseTakenOver when someone else holds its slot or the task is full.
    """
    locked = Assignment.objects.select_for_update(no_key=True).get(pk=assignment.pk)
    if locked.status == Assignment.Status.SUBMITTED:
        raise AssignmentNotActive("submitted", "This task was already answered with another submission.")
    if locked.status == Assignment.Status.SKIPPED:
        raise AssignmentNotActive("skipped", "This task was skipped; the answer was not stored.")
    others = Assignment.objects.filter(_live_assignments(now), task=task).exclude(pk=locked.pk)
    taken_over = others.filter(slot=locked.slot).exists() or (
        not task.is_gold and others.count() >= project.overlap
    )
    if taken_over:
        raise LeaseTakenOver("Your lease ran out and another person took over this task.")


# --- A/B sessions -------------------------------------------------------------


class MissingOutputs(ValueError):
    """Some policy has no completion for some prompt: generate them before the session starts."""

    def __init__(self, missing: list[tuple[Policy, Prompt]]) -> None:
        shown = ", ".join(f"{policy} on {prompt}" for policy, prompt in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        super().__init__(f"{len(missing)} output(s) missing: {shown}{more}")
        self.missing = missing


def ab_outputs_missing(*, policies: list[Policy], prompts: list[Prompt]) -> list[tuple[Policy, Prompt]]:
    """The (policy, prompt) pairs without a completion, in prompt then policy order."""
    have = set(
        Completion.objects.filter(prompt__in=prompts, policy__in=policies).values_list(
            "policy_id", "prompt_id"
        )
    )
    return [
        (policy, prompt) for prompt in prompts for policy in policies if (policy.pk, prompt.pk) not in have
    ]


@transaction.atomic
def ab_session_create(
    *,
    name: str,
    policies: list[Policy],
    prompts: list[Prompt],
    votes_per_pair: int,
    created_by: AbstractBaseUser,
    instructions: str = "",
    outputs_missing_allowed: bool = False,
) -> Project:
    """A blind A/B session comparing the policies on the prompts.

    1. A new `ab` project (K=2, overlap = votes per pair) gets a copy of each
       prompt and of each policy's first completion of it: the session's
       own storage, so nothing it does (generating, pairing) ever touches the
       source project, and the session is frozen.
    2. When every policy has a completion for every prompt, the session
       opens at once (ab_session_open). Otherwise MissingOutputs lists the
       gaps and nothing is made, unless `outputs_missing_allowed`: then the
       session waits closed, without tasks, for generation jobs on its own
       prompts to fill them, and opens when the last one is written.
    """
    if len({policy.pk for policy in policies}) < 2:
        raise ValueError("an A/B session needs at least two different policies")
    if not prompts:
        raise ValueError("an A/B session needs at least one prompt")
    missing = ab_outputs_missing(policies=policies, prompts=prompts)
    if missing and not outputs_missing_allowed:
        raise MissingOutputs(missing)
    project = Project.objects.create(
        name=name,
        kind=Project.Kind.AB,
        k=2,
        overlap=votes_per_pair,
        ties_allowed=True,
        instructions=instructions,
        created_by=created_by,
    )
    Membership.objects.create(project=project, user=created_by, role=Role.MANAGER)
    project.ab_policies.set(policies)
    project.policies.add(*policies)  # a policy belongs to every project it is used in
    chosen: dict[tuple[int, int], Completion] = {}
    for completion in Completion.objects.filter(prompt__in=prompts, policy__in=policies).order_by("id"):
        chosen.setdefault((completion.policy_id, completion.prompt_id), completion)
    copies: list[Completion] = []
    for source in prompts:
        prompt = prompt_copy(source=source, project=project)
        prompt.save()
        copies += [
            Completion(
                prompt=prompt,
                policy_id=original.policy_id,
                text=original.text,
                generation_settings={**original.generation_settings, "copied_from": str(original.uid)},
            )
            for policy in policies
            if (original := chosen.get((policy.pk, source.pk))) is not None
        ]
    Completion.objects.bulk_create(copies)
    ab_session_open(project=project)
    project.refresh_from_db()
    return project


def prompt_copy(*, source: Prompt, project: Project) -> Prompt:
    """An unsaved copy of `source` (text or messages, external id, metadata, hash) for `project`."""
    return Prompt(
        project=project,
        external_id=source.external_id,
        text=source.text,
        messages=source.messages,
        metadata=source.metadata,
        content_hash=source.content_hash,
    )


@transaction.atomic
def ab_session_open(*, project: Project) -> bool:
    """Make the session's pairs once every policy has answered every prompt; True if this call opened it.

    Called when a session is made and whenever a generation job for it
    finishes; the session's row lock makes two finishing jobs open it once.

    1. Prompt i (in id order, which is the source's order) is judged on pair
       i mod C(P,2) of the policies (round robin, so every pair gets the same
       share of prompts); the two completions' task positions alternate
       between a pair's prompts.
    2. Which side each is shown on is drawn now, balanced per pair and
       shuffled (_ab_sides_draw), and mirrored for every second vote on a
       task (_display_order).
    3. A prompt on which the pair wrote the same text (completion_text_key)
       gets no task.
    """
    session = (
        Project.objects.select_for_update()
        .filter(pk=project.pk, kind=Project.Kind.AB, opened_at__isnull=True)
        .first()
    )
    if session is None:
        return False
    policies = sorted(session.ab_policies.all(), key=lambda policy: policy.pk)
    prompts = list(session.prompts.order_by("id"))
    chosen: dict[tuple[int, int], Completion] = {}
    for completion in Completion.objects.filter(prompt__in=prompts, policy__in=policies).order_by("id"):
        chosen.setdefault((completion.policy_id, completion.prompt_id), completion)
    if len(policies) < 2 or any(
        (policy.pk, prompt.pk) not in chosen for prompt in prompts for policy in policies
    ):
        return False
    pairs = list(itertools.combinations(policies, 2))
    uses: dict[tuple[int, int], int] = {}
    planned: list[tuple[Task, list[int]]] = []
    for index, prompt in enumerate(prompts):
        first, second = pairs[index % len(pairs)]
        key = (first.pk, second.pk)
        uses[key] = uses.get(key, 0) + 1
        if uses[key] % 2 == 0:
            first, second = second, first
        texts = {completion_text_key(chosen[(policy.pk, prompt.pk)].text) for policy in (first, second)}
        if len(texts) == 1:
            continue
        planned.append((Task(project=session, prompt=prompt), [first.pk, second.pk]))
    _ab_sides_draw(planned)
    for task, policy_ids in planned:
        task.save()
        TaskCompletion.objects.bulk_create(
            TaskCompletion(task=task, completion=chosen[(policy_id, task.prompt_id)], position=position)
            for position, policy_id in enumerate(policy_ids)
        )
    Project.objects.filter(pk=session.pk).update(opened_at=timezone.now())
    return True
