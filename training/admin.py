"""Admin for dataset builds: create one (through the service), watch it, rebuild it.

A build is immutable once made: its page is read-only, and "rebuild" makes a
new build with the same options (e.g. after new judgments came in).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.translation import gettext_lazy as _

from annotation.admin import PolicyAdmin as ScopedPolicyAdmin
from annotation.models import Policy
from annotation.roles import Role
from annotation.selectors import policies_for_user, projects_for_user
from training.models import DatasetBuild, GenerationJob, RewardModel, ScoringJob, TrainingRun
from training.policies import policy_adapter_problems, policy_base_model_problems
from training.selectors import (
    BUILD_OPTIONAL_FIELDS,
    build_options_from,
    dataset_builds_for_user,
    labeler_choices_for_builds,
    project_choices_for_builds,
    training_runs_for_user,
)
from training.services import (
    DatasetBuildInvalid,
    QueueUnavailable,
    broker_check,
    dataset_build_copy,
    dataset_build_create,
    dataset_build_delete,
    generation_job_cancel,
    generation_job_create,
    generation_job_validate,
    scoring_job_cancel,
    training_run_cancel,
)

RESULT_FIELDS = (
    "status",
    "progress",
    "counts",
    "summary",
    "content_hash",
    "error",
    "created_by",
    "created_at",
    "started_at",
    "finished_at",
    "page",
)


@admin.register(DatasetBuild)
class DatasetBuildAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "status",
        "percent_done",
        "aggregation",
        "format",
        "created_by",
        "created_at",
        "hash",
    )
    list_filter = ("status", "aggregation", "format")
    search_fields = ("name",)
    actions = ["rebuild", "start_reward_run", "start_dpo_run"]
    filter_horizontal = ("projects", "labelers")
    fieldsets = (
        (None, {"fields": ("name", "projects")}),
        (
            _("Which comparisons"),
            {
                "fields": (
                    "date_from",
                    "date_to",
                    "labelers",
                    "min_gold_accuracy",
                    "exclude_flagged",
                    "sources",
                    "judge_agreement_min",
                )
            },
        ),
        (
            _("Rows"),
            {
                "fields": (
                    "aggregation",
                    "agreement_threshold",
                    "ties",
                    "margin",
                    "format",
                    "test_fraction",
                    "seed",
                    "near_duplicate_threshold",
                    "sft_in_preferences",
                )
            },
        ),
        (_("Result"), {"fields": RESULT_FIELDS}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[DatasetBuild]:
        return dataset_builds_for_user(user=request.user).select_related("created_by")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return RESULT_FIELDS

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:  # nothing to show yet
            return self.fieldsets[:-1]
        return self.fieldsets

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A build is a frozen export: its page is read-only; rebuild makes a new one.
        return obj is None and super().has_change_permission(request, obj)

    def formfield_for_dbfield(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        field = super().formfield_for_dbfield(db_field, request, **kwargs)
        if field is not None and db_field.name in BUILD_OPTIONAL_FIELDS:
            field.required = False  # left out, the model's default stands
        return field

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "projects":
            kwargs["queryset"] = project_choices_for_builds(user=request.user)
        elif db_field.name == "labelers":
            kwargs["queryset"] = labeler_choices_for_builds(user=request.user)
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context: Any = None) -> Any:
        # Refuse before the admin saves anything: a build that cannot be queued would stay queued.
        if request.method == "POST":
            try:
                broker_check()
            except QueueUnavailable as error:
                self.message_user(request, str(error), messages.ERROR)
                return redirect(request.get_full_path())
        return super().add_view(request, form_url, extra_context)

    def save_model(self, request: HttpRequest, obj: DatasetBuild, form: ModelForm, change: bool) -> None:
        if change:
            return
        data = form.cleaned_data
        build = dataset_build_create(
            created_by=request.user,
            name=data["name"],
            projects=data["projects"],
            labelers=data["labelers"],
            **build_options_from(data),
        )
        # The admin goes on with `obj` (messages, log entry, redirect): make it the saved row.
        obj.pk = build.pk
        obj.created_by = build.created_by
        obj.created_at = build.created_at
        obj._state.adding = False
        obj._state.db = build._state.db

    def save_related(self, request: HttpRequest, form: ModelForm, formsets: Any, change: bool) -> None:
        """Projects and labelers were set by the service in `save_model`."""

    def delete_model(self, request: HttpRequest, obj: DatasetBuild) -> None:
        dataset_build_delete(build=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[DatasetBuild]) -> None:
        for build in queryset:
            dataset_build_delete(build=build)

    @admin.display(description=_("progress"))
    def percent_done(self, obj: DatasetBuild) -> str:
        return f"{obj.progress:.0%}"

    @admin.display(description=_("content hash"))
    def hash(self, obj: DatasetBuild) -> str:
        return obj.content_hash[:12]

    @admin.display(description=_("page"))
    def page(self, obj: DatasetBuild) -> str:
        if obj.pk is None:
            return "—"
        url = reverse("dataset-build-detail", kwargs={"build_id": obj.pk})
        return format_html('<a href="{}">{}</a>', url, _("Progress and downloads"))

    def _start_run(self, request: HttpRequest, queryset: QuerySet[DatasetBuild], kind: str) -> Any:
        builds = list(queryset[:2])
        if len(builds) != 1 or builds[0].status != DatasetBuild.Status.SUCCEEDED:
            self.message_user(request, _("Pick exactly one build that has succeeded."), messages.ERROR)
            return None
        # The run's settings are chosen on its own validated form, pre-filled here.
        return redirect(f"{reverse('training-run-new')}?{urlencode({'build': builds[0].pk, 'kind': kind})}")

    @admin.action(description=_("Start a reward-model run on this build"))
    def start_reward_run(self, request: HttpRequest, queryset: QuerySet[DatasetBuild]) -> Any:
        return self._start_run(request, queryset, TrainingRun.Kind.REWARD)

    @admin.action(description=_("Start a DPO run on this build"))
    def start_dpo_run(self, request: HttpRequest, queryset: QuerySet[DatasetBuild]) -> Any:
        return self._start_run(request, queryset, TrainingRun.Kind.DPO)

    @admin.action(description=_("Rebuild with the same options"))
    def rebuild(self, request: HttpRequest, queryset: QuerySet[DatasetBuild]) -> None:
        made = 0
        for build in queryset.order_by("pk"):
            try:
                dataset_build_copy(build=build, created_by=request.user)
            except (DatasetBuildInvalid, QueueUnavailable) as error:
                self.message_user(request, f"{build.name}: {error}", messages.ERROR)
            else:
                made += 1
        if made:
            self.message_user(
                request, _("Queued %(count)d new build(s).") % {"count": made}, messages.SUCCESS
            )


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    """Runs are started on their own form (validated settings) and change only through services."""

    list_display = (
        "__str__",
        "kind",
        "status",
        "percent_done",
        "attempts",
        "dataset_build",
        "created_at",
        "page",
    )
    list_filter = ("status", "kind", "peft")
    search_fields = ("name",)
    actions = ["cancel"]
    list_select_related = ("dataset_build",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[TrainingRun]:
        return training_runs_for_user(user=request.user)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [field.name for field in TrainingRun._meta.fields] + ["page"]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context: Any = None) -> Any:
        return redirect("training-run-new")

    @admin.display(description=_("progress"))
    def percent_done(self, obj: TrainingRun) -> str:
        return f"{obj.progress:.0%}"

    @admin.display(description=_("page"))
    def page(self, obj: TrainingRun) -> str:
        return format_html(
            '<a href="{}">{}</a>', reverse("training-run-detail", args=[obj.pk]), _("Progress and files")
        )

    @admin.action(description=_("Cancel the selected runs"))
    def cancel(self, request: HttpRequest, queryset: QuerySet[TrainingRun]) -> None:
        for run in queryset:
            training_run_cancel(run=run)
        self.message_user(request, _("Cancel requested."), messages.SUCCESS)


@admin.register(RewardModel)
class RewardModelAdmin(admin.ModelAdmin):
    list_display = ("name", "run", "base_model", "created_at")
    readonly_fields = ("name", "run", "base_model", "path", "metrics", "created_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[RewardModel]:
        return RewardModel.objects.filter(run__in=training_runs_for_user(user=request.user))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


class GenerationJobForm(forms.ModelForm):
    """A new generation job: the policy, the project whose prompts it answers, n and the sampling settings.

    The fields carry the model's validators; `_post_clean` adds the service's
    own checks (a policy that can generate, a project the person manages, a
    queue that answers), so the form says what is wrong instead of failing on save.
    """

    user: Any = None  # set by the admin for each request

    class Meta:
        model = GenerationJob
        fields = ["policy", "project", "n", "temperature", "top_p", "max_new_tokens", "seed"]
        labels = {
            "policy": _("Policy"),
            "project": _("Project"),
            "n": _("Completions per prompt"),
            "temperature": _("Temperature"),
            "top_p": _("Top-p"),
            "max_new_tokens": _("New tokens at most"),
            "seed": _("Seed"),
        }

    def _post_clean(self) -> None:
        super()._post_clean()
        if self._errors:
            return
        try:
            generation_job_validate(job=self.instance, created_by=self.user)
            broker_check()
        except ValidationError as error:
            self.add_error(None, error)
        except QueueUnavailable as error:
            self.add_error(None, str(error))


@admin.register(GenerationJob)
class GenerationJobAdmin(admin.ModelAdmin):
    """Jobs are read-only once made; the add page starts one through `generation_job_create`."""

    form = GenerationJobForm
    list_display = (
        "__str__",
        "status",
        "prompts",
        "n",
        "completions_written",
        "tasks_created",
        "attempts",
        "created_at",
    )
    list_filter = ("status",)
    search_fields = ("policy__name", "project__name")
    list_select_related = ("policy", "project")
    actions = ["cancel"]
    fieldsets = (
        (None, {"fields": ("policy", "project", "n")}),
        (_("Sampling"), {"fields": ("temperature", "top_p", "max_new_tokens", "seed")}),
    )
    result_fields = (
        "status",
        "prompts",
        "completions_written",
        "tasks_created",
        "attempts",
        "cancel_requested",
        "heartbeat_at",
        "error",
        "log_tail",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[GenerationJob]:
        managed = projects_for_user(user=request.user, role=Role.MANAGER)
        return GenerationJob.objects.filter(project__in=managed).select_related("policy", "project")

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return self.fieldsets
        return (*self.fieldsets, (_("Result"), {"fields": self.result_fields}))

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        return [field.name for field in GenerationJob._meta.fields] + ["prompts"]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        form = super().get_form(request, obj, change=change, **kwargs)
        form.user = request.user
        return form

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "project":
            kwargs["queryset"] = projects_for_user(user=request.user, role=Role.MANAGER)
        elif db_field.name == "policy":
            kwargs["queryset"] = policies_for_user(user=request.user).exclude(kind=Policy.Kind.IMPORTED)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def save_model(self, request: HttpRequest, obj: GenerationJob, form: ModelForm, change: bool) -> None:
        if change:
            return
        data = form.cleaned_data
        job = generation_job_create(
            created_by=request.user, **{name: data[name] for name in form.Meta.fields}
        )
        # The admin goes on with `obj` (messages, log entry, redirect): make it the saved row.
        obj.pk = job.pk
        obj.created_by = job.created_by
        obj.created_at = job.created_at
        obj._state.adding = False
        obj._state.db = job._state.db

    @admin.display(description=_("prompts done"))
    def prompts(self, obj: GenerationJob) -> str:
        return f"{obj.prompts_done} / {obj.prompts_total}" if obj.prompts_total else "—"

    @admin.action(description=_("Cancel the selected generation jobs"))
    def cancel(self, request: HttpRequest, queryset: QuerySet[GenerationJob]) -> None:
        for job in queryset:
            generation_job_cancel(job=job)
        self.message_user(request, _("Cancel requested."), messages.SUCCESS)


@admin.register(ScoringJob)
class ScoringJobAdmin(admin.ModelAdmin):
    """Read-only: jobs are started on an A/B session's scoring page (through `scoring_job_create`)."""

    list_display = ("__str__", "status", "scored", "attempts", "created_at", "page")
    list_filter = ("status",)
    search_fields = ("reward_model__name", "project__name")
    list_select_related = ("reward_model", "project")
    actions = ["cancel"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ScoringJob]:
        managed = projects_for_user(user=request.user, role=Role.MANAGER)
        return ScoringJob.objects.filter(project__in=managed).select_related("reward_model", "project")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [field.name for field in ScoringJob._meta.fields] + ["scored", "page"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description=_("Responses scored"))
    def scored(self, obj: ScoringJob) -> str:
        return f"{obj.completions_done} / {obj.completions_total}" if obj.completions_total else "—"

    @admin.display(description=_("page"))
    def page(self, obj: ScoringJob) -> str:
        return format_html(
            '<a href="{}">{}</a>', reverse("ab-session-scoring", args=[obj.project_id]), _("Progress")
        )

    @admin.action(description=_("Cancel the selected scoring jobs"))
    def cancel(self, request: HttpRequest, queryset: QuerySet[ScoringJob]) -> None:
        for job in queryset:
            scoring_job_cancel(job=job)
        self.message_user(request, _("Cancel requested."), messages.SUCCESS)


# --- policies: the admin's add and change pages check a model as the policy page does ---


class PolicyCheckedForm(forms.ModelForm):
    """A model policy's base model (and adapter) must load, as `training.policies.policy_register` checks.

    The check runs when the policy is added or its base model, adapter or
    settings change; it loads the config and tokenizer in a child process.
    """

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        watched = {"kind", "base_model", "adapter", "generation_settings"}
        if data.get("kind") != Policy.Kind.MODEL or (
            self.instance.pk and not watched & set(self.changed_data)
        ):
            return data
        settings = data.get("generation_settings") or {}
        chat = isinstance(settings, dict) and settings.get("prompt_format") == "chat"
        for field, problems in (
            ("adapter", policy_adapter_problems(data.get("adapter") or "")),
            ("base_model", policy_base_model_problems(data.get("base_model") or "", chat=chat)),
        ):
            for problem in problems:
                self.add_error(field, problem)
        return data


class CheckedPolicyAdmin(ScopedPolicyAdmin):
    """The project-scoped policy admin (annotation.admin), with the policy page's loading check."""

    form = PolicyCheckedForm


admin.site.unregister(Policy)
admin.site.register(Policy, CheckedPolicyAdmin)
