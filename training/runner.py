"""One training run, inside its own process: a reward model, an SFT, DPO or RL policy with TRL.

Kinds: "reward" (RewardTrainer), "dpo" (DPOTrainer), "sft" (SFTTrainer on the
build's `sft/` rows, `training.sft`) and "rl" (RLOOTrainer against a trained
reward model, `training.rl`).

`trainer` picks TRL's own RewardTrainer / DPOTrainer on the pair file ("trl",
the baseline) or the K-wise trainers of `training.grouped` on the grouped file
("grouped": one forward per completion, the same loss on the expanded pairs;
the batch size then counts groups). Evaluation, saving and metrics are the same
for both.

The Celery task launches this process (`python -m training.runner SPEC.json`,
or `accelerate launch -m training.runner SPEC.json` on several GPUs) or calls
`run_training` from its own entry module with a database-backed `Reporter`.
Nothing here imports Django: a run reads a `RunSpec`, talks to its reporter,
and leaves files under `spec.output_dir`:

    checkpoints/checkpoint-N/   resumable Trainer checkpoints (the last two), each written
                                under checkpoints/.incomplete/ and renamed into place once
                                complete (rankwise_checkpoint.json marks it so)
    final/                      trained weights (the adapter for PEFT) + tokenizer
                                + rankwise_run.json (kind, base model, PEFT method, metrics)
    test_rewards.jsonl          reward runs with a test file: each test pair's two rewards

Weights are read and written as safetensors only. The Trainer's optimizer,
scheduler and RNG states in a checkpoint are torch files; transformers reads
them back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

# What the run trained with on its device, written into output_dir when training starts.
from training.model_settings import DEVICE_SETTINGS_FILENAME as DEVICE_SETTINGS_FILENAME

# The kinds, PEFT methods, trainers and each user-facing setting (type, bounds, default) are defined there.
from training.run_settings import KINDS, PEFT_METHODS, RUN_SETTINGS, TRAINERS, setting_defaults

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

    from training.model_settings import DeviceSettings

# Named in the design but not built yet; asking for one is an error that says so.
PLANNED_TRAINERS: tuple[str, ...] = ()
# How a grouped reward run takes a pair's margin from grouped rows (training.grouped.MARGINS):
# the dataset build's margin option, which wrote the pair file's `margin` column the same way.
GROUPED_MARGINS = ("none", "rank_gap", "likert_gap")

CHECKPOINTS_DIRNAME = "checkpoints"
# Where a checkpoint is written before it is renamed into place; not a `checkpoint-N` name, so
# neither resuming nor transformers' rotation ever sees a half-written one.
CHECKPOINT_STAGING_DIRNAME = ".incomplete"
# Written last into a checkpoint, before the rename: a `checkpoint-N` folder without it was left
# half-written (by a process killed mid-write before checkpoints were renamed into place).
CHECKPOINT_COMPLETE_FILENAME = "rankwise_checkpoint.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
FINAL_DIRNAME = "final"
RUN_INFO_FILENAME = "rankwise_run.json"
TEST_REWARDS_FILENAME = "test_rewards.jsonl"
TRAINING_ARGS_FILENAME = "training_args.bin"
CHECKPOINTS_KEPT = 2

# Starting points per (kind, PEFT method); adapters learn at far higher rates
# than full weights, and DPO moves a policy that already works, so it steps
# more softly than a fresh reward head. Full DPO and LoRA DPO follow TRL's
# example scripts (5e-7, 5e-6); IA3 follows the (IA)³ paper's 3e-3.
LEARNING_RATES: dict[tuple[str, str], float] = {
    ("reward", "lora"): 5e-5,
    ("reward", "ia3"): 3e-3,
    ("reward", "full"): 1e-5,
    ("dpo", "lora"): 5e-6,
    ("dpo", "ia3"): 3e-4,
    ("dpo", "full"): 5e-7,
    # SFT: TRL's SFTConfig default for full weights (2e-5), ten times that for LoRA (its LoRA examples).
    ("sft", "lora"): 2e-4,
    ("sft", "ia3"): 3e-3,
    ("sft", "full"): 2e-5,
    # RL moves a working policy on its own samples: RLOOConfig's 1e-6 for full weights, LoRA ten times DPO's.
    ("rl", "lora"): 5e-5,
    ("rl", "ia3"): 1e-3,
    ("rl", "full"): 1e-6,
}

# (IA)³ for GPT-2 (Liu et al., 2022): rescale the attention outputs (c_attn
# holds q, k and v) and the feed-forward activation, which is the *input* of
# mlp.c_proj — hence that module is also the feed-forward one. mlp.c_fc's
# output is the same activation before GELU and attn.c_proj's output is the
# residual stream, so neither is rescaled. Other architectures use peft's own
# table.
IA3_MODULES: dict[str, tuple[list[str], list[str]]] = {
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}
# The name of the reward head in transformers' *ForSequenceClassification
# models built on a causal LM; it is new and must be trained and saved.
REWARD_HEAD = "score"


# --- the spec -----------------------------------------------------------------


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _require(name: str, ok: bool, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}; got {value!r}")


_DEFAULT = setting_defaults()


@dataclass
class RunSpec:
    """Everything a run process needs: the run's identity and files, and its settings.

    The user-facing settings (training.run_settings.RUN_SETTINGS) take their
    defaults and rules from there; the rest (files, paths, the attempt) are
    written by the service that makes the spec.
    """

    run_id: int
    kind: str  # "reward" | "dpo" | "sft" | "rl"
    base_model: str  # local path or hub id: the SFT policy for DPO and RL, the base of SFT and reward models
    train_file: str  # JSONL: prompt, chosen, rejected[, margin]
    test_file: str | None
    output_dir: str
    peft: str = "lora"  # "lora" | "ia3" | "full"
    lora_r: int = _DEFAULT["lora_r"]
    lora_alpha: int = _DEFAULT["lora_alpha"]
    lora_dropout: float = _DEFAULT["lora_dropout"]
    learning_rate: float = 5e-5  # no default of its own: LEARNING_RATES per kind and PEFT (with_defaults)
    num_train_epochs: float = _DEFAULT["num_train_epochs"]
    max_steps: int = _DEFAULT["max_steps"]
    per_device_train_batch_size: int = _DEFAULT["per_device_train_batch_size"]
    gradient_accumulation_steps: int = _DEFAULT["gradient_accumulation_steps"]
    max_length: int = _DEFAULT["max_length"]
    beta: float = _DEFAULT["beta"]  # DPO; RL: the KL penalty to the reference policy
    # DPO: weight of a negative log-likelihood term on the chosen completions
    # (TRL's loss_type "sft", the RPO paper's alpha); it keeps the policy near
    # what people preferred while the DPO term moves it. 0: plain DPO.
    sft_weight: float = _DEFAULT["sft_weight"]
    center_rewards_coefficient: float | None = _DEFAULT["center_rewards_coefficient"]  # reward
    use_margin: bool = _DEFAULT["use_margin"]  # reward: use the margin column when present
    seed: int = _DEFAULT["seed"]
    logging_steps: int = _DEFAULT["logging_steps"]
    save_steps: int = _DEFAULT["save_steps"]
    trainer: str = "trl"  # "trl" | "grouped"
    grouped_test_file: str | None = None  # rows: prompt, completions, ranks → per-prompt Kendall tau
    # trainer "grouped": its training rows (prompt, completions, ranks[, likert]);
    # per_device_train_batch_size then counts groups, not pairs.
    grouped_train_file: str | None = None
    grouped_margin: str = "none"  # reward runs with use_margin: "none" | "rank_gap" | "likert_gap"
    grouped_tie_loss: bool = _DEFAULT["grouped_tie_loss"]  # tied completions pull together, not no pair
    grouped_packing: bool = _DEFAULT["grouped_packing"]  # one packed row per group, shared prefix once
    # Optional additions.
    per_device_eval_batch_size: int = _DEFAULT["per_device_eval_batch_size"]
    gradient_checkpointing: bool = _DEFAULT["gradient_checkpointing"]  # TRL's default: less memory
    disable_dropout: bool = _DEFAULT["disable_dropout"]  # TRL's default: pairs' sides agree
    lora_target_modules: list[str] | None = _DEFAULT["lora_target_modules"]  # None: all linear layers
    # "4bit": QLoRA, the base weights in 4-bit NF4 (bitsandbytes; GPU workers and LoRA only).
    quantization: str = _DEFAULT["quantization"]
    # SFT: the build's prompt-completion rows (sft/train.jsonl, sft/test.jsonl).
    sft_train_file: str | None = None
    sft_test_file: str | None = None
    # RL: the trained reward model (its final folder) the policy is optimised against.
    reward_model_path: str | None = None
    rl_num_generations: int = _DEFAULT["rl_num_generations"]  # the leave-one-out group per prompt
    rl_temperature: float = _DEFAULT["rl_temperature"]
    rl_max_completion_length: int = _DEFAULT["rl_max_completion_length"]
    rl_watch_steps: int = _DEFAULT["rl_watch_steps"]  # the over-optimisation watch's period
    rl_watch_prompts: int = _DEFAULT["rl_watch_prompts"]  # held-out prompts in its fixed sample
    true_scorer: str = _DEFAULT["true_scorer"]  # training.rl.TRUE_SCORERS, or "" for none
    # Which claim of the run this process serves; every write it makes is fenced by it.
    attempt: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose value cannot run."""
        _require_choice("kind", self.kind, KINDS)
        _require_choice("peft", self.peft, PEFT_METHODS)
        if self.trainer in PLANNED_TRAINERS:
            raise ValueError(f"trainer {self.trainer!r} is not available in this runner yet; use 'trl'")
        _require_choice("trainer", self.trainer, TRAINERS)
        if self.trainer == "grouped" and self.kind in ("reward", "dpo"):  # SFT and RL have one trainer each
            _require(
                "grouped_train_file",
                isinstance(self.grouped_train_file, str) and bool(self.grouped_train_file),
                "a JSONL file of grouped rows (prompt, completions, ranks) when trainer is 'grouped'",
                self.grouped_train_file,
            )
        _require_choice("grouped_margin", self.grouped_margin, GROUPED_MARGINS)
        for name in ("base_model", "train_file", "output_dir"):
            _require(
                name,
                isinstance(getattr(self, name), str) and bool(getattr(self, name)),
                "a non-empty string",
                getattr(self, name),
            )
        for setting in RUN_SETTINGS:
            problem = setting.problem(getattr(self, setting.name))
            if problem:
                raise ValueError(problem)
        # What lies between settings, and the files a kind needs.
        _require(
            "quantization",
            self.quantization == "none" or self.peft == "lora",
            "'none' unless peft is 'lora' (QLoRA trains a LoRA adapter)",
            self.quantization,
        )
        if self.kind == "sft":
            _require(
                "sft_train_file",
                isinstance(self.sft_train_file, str) and bool(self.sft_train_file),
                "a JSONL file of prompt-completion rows for an SFT run (the build wrote no SFT rows)",
                self.sft_train_file,
            )
        if self.kind == "rl":
            _require(
                "reward_model_path",
                isinstance(self.reward_model_path, str) and bool(self.reward_model_path),
                "the folder of a trained reward model for an RL run",
                self.reward_model_path,
            )
            # Every generation batch holds whole groups of one prompt's completions.
            completions = self.per_device_train_batch_size * self.gradient_accumulation_steps
            _require(
                "per_device_train_batch_size",
                completions % self.rl_num_generations == 0,
                f"such that batch size × gradient accumulation is a multiple of "
                f"rl_num_generations ({self.rl_num_generations}) for an RL run",
                self.per_device_train_batch_size,
            )

    @classmethod
    def defaults(cls, kind: str, peft: str = "lora") -> dict[str, Any]:
        """Hyper-parameters to start from for a kind of run and a PEFT method."""
        _require_choice("kind", kind, KINDS)
        _require_choice("peft", peft, PEFT_METHODS)
        values: dict[str, Any] = {"peft": peft, "learning_rate": LEARNING_RATES[(kind, peft)]}
        if kind == "dpo":
            values["beta"] = 0.1
        if kind == "rl":
            values["beta"] = 0.05  # RLOOConfig's default KL coefficient
        return values

    @classmethod
    def with_defaults(cls, *, kind: str, peft: str = "lora", **values: Any) -> RunSpec:
        """A spec for `kind` and `peft` whose unset hyper-parameters come from `defaults`."""
        return cls(kind=kind, **{**cls.defaults(kind, peft), **values})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            # A misspelt hyper-parameter that is silently ignored trains the wrong model.
            raise ValueError(f"unknown run spec field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as error:  # a required field is missing
            raise ValueError(f"invalid run spec: {error}") from error

    @classmethod
    def from_json(cls, path: str | Path) -> RunSpec:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a run spec is a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.output_dir) / CHECKPOINTS_DIRNAME

    @property
    def final_dir(self) -> Path:
        return Path(self.output_dir) / FINAL_DIRNAME


