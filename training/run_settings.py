"""A training run's settings, each defined once: name, type, bounds, default, words, the kinds that read it.

The run form (training.forms.TrainingRunForm), the API's request serializer
(training.api) and the run process's own check (training.runner.RunSpec.validate)
are derived from `RUN_SETTINGS`; none of them writes a bound of its own. What
lies between settings (the RL batch holding whole groups, QLoRA needing LoRA,
the files a kind needs) is RunSpec.validate's, by hand, once.

Nothing here imports Django: the run process reads it. The form's labels and
help texts are marked with `gettext_noop` so the catalog holds them; the form
translates them when it shows them.

Settings the form does not show (`on_form=False`) are for programs: the API's
`hyperparameters` and the run spec take them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from training.rl import TRUE_SCORERS

KINDS = ("reward", "dpo", "sft", "rl")
PEFT_METHODS = ("lora", "ia3", "full")
TRAINERS = ("trl", "grouped")
QUANTIZATIONS = ("none", "4bit")


def gettext_noop(message: str) -> str:
    """Marks a string for the translation catalog (makemessages reads this name); returns it as it is."""
    return message


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class RunSetting:
    """One setting of a run, and the rule its value must follow.

    `default` is the run spec's; None where the run spec has no value of its
    own for it (a learning rate per kind and PEFT method, RunSpec.defaults)
    or where None is a value (`nullable`). Bounds are inclusive (`minimum`,
    `maximum`) or strict (`above`, `below`); `also` lists values allowed
    besides them (max_steps' -1).
    """

    name: str
    type: type
    default: Any
    label: str = ""
    help: str = ""
    kinds: tuple[str, ...] = KINDS
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    also: tuple[Any, ...] = ()
    choices: tuple[str, ...] = ()
    nullable: bool = False
    on_form: bool = True
    items: type | None = None  # the type of a list's items

    @property
    def every_kind(self) -> bool:
        return set(self.kinds) == set(KINDS)

    @property
    def strict(self) -> bool:
        """Whether the rule goes beyond inclusive bounds (a form or serializer field's own min and max)."""
        return self.above is not None or self.below is not None or bool(self.also)

    def rule(self) -> str:
        """What a good value is, as the messages word it: 'positive', 'at least 1', '-1 or at least 1'."""
        if self.choices:
            rule = f"one of {', '.join(map(repr, self.choices))}"
        elif self.type is list:
            rule = f"a list of {_TYPE_WORDS[self.items or str]}"
        else:
            parts = []
            if self.above == 0 and self.minimum is None:
                parts.append("positive")
            elif self.above is not None:
                parts.append(f"above {_number(self.above)}")
            elif self.minimum is not None:
                parts.append(f"at least {_number(self.minimum)}")
            if self.maximum is not None:
                parts.append(f"at most {_number(self.maximum)}")
            elif self.below is not None:
                parts.append(f"below {_number(self.below)}")
            rule = " and ".join(parts) or _TYPE_WORDS[self.type]
        if self.also:
            rule = f"{' or '.join(map(repr, self.also))} or {rule}"
        if self.nullable:
            rule = f"null or {rule}"
        return rule

    def problem(self, value: Any) -> str | None:
        """None for a good value; else the message, naming the setting: 'lora_r must be at least 1; got 0'."""
        return None if self._allows(value) else f"{self.name} must be {self.rule()}; got {value!r}"

    def _allows(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if value in self.also and not isinstance(value, bool):
            return True
        if not _is_a(value, self.type):
            return False
        if self.type is list:
            return all(_is_a(item, self.items or str) for item in value)
        if self.choices:
            return value in self.choices
        if self.type in (int, float):
            if isinstance(value, float) and not math.isfinite(value):
                return False
            return not (
                (self.minimum is not None and value < self.minimum)
                or (self.maximum is not None and value > self.maximum)
                or (self.above is not None and value <= self.above)
                or (self.below is not None and value >= self.below)
            )
        return True


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _is_a(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


REWARD, DPO, SFT, RL = KINDS

RUN_SETTINGS: tuple[RunSetting, ...] = (
    RunSetting(
        "learning_rate",
        float,
        None,
        gettext_noop("Learning rate"),
        gettext_noop("Blank: the default for the kind and PEFT method."),
        above=0,
    ),
    RunSetting("num_train_epochs", float, 1.0, gettext_noop("Epochs"), above=0),
    RunSetting(
        "max_steps",
        int,
        -1,
        gettext_noop("Steps at most"),
        gettext_noop("-1: as many as the epochs take."),
        minimum=1,
        also=(-1,),
    ),
    RunSetting("per_device_train_batch_size", int, 8, gettext_noop("Batch size per GPU"), minimum=1),
    RunSetting("gradient_accumulation_steps", int, 1, gettext_noop("Gradient accumulation steps"), minimum=1),
    RunSetting(
        "max_length",
        int,
        512,
        gettext_noop("Length at most (tokens)"),
        gettext_noop("Tokens per prompt and completion."),
        minimum=8,
    ),
    RunSetting(
        "beta",
        float,
        0.1,
        gettext_noop("Beta"),
        gettext_noop(
            "DPO and RL: how far the policy may move from where it starts (RL: the KL penalty, e.g. 0.05)."
        ),
        kinds=(DPO, RL),
        above=0,
    ),
    RunSetting(
        "center_rewards_coefficient",
        float,
        None,
        gettext_noop("Reward centring"),
        gettext_noop("Reward only: pulls rewards towards zero mean (e.g. 0.01)."),
        kinds=(REWARD,),
        minimum=0,
        nullable=True,
    ),
    RunSetting("lora_r", int, 16, gettext_noop("LoRA rank"), minimum=1),
    RunSetting("lora_alpha", int, 32, gettext_noop("LoRA alpha"), minimum=1),
    RunSetting("lora_dropout", float, 0.05, gettext_noop("LoRA dropout"), minimum=0, below=1),
    RunSetting("seed", int, 0, gettext_noop("Seed"), minimum=0),
    RunSetting("logging_steps", int, 10, gettext_noop("Log every (steps)"), minimum=1),
    RunSetting("save_steps", int, 100, gettext_noop("Checkpoint every (steps)"), minimum=1),
    # --- RL runs (training.rl) ---
    RunSetting(
        "rl_num_generations",
        int,
        4,
        gettext_noop("Samples per prompt"),
        gettext_noop(
            "RL only: completions sampled per prompt; each is compared with the mean of the others."
        ),
        kinds=(RL,),
        minimum=2,
        maximum=64,
    ),
    RunSetting(
        "rl_temperature",
        float,
        1.0,
        gettext_noop("Sampling temperature"),
        gettext_noop("RL only: temperature of the sampled completions."),
        kinds=(RL,),
        above=0,
        maximum=10,
    ),
    RunSetting(
        "rl_max_completion_length",
        int,
        64,
        gettext_noop("Max completion length"),
        gettext_noop("RL only: tokens per sampled completion."),
        kinds=(RL,),
        minimum=1,
        maximum=8192,
    ),
    RunSetting(
        "rl_watch_steps",
        int,
        10,
        gettext_noop("Watch every (steps)"),
        gettext_noop("RL only: how often held-out prompts are scored for proxy reward against KL."),
        kinds=(RL,),
        minimum=1,
    ),
    RunSetting(
        "rl_watch_prompts",
        int,
        16,
        gettext_noop("Watched prompts"),
        gettext_noop("RL only: held-out prompts in the watch's fixed sample."),
        kinds=(RL,),
        minimum=1,
        maximum=1000,
    ),
    RunSetting(
        "true_scorer",
        str,
        "",
        gettext_noop("True scorer"),
        gettext_noop(
            "RL only, optional: a known truth that scores the watched samples too (the demo's answers)."
        ),
        kinds=(RL,),
        choices=("", *sorted(TRUE_SCORERS)),
    ),
    # --- for programs: the API's hyperparameters and the run spec, not the form ---
    RunSetting(
        "sft_weight",
        float,
        0.0,
        help="DPO: weight of a negative log-likelihood term on the chosen completions (0: plain DPO).",
        kinds=(DPO,),
        minimum=0,
        on_form=False,
    ),
    RunSetting(
        "use_margin",
        bool,
        True,
        help="Reward: use the build's margin column when it has one.",
        kinds=(REWARD,),
        on_form=False,
    ),
    RunSetting(
        "grouped_tie_loss",
        bool,
        False,
        help="Grouped trainer: tied completions pull together instead of giving no pair.",
        kinds=(REWARD, DPO),
        on_form=False,
    ),
    RunSetting(
        "grouped_packing",
        bool,
        True,
        help="Grouped trainer: one packed row per group, its shared prefix forwarded once.",
        kinds=(REWARD, DPO),
        on_form=False,
    ),
    RunSetting(
        "per_device_eval_batch_size", int, 8, help="Evaluation batch size per GPU.", minimum=1, on_form=False
    ),
    RunSetting(
        "gradient_checkpointing",
        bool,
        True,
        help="Recompute activations in the backward pass: less memory for about 20% more compute.",
        on_form=False,
    ),
    RunSetting(
        "disable_dropout",
        bool,
        True,
        help="Turn the model's dropout off (TRL's default): dropout makes the two sides of a pair disagree.",
        on_form=False,
    ),
    RunSetting(
        "lora_target_modules",
        list,
        None,
        help="LoRA: the modules to adapt; null for the architecture's linear layers.",
        nullable=True,
        items=str,
        on_form=False,
    ),
    RunSetting(
        "quantization",
        str,
        "none",
        help="'4bit': QLoRA, the base weights in 4-bit NF4 (LoRA on GPU workers only).",
        choices=QUANTIZATIONS,
        on_form=False,
    ),
)

RUN_SETTINGS_BY_NAME: dict[str, RunSetting] = {setting.name: setting for setting in RUN_SETTINGS}
FORM_SETTINGS: tuple[RunSetting, ...] = tuple(setting for setting in RUN_SETTINGS if setting.on_form)


def run_settings_problems(values: dict[str, Any]) -> dict[str, str]:
    """Setting name → what is wrong, for each bad value in `values`; unknown names are problems too."""
    problems = {}
    for name, value in values.items():
        setting = RUN_SETTINGS_BY_NAME.get(name)
        if setting is None:
            problems[name] = f"{name} is not a run setting; known: {', '.join(RUN_SETTINGS_BY_NAME)}"
        elif problem := setting.problem(value):
            problems[name] = problem
    return problems


def run_settings_for_kind(values: dict[str, Any], kind: str) -> dict[str, Any]:
    """The values the runs of `kind` read: a kind's own knobs only, the others left out."""
    return {
        name: value
        for name, value in values.items()
        if name not in RUN_SETTINGS_BY_NAME or kind in RUN_SETTINGS_BY_NAME[name].kinds
    }


def setting_defaults() -> dict[str, Any]:
    """Each setting's run-spec default (RunSpec's field defaults come from here)."""
    return {setting.name: setting.default for setting in RUN_SETTINGS}
