"""Serve first, draft in the background (`understudy serve --ensure-drafter`).

When the registry holds no drafter for the served model, the server does not wait for one: it serves at once
(plain, or n-gram with `--fallback-proposer ngram`; the controller decides K) and starts
`understudy drafter train --publish --publish-every-minutes N --events` as a child process. The child publishes
each checkpoint whose held-out acceptance beats the run's earlier ones; `publish` moves the registry's `latest`
alias, which the hot-swap manager follows, so every better drafter is swapped in live.

The drafter keeps learning after its first budget: the job runs up to `rounds` such runs one after another. Each
later round continues the best version published so far (`--init-from VERSION`) on the same cached data (the
same `--data-minutes`, so none of it is generated again), and publishes only what beats that version's held-out
acceptance. A round that publishes nothing ends the job: the drafter has stopped improving on this data.

This module owns the child: its commands, its environment (no API or admin keys), its priority (niced, so
serving keeps the cores it needs), its log file, the events it reports and its shutdown with the server. It holds
no tensors.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from understudy.registry.store import Registry
from understudy.server.settings import keyless_env

log = logging.getLogger(__name__)

DATA_SHARE = 0.5  # of a round's minutes, for generating the data (`drafter train`'s own default split)


def has_drafter_for(registry: Registry, fingerprint: str) -> bool:
    return any(v.family_fingerprint == fingerprint for v in registry.list_versions())


class DrafterTrainingJob:
    """Background `understudy drafter train` runs, one round after another; `status()` is what `/admin/drafter`
    shows under `training`."""

    def __init__(self, model: str, registry: Registry, minutes: float, work_dir: Path, rounds: int = 1,
                 publish_every_minutes: float = 2.0, nice: int = 10, extra_args: list[str] | None = None,
                 on_end: Callable[[str], None] | None = None) -> None:
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.model, self.registry, self.minutes, self.rounds = model, registry, minutes, rounds
        # Every round generates (round 1) or reuses (later rounds) the same data: its budget is part of the cache key.
        self.data_minutes = round(minutes * DATA_SHARE, 2)
        self.work_dir = Path(work_dir)
        self.log_path = self.work_dir / "train.log"
        self.publish_every_minutes, self.nice = publish_every_minutes, nice
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[str] | None = None
        self.round = 0  # the round running (or last run)
        self.published: list[dict[str, Any]] = []
        self.tail: deque[str] = deque(maxlen=20)
        self.started_at: float | None = None
        self.returncode: int | None = None
        self.state = "running"  # then finished | failed | stopped
        self.ended: str | None = None  # why the job ended, once it has
        self._logf: Any = None  # the running round's log file (closed when its child exits)
        self._supervisor: threading.Thread | None = None
        self._lock = threading.Lock()  # between stop() and the start of the next round
        self._stopping = False
        self.on_end = on_end  # called with the final state once the job ends (the server takes the core back)

    def out_dir(self, round_: int) -> Path:
        return self.work_dir / ("drafter" if round_ == 1 else f"drafter-round{round_}")

    def command(self, round_: int = 1) -> list[str]:
        cmd = [sys.executable, "-m", "understudy.cli.main", "drafter", "train", "--model", self.model,
               "--out", str(self.out_dir(round_)), "--max-minutes", f"{self.minutes:g}",
               "--data-minutes", f"{self.data_minutes:g}", "--publish",
               "--publish-every-minutes", f"{self.publish_every_minutes:g}", "--events",
               "--registry", str(self.registry.root), "--threads", "1", *self.extra_args]
        if round_ > 1:
            cmd += ["--init-from", str(self.best_version())]
        return cmd

    def best_version(self) -> int | None:
        """The job's best version so far: each publish beats every earlier one, so the last published."""
        return int(self.published[-1]["version"]) if self.published else None

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        self._start_round(1)
        log.info("no drafter for %s in %s yet: serving without one and training one in the background "
                 "(pid %d, about %g minutes, up to %d round(s); each better version is published and swapped in; "
                 "log: %s)", self.model, self.registry.root, self.proc.pid if self.proc else -1, self.minutes,
                 self.rounds, self.log_path)
        self._supervisor = threading.Thread(target=self._supervise, name="understudy-drafter-job", daemon=True)
        self._supervisor.start()

    def _start_round(self, round_: int) -> bool:
        """Start round `round_`'s child; False when the job is being stopped (then nothing starts)."""
        with self._lock:
            if self._stopping:
                return False
            nice = self.nice

            def lower_priority() -> None:  # in the child, before exec
                os.nice(nice)

            cmd = self.command(round_)
            logf = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed by the supervisor)
            logf.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} round {round_}/{self.rounds}: {' '.join(cmd)}\n")
            logf.flush()
            self._logf = logf
            try:
                self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, text=True,
                                             env=keyless_env(os.environ), start_new_session=True,
                                             preexec_fn=lower_priority if nice else None)
            except OSError:
                logf.close()
                raise
            self.round, self.returncode = round_, None
            return True

    def _end(self, state: str, why: str) -> None:
        self.state, self.ended = state, why
        (log.error if state == "failed" else log.info)("background drafter training %s: %s; the server keeps "
                                                       "serving. Log: %s", state, why, self.log_path)
        if self.on_end is not None:
            try:
                self.on_end(state)
            except Exception:  # the job's end must not be lost to a failing callback; say so
                log.exception("the server's handler for the end of background drafter training failed")

    def _supervise(self) -> None:
        while True:
            before = len(self.published)
            self._read_round()
            if self._stopping:
                return self._end("stopped", f"stopped with the server in round {self.round}")
            if self.returncode != 0:
                return self._end("failed", f"round {self.round} exited with status {self.returncode}")
            if len(self.published) == before:
                return self._end("finished", f"round {self.round} published nothing better than "
                                 f"v{self.best_version()}: the drafter has stopped improving on this data"
                                 if self.round > 1 else "round 1 published nothing (no held-out prompts)")
            if self.round >= self.rounds:
                return self._end("finished", f"{len(self.published)} version(s) published in {self.round} round(s)")
            log.info("background drafter training: round %d of %d continues v%d on the same data",
                     self.round + 1, self.rounds, self.best_version())
            try:
                if not self._start_round(self.round + 1):
                    return self._end("stopped", f"stopped with the server before round {self.round + 1}")
            except OSError as e:
                return self._end("failed", f"round {self.round + 1} could not start: {e}")

    def _read_round(self) -> None:
        proc, logf = self.proc, self._logf
        assert proc is not None and proc.stdout is not None
        try:
            for line in proc.stdout:
                logf.write(line)
                logf.flush()
                self.tail.append(line.rstrip())
                self._on_line(line)
        finally:
            self.returncode = proc.wait()
            logf.close()

    def _on_line(self, line: str) -> None:
        if not line.startswith('{"event"'):
            return
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            return
        if ev.get("event") == "published":
            self.published.append({**ev, "round": self.round})
            length = ev.get("heldout_acceptance_length")
            by = ", ".join(f"{src} {v:.2f}" for src, v in (ev.get("by_prompts") or {}).items())
            log.info("background drafter training published v%s in round %d (held-out acceptance length %s at k=%s%s);"
                     " the server swaps it in when the registry alias moves", ev.get("version"), self.round,
                     f"{length:.2f}" if isinstance(length, float) else length, ev.get("k"), f"; {by}" if by else "")

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "pid": self.proc.pid if self.proc else None, "log": str(self.log_path),
                "started_at": self.started_at, "minutes": self.minutes, "round": self.round, "rounds": self.rounds,
                "returncode": self.returncode, "ended": self.ended, "published": list(self.published),
                "last_lines": list(self.tail)[-5:]}

    def stop(self, timeout_s: float = 10.0) -> None:
        """With the server: no further round starts; SIGTERM the running child's process group, SIGKILL it if it
        has not exited in time. What it published stays (publishes are atomic); its cached training data lets the
        next run start faster."""
        with self._lock:
            self._stopping = True
            proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            except ProcessLookupError:
                pass
        if self._supervisor is not None:
            self._supervisor.join(5)


def maybe_start(model: str, fingerprint: str, registry: Registry | None, minutes: float,
                work_root: Path, rounds: int = 1,
                on_end: Callable[[str], None] | None = None, dtype: str = "auto") -> DrafterTrainingJob | None:
    """Start background training when the registry has no drafter for this target (else None); `on_end(state)` is
    called once it ends. `dtype` is the server's: the job's data is decoded in it, so the drafter learns the
    features this server feeds it (a float16 server's data is decoded in the machine's default)."""
    if registry is None:
        log.warning("--ensure-drafter needs a registry to publish into; none is configured: not training")
        return None
    if has_drafter_for(registry, fingerprint):
        return None
    data_dtype = dtype if dtype in ("float32", "bfloat16") else "auto"
    job = DrafterTrainingJob(model, registry, minutes, work_root / f"{Path(model).name}-{fingerprint[:12]}", rounds,
                             on_end=on_end, extra_args=["--data-dtype", data_dtype])
    job.start()
    return job
