"""In-app notices: a person learns that a job they started, or one in a project they manage, ended.

The training side calls `notice_job_ended` once per terminal transition
(succeeded, failed, cancelled) of a run, build, generation or scoring job;
people read their notices on one page, reached from the count in the
navigation. One small feature, so its service, selectors and two views live
here together.
"""

from __future__ import annotations

from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.decorators import login_required
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from annotation.models import Membership, Notice
from annotation.roles import Role

NOTICES_PAGE_SIZE = 100


def notice_job_ended(
    *,
    kind: str,
    object_id: int,
    outcome: str,
    title: str,
    url: str = "",
    project_id: int | None = None,
    started_by_id: int | None = None,
) -> int:
    """Tell the person who started the job, and the managers of its project, that it ended.

    `kind` is a `Notice.Kind`, `outcome` a `Notice.Outcome`; `url` is the
    job's page. Returns how many notices were written; a second call for the
    same job adds none (one notice per job and person).
    """
    recipients: set[int] = set()
    if started_by_id is not None:
        recipients.add(started_by_id)
    if project_id is not None:
        recipients.update(
            Membership.objects.filter(project_id=project_id, role=Role.MANAGER).values_list(
                "user_id", flat=True
            )
        )
    if not recipients:
        return 0
    notices = Notice.objects.bulk_create(
        [
            Notice(
                user_id=user_id,
                project_id=project_id,
                kind=kind,
                object_id=object_id,
                outcome=outcome,
                title=title[:300],
                url=url[:300],
            )
            for user_id in sorted(recipients)
        ],
        ignore_conflicts=True,
    )
    return len(notices)


def notices_of(*, user: AbstractBaseUser) -> QuerySet[Notice]:
    return Notice.objects.filter(user_id=user.pk).order_by("-created_at", "-id")


def notices_unread_count(*, user: AbstractBaseUser) -> int:
    return Notice.objects.filter(user_id=user.pk, read_at__isnull=True).count()


def notices_mark_read(*, user: AbstractBaseUser, notice_id: int | None = None) -> int:
    """Mark one of the person's notices as read, or all of them when `notice_id` is None."""
    unread = Notice.objects.filter(user_id=user.pk, read_at__isnull=True)
    if notice_id is not None:
        unread = unread.filter(pk=notice_id)
    return unread.update(read_at=timezone.now())


# --- views -----------------------------------------------------------------------


@login_required
def notice_list(request: HttpRequest) -> HttpResponse:
    """The person's notices, newest first; the unread ones stand out."""
    notices = list(notices_of(user=request.user)[:NOTICES_PAGE_SIZE])
    return render(request, "annotation/notices.html", {"notices": notices})


@require_GET
@login_required
def notice_open(request: HttpRequest, notice_id: int) -> HttpResponse:
    """Mark the notice read and go to the job's page (the list when it has none)."""
    notice = get_object_or_404(Notice, pk=notice_id, user_id=request.user.pk)
    notices_mark_read(user=request.user, notice_id=notice.pk)
    target = notice.url
    if not target or not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        target = reverse("notices")
    return HttpResponseRedirect(target)


@require_POST
@login_required
def notices_read(request: HttpRequest) -> HttpResponse:
    """Mark every notice of the person as read."""
    notices_mark_read(user=request.user)
    return HttpResponseRedirect(reverse("notices"))
