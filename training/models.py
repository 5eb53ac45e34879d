"""The machine side's data: dataset builds (frozen, reproducible exports of
comparisons), training runs, and the reward models they register.

Only Django is imported here: the web process loads this module.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import F, Q
from django.utils.deconstruct import deconstructible
from django.utils.translation import gettext_lazy as _

from annotation.models import Policy, Project
from config.storage import storage_path_resolve

# `attempts` counts claims and never goes down: it is the fencing token every
# write of an attempt is checked against. A job stopped on purpose (SIGTERM:
# a time limit, a worker shutting down) gets its attempt back here instead,
# so the cap (TRAINING_MAX_ATTEMPTS) counts only attempts that failed.
ATTEMPTS_GIVEN_BACK_HELP = _(
    "Attempts stopped by a signal (time limit, worker shutdown); they do not count against the cap."
)
NEAR_DUPLICATE_THRESHOLD_MIN = 0.5  # below it MinHash banding (42 bands × 3 rows) proposes too many pairs


@deconstructible
class RangeValidator:
    """A number in [low, high] (or [low, high) without `high_included`), with a message for the field.

    The check constraints below hold the same rules in the database; this puts
    the message on the field in forms and the API.
    """

    def __init__(self, low: float, high: float, message: str, *, high_included: bool = True) -> None:
        self.low = low
        self.high = high
        self.message = message
        self.high_included = high_included

    def __call__(self, value: float | None) -> None:
        if value is None:
            return
        if not self.low <= value <= self.high or (not self.high_included and value == self.high):
            raise ValidationError(self.message, code="out_of_range")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeValidator) and (
            self.low,
            self.high,
            self.message,
            self.high_included,
        ) == (other.low, other.high, other.message, other.high_included)

    def __hash__(self) -> int:
        return hash((self.low, self.high, str(self.message), self.high_included))


class Job(models.Model):
    """What every background job's row holds for its lifecycle (training.services.jobs): the status,
    when it started and finished, and why it failed. Dataset builds are jobs; GPU jobs add attempts.

    Transitions are compare-and-set: queued → running → succeeded | failed |
    cancelled. Each kind says how far it is as `progress`, a fraction from 0 to 1.
    """

    class Status(models.TextChoices):
        QUEUED = "queued", _("Queued")
        RUNNING = "running", _("Running")
        SUCCEEDED = "succeeded", _("Succeeded")
        FAILED = "failed", _("Failed")
        CANCELLED = "cancelled", _("Cancelled")

    TERMINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
    LIVE = (Status.QUEUED, Status.RUNNING)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        abstract = True

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class GpuJob(Job):
    """A job whose attempts run as a process group on a GPU worker (training runs, generation and
    scoring jobs): each claim is an attempt more, and every write after it is fenced by
    (id, attempt, running); a live attempt heartbeats, and a cancel is asked for, then honoured."""

    attempts = models.PositiveSmallIntegerField(default=0)
    attempts_given_back = models.PositiveSmallIntegerField(default=0, help_text=ATTEMPTS_GIVEN_BACK_HELP)
    cancel_requested = models.BooleanField(default=False)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    log_tail = models.TextField(blank=True)

    class Meta:
        abstract = True


class DatasetBuild(Job):
    """A build of TRL-ready preference datasets from the comparisons of some projects.

    The options below are the build's whole input besides the database: the
    same options over the same comparisons write the same bytes. The row, not
    Celery, is the source of truth for the build's state; `training.builds`
    documents every rule and the files it writes.
    """

    # The name the build pages and tests use for `TERMINAL` (a build is not cancelled today).
    FINISHED_STATUSES = Job.TERMINAL

    class Aggregation(models.TextChoices):
        EVERY_VOTE = "every_vote", _("Every vote (one row per comparison)")
        MAJORITY = "majority", _("Majority (one row per prompt and pair)")
        DAWID_SKENE = (
            "dawid_skene",
            _("Dawid–Skene: majority weighted by each labeler's estimated reliability"),
        )

    class Ties(models.TextChoices):
        DROP = "drop", _("Drop ties")
        KEEP = "keep", _("Keep ties (flagged rows; never in TRL files)")

    class Margin(models.TextChoices):
        NONE = "none", _("No margin")
        RANK_GAP = "rank_gap", _("Rank gap")
        LIKERT_GAP = "likert_gap", _("Likert gap")

    class Format(models.TextChoices):
        STANDARD = "standard", _("Standard (strings)")
        CONVERSATIONAL = "conversational", _("Conversational (messages)")

    class Sources(models.TextChoices):
        HUMANS = "humans", _("Humans only")
        HUMANS_AND_MODELS = "humans_and_models", _("Humans and model judges")
        CALIBRATED_MODELS = (
            "calibrated_models",
            _("Humans, and model judges whose agreement with humans reaches the threshold"),
        )

    name = models.CharField(max_length=200)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    # --- which comparisons ---------------------------------------------------
    projects = models.ManyToManyField(Project, related_name="dataset_builds")
    date_from = models.DateField(
        null=True, blank=True, help_text=_("First day of comparisons to include (inclusive).")
    )
    date_to = models.DateField(
        null=True, blank=True, help_text=_("Last day of comparisons to include (inclusive).")
    )
    labelers = models.ManyToManyField(
        settings.AUTH_USER_MODEL,
        blank=True,
        related_name="+",
        help_text=_("Only these people's judgments; none selected means everyone's."),
    )
    min_gold_accuracy = models.FloatField(
        null=True,
        blank=True,
        validators=[RangeValidator(0, 1, _("The minimum gold accuracy is a fraction from 0 to 1."))],
        help_text=_("Leave out people whose gold accuracy in a project is below this (0–1)."),
    )
    exclude_flagged = models.BooleanField(
        default=False, help_text=_("Drop pairs where the judge flagged either completion.")
    )

    # --- how they become rows ------------------------------------------------
    aggregation = models.CharField(max_length=16, choices=Aggregation.choices, default=Aggregation.EVERY_VOTE)
    agreement_threshold = models.FloatField(
        default=0.5,
        validators=[RangeValidator(0, 1, _("The agreement threshold is a fraction from 0 to 1."))],
        help_text=_("Majority only: the winning outcome's share of the votes needed (0–1)."),
    )
    ties = models.CharField(max_length=8, choices=Ties.choices, default=Ties.DROP)
    margin = models.CharField(max_length=16, choices=Margin.choices, default=Margin.NONE)
    format = models.CharField(max_length=16, choices=Format.choices, default=Format.STANDARD)
    sources = models.CharField(
        _("judgments from"),
        max_length=20,
        choices=Sources.choices,
        default=Sources.HUMANS,
        help_text=_("Model judges (training.judges) label like people; choose whether their votes are data."),
    )
    judge_agreement_min = models.FloatField(
        _("minimum judge agreement with humans"),
        default=0.7,
        validators=[RangeValidator(0, 1, _("The minimum judge agreement is a fraction from 0 to 1."))],
        help_text=_(
            "Calibrated judges only: a judge's votes are read when it agrees with the humans' majority on "
            "at least this share of the pairs both judged (0–1)."
        ),
    )
    sft_in_preferences = models.BooleanField(
        _("SFT prompts also in the preference rows"),
        default=True,
        help_text=_(
            "On: SFT rows and preference rows come from the same prompts (overlap is known to help DPO). "
            "Off: each training prompt gives SFT rows or preference rows, half and half."
        ),
    )

    # --- split ---------------------------------------------------------------
    test_fraction = models.FloatField(
        default=0.1,
        validators=[
            RangeValidator(0, 1, _("The test fraction must be at least 0 and below 1."), high_included=False)
        ],
        help_text=_("Share of prompts held out (0 ≤ x < 1)."),
    )
    seed = models.PositiveIntegerField(default=0)
    near_duplicate_threshold = models.FloatField(
        default=0.6,
        validators=[
            RangeValidator(
                NEAR_DUPLICATE_THRESHOLD_MIN, 1, _("The near-duplicate threshold must be from 0.5 to 1.")
            )
        ],
        help_text=_("Prompts whose word-bigram Jaccard similarity reaches this stay on one side (0.5–1)."),
    )

    # --- state and results ---------------------------------------------------
    progress = models.FloatField(default=0.0)
    # {"pairs": {"train": n, "test": m}, "grouped": {...}, ...}
    counts = models.JSONField(default=dict, blank=True)
    # What the dataset card reports: rows read and dropped, tie rate, agreement, margins.
    summary = models.JSONField(default=dict, blank=True)
    content_hash = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(progress__gte=0, progress__lte=1),
                name="datasetbuild_progress_0_1",
                violation_error_message=_("Progress is a fraction from 0 to 1."),
            ),
            models.CheckConstraint(
                condition=Q(test_fraction__gte=0, test_fraction__lt=1),
                name="datasetbuild_test_fraction_0_1",
                violation_error_message=_("The test fraction must be at least 0 and below 1."),
            ),
            models.CheckConstraint(
                condition=Q(agreement_threshold__gte=0, agreement_threshold__lte=1),
                name="datasetbuild_agreement_threshold_0_1",
                violation_error_message=_("The agreement threshold is a fraction from 0 to 1."),
            ),
            models.CheckConstraint(
                condition=Q(
                    near_duplicate_threshold__gte=NEAR_DUPLICATE_THRESHOLD_MIN,
                    near_duplicate_threshold__lte=1,
                ),
                name="datasetbuild_near_duplicate_threshold",
                violation_error_message=_("The near-duplicate threshold must be from 0.5 to 1."),
            ),
            models.CheckConstraint(
                condition=Q(min_gold_accuracy__isnull=True)
                | Q(min_gold_accuracy__gte=0, min_gold_accuracy__lte=1),
                name="datasetbuild_min_gold_accuracy_0_1",
                violation_error_message=_("The minimum gold accuracy is a fraction from 0 to 1."),
            ),
            models.CheckConstraint(
                condition=Q(date_from__isnull=True)
                | Q(date_to__isnull=True)
                | Q(date_from__lte=F("date_to")),
                name="datasetbuild_dates_in_order",
                violation_error_message=_("The first day must not come after the last day."),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} (build {self.pk})"

    @property
    def is_finished(self) -> bool:
        return self.is_terminal


class TrainingRun(GpuJob):
    """A reward-model, DPO, SFT or RL run over a dataset build. This row is the source of truth for its state.

    Transitions are compare-and-set (see training.services): queued → running →
    succeeded | failed | cancelled; a run whose process died goes back to
    queued while attempts remain, and resumes from its last checkpoint.
    """

    class Kind(models.TextChoices):
        REWARD = "reward", _("Reward model")
        DPO = "dpo", _("DPO policy")
        SFT = "sft", _("SFT policy")
        RL = "rl", _("RL policy (against a reward model)")

    # Kinds that register a Policy when they succeed.
    POLICY_KINDS = (Kind.DPO, Kind.SFT, Kind.RL)

    class Peft(models.TextChoices):
        LORA = "lora", _("LoRA")
        IA3 = "ia3", _("IA3")
        FULL = "full", _("Full fine-tuning")

    class Trainer(models.TextChoices):
        GROUPED = "grouped", _("Grouped K-wise (one forward per completion)")
        TRL = "trl", _("TRL (RewardTrainer / DPOTrainer)")

    class Distributed(models.TextChoices):
        DDP = "ddp", _("DDP (a full copy of the model per GPU)")
        FSDP = "fsdp", _("FSDP (parameters sharded across GPUs)")
        DEEPSPEED_ZERO2 = "deepspeed_zero2", _("DeepSpeed ZeRO-2 (optimizer state and gradients sharded)")
        DEEPSPEED_ZERO3 = "deepspeed_zero3", _("DeepSpeed ZeRO-3 (parameters sharded too)")

    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    dataset_build = models.ForeignKey(DatasetBuild, on_delete=models.PROTECT, related_name="training_runs")
    base_model = models.CharField(
        max_length=500, help_text=_("Local path or hub id of a causal language model.")
    )
    peft = models.CharField(_("PEFT method"), max_length=8, choices=Peft.choices, default=Peft.LORA)
    trainer = models.CharField(max_length=16, choices=Trainer.choices, default=Trainer.GROUPED)
    # The names and bounds of training.run_settings (RunSpec checks them; the form and API derive from them).
    hyperparameters = models.JSONField(default=dict, blank=True)
    gpus = models.PositiveSmallIntegerField(
        _("GPUs"),
        default=1,
        help_text=_(
            "GPUs the run takes from its worker, one process each (CPU processes on a worker without GPUs)."
        ),
    )
    distributed = models.CharField(
        _("multi-GPU strategy"),
        max_length=16,
        choices=Distributed.choices,
        default=Distributed.DDP,
        help_text=_(
            "How several processes share the work (accelerate's configuration); unused with one GPU."
        ),
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True, help_text=_("Final evaluation on the test split."))
    device_settings = models.JSONField(
        _("device settings"),
        default=dict,
        blank=True,
        help_text=_(
            "What the run's process chose for its device and model: precision, attention, "
            "gradient checkpointing, LoRA target modules, quantisation, packing."
        ),
    )
    output_dir = models.CharField(max_length=500, blank=True)
    process_id = models.PositiveIntegerField(
        null=True, blank=True, help_text=_("Launcher process of the current attempt.")
    )
    policy = models.ForeignKey(
        Policy,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="training_runs",
        help_text=_("The policy a finished DPO, SFT or RL run registered."),
    )
    against_reward_model = models.ForeignKey(
        "RewardModel",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="rl_runs",
        verbose_name=_("reward model"),
        help_text=_("RL runs only: the trained reward model the policy is optimised against."),
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "heartbeat_at"])]
        constraints = [
            models.CheckConstraint(condition=Q(gpus__gte=1), name="trainingrun_at_least_one_gpu"),
            models.CheckConstraint(
                condition=Q(step__lte=models.F("total_steps")) | Q(total_steps=0),
                name="trainingrun_step_within_total",
            ),
            models.CheckConstraint(
                condition=Q(attempts_given_back__lte=F("attempts")),
                name="trainingrun_given_back_within_attempts",
            ),
            models.CheckConstraint(
                condition=Q(kind="rl", against_reward_model__isnull=False)
                | (~Q(kind="rl") & Q(against_reward_model__isnull=True)),
                name="trainingrun_reward_model_for_rl_only",
                violation_error_message=_("An RL run needs a reward model; other kinds take none."),
            ),
        ]

    def __str__(self) -> str:
        return self.name or f"{self.get_kind_display()} run {self.pk}"

    def clean(self) -> None:
        super().clean()
        if self._state.adding and self.base_model:
            # Refused at submission, not 25 s into the run's process.
            from training.model_check import base_model_problem

            problem = base_model_problem(self.base_model)
            if problem:
                raise ValidationError({"base_model": problem})

    @property
    def output_path(self) -> Path:
        """The run's folder on this host (`output_dir` is stored relative to ARTIFACTS_DIR)."""
        return Path(storage_path_resolve(self.output_dir))

    @property
    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0


