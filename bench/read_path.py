"""Benchmark: the read path (dashboard, stats API, A/B results, run and build lists) as a project grows.

    .venv/bin/python bench/read_path.py [--sizes 10000,100000] [--repeat 15] [--keep]

1. Creates a PostgreSQL database of its own (DATABASE_URL, by default
   postgres://postgres@127.0.0.1:5432/rankwise_bench_read), migrates it.
2. Grows, straight into PostgreSQL with bulk inserts (never through the API),
   a ranking project to each size in turn (judgments with K=4, 4 labelers a
   task, and their 6 comparisons each), an A/B session of 4 policies with a
   tenth as many votes, and one dataset build and one training run per 100
   judgments (so the lists grow too).
3. At each size, with Django's test client in this process (every
   middleware, templates rendered, no network):
   - snapshot: the pages as they are now, reading the StatsSnapshot rows
     (refreshed first, and the refresh timed: what the Celery task does);
   - in request: the same pages computing the statistics in the request and
     storing nothing, as every request did before snapshots (timed with fewer
     repetitions: it is slow);
   - the run list and the build list (first page).
4. Prints one table: p50 and p95 in milliseconds, and the ratio of the
   in-request path to the snapshot path.

Sizes: the default 10k and 100k keep the whole run under about ten minutes
on a 2-core machine (filling 100k judgments with their 600k comparisons is
most of it); pass --sizes 10000,100000,1000000 where there is time for a
million (about ten times the fill time of 100k).

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/rankwise_bench_read"
K = 4
OVERLAP = 4
LABELERS = 20
AB_POLICIES = 4
AB_SHARE = 10  # an A/B session with one vote per this many ranking judgments
JUDGMENTS_PER_LIST_ROW = 100  # one build and one run per this many judgments
BATCH_TASKS = 2000
SLOW_REPEAT = 3
SLOW_REPEAT_UP_TO = 20_000  # judgments; above, one in-request sample per page


def setup_django(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    # DEBUG off: no query log in memory, templates as in production.
    os.environ["DEBUG"] = "0"
    os.environ.setdefault("SECRET_KEY", "bench-only-" + "x" * 50)
    os.environ.setdefault("ALLOWED_HOSTS", "testserver")
    os.environ.setdefault("SECURE_SSL_REDIRECT", "0")
    os.environ.setdefault("SESSION_COOKIE_SECURE", "0")
    os.environ.setdefault("CSRF_COOKIE_SECURE", "0")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    sys.path.insert(0, str(REPO_ROOT))
    import django

    django.setup()


def database_recreate(database_url: str, *, drop_only: bool = False) -> None:
    import psycopg

    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not drop_only:
            connection.execute(f'CREATE DATABASE "{name}"')


# --- growing the data --------------------------------------------------------------


class World:
    """The bench's people, projects and policies, and how far each has grown."""

    def __init__(self) -> None:
        from django.contrib.auth import get_user_model

        from annotation.models import Membership, Policy, Project
        from annotation.roles import Role

        User = get_user_model()
        self.manager = User.objects.create_user(username="bench-manager", password=None)
        self.people = User.objects.bulk_create(User(username=f"bench-labeler-{i}") for i in range(LABELERS))
        self.project = Project.objects.create(name="bench ranking", k=K, overlap=OVERLAP)
        self.ab = Project.objects.create(name="bench A/B", k=2, overlap=1, kind=Project.Kind.AB)
        for project in (self.project, self.ab):
            Membership.objects.create(project=project, user=self.manager, role=Role.MANAGER)
            Membership.objects.bulk_create(
                Membership(
                    project=project, user=person, role=Role.LABELER if project.k == K else Role.EVALUATOR
                )
                for person in self.people
            )
        self.policies = [
            Policy.objects.create(name=f"bench-{i}", kind=Policy.Kind.IMPORTED) for i in range(K)
        ]
        self.judgments = 0
        self.votes = 0
        self.list_rows = 0
        self.rng = random.Random(20261201)  # noqa: S311 — made-up data, not secrets


