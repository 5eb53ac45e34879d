"""The human side's data: projects, prompts, completions, tasks, assignments,
judgments and the pairwise comparisons derived from them.

Invariants live in database constraints as well as in the services, so a bug
or a race in Python cannot store a second assignment of a task to a person, a
second judgment of an assignment, or more live assignments than a task has
slots.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from annotation.roles import Role

MIN_K = 2
MAX_K = 9  # digits 1..9 rank on the keyboard
LIKERT_MIN = 1
LIKERT_MAX = 7


class Project(models.Model):
    class Kind(models.TextChoices):
        RANKING = "ranking", _("Ranking")
        AB = "ab", _("Blind A/B")

    class TaskOrder(models.TextChoices):
        # Which open task a person is served next (the claim reads a stored order, never computes one).
        FILL = "fill", _("Fill: nearest to done first")
        RANDOM = "random", _("Random")
        UNCERTAINTY = "uncertainty", _("Uncertainty: where the latest reward model is least sure")
        DISAGREEMENT = "disagreement", _("Disagreement: where the newest reward models disagree most")

    name = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.RANKING)
    instructions = models.TextField(blank=True, help_text=_("Markdown, shown to every labeler."))
    k = models.PositiveSmallIntegerField(
        "K", default=4, help_text=_("Completions judged together in one task (2–9; 2 for A/B).")
    )
    overlap = models.PositiveSmallIntegerField(default=1, help_text=_("Judgments wanted per task."))
    ties_allowed = models.BooleanField(default=True)
    likert_enabled = models.BooleanField(
        default=False, help_text=_("Ask for a 1–7 rating of each completion.")
    )
    flags = models.JSONField(
        default=list, blank=True, help_text=_("Flags a labeler may put on a completion, e.g. harmful.")
    )
    rationale_required = models.BooleanField(default=False)
    lease_minutes = models.PositiveIntegerField(default=30)
    gold_rate = models.FloatField(default=0.0, help_text=_("Share of tasks shown that are gold (0–1)."))
    gold_feedback = models.BooleanField(
        default=False,
        help_text=_("Right after a labeler submits a gold task, show them the expected ranking."),
    )
    task_order = models.CharField(
        max_length=16,
        choices=TaskOrder.choices,
        default=TaskOrder.FILL,
        help_text=_(
            "Uncertainty needs a reward model scoring the project (its scoring page); "
            "tasks it has not scored come last, in random order."
        ),
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, through="Membership", related_name="projects")
    # A/B sessions only: the policies compared, and when the pairs were made.
    # A session whose outputs are still being generated (into its own prompts)
    # has no tasks and no opened_at; it opens when the last output is written.
    ab_policies = models.ManyToManyField("Policy", blank=True, related_name="ab_sessions")
    opened_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(k__gte=MIN_K, k__lte=MAX_K), name="project_k_between_2_and_9"),
            models.CheckConstraint(condition=~Q(kind="ab") | Q(k=2), name="project_ab_has_k_2"),
            models.CheckConstraint(condition=Q(overlap__gte=1), name="project_overlap_at_least_1"),
            models.CheckConstraint(condition=Q(lease_minutes__gte=1), name="project_lease_at_least_1_minute"),
            models.CheckConstraint(
                condition=Q(gold_rate__gte=0, gold_rate__lte=1), name="project_gold_rate_0_1"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    """A person's role in one project. A person may hold several roles in it."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "user", "role"], name="membership_unique_role"),
        ]

    def __str__(self) -> str:
        return f"{self.user} — {self.role} in {self.project}"


