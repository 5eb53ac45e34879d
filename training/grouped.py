"""K-wise ("grouped") trainers: TRL's reward and DPO losses at one forward per completion.

TRL's RewardTrainer and DPOTrainer see a ranking of K completions as its
C(K, 2) pairs and forward both sides of every pair, so each completion goes
through the model K − 1 times. `GroupedRewardTrainer` and `GroupedDPOTrainer`
take one row per ranking — prompt, completions, ranks (1 best, equal = tie),
the `grouped` output of a dataset build — and forward each completion once
(for DPO also once through the reference, or never when the reference
log-probs are precomputed), then form the pairs by index over the K scores.
They subclass TRL's trainers, so model loading, PEFT, dropout, logging,
callbacks, checkpoints and evaluation are TRL's own; only data preparation,
collation and the loss change.

1. Preparation, once per dataset. A group's completions are tokenized exactly
   as TRL tokenizes one side of a pair (rewards: `training.prompts.reward_input_ids`,
   prompt + completion + EOS; DPO: TRL's prompt / prompt+completion split
   with the completion starting where the two token lists diverge). TRL's
   length rules are applied per expanded pair: the reward trainer drops a pair
   with a side longer than `max_length`; the DPO trainer truncates each
   sequence (`truncation_mode`) and drops a pair whose prompt fills
   `max_length`. The pairs i ≻ j for every rank_i < rank_j are stored by
   index; equal ranks give no pair (or a tie term with `tie_loss`);
   completions left in no pair are removed. Rows of TRL's pair format
   (prompt, chosen, rejected[, margin]) are read as groups of two, so the
   same trainer evaluates TRL's test pairs.
2. A dataset row is a group, so the Trainer's sampler shuffles groups as units
   and a batch of `per_device_train_batch_size` rows holds whole groups: a
   group is never split across batches or devices.
3. `GroupedCollator` lays a batch out for one forward. Packed (default where
   the attention implementation takes a custom mask): one row per group
   holding the token prefix its completions share once, then each
   completion's remaining tokens with position ids continuing from the
   prefix, under a 4-D mask in which each completion sees the prefix and
   itself (a tree). With no shared prefix this is plain padding-free packing
   with positions restarting per sequence. Every token sees the same tokens
   at the same positions as in its own sequence, so the result is exact (to
   float rounding); the price is a dense width × width mask per group, so
   attention grows with the square of a group's total length. Padded: one
   right-padded row per completion, as TRL lays out its pairs; used where the
   attention implementation takes no custom mask (flash attention) or a
   prompt-learning adapter prepends virtual tokens.
4. The loss is TRL's on the expanded pairs of exactly the batch's groups: a
   mean over those pairs of −logsigmoid(r_c − r_r − margin) plus
   center_rewards_coefficient · mean((r_c + r_r)²) for rewards, and of
   −logsigmoid(β · ((π_c − ref_c) − (π_r − ref_r))) for DPO, each log-prob a
   sum over the pair's completion tokens, plus with the "sft" term the mean
   negative log-likelihood of the chosen sides' completion tokens. A pair's
   completion tokens start where its shorter side leaves the prompt, as in
   DPOTrainer: where the prompt's last tokens merge into one completion's
   first (a prompt ending mid-word, or a chat template's generation prompt
   ending in a space), the other side counts those prompt tokens too. The
   Trainer divides the loss by the gradient-accumulation steps as it does TRL's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
from trl.data_utils import _tokenize, common_prefix_length
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from training.prompts import reward_input_ids

logger = logging.getLogger(__name__)

MARGINS = ("none", "rank_gap", "likert_gap")
# Attention implementations that take a ready 4-D mask; the others (flash
# attention) get one padded row per completion.
PACKABLE_ATTENTION = ("sdpa", "eager")
# Owners in a packed row: the shared prefix, and the padding after the last completion.
_SHARED = -1
_PADDING = -2


# --- rows and pairs ----------------------------------------------------------------


def ranked_pairs(ranks: Sequence[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(pairs as (better, worse) indices for every i < j with different ranks, ties as (i, j))."""
    pairs: list[tuple[int, int]] = []
    ties: list[tuple[int, int]] = []
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if ranks[i] < ranks[j]:
                pairs.append((i, j))
            elif ranks[j] < ranks[i]:
                pairs.append((j, i))
            else:
                ties.append((i, j))
    return pairs, ties


