"""Reward-model scores of an A/B session are for its managers: nothing an evaluator can fetch carries them."""

from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.test import APIClient

from annotation.models import Completion, CompletionScore
from annotation.roles import Role
from tests.annotation.conftest import add_member
from tests.annotation.test_ab import _collect, policies, session  # noqa: F401  (policies: a fixture)
from tests.factories import user_with_roles

SECRET_SCORER = "reward model: sekrit-rm-9931"


@pytest.mark.django_db
def test_nothing_an_evaluator_can_fetch_carries_a_score_or_its_scorer(policies, manager):  # type: ignore[no-untyped-def]  # noqa: F811
    # given a session whose every completion a reward model scored, with numbers easy to spot
    project = session(policies[:2], manager, prompts=3)
    completions = Completion.objects.filter(prompt__project=project).order_by("pk")
    scores = [f"{7000 + n}.{n}4321" for n in range(completions.count())]
    CompletionScore.objects.bulk_create(
        CompletionScore(completion=completion, scorer=SECRET_SCORER, score=float(score))
        for completion, score in zip(completions, scores, strict=True)
    )
    evaluator = add_member(project, user_with_roles(Role.EVALUATOR, username="blind-sam"), Role.EVALUATOR)
    page = Client(enforce_csrf_checks=True)
    page.force_login(evaluator)
    api = APIClient()
    api.force_authenticate(evaluator)

    # when the evaluator fetches everything they can, the pair included
    seen = [_collect(page.get(url)) for url in ("/", "/evaluate/", f"/evaluate/{project.pk}/", "/jsi18n/")]
    token = page.cookies["csrftoken"].value
    seen.append(_collect(page.post(f"/evaluate/{project.pk}/next", HTTP_X_CSRFTOKEN=token)))
    seen.append(_collect(api.post(f"/api/projects/{project.pk}/next")))
    seen.append(_collect(api.get("/api/projects/")))
    seen.append(_collect(api.get(f"/api/projects/{project.pk}/")))
    everything = "\n".join(seen)

    # then no score, scorer or reward model shows
    assert 'data-side="left"' in everything  # the pair was really fetched
    assert "sekrit-rm-9931" not in everything
    assert "reward model" not in everything.lower()
    for score in scores:
        assert score[:7] not in everything  # e.g. "7000.04": no rounding of it either
    # and the pages that show or start scoring are closed to them
    for url in (
        f"/manage/projects/{project.pk}/results",
        f"/ab-sessions/{project.pk}/scoring",
        f"/ab-sessions/{project.pk}/scoring/status",
    ):
        assert page.get(url).status_code == 403, url
    assert page.post(f"/ab-sessions/{project.pk}/scoring", HTTP_X_CSRFTOKEN=token).status_code == 403


@pytest.mark.django_db
def test_the_results_page_names_the_scorer_to_the_sessions_manager(policies, manager):  # type: ignore[no-untyped-def]  # noqa: F811
    project = session(policies[:2], manager, prompts=1)
    completion = Completion.objects.filter(prompt__project=project).first()
    CompletionScore.objects.create(completion=completion, scorer=SECRET_SCORER, score=1.5)
    client = Client()
    client.force_login(manager)

    page = client.get(f"/manage/projects/{project.pk}/results").content.decode()

    assert SECRET_SCORER in page
    assert "1 / 2" in page  # one of the session's two responses is scored
