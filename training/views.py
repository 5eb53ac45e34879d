"""Pages for dataset builds and training runs. Each view finds objects through
the access helpers (404 for what the person may not see) and calls one service."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Prefetch
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from annotation.chart_data import category_chart, step_chart
from annotation.forms import MemberAddForm
from annotation.models import Policy, Project, Prompt
from annotation.pagination import page_of, page_query
from annotation.roles import Role, role_required
from annotation.selectors import ab_session_get_for_manager, project_get_for_user, projects_for_user
from annotation.services import MemberInvalid, ab_outputs_missing, ab_session_create, project_member_add
from config.demo_progress import (
    demo_model_dir,
    demo_model_is_complete,
    demo_progress_line,
    demo_progress_path,
    demo_progress_read,
)
from training.archives import run_archive_path
from training.forms import (
    ABSessionForm,
    DatasetBuildForm,
    GenerationJobNewForm,
    PolicyRegisterForm,
    ScoringJobForm,
    TrainingRunForm,
)
from training.models import DatasetBuild, GenerationJob, RewardModel, TrainingRun
from training.policies import policies_for_user, policy_register
from training.selectors import (
    BUILD_LABELS,
    BUILD_OPTION_FIELDS,
    BUILD_OUTPUTS,
    BUILD_SPLITS,
    RUN_FILES,
    RUN_LIST_FILTERS,
    dataset_build_file_path,
    dataset_build_files,
    dataset_build_get_for_user,
    dataset_builds_for_user,
    generation_job_get_for_user,
    generation_jobs_for_project,
    generation_jobs_for_user,
    job_status_payload,
    scoring_jobs_for_session,
    training_run_device_settings,
    training_run_eta_seconds,
    training_run_few_steps,
    training_run_final_dir,
    training_run_get_for_user,
    training_run_metric_series,
    training_runs_for_user,
)
from training.services import (
    DatasetBuildInvalid,
    QueueUnavailable,
    dataset_build_create,
    generation_job_cancel,
    generation_job_create,
    scoring_job_create,
    training_run_cancel,
    training_run_create,
)

LIST_LIMIT = 200


@role_required(Role.MANAGER)
def dataset_build_list(request: HttpRequest) -> HttpResponse:
    builds = (
        dataset_builds_for_user(user=request.user).select_related("created_by").prefetch_related("projects")
    )
    page = page_of(request, builds)
    return render(request, "training/dataset_build_list.html", {"builds": page, "page_obj": page})


@role_required(Role.MANAGER)
def dataset_build_new(request: HttpRequest) -> HttpResponse:
    form = DatasetBuildForm(request.POST or None, user=request.user)
    if request.method == "POST" and form.is_valid():
        try:
            build = dataset_build_create(created_by=request.user, **form.service_arguments())
        except DatasetBuildInvalid as error:
            for field, message in error.errors.items():
                form.add_error(field if field in form.fields else None, message)
        except QueueUnavailable as error:
            form.add_error(None, str(error))
        else:
            return redirect("dataset-build-detail", build_id=build.pk)
    return render(request, "training/dataset_build_form.html", {"form": form})


@login_required
def dataset_build_detail(request: HttpRequest, build_id: int) -> HttpResponse:
    build = dataset_build_get_for_user(user=request.user, pk=build_id)
    counts = [
        (output, [build.counts[output].get(split, 0) for split in BUILD_SPLITS])
        for output in BUILD_OUTPUTS
        if output in build.counts
    ]
    rows_chart = category_chart(
        kind="bar",
        labels=[output for output, _values in counts],
        series=[
            {"label": split, "values": [values[index] for _output, values in counts]}
            for index, split in enumerate(BUILD_SPLITS)
        ],
        integer=True,
        value_title=_("rows"),
    )
    context = {
        "build": build,
        "projects": build.projects.order_by("name"),
        "options": _option_rows(build),
        "counts": counts,
        "rows_chart": rows_chart,
        "splits": BUILD_SPLITS,
        "files": dataset_build_files(build=build),
    }
    return render(request, "training/dataset_build_detail.html", context)


def _option_rows(build: DatasetBuild) -> list[tuple[str, str]]:
    """The build's options as (label, value) for people: choices by their names, empty as "—"."""
    rows = []
    for name in BUILD_OPTION_FIELDS:
        field = DatasetBuild._meta.get_field(name)
        value = getattr(build, name)
        if field.choices:
            shown = getattr(build, f"get_{name}_display")()
        elif isinstance(value, bool):
            shown = _("yes") if value else _("no")
        else:
            shown = "—" if value is None else str(value)
        rows.append((str(BUILD_LABELS.get(name, field.verbose_name)), str(shown)))
    people = ", ".join(build.labelers.order_by("username").values_list("username", flat=True))
    rows.insert(2, (str(BUILD_LABELS["labelers"]), people or _("everyone")))
    return rows


