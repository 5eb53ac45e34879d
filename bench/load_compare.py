"""Benchmark: bench/load.py on PostgreSQL from several checkouts back to back, with CPU per ranked task.

    .venv/bin/python bench/load_compare.py --checkout . --checkout ../rankwise-old \\
        [--rounds 2] -- --users 24 --seconds 60 --tasks 5000

Each checkout (e.g. a `git worktree` of an older commit beside this one, with
its own .venv link) runs its own bench/load.py, with the arguments after
`--`, against a database of its own. Rounds alternate the order (A B, then
B A), so that a change in the machine's load during the run does not favour
one side.

While locust runs, the CPU time (user + system) of three groups of processes
is sampled every quarter second: the server (gunicorn's master and workers),
the database (the PostgreSQL backends connected to that run's database) and
the client (locust). Divided by the ranked tasks (submits answered 201), that
is the CPU one claim → submit cycle costs, which unlike cycles/s does not
depend on how many cores the other users of the machine leave free. The
baseline reads of the project list (one iteration in five) are part of it,
in the same share on every side.

Prints load.py's own report for each run, then one table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

DATABASE_HOST = "postgres://postgres@127.0.0.1:5432"


def _cpu_seconds(process: Any) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def run_once(*, checkout: Path, database: str, load_args: list[str]) -> dict[str, Any]:
    """One bench/load.py run from `checkout`; its ranked tasks/s and CPU seconds per group."""
    import psutil
    import psycopg

    env = {**os.environ, "LOAD_DATABASE_URL": f"{DATABASE_HOST}/{database}"}
    python = checkout / ".venv" / "bin" / "python"
    process = subprocess.Popen(
        [str(python), "bench/load.py", *load_args],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []

    def echo() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            print(line, end="", flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    root = psutil.Process(process.pid)
    # (pid, start time) -> [group, CPU seconds when the window opened, CPU seconds last seen]
    seen: dict[tuple[int, float], list[Any]] = {}
    window: list[float] = []
    load_before = os.getloadavg()[0]
    with psycopg.connect(f"{DATABASE_HOST}/postgres", autocommit=True) as admin:
        while process.poll() is None:
            processes = []
            with contextlib.suppress(psutil.Error):
                processes = [("server", member) for member in [root, *root.children(recursive=True)]]
            backends = admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", [database])
            for (pid,) in backends.fetchall():
                with contextlib.suppress(psutil.Error):
                    processes.append(("database", psutil.Process(pid)))
            locust_running = False
            for group, member in processes:
                try:
                    key = (member.pid, member.create_time())
                    command = " ".join(member.cmdline())
                    cpu = _cpu_seconds(member)
                except psutil.Error:
                    continue
                if "locust" in command:
                    group, locust_running = "client", True
                elif group == "server" and "gunicorn" not in command:
                    continue  # load.py itself, which seeds before and checks after
                # A process first seen inside the window started inside it: all its CPU counts.
                entry = seen.setdefault(key, [group, cpu if not window else 0.0, cpu])
                entry[2] = cpu
            if not window and locust_running:
                window.append(time.monotonic())
                for entry in seen.values():
                    entry[1] = entry[2]
            elif len(window) == 1 and not locust_running:
                window.append(time.monotonic())
                break
            time.sleep(0.25)
    process.wait()
    reader.join(timeout=10)
    text = "".join(output)
    ranked = re.search(r"submit \{[^}]*'201': (\d+)", text)
    rate = re.search(r"ranked tasks/s: ([0-9.]+)", text)
    cpu: dict[str, float] = {"server": 0.0, "database": 0.0, "client": 0.0}
    for group, first, last in seen.values():
        cpu[group] += last - first
    return {
        "ranked": int(ranked.group(1)) if ranked else 0,
        "rate": float(rate.group(1)) if rate else 0.0,
        "cpu": cpu,
        "passed": "FAIL" not in text and process.returncode == 0,
        "load": (load_before, os.getloadavg()[0]),
        "window": window[1] - window[0] if len(window) == 2 else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", action="append", required=True, help="a checkout to run (repeat)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; each alternates the order")
    parser.add_argument("load_args", nargs="*", help="arguments for bench/load.py, after --")
    args = parser.parse_args()
    checkouts = [Path(path).resolve() for path in args.checkout]
    rows = []
    for round_number in range(args.rounds):
        order = checkouts if round_number % 2 == 0 else checkouts[::-1]
        for checkout in order:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=checkout,
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            print(f"\n=== {checkout.name} at {commit}, round {round_number + 1}", flush=True)
            database = f"rankwise_load_compare_{checkouts.index(checkout)}"
            result = run_once(checkout=checkout, database=database, load_args=args.load_args)
            rows.append((round_number + 1, checkout.name, commit, result))

    print()
    print("CPU per ranked task (claim + submit, and every fifth iteration a project list), ms")
    header = (
        f"{'round':>5} {'checkout':<16} {'commit':<9} {'tasks/s':>8} {'ranked':>7} {'server':>7} "
        f"{'database':>9} {'client':>7} {'total':>7}  {'load avg':>11}  invariants"
    )
    print(header)
    print("-" * len(header))
    for round_number, name, commit, result in rows:
        per = {group: 1000 * seconds / max(result["ranked"], 1) for group, seconds in result["cpu"].items()}
        print(
            f"{round_number:>5} {name[:16]:<16} {commit:<9} {result['rate']:>8.1f} {result['ranked']:>7} "
            f"{per['server']:>7.1f} {per['database']:>9.1f} {per['client']:>7.1f} {sum(per.values()):>7.1f}  "
            f"{result['load'][0]:>5.1f}→{result['load'][1]:<5.1f}  {'PASS' if result['passed'] else 'FAIL'}"
        )
    return 0 if all(result["passed"] for *_rest, result in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
