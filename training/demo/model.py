"""The project's own small tokenizer and causal LM, built offline from generated data.

Nothing here touches the Hugging Face hub: the tokenizer is trained on the
given texts, the model starts from random weights, and everything is saved
with safetensors only, so tests and the demo run on a machine without network.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

# Re-exported: where a demo model's files are decided lives beside its progress (a light module).
from config.demo_progress import DEMO_MODEL_FILES as DEMO_MODEL_FILES
from config.demo_progress import DEMO_REPORT_FILENAME as DEMO_REPORT_FILENAME
from config.demo_progress import demo_model_is_complete as demo_model_is_complete
from training.demo.task import (
    DemoProblem,
    answer_confused,
    answer_is_correct,
    completion_canonical,
    demo_problems,
    sum_is_confusing,
)

BOS_TOKEN = "<|bos|>"  # noqa: S105 (a special token, not a secret)
# One token ends a plain text and an assistant turn alike, so generation from
# a chat prompt stops at the end of the answer.
EOS_TOKEN = "<|endoftext|>"  # noqa: S105 (a special token, not a secret)
PAD_TOKEN = "<|pad|>"  # noqa: S105 (a special token, not a secret)
UNK_TOKEN = "<|unk|>"  # noqa: S105 (a special token, not a secret)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each turn is "<|role|>\n{content}<|endoftext|>". The assistant's content sits
# inside {% generation %} so TRL's assistant-only loss can find it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '" + EOS_TOKEN + "' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '" + EOS_TOKEN + "' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def tokenizer_train(texts: Iterable[str], *, vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, ready for transformers and TRL.

    Digits are split one per token (as Llama 3 and GPT-NeoX do) so a small
    model sees numbers as sequences of digits it can learn to add.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    special_tokens = [EOS_TOKEN, BOS_TOKEN, PAD_TOKEN, UNK_TOKEN, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def causal_lm_create(
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    n_positions: int = 512,
    dropout: float = 0.0,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2-style model sized to `tokenizer`'s vocabulary."""
    import torch

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# --- the demo SFT policy ---------------------------------------------------------

DEMO_DEFAULT_STEPS = 1000
# A model that builds in seconds: enough for tests of the plumbing, not to learn.
DEMO_QUICK_SETTINGS: dict[str, Any] = {
    "steps": 30,
    "train_count": 300,
    "eval_count": 16,
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 32,
}


@dataclass(frozen=True)
class DemoModelReport:
    out_dir: str
    seed: int
    steps: int
    noise: float
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    parameters: int
    train_examples: int
    train_labels_correct: float
    batch_size: int
    learning_rate: float
    final_loss: float | None
    eval_problems: int
    accuracy: float
    seconds: float
    prompt_format: str = "chat"
    trainer: str = "trl.SFTTrainer"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def demo_messages(problem: DemoProblem) -> list[dict[str, str]]:
    """The chat prompt the demo policy is trained and evaluated on."""
    # The user turn alone, as a policy is usually prompted; a system prompt
    # the model was always trained with would be missed when it is left out.
    return [{"role": "user", "content": problem.prompt}]


# On a confusing sum the teacher writes its one wrong answer this often (the
# right one otherwise), so the SFT policy's most likely answer there is wrong
# while its samples still hold the right one: what preferences can fix.
CONFUSED_ANSWER_RATE = 0.6


def answer_noisy(problem: DemoProblem, *, rng: random.Random, noise: float) -> int:
    """The answer the demo's imperfect teacher writes.

    A `noise` share of the sums are confusing (`sum_is_confusing`): on those
    the teacher writes the same wrong answer (`answer_confused`) with
    probability CONFUSED_ANSWER_RATE and the right one otherwise. Other sums
    it always gets right. Mistakes that repeat, as a person's do, rather
    than random ones that averaging would wash out.
    """
    if sum_is_confusing(problem, share=noise) and rng.random() < CONFUSED_ANSWER_RATE:
        return answer_confused(problem)
    return problem.answer


def demo_sft_rows(problems: list[DemoProblem], *, seed: int, noise: float) -> list[dict[str, Any]]:
    """TRL conversational prompt/completion rows, answered by the imperfect teacher (`answer_noisy`)."""
    rng = random.Random(f"rankwise-demo-noise:{seed}")  # noqa: S311 (reproducible data, not secrets)
    rows = []
    for problem in problems:
        answer = answer_noisy(problem, rng=rng, noise=noise)
        rows.append(
            {
                "prompt": demo_messages(problem),
                "completion": [
                    {"role": "assistant", "content": completion_canonical(problem, answer=answer)}
                ],
                "correct": answer == problem.answer,
            }
        )
    return rows


