"""A ranking project's models at work, on a manager's pages and in the API.

    /projects/<id>/judges                 model judges (training.judges): attach one, switch one off or
                                          on, run it again
    GET/POST /api/projects/<id>/judges    the same for programs
    /projects/<id>/continuous             continuous mode (training.continuous): a fresh reward model
                                          every so many judgments

404 for a project the person does not manage, as everywhere else.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_POST
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.decorators import api_view, permission_classes
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from annotation.models import Comparison, Judgment, Policy, Project, StatsSnapshot
from annotation.roles import Role, role_required
from annotation.selectors import project_get_for_user
from annotation.snapshots import stats_snapshot_get
from training.continuous import continuous_training_set, human_judgments
from training.judge_process import DEFAULT_TEMPLATE
from training.judges import (
    judge_attach,
    judge_calibration,
    judge_policies_for_user,
    judge_policy_for_base_model,
    judge_request,
)
from training.models import ContinuousTraining, Judge, JudgeJob, RewardModel, TrainingRun
from training.selectors import reward_models_for_user, training_runs_for_user


class JudgeAttachForm(forms.Form):
    reward_model = forms.ModelChoiceField(
        label=gettext_lazy("Reward model"),
        queryset=RewardModel.objects.none(),
        required=False,
        help_text=gettext_lazy(
            "It ranks each task's responses by its scores (a scoring job writes them first)."
        ),
    )
    policy = forms.ModelChoiceField(
        label=gettext_lazy("Or a language model (policy)"),
        queryset=Policy.objects.none(),
        required=False,
        help_text=gettext_lazy(
            "A causal language model prompted to rank: a judge job on the GPU queue shows it each task "
            "through the template below and reads which response it names best."
        ),
    )
    base_model = forms.CharField(
        label=gettext_lazy("Or a language model's base model"),
        required=False,
        max_length=500,
        help_text=gettext_lazy("Local path or hub id; it is registered as a policy."),
    )
    prompt_template = forms.CharField(
        label=gettext_lazy("Judge prompt template"),
        required=False,
        widget=forms.Textarea(attrs={"rows": 10}),
        initial=DEFAULT_TEMPLATE,
        help_text=gettext_lazy(
            "For a language model only. {prompt} and {candidates} are required; {labels} and {count} "
            "may be used; write literal braces doubled."
        ),
    )
    max_judgments = forms.IntegerField(
        label=gettext_lazy("At most this many judgments"),
        required=False,
        min_value=1,
        help_text=gettext_lazy("Empty: every task it may take, like any labeler."),
    )

    def __init__(self, *args: Any, user: AbstractBaseUser | AnonymousUser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["reward_model"].queryset = reward_models_for_user(user=user)  # type: ignore[attr-defined]
        self.fields["policy"].queryset = judge_policies_for_user(user=user)  # type: ignore[attr-defined]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        given = [name for name in ("reward_model", "policy", "base_model") if data.get(name)]
        if len(given) != 1:
            raise ValidationError(
                _("Choose one: a reward model, a language model (policy), or a base model to register.")
            )
        return data


def judges_table(*, project: Project) -> list[dict[str, Any]]:
    """Each judge of the project with its judgments, agreement with the humans' majority and gold accuracy."""
    judges = list(Judge.objects.filter(project=project).select_related("reward_model", "policy", "account"))
    if not judges:
        return []
    live = Comparison.objects.filter(project=project).exclude(judgment__review=Judgment.Review.REJECTED)
    calibration = {row.user_id: row for row in judge_calibration(comparisons=live)}
    # Gold accuracy as the per-labeler table has it: read from the statistics snapshot, not recomputed here.
    labelers = stats_snapshot_get(project=project, kind=StatsSnapshot.Kind.PROJECT).payload.get(
        "labelers", []
    )
    gold = {
        row["user_id"]: {"judged": row["gold_judged"], "accuracy": row["gold_accuracy"]} for row in labelers
    }
    latest_jobs: dict[int, JudgeJob] = {}
    for job in JudgeJob.objects.filter(judge__in=judges).order_by("-created_at", "-id"):
        latest_jobs.setdefault(job.judge_id, job)
    rows = []
    for judge in judges:
        measured = calibration.get(judge.account_id)
        judged_gold = gold.get(judge.account_id)
        rows.append(
            {
                "judge": judge,
                "pairs_shared": measured.pairs if measured else 0,
                "agreement": measured.agreement if measured else None,
                "gold_judged": judged_gold["judged"] if judged_gold else 0,
                "gold_accuracy": judged_gold["accuracy"] if judged_gold else None,
                "job": latest_jobs.get(judge.pk),
            }
        )
    return rows


