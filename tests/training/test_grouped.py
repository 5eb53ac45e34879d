"""The K-wise trainers against TRL's: the same loss and gradients on the expanded pairs, whole groups per batch."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from training.demo.task import completion_canonical, demo_problems
from training.grouped import (
    GroupedDPOConfig,
    GroupedDPOTrainer,
    GroupedRewardConfig,
    GroupedRewardTrainer,
    packed_attention_mask,
)
from training.runner import GROUPED_MARGINS, RunSpec, run_training

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LOSS_TOLERANCE = 1e-6
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-5


# --- data ------------------------------------------------------------------------------------


def grouped_rows(k: int, *, count: int = 3, ties: bool = False, seed: int = 1) -> list[dict[str, Any]]:
    """`count` rankings of k answers (the right one and k − 1 wrong ones) in a shuffled rank order."""
    rows = []
    for n, problem in enumerate(demo_problems(count=count, seed=seed, split="train")):
        completions = [completion_canonical(problem, answer=problem.answer + d) for d in range(k)]
        ranks = [1 + (i * 5 + n) % k for i in range(k)]  # a permutation of 1..k for k coprime to 5
        if len(set(ranks)) < k:
            ranks = [k - i for i in range(k)]
        if ties and k > 2:
            ranks[1] = ranks[2]
        rows.append({"prompt": f"{problem.prompt}\n", "completions": completions, "ranks": ranks})
    return rows


def expanded_pairs(rows: list[dict[str, Any]], *, rank_gap: bool = False) -> list[dict[str, Any]]:
    """What a pair file holds for these rankings: each i ≻ j once, ties left out."""
    pairs = []
    for row in rows:
        ranks, completions = row["ranks"], row["completions"]
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                if ranks[i] == ranks[j]:
                    continue
                better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
                pair = {
                    "prompt": row["prompt"],
                    "chosen": completions[better],
                    "rejected": completions[worse],
                }
                if rank_gap:
                    pair["margin"] = float(ranks[worse] - ranks[better])
                pairs.append(pair)
    return pairs


def common_args(tmp_path: Path, **values: Any) -> dict[str, Any]:
    return {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "bf16": False,
        "activation_checkpointing": False,
        "report_to": "none",
        "disable_dropout": True,
        "seed": 0,
        **values,
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)


def assert_same_loss_and_gradients(
    trl_loss: torch.Tensor,
    grouped_loss: torch.Tensor,
    trl_model: torch.nn.Module,
    grouped_model: torch.nn.Module,
) -> None:
    assert abs(trl_loss.item() - grouped_loss.item()) <= LOSS_TOLERANCE
    trl_grads = {n: p.grad for n, p in trl_model.named_parameters() if p.requires_grad}
    grouped_grads = {n: p.grad for n, p in grouped_model.named_parameters() if p.requires_grad}
    assert trl_grads.keys() == grouped_grads.keys()
    assert all(g is not None for g in trl_grads.values())
    for name, grad in trl_grads.items():
        assert torch.allclose(grouped_grads[name], grad, atol=GRAD_ATOL, rtol=GRAD_RTOL), name


def whole_batch_loss(trainer: Any, model: torch.nn.Module) -> torch.Tensor:
    """compute_loss on one batch of the trainer's whole training set, gradients left on the model."""
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach()


# --- reward models ---------------------------------------------------------------------------


