"""Supervised fine-tuning runs: TRL's SFTTrainer on a dataset build's `sft/` rows.

The first step of the InstructGPT recipe. A build writes one SFT row per
prompt (or per judgment): the top-ranked completion, and a prompt's reference
answer where its metadata carries one (`training.builds`). The rows are TRL's
prompt-completion format, so the loss is taken on the completion only, and
TRL appends the EOS token the policy must learn to stop with.

Nothing here imports Django; `training.runner.run_training` builds the
trainer through `sft_trainer` and runs it with the lifecycle every kind
shares (progress, stop at a step end, checkpoints renamed into place, the
final folder that registers a Policy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase, Trainer

    from training.runner import RunSpec

SFT_COLUMNS = ("prompt", "completion")


def sft_dataset(path: str) -> Dataset:
    """TRL's prompt-completion rows (strings, or lists of chat messages) of an `sft/` file."""
    from datasets import Dataset

    from training.runner import jsonl_read

    rows = jsonl_read(path, required=SFT_COLUMNS)
    return Dataset.from_list([{key: row[key] for key in SFT_COLUMNS} for row in rows])


def sft_trainer(spec: RunSpec, tokenizer: PreTrainedTokenizerBase, callbacks: list[Any]) -> Trainer:
    """TRL's SFTTrainer for `spec` on its `sft_train_file`, with the run's PEFT method."""
    from trl import SFTConfig, SFTTrainer

    from training.runner import _common_args, _model_load, _peft_config

    # SFTConfig has no disable_dropout: dropout is a regulariser that SFT
    # wants, unlike the paired losses where it makes two sides disagree.
    common = {key: value for key, value in _common_args(spec).items() if key != "disable_dropout"}
    args = SFTConfig(**common, completion_only_loss=True, packing=False)
    model = _model_load(spec, tokenizer, reward=False)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(spec.sft_train_file or ""),
        # Given here so that TRL tokenizes it as it does the training rows.
        eval_dataset=sft_dataset(spec.sft_test_file) if spec.sft_test_file else None,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=_peft_config(spec, model, reward=False),
    )


def sft_evaluation(spec: RunSpec, trainer: Trainer) -> dict[str, float]:
    """The SFT loss (and its perplexity) on the build's held-out SFT rows, when there are any."""
    import math

    if not spec.sft_test_file:
        return {}
    evaluated = trainer.evaluate()
    loss = float(evaluated["eval_loss"])
    metrics = {"eval_loss": loss}
    if math.isfinite(loss) and loss < 50:
        metrics["eval_perplexity"] = math.exp(loss)
    if "eval_mean_token_accuracy" in evaluated:
        metrics["eval_token_accuracy"] = float(evaluated["eval_mean_token_accuracy"])
    return metrics
