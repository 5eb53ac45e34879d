from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from annotation.notifications import notice_list, notice_open, notices_read
from config.health import healthz

admin.site.site_header = "Rankwise administration"
admin.site.site_title = "Rankwise"

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("notices/", notice_list, name="notices"),
    path("notices/read/", notices_read, name="notices-read"),
    path("notices/<int:notice_id>/", notice_open, name="notice-open"),
    path("", include("training.urls")),
    path("", include("annotation.urls")),
]
