"""The JSON API for dataset builds: create one, list them, read one's state and files.

Views parse input, find objects through the access helpers (404 for a build
the caller may not see) and call one service.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Prefetch
from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from annotation.models import Project
from annotation.pagination import CURSOR_PARAMETERS, api_page, paginated_schema
from annotation.serializers import ProblemSerializer
from config import health
from config.problems import PROBLEM_CONTENT_TYPE as PROBLEM
from training.models import DatasetBuild, TrainingRun
from training.run_settings import RL, RUN_SETTINGS, RUN_SETTINGS_BY_NAME, RunSetting
from training.selectors import (
    dataset_build_files,
    dataset_build_get_for_user,
    dataset_build_options,
    dataset_builds_for_user,
    labeler_choices_for_builds,
    project_choices_for_builds,
    reward_models_for_user,
    training_run_get_for_user,
    training_runs_for_user,
)
from training.services import (
    QueueUnavailable,
    dataset_build_create,
    training_run_cancel,
    training_run_create,
)

BUILD_QUEUE_UNREACHABLE = (
    "The job queue (Redis) cannot be reached, so the build was not created. "
    "Check that Redis is running and REDIS_URL points at it, then try again."
)


class DatasetBuildRequestSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    projects = serializers.ListField(child=serializers.IntegerField(), min_length=1)
    labelers = serializers.ListField(child=serializers.IntegerField(), required=False, default=list)
    date_from = serializers.DateField(required=False, allow_null=True, default=None)
    date_to = serializers.DateField(required=False, allow_null=True, default=None)
    min_gold_accuracy = serializers.FloatField(required=False, allow_null=True, default=None)
    exclude_flagged = serializers.BooleanField(required=False, default=False)
    aggregation = serializers.ChoiceField(
        choices=DatasetBuild.Aggregation.choices, default=DatasetBuild.Aggregation.EVERY_VOTE
    )
    agreement_threshold = serializers.FloatField(required=False, default=0.5)
    ties = serializers.ChoiceField(choices=DatasetBuild.Ties.choices, default=DatasetBuild.Ties.DROP)
    margin = serializers.ChoiceField(choices=DatasetBuild.Margin.choices, default=DatasetBuild.Margin.NONE)
    format = serializers.ChoiceField(
        choices=DatasetBuild.Format.choices, default=DatasetBuild.Format.STANDARD
    )
    test_fraction = serializers.FloatField(required=False, default=0.1)
    seed = serializers.IntegerField(required=False, default=0, min_value=0)
    near_duplicate_threshold = serializers.FloatField(required=False, default=0.6)
    sft_in_preferences = serializers.BooleanField(
        required=False,
        default=True,
        help_text="SFT rows on the same prompts as the preference rows (true), or on the other half of them.",
    )
    sources = serializers.ChoiceField(
        choices=DatasetBuild.Sources.choices,
        default=DatasetBuild.Sources.HUMANS,
        help_text="Whose judgments are data: humans, humans and model judges, or judges calibrated against humans.",
    )
    judge_agreement_min = serializers.FloatField(
        required=False,
        default=0.7,
        help_text="Calibrated judges: the least share of pairs on which a judge agrees with the humans' majority.",
    )


class DatasetBuildSerializer(serializers.Serializer):
    """The response shape (documentation for the schema; the payload is built by `_payload`)."""

    id = serializers.IntegerField()
    name = serializers.CharField()
    status = serializers.ChoiceField(choices=DatasetBuild.Status.choices)
    progress = serializers.FloatField()
    counts = serializers.DictField()
    content_hash = serializers.CharField()
    error = serializers.CharField()
    options = serializers.DictField()
    files = serializers.ListField(child=serializers.DictField())
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    url = serializers.CharField()


def _payload(request: Request, build: DatasetBuild) -> dict[str, Any]:
    files = [
        {
            **file,
            "url": request.build_absolute_uri(
                reverse("dataset-build-file", kwargs={"build_id": build.pk, "key": file["key"]})
            ),
        }
        for file in dataset_build_files(build=build)
    ]
    return {
        "id": build.pk,
        "name": build.name,
        "status": build.status,
        "progress": build.progress,
        "counts": build.counts,
        "content_hash": build.content_hash,
        "error": build.error,
        "options": dataset_build_options(build=build),
        "files": files,
        "created_at": build.created_at.isoformat(),
        "started_at": build.started_at.isoformat() if build.started_at else None,
        "finished_at": build.finished_at.isoformat() if build.finished_at else None,
        "url": request.build_absolute_uri(reverse("dataset-build-detail", kwargs={"build_id": build.pk})),
    }


@extend_schema(
    methods=["POST"],
    request=DatasetBuildRequestSerializer,
    responses={
        201: DatasetBuildSerializer,
        (400, PROBLEM): ProblemSerializer,
        (503, PROBLEM): ProblemSerializer,
    },
)
@extend_schema(
    methods=["GET"],
    responses=paginated_schema(DatasetBuildSerializer, "DatasetBuild"),
    operation_id="dataset_builds_list",
    parameters=CURSOR_PARAMETERS,
)
@api_view(["GET", "POST"])
def dataset_build_list_create(request: Request) -> Response:
    """GET: the builds you may see (you manage all their projects), newest first, a page at a time.
    POST: start a build of projects you manage; it is queued and runs on a worker."""
    if request.method == "GET":
        builds = dataset_builds_for_user(user=request.user).prefetch_related(
            Prefetch("projects", queryset=Project.objects.only("pk")),
            Prefetch("labelers", queryset=get_user_model().objects.only("pk")),
        )
        return api_page(request, builds, lambda page: [_payload(request, build) for build in page])

    serializer = DatasetBuildRequestSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    data = dict(serializer.validated_data)
    project_ids = set(data.pop("projects"))
    projects = list(project_choices_for_builds(user=request.user).filter(pk__in=project_ids))
    if len(projects) != len(project_ids):
        # Projects the caller does not manage are as unknown as ones that do not exist.
        raise serializers.ValidationError({"projects": ["unknown project id(s); use projects you manage"]})
    labeler_ids = set(data.pop("labelers"))
    labelers = list(labeler_choices_for_builds(user=request.user).filter(pk__in=labeler_ids))
    if len(labelers) != len(labeler_ids):
        raise serializers.ValidationError(
            {"labelers": ["unknown labeler id(s); use people who judge in projects you manage"]}
        )
    if not health.broker_reachable():
        # Checked first, as for runs: the build is queued on commit, and a publish that
        # fails there would answer 500 and leave a build queued forever.
        raise QueueUnavailable(BUILD_QUEUE_UNREACHABLE)
    build = dataset_build_create(created_by=request.user, projects=projects, labelers=labelers, **data)
    return Response(_payload(request, build), status=status.HTTP_201_CREATED)


@extend_schema(responses=DatasetBuildSerializer)
@api_view(["GET"])
def dataset_build_detail(request: Request, build_id: int) -> Response:
    """A build's state, counts, options and file links."""
    build = dataset_build_get_for_user(user=request.user, pk=build_id)
    return Response(_payload(request, build))


