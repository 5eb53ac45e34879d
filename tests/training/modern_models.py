"""Tiny random-initialised models of modern families, each with a tokenizer that carries its family's chat template.

Llama (Llama 3 headers, no pad token), Qwen2 (ChatML, a pad token that is not the
EOS) and Gemma (turns, a BOS added by the tokenizer, the system turn folded into
the first user turn as Gemma's own template does). The tokenizers are trained
here, on a few sentences, with the `tokenizers` library, so nothing is read from
the hub; the templates follow the shape of each family's published template.

`modern_model_write(family, directory)` writes a folder that loads offline with
AutoTokenizer, AutoModelForCausalLM and AutoModelForSequenceClassification.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

FAMILIES = ("llama", "qwen2", "gemma")

LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)

QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- endif %}"
)

# Gemma 3's template: no system role of its own; the system text opens the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set first_user_prefix = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim }}"
    "{{- '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<start_of_turn>model\n' }}"
    "{%- endif %}"
)


# Llama 3's pre-tokenizer pattern (Qwen2's differs only in splitting digits one by one).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Family:
    name: str
    chat_template: str
    special_tokens: list[str]
    bos_token: str | None
    eos_token: str
    pad_token: str | None
    add_bos: bool  # whether the tokenizer itself prepends the BOS to plain text
    model_type: str
    # The pre-tokenizer's split (Llama 3 and Qwen2 keep runs of newlines together); None: GPT-2's.
    split_pattern: str | None = None


FAMILY_SPECS: dict[str, Family] = {
    "llama": Family(
        name="llama",
        chat_template=LLAMA_CHAT_TEMPLATE,
        special_tokens=["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token=None,  # Llama ships without one
        add_bos=True,
        model_type="llama",
        split_pattern=LLAMA3_SPLIT,
    ),
    "qwen2": Family(
        name="qwen2",
        chat_template=QWEN2_CHAT_TEMPLATE,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        add_bos=False,
        model_type="qwen2",
        split_pattern=LLAMA3_SPLIT,
    ),
    "gemma": Family(
        name="gemma",
        chat_template=GEMMA_CHAT_TEMPLATE,
        special_tokens=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        add_bos=True,
        model_type="gemma",
    ),
}

SENTENCES = [
    "You are a careful assistant who answers briefly.",
    "What is the capital of France? Paris is the capital of France.",
    "Write a short poem about the river stone and the apple tree.",
    "The cloud over the garden turned grey before the music started.",
    "Answer with one word: yes or no.",
    "What is 3 plus 4? It is 7. What is 12 plus 30? It is 42.",
    "Summarise the paper in two sentences, please.",
    "A good answer is short, correct and polite.",
    "Tell me a story about a cat, a dog and a paper boat.",
    "Hello! How can I help you today?",
]


def tokenizer_build(family: str, *, vocab_size: int = 400, sentences: list[str] | None = None) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences, with the family's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILY_SPECS[family]
    tokenizer = Tokenizer(models.BPE())
    if spec.split_pattern:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(spec.split_pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=spec.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences or SENTENCES, trainer=trainer)
    if spec.add_bos and spec.bos_token:
        bos_id = tokenizer.token_to_id(spec.bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos_token} $A",
            pair=f"{spec.bos_token} $A {spec.bos_token} $B",
            special_tokens=[(spec.bos_token, bos_id)],
        )
    values: dict[str, Any] = {
        "tokenizer_object": tokenizer,
        "eos_token": spec.eos_token,
        "chat_template": spec.chat_template,
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [
            token
            for token in spec.special_tokens
            if token not in (spec.bos_token, spec.eos_token, spec.pad_token)
        ],
    }
    if spec.bos_token:
        values["bos_token"] = spec.bos_token
    if spec.pad_token:
        values["pad_token"] = spec.pad_token
    return PreTrainedTokenizerFast(**values)


def model_config(
    family: str, tokenizer: Any, *, hidden_size: int = 32, layers: int = 2, max_positions: int = 256
) -> Any:
    """A tiny config of the family: 2 layers, 4 heads (2 key/value heads: grouped-query attention)."""
    from transformers import GemmaConfig, LlamaConfig, Qwen2Config

    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
    }
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma":
        return GemmaConfig(**common, head_dim=hidden_size // 4)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def modern_model_write(family: str, directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random-initialised model of `family` and its tokenizer (safetensors) to `directory`."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_build(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(family, tokenizer))
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def modern_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder per family (import this fixture into a test module to use it)."""
    root = tmp_path_factory.mktemp("modern-models")
    return {family: modern_model_write(family, root / family) for family in FAMILIES}
