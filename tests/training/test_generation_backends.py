"""Generation backends: the same seeds give the same samples whatever the batching; the worker picks the backend."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.training.modern_models import FAMILIES, modern_model_dirs  # noqa: F401
from training.generation import (
    BACKEND_ENV,
    GenerationSpec,
    HFBackend,
    PolicySpec,
    generation_backend_load,
    generation_backend_name,
    prompt_seed,
    prompt_token_ids,
    sample_seed,
)

QUESTIONS = [
    "Hello!",
    "What is the capital of France?",
    "Write a short poem about the river stone and the apple tree, please.",
    "What is 3 plus 4?",
    "Tell me a story about a cat, a dog and a paper boat.",
    "Answer with one word: yes or no.",
    "Summarise the paper in two sentences.",
    "What colour is the cloud over the garden before the music starts?",
]
SAMPLING = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12}


def prompts_and_seeds(
    backend: HFBackend | object, samples: int = 2
) -> tuple[list[list[int]], list[list[int]]]:
    tokenizer = backend.tokenizer  # type: ignore[attr-defined]
    prompt_ids, seeds = [], []
    for number, question in enumerate(QUESTIONS):
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
        ids, _ = prompt_token_ids(tokenizer, text="", messages=messages, prompt_format="auto")
        prompt_ids.append(ids)
        seed = prompt_seed(job_seed=5, prompt_hash=f"hash-{number}")
        seeds.append([sample_seed(prompt_seed=seed, index=index) for index in range(samples)])
    return prompt_ids, seeds


def batched(
    backend: object, prompt_ids: list[list[int]], seeds: list[list[int]], size: int
) -> list[list[str]]:
    texts: list[list[str]] = []
    for start in range(0, len(prompt_ids), size):
        texts += backend.generate(  # type: ignore[attr-defined]
            prompt_ids[start : start + size], seeds[start : start + size], **SAMPLING
        )
    return texts


@pytest.mark.parametrize("family", ["gpt2", *FAMILIES])
def test_the_hf_backend_writes_the_same_samples_in_batches_of_one_and_of_eight(
    family: str,
    tiny_model_dir: Path,
    modern_model_dirs: dict[str, Path],  # noqa: F811
) -> None:
    # given a policy of the family, and eight chat prompts of different lengths with two seeds each
    model_dir = tiny_model_dir if family == "gpt2" else modern_model_dirs[family]
    backend = generation_backend_load(PolicySpec(base_model=str(model_dir)), backend="hf", device="cpu")
    assert isinstance(backend, HFBackend)
    prompt_ids, seeds = prompts_and_seeds(backend)
    assert len({len(ids) for ids in prompt_ids}) > 4  # left padding differs from row to row

    # when they are sampled one prompt at a time, and all eight together
    alone = batched(backend, prompt_ids, seeds, 1)
    together = batched(backend, prompt_ids, seeds, 8)

    # then every sample is the same, and the seeds do make different samples
    assert alone == together
    assert len({text for row in together for text in row}) > 1
    other_seeds = [[seed + 1 for seed in row] for row in seeds]
    assert batched(backend, prompt_ids, other_seeds, 8) != together


def test_a_worker_generates_with_hf_unless_its_environment_says_vllm() -> None:
    assert generation_backend_name({}) == "hf"
    assert generation_backend_name({BACKEND_ENV: " VLLM "}) == "vllm"
    with pytest.raises(ValueError, match=BACKEND_ENV):
        generation_backend_name({BACKEND_ENV: "tgi"})
    with pytest.raises(ValueError, match="backend"):
        GenerationSpec(
            job_id=1,
            attempt=1,
            policy_id=1,
            project_id=1,
            n=1,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=4,
            seed=0,
            policy=PolicySpec(base_model="m"),
            backend="tgi",
        )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None and _cuda(), reason="vLLM can run here")
def test_asking_for_vllm_where_it_cannot_run_says_why(tiny_model_dir: Path) -> None:
    with pytest.raises(RuntimeError, match=r"vLLM is not installed|needs a GPU"):
        generation_backend_load(PolicySpec(base_model=str(tiny_model_dir)), backend="vllm")


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not _cuda(), reason="vLLM runs on GPU workers only"
)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_vllm_backend_writes_the_same_samples_in_batches_of_one_and_of_eight(
    family: str,
    modern_model_dirs: dict[str, Path],  # noqa: F811
) -> None:
    backend = generation_backend_load(PolicySpec(base_model=str(modern_model_dirs[family])), backend="vllm")
    prompt_ids, seeds = prompts_and_seeds(backend)
    assert batched(backend, prompt_ids, seeds, 1) == batched(backend, prompt_ids, seeds, 8)


@pytest.mark.django_db(transaction=True)
def test_a_job_records_the_backend_its_worker_generated_with(
    celery_worker: str, tiny_model_dir: Path
) -> None:
    from annotation.roles import Role
    from tests.factories import user_with_roles
    from tests.training.test_builds_support import make_manager
    from tests.training.test_generation import SAMPLING as JOB_SAMPLING
    from tests.training.test_generation import policy_of, project_of, wait_for
    from training.models import GenerationJob
    from training.services import generation_job_create

    project = project_of(["What is 2 plus 3?", [{"role": "user", "content": "And 4 plus 4?"}]], k=2)
    manager = make_manager(project, user_with_roles(Role.MANAGER, username="backend-manager"))
    job = generation_job_create(
        policy=policy_of(tiny_model_dir, project=project),
        project=project,
        n=2,
        seed=1,
        created_by=manager,
        **JOB_SAMPLING,
    )
    job = wait_for(job, GenerationJob.TERMINAL)

    assert job.status == GenerationJob.Status.SUCCEEDED, job.error + job.log_tail
    assert job.backend == "hf"