# --- reporting ----------------------------------------------------------------


class Reporter(Protocol):
    def started(self, *, total_steps: int) -> None: ...
    def progress(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None: ...
    def heartbeat(self) -> None: ...
    def should_stop(self) -> bool: ...
    def log(self, line: str) -> None: ...


def _json_safe(value: float) -> float | None:
    return value if math.isfinite(value) else None


class PrintReporter:
    """Reports as JSON lines on a stream (stdout): one object per event.

    Heartbeats print nothing: the lines themselves show the process is alive.
    `request_stop` (wired to SIGTERM/SIGINT by `main`) ends the run cleanly at
    the next step with a checkpoint.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.stop_requested = False

    def emit(self, event: str, **values: Any) -> None:
        print(json.dumps({"event": event, **values}, allow_nan=False), file=self.stream, flush=True)

    def started(self, *, total_steps: int) -> None:
        self.emit("started", total_steps=total_steps)

    def progress(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.emit(
            "progress",
            step=step,
            total_steps=total_steps,
            metrics={k: _json_safe(v) for k, v in metrics.items()},
        )

    def heartbeat(self) -> None:
        pass

    def should_stop(self) -> bool:
        return self.stop_requested

    def request_stop(self) -> None:
        self.stop_requested = True

    def log(self, line: str) -> None:
        self.emit("log", line=line)


@dataclass
class RunResult:
    status: str  # "succeeded" | "cancelled"
    metrics: dict[str, float]  # final evaluation metrics ({} when cancelled)
    final_dir: str  # trained weights + tokenizer ("" when cancelled: nothing final was saved)
    steps: int
    checkpoint_dir: str | None = None  # the newest checkpoint, where a cancelled run resumes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _numeric(logs: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in logs.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _agree_across_processes(flag: bool, args: TrainingArguments) -> bool:
    """Process 0's `flag` on every process, so all ranks stop at the same step or none does."""
    if args.world_size <= 1:
        return flag
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([1 if flag else 0], device=args.device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def _reporter_callback(reporter: Reporter) -> Any:
    """A TrainerCallback that feeds `reporter` and stops the run at a step end when asked."""
    from transformers import TrainerCallback

    class ReporterCallback(TrainerCallback):
        def __init__(self) -> None:
            self.stop_requested = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                reporter.started(total_steps=state.max_steps)
                reporter.heartbeat()

        def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # Micro-batches of a gradient-accumulation step: a long optimizer
            # step must not look like a dead process.
            if state.is_world_process_zero:
                reporter.heartbeat()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stop = False
            if state.is_world_process_zero:
                reporter.heartbeat()
                stop = bool(reporter.should_stop())
            if _agree_across_processes(stop, args):
                self.stop_requested = True
                control.should_training_stop = True
                control.should_save = True

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                reporter.heartbeat()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if state.is_world_process_zero and logs:
                reporter.progress(step=state.global_step, total_steps=state.max_steps, metrics=_numeric(logs))

    return ReporterCallback()


# --- data -----------------------------------------------------------------------

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
GROUPED_COLUMNS = ("prompt", "completions", "ranks")


def jsonl_read(path: str | Path, *, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of a JSONL file, each checked for the `required` keys."""
    rows = []
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from error
            missing = [key for key in required if not isinstance(row, dict) or key not in row]
            if missing:
                raise ValueError(f"{path}:{number}: missing {', '.join(missing)}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def grouped_dataset(path: str) -> Dataset:
    """Grouped rows (prompt, completions, ranks[, likert]), each with as many ranks as completions."""
    from datasets import Dataset

    rows = jsonl_read(path, required=GROUPED_COLUMNS)
    for number, row in enumerate(rows, start=1):
        completions, ranks = row["completions"], row["ranks"]
        if not (isinstance(completions, list) and isinstance(ranks, list) and len(completions) == len(ranks)):
            raise ValueError(f"{path}: row {number}: completions and ranks must be lists of the same length")
    columns = (*GROUPED_COLUMNS, "likert") if any("likert" in row for row in rows) else GROUPED_COLUMNS
    return Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])


def preference_dataset(path: str, *, with_margin: bool) -> Dataset:
    """TRL's standard (or conversational) preference rows, with the margin column only when wanted."""
    from datasets import Dataset

    rows = jsonl_read(path, required=PAIR_COLUMNS)
    # A margin on some rows only would be 0 on the others; TRL needs all or none.
    has_margin = with_margin and all(row.get("margin") is not None for row in rows)
    columns = (*PAIR_COLUMNS, "margin") if has_margin else PAIR_COLUMNS
    return Dataset.from_list([{key: row[key] for key in columns} for row in rows])


# --- models ---------------------------------------------------------------------


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).exists()


def _tokenizer_load(spec: RunSpec) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.base_model, local_files_only=_is_local(spec.base_model))
    if tokenizer.pad_token is None:
        # What TRL falls back to as well; the reward is then read before the EOS.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run_device_settings(spec: RunSpec) -> DeviceSettings:
    """What this run trains with on this process's device (`training.model_settings`); ValueError if it cannot."""
    from training.model_settings import (
        SettingsRequest,
        device_capabilities_detect,
        device_settings,
        model_config_read,
    )

    return device_settings(
        capabilities=device_capabilities_detect(),
        model_config=model_config_read(spec.base_model),
        requested=SettingsRequest(
            peft=spec.peft,
            trainer=spec.trainer,
            gradient_checkpointing=spec.gradient_checkpointing,
            lora_target_modules=spec.lora_target_modules,
            quantization=spec.quantization,
            packing=spec.grouped_packing,
        ),
    )


def _model_load(spec: RunSpec, tokenizer: PreTrainedTokenizerBase, *, reward: bool) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    # Float32 master weights, as TRL loads a model it is given by name; bf16
    # mixed precision, where the GPU has it, is the Trainer's business.
    kwargs: dict[str, Any] = {
        "dtype": torch.float32,
        "use_safetensors": True,
        "local_files_only": _is_local(spec.base_model),
    }
    settings = run_device_settings(spec)
    if settings.device == "cuda":
        kwargs["attn_implementation"] = settings.attn_implementation
    if settings.quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if settings.precision == "bf16" else torch.float32,
        )
    if reward:
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(
                spec.base_model, num_labels=1, **kwargs
            )
        if not isinstance(getattr(model, REWARD_HEAD, None), torch.nn.Module):
            raise ValueError(
                f"base_model {spec.base_model!r} has no {REWARD_HEAD!r} head; reward models need a causal LM base"
            )
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.base_model, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    if settings.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing
        )
    return model


