from __future__ import annotations

from collections.abc import Callable
from typing import Any

from csp.constants import SELF, UNSAFE_INLINE
from csp.decorators import csp_update
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponseBase
from django.urls import include, path
from django.views.i18n import JavaScriptCatalog
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerSplitView

from annotation import api, manage_views, views, webhook_views


def _docs_page(
    csp: dict[str, list[str]], view: Callable[..., HttpResponseBase]
) -> Callable[..., HttpResponseBase]:
    """An API docs page with its CSP additions, behind Django's CSRF check like every page.

    DRF marks its views CSRF-exempt (it checks by itself, but these pages would
    refuse a POST without saying why); a plain function, not a wrapped one,
    carries no exemption.
    """
    with_csp = csp_update(csp)(view)

    def page(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        return with_csp(request, *args, **kwargs)

    return page


api_patterns = [
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    # The schema, browsable: Swagger UI and Redoc from drf-spectacular-sidecar's
    # static files. Page scripts stay 'self' only; Swagger UI's icons are data:
    # images, and Redoc styles itself with inline <style> (styled-components)
    # and searches in a worker it builds from its own code (a blob: URL), so
    # these two pages, which show only the schema, allow exactly that. Redoc's
    # logo from its maker's CDN stays refused (img-src).
    path(
        "api/docs/",
        _docs_page(
            {"img-src": ["data:"]},
            SpectacularSwaggerSplitView.as_view(
                url_name="api-schema",
                template_name="annotation/api_swagger.html",
                title="Rankwise API · Swagger UI",
            ),
        ),
        name="api-docs",
    ),
    path(
        "api/redoc/",
        _docs_page(
            {"style-src": [UNSAFE_INLINE], "img-src": ["data:"], "worker-src": [SELF, "blob:"]},
            SpectacularRedocView.as_view(
                url_name="api-schema", template_name="annotation/api_redoc.html", title="Rankwise API · Redoc"
            ),
        ),
        name="api-redoc",
    ),
    path("api/projects/", api.project_list, name="api-project-list"),
    path("api/projects/<int:project_id>/", api.project_detail, name="api-project-detail"),
    path("api/projects/<int:project_id>/next", api.project_claim_next, name="api-project-next"),
    path("api/projects/<int:project_id>/import", api.project_import, name="api-project-import"),
    path("api/projects/<int:project_id>/stats", api.project_stats_view, name="api-project-stats"),
    path(
        "api/projects/<int:project_id>/judgments", api.project_judgments_export, name="api-project-judgments"
    ),
    path(
        "api/assignments/<int:assignment_id>/judgment",
        api.assignment_judgment,
        name="api-assignment-judgment",
    ),
    path("api/assignments/<int:assignment_id>/skip", api.assignment_skip_view, name="api-assignment-skip"),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("label/", views.label, name="label"),
    path("label/history/", views.label_history, name="label-history"),
    path("label/judgments/<int:judgment_id>/revise", views.label_revise, name="label-revise"),
    path("review/", views.review, name="review"),
    path("review/<int:project_id>/", views.review_project, name="review-project"),
    path("review/judgments/<int:judgment_id>", views.review_decide, name="review-decide"),
    path("label/<int:project_id>/", views.label_project, name="label-project"),
    path("label/<int:project_id>/next", views.label_next, name="label-next"),
    path("evaluate/", views.evaluate, name="evaluate"),
    path("evaluate/<int:project_id>/", views.evaluate_project, name="evaluate-project"),
    path("evaluate/<int:project_id>/next", views.evaluate_next, name="evaluate-next"),
    path("manage/projects/<int:project_id>/results", views.ab_results, name="ab-results"),
    path(
        "manage/projects/<int:project_id>/stats/refresh",
        views.project_stats_refresh,
        name="project-stats-refresh",
    ),
    path("manage/", views.manage, name="manage"),
    path("manage/projects/<int:project_id>/", views.project_dashboard, name="project-dashboard"),
    path("manage/projects/new", manage_views.project_new, name="project-new"),
    path("manage/projects/<int:project_id>/settings", manage_views.project_settings, name="project-settings"),
    path("manage/projects/<int:project_id>/members", manage_views.project_members, name="project-members"),
    path("manage/projects/<int:project_id>/import", manage_views.project_import, name="project-import"),
    path(
        "manage/projects/<int:project_id>/webhooks", webhook_views.project_webhooks, name="project-webhooks"
    ),
    path(
        "manage/projects/<int:project_id>/webhooks/<int:webhook_id>/toggle",
        webhook_views.project_webhook_toggle,
        name="project-webhook-toggle",
    ),
    path(
        "manage/projects/<int:project_id>/members/<int:membership_id>",
        manage_views.project_member_change,
        name="project-member-change",
    ),
    path("i18n/", include("django.conf.urls.i18n")),
    path("jsi18n/", JavaScriptCatalog.as_view(), name="javascript-catalog"),
    # Sign-up is closed: accounts are made by a manager (admin) or `manage.py create_user`.
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # Reached only from a reset mail that a manager or superuser had sent to the
    # account's owner (the user admin's action); there is no "forgot password" form.
    path(
        "accounts/reset/<uidb64>/<token>/",
        auth_views.PasswordResetConfirmView.as_view(post_reset_login=False),
        name="password_reset_confirm",
    ),
    path(
        "accounts/reset/done/", auth_views.PasswordResetCompleteView.as_view(), name="password_reset_complete"
    ),
    *api_patterns,
]