@login_required
def dataset_build_status_view(request: HttpRequest, build_id: int) -> JsonResponse:
    """What the detail page's script polls while the build runs."""
    build = dataset_build_get_for_user(user=request.user, pk=build_id)
    return JsonResponse(job_status_payload(build))


@login_required
def dataset_build_download(request: HttpRequest, build_id: int, key: str) -> FileResponse:
    """A file of a finished build, by allow-listed key, as an attachment."""
    build = dataset_build_get_for_user(user=request.user, pk=build_id)
    path = dataset_build_file_path(build=build, key=key)
    return FileResponse(path.open("rb"), as_attachment=True, filename=f"dataset-{build.pk}-{key}")


# --- training runs ------------------------------------------------------------------


@role_required(Role.MANAGER)
def training_run_list(request: HttpRequest) -> HttpResponse:
    runs = training_runs_for_user(user=request.user).select_related("dataset_build")
    active = {}
    for name, allowed in RUN_LIST_FILTERS.items():
        value = request.GET.get(name, "")
        if value in allowed:  # only known values reach the query
            runs = runs.filter(**{name: value})
            active[name] = value
    page = page_of(request, runs)
    context = {
        "runs": page,
        "page_obj": page,
        "page_query": page_query(request),
        "active": active,
        "statuses": TrainingRun.Status.choices,
        "kinds": TrainingRun.Kind.choices,
    }
    return render(request, "training/run_list.html", context)


@role_required(Role.MANAGER)
def training_run_new(request: HttpRequest) -> HttpResponse:
    """Start a run; `?build=ID&kind=reward|dpo` pre-fills it (the admin action on builds links here)."""
    initial = {key: request.GET[key] for key in ("kind",) if request.GET.get(key) in TrainingRun.Kind.values}
    if (build_id := request.GET.get("build", "")).isdigit():
        initial["dataset_build"] = int(build_id)
    if "from_run" in request.GET:
        initial.update(
            _run_settings(training_run_get_for_user(user=request.user, pk=request.GET["from_run"]))
        )
    form = TrainingRunForm(request.POST or None, user=request.user, initial=initial)
    few_steps = None
    if request.method == "POST" and form.is_valid() and not request.POST.get("few_steps_ok"):
        few_steps = training_run_few_steps(
            build=form.cleaned_data["dataset_build"],
            trainer=form.cleaned_data["trainer"],
            hyperparameters=form.hyperparameters(),
        )
    if request.method == "POST" and form.is_valid() and few_steps is None:
        data = form.cleaned_data
        try:
            run = training_run_create(
                dataset_build=data["dataset_build"],
                kind=data["kind"],
                base_model=data["base_model"],
                peft=data["peft"],
                trainer=data["trainer"] or TrainingRun.Trainer.GROUPED,
                gpus=data["gpus"],
                distributed=data["distributed"] or TrainingRun.Distributed.DDP,
                hyperparameters=form.hyperparameters(),
                name=data["name"],
                created_by=request.user,
                against_reward_model=data["against_reward_model"],
            )
        except QueueUnavailable as error:
            form.add_error(None, str(error))
        except ValidationError as error:
            for field, messages in error.message_dict.items():
                form.add_error(field if field in form.fields else None, messages)
        else:
            return redirect("training-run-detail", run.pk)
    status = 503 if form.non_field_errors() and request.method == "POST" else 200
    context = {"form": form, "few_steps": few_steps}
    return render(request, "training/run_form.html", context, status=status)


def _run_settings(run: TrainingRun) -> dict[str, Any]:
    """A run's settings as the run form's initial values: "run again" starts from them."""
    return {
        "kind": run.kind,
        "dataset_build": run.dataset_build_id,
        "base_model": run.base_model,
        "peft": run.peft,
        "trainer": run.trainer,
        "gpus": run.gpus,
        "distributed": run.distributed,
        "against_reward_model": run.against_reward_model_id,
        **{
            name: value
            for name, value in (run.hyperparameters or {}).items()
            if name in TrainingRunForm.HYPERPARAMETERS
        },
    }


