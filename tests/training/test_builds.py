"""Dataset builds: what the files hold, option by option, and that the same inputs give the same bytes."""

from __future__ import annotations

import gc
import hashlib
import json
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from django.contrib.auth.models import AbstractUser
from django.utils import timezone
from pytest_django import Settings

from annotation.models import Completion, Policy, Project, Prompt, Task, TaskCompletion
from annotation.roles import Role
from tests.factories import user_with_roles
from tests.training.test_builds_support import (
    all_rows,
    build_folder,
    judge,
    project_with_prompts,
    read_rows,
    run_build,
    tasks_of,
)
from training.builds import prompt_normalise
from training.models import DatasetBuild
from training.selectors import datasets_root
from training.services import dataset_build_run

pytestmark = pytest.mark.django_db

# Prompts no two of which are near-duplicates.
DISTINCT_PROMPTS = [
    "Explain photosynthesis to a ten year old.",
    "Write a haiku about autumn rain.",
    "How do I reverse a linked list in Python?",
    "What caused the fall of the Roman Empire?",
    "Suggest a vegetarian dinner for four people.",
    "Translate good morning into Spanish and French.",
    "Why is the sky blue?",
    "Summarise the plot of Hamlet in three sentences.",
    "Give me tips for a job interview.",
    "What is the difference between TCP and UDP?",
    "Compose a limerick about a cat.",
    "How many moons does Jupiter have?",
]


@pytest.fixture(autouse=True)
def artifacts(settings: Settings, tmp_path: Path) -> Path:
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


def labelers(*names: str) -> list[AbstractUser]:
    return [user_with_roles(Role.LABELER, username=name) for name in names]


def prompt_of(row: dict[str, Any]) -> str:
    prompt = row["prompt"]
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


