from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.forms import AdminUserCreationForm, PasswordResetForm
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Prefetch, QuerySet
from django.forms import ModelForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.translation import gettext_lazy as _

from annotation.forms import PromptImportForm
from annotation.importing import ImportReport, ImportValidationError, prompts_import
from annotation.models import (
    Assignment,
    Comparison,
    Completion,
    Judgment,
    Membership,
    Policy,
    Project,
    Prompt,
    Task,
    Webhook,
    WebhookDelivery,
)
from annotation.roles import Role
from annotation.selectors import (
    accounts_addable_to_projects,
    accounts_administered_by,
    policies_for_user,
    policy_outside_reach,
    projects_for_user,
)
from annotation.services import user_set_roles, user_sync_staff
from annotation.webhooks import webhook_deliveries_retry, webhook_secret_new

User = get_user_model()

# Fields only a superuser may change: a manager creating accounts must not be
# able to grant more than the roles themselves.
_SUPERUSER_ONLY_FIELDS = ("is_superuser", "is_staff", "user_permissions")
# The roles a manager may give an account. Making managers is a superuser's
# job: a manager never administers another manager (SECURITY.md, "Accounts").
_ROLES_A_MANAGER_GIVES = (Role.LABELER, Role.EVALUATOR)


def _is_superuser(request: HttpRequest) -> bool:
    return bool(request.user.is_superuser)  # type: ignore[union-attr]


class ProjectAccountCreationForm(AdminUserCreationForm):
    """A manager's new account starts as a member of one of their projects, so they can keep administering it."""

    project = forms.ModelChoiceField(queryset=Project.objects.none(), label=_("Project"))
    role = forms.ChoiceField(
        choices=[(role.value, role.label) for role in _ROLES_A_MANAGER_GIVES], label=_("Role in the project")
    )


class PasswordResetForOneAccount(PasswordResetForm):
    """Django's reset mail, sent to one chosen account rather than to every account with that address."""

    def __init__(self, account: Any) -> None:
        super().__init__(data={"email": account.email})
        self.account = account

    def get_users(self, email: str) -> Any:
        if self.account.is_active and self.account.email:
            yield self.account


