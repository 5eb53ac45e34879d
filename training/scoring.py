"""Reading rewards from a reward model saved by `training.runner`.

The score must be read exactly where TRL's RewardTrainer (1.16) trained it, or
a model that learned the task would look random. RewardTrainer:

1. standard rows: appends `tokenizer.eos_token` to the completion unless it
   already ends with it, then tokenizes the plain concatenation
   `prompt + completion` (no separator) with `tokenizer(text=...)`, so the
   tokenizer's own special tokens (a BOS, for Llama-style tokenizers) are
   added as usual;
2. conversational rows (lists of messages): renders `prompt + completion`
   with `tokenizer.apply_chat_template(..., tokenize=True)`, no generation
   prompt, and adds no EOS (the template ends the turn);
3. drops pairs longer than `max_length` tokens (it never truncates);
4. pads on the right with `tokenizer.pad_token_id` (the EOS when there is no
   pad token), with an attention mask of ones over the real tokens, and sets
   `model.config.pad_token_id` to that id;
5. the sequence-classification model reads its one logit at the rightmost
   token that is not the pad id — the appended EOS, or, when pad and EOS are
   the same token, the token just before it.

`reward_input_ids` is steps 1–2 and `reward_scores_from_ids` steps 4–5, so
the same model config picks the same token here as in training.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.prompts import reward_input_ids as reward_input_ids

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RUN_INFO_FILENAME = "rankwise_run.json"
ADAPTER_CONFIG_FILENAME = "adapter_config.json"
ADAPTER_WEIGHTS_FILENAME = "adapter_model.safetensors"

Text = str | list[dict[str, Any]]

# Completions scored and written together (one transaction, one progress step).
COMPLETIONS_PER_BATCH = 64
# Sequences in one forward pass of the reward model.
SCORE_BATCH_SIZE = 16


@dataclass(frozen=True)
class ScoringSpec:
    """Everything a scoring job's process needs (`training.scoring_process`), written by the task as JSON."""

    job_id: int
    attempt: int
    project_id: int
    # The label the scores are stored under (annotation.CompletionScore.scorer).
    scorer: str
    reward_model_path: str
    # How the reward model's dataset build wrote rows: chat messages, or standard strings.
    conversational: bool
    # Tokens per prompt and completion the reward model was trained on (None: the model's own limit).
    max_length: int | None = None
    completions_per_batch: int = COMPLETIONS_PER_BATCH
    batch_size: int = SCORE_BATCH_SIZE

    def __post_init__(self) -> None:
        if not self.scorer:
            raise ValueError("a scoring job needs a scorer label")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        if self.completions_per_batch < 1 or self.batch_size < 1:
            raise ValueError("batch sizes must be at least 1")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ScoringSpec:
        return cls(**json.loads(Path(path).read_text()))


def reward_scores_from_ids(
    model: PreTrainedModel | PeftModel,
    sequences: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    on_batch: Callable[[], None] | None = None,
) -> list[float]:
    """The model's reward for each token sequence, padded on the right as in training.

    `on_batch` is called after each batch (a long scoring pass can heartbeat).
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if any(len(ids) == 0 for ids in sequences):
        raise ValueError("cannot score an empty sequence")
    device = next(model.parameters()).device
    # Longest first, so a batch holds sequences of similar length and the
    # first batch shows at once whether the longest ones fit in memory.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    scores: list[float] = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(sequences[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = sequences[i]
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
            with torch.no_grad():
                logits = model(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
                ).logits
            for row, value in enumerate(logits.squeeze(-1).float().cpu().tolist()):
                scores[batch[row]] = float(value)
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    return scores


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    return pad_token_id


def reward_scores(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel | PeftModel,
    prompts: Sequence[Text],
    completions: Sequence[Text],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> list[float]:
    """The reward of each (prompt, completion), read at the token TRL's RewardTrainer trains.

    Prompts and completions are strings, or lists of chat messages for
    conversational data. TRL drops over-long pairs instead of truncating; a
    scorer must answer for every completion, so with `max_length` a longer
    sequence keeps its last `max_length` tokens (the end, where the reward is
    read, survives).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    sequences = [reward_input_ids(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    if max_length is not None:
        sequences = [ids[-max_length:] for ids in sequences]
    return reward_scores_from_ids(
        model, sequences, pad_token_id=_pad_token_id(tokenizer), batch_size=batch_size, on_batch=on_batch
    )


def run_info_read(path: str | Path) -> dict[str, Any]:
    """The `rankwise_run.json` the runner writes next to final weights, or {} when absent."""
    info_file = Path(path) / RUN_INFO_FILENAME
    return json.loads(info_file.read_text()) if info_file.is_file() else {}


def reward_model_load(
    path: str, *, dtype: str = "float32"
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel | PeftModel]:
    """(tokenizer, model) for a reward model saved by the runner, in eval mode, weights from safetensors only.

    `path` holds either a full sequence-classification model or a PEFT
    adapter (with its trained score head) whose base is named in
    `rankwise_run.json` or, failing that, in `adapter_config.json`.
    Float32 by default, the precision TRL keeps its master weights in.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no saved reward model at {folder}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    if (folder / ADAPTER_CONFIG_FILENAME).is_file():
        if not (folder / ADAPTER_WEIGHTS_FILENAME).is_file():
            raise FileNotFoundError(f"{folder} has an adapter config but no {ADAPTER_WEIGHTS_FILENAME}")
        base_model = (
            run_info_read(folder).get("base_model")
            or PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
        )
        # The base's score head is new (random) here; the adapter's saved copy replaces it.
        with suppress_seqcls_warning():
            base = AutoModelForSequenceClassification.from_pretrained(
                base_model,
                num_labels=1,
                dtype=dtype,
                use_safetensors=True,
                local_files_only=Path(base_model).exists(),
            )
        base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=dtype, use_safetensors=True, local_files_only=True
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return tokenizer, model
