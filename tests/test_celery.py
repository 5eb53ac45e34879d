"""Celery: a real worker round trip over Redis, queue routing, and the settings jobs rely on."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from django.conf import settings

from config.celery import app as celery_app
from config.celery import ping
from training.services import (
    DATASET_BUILD_TASK,
    GENERATION_JOB_TASK,
    SCORING_JOB_TASK,
    TRAINING_RUN_TASK,
    training_run_enqueue,
)


@pytest.mark.worker
def test_a_task_round_trips_through_a_real_worker(celery_worker: str) -> None:
    # given a worker consuming both queues (the fixture waited for its ping)
    assert not celery_app.conf.task_always_eager

    # when
    reply = ping.delay().get(timeout=30)

    # then the worker ran it and sent the result back through Redis
    assert set(reply) == {"pong"}
    assert celery_worker.endswith("@" + reply["pong"])


JOB_TASKS = [DATASET_BUILD_TASK, TRAINING_RUN_TASK, GENERATION_JOB_TASK, SCORING_JOB_TASK]


def test_each_job_kind_has_one_task_that_names_the_queue_services_publish_it_on() -> None:
    import training.tasks  # noqa: F401  (registers the tasks)

    assert [celery_app.tasks[task.name].queue for task in JOB_TASKS] == [task.queue for task in JOB_TASKS]
    assert [task.queue for task in JOB_TASKS] == ["default", "gpu", "gpu", "gpu"]
    reapers = [name for name in celery_app.tasks if name.startswith("training.tasks.") and "reap" in name]
    assert reapers and all(celery_app.tasks[name].queue == "default" for name in reapers)


def test_no_task_is_routed_by_a_pattern_of_names() -> None:
    assert not celery_app.conf.task_routes
    # scheduled and unnamed sends fall to the default queue
    assert celery_app.amqp.router.route({}, "rankwise.ping")["queue"].name == "default"


@pytest.mark.django_db
def test_services_publish_a_runs_task_by_name_on_the_gpu_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = []
    monkeypatch.setattr(celery_app, "send_task", lambda name, **options: sent.append((name, options)))
    assert training_run_enqueue(run_id=7)
    assert sent == [("training.tasks.training_run_execute", {"args": (7,), "queue": "gpu"})]


def test_the_services_never_import_the_task_module() -> None:
    # the task module imports the services: an import back would be a cycle
    package = Path(__file__).resolve().parent.parent / "training" / "services"
    modules = sorted(package.glob("*.py"))
    assert {"__init__.py", "jobs.py", "runs.py"} <= {module.name for module in modules}
    for module in modules:
        tree = ast.parse(module.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        assert not {name for name in imported if name and name.startswith("training.tasks")}, module.name


def test_the_app_accepts_only_json() -> None:
    assert celery_app.conf.accept_content == ["json"]
    assert celery_app.conf.task_serializer == "json"
    assert celery_app.conf.result_serializer == "json"


def test_a_worker_reserves_one_message_at_a_time() -> None:
    assert celery_app.conf.worker_prefetch_multiplier == 1


def test_redis_redelivers_only_after_the_longest_training_run_could_have_finished() -> None:
    visibility_timeout = celery_app.conf.broker_transport_options["visibility_timeout"]

    assert visibility_timeout > settings.TRAINING_TIME_LIMIT_S