def _peft_config(spec: RunSpec, model: PreTrainedModel, *, reward: bool) -> PeftConfig | None:
    from peft import IA3Config, LoraConfig

    task_type = "SEQ_CLS" if reward else "CAUSAL_LM"
    # The reward head starts random: without training and saving it in full
    # an adapter would score with noise.
    modules_to_save = [REWARD_HEAD] if reward else None
    # GPT-2 keeps its weights as Conv1D (in × out); peft would guess this and warn.
    fan_in_fan_out = model.config.model_type == "gpt2"
    if spec.peft == "lora":
        return LoraConfig(
            task_type=task_type,
            r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=run_device_settings(spec).lora_target_modules,
            modules_to_save=modules_to_save,
            fan_in_fan_out=fan_in_fan_out,
        )
    if spec.peft == "ia3":
        target_modules, feedforward_modules = IA3_MODULES.get(model.config.model_type, (None, None))
        return IA3Config(
            task_type=task_type,
            target_modules=target_modules,
            feedforward_modules=feedforward_modules,
            modules_to_save=modules_to_save,
            fan_in_fan_out=fan_in_fan_out,
        )
    return None


def _precision() -> dict[str, bool]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "use_cpu": not cuda,
        "bf16": cuda and torch.cuda.is_bf16_supported(),
        "fp16": False,
    }


