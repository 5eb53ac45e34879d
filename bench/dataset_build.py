"""Benchmark: dataset builds over 100,000 judgments with K = 4 (600,000 comparisons).

    .venv/bin/python bench/dataset_build.py [--judgments 100000] [--keep]

1. Creates a PostgreSQL database of its own (DATABASE_URL, by default
   postgres://postgres@127.0.0.1:5432/rankwise_bench), migrates it and fills
   it with bulk_create: 25,000 prompts, each a task of 4 completions judged
   by 4 of 20 labelers (about 5% ties), and the 6 comparisons of every
   judgment made by the product's own `comparisons_from_judgment`.
2. Measures, each in a fresh process so ru_maxrss is that step's alone:
   - naive: the obvious exporter, `list(queryset.values(...))` of every
     comparison with its texts, then `json.dumps` of every row into a list
     written to a file: memory grows with the data;
   - every_vote and majority: full builds through `dataset_build_run`
     (JSONL, Parquet, grouped, SFT, hf/, card), which stream from the
     database and hold one group at a time.
   Each step runs twice: once plain (wall time, rows/s, peak RSS) and once
   under tracemalloc (peak of Python allocations; pyarrow's own buffers are
   not traced). The two builds of each kind must have the same content hash.
3. Prints the table and drops the database (unless --keep).

With `--before DIR` (a checkout of earlier code, e.g. a git worktree, with
the same migrations), the two builds are also measured with that code's
`dataset_build_run`, in the same run over the same database, as
"every_vote (before)" and "majority (before)"; their content hashes must
equal this code's.

On a shared machine wall time depends on the other load; the table also
gives each step's CPU time, its own and its database server process's (read
from /proc: local servers only), and rows per CPU second against the naive
export's.

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/rankwise_bench"
K = 4
OVERLAP = 4
LABELERS = 20
TIE_SHARE = 0.05
BATCH_PROMPTS = 1000
STEPS = ("naive", "every_vote", "majority")


def setup_django(database_url: str, artifacts: str, *, code: Path = REPO_ROOT) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ["ARTIFACTS_DIR"] = artifacts
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.path.insert(0, str(code))
    import django

    django.setup()


# --- the database ----------------------------------------------------------------


def database_recreate(database_url: str, *, drop_only: bool = False) -> None:
    import psycopg

    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not drop_only:
            connection.execute(f'CREATE DATABASE "{name}"')


def _vocabulary(size: int = 3000) -> list[str]:
    rng = random.Random(7)  # noqa: S311 — made-up test data, not secrets
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choices(alphabet, k=rng.randint(3, 9))) for _ in range(size)]


WORDS = _vocabulary()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high))).capitalize() + "."


def populate(judgments: int) -> dict[str, int]:
    """Fill the database with `judgments` judgments (K=4, 4 labelers per task) in batches."""
    from datetime import timedelta

    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from annotation.models import (
        Assignment,
        Comparison,
        Completion,
        Judgment,
        Membership,
        Policy,
        Project,
        Prompt,
        Task,
        TaskCompletion,
    )
    from annotation.roles import Role
    from annotation.services import comparisons_from_judgment

    rng = random.Random(20260101)  # noqa: S311 — made-up test data, not secrets
    User = get_user_model()
    manager = User.objects.create_user(username="bench-manager", password=None)
    people = User.objects.bulk_create(User(username=f"bench-labeler-{i}") for i in range(LABELERS))
    project = Project.objects.create(name="bench", k=K, overlap=OVERLAP)
    Membership.objects.create(project=project, user=manager, role=Role.MANAGER)
    Membership.objects.bulk_create(Membership(project=project, user=p, role=Role.LABELER) for p in people)
    policies = [Policy.objects.create(name=f"bench-policy-{i}", kind=Policy.Kind.IMPORTED) for i in range(K)]
    prompts_total = judgments // OVERLAP
    now = timezone.now()
    made = {"prompts": 0, "judgments": 0, "comparisons": 0}
    previous_texts: list[str] = []
    for start in range(0, prompts_total, BATCH_PROMPTS):
        count = min(BATCH_PROMPTS, prompts_total - start)
        texts = []
        for number in range(start, start + count):
            # About 1% of prompts repeat an earlier one with a word changed: near-duplicates to group.
            if previous_texts and rng.random() < 0.01:
                words = rng.choice(previous_texts).split()
                words[rng.randrange(len(words))] = rng.choice(WORDS)
                texts.append(" ".join(words))
            else:
                texts.append(f"Question {number}: {sentence(rng, 8, 20)}")
        previous_texts = texts[-50:]
        prompts = Prompt.objects.bulk_create(
            Prompt(project=project, text=text, external_id=f"b{start + i}", content_hash=f"bench-{start + i}")
            for i, text in enumerate(texts)
        )
        completions = Completion.objects.bulk_create(
            Completion(prompt=prompt, policy=policy, text=sentence(rng, 15, 50))
            for prompt in prompts
            for policy in policies
        )
        tasks = Task.objects.bulk_create(
            Task(project=project, prompt=prompt, judgment_count=OVERLAP) for prompt in prompts
        )
        items = TaskCompletion.objects.bulk_create(
            TaskCompletion(task=task, completion=completions[i * K + position], position=position)
            for i, task in enumerate(tasks)
            for position in range(K)
        )
        assignments: list[Assignment] = []
        answers: list[tuple[int, list[int]]] = []  # (task index in the batch, ranks by position)
        for i, task in enumerate(tasks):
            quality = [rng.gauss(0, 1) for _ in range(K)]  # a latent order people mostly agree on
            for slot in range(OVERLAP):
                person = people[((start + i) * OVERLAP + slot) % LABELERS]
                noisy = [q + rng.gauss(0, 0.8) for q in quality]
                order = sorted(range(K), key=lambda p: -noisy[p])
                ranks = [0] * K
                for rank, position in enumerate(order, start=1):
                    ranks[position] = rank
                if rng.random() < TIE_SHARE:
                    ranks[order[1]] = ranks[order[0]]
                assignments.append(
                    Assignment(
                        task=task,
                        project_id=task.project_id,
                        user=person,
                        slot=slot,
                        permutation=list(range(K)),
                        status=Assignment.Status.SUBMITTED,
                        leased_at=now,
                        lease_expires_at=now + timedelta(minutes=30),
                        finished_at=now,
                    )
                )
                answers.append((i, ranks))
        Assignment.objects.bulk_create(assignments)
        judgment_rows = Judgment.objects.bulk_create(
            Judgment(
                assignment=assignment,
                task=tasks[index],
                user_id=assignment.user_id,
                ranks={str(completions[index * K + p].uid): ranks[p] for p in range(K)},
                client_token=f"bench-{assignment.pk}",
            )
            for assignment, (index, ranks) in zip(assignments, answers, strict=True)
        )
        items_by_task: dict[int, list[TaskCompletion]] = {}
        for item in items:
            items_by_task.setdefault(item.task_id, []).append(item)
        comparisons = [
            comparison
            for judgment in judgment_rows
            for comparison in comparisons_from_judgment(
                judgment=judgment, items=items_by_task[judgment.task_id], likert_margins=False
            )
        ]
        Comparison.objects.bulk_create(comparisons, batch_size=5000)
        made["prompts"] += len(prompts)
        made["judgments"] += len(judgment_rows)
        made["comparisons"] += len(comparisons)
        print(f"  … {made['judgments']:,} judgments, {made['comparisons']:,} comparisons", flush=True)
    return made


# --- one measured step (in its own process) ----------------------------------------------


def current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def anonymous_rss_mib() -> float:
    """Resident memory that is not a file mapping (heap, arrays): what really grows with data.

    ru_maxrss also counts pages of memory-mapped files, e.g. the Arrow files
    datasets reads while saving hf/, which the kernel can drop at will.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


