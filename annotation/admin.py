from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet
from django.forms import ModelForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.translation import gettext_lazy as _

from annotation.forms import PromptImportForm
from annotation.importing import ImportValidationError, prompts_import
from annotation.models import Assignment, Comparison, Judgment, Membership, Policy, Project, Prompt, Task
from annotation.roles import Role
from annotation.selectors import projects_for_user
from annotation.services import user_sync_staff

User = get_user_model()

# Fields only a superuser may change: a manager creating accounts must not be
# able to grant more than the roles themselves.
_SUPERUSER_ONLY_FIELDS = ("is_superuser", "is_staff", "user_permissions")


class RankwiseUserAdmin(UserAdmin):
    list_display = ("username", "email", "roles", "is_active", "last_login")
    list_filter = ("groups", "is_active")

    @admin.display(description="roles")
    def roles(self, obj: Any) -> str:
        return ", ".join(sorted(group.name for group in obj.groups.all()))

    def get_queryset(self, request: HttpRequest) -> Any:
        queryset = super().get_queryset(request).prefetch_related("groups")
        if not request.user.is_superuser:  # type: ignore[union-attr]
            # Otherwise a manager could reset a superuser's password and become one.
            queryset = queryset.filter(is_superuser=False)
        return queryset

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        readonly = tuple(super().get_readonly_fields(request, obj))
        if not request.user.is_superuser:  # type: ignore[union-attr]
            readonly += _SUPERUSER_ONLY_FIELDS
        return readonly

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "groups" and not request.user.is_superuser:  # type: ignore[union-attr]
            kwargs["queryset"] = Group.objects.filter(name__in=Role.values)
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def save_related(self, request: HttpRequest, form: ModelForm, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        user_sync_staff(user=form.instance)  # type: ignore[arg-type]


admin.site.unregister(User)
admin.site.register(User, RankwiseUserAdmin)


# --- annotation models -------------------------------------------------------


def _managed_projects(request: HttpRequest) -> QuerySet[Project]:
    return projects_for_user(user=request.user, role=Role.MANAGER)


class ProjectScopedAdmin(admin.ModelAdmin):
    """Shows a manager only the rows of projects they manage (superusers see all)."""

    project_path = "project"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        queryset = super().get_queryset(request)
        if request.user.is_superuser:  # type: ignore[union-attr]
            return queryset
        return queryset.filter(**{f"{self.project_path}__in": _managed_projects(request)})


class ReadOnlyAdmin(ProjectScopedAdmin):
    """Derived data: written by the services only, never by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    autocomplete_fields = ["user"]


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "k", "overlap", "task_count", "is_active", "created_at")
    list_filter = ("kind", "is_active")
    search_fields = ("name",)
    inlines = [MembershipInline]
    fieldsets = (
        (None, {"fields": ("name", "kind", "instructions", "is_active")}),
        (
            _("Judging"),
            {"fields": ("k", "overlap", "ties_allowed", "likert_enabled", "flags", "rationale_required")},
        ),
        (_("Queue"), {"fields": ("lease_minutes", "gold_rate")}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Project]:
        queryset = super().get_queryset(request).annotate(task_total=Count("tasks"))
        if request.user.is_superuser:  # type: ignore[union-attr]
            return queryset
        return queryset.filter(pk__in=_managed_projects(request))

    @admin.display(description=_("tasks"), ordering="task_total")
    def task_count(self, obj: Project) -> int:
        return obj.task_total  # type: ignore[attr-defined]

    def save_model(self, request: HttpRequest, obj: Project, form: ModelForm, change: bool) -> None:
        if not change:
            obj.created_by = request.user  # type: ignore[assignment]
        super().save_model(request, obj, form, change)
        if not change:
            # Whoever creates a project manages it, or they could not see it again.
            Membership.objects.get_or_create(project=obj, user=request.user, role=Role.MANAGER)

    def get_urls(self) -> list[Any]:
        urls = [
            path(
                "<int:project_id>/import/",
                self.admin_site.admin_view(self.import_view),
                name="annotation_project_import",
            )
        ]
        return urls + super().get_urls()

    def import_view(self, request: HttpRequest, project_id: int) -> HttpResponse:
        """Upload a JSONL file of prompts into the project; all bad lines are listed, nothing half-written."""
        project = get_object_or_404(self.get_queryset(request), pk=project_id)
        if not self.has_change_permission(request, project):
            raise PermissionDenied
        errors: list[Any] = []
        if request.method == "POST":
            form = PromptImportForm(request.POST, request.FILES)
            if form.is_valid():
                try:
                    report = prompts_import(project=project, data=form.cleaned_data["file"])
                except ImportValidationError as error:
                    errors = error.errors
                else:
                    messages.success(
                        request,
                        _(
                            "Imported %(prompts)d prompts, %(completions)d completions; "
                            "%(tasks)d new tasks; %(duplicates)d duplicates skipped."
                        )
                        % {
                            "prompts": report.prompts_created,
                            "completions": report.completions_created,
                            "tasks": report.tasks_created,
                            "duplicates": len(report.duplicates),
                        },
                    )
                    return redirect("admin:annotation_project_change", project.pk)
        else:
            form = PromptImportForm()
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "project": project,
            "form": form,
            "errors": errors,
            "title": _("Import prompts into %(project)s") % {"project": project.name},
        }
        return TemplateResponse(request, "admin/annotation/project/import.html", context)


@admin.register(Policy)
class PolicyAdmin(admin.ModelAdmin):
    list_display = ("__str__", "kind", "base_model", "adapter", "created_at")
    list_filter = ("kind",)
    search_fields = ("name", "base_model")


@admin.register(Prompt)
class PromptAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "project", "is_chat", "created_at")
    list_filter = ("project",)
    search_fields = ("external_id", "text")
    readonly_fields = ("project", "external_id", "text", "messages", "metadata", "content_hash")

    @admin.display(boolean=True, description=_("chat"))
    def is_chat(self, obj: Prompt) -> bool:
        return obj.is_chat


@admin.register(Task)
class TaskAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "project", "prompt", "is_gold", "judgment_count")
    list_filter = ("project", "is_gold")
    list_select_related = ("project", "prompt")


@admin.register(Assignment)
class AssignmentAdmin(ReadOnlyAdmin):
    project_path = "task__project"
    list_display = ("__str__", "status", "slot", "leased_at", "lease_expires_at")
    list_filter = ("status", "task__project")
    list_select_related = ("user", "task")


@admin.register(Judgment)
class JudgmentAdmin(ReadOnlyAdmin):
    project_path = "task__project"
    list_display = ("__str__", "task", "none_acceptable", "active_seconds", "created_at")
    list_filter = ("task__project", "none_acceptable")
    list_select_related = ("user", "task")


@admin.register(Comparison)
class ComparisonAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "project", "is_tie", "margin", "labeler", "created_at")
    list_filter = ("project", "is_tie")
    list_select_related = ("project", "labeler")