def _common_args(spec: RunSpec) -> dict[str, Any]:
    return {
        "output_dir": str(spec.checkpoints_dir),
        "learning_rate": spec.learning_rate,
        "num_train_epochs": spec.num_train_epochs,
        "max_steps": spec.max_steps,
        "per_device_train_batch_size": spec.per_device_train_batch_size,
        "per_device_eval_batch_size": spec.per_device_eval_batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        # transformers 5 renamed gradient_checkpointing; the old name still mirrors it.
        "activation_checkpointing": spec.gradient_checkpointing,
        "max_length": spec.max_length,
        "disable_dropout": spec.disable_dropout,
        "logging_steps": spec.logging_steps,
        # The first loss arrives at once instead of after `logging_steps`.
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": spec.save_steps,
        "save_total_limit": CHECKPOINTS_KEPT,
        "eval_strategy": "no",
        "seed": spec.seed,
        "data_seed": spec.seed,
        "report_to": "none",
        # Progress goes to the reporter; PrinterCallback is removed below.
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **_precision(),
    }


def _reward_trainer(spec: RunSpec, tokenizer: PreTrainedTokenizerBase, callbacks: list[Any]) -> Trainer:
    from trl import RewardConfig, RewardTrainer

    if spec.trainer == "grouped":
        from training.grouped import GroupedRewardConfig, GroupedRewardTrainer

        args: RewardConfig = GroupedRewardConfig(
            **_common_args(spec),
            center_rewards_coefficient=spec.center_rewards_coefficient,
            margin=spec.grouped_margin if spec.use_margin else "none",
            tie_loss=spec.grouped_tie_loss,
            packing=spec.grouped_packing,
        )
        trainer_class: type[RewardTrainer] = GroupedRewardTrainer
        train_dataset = grouped_dataset(spec.grouped_train_file or "")
    else:
        args = RewardConfig(**_common_args(spec), center_rewards_coefficient=spec.center_rewards_coefficient)
        trainer_class = RewardTrainer
        train_dataset = preference_dataset(spec.train_file, with_margin=spec.use_margin)
    model = _model_load(spec, tokenizer, reward=True)
    return trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=_peft_config(spec, model, reward=True),
    )


