"""Which registry versions a training run published: exactly once per publishing step, across crashes.

A run has an id (OUT_DIR/run.json, also kept in every checkpoint). Each publishing step publishes a pair: the
policy, then the drafter naming it (registry.store). Both versions carry the note `understudy train run <id> step
<n>` (and `policy_version` = n; a drafter's `parent` = the run's previous drafter). A crash between a publish and
the next checkpoint makes `--resume` redo that step; `reconcile` reads the registry's manifests, and the resumed
run reuses the versions a step already has (of each kind) instead of publishing them again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from understudy.errors import UnderstudyError
from understudy.fsutil import fsync_dir

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
_NOTE_RE = re.compile(r"understudy train run ([0-9a-f]{32}) step ([0-9]{1,12})")


class LineageError(UnderstudyError, ValueError):
    """OUT_DIR/run.json is unreadable (names the file and the fix)."""


def publish_note(run_id: str, step: int) -> str:
    return f"understudy train run {run_id} step {step}"


def parse_note(note: Any) -> tuple[str, int] | None:
    """(run id, step) of a note written by publish_note; None for any other note."""
    m = _NOTE_RE.fullmatch(note) if isinstance(note, str) else None
    return (m.group(1), int(m.group(2))) if m else None


def run_versions(manifests: Iterable[tuple[int, dict[str, Any]]], run_id: str, kind: str = "drafter") -> dict[int, int]:
    """step -> version for the versions of `kind` ("drafter" | "policy") this run published, from (version,
    manifest) pairs. Should a step have two (a registry written by an older trainer), the first is kept and the
    other named in a warning."""
    out: dict[int, int] = {}
    for version, manifest in sorted(manifests, key=lambda vm: vm[0]):
        parsed = parse_note(manifest.get("note"))
        if parsed is None or parsed[0] != run_id or (manifest.get("kind") or "drafter") != kind:
            continue
        step = parsed[1]
        if step in out:
            log.warning("run %s published step %d twice (versions %d and %d); keeping %d", run_id, step, out[step],
                        version, out[step])
            continue
        out[step] = version
    return out


@dataclass
class Reconciled:
    last_published: int | None  # the run's newest version at or before the resumed step (the next parent)
    ahead: dict[int, int] = field(default_factory=dict)  # step -> version published after the checkpoint


def reconcile(published: dict[int, int], step: int, last_published: int | None) -> Reconciled:
    """Split the run's versions (step -> version) at the checkpoint's step. The registry wins over the
    checkpoint's `last_published` when they disagree (the checkpoint cannot know a later publish)."""
    done = {s: v for s, v in published.items() if s <= step}
    newest = done[max(done)] if done else last_published
    if newest != last_published:
        log.warning("checkpoint at step %d names version %s as the last published, the registry says %s; "
                    "following the registry", step, last_published, newest)
    return Reconciled(last_published=newest, ahead={s: v for s, v in published.items() if s > step})


def new_run_id() -> str:
    return uuid.uuid4().hex


def write_run_id(out_dir: Path, run_id: str) -> None:
    """OUT_DIR/run.json, atomically and durably (before the run's first publish)."""
    path = Path(out_dir) / RUN_FILE
    tmp = path.with_name(f".{RUN_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"run_id": run_id}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_run_id(out_dir: Path) -> str | None:
    path = Path(out_dir) / RUN_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LineageError(f"{path} is unreadable ({e}); it should hold {{\"run_id\": \"<32 hex digits>\"}}; "
                           "delete it to start a new run (its published versions will not be reused)") from e
    run_id = doc.get("run_id") if isinstance(doc, dict) else None
    if not isinstance(run_id, str) or not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise LineageError(f"{path}: run_id {run_id!r} is not 32 hex digits; delete the file to start a new run")
    return run_id
