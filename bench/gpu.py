"""Benchmark on a GPU: grouped vs TRL reward and DPO training on a ~0.5B modern model, and generation HF vs vLLM.

    .venv/bin/python bench/gpu.py [--ks 4,9] [--groups 4] [--steps 5] [--peft full] [--kinds reward,dpo]
                                  [--generation-prompts 64] [--new-tokens 256] [--smoke]

On a machine without a CUDA GPU it says so and exits 0 (`--smoke` runs every
step on the CPU with a tiny model instead, to check the script, not to measure).

1. Builds a Llama-architecture model of Qwen2.5-0.5B's shape (24 layers, 896
   wide, 14 heads with 2 key/value heads, gated MLP of 4,864, 151,936-token
   vocabulary, tied embeddings: ~494M parameters; Qwen2 only adds q/k/v
   biases, but transformers reads a qwen2 folder's tokenizer as Qwen2's BPE)
   with random weights, which cost the same as trained ones, and a word-level
   tokenizer of as many tokens, so that text of n random words is n tokens.
2. For each K, rankings shaped like chat data: a 200-token prompt and K
   completions of 100 to 400 tokens each (uniform), in bf16 mixed precision
   (float32 master weights, as the runner trains), the same comparisons a step
   for each trainer (`bench/trainers.py` explains the layout), one warm-up step
   and `steps` timed ones; the median step counts.
3. Prints one table: comparisons/s and the grouped/TRL ratio against the goal
   0.8·(K−1), tokens/s (the tokens each trainer forwarded, its `num_tokens`),
   MFU = 6·N·tokens/s over the device's peak dense bf16 FLOP/s (N: the
   model's parameters; the DPO reference forward is not counted, nor is
   anything LoRA saves, so with `--peft lora` MFU is nominal), and the peak
   memory torch allocated.
4. Then generation on the same model: `--generation-prompts` prompts of 200
   tokens, `--new-tokens` tokens each (EOS ignored), per-sample seeds, with
   the Hugging Face backend (`training.generation.samples_generate`, all
   prompts in one batch) and, where vLLM is installed, with vLLM
   (`SamplingParams.seed` per sample); tokens/s and the vLLM/HF ratio
   against the goal 10.

Targets (from the issue): grouped/TRL ≥ 0.8·(K−1), MFU ≥ 35%, vLLM ≥ 10× HF.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# Qwen2.5-0.5B's shape.
MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151_936,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
SMOKE_SHAPE: dict[str, Any] = {
    **MODEL_SHAPE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 2000,
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPT_TOKENS = 200
COMPLETION_TOKENS = (100, 400)

# Peak dense (no sparsity) bf16 tensor FLOP/s, from the vendors' data sheets; the first
# name found in the device's name counts, so more specific names come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("B100", 1.75e15),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("A6000", 155e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def peak_bf16_flops(device_name: str) -> float | None:
    """The device's peak dense bf16 FLOP/s, or None for a device not in the table."""
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_name.lower():
            return flops
    return None


# --- model and data ------------------------------------------------------------------------


def _word(index: int) -> str:
    return f"w{index}"