# Curves the run page draws, in this order, when the run has logged them
# (SFT: mean_token_accuracy; RL, TRL's RLOO names: reward, kl, entropy, completion length).
RUN_CURVES = (
    "loss",
    "accuracy",
    "rewards/accuracies",
    "margin",
    "rewards/margins",
    "eval_loss",
    "mean_token_accuracy",
    "reward",
    "kl",
    "entropy",
    "completions/mean_length",
)
# RL: the reward model's score distribution per logging step (training.rl.SCORE_PERCENTILES).
SCORE_DISTRIBUTION = ("reward_model/score_p10", "reward_model/score_p50", "reward_model/score_p90")
# RL: the over-optimisation watch's points (training.rl), plotted against KL to the reference.
WATCH_KL, WATCH_PROXY, WATCH_TRUE = "watch/kl", "watch/proxy_reward", "watch/true_score"


def _run_curve_charts(run: TrainingRun) -> list[dict[str, object]]:
    series = training_run_metric_series(run=run)
    charts: list[dict[str, object]] = [
        {
            "name": name,
            "chart": step_chart(series=[{"label": name, "points": series[name]}], step_title=_("step")),
        }
        for name in RUN_CURVES
        if series.get(name)
    ]
    if all(series.get(name) for name in SCORE_DISTRIBUTION):
        charts.append(
            {
                "name": "reward_model/score_distribution",
                "chart": step_chart(
                    series=[
                        {"label": name.rsplit("_", 1)[-1], "points": series[name]}
                        for name in SCORE_DISTRIBUTION
                    ],
                    step_title=_("step"),
                    value_title=_("reward-model score (10th, 50th, 90th percentile)"),
                ),
            }
        )
    if series.get(WATCH_KL):
        # The watch reports its points at one step each: join them by step, in training order.
        kl_at = dict(series[WATCH_KL])
        curves = [
            {
                "label": str(label),
                "points": [(kl_at[step], value) for step, value in series.get(name, []) if step in kl_at],
            }
            for name, label in (
                (WATCH_PROXY, _("proxy reward (reward model)")),
                (WATCH_TRUE, _("true score")),
            )
            if series.get(name)
        ]
        charts.append(
            {
                "name": "watch/reward_vs_kl",
                "chart": step_chart(
                    series=curves, step_title=_("KL to the reference"), value_title=_("held-out mean")
                ),
            }
        )
    return charts


@login_required
def training_run_detail(request: HttpRequest, run_id: int) -> HttpResponse:
    run = training_run_get_for_user(user=request.user, pk=run_id)
    rows = list(run.metric_rows.order_by("-step", "-id")[:50])
    names = sorted({name for row in rows for name in row.values})
    columns = _metric_columns(names, request.GET.getlist("metric"))
    context = {
        "run": run,
        "curves": _run_curve_charts(run),
        "metric_rows": rows,
        "metric_names": names,
        "metric_columns": columns,
        "metric_table": [
            {"step": row.step, "values": [row.values.get(name) for name in columns]} for row in rows
        ],
        "eta_seconds": training_run_eta_seconds(run=run),
        "device_settings": {
            name: ", ".join(map(str, value)) if isinstance(value, list) else value
            for name, value in training_run_device_settings(run=run).items()
            if value not in (None, [], "")
        },
        "files": RUN_FILES if run.status == TrainingRun.Status.SUCCEEDED else ("log.txt",),
    }
    return render(request, "training/run_detail.html", context)


# The logged metrics table shows these, in this order, when the run logged them; the
# rest (a run logs 25 or more) are one click away, so the table stays readable.
METRIC_COLUMNS_DEFAULT = (
    "loss",
    "eval_loss",
    "accuracy",
    "eval_accuracy",
    "rewards/accuracies",
    "rewards/margins",
    "margin",
    "kl",
    "reward",
    "learning_rate",
)
METRIC_COLUMNS_SHOWN = 6


def _metric_columns(names: list[str], asked: list[str]) -> list[str]:
    """The columns asked for in the query (known names only, in the table's order), else the defaults."""
    chosen = [name for name in names if name in set(asked)]
    if chosen:
        return chosen
    preferred = [name for name in METRIC_COLUMNS_DEFAULT if name in names]
    return (preferred or names)[:METRIC_COLUMNS_SHOWN]


