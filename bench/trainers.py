"""Benchmark: TRL's RewardTrainer / DPOTrainer against the grouped trainers, K = 4, 6, 9.

    .venv/bin/python bench/trainers.py [--steps 6] [--groups 4] [--rounds 3] [--kinds reward,dpo]
                                       [--peft lora] [--threads 1] [--models demo,llama]

1. Builds a demo-sized GPT-2 (4 layers, 4 heads, 128 wide, a 1,000-token BPE
   tokenizer trained on generated arithmetic text; random weights, which
   cost the same as trained ones) in a temporary folder; with `--models`
   also a model of the same size of a modern family (llama, qwen2 or gemma:
   grouped-query attention, gated MLP, rotary positions), whose tokenizer
   carries the family's chat template, trained on chat rows (a system and a
   user turn, completions as assistant turns) with LoRA on every linear
   layer of its blocks.
2. For each K generates rankings of K completions (a prompt of ~25 tokens,
   completions of 20 to 60 tokens that part ways within their first few
   tokens, as sampled ones do; ranks a random permutation: no ties) and, in
   this one process, trains on them with the same model, LoRA settings
   (the runner's defaults), fp32 on CPU, learning rate and seed:
   - trl: TRL's trainer on the expanded pairs, C(K, 2) · groups pairs an
     optimizer step, in `groups` accumulated micro-batches of C(K, 2) pairs;
   - grouped (packed) and grouped (padded): the grouped trainer, `groups`
     rankings in one batch a step — the same comparisons a step.
   Each run takes one warm-up step and then `steps` timed steps; a step's
   time (step end to step end) includes loading and collating its batch,
   forward, backward and the optimizer, and the median step counts, since
   other jobs on a shared machine slow some steps down. The three trainers
   run in turn, `rounds` times, and each keeps its best round. Tokenizing
   the data beforehand is left out for both.
3. Prints, per run, comparisons (pairs) per second, tokens per second (the
   non-padding tokens the trainer forwarded, its own `num_tokens`; a DPO
   reference forward is not counted) and the peak resident memory above the
   level at the start of the run (RSS sampled every 2 ms from
   /proc/self/statm, after gc and malloc_trim, so memory freed by the run
   before is given back first); then the grouped/TRL ratio of comparisons
   per second against the goal 0.8 · (K − 1) (✓ where reached).

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

KS = (4, 6, 9)
MODEL_SIZE = {"n_layer": 4, "n_head": 4, "n_embd": 128}
MODELS = ("demo", "llama", "qwen2", "gemma")
VOCAB_SIZE = 1000
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- memory ------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def _give_memory_back() -> None:
    gc.collect()
    # Not glibc: freed memory may stay counted in the next baseline.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRss:
    """The highest RSS seen while running, sampled by a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


# --- model and data ------------------------------------------------------------------------


def _corpus() -> list[str]:
    from training.demo.task import completion_canonical, demo_problems

    problems = demo_problems(count=2000, seed=11, split="train")
    rng = random.Random(0)  # noqa: S311 (benchmark data)
    corpus = [f"{p.prompt}\n{_completion(p, p.answer, rng)}" for p in problems]
    return corpus + [completion_canonical(p) for p in problems]


def model_build(folder: Path, family: str = "demo") -> None:
    """The demo's GPT-2, or a model of a modern family of the same size (4 layers, 128 wide)."""
    if family == "demo":
        from training.demo.model import causal_lm_create, tokenizer_train

        tokenizer = tokenizer_train(_corpus(), vocab_size=VOCAB_SIZE)
        model = causal_lm_create(tokenizer, n_positions=512, **MODEL_SIZE)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        from tests.training.modern_models import model_config, tokenizer_build

        tokenizer = tokenizer_build(family, vocab_size=VOCAB_SIZE, sentences=[SYSTEM, *_corpus()])
        tokenizer.model_max_length = 512
        torch.manual_seed(0)
        config = model_config(
            family,
            tokenizer,
            hidden_size=MODEL_SIZE["n_embd"],
            layers=MODEL_SIZE["n_layer"],
            max_positions=512,
        )
        model = AutoModelForCausalLM.from_config(config)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)


# Sampled completions part ways within a few tokens and differ in length; so
# do these, or the prompt-sharing layout would look better than it is.
STEPS = (
    "First I read the question again.",
    "We need to combine the two numbers.",
    "Let me count carefully.",
    "The numbers are small, so this is quick.",
    "I will write each step down.",
    "Start from the first amount.",
    "Then apply the operation in the question.",
    "Double-check the arithmetic before answering.",
    "Nothing else in the question changes the amount.",
    "So the result follows directly.",
)


