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
`training.loading.causal_lm_load`, an adapter through PEFT (which reads
adapter_model.safetensors; a folder without it is refused).

Backends. `GenerationBackend` is what a generation job samples through;
`generation_backend_load` builds the one a worker is set to use
(`RANKWISE_GENERATION_BACKEND`, default "hf"):

- `HFBackend`: Hugging Face `generate` with `PerSampleSampler`, on any device
  (the CPU path, the tests);
- `VLLMBackend`: vLLM on a GPU worker (imported only there: vLLM is in
  requirements-gpu.txt), a PEFT LoRA adapter served with vLLM's
  `LoRARequest` beside the base weights, never merged. Each sample is its own
  request whose `SamplingParams.seed` is the sample's seed, so vLLM's samples
  do not depend on the batching either (they are not the HF backend's
  samples: the two draw differently from the same seed).

Both are handed the same prompt token ids (`prompt_token_ids`, through the
policy's Hugging Face tokenizer) and return stripped texts without special
tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

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
GENERATION_BACKENDS = ("hf", "vllm")
# Set on a worker (its generation processes inherit it) to choose how it samples.
BACKEND_ENV = "RANKWISE_GENERATION_BACKEND"
DEFAULT_BACKEND = "hf"
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


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
    # "hf" or "vllm"; "" for the generating worker's own choice (`generation_backend_name`).
    backend: str = ""

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
        if self.backend and self.backend not in GENERATION_BACKENDS:
            raise ValueError(f"backend must be one of {GENERATION_BACKENDS} or empty, got {self.backend!r}")
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

    from training.loading import causal_lm_load

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


# --- backends -------------------------------------------------------------------


def generation_backend_name(environ: dict[str, str] | None = None) -> str:
    """The backend this worker generates with: `RANKWISE_GENERATION_BACKEND`, "hf" when unset."""
    import os

    value = (environ if environ is not None else os.environ).get(BACKEND_ENV, "").strip().lower()
    if not value:
        return DEFAULT_BACKEND
    if value not in GENERATION_BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(GENERATION_BACKENDS)}; got {value!r}")
    return value


class GenerationBackend(Protocol):
    """Samples replies to token-id prompts, each reply drawn with its own seed."""

    name: str
    tokenizer: PreTrainedTokenizerBase

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        seeds: Sequence[Sequence[int]],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        on_step: Callable[[], None] | None = None,
    ) -> list[list[str]]:
        """`len(seeds[i])` replies to prompt i, the j-th drawn with `seeds[i][j]`."""
        ...


class HFBackend:
    """Hugging Face `generate` (any device): `samples_generate` over a loaded policy."""

    name = "hf"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | PeftModel) -> None:
        self.tokenizer = tokenizer
        self.model = model

    @classmethod
    def load(cls, policy: PolicySpec, *, device: str | None = None) -> HFBackend:
        return cls(*policy_load(policy, device=device))

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        seeds: Sequence[Sequence[int]],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        on_step: Callable[[], None] | None = None,
    ) -> list[list[str]]:
        return samples_generate(
            self.tokenizer,
            self.model,
            prompt_ids,
            seeds,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            on_step=on_step,
        )


def _adapter_lora_rank(adapter: Path) -> int:
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no adapter_config.json in the adapter folder {adapter}")
    config = json.loads(config_file.read_text())
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ValueError(
            f"vLLM serves LoRA adapters only; {adapter} holds a {config.get('peft_type')!r} adapter "
            f"(generate with {BACKEND_ENV}=hf)"
        )
    return int(config.get("r", 16))


class VLLMBackend:
    """vLLM on a GPU worker; a LoRA adapter is served next to the base weights, not merged into them."""

    name = "vllm"

    def __init__(
        self,
        policy: PolicySpec,
        *,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        dtype: str = "auto",
    ) -> None:
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as error:
            raise RuntimeError(
                f"{BACKEND_ENV}=vllm but vLLM is not installed on this worker "
                "(pip install -r requirements-gpu.txt on GPU workers)"
            ) from error
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"{BACKEND_ENV}=vllm needs a GPU; this worker has none")
        from transformers import AutoTokenizer

        base = policy.base_model
        local = Path(base).exists()
        # The Hugging Face tokenizer renders prompts, so both backends see the same token ids.
        self.tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=local)
        self.lora_request = None
        lora: dict[str, Any] = {}
        if policy.adapter:
            adapter = Path(policy.adapter)
            if not (adapter / ADAPTER_WEIGHTS_FILENAME).is_file():
                raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_FILENAME} in the adapter folder {adapter}")
            rank = _adapter_lora_rank(adapter)
            # vLLM takes a few rank ceilings only; the smallest that holds the adapter's rank.
            ceiling = next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])
            lora = {"enable_lora": True, "max_lora_rank": ceiling, "max_loras": 1}
            self.lora_request = LoRARequest("policy", 1, str(adapter))
        self.llm = LLM(
            model=base,
            tokenizer=base,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=0,
            **lora,
        )

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        seeds: Sequence[Sequence[int]],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        on_step: Callable[[], None] | None = None,
    ) -> list[list[str]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(prompt_ids) != len(seeds):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} seed lists")
        requests: list[Any] = []
        params: list[Any] = []
        for ids, row in zip(prompt_ids, seeds, strict=True):
            for seed in row:
                requests.append(TokensPrompt(prompt_token_ids=list(ids)))
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=temperature,
                        top_p=top_p,
                        top_k=-1,
                        max_tokens=max_new_tokens,
                        seed=int(seed),
                        skip_special_tokens=True,
                    )
                )
        outputs = self.llm.generate(requests, params, lora_request=self.lora_request, use_tqdm=False)
        if on_step is not None:
            on_step()
        texts = [output.outputs[0].text.replace("\x00", "").strip() for output in outputs]
        grouped: list[list[str]] = []
        start = 0
        for row in seeds:
            grouped.append(texts[start : start + len(row)])
            start += len(row)
        return grouped


def generation_backend_load(
    policy: PolicySpec, *, backend: str = "", device: str | None = None
) -> GenerationBackend:
    """The policy loaded for sampling with `backend` ("" : this worker's `generation_backend_name()`)."""
    name = backend or generation_backend_name()
    if name not in GENERATION_BACKENDS:
        raise ValueError(f"backend must be one of {GENERATION_BACKENDS}; got {name!r}")
    if name == "vllm":
        return VLLMBackend(policy)
    return HFBackend.load(policy, device=device)