def margin_scores(row: dict[str, Any], margin: str) -> list[float] | None:
    """Per-completion scores whose differences are the pairs' margins, or None when the row has none.

    rank_gap: −rank, so a pair's margin is rank(rejected) − rank(chosen);
    likert_gap: the Likert ratings, so it is likert(chosen) − likert(rejected),
    as the dataset build writes the `margin` column of its pairs.
    """
    if margin == "rank_gap":
        return [-float(rank) for rank in row["ranks"]]
    if margin == "likert_gap":
        likert = row.get("likert")
        return [float(value) for value in likert] if likert else None
    return None


def _group_of(row: dict[str, Any], margin: str) -> tuple[Any, list[Any], list[int], list[float] | None]:
    """(prompt, completions, ranks, margin scores) of a grouped row or of a TRL pair row."""
    if "completions" in row:
        return row["prompt"], list(row["completions"]), list(row["ranks"]), margin_scores(row, margin)
    scores = None if row.get("margin") is None else [float(row["margin"]), 0.0]
    return row["prompt"], [row["chosen"], row["rejected"]], [1, 2], scores


def pairs_from_groups(rows: Sequence[dict[str, Any]], *, margin: str = "none") -> list[dict[str, Any]]:
    """TRL preference rows (prompt, chosen, rejected[, margin]) for every pair of every group, in order.

    The rows TRL's trainers see for the same rankings, as the baseline in
    `bench/trainers.py` feeds them.
    """
    expanded = []
    for row in rows:
        prompt, completions, ranks, scores = _group_of(row, margin)
        if margin != "none" and scores is None:
            continue
        for chosen, rejected in ranked_pairs(ranks)[0]:
            pair = {"prompt": prompt, "chosen": completions[chosen], "rejected": completions[rejected]}
            if scores is not None:
                pair["margin"] = scores[chosen] - scores[rejected]
            expanded.append(pair)
    return expanded


def _kept(
    pairs: list[tuple[int, int]], ties: list[tuple[int, int]]
) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """The completions in some pair or tie, and the pairs and ties re-indexed over them."""
    used = sorted({i for pair in pairs + ties for i in pair})
    index = {old: new for new, old in enumerate(used)}
    return (
        used,
        [[index[a], index[b]] for a, b in pairs],
        [[index[a], index[b]] for a, b in ties],
    )


def reward_group_features(
    row: dict[str, Any],
    tokenizer: Any,
    *,
    max_length: int | None,
    margin: str,
    with_margin: bool,
    tie_loss: bool,
) -> dict[str, Any]:
    """A group's token ids and pairs as GroupedRewardTrainer trains them (empty pairs: nothing to learn)."""
    prompt, completions, ranks, scores = _group_of(row, margin)
    ids = [reward_input_ids(tokenizer, prompt, completion) for completion in completions]
    fits = [max_length is None or len(sequence) <= max_length for sequence in ids]
    pairs, ties = ranked_pairs(ranks)
    # RewardTrainer drops a pair when either side is longer than max_length.
    pairs = [(a, b) for a, b in pairs if fits[a] and fits[b]]
    ties = [(a, b) for a, b in ties if fits[a] and fits[b]] if tie_loss else []
    if with_margin and scores is None:
        pairs, ties = [], []  # the build drops votes it cannot give a margin
    used, kept_pairs, kept_ties = _kept(pairs, ties)
    features: dict[str, Any] = {
        "input_ids": [ids[i] for i in used],
        "pairs": kept_pairs,
        "ties": kept_ties,
    }
    if with_margin:
        features["pair_margins"] = [scores[a] - scores[b] for a, b in pairs] if scores else []
    return features