def _judge_attach_from(*, project: Project, user: Any, data: dict[str, Any]) -> Judge:
    """`judge_attach` from a form's or a request's fields; a base model is registered as a policy first
    (and not at all when the judge is refused)."""
    with transaction.atomic():
        policy = data.get("policy")
        if data.get("base_model"):
            policy = judge_policy_for_base_model(
                base_model=data["base_model"], project=project, created_by=user
            )
        return judge_attach(
            project=project,
            reward_model=data.get("reward_model"),
            policy=policy,
            prompt_template=data.get("prompt_template") or "",
            created_by=user,
            max_judgments=data.get("max_judgments"),
        )


@role_required(Role.MANAGER)
def project_judges(request: HttpRequest, project_id: int) -> HttpResponse:
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    form = JudgeAttachForm(request.POST or None, user=request.user)
    status_code = 200
    if request.method == "POST" and form.is_valid():
        try:
            judge = _judge_attach_from(project=project, user=request.user, data=form.cleaned_data)
        except ValidationError as error:
            for field, field_messages in error.message_dict.items():
                form.add_error(field if field in form.fields else None, field_messages)
            status_code = 400
        else:
            messages.success(
                request,
                _("%(model)s now judges this project as %(account)s.")
                % {"model": judge.model_name, "account": judge.account.username},
            )
            return redirect("project-judges", project.pk)
    context = {"project": project, "form": form, "rows": judges_table(project=project)}
    return render(request, "training/project_judges.html", context, status=status_code)


@require_POST
@role_required(Role.MANAGER)
def project_judge_action(request: HttpRequest, project_id: int, judge_id: int, action: str) -> HttpResponse:
    """Switch a judge off or on, or run it again (it takes the tasks left to it)."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    judge = get_object_or_404(Judge, pk=judge_id, project=project)
    if action == "off":
        Judge.objects.filter(pk=judge.pk).update(active=False)
        messages.success(request, _("The judge was switched off: it takes no more tasks."))
    elif action == "on":
        Judge.objects.filter(pk=judge.pk).update(active=True)
        judge_request(judge_id=judge.pk)
        messages.success(request, _("The judge was switched on and asked to run."))
    elif action == "run":
        judge_request(judge_id=judge.pk)
        messages.success(request, _("The judge was asked to run."))
    else:
        return HttpResponse(status=404)
    return redirect("project-judges", project.pk)


# --- continuous mode ------------------------------------------------------------------


class ContinuousTrainingForm(forms.Form):
    template_run = forms.ModelChoiceField(
        label=gettext_lazy("Template reward run"),
        queryset=TrainingRun.objects.none(),
        help_text=gettext_lazy(
            "Each cycle copies its dataset build's options and its settings (base model, PEFT, trainer, "
            "hyper-parameters). Reward runs on builds that read this project."
        ),
    )
    every_judgments = forms.IntegerField(
        label=gettext_lazy("Every this many new judgments"), min_value=1, initial=200
    )
    active = forms.BooleanField(label=gettext_lazy("On"), required=False, initial=True)

    def __init__(
        self, *args: Any, user: AbstractBaseUser | AnonymousUser, project: Project, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.fields["template_run"].queryset = training_runs_for_user(user=user).filter(  # type: ignore[attr-defined]
            kind=TrainingRun.Kind.REWARD, dataset_build__projects=project
        )


@role_required(Role.MANAGER)
def project_continuous(request: HttpRequest, project_id: int) -> HttpResponse:
    """Continuous mode of a ranking project: set it, and see where its cycle is."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    mode = (
        ContinuousTraining.objects.filter(project=project)
        .select_related("template_run", "current_build", "current_run", "current_scoring")
        .first()
    )
    initial = (
        {"template_run": mode.template_run, "every_judgments": mode.every_judgments, "active": mode.active}
        if mode
        else None
    )
    form = ContinuousTrainingForm(request.POST or None, user=request.user, project=project, initial=initial)
    status_code = 200
    if request.method == "POST" and form.is_valid():
        try:
            continuous_training_set(project=project, created_by=request.user, **form.cleaned_data)
        except ValidationError as error:
            for field, field_messages in error.message_dict.items():
                form.add_error(field if field in form.fields else None, field_messages)
            status_code = 400
        else:
            messages.success(request, _("Continuous mode was saved."))
            return redirect("project-continuous", project.pk)
    context = {
        "project": project,
        "form": form,
        "mode": mode,
        "judged": human_judgments(project=project),
    }
    return render(request, "training/project_continuous.html", context, status=status_code)


