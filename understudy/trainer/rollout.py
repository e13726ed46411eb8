"""Speculative rollouts across workers, with the long tail's idle capacity handed to the spot drafter trainer.

Each worker owns an `Engine` (its own KV caches and drafter copy) over the *shared* policy module: the learner
updates the parameters in place and the engines see the new weights at the next step, with no file round-trip.
The rollout requests are split evenly across workers; each worker decodes its share with continuous batching.
A worker that finishes while others are still in the long tail trains the drafter (TLT's spot trainer) until
the last worker finishes; the phase then ends and the spot trainer stops at its next step boundary.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from understudy.drafter.model import Drafter
from understudy.engine.bandit import AdaptiveController, BanditConfig
from understudy.engine.config import EngineConfig
from understudy.engine.controller import FixedController, SpeculationController
from understudy.engine.engine import Engine
from understudy.engine.model import Transformer
from understudy.engine.quant import load_float_weights, quantized_copy
from understudy.engine.sampling import SamplingParams
from understudy.engine.spec_metrics import SpecDecodeStats


@dataclass
class RolloutRequest:
    prompt_ids: list[int]
    sampling: SamplingParams


@dataclass
class WorkerReport:
    worker: int
    num_requests: int
    busy_s: float  # from phase start until its last request finished
    idle_s: float = 0.0  # phase length - busy_s: the long tail's idle capacity on this worker
    spot_train_s: float = 0.0  # of the idle time, spent training the drafter
    spot_steps: int = 0
    tokens: int = 0


@dataclass
class RolloutResult:
    responses: list[list[int]]  # generated token ids per request, in request order
    seconds: float  # phase wall time (the slowest worker)
    workers: list[WorkerReport]
    spec: SpecDecodeStats = field(default_factory=SpecDecodeStats)
    ks: dict[int, int] = field(default_factory=dict)  # K chosen -> steps that used it
    rerun_requests: int = 0  # requests decoded again because their worker died (Ray executor)
    spot_overrun_s: float = 0.0  # spot training after the phase ended: the step it was in when stopped (Ray)

    @property
    def idle_fraction(self) -> float:
        total = self.seconds * len(self.workers)
        return sum(w.idle_s for w in self.workers) / total if total else 0.0


def rollout_controller(bandit: BanditConfig, max_k: int, fixed_k: int | None) -> AdaptiveController | FixedController:
    """A rollout worker's speculation controller: the adaptive bandit over `bandit.arms`, or with `fixed_k`
    (TrainConfig.rollout_k) the same K at every step."""
    return FixedController(fixed_k) if fixed_k is not None else AdaptiveController(bandit, max_k=max_k)


def rollout_engine(policy: Transformer, eos_token_ids: tuple[int, ...], max_batch: int, max_model_len: int,
                   num_draft_tokens: int, controller: SpeculationController | None, drafter: Drafter | None,
                   threads: int) -> Engine:
    """A rollout worker's engine over `policy` (the same recipe in a thread here and in a Ray actor)."""
    dtype = str(policy.dtype).removeprefix("torch.")
    cfg = EngineConfig(max_batch_size=max_batch, max_model_len=max_model_len,
                       num_speculative_tokens=num_draft_tokens if drafter is not None else 0,
                       proposer="drafter" if drafter is not None else "none", dtype=dtype,
                       device=str(policy.device), num_threads=threads, prefill_threads=0)
    return Engine(policy, cfg, eos_token_ids, drafter=drafter, controller=controller)


