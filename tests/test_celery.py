"""Celery: a real worker round trip over Redis, queue routing, and the settings jobs rely on."""

from __future__ import annotations

import pytest
from django.conf import settings

from config.celery import app as celery_app
from config.celery import ping


@pytest.mark.worker
def test_a_task_round_trips_through_a_real_worker(celery_worker: str) -> None:
    # given a worker consuming both queues (the fixture waited for its ping)
    assert not celery_app.conf.task_always_eager

    # when
    reply = ping.delay().get(timeout=30)

    # then the worker ran it and sent the result back through Redis
    assert set(reply) == {"pong"}
    assert celery_worker.endswith("@" + reply["pong"])


def queue_for(task_name: str) -> str:
    return celery_app.amqp.router.route({}, task_name)["queue"].name


@pytest.mark.parametrize(
    "task_name",
    [
        "training.tasks.training_run_execute",
        "training.tasks.training_run_resume",
        "training.tasks.generation_job_execute",
    ],
)
def test_training_runs_and_generation_jobs_go_to_the_gpu_queue(task_name: str) -> None:
    assert queue_for(task_name) == "gpu"


@pytest.mark.parametrize(
    "task_name",
    ["annotation.tasks.assignment_leases_expire", "training.tasks.dataset_build_execute", "rankwise.ping"],
)
def test_every_other_task_goes_to_the_default_queue(task_name: str) -> None:
    assert queue_for(task_name) == "default"


def test_the_app_accepts_only_json() -> None:
    assert celery_app.conf.accept_content == ["json"]
    assert celery_app.conf.task_serializer == "json"
    assert celery_app.conf.result_serializer == "json"


def test_a_worker_reserves_one_message_at_a_time() -> None:
    assert celery_app.conf.worker_prefetch_multiplier == 1


def test_redis_redelivers_only_after_the_longest_training_run_could_have_finished() -> None:
    visibility_timeout = celery_app.conf.broker_transport_options["visibility_timeout"]

    assert visibility_timeout > settings.TRAINING_TIME_LIMIT_S
