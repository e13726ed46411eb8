"""The native backend: our engine in this process. `build_state` loads the target (the base model, or the policy
of the pair the registry names) and the start-up drafter, and wires the engine thread (`AsyncEngine`), the
metrics and the hot-swap manager (`HotSwapManager`, which hands a loaded Drafter to the engine between two steps,
or a loaded policy and its drafter, which the engine installs after a drain)."""

from __future__ import annotations

import collections
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from understudy.drafter.model import Drafter, load_drafter
from understudy.engine.bandit import AdaptiveController, BanditConfig
from understudy.engine.config import EngineConfig
from understudy.engine.controller import FixedController, OperatorOverride, SpeculationController
from understudy.engine.engine import Engine, StepOutput, StepStats
from understudy.engine.loader import LoadedModel, load_model, resolve_dtype
from understudy.engine.structured import Grammar, StructuredOutputs
from understudy.registry.store import Registry
from understudy.server.backends import open_registry
from understudy.server.errors import APIError
from understudy.server.hotswap import (
    SwapError,
    SwapManager,
    SwapRecord,
    _Served,
    choose_initial_drafter,
    policy_label,
)
from understudy.server.metrics import ServerMetrics
from understudy.server.scheduler import AsyncEngine
from understudy.server.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    settings: ServerSettings
    target: LoadedModel
    engine: Engine
    scheduler: AsyncEngine
    metrics: ServerMetrics
    hotswap: HotSwapManager
    served_model_name: str
    structured: StructuredOutputs  # response_format: compiles grammars for the served tokenizer
    ready: bool = False

    @property
    def tokenizer(self) -> Any:
        return self.target.tokenizer

    def grammar(self, kind: str, schema: dict[str, Any] | None) -> Grammar | None:
        """The grammar of a response_format (kind "text": none). Compiles on the caller's thread, before the
        request is queued: a schema that cannot be enforced raises GrammarError (400 naming the field)."""
        if kind == "json_object":
            return self.structured.json_object()
        if kind == "json_schema":
            assert schema is not None
            return self.structured.json_schema(schema)
        return None

    def drafter_label(self) -> str:
        return self.hotswap.served.label

    def release_cores(self, why: str) -> None:
        """The background drafter job no longer trains on the other core (it ended, or none started): decode and
        prefill on every core from the next engine step, unless --threads pinned a count."""
        s = self.settings
        if s.threads is not None or s.device != "cpu" or not s.may_train_drafter:
            return
        n = len(os.sched_getaffinity(0))
        self.engine.set_threads(n, s.prefill_threads)
        self.scheduler._wake.set()
        log.info("%s: decoding on %d thread(s) from now on", why, n)

    def policy_label(self, epoch: int | None = None) -> str:
        """The policy serving, or the one that serves (or served) requests added in `epoch`."""
        label = self.engine.policy_labels.get(self.engine.epoch if epoch is None else epoch)
        return str(label) if label is not None else self.hotswap.served.policy_label

    # ---- what create_app and the admin API need from any backend (see backends/__init__.py) ----------------
    async def start(self) -> None:
        self.scheduler.start()
        self.hotswap.start()

    async def stop(self) -> None:
        self.hotswap.stop()
        await self.scheduler.stop()

    def health(self) -> dict[str, Any]:
        e = self.engine
        return {"status": "draining" if self.scheduler.draining else "ok", "model": self.served_model_name,
                "drafter_version": self.drafter_label(), "policy_version": self.policy_label(),
                "running": e.num_running, "waiting": e.num_waiting,
                "in_flight": self.scheduler.in_flight, "max_in_flight": self.scheduler.max_in_flight,
                "proposer": e.proposer.name if e.proposer is not None else "none",
                "steps": self.scheduler.steps, "spec_decode": e.stats.to_dict(), "controller": e.controller.state(),
                "threads": e.threads}

    async def metrics_text(self) -> bytes:
        self.metrics.set_queue(self.engine.num_running, self.engine.num_waiting)
        self.metrics.set_controller(self.engine.controller.state())
        return self.metrics.render()

    def controller_state(self) -> dict[str, Any]:
        return self.engine.controller.state()

    def pin_speculation(self, k: int | None) -> dict[str, Any]:
        """The operator's override (POST /admin/controller): every step uses K = k from the next one on (0: off),
        or, with None, the controller chooses again. The controller's arms keep what they learnt."""
        ctl = self.engine.controller
        if not isinstance(ctl, OperatorOverride):
            raise APIError(409, "this server's controller cannot be pinned", code="not_pinnable")
        try:
            ctl.pin(k)
        except ValueError as e:
            raise APIError(400, f"k: {e}", param="k") from e
        log.info("speculation %s by the operator", "handed back to the controller" if k is None
                 else ("off" if k == 0 else f"pinned at K={k}"))
        return {**ctl.state(), "proposer": self.engine.proposer.name if self.engine.proposer is not None else "none"}