def decode_share(eng: Engine, share: list[int], requests: list[RolloutRequest], tag: str,
                 on_step: Callable[[int], None] | None = None) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Decode requests[i] for i in `share` on `eng` with continuous batching: ({i: response ids}, {K: steps}).
    on_step(n) is called after each engine step with the number of steps taken so far (crash points)."""
    responses: dict[int, list[int]] = {i: [] for i in share}
    ks: dict[int, int] = {}
    for i in share:
        eng.add_request(f"{tag}-{i}", requests[i].prompt_ids, requests[i].sampling)
    n = 0
    while eng.has_unfinished():
        for o in eng.step():
            responses[int(o.request_id.rsplit("-", 1)[1])].extend(o.new_token_ids)
        if eng.last_step.batch_size:
            ks[eng.last_step.k] = ks.get(eng.last_step.k, 0) + 1
        n += 1
        if on_step is not None:
            on_step(n)
    return responses, ks


class RolloutWorkers:
    """The local executor: one engine per worker, each decoding in a thread of this process over the *shared* policy
    (the learner's in-place updates are seen at the next step). `ray_exec.RayRolloutWorkers` is the same interface
    with each worker in its own process."""

    def __init__(self, policy: Transformer, eos_token_ids: tuple[int, ...], num_workers: int, max_batch: int,
                 max_model_len: int, num_draft_tokens: int, controller: SpeculationController | None,
                 drafter_factory: Any = None, threads: int = 1, quantize: str = "none") -> None:
        """drafter_factory: () -> Drafter, one copy per worker (None = no speculation). quantize: the workers decode
        a quantised copy of `policy` (shared by them), re-quantised by refresh_weights."""
        self.source = policy  # the learner's float policy
        self.policy = policy if quantize == "none" else quantized_copy(policy, quantize)
        self.controller = controller
        self.engines = [rollout_engine(self.policy, eos_token_ids, max_batch, max_model_len, num_draft_tokens, controller,
                                       drafter_factory() if drafter_factory is not None else None, threads)
                        for _ in range(num_workers)]

    def load_drafter_weights(self, source: Drafter) -> None:
        """Copy the spot-trained drafter into every worker's drafter (between steps, never mid-rollout)."""
        sd = source.own_state_dict()
        for eng in self.engines:
            reload_drafter(eng, sd)

    def refresh_weights(self) -> None:
        if self.policy is not self.source:  # quantised rollouts: re-quantise the learner's new weights in place
            load_float_weights(self.policy, self.source.state_dict())
        for eng in self.engines:
            eng.refresh_weights()

    def sync(self, spot: Any) -> None:
        """Between steps: the spot-trained drafter into every worker; the learner's new weights (shared here)."""
        if spot is not None:
            # the learner's update changed the policy in place: a reduced draft vocabulary's head rows are a copy
            # of its LM head (a full one is a view), so they are taken again
            spot.drafter.bind(spot.target)
            self.load_drafter_weights(spot.drafter)
        self.refresh_weights()

    def close(self) -> None:
        """Nothing to release: the engines go with this object."""

    def run(self, requests: list[RolloutRequest], spot: Any = None, tag: str = "r", step: int = 0) -> RolloutResult:
        """Decode every request; `spot` (SpotDrafterTrainer or None) uses workers that finish early."""
        shares = [list(range(w, len(requests), len(self.engines))) for w in range(len(self.engines))]
        responses: list[list[int]] = [[] for _ in requests]
        reports = [WorkerReport(worker=w, num_requests=len(s), busy_s=0.0) for w, s in enumerate(shares)]
        phase_done = threading.Event()
        remaining = [len(self.engines)]
        lock = threading.Lock()
        errors: list[BaseException] = []
        before = [spec_snapshot(e) for e in self.engines]
        ks: dict[int, int] = {}
        t0 = time.perf_counter()

        def work(w: int) -> None:
            try:
                self._decode_share(w, shares[w], requests, responses, reports[w], ks, lock, tag)
                reports[w].busy_s = time.perf_counter() - t0
                with lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    phase_done.set()
                elif spot is not None:
                    reports[w].spot_steps, reports[w].spot_train_s = spot.train_while_idle(phase_done)
            except BaseException as e:  # surfaced in the caller's thread
                errors.append(e)
                phase_done.set()

        threads = [threading.Thread(target=work, args=(w,), name=f"rollout-{w}") for w in range(len(self.engines))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        seconds = max(r.busy_s for r in reports)
        for r in reports:
            r.idle_s = seconds - r.busy_s
        spec = SpecDecodeStats()
        for e, b in zip(self.engines, before, strict=True):
            spec.merge(spec_diff(e.stats, b))
        return RolloutResult(responses=responses, seconds=seconds, workers=reports, spec=spec, ks=ks)

    def _decode_share(self, w: int, share: list[int], requests: list[RolloutRequest], responses: list[list[int]],
                      report: WorkerReport, ks: dict[int, int], lock: threading.Lock, tag: str) -> None:
        got, steps = decode_share(self.engines[w], share, requests, tag)
        for i, r in got.items():
            responses[i] = r
            report.tokens += len(r)
        with lock:
            for k, v in steps.items():
                ks[k] = ks.get(k, 0) + v


def reload_drafter(eng: Engine, state: dict[str, torch.Tensor]) -> None:
    """New weights into the engine's own drafter copy, re-bound at its next step (no-op without a drafter)."""
    if eng.drafter is not None:
        with torch.no_grad():
            eng.drafter.load_state_dict(state, strict=False)
        eng.set_drafter(eng.drafter)  # re-bind + full catch-up; applied at the next step


def spec_snapshot(e: Engine) -> SpecDecodeStats:
    """A copy of the engine's cumulative speculation counters (subtract with spec_diff)."""
    s = SpecDecodeStats()
    s.merge(e.stats)
    return s


def spec_diff(now: SpecDecodeStats, before: SpecDecodeStats) -> SpecDecodeStats:
    d = SpecDecodeStats(num_drafts=now.num_drafts - before.num_drafts,
                        num_draft_tokens=now.num_draft_tokens - before.num_draft_tokens,
                        num_accepted_tokens=now.num_accepted_tokens - before.num_accepted_tokens)
    d.accepted_per_pos = [a - (before.accepted_per_pos[i] if i < len(before.accepted_per_pos) else 0)
                          for i, a in enumerate(now.accepted_per_pos)]
    return d
