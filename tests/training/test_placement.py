"""GPU placement: each job's process sees exactly the cards it holds, and no card is held twice.

No GPU is needed: cards are names in RANKWISE_GPUS, and a probe stands in for the trainer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.utils.nodenames import host_format
from django.core.exceptions import ValidationError

from annotation.roles import Role
from tests.factories import user_with_roles
from training.models import DatasetBuild, TrainingRun
from training.placement import DevicesUnavailable, devices_held, devices_parse, devices_try
from training.services import training_run_command, training_run_create

WAIT_S = 180

# --- the locks --------------------------------------------------------------------------------


def test_it_parses_indexes_and_uuids_and_refuses_a_repeated_or_malformed_device() -> None:
    assert devices_parse("0, 1") == ["0", "1"]
    assert devices_parse("GPU-8f2e-11aa,MIG-0c1d") == ["GPU-8f2e-11aa", "MIG-0c1d"]
    assert devices_parse("") == []
    with pytest.raises(ValueError, match="twice"):
        devices_parse("0,0")
    with pytest.raises(ValueError, match="not a GPU index"):
        devices_parse("0,cuda:1")


def test_a_card_held_by_one_job_is_never_given_to_another(tmp_path: Path) -> None:
    first = devices_try(count=1, owned=["0", "1"], lock_dir=tmp_path)
    second = devices_try(count=1, owned=["0", "1"], lock_dir=tmp_path)
    assert first is not None and second is not None
    assert (first.devices, second.devices) == (["0"], ["1"])
    assert devices_try(count=1, owned=["0", "1"], lock_dir=tmp_path) is None
    first.release()
    third = devices_try(count=1, owned=["0", "1"], lock_dir=tmp_path)
    assert third is not None and third.devices == ["0"]


def test_a_two_gpu_job_takes_both_cards_or_none(tmp_path: Path) -> None:
    # given card 1 is busy
    busy = devices_try(count=1, owned=["1"], lock_dir=tmp_path)
    assert busy is not None
    # then a 2-GPU job gets nothing, and holds nothing meanwhile
    assert devices_try(count=2, owned=["0", "1"], lock_dir=tmp_path) is None
    alone = devices_try(count=1, owned=["0"], lock_dir=tmp_path)
    assert alone is not None
    alone.release()
    busy.release()
    both = devices_try(count=2, owned=["0", "1"], lock_dir=tmp_path)
    assert both is not None and both.cuda_visible_devices == "0,1"


def test_a_job_waits_while_one_of_its_cards_is_busy_and_takes_both_once_it_is_free(tmp_path: Path) -> None:
    busy = devices_try(count=1, owned=["0", "1"], lock_dir=tmp_path)
    assert busy is not None
    checks = []

    def keep_waiting() -> bool:
        checks.append(True)
        busy.release()  # the other job ends while this one waits
        return True

    with devices_held(
        count=2, owned=["0", "1"], lock_dir=tmp_path, keep_waiting=keep_waiting, poll_s=0
    ) as lease:
        assert lease is not None and lease.devices == ["0", "1"]
    assert checks == [True]


def test_a_job_no_longer_wanted_stops_waiting(tmp_path: Path) -> None:
    busy = devices_try(count=1, owned=["0"], lock_dir=tmp_path)
    with devices_held(count=1, owned=["0"], lock_dir=tmp_path, keep_waiting=lambda: False) as lease:
        assert lease is None
    assert busy is not None


def test_more_gpus_than_the_worker_owns_is_refused_and_a_worker_without_gpus_hides_every_card(
    tmp_path: Path,
) -> None:
    with (
        pytest.raises(DevicesUnavailable, match="asks for 3 GPUs but this worker owns 2"),
        devices_held(count=3, owned=["0", "1"], lock_dir=tmp_path, keep_waiting=lambda: True),
    ):
        pass
    with devices_held(count=2, owned=[], lock_dir=tmp_path, keep_waiting=lambda: True) as lease:
        assert lease is not None and lease.cuda_visible_devices == ""


def test_a_card_stays_taken_while_the_launcher_that_inherited_its_lock_lives(tmp_path: Path) -> None:
    # given a job's launcher holds the card's lock, and the worker's side let it go (the worker died)
    lease = devices_try(count=1, owned=["0"], lock_dir=tmp_path)
    assert lease is not None
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, pass_fds=lease.lock_fds
    )
    lease.release()
    try:
        # then nobody else gets the card until the launcher is gone
        assert devices_try(count=1, owned=["0"], lock_dir=tmp_path) is None
    finally:
        launcher.communicate(b"")
    assert devices_try(count=1, owned=["0"], lock_dir=tmp_path) is not None


# --- runs ask for GPUs --------------------------------------------------------------------------


@pytest.fixture
def build(db: None) -> DatasetBuild:
    return DatasetBuild.objects.create(
        name="b", created_by=user_with_roles(Role.MANAGER, username="mgr"), status="succeeded"
    )


def test_a_run_asking_for_more_gpus_than_any_worker_owns_is_refused_clearly(
    build: DatasetBuild, settings: pytest.FixtureRequest
) -> None:
    settings.TRAINING_MAX_GPUS = 2
    with pytest.raises(ValidationError) as refused:
        training_run_create(dataset_build=build, kind="reward", base_model="m", created_by=None, gpus=4)
    assert "at most 2" in refused.value.message_dict["gpus"][0]
    assert not TrainingRun.objects.exists()


@pytest.mark.parametrize("distributed", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_a_multi_gpu_run_launches_with_its_strategys_shipped_configuration(distributed: str) -> None:
    run = TrainingRun(gpus=2, distributed=distributed)
    command = training_run_command(run=run, spec_path=Path("spec.json"))
    config = Path(command[command.index("--config_file") + 1])
    assert config.name == f"{distributed}.yaml" and config.is_file()
    assert command[command.index("--num_processes") + 1] == "2"
    one = training_run_command(run=TrainingRun(gpus=1, distributed=distributed), spec_path=Path("spec.json"))
    assert "--config_file" not in one


@pytest.mark.django_db(transaction=True)
def test_a_run_asking_for_more_gpus_than_its_worker_owns_fails_saying_so(
    build: DatasetBuild, settings: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from training.services import training_run_execute

    settings.WORKER_GPUS = ["2"]
    settings.GPU_LOCK_DIR = tmp_path
    run = TrainingRun.objects.create(name="r", kind="reward", dataset_build=build, base_model="m", gpus=2)
    training_run_execute(run_id=run.pk)
    run.refresh_from_db()
    assert (run.status, run.attempts) == (TrainingRun.Status.FAILED, 0)
    assert "asks for 2 GPUs but its worker owns 1 (RANKWISE_GPUS=2)" in run.error


def test_deepspeed_is_only_in_the_optional_gpu_requirements() -> None:
    root = Path(__file__).resolve().parents[2]
    assert "deepspeed" not in (root / "requirements.txt").read_text().lower()
    assert any(
        line.startswith("deepspeed==") for line in (root / "requirements-gpu.txt").read_text().splitlines()
    )


# --- two GPU workers on one host ----------------------------------------------------------------


@pytest.fixture
def placement(tmp_path: Path) -> Path:
    (tmp_path / "release").mkdir()
    return tmp_path


@pytest.fixture
def gpu_workers(placement: Path, django_db_setup: None) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Two GPU workers on this host, each owning two cards and taking two jobs at a time:
    `gpu-0-1` owns cards 0 and 1, `gpu-2-3` cards 2 and 3.

    Both take the queue `placement`; each also has a queue of its own (`placement-<name>`).
    """
    from django.db import connection

    from tests.conftest import REPO_ROOT, _wait_for_worker, worker_database_url

    env = {
        **os.environ,
        "DATABASE_URL": worker_database_url(connection.settings_dict),
        "GPU_LOCK_DIR": str(placement / "locks"),
        "PLACEMENT_RECORD": str(placement / "record"),
        "PLACEMENT_RELEASE_DIR": str(placement / "release"),
    }
    workers = {}
    for name, devices, concurrency in (("gpu-0-1", "0,1", 2), ("gpu-2-3", "2,3", 2)):
        command = [sys.executable, "-m", "celery", "-A", "tests.training.placement_worker", "worker"]
        command += ["-Q", f"placement,placement-{name}", "--concurrency", str(concurrency)]
        command += ["--prefetch-multiplier", "1", "-n", f"{name}@%h", "--loglevel", "INFO"]
        with (placement / f"{name}.log").open("wb") as log:
            workers[name] = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env={**env, "RANKWISE_GPUS": devices},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    try:
        for name, worker in workers.items():
            _wait_for_worker(worker, host_format(f"{name}@%h"), placement / f"{name}.log")
        yield workers
    finally:
        for worker in workers.values():
            worker.terminate()
        for worker in workers.values():
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def records(placement: Path) -> list[tuple[str, int, list[str]]]:
    path = placement / "record"
    lines = path.read_text().splitlines() if path.exists() else []
    return [
        (event, int(run), devices.split(",")) for event, run, devices in (line.split(" ") for line in lines)
    ]


