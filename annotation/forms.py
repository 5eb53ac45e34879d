"""Forms of the annotation side."""

from __future__ import annotations

from django import forms
from django.core.files.uploadedfile import UploadedFile
from django.utils.translation import gettext_lazy as _

from annotation.importing import bytes_display, import_limit


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
