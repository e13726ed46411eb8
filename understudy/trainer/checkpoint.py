"""Resumable checkpoints, written atomically and read with `torch.load(weights_only=True)`.

A checkpoint holds plain data only: tensors, dicts, lists, tuples, strings, numbers, bools and None, so reading
one never runs pickled code. `save_checkpoint` refuses anything else (naming the key), and the helpers below turn
what is not plain (a `random.Random` state) into lists. Writing: a temp file beside the target, fsync, os.replace,
then fsync of the folder, so a crash at any point leaves the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from understudy.errors import UnderstudyError
from understudy.fsutil import fsync_dir
from understudy.trainer import crashpoints

CHECKPOINT_FORMAT = 2  # 2: weights_only-loadable (plain types), with the drafter buffer and the controller state
_PLAIN = (str, int, float, bool, type(None))


class CheckpointError(UnderstudyError):
    """A checkpoint cannot be written or read (names the file or key, and what to do)."""


def check_plain(value: Any, where: str = "state") -> None:
    """Raise CheckpointError naming the first value (by its key path) that weights_only loading would refuse."""
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, _PLAIN):
                raise CheckpointError(f"checkpoint key {where}[{k!r}] is a {type(k).__name__}; use str or int keys")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"checkpoint value {where} is a {type(value).__name__}, which torch.load(weights_only=True) "
                          "refuses; store it as tensors, dicts, lists, strings or numbers (understudy/trainer/"
                          "checkpoint.py)")


def random_state_to_plain(state: tuple[Any, ...]) -> list[Any]:
    """`random.Random.getstate()` -> [version, [625 ints], gauss_next] (lists, not tuples)."""
    version, internal, gauss = state
    return [int(version), [int(x) for x in internal], gauss]


def random_state_from_plain(plain: list[Any] | tuple[Any, ...]) -> tuple[Any, ...]:
    """The inverse of random_state_to_plain, for `random.Random.setstate`."""
    version, internal, gauss = plain
    return int(version), tuple(int(x) for x in internal), gauss


def save_checkpoint(path: Path, state: dict[str, Any], step: int = -1) -> None:
    """Write `state` (plain types only) to `path` atomically and durably. `step` names the crash points."""
    check_plain(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save({**state, "format": CHECKPOINT_FORMAT}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    crashpoints.reach("checkpoint_before_rename", step)
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the rename itself is durable only once the folder is


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); it may be truncated or "
                              "from an older Understudy that pickled objects: delete it to start over, or point "
                              "--out-dir at another run") from e
