from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from annotation.roles import Role, role_required


@login_required
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "annotation/home.html")


@role_required(Role.LABELER)
def label(request: HttpRequest) -> HttpResponse:
    return render(request, "annotation/label.html")


@role_required(Role.EVALUATOR)
def evaluate(request: HttpRequest) -> HttpResponse:
    return render(request, "annotation/evaluate.html")


@role_required(Role.MANAGER)
def manage(request: HttpRequest) -> HttpResponse:
    return render(request, "annotation/manage.html")