def _completion(problem: Any, answer: int, rng: random.Random) -> str:
    from training.demo.task import completion_canonical

    steps = rng.sample(STEPS, rng.randint(1, 4))
    return f"{' '.join(steps)} {completion_canonical(problem, answer=answer)}"


SYSTEM = "You solve arithmetic word problems. Show the steps, then the answer."


def rankings(k: int, count: int, seed: int, *, chat: bool = False) -> list[dict[str, Any]]:
    """Rankings of K completions; `chat`: conversational rows (a system and a user turn, assistant replies)."""
    from training.demo.task import demo_problems

    rng = random.Random(seed)  # noqa: S311 (benchmark data)
    rows = []
    for problem in demo_problems(count=count, seed=seed, split="train"):
        answers = [problem.answer + d for d in range(k)]
        ranks = list(range(1, k + 1))
        rng.shuffle(ranks)
        completions = [_completion(problem, a, rng) for a in answers]
        if chat:
            rows.append(
                {
                    "prompt": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": problem.prompt},
                    ],
                    "completions": [[{"role": "assistant", "content": c}] for c in completions],
                    "ranks": ranks,
                }
            )
        else:
            rows.append({"prompt": f"{problem.prompt}\n", "completions": completions, "ranks": ranks})
    return rows


# --- one run --------------------------------------------------------------------------------


class StepClock:
    """A TrainerCallback noting the time and token count at each step end after the warm-up.

    Step end to step end covers everything a step does, loading and
    collating its batch included.
    """

    def __init__(self, warmup: int, *, cuda: bool = False) -> None:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step >= warmup:
                    if cuda:
                        import torch

                        torch.cuda.synchronize()  # the step's kernels have run, not only been queued
                    clock.marks.append((time.perf_counter(), clock.trainer._total_train_tokens))

        self.callback = Callback()
        self.trainer: Any = None
        self.marks: list[tuple[float, int]] = []

    def step_seconds(self) -> list[float]:
        return [b[0] - a[0] for a, b in itertools.pairwise(self.marks)]

    def step_tokens(self) -> list[int]:
        return [b[1] - a[1] for a, b in itertools.pairwise(self.marks)]


def peft_config(kind: str, peft: str, model_type: str = "gpt2") -> Any:
    """The runner's LoRA settings: peft's default modules for GPT-2, every block linear layer otherwise."""
    from peft import LoraConfig

    from training.model_settings import LORA_TARGET_MODULES

    if peft == "full":
        return None
    return LoraConfig(
        task_type="SEQ_CLS" if kind == "reward" else "CAUSAL_LM",
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=LORA_TARGET_MODULES.get(model_type),
        modules_to_save=["score"] if kind == "reward" else None,
        fan_in_fan_out=model_type == "gpt2",
    )


