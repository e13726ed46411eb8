"""The package graph of docs/design.md, checked with import-linter (contracts in pyproject.toml).

The first test runs the contracts on the tree as it is. The others copy the package into a temporary folder, add
one import that breaks a rule (a cycle inside the server, an upward import from the engine, torch in the
registry) and check that the same contracts then fail, naming the import: contracts that cannot fail would be
decoration.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BROKEN" not in r.stdout and r.stdout.count("KEPT") >= 5


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "understudy", tmp_path / "understudy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_import(tree: Path, module: str, line: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{line}  # injected by tests/test_layout.py\n")


@pytest.mark.parametrize(("module", "line", "broken"), [
    # a new cycle: the scheduler imports the routes that import it
    ("understudy.server.scheduler", "import understudy.server.routes_openai", "No import cycles"),
    # an upward import: the engine reaches into the server
    ("understudy.engine.sampling", "import understudy.server.protocol", "Packages are layered"),
    # the registry stays torch-free
    ("understudy.registry.store", "import torch", "do not need torch"),
    # the engine knows no HTTP
    ("understudy.engine.text", "import fastapi", "Only the server knows HTTP"),
])
def test_a_broken_rule_fails_the_contracts(tree: Path, module: str, line: str, broken: str):
    add_import(tree, module, line)
    r = lint(tree)
    assert r.returncode != 0, r.stdout
    failing = [ln for ln in r.stdout.splitlines() if "BROKEN" in ln]
    assert failing, r.stdout
    assert broken in r.stdout.split("Broken contracts")[-1], r.stdout
    assert module in r.stdout