def _dpo_trainer(spec: RunSpec, tokenizer: PreTrainedTokenizerBase, callbacks: list[Any]) -> Trainer:
    from trl import DPOConfig, DPOTrainer

    losses: dict[str, Any] = {"loss_type": ["sigmoid"]}
    if spec.sft_weight > 0:
        losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, spec.sft_weight]}
    if spec.trainer == "grouped":
        from training.grouped import GroupedDPOConfig, GroupedDPOTrainer

        args: DPOConfig = GroupedDPOConfig(
            **_common_args(spec),
            beta=spec.beta,
            **losses,
            tie_loss=spec.grouped_tie_loss,
            packing=spec.grouped_packing,
        )
        trainer_class: type[DPOTrainer] = GroupedDPOTrainer
        train_dataset = grouped_dataset(spec.grouped_train_file or "")
    else:
        args = DPOConfig(**_common_args(spec), beta=spec.beta, **losses)
        trainer_class = DPOTrainer
        train_dataset = preference_dataset(spec.train_file, with_margin=False)
    model = _model_load(spec, tokenizer, reward=False)
    peft_config = _peft_config(spec, model, reward=False)
    ref_model = None
    if peft_config is None:
        # Full fine-tuning needs its own frozen copy of the start; with an
        # adapter TRL disables it to get the reference back.
        ref_model = _model_load(spec, tokenizer, reward=False)
        ref_model.requires_grad_(False)
        ref_model.eval()
    return trainer_class(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )


