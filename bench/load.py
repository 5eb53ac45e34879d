"""Benchmark: 100 labelers claiming and ranking at once against gunicorn and PostgreSQL.

    .venv/bin/python bench/load.py [--seconds 120] [--users 100] [--tasks 30000]
                                   [--workers 3] [--threads 4] [--think MIN,MAX] [--warmup 10] [--keep]
    .venv/bin/python bench/load.py --database sqlite [--users 24] [--seconds 60]

Two runs answer two questions:

    .venv/bin/python bench/load.py                 # saturation: how many requests/s the server does
    .venv/bin/python bench/load.py --think 1,2     # paced: how long a labeler waits for an answer

Saturation (the default, no think time): every labeler sends its next request
the moment the last one is answered, so each of the N labelers always has one
request in the server. By Little's law (requests in the system = throughput ×
time in the system) the latency is then N / throughput, whatever one request
costs: 100 labelers at 90 req/s wait about 1.1 s each. That latency is
queueing, not service; what this run measures is the throughput, the capacity.
Cheaper requests raise it, and lower the latency only in proportion.

Paced (--think MIN,MAX seconds): after every call a labeler pauses for a time
drawn uniformly from [MIN, MAX], as a person reads the task before answering
and looks at the next one. N labelers with a mean pause Z then offer at most
N / Z requests/s (100 labelers, 1–2 s: at most 67 req/s; N / (Z + latency)
exactly). While that stays under the capacity, requests rarely wait for one
another and the latency is close to what one request costs: the latency a
labeler feels. If it does not, the run saturates too and the latency grows to
N / throughput − Z. A person spends tens of seconds on a ranking, so 100
labelers pausing 1–2 s stand for well over a thousand real ones.

Warm-up (--warmup, 10 s by default): all labelers start within two seconds
and each claims at once, a burst no real team makes; requests that end in
the first seconds are left out of the latency percentiles (their counts,
errors and the invariants still include them).

1. Creates a PostgreSQL database of its own (DATABASE_URL, by default
   postgres://postgres@127.0.0.1:5432/rankwise_load; dropped first if it is
   there), migrates it and seeds it with bulk_create: one ranking project
   (K=4, overlap 1) with --tasks prompts of 4 completions each, made into
   tasks by the product's own `tasks_create_for_project`, and --users
   labelers with DRF tokens; then ANALYZE, as a live database would have
   planner statistics.
2. Starts `gunicorn config.wsgi` (gthread; by default 3 workers × 4 threads,
   sized for 2 cores that also run PostgreSQL and the load generator) on a
   free local port with production settings (DEBUG=0) except HTTPS.
   Keep-alive outlasts the longest pause, so a paced labeler's connection is
   not closed under it between calls.
3. Runs locust headless for --seconds: every simulated labeler loops
   POST /api/projects/{id}/next → POST /api/assignments/{id}/judgment (the
   4 completions ranked at random, a fresh client_token), pausing after each
   call when --think is given, and one in five iterations reads
   GET /api/projects/ instead: a cheap endpoint measured in the same run, the
   baseline the others are compared with. Users stop after their current
   iteration, so every submit sent is also counted.
4. Prints the pacing, requests/s, p50/p95/p99 latency and errors per endpoint
   (and the latency ratios to the baseline), then checks the invariants in SQL and
   prints each as PASS/FAIL:
   - no person holds two assignments of one task;
   - judgments stored == submits answered 201;
   - comparisons == judgments × C(4,2);
   - no task has more judgments than the overlap (and every task's
     judgment_count matches its judgments).
5. Stops gunicorn and drops the database (unless --keep).

The embedded default (--database sqlite): the same loop against what a fresh
install serves, SQLite and Django's development server (threaded, one
process). It runs twice on copies of one seeded database file: first with the
plain SQLite backend (SQLITE_FAIR_WRITES=0: writers wait in SQLite's busy
handler, which retries by sleeping and serves them in no order), then with
the default (config.sqlite_backend: the process's writers queue first come,
first served), and prints both tables and the ratios of their percentiles.

This file is also the locustfile: locust imports it (module name `load`) in
its own process, where the `Labeler` user class below is defined. Locust
patches sockets with gevent on import, so the benchmark's own process never
imports it. Traffic goes to 127.0.0.1 only. Speed is measured here, never
asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/rankwise_load"
K = 4
OVERLAP = 1
BASELINE_EVERY = 5  # one iteration in five reads the baseline endpoint instead
ENDPOINTS = ("claim", "submit", "baseline")


# --- setup ---------------------------------------------------------------------------


def setup_django(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DEBUG", "1")  # only to load settings here; gunicorn runs with DEBUG=0
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


def seed(*, tasks: int, users: int) -> dict[str, Any]:
    """One K=4 ranking project with `tasks` tasks, `users` labelers with tokens. Returns the locust config."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.contrib.auth.models import Group
    from rest_framework.authtoken.models import Token

    from annotation.models import Completion, Membership, Policy, Project, Prompt
    from annotation.roles import Role
    from annotation.services import tasks_create_for_project

    User = get_user_model()
    project = Project.objects.create(name="load", k=K, overlap=OVERLAP)
    policies = [
        Policy.objects.create(name=f"load-policy-{index}", kind=Policy.Kind.IMPORTED) for index in range(K)
    ]
    batch = 5000
    for start in range(0, tasks, batch):
        prompts = Prompt.objects.bulk_create(
            Prompt(
                project=project,
                external_id=f"load-{number}",
                text=f"Question {number}: how would you explain the load test to a new colleague?",
                content_hash=f"load-{number}",
            )
            for number in range(start, min(start + batch, tasks))
        )
        Completion.objects.bulk_create(
            Completion(prompt=prompt, policy=policy, text=f"Answer {index} to {prompt.external_id}, " * 8)
            for prompt in prompts
            for index, policy in enumerate(policies)
        )
    made = tasks_create_for_project(project=project)
    assert made == tasks, (made, tasks)

    people = User.objects.bulk_create(
        User(username=f"load-labeler-{index}", password=make_password(None)) for index in range(users)
    )
    Membership.objects.bulk_create(
        Membership(project=project, user=person, role=Role.LABELER) for person in people
    )
    group = Group.objects.get(name=Role.LABELER)
    User.groups.through.objects.bulk_create(
        User.groups.through(user=person, group=group) for person in people
    )
    tokens = Token.objects.bulk_create(Token(user=person, key=Token.generate_key()) for person in people)
    return {"project": project.pk, "tokens": [token.key for token in tokens]}