def model_build(folder: Path, shape: dict[str, Any]) -> int:
    """A random-initialised Llama of `shape` and its word-level tokenizer in `folder`; returns N (parameters)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = shape["vocab_size"] - len(SPECIALS)
    vocab = {token: index for index, token in enumerate(SPECIALS)}
    vocab.update({_word(i): len(SPECIALS) + i for i in range(words)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))  # noqa: S106
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",  # noqa: S106
        pad_token="<|endoftext|>",  # noqa: S106
        additional_special_tokens=["<|im_start|>"],
        model_max_length=shape["max_position_embeddings"],
    )
    config = LlamaConfig(
        **shape,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()
    return parameters


def _text(rng: random.Random, length: int, words: int) -> str:
    return " ".join(_word(rng.randrange(words)) for _ in range(length))


def rankings(k: int, count: int, *, seed: int, words: int, scale: float = 1.0) -> list[dict[str, Any]]:
    """Rows of a 200-token prompt and K completions of 100–400 tokens (times `scale`), ranks a permutation."""
    rng = random.Random(seed)  # noqa: S311 (benchmark data)
    low, high = (max(2, int(n * scale)) for n in COMPLETION_TOKENS)
    rows = []
    for _ in range(count):
        ranks = list(range(1, k + 1))
        rng.shuffle(ranks)
        rows.append(
            {
                # A space at the end, so the completion's first word stays its own token.
                "prompt": _text(rng, max(2, int(PROMPT_TOKENS * scale)), words) + " ",
                "completions": [_text(rng, rng.randint(low, high), words) for _ in range(k)],
                "ranks": ranks,
            }
        )
    return rows


# --- generation ------------------------------------------------------------------------------


def generation_hf(model_dir: Path, prompt_ids: list[list[int]], new_tokens: int, device: str) -> float:
    """Generated tokens per second with the Hugging Face backend (one batch, EOS ignored)."""
    import torch

    from training.generation import HFBackend, PerSampleSampler, PolicySpec

    backend = HFBackend.load(PolicySpec(base_model=str(model_dir)), device=device)
    model, tokenizer = backend.model, backend.tokenizer
    # Every prompt has the same length: no padding to account for.
    input_ids = torch.tensor(prompt_ids, device=device)
    sampler = PerSampleSampler(list(range(len(prompt_ids))), temperature=1.0, top_p=0.95)

    def run(tokens: int) -> None:
        sampler.generators = []
        with torch.no_grad():
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                logits_processor=[sampler],
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=tokenizer.pad_token_id,
            )
        if device == "cuda":
            torch.cuda.synchronize()

    run(4)  # warm-up
    started = time.perf_counter()
    run(new_tokens)
    seconds = time.perf_counter() - started
    return len(prompt_ids) * new_tokens / seconds


def generation_vllm(model_dir: Path, prompt_ids: list[list[int]], new_tokens: int) -> float:
    """Generated tokens per second with vLLM (a seed per sample, EOS ignored)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(model_dir), dtype="bfloat16", gpu_memory_utilization=0.8, seed=0)
    requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]

    def params(tokens: int) -> list[Any]:
        return [
            SamplingParams(temperature=1.0, top_p=0.95, max_tokens=tokens, ignore_eos=True, seed=seed)
            for seed in range(len(prompt_ids))
        ]

    llm.generate(requests, params(4), use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(requests, params(new_tokens), use_tqdm=False)
    seconds = time.perf_counter() - started
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    return generated / seconds


# --- the table -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="4,9")
    parser.add_argument("--kinds", default="reward,dpo")
    parser.add_argument("--groups", type=int, default=4, help="rankings per step (TRL: their pairs per step)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--peft", choices=("lora", "full"), default="full")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--generation-prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="without a GPU: a tiny model on the CPU, to check the script runs",
    )
    options = parser.parse_args(argv)

    import torch
    import transformers

    from bench.trainers import run_once

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    if not cuda and not options.smoke:
        print("bench/gpu.py: no CUDA GPU on this machine; nothing measured (run it on a GPU worker).")
        return 0
    device = "cuda" if cuda else "cpu"
    shape = MODEL_SHAPE if cuda else SMOKE_SHAPE
    scale = 1.0 if cuda else 0.1
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu (smoke run)"
    peak = peak_bf16_flops(device_name) if cuda else None

    results: list[tuple[int, str, str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="rankwise-gpu-bench-") as folder:
        model_dir = Path(folder) / "model"
        parameters = model_build(model_dir, shape)
        words = shape["vocab_size"] - len(SPECIALS)
        peak_text = f"peak bf16 {peak / 1e12:.0f} TFLOP/s" if peak else "peak bf16 unknown (no MFU)"
        print(
            f"{device_name}; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"Llama model of Qwen2.5-0.5B's shape, {parameters / 1e6:.1f}M parameters; {options.peft}; {peak_text}",
            flush=True,
        )
        trainers = ("trl", "grouped (packed)", "grouped (padded)")
        max_length = int((PROMPT_TOKENS + COMPLETION_TOKENS[1]) * scale) + 8
        for k in map(int, options.ks.split(",")):
            rows = rankings(k, options.groups * (options.steps + 1), seed=k, words=words, scale=scale)
            for kind in options.kinds.split(","):
                for name in trainers:
                    try:
                        measured = run_once(
                            kind=kind,
                            trainer_name=name,
                            model_dir=model_dir,
                            rows=rows,
                            k=k,
                            groups=options.groups,
                            steps=options.steps,
                            peft=options.peft,
                            out=Path(folder) / "out",
                            device=device,
                            max_length=max_length,
                            gradient_checkpointing=options.gradient_checkpointing,
                        )
                    except torch.OutOfMemoryError as error:
                        measured = {"error": 1.0}
                        print(f"  K={k} {kind} {name}: out of memory ({error})", file=sys.stderr, flush=True)
                    if cuda:
                        torch.cuda.empty_cache()
                    print(f"  K={k} {kind} {name}: {measured}", file=sys.stderr, flush=True)
                    results.append((k, kind, name, measured))

        prompt_rng = random.Random(7)  # noqa: S311 (benchmark data)
        prompt_count = options.generation_prompts if cuda else 4
        new_tokens = options.new_tokens if cuda else 8
        prompt_ids = [
            [len(SPECIALS) + prompt_rng.randrange(words) for _ in range(int(PROMPT_TOKENS * scale))]
            for _ in range(prompt_count)
        ]
        hf = generation_hf(model_dir, prompt_ids, new_tokens, device)
        gc.collect()  # the HF copy of the weights goes before vLLM loads its own
        if cuda:
            torch.cuda.empty_cache()
        vllm: float | str
        if not cuda:
            vllm = "not run (no GPU)"
        elif importlib.util.find_spec("vllm") is None:
            vllm = "not installed"
        else:
            try:
                vllm = generation_vllm(model_dir, prompt_ids, new_tokens)
            except Exception as error:  # a benchmark reports what failed and goes on
                vllm = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"

    print()
    print("| K | kind | trainer | comparisons/s | grouped/TRL | goal 0.8·(K−1) | tokens/s | MFU | peak GiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for k, kind, name, measured in results:
        if "error" in measured:
            print(f"| {k} | {kind} | {name} | out of memory | | | | | |")
            continue
        baseline = next(m for kk, kd, n, m in results if (kk, kd, n) == (k, kind, "trl"))
        goal = 0.8 * (k - 1)
        verdict = ""
        if name != "trl" and "error" not in baseline:
            ratio = measured["comparisons_per_s"] / baseline["comparisons_per_s"]
            verdict = f"{ratio:.2f} {'✓' if ratio >= goal else '✗'}"
        mfu = 6 * parameters * measured["tokens_per_s"] / peak if peak else None
        print(
            f"| {k} | {kind} | {name} | {measured['comparisons_per_s']:.1f} | {verdict} | "
            f"{'' if name == 'trl' else f'{goal:.1f}'} | {measured['tokens_per_s']:.0f} | "
            f"{f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} | {measured['peak_mib'] / 1024:.1f} |"
        )
    print()
    print(f"| generation ({prompt_count} prompts × {new_tokens} tokens) | tokens/s | vs HF | goal |")
    print("|---|---:|---:|---:|")
    print(f"| Hugging Face generate | {hf:.0f} | 1.0 | |")
    if isinstance(vllm, float):
        print(f"| vLLM | {vllm:.0f} | {vllm / hf:.1f} {'✓' if vllm / hf >= 10 else '✗'} | 10 |")
    else:
        print(f"| vLLM | {vllm} | | 10 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
