"""The K-wise trainers against TRL's on chat rows rendered with each modern family's own template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.training.modern_models import FAMILIES, modern_model_dirs  # noqa: F401
from tests.training.test_grouped import (
    assert_same_loss_and_gradients,
    dpo_trainers,
    reward_trainers,
    whole_batch_loss,
)

SYSTEM = {"role": "system", "content": "You are a careful assistant who answers briefly."}
ROWS = [
    {
        "prompt": [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
        "completions": [
            [{"role": "assistant", "content": text}]
            for text in ("Paris.", "Paris is the capital of France.", "I do not know.", "Lyon, I think.")
        ],
        "ranks": [2, 1, 4, 3],
    },
    {
        "prompt": [SYSTEM, {"role": "user", "content": "Write a short poem about the river stone."}],
        "completions": [
            [{"role": "assistant", "content": text}]
            for text in ("A stone in the river.", "Cloud, garden, music.", "No.", "The river stone sleeps.")
        ],
        "ranks": [1, 3, 4, 2],
    },
]


def family_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the runner loads it
    return tokenizer


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_grouped_reward_loss_and_gradients_equal_trls_on_templated_chat_rows(
    family: str,
    packing: bool,
    modern_model_dirs: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    model_dir = modern_model_dirs[family]
    trl, grouped = reward_trainers(model_dir, family_tokenizer(model_dir), tmp_path, ROWS, packing=packing)

    trl_loss = whole_batch_loss(trl, trl.model)
    grouped_loss = whole_batch_loss(grouped, grouped.model)

    assert_same_loss_and_gradients(trl_loss, grouped_loss, trl.model, grouped.model)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_grouped_dpo_loss_with_an_sft_term_equals_trls_on_templated_chat_rows(
    family: str,
    packing: bool,
    modern_model_dirs: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    model_dir = modern_model_dirs[family]
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
    trl, grouped = dpo_trainers(
        model_dir, family_tokenizer(model_dir), tmp_path, ROWS, packing=packing, losses=losses
    )

    trl_loss = whole_batch_loss(trl, trl.model)
    grouped_loss = whole_batch_loss(grouped, grouped.model)

    assert_same_loss_and_gradients(trl_loss, grouped_loss, trl.model, grouped.model)