class TrainingRunMetric(models.Model):
    """One logging step of a run: loss, accuracy, margins… as the trainer logged them."""

    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="metric_rows")
    step = models.PositiveIntegerField()
    values = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run", "step", "id"]
        indexes = [models.Index(fields=["run", "step"])]

    def __str__(self) -> str:
        return f"run {self.run_id} step {self.step}"


class RewardModel(models.Model):
    """A trained reward model, usable for scoring (training.scoring)."""

    name = models.CharField(max_length=200, unique=True)
    run = models.OneToOneField(TrainingRun, on_delete=models.PROTECT, related_name="reward_model")
    base_model = models.CharField(max_length=500)
    path = models.CharField(
        max_length=500, help_text=_("Folder with the adapter (or full model) and tokenizer.")
    )
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name


class GenerationJob(GpuJob):
    """A policy writing `n` completions for every prompt of a project. This row is the source of truth.

    Transitions are compare-and-set (see training.services): queued → running →
    succeeded | failed | cancelled. A job whose process died goes back to
    queued while attempts remain; the next attempt skips the prompts that
    already have `n` completions from the policy, so a retry never writes a
    prompt's completions twice.
    """

    N_MAX = 64
    MAX_NEW_TOKENS_MAX = 8192

    policy = models.ForeignKey(Policy, on_delete=models.PROTECT, related_name="generation_jobs")
    project = models.ForeignKey(
        Project,
        on_delete=models.CASCADE,
        related_name="generation_jobs",
        help_text=_("Every prompt of this project gets completions."),
    )
    n = models.PositiveSmallIntegerField(
        _("completions per prompt"),
        default=1,
        validators=[RangeValidator(1, N_MAX, _("Completions per prompt: from 1 to 64."))],
        help_text=_("The job makes sure each prompt has this many completions from the policy."),
    )
    temperature = models.FloatField(
        default=1.0,
        validators=[RangeValidator(0.01, 5, _("The temperature is from 0.01 to 5."))],
        help_text=_("Sampling temperature (0.01–5); lower is more deterministic."),
    )
    top_p = models.FloatField(
        _("top-p"),
        default=1.0,
        validators=[RangeValidator(0.01, 1, _("Top-p is a fraction from 0.01 to 1."))],
        help_text=_(
            "Nucleus sampling: keep the smallest set of tokens holding this much probability (1: all)."
        ),
    )
    max_new_tokens = models.PositiveIntegerField(
        default=256,
        validators=[RangeValidator(1, MAX_NEW_TOKENS_MAX, _("New tokens: from 1 to 8192."))],
    )
    seed = models.PositiveIntegerField(
        default=0, help_text=_("The same seed, policy and settings write the same texts.")
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    prompts_done = models.PositiveIntegerField(default=0)
    prompts_total = models.PositiveIntegerField(default=0)
    completions_written = models.PositiveIntegerField(default=0)
    tasks_created = models.PositiveIntegerField(
        default=0, help_text=_("Ranking tasks made from the completions when the job succeeded.")
    )
    process_id = models.PositiveIntegerField(
        null=True, blank=True, help_text=_("Generation process of the current attempt.")
    )
    backend = models.CharField(
        _("generation backend"),
        max_length=8,
        blank=True,
        choices=[("hf", _("Hugging Face generate")), ("vllm", _("vLLM"))],
        help_text=_("How the worker that ran the job sampled (its RANKWISE_GENERATION_BACKEND)."),
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "heartbeat_at"])]
        constraints = [
            models.CheckConstraint(
                condition=Q(attempts_given_back__lte=F("attempts")),
                name="generationjob_given_back_within_attempts",
            ),
            models.CheckConstraint(
                condition=Q(n__gte=1, n__lte=64),
                name="generationjob_n_1_64",
                violation_error_message=_("Completions per prompt: from 1 to 64."),
            ),
            models.CheckConstraint(
                condition=Q(temperature__gte=0.01, temperature__lte=5),
                name="generationjob_temperature_range",
                violation_error_message=_("The temperature is from 0.01 to 5."),
            ),
            models.CheckConstraint(
                condition=Q(top_p__gte=0.01, top_p__lte=1),
                name="generationjob_top_p_range",
                violation_error_message=_("Top-p is a fraction from 0.01 to 1."),
            ),
            models.CheckConstraint(
                condition=Q(max_new_tokens__gte=1, max_new_tokens__lte=8192),
                name="generationjob_max_new_tokens_range",
                violation_error_message=_("New tokens: from 1 to 8192."),
            ),
            models.CheckConstraint(
                condition=Q(prompts_done__lte=F("prompts_total")),
                name="generationjob_done_within_total",
            ),
        ]

    def __str__(self) -> str:
        return f"generation {self.pk}: {self.policy} on {self.project}"

    @property
    def progress(self) -> float:
        return self.prompts_done / self.prompts_total if self.prompts_total else 0.0

    @property
    def sampling_settings(self) -> dict[str, float | int]:
        """What every completion of the job records in its generation settings (with its seeds)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
        }


class BestOfN(models.Model):
    """What a best-of-n policy stands for: sample `n` from the base policy, keep the reward model's favourite."""

    policy = models.OneToOneField(Policy, on_delete=models.CASCADE, related_name="best_of_n")
    base_policy = models.ForeignKey(Policy, on_delete=models.PROTECT, related_name="best_of_n_policies")
    reward_model = models.ForeignKey(RewardModel, on_delete=models.PROTECT, related_name="best_of_n_policies")
    n = models.PositiveSmallIntegerField(
        validators=[RangeValidator(2, 64, _("Best-of-n samples from 2 to 64 candidates."))]
    )

    class Meta:
        verbose_name = _("best-of-n policy")
        verbose_name_plural = _("best-of-n policies")
        constraints = [
            models.CheckConstraint(condition=Q(n__gte=2, n__lte=64), name="bestofn_n_2_64"),
            models.CheckConstraint(
                condition=~Q(policy=F("base_policy")), name="bestofn_base_is_another_policy"
            ),
        ]

    def __str__(self) -> str:
        return f"best of {self.n} from {self.base_policy} by {self.reward_model}"