@require_GET
@login_required
def training_run_curves_view(request: HttpRequest, run_id: int) -> JsonResponse:
    """The run page's curves as chart data, polled while the run is live so they grow without a reload."""
    run = training_run_get_for_user(user=request.user, pk=run_id)
    return JsonResponse({"curves": _run_curve_charts(run)})


@login_required
def training_run_status_view(request: HttpRequest, run_id: int) -> JsonResponse:
    run = training_run_get_for_user(user=request.user, pk=run_id)
    return JsonResponse(job_status_payload(run))


@require_POST
@role_required(Role.MANAGER)
def training_run_cancel_view(request: HttpRequest, run_id: int) -> HttpResponse:
    run = training_run_get_for_user(user=request.user, pk=run_id)
    training_run_cancel(run=run)
    return redirect("training-run-detail", run.pk)


@login_required
def training_run_download(request: HttpRequest, run_id: int, key: str) -> HttpResponse | FileResponse:
    """A run's artifacts by run id and a fixed key, as attachments; never a path from the request."""
    run = training_run_get_for_user(user=request.user, pk=run_id)
    if key not in RUN_FILES:
        raise Http404("No such file.")
    if key == "log.txt":
        response = HttpResponse(run.log_tail or "", content_type="text/plain; charset=utf-8")
    elif key == "metrics.json":
        body = {
            "run": run.pk,
            "kind": run.kind,
            "metrics": run.metrics,
            "history": training_run_metric_series(run=run),
        }
        response = HttpResponse(json.dumps(body, indent=2), content_type="application/json")
    else:
        # Streamed from the archive written once when the run finished; nothing is built here.
        if run.status != TrainingRun.Status.SUCCEEDED or not training_run_final_dir(run=run).is_dir():
            raise Http404("The run has no model to download.")
        try:
            stream = run_archive_path(run=run).open("rb")
        except FileNotFoundError:
            return HttpResponse(
                _("The model's archive has not been written yet; it is written when the run finishes."),
                status=409,
                content_type="text/plain; charset=utf-8",
            )
        return FileResponse(
            stream, as_attachment=True, filename=f"run-{run.pk}-{key}", content_type="application/zip"
        )
    response["Content-Disposition"] = f'attachment; filename="run-{run.pk}-{key}"'
    return response


# --- blind A/B sessions ----------------------------------------------------------------


@role_required(Role.MANAGER)
def ab_session_new(request: HttpRequest) -> HttpResponse:
    """Create a blind A/B session; outputs a policy still lacks are generated into the session itself.

    The session copies the source project's prompts and the outputs that
    exist, so the source project is never changed. Model policies lacking
    outputs get a generation job each on the session's own prompts; the
    session opens by itself (pairs made) when the last one is written, so
    nobody ever sees half a pair.
    """
    form = ABSessionForm(request.POST or None, user=request.user)
    status = 200
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        policies = list(data["policies"])
        prompts = list(data["source_project"].prompts.order_by("id"))
        lacking = sorted(
            {policy for policy, _prompt in ab_outputs_missing(policies=policies, prompts=prompts)},
            key=lambda policy: policy.pk,
        )
        imported = [policy for policy in lacking if policy.kind == Policy.Kind.IMPORTED]
        if imported:
            names = ", ".join(str(policy) for policy in imported)
            form.add_error(
                "policies", _("%(names)s cannot generate; import their outputs first.") % {"names": names}
            )
        else:
            try:
                project, jobs = _ab_session_with_jobs(request, data, policies, prompts, lacking)
            except QueueUnavailable as error:
                form.add_error(None, str(error))
                status = 503
            except ValidationError as error:
                form.add_error(None, " ".join(error.messages))
            except (ValueError, IntegrityError) as error:
                form.add_error(None, str(error))
            else:
                if jobs:
                    messages.info(
                        request,
                        _(
                            "Generation jobs %(jobs)s write the missing outputs into the session; "
                            "it opens by itself when they are ready."
                        )
                        % {"jobs": ", ".join(f"#{job.pk}" for job in jobs)},
                    )
                else:
                    messages.success(request, _("The A/B session is open."))
                if data["reward_model"] is not None:
                    _ab_score(request, project, data["reward_model"])
                return redirect("ab-session-detail", project.pk)
    return render(request, "training/ab_session_form.html", {"form": form}, status=status)


