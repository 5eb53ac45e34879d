"""Fixtures for the machine side: a tiny offline tokenizer and model on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.demo.task import completion_canonical, demo_problems

# Nothing in these tests may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _tiny_corpus() -> list[str]:
    problems = demo_problems(count=300, seed=0, split="train")
    plain = [f"{problem.prompt} {completion_canonical(problem)}" for problem in problems]
    chat = [
        f"<|system|>\nYou solve arithmetic.<|endoftext|><|user|>\n{problem.prompt}<|endoftext|>"
        f"<|assistant|>\n{completion_canonical(problem)}<|endoftext|>"
        for problem in problems[:100]
    ]
    return plain + chat


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a trained tokenizer and an untrained 2-layer GPT-2 (safetensors).

    Loads offline with AutoTokenizer, AutoModelForCausalLM and
    AutoModelForSequenceClassification(num_labels=1).
    """
    from training.demo.model import causal_lm_create, tokenizer_train

    directory = tmp_path_factory.mktemp("tiny-model")
    tokenizer = tokenizer_train(_tiny_corpus(), vocab_size=600)
    model = causal_lm_create(tokenizer, n_layer=2, n_head=2, n_embd=32, n_positions=256)
    # The saved config must agree with the tokenizer, or later trainers would
    # truncate past the model's positions.
    tokenizer.model_max_length = 256
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
