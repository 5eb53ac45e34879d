"""A project's webhooks on its manager pages: add one, switch it on or off, read the recent deliveries.

The admin offers the same with every field; this page is the everyday door.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _
from django.views.decorators.http import require_POST

from annotation.models import Webhook, WebhookDelivery
from annotation.roles import Role, role_required
from annotation.selectors import project_get_for_user
from annotation.webhooks import webhook_create

RECENT_DELIVERIES = 25


class WebhookNewForm(forms.Form):
    url = forms.URLField(
        label=_("URL"),
        max_length=500,
        assume_scheme="https",
        help_text=_("Where each event is POSTed as JSON."),
    )
    events = forms.MultipleChoiceField(
        label=_("Events"), choices=Webhook.Event.choices, widget=forms.CheckboxSelectMultiple
    )
    secret = forms.CharField(
        label=_("Secret"),
        max_length=200,
        required=False,
        help_text=_("Signs every delivery (HMAC-SHA256). Left empty, a new random secret is made."),
    )


@role_required(Role.MANAGER)
def project_webhooks(request: HttpRequest, project_id: int) -> HttpResponse:
    """The project's webhooks with their secrets, a form to add one, and the latest deliveries."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    form = WebhookNewForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        webhook_create(project=project, created_by=request.user, **form.cleaned_data)
        messages.success(request, gettext("Webhook added."))
        return redirect("project-webhooks", project.pk)
    context = {
        "project": project,
        "form": form,
        "webhooks": Webhook.objects.filter(project=project).order_by("id"),
        "deliveries": WebhookDelivery.objects.filter(webhook__project=project)
        .select_related("webhook")
        .order_by("-created_at", "-id")[:RECENT_DELIVERIES],
    }
    return render(
        request, "annotation/manage/project_webhooks.html", context, status=400 if form.errors else 200
    )


@require_POST
@role_required(Role.MANAGER)
def project_webhook_toggle(request: HttpRequest, project_id: int, webhook_id: int) -> HttpResponse:
    """Switch a webhook of the project on or off (404 for another project's)."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    webhook = get_object_or_404(Webhook, pk=webhook_id, project=project)
    Webhook.objects.filter(pk=webhook.pk).update(active=not webhook.active)
    return redirect("project-webhooks", project.pk)
