"""Training runs on the tiny offline model: reward models and DPO policies with TRL, a few steps each."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from training.demo.task import completion_canonical, demo_problems
from training.runner import (
    CHECKPOINT_STAGING_DIRNAME,
    FINAL_DIRNAME,
    RUN_INFO_FILENAME,
    TEST_REWARDS_FILENAME,
    PrintReporter,
    RunResult,
    RunSpec,
    checkpoint_is_complete,
    checkpoint_newest_complete,
    checkpoints_tidy,
    run_training,
)
from training.scoring import reward_input_ids, reward_model_load, reward_scores

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[2]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
REWARD_METRICS = {"pairwise_accuracy", "tie_rate", "mean_margin", "ece", "kendall_tau", "eval_loss"}


class RecordingReporter:
    """Remembers every report; asks to stop once `stop_after_steps` steps have ended."""

    def __init__(self, *, stop_after_steps: int | None = None) -> None:
        self.stop_after_steps = stop_after_steps
        self.total_steps: list[int] = []
        self.progress_reports: list[tuple[int, int, dict[str, float]]] = []
        self.heartbeats = 0
        self.steps_ended = 0
        self.lines: list[str] = []

    def started(self, *, total_steps: int) -> None:
        self.total_steps.append(total_steps)

    def progress(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.progress_reports.append((step, total_steps, metrics))

    def heartbeat(self) -> None:
        self.heartbeats += 1

    def should_stop(self) -> bool:
        self.steps_ended += 1
        return self.stop_after_steps is not None and self.steps_ended >= self.stop_after_steps

    def log(self, line: str) -> None:
        self.lines.append(line)

    def training_steps(self) -> list[int]:
        return [step for step, _, metrics in self.progress_reports if "loss" in metrics]


# --- data ----------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A dozen training pairs with margins, four test pairs and three grouped rows: right answer over wrong."""
    folder = tmp_path_factory.mktemp("preferences")
    problems = demo_problems(count=19, seed=3, split="train")
    pairs = [
        {
            "prompt": f"{problem.prompt}\n",
            "chosen": completion_canonical(problem),
            "rejected": completion_canonical(problem, answer=problem.answer + 1 + i % 2),
            "margin": float(1 + i % 2),
        }
        for i, problem in enumerate(problems[:16])
    ]
    grouped = [
        {
            "prompt": f"{problem.prompt}\n",
            "completions": [completion_canonical(problem, answer=problem.answer + d) for d in (0, 1, 3)],
            "ranks": [1, 2, 3],
        }
        for problem in problems[16:]
    ]
    return {
        "train": _write_jsonl(folder / "train.jsonl", pairs[:12]),
        "test": _write_jsonl(folder / "test.jsonl", pairs[12:]),
        "grouped": _write_jsonl(folder / "grouped.jsonl", grouped),
    }


def spec_for(model_dir: Path, data: dict[str, str], output_dir: Path, **overrides: Any) -> RunSpec:
    values: dict[str, Any] = {
        "run_id": 1,
        "kind": "reward",
        "base_model": str(model_dir),
        "train_file": data["train"],
        "test_file": data["test"],
        "output_dir": str(output_dir),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 16,
        "logging_steps": 1,
        "save_steps": 10,
        "max_length": 128,
        # Recomputing activations only costs time on a model this small.
        "gradient_checkpointing": False,
    }
    return RunSpec(**{**values, **overrides})


def read_test_pairs(data: dict[str, str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(data["test"]).read_text().splitlines()]


def assert_no_pickles(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]


# --- a reward model with LoRA --------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_lora_run(
    tiny_model_dir: Path, data: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunSpec, RunResult, RecordingReporter]:
    spec = spec_for(
        tiny_model_dir, data, tmp_path_factory.mktemp("reward-lora"), grouped_test_file=data["grouped"]
    )
    reporter = RecordingReporter()
    return spec, run_training(spec, reporter), reporter


def test_a_reward_run_with_lora_succeeds_and_reports_every_step(
    reward_lora_run: tuple[RunSpec, RunResult, RecordingReporter],
) -> None:
    _, result, reporter = reward_lora_run

    assert (result.status, result.steps) == ("succeeded", 3)
    assert reporter.total_steps == [3]
    assert reporter.training_steps() == [1, 2, 3]
    assert all(
        {"loss", "accuracy", "margin", "learning_rate"} <= set(m)
        for _, _, m in reporter.progress_reports
        if "loss" in m
    )
    assert reporter.heartbeats >= 3