class ScoringJob(GpuJob):
    """A reward model scoring every completion of a blind A/B session. This row is the source of truth.

    The same lifecycle as a GenerationJob (and the same helpers in
    training.services): queued → running → succeeded | failed | cancelled,
    compare-and-set claims, an attempt cap, a heartbeat and a reaper. The
    scores themselves are `annotation.CompletionScore` rows labelled
    `scorer`, so the results page (human side) reads them without importing
    this app; a retried attempt scores only the completions still lacking a
    score under that label.
    """

    reward_model = models.ForeignKey(RewardModel, on_delete=models.PROTECT, related_name="scoring_jobs")
    project = models.ForeignKey(
        Project,
        on_delete=models.CASCADE,
        related_name="scoring_jobs",
        help_text=_("The A/B session whose completions are scored."),
    )
    # Fixed when the job is made, so every attempt writes under the same label.
    scorer = models.CharField(max_length=300)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    completions_done = models.PositiveIntegerField(default=0)
    completions_total = models.PositiveIntegerField(default=0)
    process_id = models.PositiveIntegerField(
        null=True, blank=True, help_text=_("Scoring process of the current attempt.")
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "heartbeat_at"])]
        constraints = [
            models.CheckConstraint(
                condition=Q(completions_done__lte=F("completions_total")),
                name="scoringjob_done_within_total",
            ),
            models.CheckConstraint(
                condition=Q(attempts_given_back__lte=F("attempts")),
                name="scoringjob_given_back_within_attempts",
            ),
            # One live job per session and reward model: a second would score the same completions.
            models.UniqueConstraint(
                fields=["project", "reward_model"],
                condition=Q(status__in=["queued", "running"]),
                name="scoringjob_one_live_per_session_and_model",
                violation_error_message=_("This reward model is already scoring this session."),
            ),
        ]

    def __str__(self) -> str:
        return f"scoring {self.pk}: {self.reward_model} on {self.project}"

    @property
    def progress(self) -> float:
        return self.completions_done / self.completions_total if self.completions_total else 0.0


