"""Sampling completions from a policy, inside a generation job's own process.

Nothing here touches the database: `training.generation_process` reads the
job, calls these functions and writes what they return.

Seeds. Every completion draws its tokens from its own `torch.Generator`,
seeded from the job's seed, the prompt's content hash and the completion's
index among the prompt's completions (`prompt_seed`, `sample_seed`). A
completion's text therefore does not depend on which other prompts shared
its batch, or on whether an earlier attempt already wrote some of them: the
same policy, settings and seed write the same texts (on the same hardware
and batch shapes; float rounding may differ across devices).

How: `PerSampleSampler` is a logits processor that applies the temperature
and top-p itself, draws each row's next token with that row's generator, and
hands `generate` a one-hot distribution, so `generate`'s own multinomial
draw can only pick that token.

The weights are loaded with safetensors only: the base model through
`training.demo_model.causal_lm_load`, an adapter through PEFT (which reads
adapter_model.safetensors; a folder without it is refused).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from training import prompts
from training.prompts import prompt_token_ids as prompt_token_ids
from training.prompts import prompt_uses_chat as prompt_uses_chat

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PromptFormat = Literal["chat", "text", "auto"]
PROMPT_FORMATS = ("chat", "text", "auto")
SEED_BITS = 63  # torch takes up to 64; 63 stays a positive signed integer everywhere (JSON, Postgres)
ADAPTER_WEIGHTS_FILENAME = "adapter_model.safetensors"
# Sequences (prompts × samples) generated together; a prompt's samples never split across batches.
SEQUENCES_PER_BATCH = 64


def _seed_from(text: str) -> int:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


def prompt_seed(*, job_seed: int, prompt_hash: str) -> int:
    """The seed of one prompt in a job: from the job's seed and the prompt's content hash.

    The content hash, not the row id, so the same prompt gets the same seed
    in another project or on another database.
    """
    return _seed_from(f"rankwise-generation:{int(job_seed)}:{prompt_hash}")


def sample_seed(*, prompt_seed: int, index: int) -> int:
    """The seed of the generator that draws the prompt's `index`-th sample."""
    return _seed_from(f"rankwise-sample:{int(prompt_seed)}:{int(index)}")


@dataclass(frozen=True)
class PolicySpec:
    """Where a policy's weights are and how it reads prompts."""

    base_model: str
    adapter: str = ""
    # chat: always through the chat template (if the tokenizer has one);
    # text: never; auto: for chat prompts only.
    prompt_format: str = "auto"


@dataclass(frozen=True)
class BestOfNSpec:
    """A best-of-n policy's reward model: keep the highest-scored of `n` samples."""

    n: int
    reward_model_id: int
    reward_model_path: str
    base_policy_id: int
    # The reward model's dataset format: conversational rows, or standard strings.
    conversational: bool


@dataclass(frozen=True)
class GenerationSpec:
    """Everything the generation process needs, written by the task as JSON next to its log."""

    job_id: int
    attempt: int
    policy_id: int
    project_id: int
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    policy: PolicySpec
    best_of_n: BestOfNSpec | None = None
    sequences_per_batch: int = SEQUENCES_PER_BATCH

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be above 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.sequences_per_batch < 1:
            raise ValueError(f"sequences_per_batch must be at least 1, got {self.sequences_per_batch}")
        if self.policy.prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"prompt_format must be one of {PROMPT_FORMATS}, got {self.policy.prompt_format!r}"
            )

    @property
    def samples_per_completion(self) -> int:
        return self.best_of_n.n if self.best_of_n else 1

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> GenerationSpec:
        data = json.loads(Path(path).read_text())
        data["policy"] = PolicySpec(**data["policy"])
        if data.get("best_of_n"):
            data["best_of_n"] = BestOfNSpec(**data["best_of_n"])
        return cls(**data)


# --- loading --------------------------------------------------------------------