# --- TRL reads the files as they are -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("trainer", "format", "source"),
    [
        ("reward", "standard", "jsonl"),
        ("reward", "conversational", "hf"),
        ("dpo", "standard", "hf"),
        ("dpo", "conversational", "jsonl"),
    ],
)
def test_trl_trains_two_steps_on_the_files_as_written(
    manager: AbstractUser, tiny_model_dir: Path, tmp_path: Path, trainer: str, format: str, source: str
) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    # given a built dataset with a margin column, in the format under test
    project = project_with_prompts(DISTINCT_PROMPTS[:6], k=3)
    (alice,) = labelers("alice")
    for task in tasks_of(project):
        judge(task, alice, [1, 2, 3])
    build = run_build(
        created_by=manager, projects=[project], margin="rank_gap", format=format, test_fraction=0.0
    )
    assert build.status == DatasetBuild.Status.SUCCEEDED, build.error
    folder = build_folder(build)

    # when TRL loads them unmodified, from the JSON Lines or from save_to_disk
    if source == "jsonl":
        train = datasets.load_dataset(
            "json",
            data_files={"train": str(folder / "pairs" / "train.jsonl")},
            split="train",
            cache_dir=str(tmp_path / "hf-cache"),
        )
    else:
        train = datasets.load_from_disk(str(folder / "hf"))["train"]
    assert len(train) == 18
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    common = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": True,
        "disable_tqdm": True,
    }
    if trainer == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
        run = RewardTrainer(
            model=model, args=RewardConfig(**common), train_dataset=train, processing_class=tokenizer
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        run = DPOTrainer(
            model=model, args=DPOConfig(**common), train_dataset=train, processing_class=tokenizer
        )
    output = run.train()

    # then two steps ran with a finite loss
    assert run.state.global_step == 2
    losses = [entry["loss"] for entry in run.state.log_history if "loss" in entry]
    assert losses and all(loss == loss and abs(loss) != float("inf") for loss in losses)
    assert output.training_loss == output.training_loss


def test_the_parquet_files_hold_the_same_rows_as_the_json_lines(manager: AbstractUser) -> None:
    project = project_with_prompts(DISTINCT_PROMPTS[:4], k=3)
    (alice,) = labelers("alice")
    for task in tasks_of(project):
        judge(task, alice, [2, 1, 3])

    build = run_build(created_by=manager, projects=[project], margin="rank_gap", format="conversational")

    for output in ("pairs", "grouped", "sft"):
        for split in ("train", "test"):
            parquet = pq.read_table(build_folder(build) / output / f"{split}.parquet").to_pylist()
            assert parquet == read_rows(build, output, split)


# --- identical texts -------------------------------------------------------------------


def project_with_a_repeated_text(texts: list[str], *, name: str = "repeats") -> Project:
    """A project whose one task shows `texts` in this order, repeats included.

    Written row by row, as older data may hold it: task creation no longer
    makes such a task.
    """
    project = Project.objects.create(name=name, k=len(texts))
    prompt = Prompt.objects.create(
        project=project, text="Capital of France?", content_hash=f"{name}-0", metadata={"reference": "Paris."}
    )
    task = Task.objects.create(project=project, prompt=prompt)
    for position, text in enumerate(texts):
        policy, _ = Policy.objects.get_or_create(name=f"policy-{'abcdefgh'[position]}")
        completion = Completion.objects.create(prompt=prompt, policy=policy, text=text)
        TaskCompletion.objects.create(task=task, completion=completion, position=position)
    return project


def text_of(value: Any) -> str:
    return value if isinstance(value, str) else value[-1]["content"]


def rows_everywhere(build: DatasetBuild, output: str) -> list[dict[str, Any]]:
    """The output's rows from the JSON Lines, then from Parquet, then (for pairs) from hf/."""
    import datasets

    folder = build_folder(build)
    rows = all_rows(build, output)
    for split in ("train", "test"):
        rows += pq.read_table(folder / output / f"{split}.parquet").to_pylist()
    if output == "pairs":
        saved = datasets.load_from_disk(str(folder / "hf"))
        rows += [row for split in ("train", "test") for row in saved[split]]
    return rows


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"ties": "keep", "margin": "rank_gap"},
        {"aggregation": "majority", "ties": "keep", "format": "conversational"},
        {"aggregation": "majority", "agreement_threshold": 0.5, "margin": "rank_gap"},
    ],
)
def test_a_text_shown_twice_in_a_task_is_never_paired_with_itself(
    manager: AbstractUser, options: dict[str, Any]
) -> None:
    # given a task showing "Paris." twice, ranked 1 and 2, and "Lyon." ranked 3
    project = project_with_a_repeated_text([" Paris.", "Paris.\n", "Lyon."])
    (alice,) = labelers("alice")
    (task,) = tasks_of(project)
    judge(task, alice, [1, 2, 3])

    # when it is built
    build = run_build(created_by=manager, projects=[project], test_fraction=0.0, **options)
    assert build.status == DatasetBuild.Status.SUCCEEDED, build.error

    # then every pair output holds the one real preference, and no text faces itself
    pair_outputs = ["pairs", "pairs_with_ties"] if options.get("ties") == "keep" else ["pairs"]
    for output in pair_outputs:
        rows = rows_everywhere(build, output)
        assert rows, output
        assert {(text_of(row["chosen"]).strip(), text_of(row["rejected"]).strip()) for row in rows} == {
            ("Paris.", "Lyon.")
        }
        assert not any(row.get("tie") for row in rows)
    assert build.counts["pairs"]["train"] == 1
    # the grouped row shows the text once: the first copy in task order, with its rank
    grouped = rows_everywhere(build, "grouped")
    assert [([text_of(c) for c in row["completions"]], row["ranks"]) for row in grouped] == [
        ([" Paris.", "Lyon."], [1, 3])
    ] * 2
    # the reference is never paired with its own text either
    assert [text_of(row["rejected"]) for row in all_rows(build, "reference")] == ["Lyon."]
    # and the card says what was merged
    card = (build_folder(build) / "README.md").read_text()
    assert "| tasks showing a text twice or more | 1 |" in card
    assert "| comparisons left out: a repeated text | 2 |" in card
    assert "| judged completions left out: a repeated text | 1 |" in card


def test_the_first_copy_in_task_order_speaks_for_a_repeated_text(manager: AbstractUser) -> None:
    # given a judge who ranked the second copy of "Paris." best and the first worst
    project = project_with_a_repeated_text(["Paris.", "Lyon.", "Paris."])
    alice, bob = labelers("alice", "bob")
    (task,) = tasks_of(project)
    judge(task, alice, [3, 2, 1])
    judge(task, bob, [1, 2, 3])

    build = run_build(created_by=manager, projects=[project], test_fraction=0.0, ties="keep")

    # then each judgment counts once, through the first copy: Lyon over Paris, then Paris over Lyon
    rows = all_rows(build, "pairs_with_ties")
    assert [(row["chosen"], row["rejected"], row["tie"]) for row in rows] == [
        ("Lyon.", "Paris.", False),
        ("Paris.", "Lyon.", False),
    ]
    assert [row["completion"] for row in all_rows(build, "sft")] == ["Lyon.", "Paris."]


