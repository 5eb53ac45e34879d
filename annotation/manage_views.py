"""Manager pages of a project: its settings and its members.

Each view finds the project through the access helpers in selectors (404 for
a project the person does not manage) and calls one function of
`annotation.projects`.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.translation import gettext
from django.views.decorators.http import require_POST

from annotation.forms import MemberForm, MemberRoleForm, ProjectForm, PromptImportForm
from annotation.importing import ImportValidationError, prompts_import
from annotation.projects import (
    member_roles_for_project,
    membership_get_for_manager,
    project_create,
    project_member_add_with_role,
    project_member_remove,
    project_member_role_change,
    project_memberships,
    project_update,
)
from annotation.roles import Role, role_required
from annotation.selectors import project_get_for_user
from annotation.services import MemberInvalid


@role_required(Role.MANAGER)
def project_new(request: HttpRequest) -> HttpResponse:
    """A new project with every setting; its creator manages it."""
    form = ProjectForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            project = project_create(created_by=request.user, **form.cleaned_data)
        except ValidationError as error:
            form.add_service_errors(error)
        else:
            messages.success(request, gettext("Project “%(name)s” created.") % {"name": project.name})
            return redirect("project-settings", project.pk)
    status = 400 if form.errors else 200
    return render(
        request, "annotation/manage/project_form.html", {"form": form, "project": None}, status=status
    )


@role_required(Role.MANAGER)
def project_settings(request: HttpRequest, project_id: int) -> HttpResponse:
    """Edit every setting of a project the person manages (404 otherwise); all saved or nothing."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    form = ProjectForm(request.POST or None, initial=ProjectForm.initial_from(project))
    if request.method == "POST" and form.is_valid():
        try:
            project = project_update(project=project, **form.cleaned_data)
        except ValidationError as error:
            form.add_service_errors(error)
        else:
            messages.success(request, gettext("Settings saved."))
            return redirect("project-settings", project.pk)
    context = {"form": form, "project": project, "has_tasks": project.tasks.exists()}
    return render(request, "annotation/manage/project_form.html", context, status=400 if form.errors else 200)


@role_required(Role.MANAGER)
def project_members(request: HttpRequest, project_id: int) -> HttpResponse:
    """The project's members and roles; add an account by exact username (the page lists nobody else)."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    roles = member_roles_for_project(project=project)
    form = MemberForm(request.POST or None, roles=roles)
    if request.method == "POST" and form.is_valid():
        try:
            membership = project_member_add_with_role(
                project=project, username=form.cleaned_data["username"], role=form.cleaned_data["role"]
            )
        except MemberInvalid as error:
            form.add_error("username", str(error))
        else:
            messages.success(
                request,
                gettext("%(name)s is now a %(role)s in this project.")
                % {"name": membership.user.get_username(), "role": Role(membership.role).label.lower()},
            )
            return redirect("project-members", project.pk)
    rows = [
        {"membership": membership, "editable": membership.role in roles}
        for membership in project_memberships(project=project)
    ]
    context = {
        "project": project,
        "form": form,
        "rows": rows,
        "roles": [(role, Role(role).label) for role in roles],
    }
    return render(
        request, "annotation/manage/project_members.html", context, status=400 if form.errors else 200
    )


@require_POST
@role_required(Role.MANAGER)
def project_member_change(request: HttpRequest, project_id: int, membership_id: int) -> HttpResponse:
    """Change a member's role, or remove them (`action=remove`), in a project the person manages."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    membership = membership_get_for_manager(user=request.user, pk=membership_id)
    if membership.project_id != project.pk:
        raise Http404("No such member.")
    name = membership.user.get_username()
    try:
        if request.POST.get("action") == "remove":
            project_member_remove(membership=membership)
            messages.success(request, gettext("%(name)s was removed from the project.") % {"name": name})
        else:
            form = MemberRoleForm(request.POST, roles=member_roles_for_project(project=project))
            if not form.is_valid():
                raise MemberInvalid(gettext("Choose one of the roles offered."))
            changed = project_member_role_change(membership=membership, role=form.cleaned_data["role"])
            messages.success(
                request,
                gettext("%(name)s is now a %(role)s in this project.")
                % {"name": name, "role": Role(changed.role).label.lower()},
            )
    except MemberInvalid as error:
        messages.error(request, str(error))
    return redirect("project-members", project.pk)


# Lines named one by one after an import; beyond this a count says how many more.
IMPORT_NOTES_SHOWN = 20


@role_required(Role.MANAGER)
def project_import(request: HttpRequest, project_id: int) -> HttpResponse:
    """Upload a JSON Lines file of prompts (and completions) into a project the person manages.

    Every bad line is listed and nothing is written then (annotation.importing).
    """
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    form = PromptImportForm(request.POST or None, request.FILES or None)
    errors: list[Any] = []
    if request.method == "POST" and form.is_valid():
        try:
            report = prompts_import(project=project, data=form.cleaned_data["file"])
        except ImportValidationError as error:
            errors = error.errors
        else:
            messages.success(
                request,
                gettext(
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
            for title, notes in (
                (gettext("Duplicates skipped"), report.duplicates),
                (gettext("Prompts without a task"), report.without_task),
            ):
                if notes:
                    shown = "; ".join(
                        gettext("line %(line)s: %(reason)s") % {"line": line, "reason": reason}
                        for line, reason in notes[:IMPORT_NOTES_SHOWN]
                    )
                    if len(notes) > IMPORT_NOTES_SHOWN:
                        shown += " " + gettext("(and %(count)d more)") % {
                            "count": len(notes) - IMPORT_NOTES_SHOWN
                        }
                    messages.warning(request, f"{title}: {shown}")
            return redirect("project-import", project.pk)
    status = 400 if errors or form.errors else 200
    context = {"project": project, "form": form, "errors": errors, "prompts": project.prompts.count()}
    return render(request, "annotation/manage/project_import.html", context, status=status)
