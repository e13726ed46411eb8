"""Resumable checkpoints, written atomically: a crash mid-save leaves the previous checkpoint intact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from understudy.errors import UnderstudyError


class CheckpointError(UnderstudyError):
    """A checkpoint cannot be read (names the file and what to do)."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and what to do
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it to start "
                              "over, or point --out-dir at another run") from e