class Policy(models.Model):
    """Something that writes completions: a model, or an imported source."""

    class Kind(models.TextChoices):
        MODEL = "model", _("Model")
        IMPORTED = "imported", _("Imported")
        BEST_OF_N = "best_of_n", _("Best-of-n")

    name = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.MODEL)
    base_model = models.CharField(max_length=500, blank=True, help_text=_("Local path or hub id."))
    adapter = models.CharField(max_length=500, blank=True, help_text=_("PEFT adapter path, if any."))
    generation_settings = models.JSONField(default=dict, blank=True)
    # The projects the policy belongs to: registered for, used in (imports, generation jobs,
    # A/B sessions), or whose build trained it. A manager sees and uses only policies of a
    # project they manage (training.policies.policies_for_user); one with none, a superuser only.
    projects = models.ManyToManyField(
        "Project",
        blank=True,
        related_name="policies",
        verbose_name=_("projects"),
        help_text=_("The projects whose managers may see and use this policy."),
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "policies"
        ordering = ["name"]

    def __str__(self) -> str:
        return f"imported:{self.name}" if self.kind == self.Kind.IMPORTED else self.name


class Prompt(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="prompts")
    external_id = models.CharField(max_length=200, blank=True)
    text = models.TextField(blank=True, help_text=_("The prompt as text (empty for a chat prompt)."))
    messages = models.JSONField(null=True, blank=True, help_text=_("Chat turns: [{role, content}, …]."))
    metadata = models.JSONField(default=dict, blank=True)
    # sha256 of the canonical prompt: exact duplicates are found by index.
    content_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["project", "content_hash"], name="prompt_unique_content"),
            models.UniqueConstraint(
                fields=["project", "external_id"],
                condition=~Q(external_id=""),
                name="prompt_unique_external_id",
            ),
            models.CheckConstraint(
                condition=(~Q(text="") & Q(messages__isnull=True)) | (Q(text="") & Q(messages__isnull=False)),
                name="prompt_text_xor_messages",
            ),
        ]

    def __str__(self) -> str:
        return self.external_id or f"prompt {self.pk}"

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


class Completion(models.Model):
    # Clients and pages refer to completions by this id, never by the row id.
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="completions")
    policy = models.ForeignKey(Policy, on_delete=models.PROTECT, related_name="completions")
    text = models.TextField()
    generation_settings = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.policy} on {self.prompt}"


def random_rank_draw() -> float:
    """A task's place in its project's random order: uniform in [0, 1)."""
    return random.random()  # noqa: S311 (an order to serve tasks in, not a secret)


