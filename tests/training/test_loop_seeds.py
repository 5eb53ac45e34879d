"""Seeds of the loop side by side: the worker's cores shared between its jobs, reports in seed order,
and one seed's failure stopping the others (the loops themselves are faked: their stages are tested in
test_simulate_loop.py)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from training.demo import loop as loop_module
from training.demo.loop import LoopFailed
from training.demo.stack import cpu_share_environment
from training.management.commands.simulate_loop import Command


def test_jobs_at_once_share_the_cores_and_one_job_keeps_them_all(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)

    assert cpu_share_environment(1) == {}
    assert cpu_share_environment(2) == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    assert cpu_share_environment(16) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_a_thread_count_the_person_chose_is_kept(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")

    assert cpu_share_environment(2) == {}


@dataclass
class FakeSettings:
    seed: int
    out_dir: Path


class FakeReport:
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}


def fake_loop(behaviour: dict[int, str], seen: dict[int, str]):
    class FakeLoop:
        def __init__(self, settings: FakeSettings, *, say: Any, stop: threading.Event) -> None:
            self.settings, self.say, self.stop = settings, say, stop

        def run(self) -> FakeReport:
            seed = self.settings.seed
            self.say("started")
            if behaviour[seed] == "fail":
                time.sleep(0.2)
                raise LoopFailed(f"seed {seed}: the reward run failed")
            if behaviour[seed] == "wait":
                # a long stage: it gives up at its next wait once another seed failed
                if self.stop.wait(30):
                    seen[seed] = "stopped"
                    raise LoopFailed("stopped while waiting for the dpo run: another seed's loop failed")
                seen[seed] = "ran on"
            if behaviour[seed] == "slow":
                time.sleep(0.3)
            return FakeReport(seed)

    return FakeLoop


def run_loops(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, behaviour: dict[int, str], seen: dict[int, str]
):
    monkeypatch.setattr(loop_module, "Loop", fake_loop(behaviour, seen))
    monkeypatch.setattr(loop_module, "report_write", lambda report, out_dir: None)
    command = Command()
    lines: list[str] = []
    command.stdout.write = lambda text, *args, **kwargs: lines.append(text)  # type: ignore[method-assign]
    runs = [FakeSettings(seed=seed, out_dir=tmp_path / f"seed-{seed}") for seed in behaviour]
    return command._loops(runs, at_once=len(runs)), lines


def test_seeds_side_by_side_report_in_seed_order_with_their_lines_marked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    # seed 0 ends last
    reports, lines = run_loops(monkeypatch, tmp_path, {0: "slow", 1: "fast"}, {})

    assert reports == [{"seed": 0}, {"seed": 1}]
    assert sorted(lines) == ["seed 0: started", "seed 1: started"]


def test_one_seed_failing_stops_the_other_and_its_own_error_is_the_one_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    seen: dict[int, str] = {}

    with pytest.raises(LoopFailed, match="seed 0: the reward run failed"):
        run_loops(monkeypatch, tmp_path, {0: "fail", 1: "wait"}, seen)

    # the other seed stopped at its wait rather than running its 30 s stage to the end
    assert seen == {1: "stopped"}
