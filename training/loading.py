"""Loading a causal language model for inference: local folders or hub ids, weights from safetensors only.

Generation (`training.generation`) and the demo (`training.demo`) both load
policies this way; it imports the machine-learning stack only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def causal_lm_load(name_or_path: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, model) for a local directory or a hub id, weights from safetensors only.

    A path that exists on disk never falls through to the hub.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_path).exists()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=local, use_safetensors=True)
    if tokenizer.pad_token is None:
        # Hub models such as GPT-2 ship without one; batched generation needs it.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model