def _grow_tasks(world: World, project: Any, *, tasks: int, k: int, overlap: int, start: int) -> int:
    """`tasks` new tasks of `k` completions, each judged by `overlap` people; returns judgments made."""
    from django.utils import timezone

    from annotation.models import Assignment, Comparison, Completion, Judgment, Prompt, Task, TaskCompletion
    from annotation.services import comparisons_from_judgment

    rng, now, made = world.rng, timezone.now(), 0
    for offset in range(0, tasks, BATCH_TASKS):
        count = min(BATCH_TASKS, tasks - offset)
        first = start + offset
        prompts = Prompt.objects.bulk_create(
            Prompt(
                project=project,
                text=f"Question {first + i} of {project.name}?",
                content_hash=f"{project.pk}-{first + i}",
            )
            for i in range(count)
        )
        completions = Completion.objects.bulk_create(
            Completion(prompt=prompt, policy=policy, text=f"Answer by {policy.name} to {prompt.text}")
            for prompt in prompts
            for policy in (world.policies[:k] if k == K else rng.sample(world.policies[:AB_POLICIES], k))
        )
        tasks_made = Task.objects.bulk_create(
            Task(project=project, prompt=prompt, judgment_count=overlap) for prompt in prompts
        )
        items = TaskCompletion.objects.bulk_create(
            TaskCompletion(task=task, completion=completions[i * k + position], position=position)
            for i, task in enumerate(tasks_made)
            for position in range(k)
        )
        assignments, answers = [], []
        for i, task in enumerate(tasks_made):
            quality = [rng.gauss(0, 1) for _ in range(k)]
            for slot in range(overlap):
                noisy = [q + rng.gauss(0, 0.8) for q in quality]
                order = sorted(range(k), key=lambda p: -noisy[p])
                ranks = [0] * k
                for rank, position in enumerate(order, start=1):
                    ranks[position] = rank
                if rng.random() < 0.05:
                    ranks[order[1]] = ranks[order[0]]
                permutation = list(range(k))
                rng.shuffle(permutation)
                assignments.append(
                    Assignment(
                        task=task,
                        project_id=project.pk,
                        user=world.people[((first + i) * overlap + slot) % LABELERS],
                        slot=slot,
                        permutation=permutation,
                        status=Assignment.Status.SUBMITTED,
                        leased_at=now,
                        lease_expires_at=now + timedelta(minutes=30),
                        finished_at=now,
                    )
                )
                answers.append((i, ranks))
        Assignment.objects.bulk_create(assignments, batch_size=5000)
        judgments = Judgment.objects.bulk_create(
            (
                Judgment(
                    assignment=assignment,
                    task=tasks_made[index],
                    user_id=assignment.user_id,
                    ranks={str(completions[index * k + p].uid): ranks[p] for p in range(k)},
                    active_seconds=rng.uniform(5, 60),
                    client_token=f"bench-{assignment.pk}",
                )
                for assignment, (index, ranks) in zip(assignments, answers, strict=True)
            ),
            batch_size=5000,
        )
        by_task: dict[int, list[Any]] = {}
        for item in items:
            by_task.setdefault(item.task_id, []).append(item)
        Comparison.objects.bulk_create(
            (
                comparison
                for judgment in judgments
                for comparison in comparisons_from_judgment(
                    judgment=judgment, items=by_task[judgment.task_id], likert_margins=False
                )
            ),
            batch_size=10000,
        )
        made += len(judgments)
    return made


def _grow_lists(world: World, rows: int) -> None:
    from training.models import DatasetBuild, TrainingRun

    builds = DatasetBuild.objects.bulk_create(
        DatasetBuild(name=f"build {world.list_rows + i}", created_by=world.manager) for i in range(rows)
    )
    DatasetBuild.projects.through.objects.bulk_create(
        DatasetBuild.projects.through(datasetbuild_id=build.pk, project_id=world.project.pk)
        for build in builds
    )
    TrainingRun.objects.bulk_create(
        TrainingRun(name=f"run {build.name}", kind="reward", dataset_build=build, base_model="m")
        for build in builds
    )
    world.list_rows += rows