def test_a_reward_run_returns_its_test_metrics_under_stable_names(
    reward_lora_run: tuple[RunSpec, RunResult, RecordingReporter],
) -> None:
    _, result, _ = reward_lora_run

    assert set(result.metrics) >= REWARD_METRICS
    assert all(math.isfinite(result.metrics[name]) for name in REWARD_METRICS)
    assert 0.0 <= result.metrics["pairwise_accuracy"] <= 1.0
    assert -1.0 <= result.metrics["kendall_tau"] <= 1.0


def test_the_saved_lora_adapter_holds_the_trained_score_head(
    reward_lora_run: tuple[RunSpec, RunResult, RecordingReporter],
) -> None:
    spec, result, _ = reward_lora_run
    final_dir = Path(result.final_dir)

    with safe_open(str(final_dir / "adapter_model.safetensors"), framework="pt") as saved:
        keys = list(saved.keys())
    info = json.loads((final_dir / RUN_INFO_FILENAME).read_text())

    assert final_dir == Path(spec.output_dir) / FINAL_DIRNAME
    assert any(".score." in key for key in keys)
    assert any("lora_A" in key for key in keys)
    assert (final_dir / "tokenizer.json").is_file()
    assert not (final_dir / "model.safetensors").exists()
    assert_no_pickles(final_dir)
    assert (info["kind"], info["base_model"], info["peft"]) == ("reward", spec.base_model, "lora")


def test_a_reloaded_reward_model_scores_the_test_pairs_as_the_trained_model_did(
    reward_lora_run: tuple[RunSpec, RunResult, RecordingReporter], data: dict[str, str]
) -> None:
    spec, result, _ = reward_lora_run
    trained = [
        json.loads(line) for line in (Path(spec.output_dir) / TEST_REWARDS_FILENAME).read_text().splitlines()
    ]
    pairs = read_test_pairs(data)

    tokenizer, model = reward_model_load(result.final_dir)
    chosen = reward_scores(tokenizer, model, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = reward_scores(
        tokenizer, model, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs], batch_size=1
    )

    assert all(math.isfinite(score) for score in chosen + rejected)
    assert chosen == pytest.approx([row["reward_chosen"] for row in trained], abs=1e-5)
    assert rejected == pytest.approx([row["reward_rejected"] for row in trained], abs=1e-5)


# --- TRL parity ----------------------------------------------------------------------------


def test_scoring_builds_the_ids_and_reads_the_reward_where_trls_reward_trainer_does(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    # given: TRL's own preprocessing and collation of standard and conversational pairs
    problems = demo_problems(count=3, seed=5, split="train")
    standard = [
        {
            "prompt": p.prompt + "\n",
            "chosen": completion_canonical(p),
            "rejected": completion_canonical(p, answer=p.answer + 2),
        }
        for p in problems
    ]
    conversational = [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        for row in standard
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, use_safetensors=True
    )
    args = RewardConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        max_length=None,
    )
    prepared = {}
    for name, rows in (("standard", standard), ("conversational", conversational)):
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )
        prepared[name] = trainer.train_dataset
    batch = trainer.data_collator([prepared["standard"][i] for i in range(len(standard))])
    with torch.no_grad():
        trl_rewards = model(**batch).logits.squeeze(-1).tolist()

    # when
    ids = {
        name: [reward_input_ids(tokenizer, row["prompt"], row["chosen"]) for row in rows]
        for name, rows in (("standard", standard), ("conversational", conversational))
    }
    scores = reward_scores(
        tokenizer,
        model,
        [row["prompt"] for row in standard] * 2,
        [row["chosen"] for row in standard] + [row["rejected"] for row in standard],
    )

    # then
    assert ids["standard"] == prepared["standard"]["chosen_ids"]
    assert ids["conversational"] == prepared["conversational"]["chosen_ids"]
    assert ids["standard"][0][-1] == tokenizer.eos_token_id
    assert scores == pytest.approx(trl_rewards, abs=1e-5)


# --- other PEFT methods and DPO -------------------------------------------------------------


@pytest.mark.parametrize("peft", ["ia3", "full"])
def test_a_reward_run_trains_two_steps_with_ia3_or_full_fine_tuning(
    peft: str, tiny_model_dir: Path, data: dict[str, str], tmp_path: Path
) -> None:
    spec = spec_for(tiny_model_dir, data, tmp_path, peft=peft, max_steps=2, use_margin=False)

    result = run_training(spec, RecordingReporter())
    tokenizer, model = reward_model_load(result.final_dir)
    pairs = read_test_pairs(data)
    trained = [json.loads(line) for line in (tmp_path / TEST_REWARDS_FILENAME).read_text().splitlines()]

    assert (result.status, result.steps) == ("succeeded", 2)
    assert {"pairwise_accuracy", "tie_rate", "mean_margin", "ece", "eval_loss"} <= set(result.metrics)
    assert (
        Path(result.final_dir) / ("model.safetensors" if peft == "full" else "adapter_model.safetensors")
    ).is_file()
    assert_no_pickles(Path(result.final_dir))
    assert reward_scores(
        tokenizer, model, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    ) == pytest.approx([row["reward_chosen"] for row in trained], abs=1e-5)