class Judge(models.Model):
    """A model that ranks a project's tasks as a labeler account marked as a model (training.judges).

    The account is made for the judge: no password, a labeler membership in
    the project, so it claims and submits through the same services as people;
    its judgments carry `source = model`. A reward-model judge ranks a task's
    completions by the reward model's scores (a scoring job over the project
    writes them first). A language-model judge is a causal LM (a policy) shown
    the task through `prompt_template`; a judge job on the gpu queue reads its
    verdict on each task (JudgeVerdict) first.
    """

    class Kind(models.TextChoices):
        REWARD_MODEL = "reward_model", _("Reward model")
        LANGUAGE_MODEL = "language_model", _("Language model prompted to rank")

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="judges")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.REWARD_MODEL)
    reward_model = models.ForeignKey(
        RewardModel, null=True, blank=True, on_delete=models.PROTECT, related_name="judges"
    )
    policy = models.ForeignKey(
        Policy,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="judges",
        help_text=_("The causal language model of a language-model judge."),
    )
    prompt_template = models.TextField(
        blank=True, help_text=_("What a language-model judge is shown: {prompt} and {candidates} at least.")
    )
    account = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="judge")
    active = models.BooleanField(default=True)
    max_judgments = models.PositiveIntegerField(
        null=True, blank=True, help_text=_("Stop after this many judgments (empty: every task it may take).")
    )
    judgments_made = models.PositiveIntegerField(default=0)
    # Tasks a language-model judge gave no readable answer for: left to people, never guessed.
    answers_unreadable = models.PositiveIntegerField(default=0)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["project", "reward_model"], name="judge_one_per_project_and_model"
            ),
            models.UniqueConstraint(
                fields=["project", "policy"],
                condition=Q(policy__isnull=False),
                name="judge_one_per_project_and_policy",
            ),
            models.CheckConstraint(
                condition=(Q(kind="reward_model", reward_model__isnull=False, policy__isnull=True))
                | (Q(kind="language_model", policy__isnull=False, reward_model__isnull=True)),
                name="judge_model_matches_kind",
            ),
        ]

    def __str__(self) -> str:
        return f"judge {self.account} on {self.project}"

    @property
    def model_name(self) -> str:
        """The reward model's or the policy's name, as pages show it."""
        if self.kind == self.Kind.LANGUAGE_MODEL and self.policy is not None:
            return self.policy.name
        return self.reward_model.name if self.reward_model is not None else ""