def reward_model(tiny_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    torch.manual_seed(0)
    with suppress_seqcls_warning():
        return AutoModelForSequenceClassification.from_pretrained(
            tiny_model_dir, num_labels=1, dtype=torch.float32, use_safetensors=True
        )


def reward_trainers(
    tiny_model_dir: Path,
    tokenizer: Any,
    tmp_path: Path,
    rows: list[dict[str, Any]],
    *,
    margin: str = "none",
    center: float | None = None,
    packing: bool = True,
    max_length: int | None = None,
    peft_config: Any = None,
) -> tuple[Any, Any]:
    from trl import RewardConfig, RewardTrainer

    base = reward_model(tiny_model_dir)
    args = common_args(tmp_path, max_length=max_length, center_rewards_coefficient=center)
    trl = RewardTrainer(
        model=copy.deepcopy(base),
        args=RewardConfig(**args),
        train_dataset=Dataset.from_list(expanded_pairs(rows, rank_gap=margin == "rank_gap")),
        processing_class=tokenizer,
        peft_config=copy.deepcopy(peft_config),
    )
    grouped = GroupedRewardTrainer(
        model=copy.deepcopy(base),
        args=GroupedRewardConfig(**args, margin=margin, packing=packing),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=copy.deepcopy(peft_config),
    )
    return trl, grouped


@pytest.mark.parametrize(
    ("k", "margin", "center", "ties", "packing"),
    [
        (2, "none", None, False, True),
        (4, "none", None, False, True),
        (9, "none", None, False, True),
        (4, "rank_gap", None, False, True),
        (4, "none", 0.01, False, True),
        (9, "rank_gap", 0.01, False, True),
        (9, "rank_gap", 0.01, False, False),
        (4, "rank_gap", 0.01, True, True),
        (9, "none", None, True, False),
    ],
)
def test_the_grouped_reward_loss_and_gradients_equal_trls_on_the_expanded_pairs(
    k: int,
    margin: str,
    center: float | None,
    ties: bool,
    packing: bool,
    tiny_model_dir: Path,
    tokenizer: Any,
    tmp_path: Path,
) -> None:
    # given: the same rankings as groups and as TRL's pairs, the same weights
    rows = grouped_rows(k, ties=ties)
    trl, grouped = reward_trainers(
        tiny_model_dir, tokenizer, tmp_path, rows, margin=margin, center=center, packing=packing
    )

    # when
    trl_loss = whole_batch_loss(trl, trl.model)
    grouped_loss = whole_batch_loss(grouped, grouped.model)

    # then
    assert len(trl.train_dataset) == sum(len(group["pairs"]) for group in grouped.train_dataset)
    assert grouped.packing is packing
    assert_same_loss_and_gradients(trl_loss, grouped_loss, trl.model, grouped.model)


def test_pairs_over_max_length_are_dropped_as_trl_drops_them(
    tiny_model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    rows = grouped_rows(4)
    for row in rows:
        row["completions"][2] += " And that is all there is to say about it, really."
    lengths = [
        len(tokenizer(row["prompt"] + c + tokenizer.eos_token)["input_ids"])
        for row in rows
        for c in row["completions"]
    ]
    limit = sorted(set(lengths))[-2]
    trl, grouped = reward_trainers(
        tiny_model_dir, tokenizer, tmp_path, rows, margin="rank_gap", max_length=limit
    )

    trl_loss = whole_batch_loss(trl, trl.model)
    grouped_loss = whole_batch_loss(grouped, grouped.model)

    assert 0 < len(trl.train_dataset) < len(expanded_pairs(rows))
    assert len(trl.train_dataset) == sum(len(group["pairs"]) for group in grouped.train_dataset)
    assert_same_loss_and_gradients(trl_loss, grouped_loss, trl.model, grouped.model)


def test_a_lora_reward_model_gets_the_same_loss_and_adapter_gradients(
    tiny_model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    from peft import LoraConfig

    config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, modules_to_save=["score"], fan_in_fan_out=True
    )
    trl, grouped = reward_trainers(
        tiny_model_dir,
        tokenizer,
        tmp_path,
        grouped_rows(4),
        margin="rank_gap",
        center=0.01,
        peft_config=config,
    )
    # LoRA's B starts at zero, which would leave A without gradient: move it.
    for model in (trl.model, grouped.model):
        torch.manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(std=0.1)

    trl_loss = whole_batch_loss(trl, trl.model)
    grouped_loss = whole_batch_loss(grouped, grouped.model)

    assert grouped.packing
    assert_same_loss_and_gradients(trl_loss, grouped_loss, trl.model, grouped.model)


def test_the_soft_tie_loss_adds_each_tie_as_a_pair_of_half_terms(
    tiny_model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    from training.scoring import reward_input_ids, reward_scores_from_ids

    rows = grouped_rows(4, count=2, ties=True)
    trainer = GroupedRewardTrainer(
        model=reward_model(tiny_model_dir),
        args=GroupedRewardConfig(**common_args(tmp_path, max_length=None), tie_loss=True),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )

    loss = whole_batch_loss(trainer, trainer.model).item()

    logsigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    terms = []
    for row in rows:
        ids = [reward_input_ids(tokenizer, row["prompt"], c) for c in row["completions"]]
        r = reward_scores_from_ids(trainer.model, ids, pad_token_id=tokenizer.pad_token_id)
        ranks = row["ranks"]
        for i in range(4):
            for j in range(i + 1, 4):
                if ranks[i] == ranks[j]:
                    terms.append(-logsigmoid(r[i] - r[j]) / 2 - logsigmoid(r[j] - r[i]) / 2)
                else:
                    better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
                    terms.append(-logsigmoid(r[better] - r[worse]))
    assert len(terms) == 12
    assert loss == pytest.approx(sum(terms) / len(terms), abs=1e-6)


# --- DPO ---------------------------------------------------------------------------------------


def dpo_models(tiny_model_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(policy, reference): the policy nudged away from the reference, so the log-ratios are not zero."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, use_safetensors=True
    )
    policy = copy.deepcopy(reference)
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return policy, reference


def dpo_trainers(
    tiny_model_dir: Path,
    tokenizer: Any,
    tmp_path: Path,
    rows: list[dict[str, Any]],
    *,
    packing: bool = True,
    precompute: bool = False,
    max_length: int | None = None,
    peft_config: Any = None,
    losses: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    from trl import DPOConfig, DPOTrainer

    policy, reference = dpo_models(tiny_model_dir)
    args = common_args(
        tmp_path,
        max_length=max_length,
        beta=0.1,
        precompute_ref_log_probs=precompute,
        per_device_train_batch_size=64,
        **(losses or {}),
    )
    trainers = []
    for trainer_class, config, dataset in (
        (DPOTrainer, DPOConfig(**args), Dataset.from_list(expanded_pairs(rows))),
        (GroupedDPOTrainer, GroupedDPOConfig(**args, packing=packing), Dataset.from_list(rows)),
    ):
        trainers.append(
            trainer_class(
                model=copy.deepcopy(policy),
                ref_model=None if peft_config is not None else copy.deepcopy(reference),
                args=config,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=copy.deepcopy(peft_config),
            )
        )
    return trainers[0], trainers[1]


@pytest.mark.parametrize(
    ("k", "packing", "precompute", "ties", "max_length"),
    [
        (2, True, False, False, None),
        (4, True, False, False, None),
        (9, True, False, False, None),
        (9, False, False, False, None),
        (4, True, True, False, None),
        (9, True, True, True, None),
        (4, True, False, False, 32),
        (4, False, False, False, 32),
    ],
)
def test_the_grouped_dpo_loss_and_gradients_equal_trls_on_the_expanded_pairs(
    k: int,
    packing: bool,
    precompute: bool,
    ties: bool,
    max_length: int | None,
    tiny_model_dir: Path,
    tokenizer: Any,
    tmp_path: Path,
) -> None:
    rows = grouped_rows(k, ties=ties)
    trl, grouped = dpo_trainers(
        tiny_model_dir,
        tokenizer,
        tmp_path,
        rows,
        packing=packing,
        precompute=precompute,
        max_length=max_length,
    )

    trl_loss = whole_batch_loss(trl, trl.model)
    grouped_loss = whole_batch_loss(grouped, grouped.model)

    assert len(trl.train_dataset) == sum(len(group["pairs"]) for group in grouped.train_dataset)
    assert ("ref_token_logps" in grouped.train_dataset.column_names) is precompute
    if max_length is not None:
        assert max(len(ids) for group in grouped.train_dataset for ids in group["input_ids"]) == max_length
    assert trl_loss.item() != pytest.approx(math.log(2), abs=1e-4)  # the log-ratios are not all zero
    assert_same_loss_and_gradients(trl_loss, grouped_loss, trl.model, grouped.model)


@pytest.mark.parametrize("packing", [True, False])
def test_the_grouped_dpo_loss_with_trls_sft_term_equals_trls(
    packing: bool, tiny_model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    # given DPO plus a negative log-likelihood term on the chosen side (RPO)
    rows = grouped_rows(4, ties=False)
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
    trl, grouped = dpo_trainers(tiny_model_dir, tokenizer, tmp_path, rows, packing=packing, losses=losses)
    plain, _ = dpo_trainers(tiny_model_dir, tokenizer, tmp_path, rows, packing=packing)

    # when both compute the loss on the whole batch
    trl_loss = whole_batch_loss(trl, trl.model)
    grouped_loss = whole_batch_loss(grouped, grouped.model)

    # then they agree, and the term is really there (a chosen NLL of a few nats per token)
    assert trl_loss.item() > whole_batch_loss(plain, plain.model).item() + 0.5
    assert_same_loss_and_gradients(trl_loss, grouped_loss, trl.model, grouped.model)


def test_a_lora_dpo_policy_takes_its_reference_from_the_disabled_adapter_as_trl_does(
    tiny_model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    from peft import LoraConfig

    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, fan_in_fan_out=True)
    trl, grouped = dpo_trainers(tiny_model_dir, tokenizer, tmp_path, grouped_rows(4), peft_config=config)
    for model in (trl.model, grouped.model):
        torch.manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(std=0.1)

    trl_loss = whole_batch_loss(trl, trl.model)
    grouped_loss = whole_batch_loss(grouped, grouped.model)

    assert grouped.ref_model is None
    assert_same_loss_and_gradients(trl_loss, grouped_loss, trl.model, grouped.model)


# --- merged tokens: prompts that end mid-token, chat templates ----------------------------------

# Generation prompt ending in a space, as several chat templates' do: the
# space merges with a completion's first word, but not with a first digit,
# which the tokenizer splits off.
SPACE_ENDED_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
MERGING_WORDS = ["river", "stone", "apple", "apples", "cloud", "garden", "music", "paper", "the", "of"]

# "app" is three tokens and "apple" one, so the prompt's end merges with "le …"
# and "les …" but not with " music …" (the best).
MERGED_TEXT_ROW = {
    "prompt": "river stone app",
    "completions": ["le cloud.", "les garden.", " music paper."],
    "ranks": [2, 3, 1],
}
MERGED_CHAT_ROW = {
    "prompt": [
        {"role": "system", "content": "You name things."},
        {"role": "user", "content": "river stone"},
    ],
    "completions": [
        [{"role": "assistant", "content": "apple cloud."}],
        [{"role": "assistant", "content": "42 apples."}],
        [{"role": "assistant", "content": "music paper."}],
        [{"role": "assistant", "content": "7 stone garden."}],
    ],
    "ranks": [2, 1, 4, 3],
}


@pytest.fixture(scope="module")
def merging_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer whose tokens merge across the prompt's end, with the chat template above, and a tiny model."""
    import random

    from training.demo.model import causal_lm_create, tokenizer_train

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(MERGING_WORDS) for _ in range(8)) + "." for _ in range(400)]
    tokenizer = tokenizer_train(corpus, vocab_size=400)
    tokenizer.chat_template = SPACE_ENDED_CHAT_TEMPLATE
    tokenizer.model_max_length = 128
    model = causal_lm_create(tokenizer, n_layer=2, n_head=2, n_embd=32, n_positions=128)
    directory = tmp_path_factory.mktemp("merging-model")
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def merging_tokenizer(merging_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(merging_model_dir, local_files_only=True)


def prompt_token_counts(tokenizer: Any, row: dict[str, Any]) -> tuple[int, list[int]]:
    """(tokens of the prompt alone, tokens each completion shares with it): smaller where tokens merge."""
    from trl.data_utils import _tokenize, common_prefix_length

    prompt = row["prompt"]
    if isinstance(prompt, list):
        alone = _tokenize(tokenizer, prompt, add_generation_prompt=True, tools=None)["input_ids"]
        fulls = [_tokenize(tokenizer, prompt + c, tools=None)["input_ids"] for c in row["completions"]]
    else:
        alone = tokenizer(prompt)["input_ids"]
        fulls = [tokenizer(prompt + c + tokenizer.eos_token)["input_ids"] for c in row["completions"]]
    return len(alone), [common_prefix_length(alone, full) for full in fulls]


@pytest.mark.parametrize("row", [MERGED_TEXT_ROW, MERGED_CHAT_ROW], ids=["text", "chat"])
def test_the_rows_merge_tokens_across_the_prompts_end_for_some_completions_only(
    row: dict[str, Any], merging_tokenizer: Any
) -> None:
    prompt_tokens, shared = prompt_token_counts(merging_tokenizer, row)
    best = row["ranks"].index(1)
    assert shared[best] == prompt_tokens
    assert min(shared) < prompt_tokens


@pytest.mark.parametrize(
    ("row", "packing", "precompute", "losses"),
    [
        (MERGED_TEXT_ROW, True, True, ["sigmoid", "sft"]),
        (MERGED_TEXT_ROW, False, True, ["sigmoid", "sft"]),
        (MERGED_TEXT_ROW, True, False, ["sigmoid", "sft"]),
        (MERGED_TEXT_ROW, True, True, ["sigmoid"]),
        (MERGED_CHAT_ROW, True, True, ["sigmoid", "sft"]),
        (MERGED_CHAT_ROW, False, False, ["sigmoid", "sft"]),
        (MERGED_CHAT_ROW, True, False, ["sigmoid"]),
    ],
    ids=["text-sft", "text-sft-padded", "text-sft-reference", "text", "chat-sft", "chat-sft-padded", "chat"],
)
def test_the_grouped_dpo_loss_equals_trls_where_tokens_merge_across_the_prompts_end(
    row: dict[str, Any],
    packing: bool,
    precompute: bool,
    losses: list[str],
    merging_model_dir: Path,
    merging_tokenizer: Any,
    tmp_path: Path,
) -> None:
    # given a group in which the best completion keeps the prompt's last tokens and others merge them
    trl, grouped = dpo_trainers(
        merging_model_dir,
        merging_tokenizer,
        tmp_path,
        [row],
        packing=packing,
        precompute=precompute,
        losses={"loss_type": losses},
    )

    # when both compute the loss on the whole batch
    trl_loss = whole_batch_loss(trl, trl.model)
    grouped_loss = whole_batch_loss(grouped, grouped.model)

    # then loss and gradients agree: the chosen side's tokens start where the pair's do, as in TRL
    assert trl_loss.item() != pytest.approx(math.log(2), abs=1e-4)
    assert_same_loss_and_gradients(trl_loss, grouped_loss, trl.model, grouped.model)


@pytest.mark.parametrize("row", [MERGED_TEXT_ROW, MERGED_CHAT_ROW], ids=["text", "chat"])
@pytest.mark.parametrize("packing", [True, False])
def test_the_grouped_reward_loss_equals_trls_where_tokens_merge_across_the_prompts_end(
    row: dict[str, Any], packing: bool, merging_model_dir: Path, merging_tokenizer: Any, tmp_path: Path
) -> None:
    trl, grouped = reward_trainers(
        merging_model_dir, merging_tokenizer, tmp_path, [row], margin="rank_gap", center=0.01, packing=packing
    )

    trl_loss = whole_batch_loss(trl, trl.model)
    grouped_loss = whole_batch_loss(grouped, grouped.model)

    assert len(trl.train_dataset) == sum(len(group["pairs"]) for group in grouped.train_dataset)
    assert_same_loss_and_gradients(trl_loss, grouped_loss, trl.model, grouped.model)


# --- batching --------------------------------------------------------------------------------


def test_every_batch_holds_whole_groups_and_an_epoch_each_group_once(
    tiny_model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    # given: 7 groups of 2 to 9 completions, 3 groups a batch, padded rows (one per completion)
    rows = [row for k in (2, 3, 5, 9) for row in grouped_rows(k, count=2, seed=k)][:7]
    trainer = GroupedRewardTrainer(
        model=reward_model(tiny_model_dir),
        args=GroupedRewardConfig(
            **common_args(tmp_path, max_length=None, per_device_train_batch_size=3), packing=False
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    groups = [tuple(map(tuple, group["input_ids"])) for group in trainer.train_dataset]

    # when
    batches = list(trainer.get_train_dataloader())

    # then
    seen = []
    for batch in batches:
        sizes = batch["group_sizes"].tolist()
        rows_ids = [
            tuple(ids[:length])
            for ids, length in zip(batch["input_ids"].tolist(), batch["row_lengths"].tolist(), strict=True)
        ]
        start = 0
        for size in sizes:
            seen.append(tuple(rows_ids[start : start + size]))
            in_group = (batch["pairs"] >= start) & (batch["pairs"] < start + size)
            assert (in_group[:, 0] == in_group[:, 1]).all()  # no pair crosses groups
            start += size
        assert start == len(rows_ids)
    assert [len(batch["group_sizes"]) for batch in batches] == [3, 3, 1]
    assert sorted(seen) == sorted(groups)
    assert seen != groups  # shuffled as units


def test_a_packed_row_shares_the_prompt_and_hides_completions_from_each_other() -> None:
    from training.grouped import GroupedCollator

    group = {"input_ids": [[5, 6, 7, 8], [5, 6, 9], [5, 6, 7, 3, 4]], "pairs": [[0, 1], [2, 1]], "ties": []}

    batch = GroupedCollator(pad_token_id=0, kind="reward", packing=True)([group])
    mask = packed_attention_mask(
        batch["position_ids"], batch["owners"], attn_implementation="sdpa", dtype=torch.float32
    )[0, 0]

    # shared 5 6, then 7 8 | 9 | 7 3 4: eight tokens instead of twelve
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 2, 3, 4]]
    assert batch["reward_index"].tolist() == [3, 4, 7]
    assert mask[7].tolist() == [True, True, False, False, False, True, True, True]
    assert mask[4].tolist() == [True, True, False, False, True, False, False, False]


# --- the runner -------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_a_two_step_grouped_run_succeeds_with_the_metrics_of_a_trl_run(
    kind: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = grouped_rows(4, count=6)
    pairs = [{**pair, "margin": 1.0} for pair in expanded_pairs(rows)]
    spec = RunSpec(
        run_id=1,
        kind=kind,
        base_model=str(tiny_model_dir),
        train_file=_write_jsonl(tmp_path / "pairs.jsonl", pairs),
        test_file=_write_jsonl(tmp_path / "test.jsonl", pairs[:6]),
        grouped_train_file=_write_jsonl(tmp_path / "grouped.jsonl", rows),
        grouped_test_file=_write_jsonl(tmp_path / "grouped-test.jsonl", rows[:2]),
        output_dir=str(tmp_path / "run"),
        trainer="grouped",
        grouped_margin="rank_gap",
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        max_length=128,
        gradient_checkpointing=False,
    )

    result = run_training(spec, _SilentReporter())

    assert (result.status, result.steps) == ("succeeded", 2)
    expected = (
        {"train_loss", "eval_loss", "pairwise_accuracy", "tie_rate", "mean_margin", "ece", "kendall_tau"}
        if kind == "reward"
        else {"train_loss", "eval_loss", "reward_accuracy", "reward_margin"}
    )
    assert expected <= set(result.metrics)
    assert all(math.isfinite(result.metrics[name]) for name in expected)
    assert json.loads((Path(result.final_dir) / "rankwise_run.json").read_text())["trainer"] == "grouped"


class _SilentReporter:
    def started(self, *, total_steps: int) -> None: ...
    def progress(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None: ...
    def heartbeat(self) -> None: ...
    def should_stop(self) -> bool:
        return False

    def log(self, line: str) -> None: ...


def test_a_grouped_spec_without_a_grouped_train_file_is_refused(tmp_path: Path) -> None:
    values = {"run_id": 1, "kind": "reward", "base_model": "m", "train_file": "t", "test_file": None}

    with pytest.raises(ValueError, match="grouped_train_file must be a JSONL file of grouped rows"):
        RunSpec(**values, output_dir=str(tmp_path), trainer="grouped")
    with pytest.raises(ValueError, match="grouped_margin must be one of"):
        RunSpec(
            **values, output_dir=str(tmp_path), trainer="grouped", grouped_train_file="g", grouped_margin="x"
        )


def test_the_runner_offers_the_margins_the_trainer_knows() -> None:
    from training.grouped import MARGINS

    assert GROUPED_MARGINS == MARGINS
