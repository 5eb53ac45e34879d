"""Online RL runs: the policy samples completions and is optimised against a trained reward model.

The third step of the InstructGPT recipe: maximise r(x, y) − β·KL(π ‖ π_ref)
over the build's training prompts, where r is a RewardModel this app trained
and π_ref the policy the run starts from.

Why RLOOTrainer and not GRPOTrainer (TRL 1.16)
    Both sample `rl_num_generations` completions per prompt and need no value
    model. RLOO is the objective above as written: its KL term is a penalty
    on the reward (sequence-level log-ratio to the reference, β defaults to
    0.05), and each completion's baseline is the mean reward of its siblings
    (leave-one-out), so an advantage keeps the reward model's scale. GRPO
    adds KL as a separate loss term that is off by default (β = 0) and
    divides advantages by the group's reward spread, which blows up tiny
    reward-model differences between near-identical samples into full-size
    updates — the over-optimisation this run is meant to watch. RLOO also
    logs the same live metrics (reward, KL, entropy, completion lengths).

The reward
    `RewardModelReward` loads the RewardModel's sequence classifier
    (`training.scoring.reward_model_load`) and scores prompt + completion
    with `training.scoring.reward_scores`: the same token ids the reward
    model was trained on (TRL's RewardTrainer rendering, EOS appended). Each
    batch also logs the score distribution (10th, 50th and 90th percentile).

Watching for reward hacking (Gao et al., 2022)
    Every `rl_watch_steps` steps, and once at the end, `OverOptimisationWatch`
    samples one completion for each prompt of a fixed held-out sample (the
    build's test prompts, `rl_watch_prompts` of them, chosen by the seed) and
    records the mean proxy reward (the reward model's score) against the
    mean KL to the reference (Σ_t log π(y_t) − log π_ref(y_t) over the
    sampled completion). Where the caller knows the truth, a *true scorer*
    scores the same completions too. The points go through the reporter like
    any logged metric (`watch/proxy_reward`, `watch/kl`, `watch/true_score`),
    so the run page can plot proxy and true score against KL.

True scorers are plug-ins
    `RunSpec.true_scorer` names an entry of `TRUE_SCORERS`: a name and the
    import path of a factory returning `(prompt, completion) -> float | None`
    (None: unknown prompt). The module is imported only when a run names it,
    so production code never imports a demo's checker, and only the listed
    entries can be named (a run spec cannot import arbitrary code).

Nothing here imports Django.
"""

from __future__ import annotations

import importlib
import math
import random
import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase, Trainer

    from training.runner import Reporter, RunSpec

Text = str | list[dict[str, str]]
TrueScorer = Callable[[Any, Any], float | None]

# name → "module:factory"; the factory takes no arguments and returns a TrueScorer.
TRUE_SCORERS: dict[str, str] = {
    "demo_arithmetic": "training.demo.truth:true_scorer",
}
WATCH_PREFIX = "watch/"
SCORE_PERCENTILES = (10, 50, 90)


def true_scorer_check(name: str) -> None:
    """Raise a ValueError unless `name` is empty or a registered true scorer."""
    if name and name not in TRUE_SCORERS:
        known = ", ".join(map(repr, sorted(TRUE_SCORERS))) or "none"
        raise ValueError(f"true_scorer must be empty or one of {known}; got {name!r}")


def true_scorer_load(name: str) -> TrueScorer | None:
    """The registered true scorer called `name` (None for an empty name)."""
    if not name:
        return None
    true_scorer_check(name)
    module_name, _, attribute = TRUE_SCORERS[name].partition(":")
    factory = getattr(importlib.import_module(module_name), attribute)
    return factory()


# --- prompts ---------------------------------------------------------------------


def _prompt_key(prompt: Text) -> str:
    import json

    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def prompts_distinct(path: str) -> list[Text]:
    """The distinct prompts of a build's pair file, in file order."""
    from training.runner import jsonl_read

    seen: dict[str, Text] = {}
    for row in jsonl_read(path, required=("prompt",)):
        seen.setdefault(_prompt_key(row["prompt"]), row["prompt"])
    return list(seen.values())