def _trainer_builders() -> dict[str, Callable[[RunSpec, PreTrainedTokenizerBase, list[Any]], Trainer]]:
    """The trainer of each kind of run."""
    from training.rl import rl_trainer
    from training.sft import sft_trainer

    return {"reward": _reward_trainer, "dpo": _dpo_trainer, "sft": sft_trainer, "rl": rl_trainer}


# --- evaluation ---------------------------------------------------------------------


def _grouped_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _reward_evaluation(
    spec: RunSpec, trainer: Trainer, *, say: Callable[[str], None], heartbeat: Callable[[], None]
) -> dict[str, float]:
    """Pairwise metrics of the trained reward model on the test pairs (and grouped rows), on process 0.

    Pairs longer than `max_length` are left out, as TRL leaves them out of
    training and of its own evaluation.
    """
    from training.metrics import mean_kendall_tau_per_prompt, reward_model_metrics
    from training.prompts import reward_input_ids
    from training.scoring import reward_scores, reward_scores_from_ids

    tokenizer = trainer.processing_class
    model = trainer.model
    metrics: dict[str, float] = {}
    if spec.test_file:
        rows = jsonl_read(spec.test_file, required=PAIR_COLUMNS)
        pairs = [
            (
                row,
                reward_input_ids(tokenizer, row["prompt"], row["chosen"]),
                reward_input_ids(tokenizer, row["prompt"], row["rejected"]),
            )
            for row in rows
        ]
        kept = [p for p in pairs if len(p[1]) <= spec.max_length and len(p[2]) <= spec.max_length]
        if len(kept) < len(pairs):
            say(f"{len(pairs) - len(kept)} test pairs longer than max_length={spec.max_length} left out")
        if kept:
            scores = reward_scores_from_ids(
                model,
                [p[1] for p in kept] + [p[2] for p in kept],
                pad_token_id=tokenizer.pad_token_id,
                batch_size=spec.per_device_eval_batch_size,
                on_batch=heartbeat,
            )
            chosen, rejected = scores[: len(kept)], scores[len(kept) :]
            metrics.update(reward_model_metrics(chosen, rejected))
            metrics["test_pairs"] = float(len(kept))
            with (Path(spec.output_dir) / TEST_REWARDS_FILENAME).open("w", encoding="utf-8") as out:
                for (row, _, _), r_chosen, r_rejected in zip(kept, chosen, rejected, strict=True):
                    record = {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
                    out.write(
                        json.dumps({**record, "reward_chosen": r_chosen, "reward_rejected": r_rejected})
                        + "\n"
                    )
    if spec.grouped_test_file:
        groups = []
        for row in jsonl_read(spec.grouped_test_file, required=GROUPED_COLUMNS):
            rewards = reward_scores(
                tokenizer,
                model,
                [row["prompt"]] * len(row["completions"]),
                row["completions"],
                batch_size=spec.per_device_eval_batch_size,
                on_batch=heartbeat,
            )
            groups.append((_grouped_key(row["prompt"]), rewards, row["ranks"]))
        tau = mean_kendall_tau_per_prompt(groups)
        if not math.isnan(tau):
            metrics["kendall_tau"] = tau
    return metrics


def _check_adapter_has_head(final_dir: Path) -> None:
    from safetensors import safe_open

    weights = final_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"the adapter was not saved as safetensors in {final_dir}")
    with safe_open(str(weights), framework="pt") as saved:
        if not any(f"{REWARD_HEAD}." in key for key in saved.keys()):  # noqa: SIM118 (safe_open has no __iter__)
            raise RuntimeError(f"the saved adapter in {final_dir} lacks the trained {REWARD_HEAD!r} head")


# --- checkpoints ---------------------------------------------------------------------------


def checkpoint_is_complete(folder: Path) -> bool:
    """Marked complete before its rename; or written in place by an earlier version, whose Trainer
    wrote `trainer_state.json` last (so a run in flight across an upgrade keeps its checkpoints)."""
    if not folder.is_dir():
        return False
    if (folder / CHECKPOINT_COMPLETE_FILENAME).is_file():
        return True
    return (folder / "trainer_state.json").is_file()