# --- training runs ------------------------------------------------------------------


def _setting_field(setting: RunSetting) -> serializers.Field:
    """The API field of a run setting: type, bounds and words from RUN_SETTINGS; optional, as the spec defaults."""
    rule = f"{setting.name} must be {setting.rule()}."
    common: dict[str, Any] = {
        "required": False,
        "allow_null": setting.nullable,
        "help_text": f"{setting.help or setting.label + '.'} {rule}",
    }
    if setting.choices:
        return serializers.ChoiceField(choices=setting.choices, allow_blank="" in setting.choices, **common)
    if setting.type is bool:
        return serializers.BooleanField(**common)
    if setting.type is list:
        return serializers.ListField(child=serializers.CharField(), **common)

    def check(value: Any) -> None:
        problem = setting.problem(value)
        if problem:
            raise serializers.ValidationError(problem)

    # Inclusive bounds are the field's own, so the schema shows them; a setting with a strict bound or an
    # extra allowed value is checked by its own rule, which then words every bound (one message, not two).
    field_class = serializers.IntegerField if setting.type is int else serializers.FloatField
    if setting.strict:
        return field_class(validators=[check], **common)
    return field_class(min_value=setting.minimum, max_value=setting.maximum, **common)


class RunHyperparametersSerializer(serializers.Serializer):
    """Every run setting (training.run_settings), each optional; a name that is not one is refused."""

    def get_fields(self) -> dict[str, serializers.Field]:
        return {setting.name: _setting_field(setting) for setting in RUN_SETTINGS}

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - RUN_SETTINGS_BY_NAME.keys())
            if unknown:
                # A misspelt setting that is silently ignored trains the wrong model.
                raise serializers.ValidationError(
                    {name: [f"{name} is not a run setting"] for name in unknown}
                )
        return super().to_internal_value(data)


# The RL settings the API also names at the top level; they join the hyper-parameters.
RL_SETTINGS = tuple(setting.name for setting in RUN_SETTINGS if setting.kinds == (RL,))


