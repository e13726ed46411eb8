"""Live drafter hot swap from the registry, with a canary guard.

The manager thread (never the engine thread) watches the registry, validates a candidate version (family
fingerprint from the manifest, then sha256 of every file), loads it, and hands it to the engine, which applies
it between two steps. The version is reported (header, metrics, admin API) only once the engine says the swap
took effect. Any failure keeps the old drafter serving and is recorded.

`SwapManager` holds what every backend shares (registry watching, admin commands, validation results, history,
the canary verdict, the start-up choice); a subclass says how a validated version is loaded (`_load`) and put into
service (`_install`): `backends/native.py` hands a Drafter to the native engine, `backends/vllm_backend.py`
replaces its vLLM process blue/green. This module holds no tensors and does not import torch.

Canary: after a swap, the new version's live mean acceptance length over `canary_window` drafts is compared with
the previous version's over its last window; if it falls below by more than `canary_margin`, the manager swaps
the previous drafter back, marks the version rejected (it is not swapped in again unless pinned explicitly),
and records why.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from understudy.drafter.format import check_family, validate_folder
from understudy.errors import UnderstudyError
from understudy.registry.store import Registry, RegistryError
from understudy.registry.watch import RegistryWatcher
from understudy.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class SwapError(UnderstudyError):
    """An admin swap request cannot be done (names the version/alias and why)."""

    http_status, error_type, code, expose = 409, "invalid_request_error", "swap_failed", True


@dataclass
class SwapRecord:
    at: float
    to_version: str
    from_version: str
    result: str  # "success" | "failed" | "rolled_back"
    reason: str = ""
    stall_s: float | None = None


@dataclass
class _Served:
    label: str  # "7", "path:/x", "none"
    version: int | None
    drafter: Any  # what `_install` puts into service: a Drafter (native engine) or an exported folder (vLLM); None = off
    window: collections.deque[tuple[int, int]] = field(default_factory=lambda: collections.deque(maxlen=4096))
    inherited: float | None = None  # the baseline it was judged against (used when it served too little)


class SwapManager:
    """Backend-independent: subclasses implement `_load(version)` and `_install(served)`."""

    def __init__(self, fingerprint: str, metrics: ServerMetrics, registry: Registry | None,
                 follow: str | None = "latest", watch_interval_s: float = 1.0, canary_window: int = 256,
                 canary_margin: float = 0.5) -> None:
        self.fingerprint, self.metrics, self.registry = fingerprint, metrics, registry
        self.follow = follow  # alias followed, or None when pinned / static
        self.pinned: int | None = None
        self.watch_interval_s = watch_interval_s
        self.canary_window, self.canary_margin = canary_window, canary_margin
        self.served = _Served(label="none", version=None, drafter=None)
        self.previous: _Served | None = None
        self.rejected: dict[int, str] = {}
        self.history: collections.deque[SwapRecord] = collections.deque(maxlen=200)
        self.canary: dict[str, Any] | None = None
        self._cmds: queue.Queue[tuple[str, Any, Future]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.training: Any = None  # a background drafter training job (server/drafter_job.py), shown in state()

    # ---- startup --------------------------------------------------------------------------------------------
    def set_initial(self, label: str, version: int | None, drafter: Any) -> None:
        self.served = _Served(label=label, version=version, drafter=drafter)
        self.metrics.set_drafter(label, "registry" if version is not None else ("path" if drafter else "none"),
                                 self.fingerprint)

    def start(self) -> None:
        if self.registry is None:
            return
        self._thread = threading.Thread(target=self._run, name="understudy-hotswap", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    # ---- admin commands (executed on the manager thread, in order) ---------------------------------------
    def submit(self, cmd: str, arg: Any = None, timeout_s: float = 120.0) -> dict[str, Any]:
        if self._thread is None:
            raise SwapError("hot swap is off: the server was not started with a drafter registry")
        fut: Future = Future()
        self._cmds.put((cmd, arg, fut))
        return fut.result(timeout=timeout_s)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "version": self.served.label, "following": self.follow, "pinned": self.pinned,
                "previous": self.previous.label if self.previous else None,
                "rejected": {str(k): v for k, v in self.rejected.items()},
                "canary": dict(self.canary) if self.canary else None,
                "history": [asdict(h) for h in list(self.history)[-20:]],
                "registry": str(self.registry.root) if self.registry else None,
                "training": self.training.status() if self.training is not None else None,
            }

    # ---- the manager thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        assert self.registry is not None
        watcher = RegistryWatcher(self.registry)
        next_poll = 0.0
        while not self._stop.is_set():
            try:
                cmd, arg, fut = self._cmds.get(timeout=0.05)
                try:
                    fut.set_result(self._command(cmd, arg))
                except Exception as e:  # returned to the admin caller
                    fut.set_exception(e)
            except queue.Empty:
                pass
            self._tick()
            self._check_canary()
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.watch_interval_s
                try:
                    self._on_events(watcher.poll())
                except Exception:
                    log.exception("registry poll failed; will retry")

    def _on_events(self, events: list) -> None:  # type: ignore[type-arg]
        if self.follow is None:
            return
        for ev in events:
            if ev.kind == "alias" and ev.alias == self.follow and ev.version is not None:
                if ev.version in self.rejected:
                    log.warning("alias %s moved to v%d, which the canary rejected: not swapping", self.follow, ev.version)
                    continue
                self._swap_to(ev.version, reason=f"alias {self.follow} moved")

    def _command(self, cmd: str, arg: Any) -> dict[str, Any]:
        assert self.registry is not None
        if cmd == "pin":  # the mode changes only once the swap succeeded: a refused pin changes nothing
            v = self._resolve(arg)
            self._swap_to(v, reason="pinned by admin", raise_on_error=True)
            self.follow, self.pinned = None, v
            self.rejected.pop(v, None)  # an explicit pin overrides a canary rejection
        elif cmd == "follow":
            v = self._resolve(arg)
            if v not in self.rejected:
                self._swap_to(v, reason=f"following alias {arg}", raise_on_error=True)
            self.follow, self.pinned = str(arg), None
        elif cmd == "rollback":
            self._rollback_admin()
        else:
            raise SwapError(f"unknown command {cmd!r}")
        return self.state()

    def _resolve(self, spec: Any) -> int:
        assert self.registry is not None
        try:
            return self.registry.resolve(spec)
        except RegistryError as e:
            raise SwapError(str(e)) from e

    def _rollback_admin(self) -> None:
        assert self.registry is not None
        if self.follow is not None:
            try:
                v = self.registry.rollback(self.follow, reason="rollback requested through the server admin API")
            except RegistryError as e:
                raise SwapError(f"cannot roll back alias {self.follow!r}: {e}") from e
            self._swap_to(v, reason=f"alias {self.follow} rolled back", raise_on_error=True)
            return
        if self.previous is None or self.previous.version is None:
            raise SwapError("nothing to roll back to: no previous registry version was served")
        self.pinned = self.previous.version
        self._swap_to(self.previous.version, reason="rollback to the previous version", raise_on_error=True)

    # ---- backend hooks ------------------------------------------------------------------------------------------
    def _load(self, version: int) -> Any:
        """Validate registry version `version` (family, checksums, format) and prepare it; raise to refuse it."""
        raise NotImplementedError

    def _install(self, new: _Served) -> None:
        """Put `new.drafter` into service; return once it serves (raise, changing nothing, if it cannot)."""
        raise NotImplementedError

    def _after_swap(self, rec: SwapRecord) -> None:
        """Called once a swap took effect and was recorded in the state (before it is counted)."""

    def _tick(self) -> None:
        """Called every loop of the manager thread (~20/s)."""

    # ---- swapping ---------------------------------------------------------------------------------------------
    def _swap_to(self, version: int, reason: str, raise_on_error: bool = False) -> None:
        assert self.registry is not None
        if self.served.version == version:
            return
        label = str(version)
        try:
            drafter = self._load(version)  # checks, then loads
            self._apply(_Served(label=label, version=version, drafter=drafter), reason)
        except (RegistryError, UnderstudyError, OSError) as e:
            self._record(SwapRecord(time.time(), label, self.served.label, "failed", f"{reason}: {e}"))
            log.warning("drafter v%s refused, keeping %s: %s", version, self.served.label, e)
            if raise_on_error:
                raise SwapError(f"drafter version {version} refused: {e}") from e

    def _apply(self, new: _Served, reason: str, result: str = "success") -> None:
        self._install(new)
        rec = SwapRecord(time.time(), new.label, self.served.label, result, reason)
        with self._lock:
            if result == "success":
                self.previous = self.served
            self.served = new
            base = self._baseline(self.previous, self.canary_window)
            new.inherited = base
            self.canary = {"version": new.label, "drafts": 0, "accepted": 0, "baseline": base} \
                if result == "success" else None
        self.metrics.set_drafter(new.label, "registry", self.fingerprint)
        self._after_swap(rec)
        self._record(rec)
        log.info("drafter %s now serving%s (%s)", f"v{new.label}" if new.version is not None else new.label,
                 self._describe(new.version), reason)

    def _describe(self, version: int | None) -> str:
        """", held-out acceptance length 2.61" from the version's manifest, when it recorded one."""
        if version is None or self.registry is None:
            return ""
        try:
            length = (self.registry.manifest(version).get("metrics") or {}).get("heldout_acceptance_length")
        except (RegistryError, OSError):
            return ""
        return f", held-out acceptance length {length:.2f}" if isinstance(length, (int, float)) else ""

    def _record(self, rec: SwapRecord) -> None:
        with self._lock:
            self.history.append(rec)
        self.metrics.swaps.labels(self.metrics.model_name, rec.result).inc()

    @staticmethod
    def _baseline(prev: _Served | None, min_drafts: int) -> float | None:
        """The previous version's live mean acceptance length; if it served fewer than min_drafts drafts (fast
        successive swaps), the baseline it was itself judged against, so noise never decides a rollback."""
        if prev is None or prev.drafter is None:
            return None
        drafts = sum(d for d, _ in prev.window)
        if drafts < min_drafts:
            return prev.inherited
        return 1.0 + sum(a for _, a in prev.window) / drafts

    # ---- canary ---------------------------------------------------------------------------------------------
    def _observe(self, drafts: int, accepted: int) -> None:
        """Spec-decode activity of the drafter serving (from the engine's steps or the backend's counters)."""
        with self._lock:
            self.served.window.append((drafts, accepted))
            if self.canary is not None:
                self.canary["drafts"] += drafts
                self.canary["accepted"] += accepted

    def _check_canary(self) -> None:
        with self._lock:
            c = self.canary
            if c is None or c["drafts"] < self.canary_window:
                return
            self.canary = None
            live = 1.0 + c["accepted"] / c["drafts"]
            base = c["baseline"]
            if base is None or live >= base - self.canary_margin or self.previous is None:
                return
            bad, prev = self.served, self.previous
        why = (f"canary: mean acceptance length {live:.2f} over {c['drafts']} drafts is below the previous "
               f"version's {base:.2f} by more than {self.canary_margin}")
        log.warning("rolling back drafter %s -> %s: %s", bad.label, prev.label, why)
        if bad.version is not None:
            self.rejected[bad.version] = why
        try:
            self._apply(_Served(label=prev.label, version=prev.version, drafter=prev.drafter), why,
                        result="rolled_back")
        except (UnderstudyError, OSError) as e:  # e.g. the vLLM backend could not start the previous drafter
            log.error("canary rollback to %s failed, keeping %s: %s", prev.label, bad.label, e)
            self._record(SwapRecord(time.time(), prev.label, bad.label, "failed", f"canary rollback: {e}"))
            return
        with self._lock:
            self.previous = None


