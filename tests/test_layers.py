"""The file tree's layers: every import points down, none runs back up.

Ground floor: ``tasks`` and ``checks`` (what the datamodules may use too); then the functional
core, the theory library and the inner updates; the algorithms; the variant registry; the learner;
the callbacks; the CLI; and the tools (the applications: experiment, estimate, plan, plot) on top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {
    "tasks": 0,
    "checks": 0,
    "compat": 0,
    "checkpoint_io": 0,
    "threads": 0,
    "cpu": 0,
    "double_backward": 0,
    "functional": 1,
    "metrics": 1,
    "models": 1,
    "process_group": 1,
    "targets": 1,
    "losses": 1,
    "theory": 2,
    "inner": 2,
    "algorithms": 3,
    "hyperparameters": 3,
    "checkpoint_settings": 3,
    "eval_metrics": 3,
    "variants": 3.5,  # the registry: it knows the algorithms, nothing below it knows it
    "learner": 4,
    "callbacks": 5,
    "cli": 6,
    "subcommands": 6,
    "wandb_connection": 6,
    "tools": 7,
}


def imports(path: Path) -> list[str]:
    """Every ``lightning_maml.*`` module ``path`` imports at run time, at the top or inside a
    function (``if TYPE_CHECKING:`` blocks, for annotations only, do not count)."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return [m for m in found if m.split(".")[0] == "lightning_maml"]


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


LIBRARY = sorted((ROOT / "lightning_maml").rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_point_down(path):
    relative = path.relative_to(ROOT / "lightning_maml")
    own = relative.parts[0].removesuffix(".py")
    if own == "__init__":
        return  # the package's front door re-exports the layers
    assert own in RANK, f"{relative}: give this module a layer in tests/test_layers.py"
    for module in imports(path):
        assert layer(module) != "datamodules" or own in ("tools",), (
            f"{relative} imports {module}: only the tools may use the datamodules"
        )
        if layer(module) and layer(module) != "datamodules":
            assert RANK[layer(module)] <= RANK[own], (
                f"{relative} imports {module}, a layer above it"
            )


def test_the_theory_library_imports_no_application():
    for path in (ROOT / "lightning_maml" / "theory").glob("*.py"):
        for module in imports(path):
            assert layer(module) in ("tasks", "checks", "functional", "theory"), (path, module)


@pytest.mark.parametrize("path", sorted((ROOT / "datamodules").glob("*.py")), ids=lambda p: p.name)
def test_datamodules_know_only_the_ground_floor(path):
    for module in imports(path):
        assert layer(module) in ("datamodules", "tasks", "checks"), module


@pytest.mark.parametrize(
    "first",
    [
        "lightning_maml.theory",
        "lightning_maml.callbacks",
        "lightning_maml.algorithms.hfmaml",
        "lightning_maml.inner",
        "lightning_maml.variants",
        "lightning_maml.tools.experiment",
    ],
)
def test_any_module_imports_first(first):
    # A circular import shows only for some first imports: each in a fresh interpreter.
    done = subprocess.run(
        [sys.executable, "-c", f"import {first}"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