# --- API -------------------------------------------------------------------------------


class JudgeRequestSerializer(serializers.Serializer):
    reward_model = serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,
        help_text="Id of a reward model trained on projects you manage.",
    )
    policy = serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,
        help_text="Or the id of a model policy (a causal LM) of a project you manage, prompted to rank.",
    )
    base_model = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=500,
        help_text="Or a causal LM's local path or hub id (registered as a policy), prompted to rank.",
    )
    prompt_template = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        help_text="A language-model judge's prompt: {prompt} and {candidates} required, {labels} and {count} "
        "optional (empty: the default template).",
    )
    max_judgments = serializers.IntegerField(required=False, allow_null=True, default=None, min_value=1)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        given = [name for name in ("reward_model", "policy", "base_model") if attrs.get(name)]
        if len(given) != 1:
            raise serializers.ValidationError("give exactly one of reward_model, policy and base_model")
        return attrs


class JudgeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    kind = serializers.CharField()
    reward_model = serializers.IntegerField(allow_null=True)
    policy = serializers.IntegerField(allow_null=True, help_text="A language-model judge's policy.")
    prompt_template = serializers.CharField(help_text="A language-model judge's prompt template.")
    answers_unreadable = serializers.IntegerField(
        help_text="Tasks whose answer from a language-model judge could not be read: skipped, left to people."
    )
    job_status = serializers.CharField(
        allow_null=True, help_text="A language-model judge's latest judge job (reading the open tasks)."
    )
    account = serializers.CharField(help_text="The judge's labeler account (marked as a model).")
    active = serializers.BooleanField()
    max_judgments = serializers.IntegerField(allow_null=True)
    judgments_made = serializers.IntegerField()
    pairs_shared_with_humans = serializers.IntegerField()
    agreement_with_humans = serializers.FloatField(allow_null=True)
    gold_judged = serializers.IntegerField()
    gold_accuracy = serializers.FloatField(allow_null=True)
    last_error = serializers.CharField()


def _judge_payload(row: dict[str, Any]) -> dict[str, Any]:
    judge = row["judge"]
    return {
        "id": judge.pk,
        "kind": judge.kind,
        "reward_model": judge.reward_model_id,
        "policy": judge.policy_id,
        "prompt_template": judge.prompt_template,
        "answers_unreadable": judge.answers_unreadable,
        "job_status": row["job"].status if row["job"] is not None else None,
        "account": judge.account.username,
        "active": judge.active,
        "max_judgments": judge.max_judgments,
        "judgments_made": judge.judgments_made,
        "pairs_shared_with_humans": row["pairs_shared"],
        "agreement_with_humans": row["agreement"],
        "gold_judged": row["gold_judged"],
        "gold_accuracy": row["gold_accuracy"],
        "last_error": judge.last_error,
    }


@extend_schema(methods=["GET"], responses={200: JudgeSerializer(many=True)})
@extend_schema(methods=["POST"], request=JudgeRequestSerializer, responses={201: JudgeSerializer})
@api_view(["GET", "POST"])
@permission_classes([IsAuthenticated])
def project_judges_api(request: Request, project_id: int) -> Response:
    """A project's model judges (GET), or attach one (POST): a reward model, or a causal LM prompted to rank
    (a policy, or a base model registered as one); managers of the project only."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    if request.method == "POST":
        given = JudgeRequestSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        data = dict(given.validated_data)
        if data["reward_model"] is not None:
            data["reward_model"] = (
                reward_models_for_user(user=request.user).filter(pk=data["reward_model"]).first()
            )
            if data["reward_model"] is None:
                raise serializers.ValidationError(
                    {"reward_model": ["no such reward model among those trained on projects you manage"]}
                )
        if data["policy"] is not None:
            data["policy"] = judge_policies_for_user(user=request.user).filter(pk=data["policy"]).first()
            if data["policy"] is None:
                raise serializers.ValidationError(
                    {"policy": ["no such model policy among those of projects you manage"]}
                )
        judge = _judge_attach_from(project=project, user=request.user, data=data)
        row = next(row for row in judges_table(project=project) if row["judge"].pk == judge.pk)
        return Response(JudgeSerializer(_judge_payload(row)).data, status=status.HTTP_201_CREATED)
    return Response([JudgeSerializer(_judge_payload(row)).data for row in judges_table(project=project)])
