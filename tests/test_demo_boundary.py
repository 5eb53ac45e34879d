"""Production code never imports the demo (`training.demo`): the demo depends on the app, not the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_PACKAGES = ("annotation", "training", "config")
DEMO_PACKAGE = REPO_ROOT / "training" / "demo"
# The commands that start, seed or run the demo: they are the demo's doors into the app.
DEMO_COMMANDS = {
    REPO_ROOT / "annotation" / "management" / "commands" / "rundemo.py",
    REPO_ROOT / "annotation" / "management" / "commands" / "seed_demo.py",
    REPO_ROOT / "annotation" / "management" / "commands" / "demo_users.py",
    REPO_ROOT / "training" / "management" / "commands" / "build_demo_model.py",
    REPO_ROOT / "training" / "management" / "commands" / "simulate_loop.py",
}


def production_modules() -> list[Path]:
    return sorted(
        path
        for package in PRODUCTION_PACKAGES
        for path in (REPO_ROOT / package).rglob("*.py")
        if DEMO_PACKAGE not in path.parents and path not in DEMO_COMMANDS and "migrations" not in path.parts
    )


def demo_imports(path: Path) -> list[str]:
    """The imports of `path` (at any depth, lazy ones included) that reach into `training.demo`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("training.demo")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "training.demo" or node.module.startswith("training.demo."):
                found.append(node.module)
            elif node.module == "training" and any(alias.name == "demo" for alias in node.names):
                found.append("training.demo")
    return found


def test_the_walk_covers_the_production_side_and_leaves_the_demo_out() -> None:
    walked = {path.relative_to(REPO_ROOT).as_posix() for path in production_modules()}

    assert {"training/services/jobs.py", "training/generation.py", "annotation/views.py"} <= walked
    assert "config/settings.py" in walked
    assert not any(name.startswith("training/demo/") for name in walked)
    assert "training/management/commands/simulate_loop.py" not in walked


def test_no_production_module_imports_the_demo() -> None:
    offenders = {
        path.relative_to(REPO_ROOT).as_posix(): imports
        for path in production_modules()
        if (imports := demo_imports(path))
    }

    assert offenders == {}


def test_the_check_sees_every_way_of_importing_the_demo(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text(
        "import training.demo.model\n"
        "from training.demo.task import demo_problems\n"
        "from training import demo\n"
        "def later():\n"
        "    from training.demo import loop\n"
        "from training import generation\n"
        "from training.demonstration import x\n"
    )

    assert demo_imports(module) == [
        "training.demo.model",
        "training.demo.task",
        "training.demo",
        "training.demo",
    ]
