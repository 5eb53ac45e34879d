"""Forms of the annotation side."""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import UploadedFile
from django.utils.translation import gettext_lazy as _

from annotation.importing import bytes_display, import_limit
from annotation.models import MAX_K, MIN_K, Project
from annotation.roles import Role


class PromptImportForm(forms.Form):
    """Upload of a JSON Lines file of prompts; `annotation.importing.prompts_import` reads it."""

    file = forms.FileField(
        label=_("Prompts file (JSON Lines)"),
        help_text=_(
            'One JSON object per line: {"id": …, "prompt": "text" or [{role, content}, …], '
            '"completions": [{"text": …, "policy": …, "gold_rank": …}], "metadata": {…}}.'
        ),
    )

    def clean_file(self) -> UploadedFile:
        upload: UploadedFile = self.cleaned_data["file"]
        limit = import_limit("IMPORT_MAX_BYTES")
        if upload.size is not None and upload.size > limit:
            raise forms.ValidationError(
                _("The file is %(size)s; the limit is %(limit)s. Split it into smaller files."),
                code="file_too_large",
                params={"size": bytes_display(upload.size), "limit": bytes_display(limit)},
            )
        return upload


class MemberAddForm(forms.Form):
    """Add a person to a project by their exact username (the page lists nobody)."""

    username = forms.CharField(
        max_length=150, label=_("Username"), help_text=_("The exact username of an existing account.")
    )


class FlagListWidget(forms.Widget):
    """Flags as rows of one text input each (all named `flags`); the page's script adds, removes and moves rows.

    Without the script the page still works: it shows two blank rows to fill,
    and a row emptied is a flag removed.
    """

    template_name = "annotation/manage/_flag_rows.html"
    blank_rows = 2

    def value_from_datadict(self, data: Any, files: Any, name: str) -> list[str]:
        return list(data.getlist(name)) if hasattr(data, "getlist") else list(data.get(name) or [])

    def value_omitted_from_data(self, data: Any, files: Any, name: str) -> bool:
        return False  # no row sent means no flags

    def get_context(self, name: str, value: Any, attrs: Any) -> dict[str, Any]:
        context = super().get_context(name, value, attrs)
        rows = [flag for flag in (value or []) if isinstance(flag, str)]
        context["widget"]["rows"] = [*rows, *([""] * self.blank_rows)]
        return context

    def render(self, name: str, value: Any, attrs: Any = None, renderer: Any = None) -> str:
        # The project's template folder, which the default form renderer does not search.
        from django.template.loader import render_to_string
        from django.utils.safestring import mark_safe

        return mark_safe(render_to_string(self.template_name, self.get_context(name, value, attrs)))  # noqa: S308


class FlagListField(forms.Field):
    widget = FlagListWidget

    def to_python(self, value: Any) -> list[str]:
        from annotation.projects import project_flags_clean

        return project_flags_clean(list(value or []))

    def prepare_value(self, value: Any) -> Any:
        return value


class ProjectForm(forms.Form):
    """Every setting of a project, as named, typed fields; `annotation.projects` checks them together."""

    name = forms.CharField(max_length=200, label=_("Name"))
    kind = forms.ChoiceField(
        choices=Project.Kind.choices,
        label=_("Kind"),
        help_text=_("Ranking: people order K outputs. Blind A/B: two outputs at a time (K is 2)."),
    )
    instructions = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 6}),
        label=_("Instructions"),
        help_text=_("Markdown, shown to every labeler above each task."),
    )
    is_active = forms.BooleanField(
        required=False, initial=True, label=_("Active"), help_text=_("Only active projects hand out tasks.")
    )
    k = forms.IntegerField(
        min_value=MIN_K,
        max_value=MAX_K,
        initial=4,
        label=_("K"),
        help_text=_(
            "Outputs judged together in one task (2–9; 2 for A/B). Fixed once the project has tasks."
        ),
    )
    overlap = forms.IntegerField(
        min_value=1, max_value=50, initial=1, label=_("Judgments per task"), help_text=_("Overlap.")
    )
    ties_allowed = forms.BooleanField(required=False, initial=True, label=_("Ties allowed"))
    likert_enabled = forms.BooleanField(
        required=False, label=_("Likert ratings"), help_text=_("Ask for a 1–7 rating of each output.")
    )
    flags = FlagListField(
        required=False,
        label=_("Flags"),
        help_text=_("Marks a labeler may put on an output, e.g. harmful. One per row, in the order shown."),
    )
    rationale_required = forms.BooleanField(required=False, label=_("Rationale required"))
    task_order = forms.ChoiceField(
        choices=Project.TaskOrder.choices,
        label=_("Task order"),
        help_text=_("Uncertainty needs a reward model scoring the project (its scoring page)."),
    )
    lease_minutes = forms.IntegerField(
        min_value=1,
        max_value=24 * 60,
        initial=30,
        label=_("Lease minutes"),
        help_text=_("How long a person keeps a task before it goes to someone else."),
    )
    gold_rate = forms.FloatField(
        min_value=0,
        max_value=1,
        initial=0.0,
        label=_("Gold rate"),
        help_text=_("Share of tasks shown that are gold, from 0 to 1 (0.1: one in ten)."),
    )
    gold_feedback = forms.BooleanField(
        required=False,
        label=_("Gold feedback"),
        help_text=_("Right after a labeler submits a gold task, show them the expected ranking."),
    )

    @classmethod
    def initial_from(cls, project: Project) -> dict[str, Any]:
        from annotation.projects import PROJECT_SETTINGS

        return {name: getattr(project, name) for name in PROJECT_SETTINGS}

    def add_service_errors(self, error: ValidationError) -> None:
        """Errors of `annotation.projects` on the fields they name; others above the form."""
        for field, messages in error.message_dict.items():
            self.add_error(field if field in self.fields else None, messages)


class MemberForm(forms.Form):
    """Add an existing account to a project with a role, by exact username (the page lists nobody)."""

    username = forms.CharField(
        max_length=150, label=_("Username"), help_text=_("The exact username of an existing account.")
    )
    role = forms.ChoiceField(choices=(), label=_("Role"))

    def __init__(self, *args: Any, roles: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["role"].choices = [(role, Role(role).label) for role in roles]  # type: ignore[attr-defined]


class MemberRoleForm(forms.Form):
    role = forms.ChoiceField(choices=(), label=_("Role"))

    def __init__(self, *args: Any, roles: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["role"].choices = [(role, Role(role).label) for role in roles]  # type: ignore[attr-defined]