def wait_until(condition, what: str, placement: Path):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    rows = list(TrainingRun.objects.values_list("pk", "status", "attempts", "error"))
    logs = "\n".join(
        f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        for log in [*placement.glob("*.log"), *placement.glob("runs/*/*.log")]
    )
    raise AssertionError(f"never happened: {what}\nruns: {rows}\n{logs}")


def started(placement: Path, run: TrainingRun) -> list[str] | None:
    return next(
        (devices for event, run_id, devices in records(placement) if event == "start" and run_id == run.pk),
        None,
    )


def release(placement: Path, run: TrainingRun) -> None:
    (placement / "release" / str(run.pk)).touch()


def probe_run(build: DatasetBuild, placement: Path, gpus: int) -> TrainingRun:
    run = TrainingRun.objects.create(
        name="probe", kind="reward", dataset_build=build, base_model="m", trainer="trl", gpus=gpus
    )
    TrainingRun.objects.filter(pk=run.pk).update(output_dir=str(placement / "runs" / str(run.pk)))
    run.refresh_from_db()
    return run


def publish(run: TrainingRun, queue: str) -> None:
    from training.tasks import training_run_execute

    training_run_execute.apply_async((run.pk,), queue=queue)


@pytest.mark.django_db(transaction=True)
def test_a_two_gpu_run_waits_while_one_of_its_workers_cards_is_busy_then_gets_both(
    gpu_workers, build, placement
) -> None:
    # given a 1-GPU run holding one of gpu-0-1's cards
    first = probe_run(build, placement, gpus=1)
    publish(first, "placement-gpu-0-1")
    (card,) = wait_until(lambda: started(placement, first), "the 1-GPU run started", placement)
    assert card in ("0", "1")

    # when a 2-GPU run comes to the same worker (which has a free slot)
    second = probe_run(build, placement, gpus=2)
    publish(second, "placement-gpu-0-1")

    # then it waits, still queued, without starting
    wait_until(
        lambda: f"run {second.pk} waits for 2 free GPUs" in (placement / "gpu-0-1.log").read_text(),
        "the 2-GPU run waits for its cards",
        placement,
    )
    second.refresh_from_db()
    assert (second.status, second.attempts) == (TrainingRun.Status.QUEUED, 0)
    assert started(placement, second) is None

    # and once the first run ends, it runs on both cards
    release(placement, first)
    both = wait_until(lambda: started(placement, second), "the 2-GPU run started", placement)
    assert sorted(both) == ["0", "1"]
    release(placement, second)
    for run in (first, second):
        wait_until(
            lambda run=run: TrainingRun.objects.get(pk=run.pk).status == "succeeded",
            "the runs finished",
            placement,
        )