def dpo_group_features(
    row: dict[str, Any],
    tokenizer: Any,
    *,
    max_length: int | None,
    truncation_mode: str,
    tie_loss: bool,
) -> dict[str, Any]:
    """A group's token ids, prompt lengths and pairs as GroupedDPOTrainer trains them.

    Each completion is tokenized as DPOTrainer tokenizes a pair side; its
    `prompt_lens` entry is where its tokens leave the tokenized prompt. A
    pair's completion starts at the smaller of its two sides' values, as
    DPOTrainer takes the smaller one for the pair. `offsets` is the index in
    the untruncated sequence of the first kept token (non-zero with
    keep_end truncation only).
    """
    prompt, completions, ranks, _ = _group_of(row, "none")
    conversational = isinstance(prompt, list)
    eos = tokenizer.eos_token
    if conversational:
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True, tools=None)["input_ids"]
    else:
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
    sequences, prompt_lens, offsets = [], [], []
    for completion in completions:
        if conversational:
            full = _tokenize(tokenizer, list(prompt) + list(completion), tools=None)["input_ids"]
        else:
            if not completion.endswith(eos):
                completion = completion + eos
            full = _tokenize(tokenizer, prompt + completion)["input_ids"]
        prompt_lens.append(common_prefix_length(prompt_ids, full))
        kept = full
        if max_length is not None and len(full) > max_length:
            kept = full[:max_length] if truncation_mode == "keep_start" else full[-max_length:]
        sequences.append(list(kept))
        offsets.append(0 if truncation_mode == "keep_start" else len(full) - len(kept))

    def fits(a: int, b: int) -> bool:
        # DPOTrainer drops a pair whose prompt alone fills max_length under keep_start.
        return (
            max_length is None
            or truncation_mode != "keep_start"
            or min(prompt_lens[a], prompt_lens[b]) < max_length
        )

    pairs, ties = ranked_pairs(ranks)
    pairs = [(a, b) for a, b in pairs if fits(a, b)]
    ties = [(a, b) for a, b in ties if fits(a, b)] if tie_loss else []
    used, kept_pairs, kept_ties = _kept(pairs, ties)
    return {
        "input_ids": [sequences[i] for i in used],
        "prompt_lens": [prompt_lens[i] for i in used],
        "offsets": [offsets[i] for i in used],
        "pairs": kept_pairs,
        "ties": kept_ties,
    }


def _prepared_dataset(dataset: Dataset, features: Any, name: str) -> Dataset:
    """`features(row)` for every row, groups with nothing to learn left out."""
    if not isinstance(dataset, Dataset):
        raise TypeError(f"grouped trainers read a map-style datasets.Dataset, got {type(dataset).__name__}")
    prepared = [features(row) for row in dataset]
    kept = [group for group in prepared if group["pairs"] or group["ties"]]
    if len(kept) < len(prepared):
        logger.info(
            "%s: %d of %d groups have no pair within max_length and were left out",
            name,
            len(prepared) - len(kept),
            len(prepared),
        )
    if not kept:
        raise ValueError(f"the {name} dataset has no ranked pair to train on")
    return Dataset.from_list(kept)


def _is_prepared(dataset: Dataset) -> bool:
    return "pairs" in dataset.column_names and "input_ids" in dataset.column_names


# --- collation -------------------------------------------------------------------------


def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    shortest = min(len(sequence) for sequence in sequences)
    first = sequences[0]
    for t in range(shortest):
        if any(sequence[t] != first[t] for sequence in sequences[1:]):
            return t
    return shortest