class RankwiseUserAdmin(UserAdmin):
    list_display = ("username", "email", "roles", "is_active", "last_login")
    list_filter = ("groups", "is_active")
    actions = ["password_reset_send"]

    @admin.display(description="roles")
    def roles(self, obj: Any) -> str:
        return ", ".join(sorted(group.name for group in obj.groups.all()))

    def get_queryset(self, request: HttpRequest) -> Any:
        # A manager reaches only the accounts they administer; otherwise they
        # could reset another manager's (or a superuser's) password and become them.
        return accounts_administered_by(user=request.user).prefetch_related("groups")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        readonly = tuple(super().get_readonly_fields(request, obj))
        if not _is_superuser(request):
            readonly += _SUPERUSER_ONLY_FIELDS
        return readonly

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None and not _is_superuser(request):
            fieldsets = (*fieldsets, (_("Project"), {"fields": ("project", "role")}))
        return fieldsets

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None and not _is_superuser(request):
            managed = projects_for_user(user=request.user, role=Role.MANAGER)

            class ManagersAccountCreationForm(ProjectAccountCreationForm):
                def __init__(self, *args: Any, **form_kwargs: Any) -> None:
                    super().__init__(*args, **form_kwargs)
                    self.fields["project"].queryset = managed  # type: ignore[attr-defined]

            kwargs["form"] = ManagersAccountCreationForm
        return super().get_form(request, obj, change=change, **kwargs)

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "groups" and not _is_superuser(request):
            kwargs["queryset"] = Group.objects.filter(name__in=_ROLES_A_MANAGER_GIVES)
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def save_related(self, request: HttpRequest, form: ModelForm, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        if not change and "project" in form.cleaned_data:
            Membership.objects.get_or_create(
                project=form.cleaned_data["project"], user=form.instance, role=form.cleaned_data["role"]
            )
            user_set_roles(user=form.instance, roles=[form.cleaned_data["role"]])  # type: ignore[arg-type]
        user_sync_staff(user=form.instance)  # type: ignore[arg-type]

    def user_change_password(self, request: HttpRequest, id: str, form_url: str = "") -> HttpResponse:
        # Only a superuser sets someone else's password; a manager sends the
        # owner a reset link (the action below), so nobody learns another's password.
        if not _is_superuser(request):
            raise PermissionDenied
        return super().user_change_password(request, id, form_url)

    @admin.action(description=_("Send a password reset link to the selected accounts"))
    def password_reset_send(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        sent, skipped = 0, []
        for account in queryset:  # already limited to the accounts this person administers
            form = PasswordResetForOneAccount(account)
            if not account.email or not account.is_active or not form.is_valid():
                skipped.append(account.username)
                continue
            form.save(request=request, use_https=request.is_secure())
            sent += 1
        if sent:
            messages.success(request, _("Sent %(count)d password reset link(s).") % {"count": sent})
        if skipped:
            messages.warning(
                request,
                _("No link for %(names)s: the account has no email address or is inactive.")
                % {"names": ", ".join(skipped)},
            )

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[Any], search_term: str) -> Any:
        queryset, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        if (
            request.path == reverse("admin:autocomplete")
            and not _is_superuser(request)
            and search_term.strip()
        ):
            # Adding a member: someone outside the manager's projects is found
            # by their exact username only, so a manager can add a person they
            # were told about without being able to list everybody.
            exact = accounts_addable_to_projects().filter(username__iexact=search_term.strip())
            queryset = (queryset | exact).order_by("username")
            may_have_duplicates = True
        return queryset, may_have_duplicates


admin.site.unregister(User)
admin.site.register(User, RankwiseUserAdmin)


# --- annotation models -------------------------------------------------------


def _managed_projects(request: HttpRequest) -> QuerySet[Project]:
    return projects_for_user(user=request.user, role=Role.MANAGER)


class ManagedProjectFilter(admin.RelatedFieldListFilter):
    """ "By project", offering only the projects the person manages (all of them to a superuser).

    Django's own filter lists every project in the database, whatever the rows
    below it show; that named other managers' projects.
    """

    def field_choices(self, field: Any, request: HttpRequest, model_admin: Any) -> list[tuple[Any, str]]:
        projects = Project.objects.all() if _is_superuser(request) else _managed_projects(request)
        return [(project.pk, str(project)) for project in projects.order_by("name", "pk")]


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


# Lines named one by one after an import; beyond this a count says how many more.
IMPORT_NOTES_SHOWN = 20


def _import_line_notes(request: HttpRequest, report: ImportReport) -> None:
    """Which lines were skipped as duplicates and which prompts got no task, and why."""
    for title, notes in (
        (_("Duplicates skipped"), report.duplicates),
        (_("Prompts without a task"), report.without_task),
    ):
        if not notes:
            continue
        shown = "; ".join(f"line {line}: {reason}" for line, reason in notes[:IMPORT_NOTES_SHOWN])
        more = len(notes) - IMPORT_NOTES_SHOWN
        if more > 0:
            shown += " " + _("(and %(count)d more)") % {"count": more}
        messages.warning(request, f"{title}: {shown}")


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
        (_("Queue"), {"fields": ("task_order", "lease_minutes", "gold_rate", "gold_feedback")}),
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
                    _import_line_notes(request, report)
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


def _rows_outside_managed_projects(request: HttpRequest, admin_site: Any, obj: Any) -> bool:
    """Whether any row that points at `obj` lies outside what this person may see in the admin.

    A row of a model with an admin counts as visible when that admin's
    (project-scoped) queryset holds it; completions are placed by their
    prompt's project; a row of any other model counts as outside.
    """
    for relation in obj._meta.related_objects:
        if relation.many_to_many:
            continue
        rows = relation.related_model._default_manager.filter(**{relation.field.name: obj})
        related_admin = admin_site._registry.get(relation.related_model)
        if relation.related_model is Completion:
            outside = rows.exclude(prompt__project__in=_managed_projects(request))
        elif related_admin is not None:
            outside = rows.exclude(pk__in=related_admin.get_queryset(request).values("pk"))
        else:
            outside = rows
        if outside.exists():
            return True
    return False


@admin.register(Policy)
class PolicyAdmin(admin.ModelAdmin):
    """A manager sees the policies of the projects they manage, and of each only those projects.

    A policy shared with a project someone else manages (or with no project)
    is theirs to use, not to change: its change page is read-only. Deleting
    one also needs everything that refers to it to lie in their own
    projects: the delete page lists those rows, and the deletion would change them.
    """

    list_display = ("__str__", "kind", "base_model", "adapter", "projects_shown", "created_at")
    list_filter = ("kind", ("projects", ManagedProjectFilter))
    search_fields = ("name", "base_model")
    filter_horizontal = ("projects",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Policy]:
        managed = Project.objects.all() if _is_superuser(request) else _managed_projects(request)
        projects = Prefetch("projects", queryset=managed.order_by("name"), to_attr="projects_managed")
        return policies_for_user(user=request.user).prefetch_related(projects)

    @admin.display(description=_("projects"))
    def projects_shown(self, obj: Policy) -> str:
        # Only the person's own projects: another project sharing the policy stays out of sight.
        return ", ".join(project.name for project in getattr(obj, "projects_managed", []))

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = list(super().get_fields(request, obj))
        if obj is not None and not self.has_change_permission(request, obj):
            # Read-only: the projects field would list every project sharing the policy.
            fields = [("projects_shown" if name == "projects" else name) for name in fields]
        return fields

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        readonly = tuple(super().get_readonly_fields(request, obj))
        if obj is not None and not self.has_change_permission(request, obj):
            readonly += ("projects_shown",)
        return readonly

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "projects" and not _is_superuser(request):
            kwargs["queryset"] = _managed_projects(request)
            kwargs["required"] = True
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if not super().has_change_permission(request, obj):
            return False
        return obj is None or not policy_outside_reach(user=request.user, policy=obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if not super().has_delete_permission(request, obj):
            return False
        if obj is None or _is_superuser(request):
            return True
        return not policy_outside_reach(user=request.user, policy=obj) and not _rows_outside_managed_projects(
            request, self.admin_site, obj
        )

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> Any:
        # The bulk "delete selected" action lists the rows too, without asking has_delete_permission per row.
        if not _is_superuser(request) and any(
            policy_outside_reach(user=request.user, policy=obj)
            or _rows_outside_managed_projects(request, self.admin_site, obj)
            for obj in objs
        ):
            raise PermissionDenied
        return super().get_deleted_objects(objs, request)


@admin.register(Prompt)
class PromptAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "project", "is_chat", "created_at")
    list_filter = (("project", ManagedProjectFilter),)
    search_fields = ("external_id", "text")
    readonly_fields = ("project", "external_id", "text", "messages", "metadata", "content_hash")

    @admin.display(boolean=True, description=_("chat"))
    def is_chat(self, obj: Prompt) -> bool:
        return obj.is_chat


@admin.register(Task)
class TaskAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "project", "prompt", "is_gold", "judgment_count")
    list_filter = (("project", ManagedProjectFilter), "is_gold")
    list_select_related = ("project", "prompt")


