from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from annotation import views

urlpatterns = [
    path("", views.home, name="home"),
    path("label/", views.label, name="label"),
    path("evaluate/", views.evaluate, name="evaluate"),
    path("manage/", views.manage, name="manage"),
    # Sign-up is closed: accounts are made by a manager (admin) or `manage.py create_user`.
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
]
