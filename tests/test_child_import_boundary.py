"""GPU child programs are programs, not Django processes: nothing they load pulls in Django."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# The child programs and every module they use for their work (their imports inside functions
# included: these are imported here directly).
CHILD_MODULES = {
    "training.run_process": ["training.runner", "training.grouped", "training.metrics"],
    "training.generation_process": ["training.generation", "training.loading", "training.scoring"],
    "training.scoring_process": ["training.scoring", "training.generation"],
    "training.judge_process": ["training.generation", "training.loading"],
}
SHARED = ["training.events", "training.gpu_job_process", "training.prompts"]


@pytest.mark.parametrize("program", sorted(CHILD_MODULES))
def test_a_child_program_imports_no_django(program: str) -> None:
    # given a fresh interpreter without the Django settings a worker has
    modules = [program, *CHILD_MODULES[program], *SHARED]
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(name for name in sys.modules if name == 'django' or name.startswith('django.'))))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}

    # when it imports the child program and what it works with
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )

    # then no part of Django came along
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_prompt_contract_imports_neither_django_nor_the_parquet_stack() -> None:
    script = (
        "import json, sys\n"
        "import training.prompts\n"
        "heavy = {'django', 'pyarrow', 'torch', 'transformers'}\n"
        "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in heavy or n == 'training.builds')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