@admin.register(Assignment)
class AssignmentAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "status", "slot", "leased_at", "lease_expires_at")
    list_filter = ("status", ("project", ManagedProjectFilter))
    list_select_related = ("user", "task")


@admin.register(Judgment)
class JudgmentAdmin(ReadOnlyAdmin):
    project_path = "task__project"
    list_display = ("__str__", "task", "none_acceptable", "active_seconds", "created_at")
    list_filter = (("task__project", ManagedProjectFilter), "none_acceptable")
    list_select_related = ("user", "task")


@admin.register(Comparison)
class ComparisonAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "project", "is_tie", "margin", "labeler", "created_at")
    list_filter = (("project", ManagedProjectFilter), "is_tie")
    list_select_related = ("project", "labeler")


# --- webhooks -------------------------------------------------------------------------


class WebhookForm(forms.ModelForm):
    url = forms.URLField(
        label=_("URL"),
        max_length=500,
        assume_scheme="https",
        help_text=_("Where each event is POSTed as JSON."),
    )
    events = forms.MultipleChoiceField(
        label=_("Events"),
        choices=Webhook.Event.choices,
        widget=forms.CheckboxSelectMultiple,
        help_text=_("The events sent to this address."),
    )
    secret = forms.CharField(
        label=_("Secret"),
        max_length=200,
        required=False,
        help_text=_("Signs every delivery (HMAC-SHA256). Left empty, a new random secret is made."),
    )

    class Meta:
        model = Webhook
        fields = ("project", "url", "events", "secret", "active")
        labels = {"project": _("Project"), "active": _("Active")}

    def clean_secret(self) -> str:
        return self.cleaned_data["secret"] or webhook_secret_new()


@admin.register(Webhook)
class WebhookAdmin(ProjectScopedAdmin):
    form = WebhookForm
    list_display = ("url", "project", "event_names", "active", "created_at")
    list_filter = (("project", ManagedProjectFilter), "active")
    list_select_related = ("project",)

    @admin.display(description=_("events"))
    def event_names(self, obj: Webhook) -> str:
        labels = dict(Webhook.Event.choices)
        return ", ".join(str(labels.get(event, event)) for event in obj.events)

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "project" and not _is_superuser(request):
            kwargs["queryset"] = _managed_projects(request)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def save_model(self, request: HttpRequest, obj: Webhook, form: ModelForm, change: bool) -> None:
        if not change:
            obj.created_by = request.user  # type: ignore[assignment]
        super().save_model(request, obj, form, change)


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    """The delivery log: what was sent where, how many attempts, and the receiver's last answer."""

    project_path = "webhook__project"
    list_display = (
        "event",
        "webhook",
        "attempts",
        "last_status_code",
        "delivered_at",
        "gave_up_at",
        "created_at",
    )
    list_filter = ("event", ("webhook__project", ManagedProjectFilter))
    list_select_related = ("webhook",)
    actions = ["deliveries_retry"]

    @admin.action(description=_("Try the selected undelivered deliveries again now"))
    def deliveries_retry(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        ids = webhook_deliveries_retry(ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(
            request, _("%(count)d deliveries queued again.") % {"count": len(ids)}, messages.SUCCESS
        )
