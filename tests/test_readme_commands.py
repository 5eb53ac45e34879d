"""The operator commands the README shows work exactly as written, in a fresh shell."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text()

# A command line: optional VAR=value prefixes, then a Python running manage.py and its arguments.
COMMAND = re.compile(r"(?:[A-Z_]+=\S+ )*(?:\S*/)?python3? manage\.py [^`#\n]*")
# Run by their own tests: the demo model (tests/training/test_demo_model.py), the
# demo stack (tests/test_demo.py), the whole loop (tests/training/test_simulate_loop.py).
COVERED_ELSEWHERE = ("build_demo_model", "rundemo", "simulate_loop")
# Settings a fresh shell does not have; the commands must bring what they need.
SETTINGS_FROM_THE_SHELL = ("DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL", "DJANGO_SETTINGS_MODULE")


def readme_commands() -> list[str]:
    return [match.group(0).strip() for match in COMMAND.finditer(README)]


def demo_commands() -> list[str]:
    """The README's commands for the demo's database, with its placeholders filled in."""
    filled = {
        "PROJECT FILE": '"Demo: helpful answers" annotation/demo_data/ranking.jsonl',
    }
    commands = []
    for command in readme_commands():
        if command.startswith("DEBUG=1 ") and not any(name in command for name in COVERED_ELSEWHERE):
            for placeholder, value in filled.items():
                command = command.replace(placeholder, value)
            commands.append(command)
    return commands


def fresh_shell(var_dir: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in SETTINGS_FROM_THE_SHELL}
    # Only where the files go differs from a fresh clone: never the demo's own var/.
    return {**env, "VAR_DIR": str(var_dir)}


def shell(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_every_manage_py_command_in_the_readme_carries_the_settings_it_needs() -> None:
    # A command either runs on the demo's settings (DEBUG=1 in front) or sits
    # in a block that exports the production variables first.
    blocks = README.split("\n\n")
    for command in readme_commands():
        assert command.startswith((".venv/bin/python", "DEBUG=1 .venv/bin/python")), command
        if not command.startswith("DEBUG=1 "):
            block = next(block for block in blocks if command in block)
            assert "export SECRET_KEY=" in block, command


@pytest.mark.slow
def test_the_readmes_operator_commands_run_as_written_in_a_fresh_shell(tmp_path: Path) -> None:
    # given a fresh shell (no DEBUG, no SECRET_KEY) and a migrated demo database with its project
    env = fresh_shell(tmp_path)
    for setup in ("DEBUG=1 .venv/bin/python manage.py migrate --noinput",
                  "DEBUG=1 .venv/bin/python manage.py seed_demo"):  # fmt: skip
        done = shell(setup, env)
        assert done.returncode == 0, done.stderr
    commands = demo_commands()
    assert any("create_user alice" in command for command in commands)
    assert any("drf_create_token alice" in command for command in commands)

    # when each of the README's commands runs exactly as written, in the README's order
    results = [(command, shell(command, env)) for command in commands]

    # then every one succeeds
    for command, result in results:
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr, command
    outputs = {command.split()[3]: result.stdout for command, result in results}
    assert "password" in outputs["create_user"].lower()
    assert re.search(r"\b[0-9a-f]{40}\b", outputs["drf_create_token"])


def test_a_command_without_its_settings_stops_with_one_line_naming_the_variable(tmp_path: Path) -> None:
    result = shell(".venv/bin/python manage.py create_user bob", fresh_shell(tmp_path))
    assert result.returncode != 0
    assert "SECRET_KEY is required when DEBUG is off" in result.stderr
    assert "DEBUG=1" in result.stderr
    assert "Traceback" not in result.stderr