@role_required(Role.MANAGER)
def ab_session_detail(request: HttpRequest, project_id: int) -> HttpResponse:
    """One A/B session for its manager: its outputs being generated, then its links; its evaluators.

    404 for any project but an A/B session the person manages.
    """
    project = ab_session_get_for_manager(user=request.user, pk=project_id)
    form = MemberAddForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            membership = project_member_add(
                project=project, username=form.cleaned_data["username"], role=Role.EVALUATOR
            )
        except MemberInvalid as error:
            form.add_error("username", str(error))
        else:
            messages.success(
                request, _("%(name)s is an evaluator of this session.") % {"name": membership.user}
            )
            return redirect("ab-session-detail", project.pk)
    jobs = list(generation_jobs_for_project(project=project))
    context = {
        "project": project,
        "form": form,
        "jobs": jobs,
        "pairs": project.tasks.count(),
        "preparing": project.opened_at is None,
        "jobs_failed": [job for job in jobs if job.status == GenerationJob.Status.FAILED],
        "evaluators": [
            m.user for m in project.memberships.filter(role=Role.EVALUATOR).select_related("user")
        ],
    }
    return render(request, "training/ab_session_detail.html", context)


def _ab_session_with_jobs(
    request: HttpRequest,
    data: dict[str, Any],
    policies: list[Policy],
    prompts: list[Prompt],
    lacking: list[Policy],
) -> tuple[Project, list[GenerationJob]]:
    """The session and a generation job per policy lacking outputs, all or nothing."""
    with transaction.atomic():
        project = ab_session_create(
            name=data["name"],
            policies=policies,
            prompts=prompts,
            votes_per_pair=data["votes_per_pair"],
            created_by=request.user,
            outputs_missing_allowed=True,
        )
        jobs = [
            generation_job_create(
                policy=policy,
                project=project,
                n=1,
                created_by=request.user,
                max_new_tokens=data["max_new_tokens"],
                seed=data["seed"],
            )
            for policy in lacking
        ]
    return project, jobs


def _ab_score(request: HttpRequest, project: Project, reward_model: RewardModel) -> None:
    """Start scoring a session just made; the session stands even when scoring cannot start."""
    try:
        job = scoring_job_create(project=project, reward_model=reward_model, created_by=request.user)
    except QueueUnavailable as error:
        messages.warning(request, str(error))
    except ValidationError as error:
        messages.warning(request, " ".join(error.messages))
    else:
        messages.info(
            request,
            _("Scoring job #%(job)d was queued: %(model)s scores both sides of every pair.")
            % {"job": job.pk, "model": reward_model.name},
        )


@role_required(Role.MANAGER)
def ab_session_scoring(request: HttpRequest, project_id: int) -> HttpResponse:
    """Attach a reward model to a project (a scoring job on the gpu queue) and watch its jobs.

    On an A/B session the scores are compared with the votes; on a ranking
    project they set the uncertainty its queue can be ordered by. 404 for any
    project the person does not manage.
    """
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    form = ScoringJobForm(request.POST or None, user=request.user)
    status = 200
    if request.method == "POST" and form.is_valid():
        try:
            job = scoring_job_create(
                project=project, reward_model=form.cleaned_data["reward_model"], created_by=request.user
            )
        except QueueUnavailable as error:
            form.add_error(None, str(error))
            status = 503
        except ValidationError as error:
            for field, field_messages in error.message_dict.items():
                form.add_error(field if field in form.fields else None, field_messages)
        else:
            messages.success(request, _("Scoring job #%(job)d was queued.") % {"job": job.pk})
            return redirect("ab-session-scoring", project.pk)
    jobs = list(scoring_jobs_for_session(project=project)[:LIST_LIMIT])
    context = {"project": project, "form": form, "jobs": jobs, "latest": jobs[0] if jobs else None}
    return render(request, "training/ab_session_scoring.html", context, status=status)


@require_GET
@role_required(Role.MANAGER)
def ab_session_scoring_status(request: HttpRequest, project_id: int) -> JsonResponse:
    """The newest scoring job of the project, for the scoring page's script."""
    project = project_get_for_user(user=request.user, pk=project_id, role=Role.MANAGER)
    return JsonResponse(job_status_payload(scoring_jobs_for_session(project=project).first()))


