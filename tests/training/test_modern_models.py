"""Tiny models of modern families (Llama, Qwen2, Gemma) with their chat templates: loading and rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.modern_models import FAMILIES, FAMILY_SPECS, modern_model_dirs  # noqa: F401

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant who answers briefly."},
    {"role": "user", "content": "What is 3 plus 4?"},
]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_familys_template_renders_the_system_turn_and_the_generation_prompt(
    modern_model_dirs: dict[str, Path],  # noqa: F811
    family: str,
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(modern_model_dirs[family], local_files_only=True)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=False)

    assert "You are a careful assistant who answers briefly." in rendered
    assert rendered.index("careful assistant") < rendered.index("What is 3 plus 4?")
    assert rendered.startswith(without) and len(rendered) > len(without)
    expected_opening = {
        "llama": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>",
        "qwen2": "<|im_start|>system\n",
        "gemma": "<bos><start_of_turn>user\nYou are a careful",
    }[family]
    assert rendered.startswith(expected_opening)
    # every special token of the template is one token, not spelt out in pieces
    for token in FAMILY_SPECS[family].special_tokens:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reward_model_loads_as_a_sequence_classifier_with_a_pad_token_even_where_the_family_has_none(
    modern_model_dirs: dict[str, Path],  # noqa: F811
    family: str,
    tmp_path: Path,
) -> None:
    from training.runner import RunSpec, _model_load, _tokenizer_load

    spec = RunSpec.with_defaults(
        kind="reward",
        run_id=1,
        base_model=str(modern_model_dirs[family]),
        train_file="unused.jsonl",
        test_file=None,
        output_dir=str(tmp_path),
    )
    tokenizer = _tokenizer_load(spec)
    model = _model_load(spec, tokenizer, reward=True)

    assert tokenizer.pad_token_id is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    if FAMILY_SPECS[family].pad_token is None:
        assert tokenizer.pad_token == tokenizer.eos_token
    else:
        assert tokenizer.pad_token == FAMILY_SPECS[family].pad_token
    assert type(model).__name__.endswith("ForSequenceClassification")