# --- gunicorn ------------------------------------------------------------------------


def gunicorn_start(
    *,
    database_url: str,
    port: int,
    workers: int,
    threads: int,
    keep_alive: int,
    var_dir: str,
    log_path: Path,
) -> subprocess.Popen[bytes]:
    env = server_env(database_url=database_url, var_dir=var_dir)
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "config.wsgi",
        "--bind",
        f"127.0.0.1:{port}",
        "--worker-class",
        "gthread",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--backlog",
        "512",
        # gunicorn's default (2 s) is shorter than a paced labeler's pause: the
        # server would close connections the client is about to reuse.
        "--keep-alive",
        str(keep_alive),
    ]
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return server_wait(server, port=port, log_path=log_path, what="gunicorn")


def server_env(*, database_url: str, var_dir: str) -> dict[str, str]:
    return {
        **os.environ,
        "DEBUG": "0",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1",
        "SECURE_SSL_REDIRECT": "0",
        "SESSION_COOKIE_SECURE": "0",
        "CSRF_COOKIE_SECURE": "0",
        "DATABASE_URL": database_url,
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "VAR_DIR": var_dir,
        "LOG_LEVEL": "WARNING",
    }


def server_wait(
    server: subprocess.Popen[bytes], *, port: int, log_path: Path, what: str
) -> subprocess.Popen[bytes]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"{what} exited ({server.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.terminate()
    raise SystemExit(f"{what} did not answer /healthz within 60 s:\n{log_path.read_text()[-3000:]}")