class JudgeVerdict(models.Model):
    """A language-model judge's reading of one task, written by its judge job before the judge claims it.

    `scores`: completion id (as text) → the judge's preference for it (the
    mean probability, over the candidates' rotations, that the judge names
    it best; higher is better). None when the answer could not be read
    (`note` says why): such a task is skipped, never turned into a ranking.
    """

    judge = models.ForeignKey(Judge, on_delete=models.CASCADE, related_name="verdicts")
    task = models.ForeignKey("annotation.Task", on_delete=models.CASCADE, related_name="+")
    scores = models.JSONField(null=True, blank=True)
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["judge", "task"], name="judgeverdict_one_per_task")]

    def __str__(self) -> str:
        return f"verdict of {self.judge_id} on task {self.task_id}"


class JudgeJob(GpuJob):
    """A language-model judge reading the project's open tasks on the gpu queue. This row is the source of truth.

    The lifecycle of the other GPU jobs (training.services.jobs): queued →
    running → succeeded | failed | cancelled, compare-and-set claims, an
    attempt cap, a heartbeat and a reaper. Its process is
    `python -m training.judge_process`; each batch's verdicts are written
    with the progress in one transaction, and a retried attempt reads only
    the tasks still lacking a verdict.
    """

    judge = models.ForeignKey(Judge, on_delete=models.CASCADE, related_name="jobs")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="judge_jobs")
    created_at = models.DateTimeField(auto_now_add=True)
    tasks_done = models.PositiveIntegerField(default=0)
    tasks_total = models.PositiveIntegerField(default=0)
    process_id = models.PositiveIntegerField(
        null=True, blank=True, help_text=_("Judge process of the current attempt.")
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "heartbeat_at"])]
        constraints = [
            models.CheckConstraint(
                condition=Q(tasks_done__lte=F("tasks_total")), name="judgejob_done_within_total"
            ),
            models.CheckConstraint(
                condition=Q(attempts_given_back__lte=F("attempts")),
                name="judgejob_given_back_within_attempts",
            ),
            # One live job per judge: a second would read the same tasks.
            models.UniqueConstraint(
                fields=["judge"],
                condition=Q(status__in=["queued", "running"]),
                name="judgejob_one_live_per_judge",
            ),
        ]

    def __str__(self) -> str:
        return f"judge job {self.pk}: {self.judge}"

    @property
    def progress(self) -> float:
        return self.tasks_done / self.tasks_total if self.tasks_total else 0.0