# --- reproducibility -------------------------------------------------------------------


def test_building_twice_gives_the_same_hash_and_identical_bytes(manager: AbstractUser) -> None:
    # given judgments with ties, margins and disagreement
    project = project_with_prompts(DISTINCT_PROMPTS, k=4, likert_enabled=True)
    alice, bob = labelers("alice", "bob")
    for task in tasks_of(project):
        judge(task, alice, [1, 2, 3, 4], likert=[7, 5, 3, 1])
        judge(task, bob, [2, 1, 2, 3], likert=[5, 6, 5, 2])
    options = {"aggregation": "majority", "ties": "keep", "margin": "likert_gap", "test_fraction": 0.3}

    # when the same options are built twice
    first = run_build(created_by=manager, projects=[project], name="first", **options)
    second = run_build(created_by=manager, projects=[project], name="second", **options)

    # then the hashes and every file (JSONL, Parquet, hf/, the card) are the same
    assert first.status == second.status == DatasetBuild.Status.SUCCEEDED
    assert first.content_hash == second.content_hash and len(first.content_hash) == 64
    files = sorted(p.relative_to(build_folder(first)) for p in build_folder(first).rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(build_folder(second)) for p in build_folder(second).rglob("*") if p.is_file()
    )
    assert Path("hf/train/data-00000-of-00001.arrow") in files
    for relative in files:
        assert (build_folder(first) / relative).read_bytes() == (build_folder(second) / relative).read_bytes()
    card = (build_folder(first) / "README.md").read_text()
    assert str(timezone.now().year) not in card  # no timestamps
    assert first.counts["pairs"]["train"] > 0 and first.counts["pairs"]["test"] > 0


def test_a_build_leaves_no_server_side_cursor_open_on_its_connection(manager: AbstractUser) -> None:
    """The build walks several streams side by side and stops some before their end (the prompts'
    texts cover more prompts than the rows name). A stream left to the garbage collector closes
    its cursor whenever it is collected, in the middle of a later query on the same connection,
    where the driver waits for itself: the next request hangs."""
    from django.db import connection

    # given a project with judged tasks and a prompt judged by nobody
    project = project_with_prompts([*DISTINCT_PROMPTS, "A prompt nobody judges."], k=4)
    alice, bob = labelers("alice", "bob")
    for task in tasks_of(project)[:-1]:
        judge(task, alice, [1, 2, 3, 4])
        judge(task, bob, [2, 1, 3, 4])

    # when it is built, with the garbage collector held off (it runs at moments nobody chooses)
    gc.disable()
    try:
        build = run_build(created_by=manager, projects=[project], test_fraction=0.0)
        # then every cursor the build opened on this connection is already closed
        with connection.cursor() as cursor:
            cursor.execute("SELECT name FROM pg_cursors")
            open_cursors = cursor.fetchall()
    finally:
        gc.enable()
    assert build.status == DatasetBuild.Status.SUCCEEDED
    assert open_cursors == []


# --- the split -------------------------------------------------------------------------

# Three families of near-duplicates: the same prompt with case and punctuation
# changed, or one word swapped.
NEAR_DUPLICATE_FAMILIES = [
    [
        "Please explain in simple words why the ocean looks blue on a sunny summer afternoon.",
        "PLEASE explain, in simple words: why the ocean looks blue on a sunny summer afternoon?!",
        "Please explain in simple words why the sea looks blue on a sunny summer afternoon.",
    ],
    [
        "Write a short story about a robot who learns to bake bread in a small village.",
        "write a short story about a robot who learns to bake bread in a small village",
        "Write a short story about a robot who learns to bake cakes in a small village.",
    ],
    [
        "List five practical ways to save energy at home during a cold winter month.",
        "List five practical ways to save energy at home during a cold winter week!",
        "list five practical ways -- to save energy at home, during a cold winter month",
    ],
]