class Task(models.Model):
    """A prompt and the completions judged together: K for ranking, 2 for A/B."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="tasks")
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="tasks")
    completions = models.ManyToManyField(Completion, through="TaskCompletion", related_name="tasks")
    is_gold = models.BooleanField(default=False)
    # The known answer of a gold task: rank per completion, in TaskCompletion.position order.
    gold_ranks = models.JSONField(null=True, blank=True)
    # Judgments stored so far; written under the task's row lock at submit.
    judgment_count = models.PositiveIntegerField(default=0)
    # A/B only: the position shown on the left to the task's even slots (odd
    # slots see it on the right). Drawn when the task is made, balanced per
    # pair of policies over the session and shuffled, so the sides a person
    # sees form a random sequence instead of reacting to earlier claims.
    ab_left_position = models.PositiveSmallIntegerField(null=True, blank=True)
    # The task's place in the project's random order, drawn when it is made.
    random_rank = models.FloatField(default=random_rank_draw)
    # How unsure the latest reward model scoring the project is about this
    # task: how well its scores separate the completions over all pairs,
    # 1 − 4 × the mean Bradley–Terry p(1 − p) (0 to 1, lower is less sure;
    # annotation.services.tasks_uncertainty_refresh); None until a scoring
    # job has scored all of them.
    uncertainty = models.FloatField(null=True, blank=True)
    # The task's place in the disagreement order (lower first), stored with `uncertainty` by the
    # same refresh: minus how far the newest reward models disagree on its ranking (0 to 1), then
    # the newest model's separation (as in `uncertainty`); only that separation while no other
    # scored it; None as above.
    disagreement = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        # Matches the claim's ORDER BY (most judged first, then id), so a claim
        # reads the index in order and stops at the first free task instead of
        # sorting every open task of the project.
        indexes = [
            models.Index(fields=["project", "is_gold", "-judgment_count", "id"], name="task_claim_order"),
            # The same for the random and uncertainty orders (PostgreSQL sorts NULLs last in an
            # ascending index, as the claim asks: unscored tasks come after scored ones).
            models.Index(fields=["project", "is_gold", "random_rank"], name="task_claim_random"),
            models.Index(
                fields=["project", "is_gold", "uncertainty", "random_rank"], name="task_claim_uncertainty"
            ),
            models.Index(
                fields=["project", "is_gold", "disagreement", "random_rank"], name="task_claim_disagreement"
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(is_gold=False) | Q(gold_ranks__isnull=False), name="task_gold_has_ranks"
            ),
        ]

    def __str__(self) -> str:
        return f"task {self.pk} ({self.project})"


class TaskCompletion(models.Model):
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="items")
    completion = models.ForeignKey(Completion, on_delete=models.CASCADE, related_name="+")
    position = models.PositiveSmallIntegerField()

    class Meta:
        ordering = ["task", "position"]
        constraints = [
            models.UniqueConstraint(fields=["task", "position"], name="taskcompletion_unique_position"),
            models.UniqueConstraint(fields=["task", "completion"], name="taskcompletion_unique_completion"),
        ]

    def __str__(self) -> str:
        return f"task {self.task_id} position {self.position}"


class Assignment(models.Model):
    """A task leased to one person.

    `slot` numbers the task's judgments-in-progress and done (0 … overlap−1);
    a partial unique constraint lets only one live assignment hold a slot, so
    two racing claims can never put more people on a task than it needs.
    """

    class Status(models.TextChoices):
        ACTIVE = "active", _("Active")
        SUBMITTED = "submitted", _("Submitted")
        SKIPPED = "skipped", _("Skipped")
        EXPIRED = "expired", _("Expired")
        # Its judgment was rejected in review: the slot is free for someone else.
        REJECTED = "rejected", _("Rejected in review")

    LIVE_STATUSES = (Status.ACTIVE, Status.SUBMITTED)

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="assignments")
    # The task's project, copied so that "one active lease per person and
    # project" can be a database constraint (a constraint cannot follow a join).
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="assignments")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    slot = models.PositiveSmallIntegerField()
    # Display order for this person: positions of the task's completions, e.g. [2, 0, 3, 1].
    permutation = models.JSONField()
    leased_at = models.DateTimeField()
    lease_expires_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    skip_reason = models.CharField(max_length=500, blank=True)
    # A/B only, never sent to a client: which policy was shown on the left, so
    # sides can be balanced per policy and position bias measured.
    left_policy = models.ForeignKey(
        "Policy", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-leased_at", "-id"]
        indexes = [
            models.Index(fields=["user", "status"]),
            models.Index(fields=["status", "lease_expires_at"]),
            models.Index(fields=["left_policy"]),
        ]
        constraints = [
            models.UniqueConstraint(fields=["task", "user"], name="assignment_one_per_person_and_task"),
            models.UniqueConstraint(
                fields=["task", "slot"],
                condition=Q(status__in=["active", "submitted"]),
                name="assignment_one_live_per_slot",
            ),
            # Two tabs claiming at once must not both hold a lease; the claim
            # looks the person's lease up through this index too.
            models.UniqueConstraint(
                fields=["user", "project"],
                condition=Q(status="active"),
                name="assignment_one_active_per_person_and_project",
            ),
        ]

    def __str__(self) -> str:
        return f"assignment {self.pk}: {self.user} on task {self.task_id}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.project_id is None and self.task_id is not None:
            self.project_id = Task.objects.values_list("project_id", flat=True).get(pk=self.task_id)
        super().save(*args, **kwargs)


class QueueCounter(models.Model):
    """How many tasks of a project a person has been shown, and how many of those were gold.

    What the claim needs to keep a person's gold share at the project's rate,
    without counting their past assignments on every claim. Skipped
    assignments do not count. The database keeps the numbers: triggers on the
    assignment table (annotation.counters) update this row in the same
    transaction as the claim, the skip or the deletion that changes them, so
    no writer can forget it. Read-only from Python.
    """

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    # Plain integers: a check constraint here could only turn a miscount into a failed skip.
    shown = models.IntegerField(default=0)
    shown_gold = models.IntegerField(default=0)

    class Meta:
        constraints = [
            # The triggers' upsert conflicts on this.
            models.UniqueConstraint(fields=["project", "user"], name="queuecounter_one_per_person"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in project {self.project_id}: {self.shown_gold}/{self.shown} gold"


class Source(models.TextChoices):
    """Who gave a judgment (and its comparisons): a person, or a model judge working as a labeler account."""

    HUMAN = "human", _("Human")
    MODEL = "model", _("Model judge")


class Judgment(models.Model):
    """A person's answer to one assignment. Ranks: 1 is best; equal numbers are a tie."""

    class Review(models.TextChoices):
        PENDING = "pending", _("Not reviewed")
        ACCEPTED = "accepted", _("Accepted")
        # Kept for audit; its comparisons are left out of every dataset build.
        REJECTED = "rejected", _("Rejected")

    assignment = models.OneToOneField(Assignment, on_delete=models.CASCADE, related_name="judgment")
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="judgments")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="judgments")
    # Keyed by completion uid (str) -> value.
    ranks = models.JSONField(default=dict)
    likert = models.JSONField(default=dict, blank=True)
    flags = models.JSONField(default=dict, blank=True)
    none_acceptable = models.BooleanField(default=False)
    rationale = models.TextField(blank=True)
    active_seconds = models.FloatField(null=True, blank=True)
    # A/B only: 1 = slightly better, 2 = clearly better; kept as the comparison's margin.
    strength = models.PositiveSmallIntegerField(null=True, blank=True)
    # Chosen by the client per answer: a retried submit with the same token is the same judgment.
    client_token = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    review = models.CharField(max_length=16, choices=Review.choices, default=Review.PENDING)
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    review_reason = models.TextField(blank=True)
    # 1 when submitted; each revision by its labeler (allowed until it is reviewed) adds one.
    version = models.PositiveIntegerField(default=1)
    # A model judge's answers are marked (training.judges); builds choose whether to read them.
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.HUMAN)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["user", "client_token"], name="judgment_unique_client_token"),
            models.CheckConstraint(
                condition=Q(strength__isnull=True) | Q(strength__in=[1, 2]), name="judgment_strength_1_or_2"
            ),
        ]

    def __str__(self) -> str:
        return f"judgment {self.pk} by {self.user}"