class HotSwapManager(SwapManager):
    """The native engine's swaps: the engine applies a loaded Drafter between two steps, and a loaded policy with
    its drafter after a drain; the canary is fed from the engine thread's step hook, and the first step after a
    swap is timed as the swap's stall (a policy swap's drain, the wait for in-flight requests, as its drain_s)."""

    def __init__(self, engine: Engine, target: LoadedModel, metrics: ServerMetrics, registry: Registry | None,
                 wake: Any, follow: str | None = "latest", watch_interval_s: float = 1.0,
                 canary_window: int = 256, canary_margin: float = 0.5, allow_drift: bool = False) -> None:
        super().__init__(target.fingerprint, metrics, registry, follow, watch_interval_s, canary_window,
                         canary_margin, allow_drift)
        self.engine, self.target = engine, target  # target: the base model (policy None)
        self.last_drain_s: float | None = None  # how long the last policy swap waited for in-flight requests
        self.wake = wake  # callable: nudge the engine thread so an idle engine applies the swap
        self.served = _Served(label="none", version=None, drafter=engine.drafter)
        self._gen_seen = engine.drafter_generation
        self._step_times: collections.deque[float] = collections.deque(maxlen=64)
        self._pending_stall: SwapRecord | None = None

    def _load(self, version: int, target: LoadedModel | None) -> Drafter:
        assert self.registry is not None
        lm = target or self.target
        _, path = self.registry.checkout(version, lm.fingerprint)  # family + checksums
        return load_drafter(path, lm.model, lm.fingerprint)

    def _load_policy(self, policy: int | None) -> LoadedModel:
        """The base model (None), or a policy version loaded like it (dtype, device, quantisation)."""
        assert self.registry is not None
        if policy is None:
            return self.target
        path = self.registry.checkout_policy(policy, self.target.fingerprint)  # kind, family + checksums
        return load_policy(path, self.target, f"policy version {policy}")

    def _install(self, new: _Served) -> None:
        if new.policy != self.served.policy:
            t0 = time.monotonic()
            epoch = self.engine.set_policy(new.target.model, new.drafter, policy_label(new.policy))
            self.wake()
            while self.engine.epoch < epoch and not self._stop.is_set():  # the drain: no deadline, see set_policy
                time.sleep(0.005)
            self.last_drain_s = time.monotonic() - t0
            log.info("policy %s installed after a %.2f s drain", policy_label(new.policy), self.last_drain_s)
            return
        gen = self.engine.drafter_generation
        self.engine.set_drafter(new.drafter)
        self.wake()
        deadline = time.monotonic() + 60
        while self.engine.drafter_generation == gen and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.002)

    def _after_swap(self, rec: SwapRecord) -> None:
        if self.last_drain_s is not None:
            rec.drain_s, self.last_drain_s = round(self.last_drain_s, 4), None
            self.metrics.policy_drain.labels(self.metrics.model_name).observe(rec.drain_s)
        self._pending_stall = rec
        reset = getattr(self.engine.controller, "reset", None)
        if callable(reset):
            reset()  # the arms' rewards belong to the old drafter

    def on_drafter_fault(self, why: str) -> None:
        """Engine-thread hook: a step failed with the drafter and succeeded without it (StepStats.drafter_fault),
        so the drafter, and only the drafter, is at fault. Speculation is lossless, so turning it off is always
        safe: do it at once (the next step runs without it), mark its version rejected, and report it; the
        server keeps answering, plain. A later alias move, pin or rollback swaps a drafter in again. A step that
        fails even without drafts is not the drafter's doing and leaves it in service."""
        if self.engine.drafter is None:
            return
        bad = self.served
        why = f"drafter {bad.label} faulted ({why}); speculation off until the next swap"
        self.engine.set_drafter(None)
        with self._lock:
            if bad.version is not None:
                self.rejected[bad.version] = why
            self.served = _Served(label="none", version=None, drafter=None, policy=bad.policy, target=bad.target)
            self.canary = None
        self.metrics.set_drafter("none", "none", self.fingerprint)
        self._record(SwapRecord(time.time(), "none", bad.label, "rolled_back", why))
        log.error("drafter %s taken out of service: %s", bad.label, why)

    # ---- canary feed (the engine thread's step hook) ------------------------------------------------------
    def on_step(self, stats: StepStats, outs: list[StepOutput], streams: dict, t0: float) -> None:  # type: ignore[type-arg]
        if stats.drafter_fault is not None:
            self.on_drafter_fault(stats.drafter_fault)
        gen = self.engine.drafter_generation
        if gen != self._gen_seen:  # this step applied a swap: its extra time is the swap's stall (catch-up)
            self._gen_seen = gen
            typical = statistics.median(self._step_times) if self._step_times else 0.0
            stall = max(0.0, stats.seconds - typical)
            self.metrics.swap_stall.labels(self.metrics.model_name).observe(stall)
            if self._pending_stall is not None:
                self._pending_stall.stall_s = round(stall, 4)
                self._pending_stall = None
        elif stats.batch_size:
            self._step_times.append(stats.seconds)
        if stats.spec.num_drafts:
            self._observe(stats.spec.num_drafts, stats.spec.num_accepted_tokens, stats.spec.num_draft_tokens)