class AnonymousPeak:
    """Samples the anonymous RSS every 10 ms in a thread and keeps the largest value."""

    def __init__(self) -> None:
        self.peak = anonymous_rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, anonymous_rss_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, anonymous_rss_mib())


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def database_cpu_seconds(pid: int) -> float | None:
    """CPU time of the database server process serving this connection (local servers only)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(step: str, build_id: int | None, trace: bool, out_dir: str) -> dict[str, Any]:
    import datasets  # noqa: F401 — loaded before the baseline, as a worker has it
    from django.db import connection

    import training.builds  # noqa: F401
    from annotation.models import Comparison
    from training.models import DatasetBuild
    from training.services import dataset_build_run

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    database_start = database_cpu_seconds(backend)
    cpu_start = cpu_seconds()
    rss_start = current_rss_mib()
    anonymous_start = anonymous_rss_mib()
    anonymous = AnonymousPeak()
    if trace:
        tracemalloc.start()
    began = time.perf_counter()
    if step == "naive":
        rows = list(
            Comparison.objects.order_by("id").values(
                "id", "prompt__text", "chosen__text", "rejected__text", "is_tie", "margin"
            )
        )
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        Path(out_dir, "naive.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        result = {"rows_read": len(rows), "rows_written": len(lines), "content_hash": ""}
    else:
        build = dataset_build_run(build_id=build_id)
        assert build is not None and build.status == DatasetBuild.Status.SUCCEEDED, build and build.error
        written = sum(sum(splits.values()) for splits in build.counts.values())
        result = {
            "rows_read": build.summary["comparisons"]["read"],
            "rows_written": written,
            "content_hash": build.content_hash,
        }
    wall = time.perf_counter() - began
    cpu = cpu_seconds() - cpu_start
    database_end = database_cpu_seconds(backend)
    anonymous_peak = anonymous.stop()
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
    return {
        **result,
        "wall_s": wall,
        "cpu_s": cpu,
        "database_cpu_s": (
            database_end - database_start if database_start is not None and database_end is not None else None
        ),
        "rss_start_mib": rss_start,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "anonymous_growth_mib": anonymous_peak - anonymous_start,
        "tracemalloc_peak_mib": traced_peak,
    }


def run_child(
    step: str, build_id: int | None, trace: bool, out_dir: str, *, code: Path = REPO_ROOT
) -> dict[str, Any]:
    """One step in a child process (this script) running the product code of the checkout `code`."""
    command = [sys.executable, __file__, "--measure", step, "--out", out_dir, "--code", str(code)]
    if build_id is not None:
        command += ["--build-id", str(build_id)]
    if trace:
        command.append("--trace")
    completed = subprocess.run(
        command, capture_output=True, text=True, env=os.environ.copy(), check=False, cwd=code
    )
    if completed.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{completed.stdout}\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def new_build(aggregation: str) -> int:
    from django.contrib.auth import get_user_model

    from annotation.models import Project
    from training.models import DatasetBuild

    build = DatasetBuild.objects.create(
        name=f"bench {aggregation}",
        created_by=get_user_model().objects.get(username="bench-manager"),
        aggregation=aggregation,
        margin=DatasetBuild.Margin.RANK_GAP,
        test_fraction=0.1,
    )
    build.projects.set(Project.objects.filter(name="bench"))
    return build.pk


def print_table(results: dict[str, dict[str, Any]], steps: list[str]) -> None:
    naive_rss = results["naive"]["plain"]["max_rss_mib"] - results["naive"]["plain"]["rss_start_mib"]
    naive_traced = results["naive"]["traced"]["tracemalloc_peak_mib"]
    naive_anonymous = results["naive"]["plain"]["anonymous_growth_mib"]
    header = (
        "approach",
        "rows read",
        "rows written",
        "wall s",
        "rows/s",
        "rows/s vs naive",
        "CPU s (bench + database)",
        "rows per CPU s vs naive",
        "ru_maxrss MiB",
        "RSS growth MiB",
        "anon RSS growth MiB",
        "tracemalloc peak MiB",
        "RSS growth vs naive",
        "anon growth vs naive",
        "tracemalloc vs naive",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|")
    naive_speed = results["naive"]["plain"]["rows_read"] / results["naive"]["plain"]["wall_s"]

    def cpu_of(plain: dict[str, Any]) -> tuple[float, float]:
        return plain["cpu_s"], plain.get("database_cpu_s") or 0.0

    naive_cpu = sum(cpu_of(results["naive"]["plain"]))
    for step in steps:
        plain, traced = results[step]["plain"], results[step]["traced"]
        speed = plain["rows_read"] / plain["wall_s"]
        growth = plain["max_rss_mib"] - plain["rss_start_mib"]
        cells = (
            step,
            f"{plain['rows_read']:,}",
            f"{plain['rows_written']:,}",
            f"{plain['wall_s']:.1f}",
            f"{speed:,.0f}",
            f"{speed / naive_speed:.2f}×",
            "{:.1f} + {:.1f}".format(*cpu_of(plain)),
            f"{naive_cpu / sum(cpu_of(plain)):.2f}×",
            f"{plain['max_rss_mib']:,.0f}",
            f"{growth:,.0f}",
            f"{plain['anonymous_growth_mib']:,.0f}",
            f"{traced['tracemalloc_peak_mib']:,.1f}",
            f"{growth / naive_rss:.2f}×",
            f"{plain['anonymous_growth_mib'] / naive_anonymous:.2f}×",
            f"{traced['tracemalloc_peak_mib'] / naive_traced:.3f}×",
        )
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judgments", type=int, default=100_000)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument(
        "--before", type=Path, help="a checkout of earlier code: measure its builds too, in the same run"
    )
    parser.add_argument("--measure", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--build-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--code", type=Path, default=REPO_ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # a child: one step, one JSON line
        setup_django(os.environ["DATABASE_URL"], os.environ["ARTIFACTS_DIR"], code=args.code)
        print(json.dumps(measure(args.measure, args.build_id, args.trace, args.out)))
        return

    with tempfile.TemporaryDirectory(prefix="rankwise-bench-") as scratch:
        print(f"database {args.database_url}; files under {scratch}", flush=True)
        database_recreate(args.database_url)
        try:
            setup_django(args.database_url, scratch)
            from django.core.management import call_command

            call_command("migrate", verbosity=0)
            began = time.perf_counter()
            made = populate(args.judgments)
            print(
                f"made {made['prompts']:,} prompts, {made['judgments']:,} judgments, "
                f"{made['comparisons']:,} comparisons in {time.perf_counter() - began:.0f} s",
                flush=True,
            )
            print(
                f"load average (1, 5, 15 min) before measuring: {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
            )
            from django.db import connections

            connections.close_all()
            results: dict[str, dict[str, Any]] = {}
            # (label, step, code): the earlier code's build just before this code's, back to back.
            plan = [("naive", "naive", REPO_ROOT)]
            for step in STEPS[1:]:
                if args.before is not None:
                    plan.append((f"{step} (before)", step, args.before.resolve()))
                plan.append((step, step, REPO_ROOT))
            for label, step, code in plan:
                results[label] = {}
                for mode in ("plain", "traced"):
                    build_id = None if step == "naive" else new_build(step)
                    print(f"measuring {label} ({mode}) …", flush=True)
                    results[label][mode] = run_child(step, build_id, mode == "traced", scratch, code=code)
                if step != "naive":
                    hashes = {results[label][mode]["content_hash"] for mode in ("plain", "traced")}
                    assert len(hashes) == 1, f"{label}: two builds of the same data differ: {hashes}"
                    print(f"  {label}: both builds have content hash {hashes.pop()[:16]}…", flush=True)
            if args.before is not None:
                for step in STEPS[1:]:
                    before, after = (
                        results[label]["plain"]["content_hash"] for label in (f"{step} (before)", step)
                    )
                    assert before == after, f"{step}: the earlier code's build differs: {before} != {after}"
            print()
            print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
            print_table(results, [label for label, _step, _code in plan])
        finally:
            from django.db import connections

            connections.close_all()
            if not args.keep:
                database_recreate(args.database_url, drop_only=True)


if __name__ == "__main__":
    main()