def test_a_dpo_run_with_lora_reports_reward_accuracy_and_margin(
    tiny_model_dir: Path, data: dict[str, str], tmp_path: Path
) -> None:
    spec = spec_for(tiny_model_dir, data, tmp_path, kind="dpo", learning_rate=1e-3)
    reporter = RecordingReporter()

    result = run_training(spec, reporter)
    final_dir = Path(result.final_dir)

    assert (result.status, result.steps) == ("succeeded", 3)
    assert {"reward_accuracy", "reward_margin", "eval_loss"} <= set(result.metrics)
    assert 0.0 <= result.metrics["reward_accuracy"] <= 1.0
    assert math.isfinite(result.metrics["reward_margin"])
    assert reporter.training_steps() == [1, 2, 3]
    assert (final_dir / "adapter_model.safetensors").is_file()
    assert json.loads((final_dir / RUN_INFO_FILENAME).read_text())["kind"] == "dpo"
    assert_no_pickles(final_dir)


# --- cancelling and resuming -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cancelled_run(
    tiny_model_dir: Path, data: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunSpec, RunResult, list[str]]:
    spec = spec_for(tiny_model_dir, data, tmp_path_factory.mktemp("cancelled"), max_steps=4, test_file=None)
    result = run_training(spec, RecordingReporter(stop_after_steps=1))
    return (
        spec,
        result,
        sorted(p.name for p in spec.checkpoints_dir.iterdir() if p.name.startswith("checkpoint-")),
    )


def test_a_stop_request_after_step_one_cancels_the_run_with_a_checkpoint(
    cancelled_run: tuple[RunSpec, RunResult, list[str]],
) -> None:
    spec, result, checkpoints = cancelled_run

    assert (result.status, result.steps) == ("cancelled", 1)
    assert checkpoints == ["checkpoint-1"]
    assert result.checkpoint_dir == str(spec.checkpoints_dir / "checkpoint-1")
    assert result.final_dir == ""
    assert not spec.final_dir.exists()


def test_a_second_run_resumes_from_the_checkpoint_and_counts_on(
    cancelled_run: tuple[RunSpec, RunResult, list[str]],
) -> None:
    spec, _, _ = cancelled_run
    reporter = RecordingReporter()

    result = run_training(spec, reporter)

    assert (result.status, result.steps) == ("succeeded", 4)
    assert any("resuming from checkpoint checkpoint-1" in line for line in reporter.lines)
    assert reporter.training_steps() == [2, 3, 4]
    assert spec.final_dir.is_dir()


def test_checkpoints_are_renamed_into_place_complete_and_none_is_left_half_written(
    cancelled_run: tuple[RunSpec, RunResult, list[str]],
) -> None:
    spec, _, checkpoints = cancelled_run

    assert checkpoints == ["checkpoint-1"]
    assert checkpoint_is_complete(spec.checkpoints_dir / "checkpoint-1")
    assert not (spec.checkpoints_dir / CHECKPOINT_STAGING_DIRNAME).exists()


