"""Statistics snapshots: computed by a real Celery worker, debounced, read by the pages and the API."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from annotation import snapshots
from annotation.models import Project, StatsSnapshot
from annotation.roles import Role
from annotation.snapshots import stats_refresh_request, stats_snapshot_get
from tests.annotation.conftest import add_member, make_people
from tests.annotation.test_api import ranks_in_display_order, token_client

WORKER_WAIT_S = 60


@pytest.fixture
def crew(make_project):  # type: ignore[no-untyped-def]
    project = make_project(tasks=4, k=3, overlap=2)
    boss, alice, bob = make_people(3, prefix="crew")
    add_member(project, boss, Role.MANAGER)
    add_member(project, alice, Role.LABELER)
    add_member(project, bob, Role.LABELER)
    return {"project": project, "manager": boss, "alice": alice, "bob": bob}


def _rank_one(user, project: Project, token: str) -> None:  # type: ignore[no-untyped-def]
    client = token_client(user)
    claimed = client.post(f"/api/projects/{project.pk}/next").json()
    answer = {"ranks": ranks_in_display_order(claimed), "client_token": token}
    assert client.post(f"/api/assignments/{claimed['id']}/judgment", answer, format="json").status_code == 201


@pytest.mark.django_db
def test_a_project_without_a_snapshot_is_computed_in_the_request_and_the_page_says_so(crew) -> None:
    # given a judgment and no snapshot yet
    _rank_one(crew["alice"], crew["project"], "one")
    client = Client()
    client.force_login(crew["manager"])

    # when the manager opens the dashboard twice
    first = client.get(f"/manage/projects/{crew['project'].pk}/")
    second = client.get(f"/manage/projects/{crew['project'].pk}/")

    # then the first request computed and stored it, the second read it
    assert "computed for this page just now" in first.content.decode()
    assert "Computed in the background from 1 judgments" in second.content.decode()
    snapshot = StatsSnapshot.objects.get(project=crew["project"], kind=StatsSnapshot.Kind.PROJECT)
    assert snapshot.judgments_seen == 1 and snapshot.payload["progress"]["judgments_total"] == 1


@pytest.mark.django_db
def test_the_stats_api_reads_the_snapshot_and_says_when_it_was_computed(crew) -> None:
    # given a snapshot computed before a second judgment
    _rank_one(crew["alice"], crew["project"], "one")
    stats_snapshot_get(project=crew["project"], kind=StatsSnapshot.Kind.PROJECT)
    _rank_one(crew["bob"], crew["project"], "two")

    # when
    body = token_client(crew["manager"]).get(f"/api/projects/{crew['project'].pk}/stats").json()

    # then it is the stored figures, dated, not a recount
    assert body["progress"]["judgments_total"] == 1
    assert body["snapshot"]["judgments_seen"] == 1 and not body["snapshot"]["computed_in_request"]
    assert body["snapshot"]["computed_at"]


@pytest.mark.django_db
def test_a_burst_of_judgments_schedules_one_refresh(crew, monkeypatch: pytest.MonkeyPatch) -> None:
    # given a snapshot and a broker that records what is published
    published = []
    monkeypatch.setattr(
        snapshots,
        "_publish",
        lambda *, project_id, countdown: published.append((project_id, countdown)) or True,
    )
    stats_snapshot_get(project=crew["project"], kind=StatsSnapshot.Kind.PROJECT)

    # when three judgments ask for a refresh
    asked = [stats_refresh_request(project_id=crew["project"].pk) for _ in range(3)]

    # then only the first scheduled one, after the debounce delay
    assert asked == [True, False, False]
    assert published == [(crew["project"].pk, snapshots.REFRESH_DELAY_SECONDS)]


@pytest.mark.django_db
def test_a_lost_refresh_is_asked_for_again_once_its_flag_expires(
    crew, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshots, "_publish", lambda *, project_id, countdown: True)
    stats_snapshot_get(project=crew["project"], kind=StatsSnapshot.Kind.PROJECT)
    StatsSnapshot.objects.update(
        refresh_requested_at=timezone.now() - snapshots.REFRESH_FLAG_EXPIRY - timedelta(1)
    )

    assert stats_refresh_request(project_id=crew["project"].pk)


@pytest.mark.django_db
def test_a_broker_that_refuses_leaves_no_flag_behind(crew, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshots, "_publish", lambda *, project_id, countdown: False)
    stats_snapshot_get(project=crew["project"], kind=StatsSnapshot.Kind.PROJECT)

    assert not stats_refresh_request(project_id=crew["project"].pk)
    assert StatsSnapshot.objects.get().refresh_requested_at is None


@pytest.mark.django_db
def test_only_managers_may_refresh_and_the_button_schedules_the_task_at_once(
    crew, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = []
    monkeypatch.setattr(
        snapshots,
        "_publish",
        lambda *, project_id, countdown: published.append((project_id, countdown)) or True,
    )
    url = f"/manage/projects/{crew['project'].pk}/stats/refresh"
    labeler = Client(enforce_csrf_checks=False)
    labeler.force_login(crew["alice"])
    assert labeler.post(url).status_code in (403, 404)
    assert published == []

    manager = Client()
    manager.force_login(crew["manager"])
    response = manager.post(url, {"next": "dashboard"})

    assert response.status_code == 302 and response["Location"].endswith(
        f"/manage/projects/{crew['project'].pk}/"
    )
    assert published == [(crew["project"].pk, 0)]


@pytest.mark.django_db
def test_the_dashboard_reads_a_snapshot_in_a_fixed_number_of_queries(
    make_project, django_assert_max_num_queries
) -> None:  # type: ignore[no-untyped-def]
    for tasks in (2, 20):
        project = make_project(tasks=tasks, k=3, overlap=1)
        boss, *people = make_people(3, prefix=f"q{tasks}-")
        add_member(project, boss, Role.MANAGER)
        for index, person in enumerate(people):
            add_member(project, person, Role.LABELER)
            for round_ in range(tasks // 2):
                _rank_one(person, project, f"{tasks}-{index}-{round_}")
        stats_snapshot_get(project=project, kind=StatsSnapshot.Kind.PROJECT)
        client = Client()
        client.force_login(boss)
        with django_assert_max_num_queries(12):
            assert client.get(f"/manage/projects/{project.pk}/").status_code == 200


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_refreshes_the_snapshot_after_new_judgments(crew, celery_worker: str) -> None:
    # given a snapshot of one judgment
    project = crew["project"]
    _rank_one(crew["alice"], project, "one")
    first = stats_snapshot_get(project=project, kind=StatsSnapshot.Kind.PROJECT)
    assert first.judgments_seen == 1

    # when two more judgments arrive (committed: the submit asks for a refresh on commit)
    _rank_one(crew["bob"], project, "two")
    _rank_one(crew["alice"], project, "three")
    assert StatsSnapshot.objects.get(pk=first.pk).refresh_requested_at is not None

    # then the worker recomputes it, once the debounce delay has passed
    deadline = time.monotonic() + WORKER_WAIT_S
    snapshot = StatsSnapshot.objects.get(pk=first.pk)
    while snapshot.judgments_seen != 3 and time.monotonic() < deadline:
        time.sleep(0.5)
        snapshot.refresh_from_db()
    assert snapshot.judgments_seen == 3
    assert snapshot.payload["progress"]["judgments_total"] == 3
    assert snapshot.computed_at > first.computed_at
    assert snapshot.refresh_requested_at is None


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_computes_the_ab_results_of_a_session(celery_worker: str) -> None:
    # given an A/B session with no snapshot
    project = Project.objects.create(name="ab", kind=Project.Kind.AB, k=2)

    # when a refresh runs on the worker
    assert snapshots.stats_refresh_now(project=project)

    # then both snapshots appear
    deadline = time.monotonic() + WORKER_WAIT_S
    while StatsSnapshot.objects.filter(project=project).count() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    ab = StatsSnapshot.objects.get(project=project, kind=StatsSnapshot.Kind.AB)
    assert ab.payload["votes_total"] == 0 and ab.payload["ratings"] == []
    assert ab.payload["rounds"] == snapshots.AB_BOOTSTRAP_ROUNDS


def test_tau_b_agrees_with_scipy_on_every_ranking_of_four_with_ties() -> None:
    import itertools

    from scipy.stats import kendalltau

    from annotation.stats import _tau_b

    rankings = [list(r) for r in itertools.product(range(1, 5), repeat=4) if len(set(r)) > 1]
    for x, y in itertools.product(rankings[::7], rankings[::5]):
        assert _tau_b(x, y) == pytest.approx(float(kendalltau(x, y).statistic), abs=1e-12), (x, y)