def grow_to(world: World, judgments: int) -> float:
    """Grow every part to `judgments` ranking judgments; returns the seconds it took."""
    from django.db import connection

    started = time.perf_counter()
    new_tasks = (judgments - world.judgments) // OVERLAP
    world.judgments += _grow_tasks(
        world, world.project, tasks=new_tasks, k=K, overlap=OVERLAP, start=world.judgments // OVERLAP
    )
    new_votes = judgments // AB_SHARE - world.votes
    world.votes += _grow_tasks(world, world.ab, tasks=new_votes, k=2, overlap=1, start=world.votes)
    _grow_lists(world, judgments // JUDGMENTS_PER_LIST_ROW - world.list_rows)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return time.perf_counter() - started


# --- measuring -----------------------------------------------------------------------


def timed(call: Callable[[], Any], repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def p50_p95(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95


def measure(world: World, repeat: int) -> tuple[list[tuple[str, str, list[float]]], dict[str, float]]:
    from unittest import mock

    from django.test import Client
    from django.utils import timezone

    from annotation import snapshots
    from annotation.models import StatsSnapshot
    from annotation.snapshots import stats_snapshot_refresh

    client = Client()
    client.force_login(world.manager)

    def get(url: str) -> Callable[[], Any]:
        def call() -> Any:
            response = client.get(url)
            assert response.status_code == 200, (url, response.status_code)
            return response

        return call

    def without_snapshot(url: str) -> Callable[[], Any]:
        """The page as before snapshots: the statistics computed in the request, nothing stored."""

        def compute_every_time(*, project: Any, kind: str) -> Any:
            payload, seen = snapshots._compute(project=project, kind=kind)
            row = StatsSnapshot(
                project=project,
                kind=kind,
                payload=snapshots._json_ready(payload),
                computed_at=timezone.now(),
                judgments_seen=seen,
            )
            row.computed_in_request = True  # type: ignore[attr-defined]
            return row

        def call() -> Any:
            with (
                mock.patch("annotation.views.stats_snapshot_get", compute_every_time),
                mock.patch("annotation.api.stats_snapshot_get", compute_every_time),
            ):
                return get(url)()

        return call

    pages = {
        "dashboard": f"/manage/projects/{world.project.pk}/",
        "stats API": f"/api/projects/{world.project.pk}/stats",
        "A/B results": f"/manage/projects/{world.ab.pk}/results",
    }
    rows: list[tuple[str, str, list[float]]] = []
    refresh: dict[str, float] = {}
    for project in (world.project, world.ab):
        started = time.perf_counter()
        stats_snapshot_refresh(project_id=project.pk)
        refresh[project.name] = time.perf_counter() - started
    for name, url in pages.items():
        get(url)()  # warm
        rows.append((name, "snapshot", timed(get(url), repeat)))
    # Computing in the request takes minutes at 100k judgments on 2 cores: fewer samples there.
    slow_repeat = SLOW_REPEAT if world.judgments <= SLOW_REPEAT_UP_TO else 1
    for name, url in pages.items():
        rows.append((name, "in request", timed(without_snapshot(url), slow_repeat)))
    for name, url in {"run list": "/training/runs/", "build list": "/datasets/"}.items():
        get(url)()
        rows.append((name, "page 1", timed(get(url), repeat)))
    return rows, refresh


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="10000,100000", help="ranking judgments at each step, comma-separated"
    )
    parser.add_argument("--repeat", type=int, default=15, help="requests per snapshot page and list")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    arguments = parser.parse_args()
    sizes = [int(size) for size in arguments.sizes.split(",")]
    database_url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)

    database_recreate(database_url)
    setup_django(database_url)
    from django.core.management import call_command
    from django.test.utils import override_settings

    call_command("migrate", verbosity=0)
    # The manifest of hashed static names exists only after collectstatic; plain names here.
    override_settings(
        STORAGES={
            "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
            "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
        }
    ).enable()
    world = World()
    results: dict[int, tuple[list[tuple[str, str, list[float]]], dict[str, float], float]] = {}
    try:
        for size in sizes:
            fill = grow_to(world, size)
            print(
                f"grown to {world.judgments:,} judgments, {world.votes:,} A/B votes, "
                f"{world.list_rows:,} builds and runs in {fill:.0f} s",
                flush=True,
            )
            rows, refresh = measure(world, arguments.repeat)
            results[size] = (rows, refresh, fill)
    finally:
        from django.db import connections

        connections.close_all()
        if not arguments.keep:
            database_recreate(database_url, drop_only=True)

    print()
    print(
        f"Read path, ms (p50 / p95); K={K}, {OVERLAP} labelers a task; A/B votes = judgments / {AB_SHARE}; "
        f"snapshot and list rows over {arguments.repeat} requests, in-request over {SLOW_REPEAT} "
        f"(1 above {SLOW_REPEAT_UP_TO:,} judgments)"
    )
    header = f"{'judgments':>10}  {'page':<12} {'path':<11} {'p50':>9} {'p95':>9}  {'in-request / snapshot (p50)':>28}"
    print(header)
    print("-" * len(header))
    for size, (rows, refresh, _fill) in results.items():
        snapshot_p50 = {name: p50_p95(samples)[0] for name, path, samples in rows if path == "snapshot"}
        for name, path, samples in rows:
            p50, p95 = p50_p95(samples)
            ratio = f"{p50 / snapshot_p50[name]:.0f}×" if path == "in request" else ""
            print(f"{size:>10,}  {name:<12} {path:<11} {p50:>9.1f} {p95:>9.1f}  {ratio:>28}")
        for name, seconds in refresh.items():
            print(f"{size:>10,}  {'refresh':<12} {name:<11} {seconds * 1000:>9.0f}")
    if len(results) > 1:
        first, last = min(results), max(results)
        print()
        print(f"Growth of the snapshot path's p95 from {first:,} to {last:,} judgments:")
        for (name, path, small), (_n, _p, large) in zip(results[first][0], results[last][0], strict=True):
            if path != "in request":
                print(f"  {name:<12} {p50_p95(large)[1] / p50_p95(small)[1]:.2f}×")


if __name__ == "__main__":
    main()