def test_a_half_written_newer_checkpoint_is_passed_over_and_the_run_resumes_from_the_complete_one(
    tiny_model_dir: Path, data: dict[str, str], tmp_path: Path
) -> None:
    # given a complete checkpoint-1, and a checkpoint-200 whose writer was killed after the weights
    spec = spec_for(tiny_model_dir, data, tmp_path, max_steps=4, test_file=None)
    run_training(spec, RecordingReporter(stop_after_steps=1))
    half = spec.checkpoints_dir / "checkpoint-200"
    half.mkdir()
    weights = (spec.checkpoints_dir / "checkpoint-1" / "adapter_model.safetensors").read_bytes()
    (half / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    reporter = RecordingReporter()

    # when the run resumes
    result = run_training(spec, reporter)

    # then from checkpoint-1, and the half-written folder is gone
    assert (result.status, result.steps) == ("succeeded", 4)
    assert any("resuming from checkpoint checkpoint-1 " in line for line in reporter.lines)
    assert reporter.training_steps() == [2, 3, 4]
    assert not half.exists()


def test_resume_takes_the_newest_complete_checkpoint_marked_or_written_whole_by_an_earlier_version(
    tmp_path: Path,
) -> None:
    # given a marked checkpoint, one an earlier version wrote in place (its trainer state last), and
    # one whose writer was killed before its trainer state
    for step, files in (
        (1, ["adapter_model.safetensors", "trainer_state.json", "rankwise_checkpoint.json"]),
        (3, ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"]),
        (5, ["adapter_model.safetensors"]),
    ):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in files:
            (tmp_path / f"checkpoint-{step}" / name).write_text("{}")
    (tmp_path / CHECKPOINT_STAGING_DIRNAME / "checkpoint-7").mkdir(parents=True)

    # when
    newest = checkpoint_newest_complete(tmp_path)
    removed = checkpoints_tidy(tmp_path)

    # then
    assert newest == tmp_path / "checkpoint-3"
    assert removed == [CHECKPOINT_STAGING_DIRNAME, "checkpoint-5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3"]


# --- the spec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kind", "ppo", "kind must be one of 'reward', 'dpo', 'sft', 'rl'; got 'ppo'"),
        ("peft", "qlora", "peft must be one of 'lora', 'ia3', 'full'; got 'qlora'"),
        ("trainer", "magic", "trainer must be one of 'trl', 'grouped'; got 'magic'"),
        ("learning_rate", 0.0, "learning_rate must be positive"),
    ],
)
def test_a_spec_with_an_unknown_value_is_refused_naming_the_field(
    field: str, value: Any, message: str, tmp_path: Path
) -> None:
    values = {"run_id": 1, "kind": "reward", "base_model": "m", "train_file": "t", "test_file": None}

    with pytest.raises(ValueError, match=message):
        RunSpec(**{**values, "output_dir": str(tmp_path), field: value})


def test_run_training_checks_a_spec_changed_after_it_was_made(tmp_path: Path) -> None:
    spec = RunSpec(
        run_id=1, kind="reward", base_model="m", train_file="t", test_file=None, output_dir=str(tmp_path)
    )
    spec.peft = "prefix"

    with pytest.raises(ValueError, match="peft must be one of"):
        run_training(spec, RecordingReporter())


def test_a_spec_round_trips_through_json_and_refuses_unknown_fields(tmp_path: Path) -> None:
    spec = RunSpec.with_defaults(
        kind="dpo", run_id=7, base_model="m", train_file="t", test_file=None, output_dir=str(tmp_path)
    )
    spec.to_json(tmp_path / "spec.json")
    (tmp_path / "typo.json").write_text(json.dumps({**spec.to_dict(), "learning_rte": 1e-4}))

    assert RunSpec.from_json(tmp_path / "spec.json") == spec
    assert spec.learning_rate == RunSpec.defaults("dpo")["learning_rate"]
    with pytest.raises(ValueError, match="unknown run spec field"):
        RunSpec.from_json(tmp_path / "typo.json")


def test_print_reporter_writes_one_json_object_per_event(tmp_path: Path) -> None:
    with (tmp_path / "out.jsonl").open("w") as stream:
        reporter = PrintReporter(stream)
        reporter.started(total_steps=2)
        reporter.progress(step=1, total_steps=2, metrics={"loss": 0.5, "grad_norm": float("nan")})

    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    assert lines == [
        {"event": "started", "total_steps": 2},
        {"event": "progress", "step": 1, "total_steps": 2, "metrics": {"loss": 0.5, "grad_norm": None}},
    ]


# --- the command line ---------------------------------------------------------------------


def test_the_runner_module_runs_a_spec_file_and_prints_json_progress_lines(
    tiny_model_dir: Path, data: dict[str, str], tmp_path: Path
) -> None:
    spec = spec_for(tiny_model_dir, data, tmp_path / "run", max_steps=2, test_file=None)
    spec.to_json(tmp_path / "spec.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    finished = subprocess.run(
        [sys.executable, "-m", "training.runner", str(tmp_path / "spec.json")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    events = [json.loads(line) for line in finished.stdout.splitlines()]

    assert finished.returncode == 0, finished.stderr[-3000:]
    assert events[0]["event"] == "log"
    assert [e["step"] for e in events if e["event"] == "progress" and "loss" in e["metrics"]] == [1, 2]
    assert {"event": "started", "total_steps": 2} in events
    assert events[-1]["event"] == "result"
    assert (events[-1]["status"], events[-1]["steps"]) == ("succeeded", 2)