class Comparison(models.Model):
    """One pair out of a judgment: chosen over rejected, or a tie.

    For a tie, `chosen`/`rejected` hold the pair in task position order and
    carry no preference. `margin` is the rank gap, or the Likert gap when the
    project collects Likert ratings; None for a tie.
    """

    judgment = models.ForeignKey(Judgment, on_delete=models.CASCADE, related_name="comparisons")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="comparisons")
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="comparisons")
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="comparisons")
    chosen = models.ForeignKey(Completion, on_delete=models.CASCADE, related_name="+")
    rejected = models.ForeignKey(Completion, on_delete=models.CASCADE, related_name="+")
    is_tie = models.BooleanField(default=False)
    margin = models.FloatField(null=True, blank=True)
    labeler = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="comparisons"
    )
    created_at = models.DateTimeField()
    # The judgment's source, kept on each pair so builds and exports filter without a join.
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.HUMAN)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["project", "created_at"])]
        constraints = [
            models.CheckConstraint(
                condition=~Q(chosen=models.F("rejected")), name="comparison_two_completions"
            ),
            models.UniqueConstraint(fields=["judgment", "chosen", "rejected"], name="comparison_unique_pair"),
        ]

    def __str__(self) -> str:
        sign = "=" if self.is_tie else ">"
        return f"{self.chosen_id} {sign} {self.rejected_id}"


class CompletionScore(models.Model):
    """A number a scorer gave a completion, e.g. a reward model's reward; read by the A/B results.

    Why here, and why the scorer is a label rather than a foreign key: the
    results page belongs to the human side, which must never import
    `training` (DESIGN.md: training → annotation, never back). The training
    side writes these rows; this side only needs to tell scorers apart and
    name them ("reward model: rm-12"), so a plain label keeps the dependency
    one-way and leaves room for scorers that are no reward model at all.
    A renamed reward model gets a new label on its next scoring.

    Scores are for managers only: nothing an evaluator can fetch reads them.
    """

    completion = models.ForeignKey(Completion, on_delete=models.CASCADE, related_name="scores")
    scorer = models.CharField(max_length=300)
    score = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["completion", "scorer"]
        constraints = [
            models.UniqueConstraint(fields=["completion", "scorer"], name="completionscore_one_per_scorer"),
        ]

    def __str__(self) -> str:
        return f"{self.scorer}: {self.score:.4g} for completion {self.completion_id}"


class LabelerReliability(models.Model):
    """How reliable a labeler is in a project, as a labeler-aware aggregation estimated it from the votes.

    Written when a dataset build aggregates with Dawid–Skene (the newest build
    that covered the project replaces the row); the dashboard shows it beside
    gold accuracy and agreement.
    """

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    # The chance the labeler names a pair's true outcome (0–1).
    reliability = models.FloatField()
    votes = models.PositiveIntegerField()
    # Which estimate it is, for people: e.g. "Dawid–Skene, dataset build 12".
    source = models.CharField(max_length=200)
    computed_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "user"], name="labelerreliability_one_per_person"),
            models.CheckConstraint(
                condition=Q(reliability__gte=0, reliability__lte=1), name="labelerreliability_0_1"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.project}: {self.reliability:.2f}"