def test_prompts_are_normalised_by_case_punctuation_and_whitespace() -> None:
    assert prompt_normalise(text="  Hello,\n  WORLD!  Isn't it?", messages=None) == "hello world isn t it"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, there."}]
    assert prompt_normalise(text="", messages=chat) == "hi there"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_prompt_and_no_near_duplicate_of_one_is_on_both_sides_of_the_split(
    manager: AbstractUser, seed: int
) -> None:
    # given near-duplicate families among distinct prompts, and the same text in a second project
    prompts = [text for family in NEAR_DUPLICATE_FAMILIES for text in family] + DISTINCT_PROMPTS
    first = project_with_prompts(prompts, name="first", k=2)
    second = project_with_prompts([DISTINCT_PROMPTS[0], NEAR_DUPLICATE_FAMILIES[0][0]], name="second", k=2)
    (alice,) = labelers("alice")
    for task in tasks_of(first) + tasks_of(second):
        judge(task, alice, [1, 2])

    # when split half and half
    build = run_build(created_by=manager, projects=[first, second], test_fraction=0.5, seed=seed)

    # then every family, and every repeated text, is on one side only
    side: dict[str, set[str]] = {}
    for split in ("train", "test"):
        for row in read_rows(build, "pairs", split):
            side.setdefault(prompt_of(row).strip(), set()).add(split)
    assert all(len(sides) == 1 for sides in side.values())
    for family in NEAR_DUPLICATE_FAMILIES:
        assert len(set().union(*(side[text] for text in family))) == 1, family
    assert build.summary["split"]["near_duplicate_groups"] >= len(NEAR_DUPLICATE_FAMILIES)
    assert {"train", "test"} == set().union(*side.values())


# --- ties and margins ------------------------------------------------------------------


def test_ties_are_dropped_by_default_and_kept_as_flagged_rows_outside_the_trl_files(
    manager: AbstractUser,
) -> None:
    # given one ranking with a tie between the first two completions
    project = project_with_prompts(DISTINCT_PROMPTS[:1], k=3)
    (alice,) = labelers("alice")
    judge(tasks_of(project)[0], alice, [1, 1, 2])

    # when built with ties dropped, then kept
    dropped = run_build(created_by=manager, projects=[project], test_fraction=0.0)
    kept = run_build(created_by=manager, projects=[project], test_fraction=0.0, ties="keep")

    # then the TRL pairs never hold the tie; with keep, pairs_with_ties flags it
    assert len(all_rows(dropped, "pairs")) == 2
    assert not (build_folder(dropped) / "pairs_with_ties").exists()
    assert all_rows(kept, "pairs") == all_rows(dropped, "pairs")
    with_ties = all_rows(kept, "pairs_with_ties")
    assert [row["tie"] for row in with_ties] == [True, False, False]
    assert {with_ties[0]["chosen"], with_ties[0]["rejected"]} == {
        "Answer 0 to prompt 0 of support.",
        "Answer 1 to prompt 0 of support.",
    }
    assert kept.summary["comparisons"]["tie_rate"] == pytest.approx(1 / 3, abs=1e-4)
    card = (build_folder(kept) / "README.md").read_text()
    assert "never contain ties" in card
    # and grouped rows keep the equal ranks either way
    assert all_rows(dropped, "grouped")[0]["ranks"] == [1, 1, 2]


@pytest.mark.parametrize(
    ("margin", "expected"),
    [
        ("none", None),
        # ranks [1, 2, 4, 3]: pairs (0,1) (0,2) (0,3) (1,2) (1,3) (3>2)
        ("rank_gap", [1.0, 3.0, 2.0, 2.0, 1.0, 1.0]),
        # likert [7, 6, 1, 3]
        ("likert_gap", [1.0, 6.0, 4.0, 5.0, 3.0, 2.0]),
    ],
)
def test_the_margin_option_writes_the_rank_or_likert_gap(
    manager: AbstractUser, margin: str, expected: list[float] | None
) -> None:
    project = project_with_prompts(DISTINCT_PROMPTS[:1], k=4, likert_enabled=True)
    (alice,) = labelers("alice")
    judge(tasks_of(project)[0], alice, [1, 2, 4, 3], likert=[7, 6, 1, 3])

    build = run_build(created_by=manager, projects=[project], margin=margin, test_fraction=0.0)

    rows = all_rows(build, "pairs")
    if expected is None:
        assert all(set(row) == {"prompt", "chosen", "rejected"} for row in rows)
    else:
        assert [row["margin"] for row in rows] == expected
    if margin == "likert_gap":
        assert all_rows(build, "grouped")[0]["likert"] == [7, 6, 1, 3]


