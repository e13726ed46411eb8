"""Live hot swap of target + drafter pairs from the registry, with a canary guard.

The manager thread (never the engine thread) watches the registry. An alias names a pair (a drafter version and
its policy: registry.store); the manager validates both halves (family fingerprint from the manifests, then sha256
of every file), loads them, and hands them to the engine. A drafter for the policy already serving is applied
between two steps; a new policy is installed with its drafter after a drain (engine.Engine.set_policy: requests
finish on the weights they started with). A drafter trained against another policy than the one the pair names
is refused unless the server allows drift. The versions are reported (headers, metrics, admin API) only once the
engine says the swap took effect. Any failure keeps the old pair serving and is recorded.

`SwapManager` holds what every backend shares (registry watching, admin commands, validation results, history,
the canary verdict, the start-up choice); a subclass says how a validated version is loaded (`_load`) and put into
service (`_install`): `backends/native.py` hands a Drafter to the native engine, `backends/vllm_backend.py`
replaces its vLLM process blue/green. This module holds no tensors and does not import torch.

Canary: after a swap, the new version's live mean acceptance length over `canary_window` drafts is compared with
the previous version's over its last window (after a swap to another policy, with the pair's own held-out
acceptance from its manifest: two policies' live figures are not comparable). A held-out figure is taken at the
draft lengths the server actually drafted in the window: its per-position acceptance q summed up to each draft's
length (1 + q_1 + q_2 at K=2), since the adaptive controller drafts fewer tokens than the K the trainer evaluated
(a live L at K=2 can never reach a held-out L(4) of 3.1). If the live figure falls below by more
than `canary_margin`, the manager swaps the previous pair back, marks the version rejected (it is not swapped in again unless pinned explicitly),
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
from understudy.registry.store import Registry, RegistryError, manifest_metric, manifest_positions
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
    to_policy: str | None = None  # the pair's policy ("base" = the model the server started with)
    from_policy: str | None = None
    drain_s: float | None = None  # a policy swap: how long new requests waited for in-flight ones to finish


def policy_label(policy: int | None) -> str:
    return "base" if policy is None else str(policy)


def check_drift(registry: Registry, version: int, policy: int | None, allow_drift: bool) -> None:
    """Refuse (SwapError) the pair (drafter `version`, `policy`) when the drafter was trained against another
    policy, unless drift is allowed: at start-up and on every swap."""
    own = registry.pair_policy(version)
    if own != policy and not allow_drift:
        raise SwapError(f"drafter {version} was trained against policy {policy_label(own)}, but the pair names "
                        f"policy {policy_label(policy)}: refused, since a drafter made for another policy accepts "
                        "less; publish a drafter trained against that policy, or start the server with "
                        "--allow-drafter-drift to serve it anyway")


@dataclass
class _Served:
    label: str  # "7", "path:/x", "none"
    version: int | None
    drafter: Any  # what `_install` puts into service: a Drafter (native engine) or an exported folder (vLLM); None = off
    window: collections.deque[tuple[int, int]] = field(default_factory=lambda: collections.deque(maxlen=4096))
    inherited: float | None = None  # the baseline it was judged against (used when it served too little)
    policy: int | None = None  # the pair's policy version (None: the base model)
    target: Any = None  # the backend's handle on that policy's weights (native: a LoadedModel)

    @property
    def policy_label(self) -> str:
        return policy_label(self.policy)

    def again(self) -> _Served:
        """The same pair, to serve again (a rollback): a fresh acceptance window."""
        return _Served(label=self.label, version=self.version, drafter=self.drafter, policy=self.policy,
                       target=self.target)


class SwapManager:
    """Backend-independent: subclasses implement `_load(version, target)`, `_load_policy(policy)` and
    `_install(served)`."""

    def __init__(self, fingerprint: str, metrics: ServerMetrics, registry: Registry | None,
                 follow: str | None = "latest", watch_interval_s: float = 1.0, canary_window: int = 256,
                 canary_margin: float = 0.5, allow_drift: bool = False) -> None:
        self.fingerprint, self.metrics, self.registry = fingerprint, metrics, registry
        self.allow_drift = allow_drift
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
    def set_initial(self, label: str, version: int | None, drafter: Any, policy: int | None = None,
                    target: Any = None) -> None:
        self.served = _Served(label=label, version=version, drafter=drafter, policy=policy, target=target)
        self.metrics.set_drafter(label, "registry" if version is not None else ("path" if drafter else "none"),
                                 self.fingerprint)
        self.metrics.set_policy(policy_label(policy))

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
                "version": self.served.label, "policy": self.served.policy_label, "following": self.follow,
                "pinned": self.pinned, "allow_drift": self.allow_drift,
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
        assert self.registry is not None
        for ev in events:
            if ev.kind == "alias" and ev.alias == self.follow and ev.version is not None:
                try:
                    v, p = self.registry.resolve_pair(self.follow)  # as it stands now (it may have moved again)
                except RegistryError as e:
                    log.warning("alias %s moved, but cannot be read: %s; keeping %s", self.follow, e, self.served.label)
                    continue
                if v in self.rejected:
                    log.warning("alias %s moved to v%d, which the canary rejected: not swapping", self.follow, v)
                    continue
                self._swap_to(v, reason=f"alias {self.follow} moved", policy=p)

    def _command(self, cmd: str, arg: Any) -> dict[str, Any]:
        assert self.registry is not None
        if cmd == "pin":  # the mode changes only once the swap succeeded: a refused pin changes nothing
            v, p = self._resolve(arg)
            self._swap_to(v, reason="pinned by admin", raise_on_error=True, policy=p)
            self.follow, self.pinned = None, v
            self.rejected.pop(v, None)  # an explicit pin overrides a canary rejection
        elif cmd == "follow":
            v, p = self._resolve(arg)
            if v not in self.rejected:
                self._swap_to(v, reason=f"following alias {arg}", raise_on_error=True, policy=p)
            self.follow, self.pinned = str(arg), None
        elif cmd == "rollback":
            self._rollback_admin()
        else:
            raise SwapError(f"unknown command {cmd!r}")
        return self.state()

    def _resolve(self, spec: Any) -> tuple[int, int | None]:
        """A drafter version or alias -> the pair it names (drafter, policy)."""
        assert self.registry is not None
        try:
            return self.registry.resolve_pair(spec)
        except RegistryError as e:
            raise SwapError(str(e)) from e

    def _rollback_admin(self) -> None:
        assert self.registry is not None
        if self.follow is not None:
            try:
                v = self.registry.rollback(self.follow, reason="rollback requested through the server admin API")
            except RegistryError as e:
                raise SwapError(f"cannot roll back alias {self.follow!r}: {e}") from e
            _, p = self._resolve(self.follow)
            self._swap_to(v, reason=f"alias {self.follow} rolled back", raise_on_error=True, policy=p)
            return
        if self.previous is None or self.previous.version is None:
            raise SwapError("nothing to roll back to: no previous registry version was served")
        self.pinned = self.previous.version
        self._swap_to(self.previous.version, reason="rollback to the previous version", raise_on_error=True,
                      policy=self.previous.policy)

    # ---- backend hooks ------------------------------------------------------------------------------------------
    def _load(self, version: int, target: Any) -> Any:
        """Validate drafter version `version` (family, checksums, format) and prepare it for `target` (what
        `_load_policy` returned for its pair's policy); raise to refuse it."""
        raise NotImplementedError

    def _load_policy(self, policy: int | None) -> Any:
        """Validate policy version `policy` (None: the base model) and load it; raise to refuse it."""
        raise SwapError(f"this backend serves the model it started with only; the pair names policy version {policy}")

    def _install(self, new: _Served) -> None:
        """Put `new.drafter` into service; return once it serves (raise, changing nothing, if it cannot)."""
        raise NotImplementedError

    def _after_swap(self, rec: SwapRecord) -> None:
        """Called once a swap took effect and was recorded in the state (before it is counted)."""

    def _tick(self) -> None:
        """Called every loop of the manager thread (~20/s)."""

    # ---- swapping ---------------------------------------------------------------------------------------------
    def _swap_to(self, version: int, reason: str, raise_on_error: bool = False, *, policy: int | None) -> None:
        """Serve the pair (drafter `version`, `policy`): a drafter swap when the policy is the one serving, else a
        policy swap (the backend drains, then installs both)."""
        assert self.registry is not None
        if self.served.version == version and self.served.policy == policy:
            return
        label = str(version)
        try:
            check_drift(self.registry, version, policy, self.allow_drift)
            same = policy == self.served.policy
            target = self.served.target if same else self._load_policy(policy)  # checks, then loads
            drafter = self._load(version, target)
            self._apply(_Served(label=label, version=version, drafter=drafter, policy=policy, target=target), reason)
        except (RegistryError, UnderstudyError, OSError) as e:
            self._record(SwapRecord(time.time(), label, self.served.label, "failed", f"{reason}: {e}",
                                    to_policy=policy_label(policy), from_policy=self.served.policy_label))
            log.warning("pair (drafter v%s, policy %s) refused, keeping drafter %s with policy %s: %s", version,
                        policy_label(policy), self.served.label, self.served.policy_label, e)
            if raise_on_error:
                raise SwapError(f"drafter version {version} with policy {policy_label(policy)} refused: {e}") from e

    def _apply(self, new: _Served, reason: str, result: str = "success") -> None:
        self._install(new)
        rec = SwapRecord(time.time(), new.label, self.served.label, result, reason, to_policy=new.policy_label,
                         from_policy=self.served.policy_label)
        # another policy's pair is judged against its own manifest's held-out figures (read once, before the lock)
        manifest = self._manifest(new.version) if new.policy != self.served.policy else None
        with self._lock:
            if result == "success":
                self.previous = self.served
            self.served = new
            if self.previous is not None and new.policy != self.previous.policy:
                # another policy: the previous pair's live acceptance is not comparable (a new policy drifts from
                # what any drafter saw); judge the pair against its own held-out acceptance from the trainer
                base, positions = manifest_metric(manifest), manifest_positions(manifest)
            else:
                base, positions = self._baseline(self.previous, self.canary_window), None
            new.inherited = base
            self.canary = {"version": new.label, "drafts": 0, "accepted": 0, "baseline": base,
                           "baseline_positions": positions, "drafts_by_length": {}} if result == "success" else None
        self.metrics.set_drafter(new.label, "registry", self.fingerprint)
        self.metrics.set_policy(new.policy_label)
        self._after_swap(rec)
        self._record(rec)
        log.info("drafter %s now serving with policy %s%s (%s)",
                 f"v{new.label}" if new.version is not None else new.label, new.policy_label,
                 self._describe(new.version), reason)

    def _manifest(self, version: int | None) -> dict[str, Any] | None:
        """The version's manifest (None for no version, no registry, or one that cannot be read)."""
        if version is None or self.registry is None:
            return None
        try:
            return self.registry.manifest(version)
        except (RegistryError, OSError):
            return None

    def _describe(self, version: int | None) -> str:
        """", held-out acceptance length 2.61" from the version's manifest, when it recorded one."""
        length = manifest_metric(self._manifest(version))
        return f", held-out acceptance length {length:.2f}" if length is not None else ""

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
    def _observe(self, drafts: int, accepted: int, draft_tokens: int | None = None) -> None:
        """Spec-decode activity of the drafter serving (from the engine's steps or the backend's counters):
        `drafts` drafts proposing `draft_tokens` tokens in all (their length, K, is draft_tokens / drafts)."""
        with self._lock:
            self.served.window.append((drafts, accepted))
            if self.canary is not None:
                self.canary["drafts"] += drafts
                self.canary["accepted"] += accepted
                if draft_tokens and drafts:
                    k = max(1, round(draft_tokens / drafts))
                    by = self.canary["drafts_by_length"]
                    by[k] = by.get(k, 0) + drafts

    @staticmethod
    def _baseline_at_lengths(c: dict[str, Any]) -> float | None:
        """The held-out acceptance length at the draft lengths the window drafted: mean over its drafts of 1 +
        q_1 + ... + q_K (positions beyond what the manifest measured count 0); None without both."""
        q, by = c.get("baseline_positions"), c.get("drafts_by_length") or {}
        n = sum(by.values())
        if not q or not n:
            return None
        return 1.0 + sum(count * sum(q[:k]) for k, count in by.items()) / n

    def _check_canary(self) -> None:
        with self._lock:
            c = self.canary
            if c is None or c["drafts"] < self.canary_window:
                return
            self.canary = None
            live = 1.0 + c["accepted"] / c["drafts"]
            at_lengths = self._baseline_at_lengths(c)
            base = c["baseline"] if at_lengths is None else at_lengths
            if base is None or live >= base - self.canary_margin or self.previous is None:
                return
            bad, prev = self.served, self.previous
        against = ("its held-out acceptance at the draft lengths served" if at_lengths is not None
                   else "the previous version's")
        why = (f"canary: mean acceptance length {live:.2f} over {c['drafts']} drafts is below {against} "
               f"{base:.2f} by more than {self.canary_margin}")
        log.warning("rolling back drafter %s -> %s: %s", bad.label, prev.label, why)
        if bad.version is not None:
            self.rejected[bad.version] = why
        try:
            self._apply(prev.again(), why, result="rolled_back")
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
    policy: int | None = None  # the pair's policy version (None: the base model)
    policy_path: Path | None = None  # its folder, checked and verified


def choose_initial_drafter(spec: str | None, fingerprint: str, registry: Registry | None,
                           follow: str | None, allow_drift: bool = False) -> InitialDrafter:
    """Both backends' start-up rule: an explicit path/version/alias (its errors are the operator's to fix), else
    the pair the followed alias names; a registry shared by several targets falls back to the newest drafter made
    for this target, with its own policy (the alias is still followed, and its moves are checked as usual)."""
    if spec:
        path = Path(spec).expanduser()
        if path.is_dir():
            check_family(validate_folder(path).family_fingerprint, fingerprint, f"drafter {path}")
            return InitialDrafter(f"path:{path}", None, path)
        if registry is None:
            raise SwapError(f"--drafter {spec!r} is not a folder and no registry is configured (--registry)")
        return _checkout_pair(registry, *registry.resolve_pair(spec), fingerprint, allow_drift)
    if registry is None or not follow:
        return InitialDrafter("none", None, None)
    try:
        v, p = registry.resolve_pair(follow)
    except RegistryError:
        log.warning("registry %s has no alias %r yet: serving without a drafter until one is published",
                    registry.root, follow)
        return InitialDrafter("none", None, None)
    mine = sorted(((i.version, i.policy) for i in registry.list_versions()
                   if i.kind == "drafter" and i.family_fingerprint == fingerprint and i.version != v), reverse=True)
    first: UnderstudyError | None = None
    for cand, pol in [(v, p), *mine]:
        try:
            chosen = _checkout_pair(registry, cand, pol, fingerprint, allow_drift)
        except (RegistryError, SwapError) as e:
            first = first or e
            log.warning("v%d is not usable (%s)", cand, e)
            continue
        if cand != v:
            log.warning("alias %s -> v%d is not usable (%s): serving v%d, the newest version for this target, "
                        "until the alias moves to a compatible one", follow, v, first, cand)
        return chosen
    log.warning("alias %s -> v%d is not usable (%s) and no other version fits this target: serving without a "
                "drafter", follow, v, first)
    return InitialDrafter("none", None, None)


def _checkout_pair(registry: Registry, v: int, policy: int | None, fingerprint: str,
                   allow_drift: bool) -> InitialDrafter:
    check_drift(registry, v, policy, allow_drift)
    v, path = registry.checkout(v, fingerprint)
    ppath = registry.checkout_policy(policy, fingerprint) if policy is not None else None
    return InitialDrafter(str(v), v, path, policy, ppath)