class StatsSnapshot(models.Model):
    """A project's statistics as a background task last computed them (annotation.stats).

    Pages and the stats API read this row instead of loading the whole project
    on every request. `refresh_requested_at` is the debounce flag: set when new
    judgments ask for a refresh and a task is scheduled, cleared when the task
    starts, so one refresh is in flight per project and kind.
    """

    class Kind(models.TextChoices):
        PROJECT = "project", _("Project statistics")
        AB = "ab", _("A/B results")

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    payload = models.JSONField(default=dict)
    computed_at = models.DateTimeField()
    # Submitted judgments the payload was computed from.
    judgments_seen = models.PositiveIntegerField(default=0)
    # Seconds the computation took, shown to managers and printed by bench/read_path.py.
    compute_seconds = models.FloatField(default=0.0)
    refresh_requested_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "kind"], name="statssnapshot_one_per_kind"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} of {self.project} at {self.computed_at:%Y-%m-%d %H:%M}"


class Notice(models.Model):
    """An in-app notice to one person: a job they started, or one in a project they manage, ended.

    The job is named by kind and id rather than a foreign key: jobs live in
    `training`, which this app never depends on (DESIGN.md). The text is
    written when the notice is shown, in the reader's language.
    """

    class Kind(models.TextChoices):
        RUN = "run", _("Training run")
        BUILD = "build", _("Dataset build")
        GENERATION = "generation", _("Generation job")
        SCORING = "scoring", _("Scoring job")

    class Outcome(models.TextChoices):
        SUCCEEDED = "succeeded", _("succeeded")
        FAILED = "failed", _("failed")
        CANCELLED = "cancelled", _("cancelled")

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notices")
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    object_id = models.PositiveBigIntegerField()
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    title = models.CharField(max_length=300)
    url = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    read_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # A job ends once: a second call for the same end (a retried task, a reaper) adds nothing.
            models.UniqueConstraint(
                fields=["user", "kind", "object_id"], name="notice_one_per_job_and_person"
            ),
        ]
        indexes = [
            # The navigation counts a person's unread notices on every page.
            models.Index(fields=["user"], condition=Q(read_at__isnull=True), name="notice_unread_by_user"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.title} {self.outcome} (for {self.user})"


class Webhook(models.Model):
    """A project's outgoing webhook: signed JSON POSTed to `url` for the events it chose."""

    class Event(models.TextChoices):
        JUDGMENT_SUBMITTED = "judgment.submitted", _("Judgment submitted")
        BUILD_FINISHED = "build.finished", _("Dataset build finished")
        RUN_FINISHED = "run.finished", _("Training run finished")

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="webhooks")
    url = models.URLField(_("URL"), max_length=500, help_text=_("Where each event is POSTed as JSON."))
    secret = models.CharField(
        _("secret"),
        max_length=200,
        help_text=_("Signs every delivery (HMAC-SHA256); the receiver checks the signature with it."),
    )
    events = models.JSONField(_("events"), default=list, help_text=_("The events sent to this address."))
    active = models.BooleanField(_("active"), default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["project", "id"]
        verbose_name = _("webhook")
        verbose_name_plural = _("webhooks")

    def __str__(self) -> str:
        return f"{self.url} ({self.project})"


class WebhookDelivery(models.Model):
    """One event on its way to one webhook: the outbox row and the delivery log in one.

    Written in the transaction of the event itself, so an event is never lost
    between the database and the broker: the task that posts it is published
    on commit, and rows whose task never ran are published again by a sweep.
    """

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=64, choices=Webhook.Event.choices)
    payload = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)
    attempts = models.PositiveIntegerField(default=0)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    gave_up_at = models.DateTimeField(null=True, blank=True)
    # When the next attempt is due, when a task for it was last handed to the
    # broker (None: never, e.g. Redis was down), and until when an attempt in
    # progress holds the row.
    next_attempt_at = models.DateTimeField()
    published_at = models.DateTimeField(null=True, blank=True)
    leased_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = _("webhook delivery")
        verbose_name_plural = _("webhook deliveries")
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(delivered_at__isnull=True, gave_up_at__isnull=True),
                name="webhookdelivery_pending",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event} to {self.webhook.url} ({self.attempts} attempts)"