def checkpoint_newest_complete(checkpoints_dir: Path) -> Path | None:
    """The complete `checkpoint-N` with the largest N, or None.

    Unlike transformers' `get_last_checkpoint`, a folder left half-written
    (its writer killed) is passed over, so the run resumes from the one before.
    """
    if not checkpoints_dir.is_dir():
        return None
    steps = {
        int(match.group(1)): entry
        for entry in checkpoints_dir.iterdir()
        if (match := CHECKPOINT_NAME.match(entry.name)) and checkpoint_is_complete(entry)
    }
    return steps[max(steps)] if steps else None


def checkpoints_tidy(checkpoints_dir: Path) -> list[str]:
    """Remove what killed writers left (the staging folder, incomplete `checkpoint-N`); their names.

    Called by the one process that owns the run before it trains, so nothing
    else is writing there; transformers' rotation would otherwise count the
    leftovers among the checkpoints it keeps.
    """
    if not checkpoints_dir.is_dir():
        return []
    removed = []
    for entry in sorted(checkpoints_dir.iterdir()):
        leftover = entry.name == CHECKPOINT_STAGING_DIRNAME or (
            CHECKPOINT_NAME.match(entry.name) is not None and not checkpoint_is_complete(entry)
        )
        if leftover and entry.is_dir():
            shutil.rmtree(entry)
            removed.append(entry.name)
    return removed


def _checkpoints_renamed_into_place(trainer: Trainer, checkpoints_dir: Path) -> None:
    """Make `trainer` write each checkpoint under the staging folder and rename it into place when complete.

    The Trainer writes a checkpoint file by file (weights, optimizer,
    scheduler, RNG states, trainer state) into `checkpoint-N`; a process
    killed halfway left a folder that resuming would pick. Here every process
    writes into `.incomplete/checkpoint-N` (the Trainer's own `_save_checkpoint`,
    pointed there through `_get_output_dir`); once all processes are done,
    the main one marks it complete, renames it to `checkpoint-N` and rotates
    the kept checkpoints.
    """
    from transformers.trainer_utils import rotate_checkpoints

    staging = checkpoints_dir / CHECKPOINT_STAGING_DIRNAME
    save_checkpoint = trainer._save_checkpoint

    def save_then_rename(model: Any, trial: Any) -> None:
        name = f"checkpoint-{trainer.state.global_step}"
        trainer._get_output_dir = lambda trial=None: str(staging)  # type: ignore[method-assign]
        try:
            save_checkpoint(model, trial)
        finally:
            del trainer._get_output_dir  # the class's own method again
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            written = staging / name
            marker = {"step": trainer.state.global_step, "files": sorted(p.name for p in written.iterdir())}
            (written / CHECKPOINT_COMPLETE_FILENAME).write_text(json.dumps(marker) + "\n")
            target = checkpoints_dir / name
            if target.exists():  # the same step saved again after a resume
                shutil.rmtree(target)
            os.replace(written, target)
            staging.rmdir()
            rotate_checkpoints(
                output_dir=str(checkpoints_dir),
                save_total_limit=trainer.args.save_total_limit,
                best_model_checkpoint=trainer.state.best_model_checkpoint,
            )
        trainer.accelerator.wait_for_everyone()

    trainer._save_checkpoint = save_then_rename  # type: ignore[method-assign]


# --- the run -----------------------------------------------------------------------------