def run_once(
    *,
    kind: str,
    trainer_name: str,
    model_dir: Path,
    rows: list[dict[str, Any]],
    k: int,
    groups: int,
    steps: int,
    peft: str,
    out: Path,
    device: str = "cpu",
    max_length: int = 512,
    gradient_checkpointing: bool = False,
) -> dict[str, float]:
    """One trainer's timed steps. On "cuda": bf16 mixed precision, peak memory from torch's allocator."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from training.grouped import (
        GroupedDPOConfig,
        GroupedDPOTrainer,
        GroupedRewardConfig,
        GroupedRewardTrainer,
        pairs_from_groups,
    )

    warmup = 1
    pairs_per_step = math.comb(k, 2) * groups
    grouped = trainer_name != "trl"
    cuda = device == "cuda"
    args: dict[str, Any] = {
        "output_dir": str(out),
        "use_cpu": not cuda,
        "bf16": cuda,
        "activation_checkpointing": gradient_checkpointing,
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "logging_steps": 10_000,
        "max_steps": warmup + steps,
        "learning_rate": 5e-5,
        "max_length": max_length,
        "seed": 0,
        "data_seed": 0,
        "dataloader_num_workers": 0,
        # The same comparisons per optimizer step. TRL takes them as `groups`
        # micro-batches of one ranking's worth of pairs: one batch of them all
        # held K · (K − 1) · groups sequences' activations at once and lost
        # time to page faults, a handicap no one would train with.
        "per_device_train_batch_size": groups if grouped else math.comb(k, 2),
        "gradient_accumulation_steps": 1 if grouped else groups,
    }
    if grouped:
        args["packing"] = trainer_name == "grouped (packed)"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    torch.manual_seed(0)
    if kind == "reward":
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=1, dtype=torch.float32
            )
        config = GroupedRewardConfig(**args, margin="none") if grouped else RewardConfig(**args)
        trainer_class: Any = GroupedRewardTrainer if grouped else RewardTrainer
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = GroupedDPOConfig(**args, beta=0.1) if grouped else DPOConfig(**args, beta=0.1)
        trainer_class = GroupedDPOTrainer if grouped else DPOTrainer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    dataset = Dataset.from_list(rows if grouped else pairs_from_groups(rows))
    clock = StepClock(warmup, cuda=cuda)
    trainer = trainer_class(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock.callback],
        peft_config=peft_config(kind, peft, model.config.model_type),
    )
    clock.trainer = trainer
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict to stdout
    _give_memory_back()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak = torch.cuda.max_memory_allocated()
        del trainer, model
        gc.collect()
        torch.cuda.empty_cache()
    else:
        with PeakRss() as memory:
            baseline = _rss()
            trainer.train()
        peak = memory.peak - baseline
    # The median step: other jobs on a shared machine slow some steps down.
    seconds = statistics.median(clock.step_seconds())
    return {
        "comparisons_per_s": pairs_per_step / seconds,
        "tokens_per_s": statistics.mean(clock.step_tokens()) / seconds,
        "peak_mib": peak / 2**20,
        "seconds_per_step": seconds,
    }


# --- the table --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (after one warm-up step)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per trainer, alternating; the best counts"
    )
    # One thread by default: when other jobs share the cores, OpenMP threads
    # spin waiting for each other and a step slows down ten-fold or more.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--groups", type=int, default=4, help="rankings per step (TRL: their pairs per step)")
    parser.add_argument("--kinds", default="reward,dpo")
    parser.add_argument("--peft", choices=("lora", "full"), default="lora")
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument(
        "--models",
        default="demo",
        help=f"comma-separated, of {', '.join(MODELS)} (modern ones train on chat rows)",
    )
    options = parser.parse_args(argv)
    models = options.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if options.threads:
        torch.set_num_threads(options.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs; model {MODEL_SIZE}, vocab {VOCAB_SIZE}; "
        f"{options.peft}; {options.groups} rankings a step; {options.steps} timed steps after 1 warm-up"
    )
    trainers = ("trl", "grouped (packed)", "grouped (padded)")
    results: list[tuple[str, int, str, str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="rankwise-bench-") as folder:
        for family in models:
            model_dir = Path(folder) / family
            model_build(model_dir, family)
            for k in map(int, options.ks.split(",")):
                rows = rankings(k, options.groups * (options.steps + 1), seed=k, chat=family != "demo")
                for kind in options.kinds.split(","):
                    best: dict[str, dict[str, float]] = {}
                    for _ in range(options.rounds):
                        for name in trainers:
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
                            )
                            print(f"  {family} K={k} {kind} {name}: {measured}", file=sys.stderr, flush=True)
                            kept = best.get(name)
                            if kept is None or measured["comparisons_per_s"] > kept["comparisons_per_s"]:
                                best[name] = {
                                    **measured,
                                    "peak_mib": max(measured["peak_mib"], (kept or measured)["peak_mib"]),
                                }
                            else:
                                kept["peak_mib"] = max(kept["peak_mib"], measured["peak_mib"])
                    results.extend((family, k, kind, name, best[name]) for name in trainers)

    header = (
        "| model | K | kind | trainer | comparisons/s | tokens/s | s/step | peak RSS Δ MiB | grouped/TRL "
        "| goal 0.8·(K−1) |"
    )
    print()
    print(header)
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for family, k, kind, name, measured in results:
        baseline = next(m for f, kk, kd, n, m in results if (f, kk, kd, n) == (family, k, kind, "trl"))
        ratio = measured["comparisons_per_s"] / baseline["comparisons_per_s"]
        goal = 0.8 * (k - 1)
        verdict = "" if name == "trl" else f"{ratio:.2f} {'✓' if ratio >= goal else '✗'}"
        print(
            f"| {family} | {k} | {kind} | {name} | {measured['comparisons_per_s']:.1f} | {measured['tokens_per_s']:.0f} | "
            f"{measured['seconds_per_step']:.3f} | {measured['peak_mib']:.0f} | {verdict} | "
            f"{'' if name == 'trl' else f'{goal:.1f}'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