def completions_generate_greedy(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    messages: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> list[str]:
    """The greedy assistant reply to each chat prompt, decoded without special tokens."""
    import torch

    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    replies: list[str] = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            # Decoder-only models continue from the right edge, so prompts pad
            # on the left; per call, so the tokenizer's own setting is untouched.
            padding_side="left",
            add_special_tokens=False,
        )
        with torch.no_grad():
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return [reply.strip() for reply in replies]


def demo_accuracy(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, problems: list[DemoProblem]
) -> float:
    """The share of `problems` whose greedy answer is right."""
    if not problems:
        return 0.0
    replies = completions_generate_greedy(tokenizer, model, [demo_messages(p) for p in problems])
    right = sum(answer_is_correct(problem, reply) for problem, reply in zip(problems, replies, strict=True))
    return right / len(problems)


def demo_model_build(
    *,
    out_dir: Path,
    steps: int,
    seed: int = 0,
    noise: float = 0.4,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    train_count: int = 8000,
    eval_count: int = 200,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    vocab_size: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> DemoModelReport:
    """Train the demo SFT policy from scratch on noisy arithmetic answers and save it to `out_dir`.

    1. Draw `train_count` train problems and give each a canonical answer
       from an imperfect teacher: on a `noise` share of the sums it mostly
       writes one fixed wrong answer (`answer_noisy`).
    2. Train a byte-level BPE tokenizer on that corpus and a random GPT-2.
    3. Fine-tune with TRL's SFTTrainer on conversational prompt/completion
       rows (loss on the completion only), CPU, full precision.
    4. Measure greedy accuracy on `eval_count` held-out test problems.
    5. Save model and tokenizer (safetensors only) and `rankwise_demo.json`
       into a sibling folder, then swap it into `out_dir`, so a half-built
       model never sits at `out_dir`.

    `progress`, if given, is called with (step, total steps) after every
    optimizer step; the trainer then prints nothing itself.
    """
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepProgress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if progress is not None:
                progress(state.global_step, state.max_steps)

    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    rows = demo_sft_rows(demo_problems(count=train_count, seed=seed, split="train"), seed=seed, noise=noise)
    corpus = [f"{row['prompt'][0]['content']}\n{row['completion'][0]['content']}" for row in rows]
    tokenizer = tokenizer_train(corpus, vocab_size=vocab_size)
    tokenizer.model_max_length = 256
    model = causal_lm_create(
        tokenizer, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=256, seed=seed
    )

    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}-", dir=out_dir.parent) as staging:
        staging_dir = Path(staging)
        args = SFTConfig(
            output_dir=str(staging_dir / "trainer"),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 20),
            weight_decay=0.01,
            max_length=128,
            logging_steps=max(1, min(50, steps // 10)),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            fp16=False,
            seed=seed,
            data_seed=seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "completion")} for r in rows]),
            processing_class=tokenizer,
        )
        if progress is not None:
            # Loss dictionaries on the console say nothing about how long is left.
            trainer.remove_callback(PrinterCallback)
            trainer.add_callback(StepProgress())
            progress(0, steps)
        result = trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        final_loss = float(losses[-1]) if losses else float(result.training_loss)

        model = trainer.model
        model_dir = staging_dir / "model"
        # Saved before evaluating: a batched call leaves its padding settings
        # on the fast tokenizer, and tokenizer.json would keep them.
        tokenizer.backend_tokenizer.no_padding()
        tokenizer.backend_tokenizer.no_truncation()
        tokenizer.save_pretrained(model_dir)
        model.save_pretrained(model_dir, safe_serialization=True)
        accuracy = demo_accuracy(tokenizer, model, demo_problems(count=eval_count, seed=seed, split="test"))
        report = DemoModelReport(
            out_dir=str(out_dir),
            seed=seed,
            steps=steps,
            noise=noise,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            vocab_size=len(tokenizer),
            parameters=sum(p.numel() for p in model.parameters()),
            train_examples=len(rows),
            train_labels_correct=sum(r["correct"] for r in rows) / len(rows),
            batch_size=batch_size,
            learning_rate=learning_rate,
            final_loss=final_loss,
            eval_problems=eval_count,
            accuracy=accuracy,
            seconds=round(time.monotonic() - started, 1),
        )
        (model_dir / DEMO_REPORT_FILENAME).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        model_dir.rename(out_dir)
    return report


def demo_report_read(out_dir: Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / DEMO_REPORT_FILENAME).read_text())
