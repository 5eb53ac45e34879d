"""Admin for dataset builds: create one (through the service), watch it, rebuild it.

A build is immutable once made: its page is read-only, and "rebuild" makes a
new build with the same options (e.g. after new judgments came in).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.translation import gettext_lazy as _

from training.models import DatasetBuild, RewardModel, TrainingRun
from training.selectors import (
    BUILD_OPTION_FIELDS,
    dataset_builds_for_user,
    labeler_choices_for_builds,
    project_choices_for_builds,
    training_runs_for_user,
)
from training.services import (
    DatasetBuildInvalid,
    dataset_build_copy,
    dataset_build_create,
    dataset_build_delete,
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
            {"fields": ("date_from", "date_to", "labelers", "min_gold_accuracy", "exclude_flagged")},
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

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "projects":
            kwargs["queryset"] = project_choices_for_builds(user=request.user)
        elif db_field.name == "labelers":
            kwargs["queryset"] = labeler_choices_for_builds(user=request.user)
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def save_model(self, request: HttpRequest, obj: DatasetBuild, form: ModelForm, change: bool) -> None:
        if change:
            return
        data = form.cleaned_data
        build = dataset_build_create(
            created_by=request.user,
            name=data["name"],
            projects=data["projects"],
            labelers=data["labelers"],
            **{field: data[field] for field in BUILD_OPTION_FIELDS},
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
            except DatasetBuildInvalid as error:
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