class TrainingRunRequestSerializer(serializers.Serializer):
    dataset_build = serializers.IntegerField()
    kind = serializers.ChoiceField(choices=TrainingRun.Kind.choices)
    base_model = serializers.CharField(max_length=500)
    peft = serializers.ChoiceField(choices=TrainingRun.Peft.choices, default=TrainingRun.Peft.LORA)
    gpus = serializers.IntegerField(
        min_value=1, default=1, help_text="GPUs the run takes, one process each (at most TRAINING_MAX_GPUS)."
    )
    distributed = serializers.ChoiceField(
        choices=TrainingRun.Distributed.choices,
        default=TrainingRun.Distributed.DDP,
        help_text="How several GPUs share the run: ddp, fsdp, deepspeed_zero2 or deepspeed_zero3.",
    )
    trainer = serializers.ChoiceField(
        choices=TrainingRun.Trainer.choices, default=TrainingRun.Trainer.GROUPED
    )
    name = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)
    hyperparameters = RunHyperparametersSerializer(
        required=False,
        default=dict,
        help_text="The run's settings, each as the run spec names it; unknown names are refused.",
    )
    against_reward_model = serializers.IntegerField(
        required=False, allow_null=True, default=None, help_text="RL only: id of the trained reward model."
    )

    def get_fields(self) -> dict[str, serializers.Field]:
        # RL runs: the named settings beside the reward model, merged into the hyper-parameters.
        return {
            **super().get_fields(),
            **{name: _setting_field(RUN_SETTINGS_BY_NAME[name]) for name in RL_SETTINGS},
        }


class TrainingRunSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    kind = serializers.CharField()
    status = serializers.CharField()
    dataset_build = serializers.IntegerField()
    base_model = serializers.CharField()
    peft = serializers.CharField()
    trainer = serializers.CharField()
    gpus = serializers.IntegerField()
    distributed = serializers.CharField()
    hyperparameters = serializers.DictField()
    attempts = serializers.IntegerField()
    step = serializers.IntegerField()
    total_steps = serializers.IntegerField()
    progress = serializers.FloatField()
    metrics = serializers.DictField()
    error = serializers.CharField(allow_blank=True)
    policy = serializers.IntegerField(allow_null=True)
    reward_model = serializers.IntegerField(allow_null=True)
    against_reward_model = serializers.IntegerField(allow_null=True)
    url = serializers.CharField()


def _run_payload(run: TrainingRun) -> dict[str, Any]:
    reward_model = getattr(run, "reward_model", None) if run.status == TrainingRun.Status.SUCCEEDED else None
    return {
        "id": run.pk,
        "name": run.name,
        "kind": run.kind,
        "status": run.status,
        "dataset_build": run.dataset_build_id,
        "base_model": run.base_model,
        "peft": run.peft,
        "trainer": run.trainer,
        "gpus": run.gpus,
        "distributed": run.distributed,
        "hyperparameters": run.hyperparameters,
        "attempts": run.attempts,
        "step": run.step,
        "total_steps": run.total_steps,
        "progress": run.progress,
        "metrics": run.metrics,
        "error": run.error,
        "policy": run.policy_id,
        "reward_model": reward_model.pk if reward_model else None,
        "against_reward_model": run.against_reward_model_id,
        "url": reverse("training-run-detail", args=[run.pk]),
    }


@extend_schema(
    methods=["POST"],
    request=TrainingRunRequestSerializer,
    responses={
        201: TrainingRunSerializer,
        (400, PROBLEM): ProblemSerializer,
        (503, PROBLEM): ProblemSerializer,
    },
)
@extend_schema(
    methods=["GET"],
    responses=paginated_schema(TrainingRunSerializer, "TrainingRun"),
    operation_id="training_runs_list",
    parameters=CURSOR_PARAMETERS,
)
@api_view(["GET", "POST"])
def training_run_list_create(request: Request) -> Response:
    """List the runs you may see, newest first, a page at a time; or start one (managers of all the
    build's projects only)."""
    if request.method == "GET":
        runs = training_runs_for_user(user=request.user).select_related("reward_model")
        return api_page(request, runs, lambda page: [_run_payload(run) for run in page])
    serializer = TrainingRunRequestSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    data = serializer.validated_data
    build = dataset_build_get_for_user(user=request.user, pk=data["dataset_build"])
    against_reward_model = None
    if data["against_reward_model"] is not None:
        # A reward model the caller may not see is as unknown as one that does not exist.
        against_reward_model = get_object_or_404(
            reward_models_for_user(user=request.user), pk=data["against_reward_model"]
        )
    hyperparameters = {
        **data["hyperparameters"],
        **{name: data[name] for name in RL_SETTINGS if name in data},
    }
    run = training_run_create(
        dataset_build=build,
        kind=data["kind"],
        base_model=data["base_model"],
        peft=data["peft"],
        gpus=data["gpus"],
        distributed=data["distributed"],
        trainer=data["trainer"],
        hyperparameters=hyperparameters,
        name=data["name"],
        created_by=request.user,
        against_reward_model=against_reward_model,
    )
    return Response(_run_payload(run), status=status.HTTP_201_CREATED)


@extend_schema(responses=TrainingRunSerializer)
@api_view(["GET"])
def training_run_detail(request: Request, run_id: int) -> Response:
    return Response(_run_payload(training_run_get_for_user(user=request.user, pk=run_id)))


@extend_schema(request=None, responses=TrainingRunSerializer)
@api_view(["POST"])
def training_run_cancel_view(request: Request, run_id: int) -> Response:
    """Cancel: a queued run at once, a running one at its next step."""
    run = training_run_cancel(run=training_run_get_for_user(user=request.user, pk=run_id))
    return Response(_run_payload(run))
