from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from config.health import healthz

admin.site.site_header = "Rankwise administration"
admin.site.site_title = "Rankwise"

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("", include("training.urls")),
    path("", include("annotation.urls")),
]
