"""Serve first, draft in the background (`understudy serve --ensure-drafter`).

When the registry holds no drafter for the served model, the server does not wait for one: it serves at once
(plain, or n-gram with `--fallback-proposer ngram`; the controller decides K) and starts
`understudy drafter train --publish --publish-every-minutes N --events` as a child process. The child publishes
each checkpoint whose held-out acceptance beats the run's earlier ones; `publish` moves the registry's `latest`
alias, which the hot-swap manager follows, so every better drafter is swapped in live. This module owns the
child: its command, its environment (no API or admin keys), its priority (niced, so serving keeps the cores it
needs), its log file, the events it reports and its shutdown with the server. It holds no tensors.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from understudy.registry.store import Registry
from understudy.server.settings import keyless_env

log = logging.getLogger(__name__)

def has_drafter_for(registry: Registry, fingerprint: str) -> bool:
    return any(v.family_fingerprint == fingerprint for v in registry.list_versions())


class DrafterTrainingJob:
    """One background `understudy drafter train` run; `status()` is what `/admin/drafter` shows under `training`."""

    def __init__(self, model: str, registry: Registry, minutes: float, work_dir: Path,
                 publish_every_minutes: float = 2.0, nice: int = 10, extra_args: list[str] | None = None) -> None:
        self.model, self.registry, self.minutes = model, registry, minutes
        self.work_dir = Path(work_dir)
        self.out = self.work_dir / "drafter"
        self.log_path = self.work_dir / "train.log"
        self.publish_every_minutes, self.nice = publish_every_minutes, nice
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[str] | None = None
        self.published: list[dict[str, Any]] = []
        self.tail: deque[str] = deque(maxlen=20)
        self.started_at: float | None = None
        self.returncode: int | None = None
        self._reader: threading.Thread | None = None
        self._stopping = False

    def command(self) -> list[str]:
        return [sys.executable, "-m", "understudy.cli.main", "drafter", "train", "--model", self.model,
                "--out", str(self.out), "--max-minutes", f"{self.minutes:g}", "--publish",
                "--publish-every-minutes", f"{self.publish_every_minutes:g}", "--events",
                "--registry", str(self.registry.root), "--threads", "1", *self.extra_args]

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = keyless_env(os.environ)
        nice = self.nice

        def lower_priority() -> None:  # in the child, before exec
            os.nice(nice)

        logf = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed by the reader thread)
        logf.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command())}\n")
        logf.flush()
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=logf, text=True, env=env,
                                     start_new_session=True, preexec_fn=lower_priority if nice else None)
        self.started_at = time.time()
        log.info("no drafter for %s in %s yet: serving without one and training one in the background "
                 "(pid %d, about %g minutes, each better version is published and swapped in; log: %s)",
                 self.model, self.registry.root, self.proc.pid, self.minutes, self.log_path)
        self._reader = threading.Thread(target=self._read, args=(logf,), name="understudy-drafter-job",
                                        daemon=True)
        self._reader.start()

    def _read(self, logf: Any) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                logf.write(line)
                logf.flush()
                self.tail.append(line.rstrip())
                self._on_line(line)
        finally:
            self.returncode = self.proc.wait()
            logf.close()
            if self._stopping:
                log.info("background drafter training stopped with the server")
            elif self.returncode == 0:
                log.info("background drafter training finished: %d version(s) published", len(self.published))
            else:
                log.error("background drafter training failed (exit status %s); the server keeps serving. "
                          "See %s", self.returncode, self.log_path)

    def _on_line(self, line: str) -> None:
        if not line.startswith('{"event"'):
            return
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            return
        if ev.get("event") == "published":
            self.published.append(ev)
            length = ev.get("heldout_acceptance_length")
            by = ", ".join(f"{src} {v:.2f}" for src, v in (ev.get("by_prompts") or {}).items())
            log.info("background drafter training published v%s (held-out acceptance length %s at k=%s%s); the "
                     "server swaps it in when the registry alias moves", ev.get("version"),
                     f"{length:.2f}" if isinstance(length, float) else length, ev.get("k"), f"; {by}" if by else "")

    def status(self) -> dict[str, Any]:
        running = self.proc is not None and self.returncode is None
        state = "running" if running else ("finished" if self.returncode == 0 else
                                           ("stopped" if self._stopping else "failed"))
        return {"state": state, "pid": self.proc.pid if self.proc else None, "log": str(self.log_path),
                "started_at": self.started_at, "minutes": self.minutes, "returncode": self.returncode,
                "published": list(self.published), "last_lines": list(self.tail)[-5:]}

    def stop(self, timeout_s: float = 10.0) -> None:
        """With the server: SIGTERM the child's process group, SIGKILL it if it has not exited in time. What it
        published stays (publishes are atomic); its cached training data lets the next run start faster."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._stopping = True
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass
        if self._reader is not None:
            self._reader.join(5)


def maybe_start(model: str, fingerprint: str, registry: Registry | None, minutes: float,
                work_root: Path) -> DrafterTrainingJob | None:
    """Start background training when the registry has no drafter for this target (else None)."""
    if registry is None:
        log.warning("--ensure-drafter needs a registry to publish into; none is configured: not training")
        return None
    if has_drafter_for(registry, fingerprint):
        return None
    job = DrafterTrainingJob(model, registry, minutes, work_root / f"{Path(model).name}-{fingerprint[:12]}")
    job.start()
    return job