def build_controller(s: ServerSettings) -> OperatorOverride:
    """The configured controller, under the operator's override (`POST /admin/controller`)."""
    inner: SpeculationController
    if s.controller == "fixed" or s.num_speculative_tokens == 0:
        inner = FixedController(s.num_speculative_tokens)
    else:
        arms = tuple(sorted({a for a in s.controller_arms if a <= s.num_speculative_tokens} | {0}))
        inner = AdaptiveController(BanditConfig(arms=arms), max_k=s.num_speculative_tokens)
    return OperatorOverride(inner, max_k=s.num_speculative_tokens)


def load_policy(path: Path, base: LoadedModel, what: str) -> LoadedModel:
    """Load a policy folder as the base model is loaded, and check it is of the base model's family."""
    lm = load_model(str(path), dtype=str(base.model.dtype).removeprefix("torch."), device=str(base.model.device),
                    quantize=base.quantize)
    if lm.fingerprint != base.fingerprint:
        raise SwapError(f"{what} ({path}) loads as family {lm.fingerprint}, not the served model's "
                        f"{base.fingerprint}: its manifest is wrong; do not serve it")
    return lm


def build_state(s: ServerSettings, preloaded: LoadedModel | None = None) -> ServerState:
    dtype = resolve_dtype(s.dtype, s.device)
    base = preloaded or load_model(s.model, dtype=dtype, device=s.device, quantize=s.quantize)
    registry = open_registry(s)
    follow = s.follow_alias if not s.drafter else None
    first = choose_initial_drafter(s.drafter, base.fingerprint, registry, follow, s.allow_drafter_drift)
    target = load_policy(first.policy_path, base, f"policy version {first.policy}") \
        if first.policy_path is not None else base
    drafter = load_drafter(first.path, target.model, target.fingerprint) if first.path is not None else None
    label, version = first.label, first.version
    engine_dtype = str(target.model.dtype).removeprefix("torch.")
    # a background drafter job (--ensure-drafter) may train on the other core: decode steps and prefills keep to one
    # thread until it ends (create_app gives the engine every core then, or at once if no job starts)
    threads = s.threads or (1 if s.may_train_drafter else len(os.sched_getaffinity(0)))
    prefill_threads = s.prefill_threads if s.prefill_threads is not None else (1 if s.may_train_drafter else None)
    engine = Engine(target.model, EngineConfig(max_batch_size=s.max_batch_size, max_model_len=s.max_model_len,
                                               num_speculative_tokens=s.num_speculative_tokens, device=s.device,
                                               fallback_proposer=s.fallback_proposer,
                                               dtype=engine_dtype, num_threads=threads,
                                               prefill_threads=prefill_threads),
                    target.eos_token_ids, drafter=drafter, controller=build_controller(s))
    name = s.served_model_name or (s.model if "/" not in s.model else Path(s.model).name)
    metrics = ServerMetrics(name)
    scheduler = AsyncEngine(engine, max_queue=s.max_queue)
    engine.policy_labels[0] = policy_label(first.policy)
    hotswap = HotSwapManager(engine, base, metrics, registry, wake=scheduler._wake.set,
                             follow=follow if registry is not None else None, watch_interval_s=s.watch_interval_s,
                             canary_window=s.canary_window, canary_margin=s.canary_margin,
                             allow_drift=s.allow_drafter_drift)
    hotswap.set_initial(label, version, drafter, policy=first.policy, target=target)
    if s.drafter and version is not None:
        hotswap.pinned = version
    scheduler.step_hooks += [metrics.on_step, hotswap.on_step]
    structured = StructuredOutputs(target.tokenizer, target.config.vocab_size, target.eos_token_ids)
    return ServerState(settings=s, target=target, engine=engine, scheduler=scheduler, metrics=metrics,
                       hotswap=hotswap, served_model_name=name, structured=structured)