def runserver_start(
    *, database_url: str, port: int, var_dir: str, log_path: Path, fair_writes: bool
) -> subprocess.Popen[bytes]:
    """Django's development server, as `make demo` serves: one process, a thread per request."""
    env = {
        **server_env(database_url=database_url, var_dir=var_dir),
        "SQLITE_FAIR_WRITES": "1" if fair_writes else "0",
    }
    command = [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"]
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return server_wait(server, port=port, log_path=log_path, what="runserver")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the run -------------------------------------------------------------------------


def locust_run(
    *, host: str, users: int, seconds: int, stop_timeout: int, config: Path, result: Path, log_path: Path
) -> None:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(Path(__file__).resolve()),
        "--headless",
        "--host",
        host,
        "--users",
        str(users),
        "--spawn-rate",
        str(max(users // 2, 1)),
        "--run-time",
        f"{seconds}s",
        "--stop-timeout",
        str(stop_timeout),  # users finish the iteration they are in: every submit sent is counted
        "--only-summary",
        "--loglevel",
        "WARNING",
    ]
    env = {**os.environ, "LOAD_CONFIG": str(config), "LOAD_RESULT": str(result)}
    with log_path.open("wb") as log:
        subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if not result.exists():
        raise SystemExit(f"locust wrote no result:\n{log_path.read_text()[-3000:]}")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return math.nan
    index = max(0, math.ceil(fraction * len(values)) - 1)
    return values[index]


def pacing_describe(*, users: int, think: tuple[float, float]) -> str:
    low, high = think
    if high == 0:
        return f"{users} labelers, no think time (saturation: the throughput is the capacity)"
    return (
        f"{users} labelers pausing {low:g}–{high:g} s after every call (paced: the latency a labeler feels; "
        f"they offer at most {users / ((low + high) / 2):.0f} req/s)"
    )


def report(
    result: dict[str, Any],
    *,
    server: str,
    users: int,
    think: tuple[float, float],
    warmup: float,
) -> dict[str, dict[float, float]]:
    """Prints the run's table; returns each endpoint's p50/p95/p99 (ms)."""
    elapsed = result["elapsed"]
    print()
    print(
        f"{pacing_describe(users=users, think=think)}; {elapsed:.0f} s measured; "
        f"{server} on {os.cpu_count()} cores shared with the database and locust "
        f"(load average at the end: {os.getloadavg()[0]:.1f})"
    )
    print(
        f"latency percentiles over requests that ended after the first {warmup:g} s "
        "(all users started, their first claims served); counts and req/s over the whole run"
    )
    header = f"{'endpoint':<10} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}"
    header += f" {'p50/base':>9} {'p95/base':>9} {'p99/base':>9}"
    print(header)
    print("-" * len(header))
    stats = {}
    for name in ENDPOINTS:
        times = sorted(ms for ended, ms in result["times"].get(name, []) if ended >= warmup)
        stats[name] = {q: percentile(times, q) for q in (0.50, 0.95, 0.99)}
    base = stats["baseline"]
    total_requests = total_errors = 0
    for name in ENDPOINTS:
        count = len(result["times"].get(name, []))
        errors = result["errors"].get(name, 0)
        total_requests += count
        total_errors += errors
        row = stats[name]
        line = f"{name:<10} {count:>9} {count / elapsed:>8.1f} {row[0.50]:>8.1f} {row[0.95]:>8.1f} {row[0.99]:>8.1f}"
        line += f" {errors:>7}"
        line += "".join(f" {row[q] / base[q]:>8.1f}x" for q in (0.50, 0.95, 0.99))
        print(line)
    print("-" * len(header))
    print(f"{'all':<10} {total_requests:>9} {total_requests / elapsed:>8.1f} {'':>26} {total_errors:>7}")
    print(
        f"statuses: claim {result['statuses'].get('claim', {})}, submit {result['statuses'].get('submit', {})}; "
        f"ranked tasks/s: {result['statuses'].get('submit', {}).get('201', 0) / elapsed:.1f}"
    )
    return stats


def invariants(*, project_id: int, submits_201: int) -> bool:
    from django.db import connection

    def scalar(sql: str, *params: Any) -> int:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return int(cursor.fetchone()[0])

    judgments = scalar(
        "SELECT count(*) FROM annotation_judgment j JOIN annotation_task t ON t.id = j.task_id WHERE t.project_id = %s",
        project_id,
    )
    comparisons = scalar("SELECT count(*) FROM annotation_comparison WHERE project_id = %s", project_id)
    checks = [
        (
            "no duplicate (task, user) assignment",
            scalar(
                "SELECT count(*) FROM (SELECT task_id, user_id FROM annotation_assignment "
                "GROUP BY task_id, user_id HAVING count(*) > 1) d"
            )
            == 0,
            "",
        ),
        ("judgments == successful (201) submits", judgments == submits_201, f"{judgments} vs {submits_201}"),
        (
            f"comparisons == judgments × C({K},2)",
            comparisons == judgments * math.comb(K, 2),
            f"{comparisons} vs {judgments} × {math.comb(K, 2)}",
        ),
        (
            "no task with more judgments than the overlap",
            scalar(
                "SELECT count(*) FROM (SELECT task_id FROM annotation_judgment GROUP BY task_id "
                "HAVING count(*) > %s) d",
                OVERLAP,
            )
            == 0,
            "",
        ),
        (
            "every task's judgment_count matches its judgments",
            scalar(
                "SELECT count(*) FROM annotation_task t WHERE t.project_id = %s AND t.judgment_count <> "
                "(SELECT count(*) FROM annotation_judgment j WHERE j.task_id = t.id)",
                project_id,
            )
            == 0,
            "",
        ),
    ]
    print()
    ok = True
    for name, passed, detail in checks:
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'}  {name}{f'  ({detail})' if detail else ''}")
    return ok


def think_parse(value: str) -> tuple[float, float]:
    """`MIN,MAX` seconds (or one number for a fixed pause) → (MIN, MAX)."""
    try:
        parts = [float(part) for part in value.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not all(math.isfinite(part) for part in parts) or not 0 <= parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError(f"{value!r}: give MIN,MAX seconds with 0 <= MIN <= MAX, e.g. 1,2")
    return parts[0], parts[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--seconds", type=int, default=None, help="default: 120 (PostgreSQL), 60 (SQLite)")
    parser.add_argument("--users", type=int, default=None, help="default: 100 (PostgreSQL), 24 (SQLite)")
    parser.add_argument("--tasks", type=int, default=30_000)
    parser.add_argument("--workers", type=int, default=3, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker")
    parser.add_argument(
        "--think",
        type=think_parse,
        default=(0.0, 0.0),
        metavar="MIN,MAX",
        help="pause after every call, drawn uniformly from MIN..MAX seconds (default 0,0: saturation)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="seconds at the start left out of the latency percentiles (users starting at once queue)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()
    sqlite = args.database == "sqlite"
    args.seconds = args.seconds or (60 if sqlite else 120)
    args.users = args.users or (24 if sqlite else 100)
    if not 0 <= args.warmup < args.seconds:
        parser.error("--warmup must be at least 0 and shorter than --seconds")

    work = Path(tempfile.mkdtemp(prefix="rankwise-load-"))
    if sqlite:
        database_url = f"sqlite:///{work / 'seed.sqlite3'}"
    else:
        database_url = os.environ.get("LOAD_DATABASE_URL", DEFAULT_DATABASE_URL)
        if urlsplit(database_url).hostname not in ("127.0.0.1", "localhost"):
            raise SystemExit("the load benchmark only runs against a local database")
        database_recreate(database_url)
    print(f"database {args.database}; logs in {work}")

    started = time.monotonic()
    setup_django(database_url)
    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", verbosity=0)
    config = {**seed(tasks=args.tasks, users=args.users), "think": list(args.think)}
    with connections["default"].cursor() as cursor:
        cursor.execute("ANALYZE")  # fresh bulk-loaded tables have no statistics; a live database has
    print(f"seeded {args.tasks} tasks and {args.users} labelers in {time.monotonic() - started:.0f} s")
    config_path = work / "config.json"
    config_path.write_text(json.dumps(config))
    connections.close_all()

    from training.demo.stack import port_free

    def one_run(name: str, run_database_url: str, start: Any) -> tuple[dict[str, dict[float, float]], bool]:
        port = port_free()
        result_path = work / f"result-{name}.json"
        server = start(database_url=run_database_url, port=port, log_path=work / f"server-{name}.log")
        try:
            locust_run(
                host=f"http://127.0.0.1:{port}",
                users=args.users,
                seconds=args.seconds,
                stop_timeout=30 + math.ceil(2 * args.think[1]),  # an iteration holds two pauses
                config=config_path,
                result=result_path,
                log_path=work / f"locust-{name}.log",
            )
        finally:
            stop(server)
        result = json.loads(result_path.read_text())
        stats = report(result, server=name, users=args.users, think=args.think, warmup=args.warmup)
        if sqlite:
            connections["default"].settings_dict["NAME"] = urlsplit(run_database_url).path
        ok = invariants(
            project_id=config["project"], submits_201=result["statuses"].get("submit", {}).get("201", 0)
        )
        connections.close_all()
        return stats, ok

    if not sqlite:
        keep_alive = math.ceil(args.think[1]) + 5
        _, ok = one_run(
            f"gunicorn gthread {args.workers}×{args.threads}, PostgreSQL",
            database_url,
            lambda **kw: gunicorn_start(
                workers=args.workers,
                threads=args.threads,
                keep_alive=keep_alive,
                var_dir=str(work / "var"),
                **kw,
            ),
        )
        if not args.keep:
            database_recreate(database_url, drop_only=True)
        return 0 if ok else 1

    # SQLite: the plain backend first (the baseline), then the default, each on a copy of the seeded file.
    runs = {}
    for fair in (False, True):
        name = f"runserver, SQLite, {'writers queued in order (default)' if fair else 'plain backend (baseline)'}"
        copy = work / f"{'fair' if fair else 'plain'}.sqlite3"
        shutil.copyfile(work / "seed.sqlite3", copy)
        runs[fair] = one_run(
            name,
            f"sqlite:///{copy}",
            lambda fair=fair, **kw: runserver_start(var_dir=str(work / "var"), fair_writes=fair, **kw),
        )
    print()
    print("SQLite default vs the plain backend, same seeded file, same load (ratio < 1: faster):")
    print(f"{'endpoint':<10} {'p50':>8} {'p95':>8} {'p99':>8}")
    for endpoint in ENDPOINTS:
        plain, fair = runs[False][0][endpoint], runs[True][0][endpoint]
        print(f"{endpoint:<10}" + "".join(f" {fair[q] / plain[q]:>7.2f}x" for q in (0.50, 0.95, 0.99)))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(ok for _, ok in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
else:
    # Imported by locust as its locustfile, in the locust process (never by the benchmark itself).
    import itertools
    import random
    import uuid

    import gevent
    from locust import FastHttpUser, between, events, task

    _CONFIG = json.loads(Path(os.environ["LOAD_CONFIG"]).read_text())
    _THINK_MIN, _THINK_MAX = _CONFIG["think"]
    _TOKENS = itertools.count()
    _RESULT: dict[str, Any] = {"times": {}, "errors": {}, "statuses": {}, "started": None}

    @events.request.add_listener
    def _on_request(
        request_type: str, name: str, response_time: float, exception: Any, **kwargs: Any
    ) -> None:
        if _RESULT["started"] is None:
            _RESULT["started"] = time.monotonic()
        # When it ended, relative to the first request: the report leaves the warm-up out of the percentiles.
        _RESULT["times"].setdefault(name, []).append([time.monotonic() - _RESULT["started"], response_time])
        if exception is not None:
            _RESULT["errors"][name] = _RESULT["errors"].get(name, 0) + 1
        status = str(getattr(kwargs.get("response"), "status_code", 0))
        counts = _RESULT["statuses"].setdefault(name, {})
        counts[status] = counts.get(status, 0) + 1

    @events.test_stop.add_listener
    def _on_stop(**kwargs: Any) -> None:
        _RESULT["elapsed"] = time.monotonic() - (_RESULT["started"] or time.monotonic())
        Path(os.environ["LOAD_RESULT"]).write_text(json.dumps(_RESULT))

    class Labeler(FastHttpUser):
        """Claims, ranks, submits; every fifth iteration reads the project list instead.

        Paced, it pauses after every call: locust waits `wait_time` after each
        iteration, and the labeler itself between claim and submit.
        """

        wait_time = between(_THINK_MIN, _THINK_MAX)

        def on_start(self) -> None:
            token = _CONFIG["tokens"][next(_TOKENS) % len(_CONFIG["tokens"])]
            self.headers = {"Authorization": f"Token {token}"}
            self.project = _CONFIG["project"]
            self.iteration = 0

        @task
        def work(self) -> None:
            self.iteration += 1
            if self.iteration % BASELINE_EVERY == 0:
                with self.client.get(
                    "/api/projects/", headers=self.headers, name="baseline", catch_response=True
                ) as response:
                    if response.status_code != 200:
                        response.failure(f"status {response.status_code}")
                return
            with self.client.post(
                f"/api/projects/{self.project}/next", headers=self.headers, name="claim", catch_response=True
            ) as claimed:
                if claimed.status_code == 204:
                    return  # nothing left: more tasks are needed for this run
                if claimed.status_code != 200:
                    claimed.failure(f"status {claimed.status_code}")
                    return
                assignment = claimed.json()
            if _THINK_MAX > 0:
                # gevent.sleep, not self.wait(): a stopping run lets the labeler submit what it claimed.
                gevent.sleep(self.wait_time())
            ranks = list(range(1, K + 1))
            random.shuffle(ranks)
            answer = {
                "ranks": {c["id"]: rank for c, rank in zip(assignment["completions"], ranks, strict=True)},
                "client_token": uuid.uuid4().hex,
                "active_seconds": round(random.uniform(5, 60), 1),  # noqa: S311 — made-up load, not secrets
            }
            with self.client.post(
                f"/api/assignments/{assignment['id']}/judgment",
                json=answer,
                headers=self.headers,
                name="submit",
                catch_response=True,
            ) as submitted:
                if submitted.status_code != 201:
                    submitted.failure(f"status {submitted.status_code}")
