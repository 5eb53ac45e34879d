from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from training.demo.model import (
    DEMO_QUICK_SETTINGS,
    DEMO_REPORT_FILENAME,
    completions_generate_greedy,
    demo_model_build,
    demo_model_is_complete,
)
from training.loading import causal_lm_load

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@pytest.fixture(scope="module")
def quick_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("quick") / "demo-sft"
    demo_model_build(out_dir=out_dir, **DEMO_QUICK_SETTINGS)
    return out_dir


# --- the tiny fixture model ------------------------------------------------------


def test_the_tiny_tokenizer_round_trips_text(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    text = "Mia has 17 apples and buys 5 more.  Ünïcode too: 🙂"

    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_the_tiny_tokenizer_has_a_pad_token_apart_from_eos(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)

    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_the_tiny_tokenizer_renders_a_conversation_with_its_chat_template(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "4"}], tokenize=False)

    assert prompt == "<|system|>\nBe brief.<|endoftext|><|user|>\n2 + 2?<|endoftext|><|assistant|>\n"
    assert full == prompt + "4" + tokenizer.eos_token


def test_the_tiny_model_loads_as_a_causal_lm_and_as_a_one_label_classifier(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    batch = tokenizer(["a short one", "a somewhat longer text here"], return_tensors="pt", padding=True)

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    scorer = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, local_files_only=True
    )

    assert lm(**batch).logits.shape[:2] == batch["input_ids"].shape
    assert scorer.config.pad_token_id == tokenizer.pad_token_id
    assert scorer(**batch).logits.shape == (2, 1)


# --- the quick demo build --------------------------------------------------------


def test_the_quick_build_writes_safetensors_weights_and_no_pickles(quick_model_dir: Path) -> None:
    files = [path for path in quick_model_dir.rglob("*") if path.is_file()]

    assert demo_model_is_complete(quick_model_dir)
    assert (quick_model_dir / "model.safetensors").is_file()
    assert not [path for path in files if path.suffix in PICKLE_SUFFIXES]


def test_the_quick_build_leaves_nothing_beside_its_folder(quick_model_dir: Path) -> None:
    assert [path.name for path in quick_model_dir.parent.iterdir()] == ["demo-sft"]


def test_the_quick_build_reports_how_it_was_made_and_an_accuracy(quick_model_dir: Path) -> None:
    report = json.loads((quick_model_dir / DEMO_REPORT_FILENAME).read_text())

    assert report["steps"] == DEMO_QUICK_SETTINGS["steps"]
    assert report["seed"] == 0
    assert report["n_layer"] == DEMO_QUICK_SETTINGS["n_layer"]
    assert 0.0 <= report["accuracy"] <= 1.0
    assert 0.0 < report["train_labels_correct"] < 1.0


def test_the_quick_model_loads_back_offline_and_generates_text(quick_model_dir: Path) -> None:
    tokenizer, model = causal_lm_load(str(quick_model_dir))
    assert tokenizer.padding_side == "right"
    messages = [[{"role": "user", "content": "Leo has 3 coins and buys 4 more. How many coins?"}]]

    replies = completions_generate_greedy(tokenizer, model, messages, max_new_tokens=8)

    assert len(replies) == 1
    assert isinstance(replies[0], str)
    assert tokenizer.padding_side == "right"


# --- the command -----------------------------------------------------------------


def test_the_command_refuses_to_overwrite_a_model_without_force(quick_model_dir: Path) -> None:
    before = (quick_model_dir / "model.safetensors").read_bytes()
    out = StringIO()

    call_command("build_demo_model", "--out", str(quick_model_dir), "--quick", stdout=out)

    assert "already exists" in out.getvalue()
    assert "--force" in out.getvalue()
    assert (quick_model_dir / "model.safetensors").read_bytes() == before


def test_the_command_rebuilds_with_force_and_prints_the_report(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo-sft"
    out_dir.mkdir()
    (out_dir / "config.json").write_text("{}")
    (out_dir / "stale.txt").write_text("from an earlier, unfinished build")
    out = StringIO()

    call_command("build_demo_model", "--out", str(out_dir), "--quick", "--steps", "5", "--force", stdout=out)

    assert demo_model_is_complete(out_dir)
    assert not (out_dir / "stale.txt").exists()
    assert "held-out accuracy" in out.getvalue()
    assert json.loads((out_dir / DEMO_REPORT_FILENAME).read_text())["steps"] == 5


def test_the_command_never_replaces_a_folder_that_holds_no_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")

    with pytest.raises(CommandError, match="no model"):
        call_command("build_demo_model", "--out", str(tmp_path), "--quick", "--force", stdout=StringIO())

    assert (tmp_path / "notes.txt").read_text() == "not a model"
