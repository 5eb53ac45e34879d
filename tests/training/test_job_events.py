"""A job's end reaches people (notices) and programs (webhooks): once per terminal transition, never for a lost race."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from annotation import webhooks
from annotation.models import Membership, Notice, Project, Webhook, WebhookDelivery
from annotation.roles import Role
from training.job_events import job_ended
from training.models import DatasetBuild, TrainingRun
from training.services import dataset_build_fail, training_run_cancel, training_run_fail

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_broker(monkeypatch):
    # Deliveries are written here; their publication is the webhook tests' business.
    monkeypatch.setattr(webhooks, "webhook_delivery_publish", lambda *, delivery_id, countdown=0: True)


@pytest.fixture
def setting():  # type: ignore[no-untyped-def]
    User = get_user_model()
    starter = User.objects.create_user(username="stella", password=None)
    boss = User.objects.create_user(username="boss", password=None)
    project = Project.objects.create(name="events")
    Membership.objects.create(project=project, user=boss, role=Role.MANAGER)
    build = DatasetBuild.objects.create(name="b-1", created_by=starter, status=DatasetBuild.Status.RUNNING)
    build.projects.add(project)
    run = TrainingRun.objects.create(
        name="rm-1", kind=TrainingRun.Kind.REWARD, dataset_build=build, base_model="m", created_by=starter
    )
    return project, starter, boss, build, run


def test_a_failed_run_tells_its_starter_and_the_projects_managers_and_posts_run_finished(setting):
    project, _starter, _boss, _build, run = setting
    Webhook.objects.create(project=project, url="http://hooks.test/", secret="s", events=["run.finished"])

    assert training_run_fail(run_id=run.pk, error="CUDA out of memory")

    notices = Notice.objects.filter(kind=Notice.Kind.RUN, object_id=run.pk)
    assert sorted(notices.values_list("user__username", flat=True)) == ["boss", "stella"]
    assert {(n.outcome, n.title, n.url) for n in notices} == {("failed", "rm-1", f"/training/runs/{run.pk}/")}
    delivery = WebhookDelivery.objects.get()
    assert delivery.event == "run.finished"
    assert delivery.payload["data"]["run"]["status"] == "failed"
    assert "CUDA out of memory" in delivery.payload["data"]["run"]["error"]


def test_a_transition_that_lost_its_race_tells_nobody(setting):
    _project, _starter, _boss, _build, run = setting
    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.SUCCEEDED)

    assert not training_run_fail(run_id=run.pk, error="late")

    assert not Notice.objects.exists()


def test_a_cancelled_queued_run_is_a_cancelled_notice(setting):
    _project, starter, _boss, _build, run = setting

    training_run_cancel(run=run)

    assert Notice.objects.get(user=starter).outcome == "cancelled"


def test_a_failed_build_posts_build_finished_to_the_webhooks_that_chose_it(setting):
    project, starter, _boss, build, _run = setting
    Webhook.objects.create(project=project, url="http://hooks.test/a", secret="s", events=["build.finished"])
    Webhook.objects.create(project=project, url="http://hooks.test/b", secret="s", events=["run.finished"])

    assert dataset_build_fail(build_id=build.pk, error="no comparisons")

    assert Notice.objects.get(user=starter).kind == Notice.Kind.BUILD
    delivery = WebhookDelivery.objects.get()
    assert delivery.webhook.url == "http://hooks.test/a"
    assert delivery.payload["data"]["build"]["name"] == "b-1"


def test_job_ended_ignores_a_job_that_has_not_ended(setting):
    _project, _starter, _boss, _build, run = setting

    job_ended(TrainingRun, job_id=run.pk)

    assert not Notice.objects.exists()


def test_a_generation_job_that_ends_tells_its_starter_and_posts_no_webhook(setting):
    from annotation.models import Policy
    from training.models import GenerationJob
    from training.services import generation_job_cancel

    project, starter, boss, _build, _run = setting
    Webhook.objects.create(
        project=project, url="http://hooks.test/", secret="s", events=["run.finished", "build.finished"]
    )
    policy = Policy.objects.create(name="writer", kind=Policy.Kind.MODEL, base_model="m")
    job = GenerationJob.objects.create(policy=policy, project=project, created_by=starter)

    generation_job_cancel(job=job)

    notices = Notice.objects.filter(kind=Notice.Kind.GENERATION)
    assert sorted(notices.values_list("user__username", flat=True)) == sorted(
        [starter.username, boss.username]
    )
    assert notices.first().url == f"/generation/{job.pk}/"
    assert not WebhookDelivery.objects.exists()
