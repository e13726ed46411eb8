"""Helpers shared by the registry tests (imported, unlike fixtures, which live in conftest.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import understudy

REPO = Path(understudy.__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content hash (folders as 'dir'): equality means 'unchanged'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out