def _padded(lists: list[list[Any]], width: int, value: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([list(values) + [value] * (width - len(values)) for values in lists], dtype=dtype)


@dataclass
class _Row:
    tokens: list[int]
    positions: list[int]
    owners: list[int]


@dataclass
class GroupedCollator:
    """Collates whole groups into one forward's tensors (see the module docstring, step 3).

    Always returns, first, `pairs` ([P, 2]: chosen and rejected sequence
    indices into the batch's sequences, so the Trainer counts a batch's size
    in pairs, as TRL's does) and `ties` ([T, 2]), then `group_sizes`,
    `input_ids`, `row_lengths` and either `attention_mask` (padded) or
    `position_ids` and `owners` (packed; the trainer builds the 4-D mask).
    Rewards add `reward_index`, the flat index of each sequence's reward
    token in the [rows, width] grid; DPO adds `next_token_labels` (the next
    token of the sequence at each grid position, −100 elsewhere),
    `token_index` / `token_positions` (for each sequence's token t ≥ 1, the
    grid position that predicts it and t in the untruncated sequence, −1 as
    padding), `prompt_lens` and, when the groups carry them, `ref_token_logps`.
    """

    pad_token_id: int
    kind: str  # "reward" | "dpo"
    packing: bool = True

    def __call__(self, groups: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences: list[list[int]] = []
        pairs: list[list[int]] = []
        ties: list[list[int]] = []
        group_sizes: list[int] = []
        for group in groups:
            base = len(sequences)
            sequences.extend(list(ids) for ids in group["input_ids"])
            pairs.extend([base + a, base + b] for a, b in group["pairs"])
            ties.extend([base + a, base + b] for a, b in group["ties"])
            group_sizes.append(len(group["input_ids"]))
        rows, places = self._rows(groups)
        width = max(len(row.tokens) for row in rows)

        batch: dict[str, torch.Tensor] = {
            "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
            "ties": torch.tensor(ties, dtype=torch.long).reshape(-1, 2),
        }
        if "pair_margins" in groups[0]:
            batch["pair_margins"] = torch.tensor(
                [m for group in groups for m in group["pair_margins"]], dtype=torch.float
            )
        batch["group_sizes"] = torch.tensor(group_sizes, dtype=torch.long)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
        batch["input_ids"] = input_ids
        batch["row_lengths"] = torch.tensor([len(row.tokens) for row in rows], dtype=torch.long)
        if self.packing:
            positions = torch.zeros((len(rows), width), dtype=torch.long)
            owners = torch.full((len(rows), width), _PADDING, dtype=torch.long)
            for r, row in enumerate(rows):
                positions[r, : len(row.tokens)] = torch.tensor(row.positions, dtype=torch.long)
                owners[r, : len(row.owners)] = torch.tensor(row.owners, dtype=torch.long)
            batch["position_ids"] = positions
            batch["owners"] = owners
        else:
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                attention_mask[r, : len(row.tokens)] = 1
            batch["attention_mask"] = attention_mask

        def flat(n: int, t: int) -> int:
            row, columns = places[n]
            return row * width + columns[t]

        if self.kind == "reward":
            reward_index = []
            for n, ids in enumerate(sequences):
                # The sequence-classification head reads the rightmost token that is not the pad id.
                last = max((t for t, token in enumerate(ids) if token != self.pad_token_id), default=0)
                reward_index.append(flat(n, last))
            batch["reward_index"] = torch.tensor(reward_index, dtype=torch.long)
            return batch

        offsets = [o for group in groups for o in group["offsets"]]
        longest = max(max(len(ids) - 1 for ids in sequences), 1)
        labels = [-100] * (len(rows) * width)
        token_index: list[list[int]] = []
        token_positions: list[list[int]] = []
        for n, ids in enumerate(sequences):
            row, columns = places[n]
            # Token t (t ≥ 1) is predicted at the position of token t − 1.
            predicting = [row * width + column for column in columns[:-1]]
            for index, token in zip(predicting, ids[1:], strict=True):
                labels[index] = token
            token_index.append(predicting)
            token_positions.append(list(range(offsets[n] + 1, offsets[n] + len(ids))))
        batch["next_token_labels"] = torch.tensor(labels, dtype=torch.long).reshape(len(rows), width)
        batch["token_index"] = _padded(token_index, longest, 0, torch.long)
        batch["token_positions"] = _padded(token_positions, longest, -1, torch.long)
        batch["prompt_lens"] = torch.tensor(
            [p for group in groups for p in group["prompt_lens"]], dtype=torch.long
        )
        if "ref_token_logps" in groups[0]:
            values = [v for group in groups for v in group["ref_token_logps"]]
            batch["ref_token_logps"] = _padded(values, longest, 0.0, torch.float)
        return batch

    def _rows(self, groups: list[dict[str, Any]]) -> tuple[list[_Row], list[tuple[int, list[int]]]]:
        """The batch's rows and, per sequence, (row, the column of each of its tokens)."""
        rows: list[_Row] = []
        places: list[tuple[int, list[int]]] = []
        for group in groups:
            sequences = [list(ids) for ids in group["input_ids"]]
            if not self.packing:
                for ids in sequences:
                    places.append((len(rows), list(range(len(ids)))))
                    rows.append(_Row(ids, list(range(len(ids))), [0] * len(ids)))
                continue
            shortest = min(len(ids) for ids in sequences)
            shared = min(_common_prefix(sequences), shortest - 1)
            if self.kind == "dpo":
                # The last shared position predicts one token for every
                # sequence, so that token must be shared as well.
                shared = min(shared, _common_prefix(sequences) - 1)
            shared = max(shared, 0)
            row = _Row(sequences[0][:shared], list(range(shared)), [_SHARED] * shared)
            for owner, ids in enumerate(sequences):
                start = len(row.tokens)
                row.tokens.extend(ids[shared:])
                row.positions.extend(range(shared, len(ids)))
                row.owners.extend([owner] * (len(ids) - shared))
                places.append(
                    (len(rows), list(range(shared)) + list(range(start, start + len(ids) - shared)))
                )
            rows.append(row)
        return rows, places


def packed_attention_mask(
    position_ids: torch.Tensor, owners: torch.Tensor, *, attn_implementation: str, dtype: torch.dtype
) -> torch.Tensor:
    """The [rows, 1, width, width] mask of packed rows: each token sees the shared prefix and its own sequence, causally.

    Boolean (True = attend) for SDPA, additive for eager attention. Padding
    sees itself, so no softmax row is empty (an empty one would put NaN in
    the activations, and 0 · NaN in the weight gradients).
    """
    query_owner, key_owner = owners[:, :, None], owners[:, None, :]
    allowed = (position_ids[:, None, :] <= position_ids[:, :, None]) & (
        ((key_owner == _SHARED) & (query_owner != _PADDING)) | (key_owner == query_owner)
    )
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


# --- shared trainer parts -------------------------------------------------------------------------


def _unwrapped_base(trainer: Any, model: Any) -> Any:
    unwrapped = trainer.accelerator.unwrap_model(model)
    return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped


def _can_pack(model: Any) -> tuple[bool, str]:
    if is_peft_model(model) and model.active_peft_config.is_prompt_learning:
        return False, "a prompt-learning adapter prepends virtual tokens"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in PACKABLE_ATTENTION:
        return False, f"attention implementation {implementation!r} takes no custom 4-D mask"
    return True, ""


def _forward_kwargs(trainer: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"input_ids": inputs["input_ids"], "use_cache": False}
    if "position_ids" in inputs:
        kwargs["position_ids"] = inputs["position_ids"]
        kwargs["attention_mask"] = packed_attention_mask(
            inputs["position_ids"],
            inputs["owners"],
            attn_implementation=trainer._attn_implementation,
            dtype=trainer._mask_dtype,
        )
    else:
        kwargs["attention_mask"] = inputs["attention_mask"]
    return kwargs


def _count_tokens(trainer: Any, inputs: dict[str, torch.Tensor]) -> None:
    mode = "train" if trainer.model.training else "eval"
    if mode == "train":
        tokens = trainer.accelerator.gather_for_metrics(inputs["row_lengths"].sum()).sum().item()
        trainer._total_train_tokens += tokens // trainer._tp_size
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


def _setup_layout(trainer: Any, requested: bool, kind: str) -> None:
    """Choose packed or padded rows for this model and install the grouped collator."""
    model = trainer.model
    packing, reason = (False, "turned off") if not requested else _can_pack(model)
    if packing and kind == "reward" and not hasattr(_unwrapped_base(trainer, model), "score"):
        packing, reason = False, "the reward model has no `score` head to read every position from"
    if requested and not packing:
        logger.warning("grouped trainer: not packing (%s); one padded row per completion", reason)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    trainer.packing = packing
    trainer._attn_implementation = getattr(config, "_attn_implementation", "sdpa")
    trainer._mask_dtype = next(model.parameters()).dtype
    tokenizer = getattr(trainer, "_tokenizer", None) or trainer.processing_class
    trainer.data_collator = GroupedCollator(pad_token_id=tokenizer.pad_token_id, kind=kind, packing=packing)


# --- the reward model -------------------------------------------------------------------------


@dataclass
class GroupedRewardConfig(RewardConfig):
    """RewardConfig for grouped rows; `per_device_train_batch_size` counts groups."""

    margin: str = field(
        default="none",
        metadata={
            "help": "Margin of a pair from grouped rows: 'none', 'rank_gap' (rank(rejected) − rank(chosen)) or "
            "'likert_gap' (likert(chosen) − likert(rejected); rows without ratings are left out). TRL pair rows "
            "use their own `margin` column when present.",
            "choices": list(MARGINS),
        },
    )
    tie_loss: bool = field(
        default=False,
        metadata={
            "help": "Give each tied pair the term −logsigmoid(r_i − r_j)/2 − logsigmoid(r_j − r_i)/2, counted "
            "as a pair in the mean. Off: ties give no pair, as in TRL's pair files."
        },
    )
    packing: bool = field(
        default=True,
        metadata={"help": "One packed row per group with its shared prefix once (see training.grouped)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.margin not in MARGINS:
            raise ValueError(f"margin must be one of {', '.join(map(repr, MARGINS))}; got {self.margin!r}")


class GroupedRewardTrainer(RewardTrainer):
    """RewardTrainer on grouped rows: each completion forwarded once, TRL's loss on the expanded pairs.

    Logs TRL's metrics (accuracy, margin, min/mean/max_reward over the pairs'
    sides) with `num_tokens` counting the tokens actually forwarded.
    """

    _tag_names = ["trl", "reward-trainer", "rankwise-grouped"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args")
        if not isinstance(config, GroupedRewardConfig):
            raise TypeError("GroupedRewardTrainer needs args=GroupedRewardConfig(...)")
        super().__init__(*args, **kwargs)
        _setup_layout(self, self.args.packing, "reward")

    def _prepare_dataset(
        self, dataset: Dataset, processing_class: Any, args: Any, dataset_name: str
    ) -> Dataset:
        if _is_prepared(dataset):
            return dataset
        grouped = "completions" in dataset.column_names
        with_margin = args.margin != "none" if grouped else "margin" in dataset.column_names

        def features(row: dict[str, Any]) -> dict[str, Any]:
            return reward_group_features(
                row,
                processing_class,
                max_length=args.max_length,
                margin=args.margin,
                with_margin=with_margin,
                tie_loss=args.tie_loss,
            )

        return _prepared_dataset(dataset, features, dataset_name)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "pairs", "ties", "pair_margins"]

    def group_rewards(self, model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reward of every sequence of the batch, in collation order."""
        kwargs = _forward_kwargs(self, inputs)
        if not self.packing:
            # One row per sequence: the model pools each row's reward token itself, as under TRL.
            return model(**kwargs).logits.squeeze(-1)
        head = _unwrapped_base(self, model).score
        with _captured_output(head) as captured:
            model(**kwargs)
        return captured["output"].reshape(-1)[inputs["reward_index"]]

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        mode = "train" if self.model.training else "eval"
        rewards = self.group_rewards(model, inputs)
        pairs, ties = inputs["pairs"], inputs["ties"]
        rewards_chosen, rewards_rejected = rewards[pairs[:, 0]], rewards[pairs[:, 1]]

        # TRL 1.16 RewardTrainer.compute_loss, on the batch's expanded pairs.
        if "pair_margins" in inputs:
            terms = -F.logsigmoid(rewards_chosen - rewards_rejected - inputs["pair_margins"])
        else:
            terms = -F.logsigmoid(rewards_chosen - rewards_rejected)
        both_chosen, both_rejected = rewards_chosen, rewards_rejected
        if ties.numel():
            tied_a, tied_b = rewards[ties[:, 0]], rewards[ties[:, 1]]
            tie_terms = -F.logsigmoid(tied_a - tied_b) / 2 - F.logsigmoid(tied_b - tied_a) / 2
            terms = torch.cat([terms, tie_terms])
            both_chosen, both_rejected = (
                torch.cat([rewards_chosen, tied_a]),
                torch.cat([rewards_rejected, tied_b]),
            )
        loss = terms.mean()
        if self.args.center_rewards_coefficient is not None:
            loss += self.args.center_rewards_coefficient * torch.mean((both_chosen + both_rejected) ** 2)

        _count_tokens(self, inputs)
        with torch.no_grad():
            sides = self.accelerator.gather(torch.cat([rewards_chosen, rewards_rejected]).detach())
            self._metrics[mode]["min_reward"].append(sides.min().item())
            self._metrics[mode]["mean_reward"].append(sides.mean().item())
            self._metrics[mode]["max_reward"].append(sides.max().item())
            accuracy = (rewards_chosen > rewards_rejected).float().mean()
            self._metrics[mode]["accuracy"].append(
                self.accelerator.gather_for_metrics(accuracy).mean().item()
            )
            margin = (rewards_chosen - rewards_rejected).mean()
            self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
        if return_outputs:
            return loss, {"rewards": torch.stack([rewards_chosen, rewards_rejected], dim=1)}
        return loss


@contextlib.contextmanager
def _captured_output(module: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """The output of `module`'s next forward: the reward head's score at every position."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
        captured["output"] = output

    handle = module.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


# --- DPO ------------------------------------------------------------------------------------------


@dataclass
class GroupedDPOConfig(DPOConfig):
    """DPOConfig for grouped rows: the sigmoid loss, optionally with TRL's "sft" term
    (`loss_type=["sigmoid", "sft"]`); `per_device_train_batch_size` counts groups."""

    tie_loss: bool = field(
        default=False,
        metadata={
            "help": "Give each tied pair the term −logsigmoid(βd)/2 − logsigmoid(−βd)/2 with d its difference "
            "of log-ratios, counted as a pair in the mean. Off: ties give no pair."
        },
    )
    packing: bool = field(
        default=True,
        metadata={"help": "One packed row per group with its shared prefix once (see training.grouped)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        unsupported = {
            "loss_type": self.loss_type not in (["sigmoid"], ["sigmoid", "sft"]),
            "ld_alpha": self.ld_alpha is not None,
            "f_divergence_type": self.f_divergence_type != "reverse_kl",
            "use_weighting": self.use_weighting,
        }
        named = [name for name, bad in unsupported.items() if bad]
        if named:
            raise ValueError(
                "GroupedDPOConfig supports the standard sigmoid DPO loss (with an optional 'sft' term) only; "
                f"unsupported: {', '.join(named)}"
            )


class GroupedDPOTrainer(DPOTrainer):
    """DPOTrainer (sigmoid loss) on grouped rows: each completion through policy and reference once.

    With `precompute_ref_log_probs` the reference's per-token log-probs of
    every completion are computed once before training and stored on the
    dataset (`ref_token_logps`); a pair's reference log-prob is then a sum
    over them, exactly as the policy's. The precompute runs on every
    process over the whole dataset (no sharding, no cache file, unlike
    DPOTrainer's). Logs TRL's rewards/*, logps/* and entropy (over each
    forwarded completion's tokens once) metrics.
    """

    _tag_names = ["trl", "dpo", "rankwise-grouped"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args")
        if not isinstance(config, GroupedDPOConfig):
            raise TypeError("GroupedDPOTrainer needs args=GroupedDPOConfig(...)")
        self._layout_ready = False
        super().__init__(*args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("GroupedDPOTrainer does not add the MoE router loss; set router_aux_loss_coef=0")
        self._ensure_layout()

    def _ensure_layout(self) -> None:
        # The reference precompute runs inside DPOTrainer.__init__, before it returns.
        if not self._layout_ready:
            _setup_layout(self, self.args.packing, "dpo")
            self._layout_ready = True

    def _prepare_dataset(
        self, dataset: Dataset, processing_class: Any, args: Any, dataset_name: str
    ) -> Dataset:
        if _is_prepared(dataset):
            return dataset
        tokenizer = self._tokenizer

        def features(row: dict[str, Any]) -> dict[str, Any]:
            return dpo_group_features(
                row,
                tokenizer,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                tie_loss=args.tie_loss,
            )

        return _prepared_dataset(dataset, features, dataset_name)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = [
                "input_ids",
                "prompt_lens",
                "offsets",
                "pairs",
                "ties",
                "ref_token_logps",
            ]

    def sequence_token_logps(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """[sequences, tokens] log p(token t | tokens < t) for t ≥ 1 (zero as padding), and the model outputs."""
        outputs = model(
            **_forward_kwargs(self, inputs), shift_labels=inputs["next_token_labels"], fused_lm_head=True
        )
        token_logps = outputs.log_probs.reshape(-1)[inputs["token_index"]]
        return token_logps * (inputs["token_positions"] >= 0), outputs

    def reference_token_logps(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference model's `sequence_token_logps`: ref_model, or the policy with its adapter off."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
        ):
            if self.ref_model is None and is_peft_model(self.model):
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    return self.sequence_token_logps(self.model, inputs)[0]
            return self.sequence_token_logps(self.ref_model or self.model, inputs)[0]

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """`dataset` with each completion's reference per-token log-probs (one reference forward per completion)."""
        self._ensure_layout()
        if "ref_token_logps" in dataset.column_names:
            return dataset
        values: list[list[list[float]]] = []
        for start in range(0, len(dataset), batch_size):
            groups = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = self._prepare_inputs(self.data_collator(groups))
            reference = self.reference_token_logps(batch).float().cpu()
            n = 0
            for group in groups:
                values.append(
                    [reference[n + i, : len(ids) - 1].tolist() for i, ids in enumerate(group["input_ids"])]
                )
                n += len(group["input_ids"])
        return dataset.add_column("ref_token_logps", values)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        mode = "train" if self.model.training else "eval"
        token_logps, outputs = self.sequence_token_logps(model, inputs)
        if self.precompute_ref_logps:
            reference = inputs["ref_token_logps"]
        else:
            reference = self.reference_token_logps(inputs)
        positions = inputs["token_positions"]
        prompt_lens = inputs["prompt_lens"]

        def completion_masks(pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # A pair's completion starts at the smaller of its sides' prompt lengths, as in DPOTrainer:
            # where the prompt's last tokens merge into one side's completion, the other side's
            # completion starts there too, its last prompt tokens counted as completion.
            starts = torch.minimum(prompt_lens[pairs[:, 0]], prompt_lens[pairs[:, 1]])[:, None]
            return positions[pairs[:, 0]] >= starts, positions[pairs[:, 1]] >= starts

        def pair_sums(values: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            first, second = completion_masks(pairs)
            return (values[pairs[:, 0]] * first).sum(dim=1), (values[pairs[:, 1]] * second).sum(dim=1)

        pairs, ties = inputs["pairs"], inputs["ties"]
        chosen_logps, rejected_logps = pair_sums(token_logps, pairs)
        ref_chosen_logps, ref_rejected_logps = pair_sums(reference, pairs)
        # TRL 1.16 DPOTrainer._compute_loss, sigmoid loss, on the batch's expanded pairs.
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        delta_score = chosen_logratios - rejected_logratios
        per_sequence_loss = -F.logsigmoid(self.beta * delta_score)
        if ties.numel():
            tied_a, tied_b = pair_sums(token_logps, ties)
            ref_tied_a, ref_tied_b = pair_sums(reference, ties)
            tied = self.beta * ((tied_a - ref_tied_a) - (tied_b - ref_tied_b))
            per_sequence_loss = torch.cat(
                [per_sequence_loss, -F.logsigmoid(tied) / 2 - F.logsigmoid(-tied) / 2]
            )
        loss = 0.0
        loss += per_sequence_loss.mean() * self.loss_weights[0]
        if "sft" in self.loss_types:
            # TRL's "sft" term: the mean negative log-likelihood over the chosen
            # side's completion tokens of every pair (a completion chosen in
            # several pairs counts once per pair, as in the expanded batch),
            # counted from the pair's start, not the completion's own.
            chosen_tokens, _ = completion_masks(pairs)
            loss += -token_logps[pairs[:, 0]][chosen_tokens].mean() * self.loss_weights[1]

        _count_tokens(self, inputs)
        with torch.no_grad():
            completion = (positions >= prompt_lens[:, None]).float()
            entropy = (
                outputs.entropy.reshape(-1)[inputs["token_index"]] if outputs.entropy is not None else None
            )
            if entropy is not None:
                entropy_sum = self.accelerator.gather_for_metrics((entropy * completion).sum()).sum()
                tokens = self.accelerator.gather_for_metrics(completion.sum()).sum()
                self._metrics[mode]["entropy"].append((entropy_sum / tokens).item() if tokens > 0 else 0.0)
            chosen_rewards = self.beta * chosen_logratios.detach()
            rejected_rewards = self.beta * rejected_logratios.detach()
            gathered_chosen = self.accelerator.gather(chosen_rewards)
            gathered_rejected = self.accelerator.gather(rejected_rewards)
            self._metrics[mode]["rewards/chosen"].append(gathered_chosen.mean().item())
            self._metrics[mode]["rewards/rejected"].append(gathered_rejected.mean().item())
            accuracies = self.accelerator.gather((chosen_rewards > rejected_rewards).float())
            self._metrics[mode]["rewards/accuracies"].append(accuracies.mean().item())
            margins = self.accelerator.gather(chosen_rewards - rejected_rewards)
            self._metrics[mode]["rewards/margins"].append(margins.mean().item())
            self._metrics[mode]["logps/chosen"].append(
                self.accelerator.gather(chosen_logps.detach()).mean().item()
            )
            self._metrics[mode]["logps/rejected"].append(
                self.accelerator.gather(rejected_logps.detach()).mean().item()
            )
        if return_outputs:
            return loss, {"logps": torch.stack([chosen_logps, rejected_logps], dim=1)}
        return loss

    def prediction_step(
        self,
        model: Any,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        # DPOTrainer's own version asks for logits, which a grouped batch does not have per pair.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