def test_the_likert_gap_drops_votes_that_have_no_ratings(manager: AbstractUser) -> None:
    project = project_with_prompts(DISTINCT_PROMPTS[:1], k=3)
    (alice,) = labelers("alice")
    judge(tasks_of(project)[0], alice, [1, 2, 3])

    build = run_build(created_by=manager, projects=[project], margin="likert_gap", test_fraction=0.0)

    assert all_rows(build, "pairs") == []
    assert build.summary["comparisons"]["dropped_without_likert"] == 3


# --- majority --------------------------------------------------------------------------


def test_majority_aggregation_keeps_the_majority_direction_above_the_threshold(manager: AbstractUser) -> None:
    """Hand-checked example. Completions A, B, C (in that order) of two prompts.

    Prompt 1, five labelers (ranks A, B, C):
        L1 1 2 3   L2 1 2 3   L3 2 1 3   L4 1 1 2   L5 2 2 1
        {A,B}: A>B L1 L2 · B>A L3 · tie L4 L5       (n=5)
        {A,C}: A>C L1 L2 L3 L4 · C>A L5             (n=5)
        {B,C}: B>C L1 L2 L3 L4 · C>B L5             (n=5)
    Prompt 2, three labelers:
        L1 1 1 2   L2 1 1 2   L3 1 2 3
        {A,B}: tie L1 L2 · A>B L3                   (n=3)
        {A,C}: A>C L1 L2 L3 · {B,C}: B>C L1 L2 L3   (n=3)

    threshold 0.6, ties dropped (a tie counts in n, for neither side):
        P1 {A,B}: 2/5 = 0.4 < 0.6 → no row
        P1 A>C: 4/5, margin mean(2, 2, 1, 1) = 1.5
        P1 B>C: 4/5, margin mean(1, 1, 2, 1) = 1.25
        P2 {A,B}: 1/3 → no row
        P2 A>C: 3/3, margin mean(1, 1, 2) = 4/3
        P2 B>C: 3/3, margin mean(1, 1, 1) = 1
    threshold 0.6, ties kept (a tie is a third outcome):
        P1 {A,B}: 2 / 1 / 2 → no unique winner, no row
        P2 {A,B}: tie 2/3 ≥ 0.6 → a tie row (pairs_with_ties only)
    threshold 0.4, ties dropped: P1 A>B (2/5 = 0.4), margin mean(1, 1) = 1
    SFT (top of the majority), threshold 0.6: P1 tops A A B (tie) C → A 2/5 → none;
        P2 tops (tie) (tie) A → 1/3 → none. Threshold 0.4: P1 → A.
    """
    # given
    project = project_with_prompts(
        ["Name a fruit that is yellow.", "Name a planet with rings."],
        k=3,
        answers=[["A1", "B1", "C1"], ["A2", "B2", "C2"]],
    )
    first, second = tasks_of(project)
    people = labelers("l1", "l2", "l3", "l4", "l5")
    for person, ranks in zip(people, [[1, 2, 3], [1, 2, 3], [2, 1, 3], [1, 1, 2], [2, 2, 1]], strict=True):
        judge(first, person, ranks)
    for person, ranks in zip(people, [[1, 1, 2], [1, 1, 2], [1, 2, 3]], strict=False):
        judge(second, person, ranks)
    options: dict[str, Any] = {"aggregation": "majority", "margin": "rank_gap", "test_fraction": 0.0}

    # when
    strict = run_build(created_by=manager, projects=[project], agreement_threshold=0.6, **options)
    with_ties = run_build(
        created_by=manager, projects=[project], agreement_threshold=0.6, ties="keep", **options
    )
    loose = run_build(created_by=manager, projects=[project], agreement_threshold=0.4, **options)

    # then
    def triples(rows: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
        return [(row["chosen"], row["rejected"], round(row["margin"], 4)) for row in rows]

    assert triples(all_rows(strict, "pairs")) == [
        ("A1", "C1", 1.5),
        ("B1", "C1", 1.25),
        ("A2", "C2", 1.3333),
        ("B2", "C2", 1.0),
    ]
    assert strict.summary["majority"]["dropped_below_threshold"] == 2
    assert all_rows(with_ties, "pairs") == all_rows(strict, "pairs")
    assert [
        (row["chosen"], row["rejected"]) for row in all_rows(with_ties, "pairs_with_ties") if row["tie"]
    ] == [("A2", "B2")]
    assert with_ties.summary["majority"]["dropped_no_unique_winner"] == 1
    assert triples(all_rows(loose, "pairs"))[0] == ("A1", "B1", 1.0)
    assert all_rows(strict, "sft") == []
    assert [row["completion"] for row in all_rows(loose, "sft")] == ["A1"]


def test_majority_leaves_out_the_sft_row_of_a_prompt_whose_judgments_all_tie_at_the_top(
    manager: AbstractUser,
) -> None:
    project = project_with_prompts(DISTINCT_PROMPTS[:2], k=3, answers=[["A", "B", "C"], ["D", "E", "F"]])
    alice, bob = labelers("alice", "bob")
    tied, clear = tasks_of(project)
    judge(tied, alice, [1, 1, 2])
    judge(tied, bob, [2, 1, 1])  # B and C tie at the top
    judge(clear, alice, [1, 2, 3])
    judge(clear, bob, [1, 3, 2])

    build = run_build(created_by=manager, projects=[project], aggregation="majority", test_fraction=0.0)

    assert all_rows(build, "sft") == [{"prompt": DISTINCT_PROMPTS[1] + "\n", "completion": "D"}]
    assert build.summary["majority"]["sft_dropped"] == 1


def test_every_vote_writes_one_row_per_comparison(manager: AbstractUser) -> None:
    project = project_with_prompts(DISTINCT_PROMPTS[:1], k=3, answers=[["A", "B", "C"]])
    alice, bob = labelers("alice", "bob")
    judge(tasks_of(project)[0], alice, [1, 2, 3])
    judge(tasks_of(project)[0], bob, [2, 1, 3])

    build = run_build(created_by=manager, projects=[project], test_fraction=0.0)

    # ordered by (prompt, pair, comparison): both votes on {A,B}, then {A,C}, then {B,C}
    assert [(row["chosen"], row["rejected"]) for row in all_rows(build, "pairs")] == [
        ("A", "B"),
        ("B", "A"),
        ("A", "C"),
        ("A", "C"),
        ("B", "C"),
        ("B", "C"),
    ]
    assert build.summary["agreement"]["rate"] == pytest.approx(2 / 3, abs=1e-4)


# --- filters ---------------------------------------------------------------------------


def test_the_date_range_keeps_comparisons_of_the_days_inside_it(manager: AbstractUser) -> None:
    project = project_with_prompts(DISTINCT_PROMPTS[:1], k=2)
    alice, bob, carol = labelers("alice", "bob", "carol")
    task = tasks_of(project)[0]
    zone = timezone.get_default_timezone()
    judge(task, alice, [1, 2], at=datetime(2026, 3, 1, 23, 59, tzinfo=zone))
    judge(task, bob, [2, 1], at=datetime(2026, 3, 2, 12, 0, tzinfo=zone))
    judge(task, carol, [1, 2], at=datetime(2026, 3, 3, 0, 0, tzinfo=zone))

    build = run_build(
        created_by=manager, projects=[project], date_from=date(2026, 3, 2), date_to=date(2026, 3, 2)
    )

    assert [row["chosen"] for row in all_rows(build, "pairs")] == ["Answer 1 to prompt 0 of support."]
    assert build.summary["comparisons"]["read"] == 1


def test_the_labeler_filter_keeps_only_their_judgments(manager: AbstractUser) -> None:
    project = project_with_prompts(DISTINCT_PROMPTS[:2], k=2)
    alice, bob = labelers("alice", "bob")
    for task in tasks_of(project):
        judge(task, alice, [1, 2])
        judge(task, bob, [2, 1])

    build = run_build(created_by=manager, projects=[project], labelers=[bob], test_fraction=0.0)

    rows = all_rows(build, "pairs")
    assert len(rows) == 2 and all(row["chosen"].startswith("Answer 1") for row in rows)
    assert len(all_rows(build, "grouped")) == 2


def test_people_below_the_minimum_gold_accuracy_are_left_out(manager: AbstractUser) -> None:
    # given a gold task answered right by alice, wrong by bob; carol never saw gold
    project = project_with_prompts(
        [DISTINCT_PROMPTS[0], {"prompt": DISTINCT_PROMPTS[1], "metadata": {"gold_ranks": [1, 2]}}], k=2
    )
    regular, gold = tasks_of(project)
    assert gold.is_gold
    alice, bob, carol = labelers("alice", "bob", "carol")
    judge(gold, alice, [1, 2])
    judge(gold, bob, [2, 1])
    for person in (alice, bob, carol):
        judge(regular, person, [1, 2])

    # when
    build = run_build(created_by=manager, projects=[project], min_gold_accuracy=0.5, test_fraction=0.0)

    # then bob's comparisons are gone, everywhere
    assert build.summary["filters"]["left_out_for_gold_accuracy"] == {str(project.pk): [bob.pk]}
    assert build.summary["comparisons"]["read"] == 3  # alice twice, carol once
    assert len(all_rows(build, "grouped")) == 3


def test_exclude_flagged_drops_the_pairs_whose_judge_flagged_a_completion(manager: AbstractUser) -> None:
    project = project_with_prompts(DISTINCT_PROMPTS[:1], k=3, flags=["harmful"], answers=[["A", "B", "C"]])
    alice, bob = labelers("alice", "bob")
    task = tasks_of(project)[0]
    judge(task, alice, [1, 2, 3], flags={2: ["harmful"]})
    judge(task, bob, [1, 2, 3])

    kept = run_build(created_by=manager, projects=[project], test_fraction=0.0)
    dropped = run_build(created_by=manager, projects=[project], test_fraction=0.0, exclude_flagged=True)

    assert len(all_rows(kept, "pairs")) == 6
    # alice's A>C and B>C are gone; bob's stay
    assert [(row["chosen"], row["rejected"]) for row in all_rows(dropped, "pairs")] == [
        ("A", "B"),
        ("A", "B"),
        ("A", "C"),
        ("B", "C"),
    ]
    assert dropped.summary["comparisons"]["dropped_flagged"] == 2
    assert [row["completions"] for row in all_rows(dropped, "grouped")] == [["A", "B"], ["A", "B", "C"]]


# --- grouped, SFT and reference rows ---------------------------------------------------


def test_grouped_sft_and_reference_rows_come_from_the_judgments(manager: AbstractUser) -> None:
    # given a chat prompt with a reference answer and a text prompt, ranked once each
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    project = project_with_prompts(
        [{"prompt": chat, "metadata": {"reference": "Paris."}}, "Two plus two?"],
        k=3,
        answers=[["Lyon.", "Paris.", "Nice."], ["Four.", "Five.", "Three."]],
    )
    (alice,) = labelers("alice")
    chat_task, text_task = tasks_of(project)
    judge(chat_task, alice, [2, 1, 3])
    judge(text_task, alice, [1, 1, 3])  # a tie at the top: no SFT row

    # when
    standard = run_build(created_by=manager, projects=[project], test_fraction=0.0)
    conversational = run_build(
        created_by=manager, projects=[project], test_fraction=0.0, format="conversational"
    )

    # then
    grouped = all_rows(standard, "grouped")
    assert grouped[0] == {
        "prompt": "System: Be brief.\n\nUser: Capital of France?\n\nAssistant:\n",
        "completions": ["Lyon.", "Paris.", "Nice."],
        "ranks": [2, 1, 3],
    }
    assert grouped[1]["prompt"] == "Two plus two?\n"
    assert all_rows(standard, "sft") == [{"prompt": grouped[0]["prompt"], "completion": "Paris."}]
    # the reference is chosen over each judged completion but itself
    assert [(row["chosen"], row["rejected"]) for row in all_rows(standard, "reference")] == [
        ("Paris.", "Lyon."),
        ("Paris.", "Nice."),
    ]
    pair = all_rows(conversational, "pairs")[0]
    assert pair["prompt"] == chat
    assert pair["chosen"] == [{"role": "assistant", "content": "Paris."}]
    assert all_rows(conversational, "sft")[0]["completion"] == [{"role": "assistant", "content": "Paris."}]


def test_the_card_reports_counts_options_and_statistics(manager: AbstractUser) -> None:
    project = project_with_prompts(DISTINCT_PROMPTS[:3], k=3)
    (alice,) = labelers("alice")
    for task in tasks_of(project):
        judge(task, alice, [1, 2, 3])

    build = run_build(created_by=manager, projects=[project], margin="rank_gap", seed=7)

    card = (build_folder(build) / "README.md").read_text()
    for expected in (
        "| aggregation | every_vote |",
        "| seed | 7 |",
        "| margin | rank_gap |",
        f"| pairs/train.jsonl (.parquet) | {build.counts['pairs']['train']} |",
        "| tie rate | 0 |",
        "### Margin (label) distribution of the pairs",
        "| 2 | 3 |",  # three rank gaps of 2 (1 vs 3)
    ):
        assert expected in card
    assert json.dumps(build.counts)  # JSON-ready
    assert build.counts["pairs"]["train"] + build.counts["pairs"]["test"] == 9


# --- failure and redelivery -------------------------------------------------------------


def test_a_failing_build_is_marked_failed_with_the_error_and_leaves_no_folder(
    manager: AbstractUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a build whose writing breaks half-way (its rows are written, hf/ is not)
    project = project_with_prompts(DISTINCT_PROMPTS[:2], k=2)
    (alice,) = labelers("alice")
    for task in tasks_of(project):
        judge(task, alice, [1, 2])

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr("training.builds.hf_save", broken)

    # when
    build = run_build(created_by=manager, projects=[project])

    # then the row says so, and nothing is left on disk
    assert build.status == DatasetBuild.Status.FAILED
    assert "the disk is on fire" in build.error
    assert build.finished_at is not None and build.content_hash == ""
    assert list(datasets_root().iterdir()) == []


def test_running_a_build_that_is_not_queued_does_nothing(manager: AbstractUser) -> None:
    project = project_with_prompts(DISTINCT_PROMPTS[:1], k=2)
    build = run_build(created_by=manager, projects=[project])
    finished_at = build.finished_at

    assert dataset_build_run(build_id=build.pk) is None

    build.refresh_from_db()
    assert build.status == DatasetBuild.Status.SUCCEEDED and build.finished_at == finished_at


# --- exact bytes -----------------------------------------------------------------------

# sha256 of each JSON Lines file of two builds over fixed judgments, as builds wrote them before the
# write path became one pass with column-wise batches: consumers read these bytes, so a change to
# them is a change of the format, never a side effect of making builds faster.
PINNED_JSONL = {
    "majority": {
        "grouped/test.jsonl": "51d6f1c56a684def",
        "grouped/train.jsonl": "d15af9905e932bfc",
        "pairs/test.jsonl": "e706f9adf3e73547",
        "pairs/train.jsonl": "92622aba0c110cbf",
        "pairs_with_ties/test.jsonl": "1c9c82f05f975565",
        "pairs_with_ties/train.jsonl": "4e7a67fdd53eee1b",
        "reference/test.jsonl": "e3b0c44298fc1c14",
        "reference/train.jsonl": "da8907809f259e1c",
        "sft/test.jsonl": "64e9046545fff1c4",
        "sft/train.jsonl": "4a623d3811fa4708",
    },
    "every_vote": {
        "grouped/test.jsonl": "4c8106898b756745",
        "grouped/train.jsonl": "2929efd9a17bec03",
        "pairs/test.jsonl": "97225dc3e4a27c67",
        "pairs/train.jsonl": "c62b7b0a5f4f2d28",
        "reference/test.jsonl": "e3b0c44298fc1c14",
        "reference/train.jsonl": "0d82a6a9ab1e0426",
        "sft/test.jsonl": "867db28c8b7fd031",
        "sft/train.jsonl": "0dcc8c24bcec0e6f",
    },
}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        (
            "majority",
            {"aggregation": "majority", "ties": "keep", "margin": "likert_gap", "exclude_flagged": True},
        ),
        ("every_vote", {"aggregation": "every_vote", "margin": "rank_gap", "format": "conversational"}),
    ],
)
def test_the_json_lines_keep_their_exact_bytes(
    manager: AbstractUser, name: str, options: dict[str, Any]
) -> None:
    # given text, chat and reference prompts judged with ties, Likert ratings and a flag
    prompts: list[Any] = [
        *DISTINCT_PROMPTS[:5],
        {"prompt": DISTINCT_PROMPTS[5], "metadata": {"reference": "Buenos días; bonjour."}},
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": DISTINCT_PROMPTS[6]}],
    ]
    project = project_with_prompts(prompts, k=4, likert_enabled=True, flags=["unsafe"])
    alice, bob, carol = labelers("alice", "bob", "carol")
    for task in tasks_of(project):
        judge(task, alice, [1, 2, 3, 4], likert=[7, 5, 3, 1], flags={3: ["unsafe"]})
        judge(task, bob, [2, 1, 2, 3], likert=[5, 6, 5, 2])
        judge(task, carol, [1, 3, 2, 4], likert=[6, 2, 4, 1])

    # when
    build = run_build(created_by=manager, projects=[project], test_fraction=0.3, **options)

    # then every JSON Lines file has the bytes it had
    folder = build_folder(build)
    digests = {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        for path in sorted(folder.glob("*/*.jsonl"))
    }
    assert digests == PINNED_JSONL[name]