def prompts_dataset(path: str) -> Dataset:
    """The training prompts as TRL's prompt-only rows."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": prompt} for prompt in prompts_distinct(path)])


def watch_prompts(spec: RunSpec) -> tuple[list[Text], str]:
    """The fixed held-out sample the watch scores, and where it came from ("test" or "train")."""
    source, path = ("test", spec.test_file) if spec.test_file else ("train", spec.train_file)
    prompts = prompts_distinct(path)
    rng = random.Random(f"rankwise-rl-watch:{spec.seed}")  # noqa: S311 (a fixed sample, not a secret)
    if len(prompts) > spec.rl_watch_prompts:
        prompts = rng.sample(prompts, spec.rl_watch_prompts)
    return prompts, source


# --- the reward ------------------------------------------------------------------


def _percentile(values: Sequence[float], percent: int) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * percent / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class RewardModelReward:
    """A reward function for TRL's RLOOTrainer: the trained reward model's score of prompt + completion."""

    __name__ = "reward_model"

    def __init__(self, path: str, *, max_length: int, batch_size: int, on_batch: Callable[[], None]) -> None:
        from training.scoring import reward_model_load

        self.tokenizer, self.model = reward_model_load(path)
        self.model.requires_grad_(False)
        self.max_length = max_length
        self.batch_size = batch_size
        self.on_batch = on_batch

    def to(self, device: Any) -> RewardModelReward:
        self.model.to(device)
        return self

    def scores(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]:
        from training.scoring import reward_scores

        return reward_scores(
            self.tokenizer,
            self.model,
            list(prompts),
            list(completions),
            batch_size=self.batch_size,
            max_length=self.max_length,
            on_batch=self.on_batch,
        )

    def __call__(
        self,
        prompts: Sequence[Text],
        completions: Sequence[Text],
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        scores = self.scores(prompts, completions)
        if log_metric is not None and scores:
            for percent in SCORE_PERCENTILES:
                log_metric(f"reward_model/score_p{percent}", _percentile(scores, percent))
        return scores


# --- the trainer -----------------------------------------------------------------


def rl_trainer(spec: RunSpec, tokenizer: PreTrainedTokenizerBase, callbacks: list[Any]) -> Trainer:
    """TRL's RLOOTrainer for `spec`: the build's training prompts, the reward model at `reward_model_path`."""
    from trl import RLOOConfig, RLOOTrainer

    from training.runner import _common_args, _model_load, _peft_config

    # RLOO builds its own batches of prompt + sampled completion; it has no max_length.
    common = {key: value for key, value in _common_args(spec).items() if key != "max_length"}
    args = RLOOConfig(
        **common,
        beta=spec.beta,
        num_generations=spec.rl_num_generations,
        temperature=spec.rl_temperature,
        max_completion_length=spec.rl_max_completion_length,
        # The reward model's score distribution is logged by the reward itself.
        log_completions=False,
    )
    reward = RewardModelReward(
        spec.reward_model_path or "",
        max_length=spec.max_length,
        batch_size=spec.per_device_eval_batch_size,
        on_batch=lambda: None,
    )
    reward.to(args.device)
    model = _model_load(spec, tokenizer, reward=False)
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=prompts_dataset(spec.train_file),
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=_peft_config(spec, model, reward=False),
    )
    trainer.rankwise_reward = reward  # type: ignore[attr-defined]
    return trainer


# --- the over-optimisation watch -------------------------------------------------


def _completion_as(prompt: Text, text: str) -> Text:
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


class OverOptimisationWatch:
    """Proxy reward, KL to the reference and (when known) true score on a fixed held-out sample."""

    def __init__(
        self,
        spec: RunSpec,
        trainer: Trainer,
        reward: RewardModelReward,
        prompts: list[Text],
        true_scorer: TrueScorer | None,
        heartbeat: Callable[[], None],
    ) -> None:
        self.spec = spec
        self.trainer = trainer
        self.reward = reward
        self.prompts = prompts
        self.true_scorer = true_scorer
        self.heartbeat = heartbeat

    def _prompt_ids(self, prompt: Text) -> list[int]:
        tokenizer = self.trainer.processing_class
        if isinstance(prompt, str):
            return list(tokenizer(text=prompt, add_special_tokens=False)["input_ids"])
        rendered = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(rendered["input_ids"])

    def _logps(self, model: Any, ids: Any, prompt_length: int) -> Any:
        import torch

        logits = model(input_ids=ids, use_cache=False).logits[:, prompt_length - 1 : -1, :]
        logits = logits.float() / self.spec.rl_temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, prompt_length:].unsqueeze(-1)).squeeze(-1)

    def measure(self, *, step: int) -> dict[str, float]:
        """1. Sample one completion per held-out prompt from the current policy (seeded by step).
        2. KL: the completion's log-probability under the policy minus under the reference
           (the adapter disabled, or TRL's reference model for full fine-tuning).
        3. Score the completions with the reward model, and with the true scorer when there is one.
        """
        import torch

        trainer = self.trainer
        tokenizer = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        reference = getattr(trainer, "ref_model", None)
        device = next(model.parameters()).device
        eos = tokenizer.eos_token_id
        was_training = model.training
        model.eval()
        texts: list[str] = []
        lengths: list[int] = []
        kls: list[float] = []
        try:
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(self.spec.seed * 1_000_003 + step)
                for prompt in self.prompts:
                    prompt_ids = self._prompt_ids(prompt)
                    ids = torch.tensor([prompt_ids], device=device)
                    generated = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=True,
                        temperature=self.spec.rl_temperature,
                        top_k=0,
                        max_new_tokens=self.spec.rl_max_completion_length,
                        pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=eos,
                    )
                    completion = generated[0, len(prompt_ids) :].tolist()
                    if eos in completion:
                        completion = completion[: completion.index(eos) + 1]
                    texts.append(tokenizer.decode(completion, skip_special_tokens=True))
                    lengths.append(len(completion))
                    if not completion:
                        kls.append(0.0)
                        continue
                    sequence = torch.tensor([prompt_ids + completion], device=device)
                    logps = self._logps(model, sequence, len(prompt_ids))
                    if reference is not None:
                        reference_logps = self._logps(reference, sequence, len(prompt_ids))
                    elif hasattr(model, "disable_adapter"):
                        with model.disable_adapter():
                            reference_logps = self._logps(model, sequence, len(prompt_ids))
                    else:  # β = 0 and full fine-tuning: no reference was kept
                        reference_logps = logps
                    kls.append(float((logps - reference_logps).sum().item()))
                    self.heartbeat()
        finally:
            model.train(was_training)
        completions = [_completion_as(prompt, text) for prompt, text in zip(self.prompts, texts, strict=True)]
        proxy = self.reward.scores(self.prompts, completions)
        point = {
            f"{WATCH_PREFIX}proxy_reward": statistics.fmean(proxy),
            f"{WATCH_PREFIX}kl": statistics.fmean(kls),
            f"{WATCH_PREFIX}completion_length": statistics.fmean(lengths),
        }
        if self.true_scorer is not None:
            truths = [self.true_scorer(p, c) for p, c in zip(self.prompts, texts, strict=True)]
            known = [float(t) for t in truths if t is not None]
            if known:
                point[f"{WATCH_PREFIX}true_score"] = statistics.fmean(known)
        return point


def watch_callback(watch: OverOptimisationWatch, reporter: Reporter) -> Any:
    """A TrainerCallback that measures every `rl_watch_steps` steps on process 0 and reports the point."""
    from transformers import TrainerCallback

    every = watch.spec.rl_watch_steps

    class WatchCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % every or not state.is_world_process_zero:
                return
            reporter.progress(
                step=state.global_step,
                total_steps=state.max_steps,
                metrics=watch.measure(step=state.global_step),
            )

    return WatchCallback()


def watch_attach(
    spec: RunSpec, trainer: Trainer, reporter: Reporter, say: Callable[[str], None]
) -> OverOptimisationWatch:
    """Build the watch for an RL trainer from `rl_trainer` and add its callback."""
    prompts, source = watch_prompts(spec)
    true_scorer = true_scorer_load(spec.true_scorer)
    say(
        f"over-optimisation watch: {len(prompts)} {source} prompts every {spec.rl_watch_steps} steps"
        + (f", true score by {spec.true_scorer!r}" if true_scorer else "")
    )
    watch = OverOptimisationWatch(
        spec,
        trainer,
        trainer.rankwise_reward,
        prompts,
        true_scorer,
        reporter.heartbeat,  # type: ignore[attr-defined]
    )
    trainer.add_callback(watch_callback(watch, reporter))
    return watch


def rl_final_metrics(watch: OverOptimisationWatch, *, step: int) -> dict[str, float]:
    """The watch's last point, named as final metrics (proxy_reward, kl, true_score)."""
    point = watch.measure(step=step)
    return {key.removeprefix(WATCH_PREFIX): value for key, value in point.items()}
