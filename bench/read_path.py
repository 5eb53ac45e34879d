"""Benchmark: the read path (dashboard, stats API, A/B results, run and build lists) as a project grows.

    .venv/bin/python bench/read_path.py [--sizes 10000,100000] [--repeat 15] [--keep]

1. Creates a PostgreSQL database of its own (DATABASE_URL, by default
   postgres://postgres@127.0.0.1:5432/rankwise_bench_read), migrates it.
2. Grows, straight into PostgreSQL with INSERT … SELECT (never through the API),
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
on a 2-core machine; pass --sizes 10000,100000,1000000 for a million (the
data is written in SQL, a few minutes for a million judgments; computing the
statistics in the request is left out above --in-request-up-to, where one
sample takes minutes).

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
BATCH_TASKS_SQL = 50_000  # tasks per transaction of the SQL generator
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


def _reserve_ids(cursor: Any, table: str, count: int) -> int:
    """The first of `count` fresh ids of `table`, its sequence moved past them."""
    cursor.execute(
        "SELECT setval(pg_get_serial_sequence(%s, 'id'), nextval(pg_get_serial_sequence(%s, 'id')) + %s - 1)",
        [table, table, count],
    )
    return int(cursor.fetchone()[0]) - count + 1


def _grow_tasks(world: World, project: Any, *, tasks: int, k: int, overlap: int, start: int) -> int:
    """`tasks` new tasks of `k` completions, each judged by `overlap` people; returns judgments made.

    Written in SQL (INSERT … SELECT over generate_series), ids reserved up
    front so that every row's neighbours are arithmetic: task i has prompt
    P+i, completions C+i·k+position, judgments J+i·overlap+slot. A million
    judgments with their six million comparisons take minutes this way,
    against most of an hour through the ORM. Runs as a replica would
    (session_replication_role): it needs the superuser the bench connects as.

    Each task's completions get a quality (policy skill plus noise); each
    labeler ranks by quality plus their own noise, rounded so that about one
    comparison in twenty is a tie. A/B tasks show two of the session's policies.
    """
    from django.db import connection, transaction

    if tasks <= 0:
        return 0
    people = [person.pk for person in world.people]
    policies = [policy.pk for policy in world.policies]
    # A/B: the six pairs of four policies, in turn; ranking: every policy, by position.
    pairs = [(a, b) for i, a in enumerate(policies[:AB_POLICIES]) for b in policies[i + 1 : AB_POLICIES]]
    made = 0
    for offset in range(0, tasks, BATCH_TASKS_SQL):
        count = min(BATCH_TASKS_SQL, tasks - offset)
        first = start + offset
        with transaction.atomic(), connection.cursor() as cursor:
            ids = {
                table: _reserve_ids(cursor, f"annotation_{table}", count * per)
                for table, per in (
                    ("prompt", 1),
                    ("completion", k),
                    ("task", 1),
                    ("taskcompletion", k),
                    ("assignment", overlap),
                    ("judgment", overlap),
                )
            }
            params = {
                "n": count,
                "k": k,
                "overlap": overlap,
                "first": first,
                "project": project.pk,
                "name": project.name,
                "people": people,
                "policies": policies,
                "pair_a": [a for a, _b in pairs],
                "pair_b": [b for _a, b in pairs],
                "ab": k != K,
                **{f"{table}_id": value for table, value in ids.items()},
            }
            # Bench data is consistent by construction: no foreign-key checks at commit (Django's
            # are deferred, and checking six million comparisons took minutes a batch), and no
            # row triggers (the queue counters are recounted once at the end, see grow_to).
            cursor.execute("SET LOCAL session_replication_role = replica")
            cursor.execute("SELECT setseed(%s)", [((first * 7919) % 10_000) / 10_000])
            cursor.execute(
                """
                INSERT INTO annotation_prompt
                    (id, external_id, text, messages, metadata, content_hash, created_at, project_id)
                SELECT %(prompt_id)s + i, '', 'Question ' || (%(first)s + i) || ' of ' || %(name)s || '?',
                       NULL, '{}', %(project)s || '-' || (%(first)s + i), now(), %(project)s
                FROM generate_series(0, %(n)s - 1) AS i
                """,
                params,
            )
            cursor.execute(
                """
                INSERT INTO annotation_completion
                    (id, uid, text, generation_settings, created_at, policy_id, prompt_id)
                SELECT %(completion_id)s + i * %(k)s + p, gen_random_uuid(),
                       'Answer ' || p || ' to question ' || (%(first)s + i), '{}', now(),
                       CASE WHEN %(ab)s
                            THEN (CASE WHEN p = 0 THEN %(pair_a)s ELSE %(pair_b)s END)
                                 [1 + (%(first)s + i) %% cardinality(%(pair_a)s)]
                            ELSE (%(policies)s)[1 + p] END,
                       %(prompt_id)s + i
                FROM generate_series(0, %(n)s - 1) AS i, generate_series(0, %(k)s - 1) AS p
                """,
                params,
            )
            cursor.execute(
                """
                INSERT INTO annotation_task
                    (id, is_gold, gold_ranks, judgment_count, created_at, project_id, prompt_id,
                     ab_left_position, random_rank, uncertainty)
                SELECT %(task_id)s + i, false, NULL, %(overlap)s, now(), %(project)s, %(prompt_id)s + i,
                       CASE WHEN %(ab)s THEN i %% 2 END, random(), NULL
                FROM generate_series(0, %(n)s - 1) AS i
                """,
                params,
            )
            cursor.execute(
                """
                INSERT INTO annotation_taskcompletion (id, position, completion_id, task_id)
                SELECT %(taskcompletion_id)s + i * %(k)s + p, p, %(completion_id)s + i * %(k)s + p,
                       %(task_id)s + i
                FROM generate_series(0, %(n)s - 1) AS i, generate_series(0, %(k)s - 1) AS p
                """,
                params,
            )
            # One row per (task, slot, position): the rank that labeler gave that completion.
            cursor.execute("DROP TABLE IF EXISTS bench_ranks")
            cursor.execute(
                """
                CREATE TEMPORARY TABLE bench_ranks ON COMMIT DROP AS
                WITH quality AS (
                    SELECT i, p, p * 0.35 + random() AS q
                    FROM generate_series(0, %(n)s - 1) AS i, generate_series(0, %(k)s - 1) AS p
                ), noisy AS (
                    SELECT i, s, p, round((q + 0.8 * random())::numeric * 8) AS score, random() AS shuffle
                    FROM quality, generate_series(0, %(overlap)s - 1) AS s
                )
                SELECT i, s, p, dense_rank() OVER (PARTITION BY i, s ORDER BY score DESC)::int AS r, shuffle
                FROM noisy
                """,
                params,
            )
            cursor.execute(
                """
                INSERT INTO annotation_assignment
                    (id, status, slot, permutation, leased_at, lease_expires_at, finished_at, skip_reason,
                     user_id, task_id, left_policy_id, project_id)
                SELECT %(assignment_id)s + i * %(overlap)s + s, 'submitted', s,
                       jsonb_agg(p ORDER BY shuffle), now(), now() + interval '30 minutes', now(), '',
                       (%(people)s)[1 + ((%(first)s + i) * %(overlap)s + s) %% cardinality(%(people)s)],
                       %(task_id)s + i, NULL, %(project)s
                FROM bench_ranks GROUP BY i, s
                """,
                params,
            )
            cursor.execute(
                """
                INSERT INTO annotation_judgment
                    (id, ranks, likert, flags, none_acceptable, rationale, active_seconds, client_token,
                     created_at, assignment_id, user_id, task_id, strength, review, review_reason,
                     reviewed_at, reviewed_by_id, version, source)
                SELECT %(judgment_id)s + i * %(overlap)s + s, jsonb_object_agg(c.uid::text, r.r), '{}', '{}',
                       false, '', 5 + 55 * random(),
                       'bench-' || (%(assignment_id)s + i * %(overlap)s + s), now(),
                       %(assignment_id)s + i * %(overlap)s + s,
                       (%(people)s)[1 + ((%(first)s + i) * %(overlap)s + s) %% cardinality(%(people)s)],
                       %(task_id)s + i, NULL, 'pending', '', NULL, NULL, 1, 'human'
                FROM bench_ranks AS r
                JOIN annotation_completion AS c ON c.id = %(completion_id)s + r.i * %(k)s + r.p
                GROUP BY r.i, r.s
                """,
                params,
            )
            cursor.execute(
                """
                INSERT INTO annotation_comparison
                    (is_tie, margin, created_at, labeler_id, chosen_id, rejected_id, judgment_id,
                     project_id, prompt_id, task_id, source)
                SELECT a.r = b.r, CASE WHEN a.r <> b.r THEN abs(a.r - b.r)::float END, now(),
                       (%(people)s)[1 + ((%(first)s + a.i) * %(overlap)s + a.s) %% cardinality(%(people)s)],
                       %(completion_id)s + a.i * %(k)s + CASE WHEN a.r <= b.r THEN a.p ELSE b.p END,
                       %(completion_id)s + a.i * %(k)s + CASE WHEN a.r <= b.r THEN b.p ELSE a.p END,
                       %(judgment_id)s + a.i * %(overlap)s + a.s,
                       %(project)s, %(prompt_id)s + a.i, %(task_id)s + a.i, 'human'
                FROM bench_ranks AS a
                JOIN bench_ranks AS b ON b.i = a.i AND b.s = a.s AND b.p > a.p
                """,
                params,
            )
        made += count * overlap
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
    from django.db import connection, transaction

    from annotation.counters import counters_recount

    started = time.perf_counter()
    new_tasks = (judgments - world.judgments) // OVERLAP
    world.judgments += _grow_tasks(
        world, world.project, tasks=new_tasks, k=K, overlap=OVERLAP, start=world.judgments // OVERLAP
    )
    new_votes = judgments // AB_SHARE - world.votes
    world.votes += _grow_tasks(world, world.ab, tasks=new_votes, k=2, overlap=1, start=world.votes)
    _grow_lists(world, judgments // JUDGMENTS_PER_LIST_ROW - world.list_rows)
    with transaction.atomic():
        counters_recount()
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


def measure(
    world: World, repeat: int, *, in_request: bool
) -> tuple[list[tuple[str, str, list[float]]], dict[str, float]]:
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
    for name, url in pages.items() if in_request else ():
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
    parser.add_argument(
        "--in-request-up-to",
        type=int,
        default=100_000,
        help="measure the in-request path (before snapshots) only up to this many judgments",
    )
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
            rows, refresh = measure(world, arguments.repeat, in_request=size <= arguments.in_request_up_to)
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
        large = {(name, path): samples for name, path, samples in results[last][0]}
        for name, path, small in results[first][0]:
            if path != "in request":
                print(f"  {name:<12} {p50_p95(large[name, path])[1] / p50_p95(small)[1]:.2f}×")


if __name__ == "__main__":
    main()
