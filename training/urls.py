from __future__ import annotations

from django.urls import path

from training import api, project_views, views

urlpatterns = [
    path("demo-model/", views.demo_model_status, name="demo-model"),
    path("datasets/", views.dataset_build_list, name="dataset-build-list"),
    path("datasets/new", views.dataset_build_new, name="dataset-build-new"),
    path("datasets/<int:build_id>/", views.dataset_build_detail, name="dataset-build-detail"),
    path("datasets/<int:build_id>/status", views.dataset_build_status_view, name="dataset-build-status"),
    path("datasets/<int:build_id>/files/<str:key>", views.dataset_build_download, name="dataset-build-file"),
    path("ab-sessions/new", views.ab_session_new, name="ab-session-new"),
    path("ab-sessions/<int:project_id>/", views.ab_session_detail, name="ab-session-detail"),
    path("ab-sessions/<int:project_id>/scoring", views.ab_session_scoring, name="ab-session-scoring"),
    path(
        "ab-sessions/<int:project_id>/scoring/status",
        views.ab_session_scoring_status,
        name="ab-session-scoring-status",
    ),
    path("projects/<int:project_id>/judges", project_views.project_judges, name="project-judges"),
    path(
        "projects/<int:project_id>/judges/<int:judge_id>/<str:action>",
        project_views.project_judge_action,
        name="project-judge-action",
    ),
    path("projects/<int:project_id>/continuous", project_views.project_continuous, name="project-continuous"),
    path("api/projects/<int:project_id>/judges", project_views.project_judges_api, name="api-project-judges"),
    path("policies/", views.policy_list, name="policy-list"),
    path("generation/", views.generation_job_list, name="generation-job-list"),
    path("generation/<int:job_id>/", views.generation_job_detail, name="generation-job-detail"),
    path("generation/<int:job_id>/status", views.generation_job_status_view, name="generation-job-status"),
    path("generation/<int:job_id>/cancel", views.generation_job_cancel_view, name="generation-job-cancel"),
    path("training/runs/", views.training_run_list, name="training-run-list"),
    path("training/runs/new", views.training_run_new, name="training-run-new"),
    path("training/runs/<int:run_id>/", views.training_run_detail, name="training-run-detail"),
    path("training/runs/<int:run_id>/status", views.training_run_status_view, name="training-run-status"),
    path("training/runs/<int:run_id>/curves", views.training_run_curves_view, name="training-run-curves"),
    path("training/runs/<int:run_id>/cancel", views.training_run_cancel_view, name="training-run-cancel"),
    path("training/runs/<int:run_id>/files/<str:key>", views.training_run_download, name="training-run-file"),
    path("api/training-runs/", api.training_run_list_create, name="api-training-run-list"),
    path("api/training-runs/<int:run_id>/", api.training_run_detail, name="api-training-run-detail"),
    path(
        "api/training-runs/<int:run_id>/cancel", api.training_run_cancel_view, name="api-training-run-cancel"
    ),
    path("api/dataset-builds/", api.dataset_build_list_create, name="api-dataset-build-list"),
    path("api/dataset-builds/<int:build_id>/", api.dataset_build_detail, name="api-dataset-build-detail"),
]