@dataclass(frozen=True)
class InitialDrafter:
    """What a backend serves at start, validated (format, family, checksums) but not loaded."""

    label: str  # "path:DIR", a version number, or "none"
    version: int | None
    path: Path | None


def choose_initial_drafter(spec: str | None, fingerprint: str, registry: Registry | None,
                           follow: str | None) -> InitialDrafter:
    """Both backends' start-up rule: an explicit path/version/alias (its errors are the operator's to fix), else
    the followed alias; a registry shared by several targets falls back to the newest version made for this
    target (the alias is still followed, and its moves are checked as usual)."""
    if spec:
        path = Path(spec).expanduser()
        if path.is_dir():
            check_family(validate_folder(path).family_fingerprint, fingerprint, f"drafter {path}")
            return InitialDrafter(f"path:{path}", None, path)
        if registry is None:
            raise SwapError(f"--drafter {spec!r} is not a folder and no registry is configured (--registry)")
        v, path = registry.checkout(spec, fingerprint)
        return InitialDrafter(str(v), v, path)
    if registry is None or not follow:
        return InitialDrafter("none", None, None)
    try:
        v = registry.resolve(follow)
    except RegistryError:
        log.warning("registry %s has no alias %r yet: serving without a drafter until one is published",
                    registry.root, follow)
        return InitialDrafter("none", None, None)
    mine = sorted((i.version for i in registry.list_versions()
                   if i.family_fingerprint == fingerprint and i.version != v), reverse=True)
    first: RegistryError | None = None
    for cand in [v, *mine]:
        try:
            cand, path = registry.checkout(cand, fingerprint)
        except RegistryError as e:
            first = first or e
            log.warning("v%d is not usable (%s)", cand, e)
            continue
        if cand != v:
            log.warning("alias %s -> v%d is not usable (%s): serving v%d, the newest version for this target, "
                        "until the alias moves to a compatible one", follow, v, first, cand)
        return InitialDrafter(str(cand), cand, path)
    log.warning("alias %s -> v%d is not usable (%s) and no other version fits this target: serving without a "
                "drafter", follow, v, first)
    return InitialDrafter("none", None, None)