@require_GET
@login_required
def demo_model_status(request: HttpRequest) -> HttpResponse:
    """How far the demo model's background build has got (`rundemo --demo` starts it)."""
    model_dir = demo_model_dir()
    progress = demo_progress_read(demo_progress_path(model_dir))
    if demo_model_is_complete(model_dir):
        state = "ready"
    elif progress is None:
        state = "absent"
    else:
        state = str(progress.get("status", "building"))
    fraction = 0.0
    if progress and progress.get("total"):
        fraction = min(1.0, int(progress.get("step", 0)) / int(progress["total"]))
    context = {
        "state": state,
        "line": demo_progress_line(progress) if progress else "",
        "percent": round(100 * fraction),
        "progress": progress or {},
        "model_dir": model_dir,
    }
    return render(request, "training/demo_model.html", context)


# --- policies ---------------------------------------------------------------------------


@role_required(Role.MANAGER)
def policy_list(request: HttpRequest) -> HttpResponse:
    """The policies of the manager's projects, and registering one from a folder or hub id, checked at once.

    Each policy shows only those of its projects the manager runs: another
    project that shares it stays out of sight.
    """
    form = PolicyRegisterForm(request.POST or None, user=request.user)
    if request.method == "POST" and form.is_valid():
        try:
            policy = policy_register(**form.cleaned_data)
        except ValidationError as error:
            for field, field_messages in error.message_dict.items():
                form.add_error(field if field in form.fields else None, field_messages)
        else:
            messages.success(
                request,
                _("Policy “%(name)s” is registered: its config and tokenizer load.") % {"name": policy.name},
            )
            return redirect("policy-list")
    managed = projects_for_user(user=request.user, role=Role.MANAGER).order_by("name")
    policies = policies_for_user(user=request.user).prefetch_related(
        Prefetch("projects", queryset=managed, to_attr="projects_shown")
    )
    page = page_of(request, policies)
    context = {"form": form, "policies": page, "page_obj": page}
    return render(request, "training/policy_list.html", context, status=400 if form.errors else 200)


# --- generation jobs -------------------------------------------------------------------


@role_required(Role.MANAGER)
def generation_job_list(request: HttpRequest) -> HttpResponse:
    """Generation jobs on the projects the manager runs (`?project=ID` narrows to one), and starting one."""
    jobs = generation_jobs_for_user(user=request.user)
    project_id = request.GET.get("project", "")
    if project_id.isdigit():
        jobs = jobs.filter(project_id=int(project_id))
    initial = {key: request.GET[key] for key in ("policy", "project") if request.GET.get(key, "").isdigit()}
    form = GenerationJobNewForm(request.POST or None, user=request.user, initial=initial)
    status = 200
    if request.method == "POST" and form.is_valid():
        try:
            job = generation_job_create(created_by=request.user, **form.cleaned_data)
        except QueueUnavailable as error:
            form.add_error(None, str(error))
            status = 503
        except ValidationError as error:
            for field, field_messages in error.message_dict.items():
                form.add_error(field if field in form.fields else None, field_messages)
        else:
            messages.success(request, _("Generation job #%(job)d was queued.") % {"job": job.pk})
            return redirect("generation-job-detail", job.pk)
    if form.errors and status == 200:
        status = 400
    page = page_of(request, jobs)
    context = {"form": form, "jobs": page, "page_obj": page, "page_query": page_query(request)}
    return render(request, "training/generation_job_list.html", context, status=status)


@require_GET
@role_required(Role.MANAGER)
def generation_job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    """One generation job with live progress (static/js/job.js polls its status)."""
    job = generation_job_get_for_user(user=request.user, pk=job_id)
    return render(request, "training/generation_job_detail.html", {"job": job})


@require_GET
@role_required(Role.MANAGER)
def generation_job_status_view(request: HttpRequest, job_id: int) -> JsonResponse:
    job = generation_job_get_for_user(user=request.user, pk=job_id)
    return JsonResponse(job_status_payload(job))


@require_POST
@role_required(Role.MANAGER)
def generation_job_cancel_view(request: HttpRequest, job_id: int) -> HttpResponse:
    job = generation_job_get_for_user(user=request.user, pk=job_id)
    generation_job_cancel(job=job)
    return redirect("generation-job-detail", job.pk)