class ContinuousTraining(models.Model):
    """Continuous mode of a ranking project: every so many new judgments, a fresh reward model orders its queue.

    training.continuous drives it from the beat: when the project has
    `every_judgments` more human judgments than at the last start, it copies
    the template run's dataset build (the same options, now with the new
    judgments), trains a reward run with the template's settings, and has the
    new reward model score the project, which re-orders an uncertainty queue.
    One cycle at a time; `state` says where the cycle is.
    """

    class State(models.TextChoices):
        IDLE = "idle", _("Waiting for new judgments")
        BUILDING = "building", _("Building a dataset")
        TRAINING = "training", _("Training a reward model")
        SCORING = "scoring", _("Scoring the project")

    project = models.OneToOneField(Project, on_delete=models.CASCADE, related_name="continuous_training")
    template_run = models.ForeignKey(
        TrainingRun,
        on_delete=models.PROTECT,
        related_name="+",
        help_text=_("A reward run whose dataset options and settings every new cycle copies."),
    )
    every_judgments = models.PositiveIntegerField(
        validators=[RangeValidator(1, 10**9, _("Start a cycle after at least one new judgment."))],
        help_text=_("Start a new reward run after this many new human judgments."),
    )
    active = models.BooleanField(default=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.IDLE)
    judgments_at_last_start = models.PositiveIntegerField(default=0)
    cycles = models.PositiveIntegerField(default=0)
    current_build = models.ForeignKey(
        DatasetBuild, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    current_run = models.ForeignKey(
        TrainingRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    current_scoring = models.ForeignKey(
        ScoringJob, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    last_error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"continuous training of {self.project}"