def run_training(spec: RunSpec, reporter: Reporter) -> RunResult:
    """Train `spec`'s model with TRL, reporting to `reporter`; resume from the newest checkpoint if any.

    1. Validate the spec, load tokenizer, model(s) and data; build TRL's
       RewardTrainer or DPOTrainer (or their grouped subclasses on the
       grouped file) with a callback that reports, heartbeats and stops at a
       step end (saving a checkpoint) when asked to.
    2. Resume from the complete `output_dir/checkpoints/checkpoint-N` with
       the largest N (what killed writers left is removed first). Checkpoints
       are renamed into place once complete.
    3. Train. A stop request before the last step ends the run "cancelled".
    4. Save the final weights (adapter only with PEFT) and tokenizer to
       `output_dir/final`, evaluate on the test file, then write
       `rankwise_run.json` there last, so its presence marks a finished run.
    """
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback

    spec.validate()
    set_seed(spec.seed)
    tokenizer = _tokenizer_load(spec)
    callback = _reporter_callback(reporter)
    trainer = _trainer_builders()[spec.kind](spec, tokenizer, [callback])
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts to stdout
    _checkpoints_renamed_into_place(trainer, spec.checkpoints_dir)
    is_main = trainer.is_world_process_zero()

    def say(line: str) -> None:
        if is_main:
            reporter.log(line)

    watch = None
    if spec.kind == "rl":
        from training.rl import watch_attach

        watch = watch_attach(spec, trainer, reporter, say)

    resume_checkpoint = checkpoint_newest_complete(spec.checkpoints_dir)
    resume_from = str(resume_checkpoint) if resume_checkpoint else None
    if is_main:
        for name in checkpoints_tidy(spec.checkpoints_dir):
            say(f"removed {name}: an incomplete checkpoint left by a process killed while writing it")
    if resume_from:
        say(f"resuming from checkpoint {Path(resume_from).name} in {spec.checkpoints_dir}")
    say(f"training {spec.kind} model ({spec.peft}) from {spec.base_model}")
    settings = run_device_settings(spec)
    say("device settings: " + json.dumps(settings.to_dict(), sort_keys=True))
    if is_main:
        spec.checkpoints_dir.parent.mkdir(parents=True, exist_ok=True)
        (Path(spec.output_dir) / DEVICE_SETTINGS_FILENAME).write_text(
            json.dumps(settings.to_dict(), indent=2, sort_keys=True) + "\n"
        )
    output = trainer.train(resume_from_checkpoint=resume_from)
    steps = trainer.state.global_step
    newest_after = checkpoint_newest_complete(spec.checkpoints_dir)
    newest = str(newest_after) if newest_after else None

    if callback.stop_requested and steps < trainer.state.max_steps:
        say(f"cancelled at step {steps} of {trainer.state.max_steps}; checkpoint {newest}")
        return RunResult(status="cancelled", metrics={}, final_dir="", steps=steps, checkpoint_dir=newest)

    final_dir = spec.final_dir
    if is_main and final_dir.exists():
        shutil.rmtree(final_dir)  # a finished run from before would leave stale files next to the new ones
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(final_dir))
    if is_main:
        # The Trainer pickles its arguments next to the weights; nothing reads
        # them, and a final folder holds no pickles (rankwise_run.json says
        # how the run was made).
        (final_dir / TRAINING_ARGS_FILENAME).unlink(missing_ok=True)
        if spec.kind == "reward" and spec.peft != "full":
            _check_adapter_has_head(final_dir)
        reporter.heartbeat()

    metrics: dict[str, float] = {"train_loss": float(output.training_loss)}
    if spec.kind == "sft":
        from training.sft import sft_evaluation

        metrics.update(sft_evaluation(spec, trainer))
    if spec.test_file and spec.kind in ("reward", "dpo"):
        # Every process takes part: evaluate() gathers across them. Grouped
        # trainers read the test pairs as groups of two, so eval_loss is TRL's
        # loss on the same pairs whichever trainer ran.
        evaluated = trainer.evaluate(
            eval_dataset=preference_dataset(
                spec.test_file, with_margin=spec.use_margin and spec.kind == "reward"
            )
        )
        metrics["eval_loss"] = float(evaluated["eval_loss"])
        if spec.kind == "dpo":
            # TRL's implicit reward β·log(π/π_ref), chosen vs rejected, averaged per eval batch.
            metrics["reward_accuracy"] = float(evaluated["eval_rewards/accuracies"])
            metrics["reward_margin"] = float(evaluated["eval_rewards/margins"])
    if is_main and watch is not None:
        from training.rl import rl_final_metrics

        metrics.update(rl_final_metrics(watch, step=steps))
    if is_main and spec.kind == "reward":
        # Scored on one process with the whole model: fine for DDP, not for
        # weights sharded by FSDP or ZeRO-3.
        metrics.update(_reward_evaluation(spec, trainer, say=say, heartbeat=reporter.heartbeat))
    if is_main:
        info = {
            "run_id": spec.run_id,
            "kind": spec.kind,
            "base_model": spec.base_model,
            "peft": spec.peft,
            "trainer": spec.trainer if spec.kind in ("reward", "dpo") else "trl",
            "steps": steps,
            "metrics": {k: _json_safe(v) for k, v in metrics.items()},
            "device_settings": settings.to_dict(),
        }
        (final_dir / RUN_INFO_FILENAME).write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")
        reporter.heartbeat()
        say(f"saved {final_dir}")
    trainer.accelerator.wait_for_everyone()
    return RunResult(
        status="succeeded", metrics=metrics, final_dir=str(final_dir), steps=steps, checkpoint_dir=newest
    )


# --- the command line -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m training.runner SPEC.json`: run it, printing JSON lines (see PrintReporter)."""
    parser = argparse.ArgumentParser(prog="python -m training.runner", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="path of a RunSpec JSON file")
    options = parser.parse_args(argv)
    try:
        spec = RunSpec.from_json(options.spec)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    reporter = PrintReporter()

    def stop_at_next_step(signum: int, frame: Any) -> None:
        # A run told to stop by a signal (a worker shutting down, Ctrl-C) ends at the next step with
        # a checkpoint to resume from; a second signal acts as usual.
        reporter.request_stop()
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_at_next_step)
    result = run_training(spec, reporter)

    from accelerate import PartialState

    if PartialState().is_main_process:
        reporter.emit(
            "result", **{**result.to_dict(), "metrics": {k: _json_safe(v) for k, v in result.metrics.items()}}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