def device_pick() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def policy_load(
    policy: PolicySpec, *, device: str | None = None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel | PeftModel]:
    """(tokenizer, model) of a policy in eval mode: the base model, plus its PEFT adapter if it has one.

    On a GPU the weights are cast to bfloat16 where the GPU supports it
    (generation only: nothing is trained here).
    """
    import torch

    from training.demo_model import causal_lm_load

    device = device or device_pick()
    tokenizer, model = causal_lm_load(policy.base_model)
    if policy.adapter:
        from peft import PeftModel

        adapter = Path(policy.adapter)
        if not (adapter / ADAPTER_WEIGHTS_FILENAME).is_file():
            raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_FILENAME} in the adapter folder {adapter}")
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        model = model.to(dtype=torch.bfloat16)
    model.to(device)
    model.eval()
    return tokenizer, model


# --- prompts --------------------------------------------------------------------


def prompt_format_resolve(policy: PolicySpec) -> str:
    """The policy's prompt format; "auto" becomes what the demo model's report says it was trained on."""
    return prompts.prompt_format_resolve(prompt_format=policy.prompt_format, base_model=policy.base_model)


# --- sampling -------------------------------------------------------------------


class PerSampleSampler:
    """A logits processor that samples each row with its own generator (see the module's docstring).

    `on_step` is called once per generated token (the process heartbeats from it).
    """

    def __init__(
        self,
        seeds: Sequence[int],
        *,
        temperature: float,
        top_p: float,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        self.seeds = list(seeds)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.on_step = on_step
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import torch

        if len(self.seeds) != scores.shape[0]:
            raise ValueError(f"{len(self.seeds)} seeds for {scores.shape[0]} rows")
        if not self.generators:
            self.generators = [torch.Generator(device=scores.device).manual_seed(seed) for seed in self.seeds]
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            # Keep a token while the mass before it is below top_p (so at least the first).
            drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= self.top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        chosen = torch.stack(
            [
                torch.multinomial(row, 1, generator=generator)
                for row, generator in zip(probs, self.generators, strict=True)
            ]
        )
        one_hot = torch.full_like(scores, float("-inf"))
        one_hot.scatter_(-1, chosen, 0.0)
        if self.on_step is not None:
            self.on_step()
        return one_hot


def samples_generate(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel | PeftModel,
    prompt_ids: Sequence[Sequence[int]],
    seeds: Sequence[Sequence[int]],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    on_step: Callable[[], None] | None = None,
) -> list[list[str]]:
    """`len(seeds[i])` sampled replies to each prompt, the j-th drawn with `seeds[i][j]`.

    One `generate` call: each prompt is encoded once and expanded with
    `num_return_sequences`, so every prompt must ask for the same number of
    samples. Prompts are padded on the left (decoder-only models continue
    from the right edge). Replies are decoded without special tokens and
    stripped.
    """
    import torch

    if len(prompt_ids) != len(seeds):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} seed lists")
    if not prompt_ids:
        return []
    count = len(seeds[0])
    if count < 1 or any(len(row) != count for row in seeds):
        raise ValueError("every prompt of a batch needs the same number (≥ 1) of seeds")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    device = next(model.parameters()).device
    sampler = PerSampleSampler(
        [seed for row in seeds for seed in row], temperature=temperature, top_p=top_p, on_step=on_step
    )
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            num_return_sequences=count,
            logits_processor=[sampler],
            # The sampler applies temperature and top-p; generate's own warpers
            # (and a hub model's defaults for them) must leave its choice alone.
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            min_p=None,
            typical_p=1.0,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    # PostgreSQL text and jsonb cannot hold NUL, which an untrained model may well emit.
    texts = [text.replace("\x00", "").strip() for text in texts]
    return [texts[start : start + count] for start in range(0, len(texts), count)]


def best_index(scores: Sequence[float]) -> int:
    """The index of the highest score (the first one on a tie)."""
    if not scores:
        raise ValueError("no scores to choose from")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