@pytest.mark.django_db(transaction=True)
def test_two_gpu_workers_on_one_host_never_give_a_card_to_two_jobs_at_once(
    gpu_workers, build, placement
) -> None:
    # given 1-GPU and 2-GPU runs on the queue both workers take
    runs = [probe_run(build, placement, gpus=gpus) for gpus in (1, 2, 1, 1, 2, 1, 1)]
    for run in runs:
        publish(run, "placement")

    # when each run ends once it has started
    released: set[int] = set()

    def all_released() -> bool:
        for event, run_id, _ in records(placement):
            if event == "start" and run_id not in released:
                (placement / "release" / str(run_id)).touch()
                released.add(run_id)
        return len(released) == len(runs)

    wait_until(all_released, "every run started", placement)
    for run in runs:
        wait_until(
            lambda run=run: TrainingRun.objects.get(pk=run.pk).status == "succeeded",
            "the runs finished",
            placement,
        )

    # then no card was ever held by two runs at once, each run got the cards it asked for,
    # all from one worker's set, and 2-GPU runs got both cards of one worker
    holder: dict[str, int] = {}
    for event, run_id, devices in records(placement):
        for device in devices:
            if event == "start":
                assert device not in holder, (
                    f"card {device} given to run {run_id} while run {holder[device]} held it"
                )
                holder[device] = run_id
            else:
                assert holder.pop(device) == run_id
    asked = {run.pk: run.gpus for run in runs}
    got = {run_id: devices for event, run_id, devices in records(placement) if event == "start"}
    assert {run_id: len(devices) for run_id, devices in got.items()} == asked
    assert all(set(devices) <= {"0", "1"} or set(devices) <= {"2", "3"} for devices in got.values())
    assert all(sorted(got[run.pk]) in (["0", "1"], ["2", "3"]) for run in runs if run.gpus == 2)


def test_the_readmes_gpu_workers_own_disjoint_cards_under_names_unique_per_device_set() -> None:
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    workers = re.findall(
        r"RANKWISE_GPUS=(\S+) \.venv/bin/celery -A config worker -Q gpu --concurrency (\d+) -n (\S+)", readme
    )
    assert len(workers) >= 2
    cards = [devices_parse(devices) for devices, _, _ in workers]
    assert len({card for owned in cards for card in owned}) == sum(len(owned) for owned in cards)
    assert len({name for _, _, name in workers}) == len(workers)
    assert all(
        int(concurrency) <= len(owned) for (_, concurrency, _), owned in zip(workers, cards, strict=True)
    )
