"""Per-step metrics to JSONL (always) and TensorBoard (when the `tensorboard` package is installed).

A crash mid-write can leave a torn last line in metrics.jsonl: readers skip any line that is not a JSON object
(with a warning naming file:line), the next write starts on a fresh line, and `truncate_after` (on --resume)
rewrites the file, atomically, without it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from understudy.trainer import crashpoints

log = logging.getLogger(__name__)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, int | float):  # bool is an int
            out[key] = float(v)
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a line that is not a JSON object (a torn write) is skipped, with a
    warning. A missing file has no records."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            log.warning("%s:%d is not a JSON object (%.60r...): skipped; a crash mid-write leaves such a torn line",
                        path, lineno, line)
            continue
        rows.append(row)
    return rows


def _ends_with_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return True
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"
    except FileNotFoundError:
        return True


class MetricsLog:
    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        except Exception as e:  # tensorboard is optional: JSONL always has everything
            log.info("TensorBoard logging off (%s); metrics go to %s", e, self.path)

    def write(self, metrics: dict[str, Any]) -> None:
        step = int(metrics.get("step", 0))
        line = json.dumps(metrics, default=str) + "\n"
        if not _ends_with_newline(self.path):  # a torn line from a crash: never glue a record onto it
            line = "\n" + line
        with open(self.path, "a", encoding="utf-8") as fh:
            if crashpoints.armed("metrics_write", step):
                fh.write(line[:len(line) // 2])
                fh.flush()
                crashpoints.kill()
            fh.write(line)
        if self.tb is not None:
            for k, v in _flatten(metrics).items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: keep the records of steps <= `step` (later ones will be redone) and drop torn lines; the
        file is replaced atomically."""
        if not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, default=str) + "\n" for r in keep))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
