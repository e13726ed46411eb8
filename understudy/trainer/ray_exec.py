"""Ray as the trainer's executor (`executor = "ray"`): rollout workers, the spot drafter trainer and the learner,
each in its own process.

Why processes: with the local executor the rollout workers are threads of the learner's process, and the drafter
that an idle worker spot-trains shares the interpreter with the worker still decoding the long tail (measured in
docs/results.md: about +18% rollout time). Here each rollout worker is an actor with its own engine, drafter copy,
controller and CPU (or GPU) allocation; the spot trainer is an actor that holds the drafter being trained, its
optimizer and its data buffer, and trains only while at least one rollout worker is idle, on the capacity that
worker left. The learner (`GRPOTrainer`) is an actor too when `understudy train` runs with Ray: the driver restarts
it from its last checkpoint if its process dies (`ray_learner_restarts`).

The phases of one step, as the learner drives them:

    rollout:  every worker decodes its share (round-robin, as the local executor); when the first finishes while
              others still decode, the spot trainer starts; when the last finishes it is told to stop (it stops at
              its next training-step boundary, while the learner computes rewards and the update)
    update:   the learner's (rollout workers idle)
    sync:     the spot trainer's drafter -> every worker; the learner's new weights -> workers and spot trainer,
              through the object store (one `ray.put`, every actor reads the same object)

Faults. A rollout actor that dies mid-step loses its partial responses; its whole share is decoded again on a
live worker (so every GRPO group comes back whole) and a fresh actor with the current weights replaces it for the
next step. A learner that dies is restarted by the driver, which resumes from the last checkpoint; the registry's
lineage notes keep a published version from being published twice (lineage.py).

Placement and resources: each rollout actor reserves `ray_worker_cpus` CPUs (and `ray_worker_gpus` GPUs). The spot
trainer and the learner reserve none: they compute in the phases where rollout workers do not (the spot trainer on
an idle worker's share, the learner between rollouts). On one node that is the whole story; on a cluster the
rollout actors spread over the nodes by their reservations, and `out_dir` and `registry` must be on storage every
node sees (docs/ray.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from understudy.drafter.model import Drafter
from understudy.drafter.train import DrafterTrainConfig
from understudy.engine.bandit import BanditConfig
from understudy.engine.model import Transformer
from understudy.engine.quant import load_float_weights, quantize_model
from understudy.errors import UnderstudyError
from understudy.trainer import crashpoints
from understudy.trainer.config import TrainConfig
from understudy.trainer.rollout import (
    RolloutRequest,
    RolloutResult,
    WorkerReport,
    decode_share,
    reload_drafter,
    rollout_controller,
    rollout_engine,
    spec_diff,
    spec_snapshot,
)
from understudy.trainer.spot import SpotDrafterTrainer, pack_samples, unpack_samples

log = logging.getLogger(__name__)


class RayExecutorError(UnderstudyError, RuntimeError):
    """Ray is missing, cannot start, or a worker could not be replaced (the message says what to do)."""


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise RayExecutorError("executor = \"ray\" needs the ray package: pip install 'understudy[ray]' (or "
                               "pip install ray), or set executor = \"local\"") from e
    return ray


def ensure_ray(address: str | None, num_cpus: int | None = None) -> Any:
    """Connect to the cluster at `address` ("auto" = the one `ray start` runs on this node), or start an embedded
    local one (the default). Idempotent: inside an actor, or when already connected, returns ray as it is."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
    except Exception as e:  # ray raises several types here (ConnectionError, RuntimeError, ValueError)
        where = f"the Ray cluster at {address!r}" if address else "an embedded local Ray cluster"
        raise RayExecutorError(f"could not start or join {where}: {e}. For a cluster, run `ray start --head` "
                               "there and pass --ray-address HOST:6379 (docs/ray.md)") from e
    return ray


def actor_died() -> tuple[type[BaseException], ...]:
    """What ray.get raises when an actor's process is gone: killed, crashed, or stopped by Ray's memory monitor
    (which raises OutOfMemoryError, not RayActorError)."""
    ex = _ray().exceptions
    return (ex.RayActorError, ex.OutOfMemoryError)


def crash_env(fresh: bool) -> dict[str, Any]:
    """Actor options for crash points (crashpoints.py): an actor is armed as the process creating it is (actors
    start from the raylet's environment, not their creator's), and a replacement (`fresh`) is never re-armed by the
    point that killed its predecessor."""
    armed = os.environ.get(crashpoints.ENV, "")
    if fresh:
        return {"runtime_env": {"env_vars": {crashpoints.ENV: ""}}}
    return {"runtime_env": {"env_vars": {crashpoints.ENV: armed}}} if armed else {}


def to_wire(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, Any]]:
    """A state dict as numpy arrays, which Ray reads zero-copy from the object store (a torch tensor would be
    unpickled into a private copy in every actor: 540 MB per actor per step for SmolLM2). bfloat16, which numpy
    lacks, travels as its int16 bits."""
    out: dict[str, tuple[str, Any]] = {}
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        out[k] = ("bfloat16", t.view(torch.int16).numpy()) if t.dtype == torch.bfloat16 else ("", t.numpy())
    return out


def from_wire(wire: dict[str, tuple[str, Any]]) -> dict[str, torch.Tensor]:
    """Tensors over the (read-only, shared) arrays of `to_wire`: only ever copied from, by load_state_dict."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(a).view(torch.bfloat16) if tag == "bfloat16" else torch.from_numpy(a)
                for k, (tag, a) in wire.items()}


def _build_policy(model_config: Any, wire: dict[str, tuple[str, Any]], dtype: torch.dtype) -> Transformer:
    model = Transformer(model_config).to(dtype)
    model.load_state_dict(from_wire(wire))
    model.requires_grad_(False)
    return model


def _drafter_wire(d: Drafter) -> dict[str, tuple[str, Any]]:
    return to_wire({k: v.clone() for k, v in d.own_state_dict().items()})


# ---- actors (plain classes; ray.remote wraps them in _actor_classes) ---------------------------------------------
class RolloutActor:
    """One rollout worker: its own copy of the policy, its own engine, drafter and controller."""

    def __init__(self, worker: int, model_config: Any, policy_state: dict[str, torch.Tensor], dtype: torch.dtype,
                 eos_token_ids: tuple[int, ...], max_batch: int, max_model_len: int, num_draft_tokens: int,
                 drafter_config: Any, drafter_state: dict[str, torch.Tensor] | None, bandit: BanditConfig | None,
                 threads: int, quantize: str = "none", fixed_k: int | None = None) -> None:
        torch.set_num_threads(threads)
        self.worker = worker
        self.model = _build_policy(model_config, policy_state, dtype)
        if quantize != "none":  # decode a quantised policy: the float copy is not kept (weights arrive as floats)
            quantize_model(self.model, quantize)
        drafter = None
        if drafter_config is not None:
            drafter = Drafter(drafter_config)
            drafter.load_state_dict(from_wire(drafter_state), strict=False)
            drafter = drafter.to(dtype=dtype).bind(self.model)
        self.controller = rollout_controller(bandit, num_draft_tokens, fixed_k) if bandit is not None else None
        self.engine = rollout_engine(self.model, eos_token_ids, max_batch, max_model_len, num_draft_tokens,
                                     self.controller, drafter, threads)

    def pid(self) -> int:
        return os.getpid()

    def decode(self, step: int, tag: str, share: list[int], requests: list[RolloutRequest]) -> dict[str, Any]:
        before = spec_snapshot(self.engine)

        def crash_point(n: int) -> None:  # the first worker dies after its first decode step (fault tests)
            if n == 1 and self.worker == 0 and crashpoints.armed("rollout_worker", step):
                crashpoints.kill()

        t0 = time.perf_counter()
        responses, ks = decode_share(self.engine, share, requests, tag, on_step=crash_point)
        return {"responses": responses, "ks": ks, "seconds": time.perf_counter() - t0,
                "spec": spec_diff(self.engine.stats, before)}

    def load_policy(self, wire: dict[str, tuple[str, Any]]) -> None:
        load_float_weights(self.model, from_wire(wire))  # re-quantised where this actor decodes a quantised copy
        self.engine.refresh_weights()

    def load_drafter(self, wire: dict[str, tuple[str, Any]]) -> None:
        reload_drafter(self.engine, from_wire(wire))

    def controller_state(self) -> dict[str, Any] | None:
        return self.controller.state() if self.controller is not None else None

    def controller_state_dict(self) -> dict[str, Any] | None:
        return self.controller.state_dict() if self.controller is not None else None

    def load_controller_state_dict(self, sd: dict[str, Any]) -> None:
        if self.controller is not None:
            self.controller.load_state_dict(sd)


class SpotActor:
    """TLT's spot trainer in its own process: the drafter being trained, its optimizer and its buffer. Trains only
    between `train(run)` and `stop(run)` (a threaded actor: `stop` arrives while `train` runs)."""

    def __init__(self, model_config: Any, policy_state: dict[str, torch.Tensor], dtype: torch.dtype,
                 drafter_config: Any, drafter_state: dict[str, torch.Tensor], train_cfg: DrafterTrainConfig,
                 buffer_tokens: int, threads: int, duty: float = 1.0) -> None:
        torch.set_num_threads(threads)
        # Below the rollout workers' priority: on a node where it borrows an idle worker's core, the node's other
        # work (Ray's daemons, the learner waking up) preempts the spot trainer, not the worker still decoding.
        os.nice(SPOT_NICE)
        self.target = _build_policy(model_config, policy_state, dtype)
        d = Drafter(drafter_config)
        d.load_state_dict(from_wire(drafter_state), strict=False)
        self.spot = SpotDrafterTrainer(d.float().bind(self.target), self.target, train_cfg, buffer_tokens, duty=duty)
        self._stopped: dict[int, float] = {}  # run -> when stop(run) arrived
        self._lock = threading.Lock()  # one of train / add / load at a time (stop and pid never wait)

    def pid(self) -> int:
        return os.getpid()

    def train(self, run: int) -> dict[str, float]:
        """Train until stop(run). Returns steps, seconds trained while the phase lasted (until stop arrived; less the
        duty cycle's rests), the rests, and the overrun after it (the step in progress when stop arrived: the
        pre-emption latency), on this actor's clock."""
        with self._lock:
            t0, rest0 = time.perf_counter(), self.spot.total_rest_s
            steps = self.spot.train_until(lambda: run in self._stopped) if self.spot.has_data else 0
            t1, rest = time.perf_counter(), self.spot.total_rest_s - rest0
            stop_at = min(self._stopped.get(run, t1), t1)
            return {"steps": steps, "seconds": max(0.0, stop_at - t0 - rest), "rest_s": rest,
                    "overrun_s": t1 - max(stop_at, t0)}

    def stop(self, run: int) -> None:
        self._stopped.setdefault(run, time.perf_counter())

    def train_for(self, seconds: float) -> int:
        with self._lock:
            return self.spot.train_for(seconds)

    def add(self, packed: dict[str, torch.Tensor]) -> None:
        with self._lock:
            self.spot.add(unpack_samples(packed))

    def load_policy(self, wire: dict[str, tuple[str, Any]]) -> None:
        with self._lock, torch.no_grad():
            self.target.load_state_dict(from_wire(wire))
            self.spot.drafter.bind(self.target)

    def drafter_state(self) -> dict[str, tuple[str, Any]]:
        with self._lock:
            return _drafter_wire(self.spot.drafter)

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        with self._lock:
            self.spot.set_draft_vocab(token_ids)

    def evaluate(self, k: int) -> dict[str, Any] | None:
        with self._lock:
            return self.spot.evaluate(k)

    def last_metrics(self) -> dict[str, float]:
        return dict(self.spot.last_metrics)

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return self.spot.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        with self._lock:
            self.spot.load_state_dict(sd)


SPOT_NICE = 10
_CLASSES: dict[str, Any] = {}


def _actor_classes() -> tuple[Any, Any]:
    ray = _ray()
    if not _CLASSES:
        _CLASSES["rollout"] = ray.remote(RolloutActor)
        _CLASSES["spot"] = ray.remote(SpotActor)
    return _CLASSES["rollout"], _CLASSES["spot"]


# ---- the learner's handles ---------------------------------------------------------------------------------------
class RemoteSpot:
    """The learner's view of the spot actor, with SpotDrafterTrainer's interface (`drafter` is a local mirror,
    refreshed on read). If the actor dies, `respawn(mirror)` starts another from the last synced drafter."""

    def __init__(self, actor: Any, mirror: Drafter, respawn: Callable[[Drafter], Any], target: Transformer) -> None:
        self.actor = actor
        self._mirror = mirror
        self._target = target  # what the mirror is bound to (its head rows follow the draft vocabulary)
        self._respawn = respawn
        self._pending: list[Any] = []  # adds not yet known to have landed
        self._has_data = False
        self._last: dict[str, torch.Tensor] | None = None  # the newest add, sent again to a replacement

    def call(self, method: str, *args: Any) -> Any:
        """actor.method(*args), waited for; a dead actor is replaced once and the call made on the new one."""
        ray = _ray()
        try:
            return ray.get(getattr(self.actor, method).remote(*args))
        except actor_died():
            self.replace()
            return ray.get(getattr(self.actor, method).remote(*args))

    def replace(self) -> None:
        """A new actor from the last synced drafter. The dead one's buffer is lost except the newest step's samples
        (kept here and sent again); later updates refill it."""
        self.actor = self._respawn(self._mirror)
        self._pending = [self.actor.add.remote(self._last)] if self._last is not None else []
        self._has_data = self._last is not None

    def add(self, samples: list[Any]) -> None:
        self._last = pack_samples(samples) if samples else None
        if self._last is not None:
            self._pending.append(self.actor.add.remote(self._last))
            self._has_data = True

    def join(self) -> None:
        """Wait for every add sent so far (a threaded actor does not keep submission order)."""
        ray = _ray()
        if self._pending:
            try:
                ray.get(self._pending)
                self._pending.clear()
            except actor_died():
                self.replace()
                ray.get(self._pending)
                self._pending.clear()

    @property
    def has_data(self) -> bool:
        return self._has_data

    @property
    def drafter(self) -> Drafter:
        self.join()
        wire = self.call("drafter_state")
        vocab = self._mirror.draft_vocab.clone()
        with torch.no_grad():
            self._mirror.load_state_dict(from_wire(wire), strict=False)
        if not torch.equal(vocab, self._mirror.draft_vocab):
            self._mirror.bind(self._target)
        return self._mirror

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        self.join()
        self.call("set_draft_vocab", token_ids)
        with torch.no_grad():
            self._mirror.set_draft_vocab(token_ids)  # a replacement actor starts from the mirror: it keeps them
        self._mirror.bind(self._target)

    @property
    def last_metrics(self) -> dict[str, float]:
        return self.call("last_metrics")

    def train_for(self, seconds: float) -> int:
        self.join()
        return int(self.call("train_for", seconds))

    def evaluate(self, k: int) -> dict[str, Any] | None:
        self.join()
        return self.call("evaluate", k)

    def state_dict(self) -> dict[str, Any]:
        self.join()
        return self.call("state_dict")

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.join()
        self.call("load_state_dict", sd)
        self._has_data = len(sd.get("buffer", {}).get("lengths", [])) > 0


class RemoteController:
    """The adaptive controllers of the rollout actors, as the learner sees them: state is read from worker 0 (each
    worker learns its own; they see the same workload) and loaded into all."""

    def __init__(self, workers: RayRolloutWorkers) -> None:
        self.workers = workers

    def state(self) -> dict[str, Any]:
        return _ray().get(self.workers.actors[0].controller_state.remote()) or {"buckets": {}}

    def state_dict(self) -> dict[str, Any] | None:
        return _ray().get(self.workers.actors[0].controller_state_dict.remote())

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.workers.controller_sd = sd
        _ray().get([a.load_controller_state_dict.remote(sd) for a in self.workers.actors])


class RayRolloutWorkers:
    """The Ray executor, with RolloutWorkers' interface: `run`, `sync`, `load_drafter_weights`, `refresh_weights`,
    `controller`, `spot`."""

    def __init__(self, policy: Transformer, eos_token_ids: tuple[int, ...], cfg: TrainConfig, max_batch: int,
                 max_model_len: int, spot: SpotDrafterTrainer | None) -> None:
        self.ray = ensure_ray(cfg.ray_address)
        self.policy = policy
        self.cfg = cfg
        self.eos = tuple(eos_token_ids)
        self.max_batch, self.max_model_len = max_batch, max_model_len
        self.num_draft_tokens = cfg.num_draft_tokens if spot is not None else 0
        self.bandit = BanditConfig(arms=cfg.controller_arms, seed=cfg.seed) if spot is not None else None
        self.drafter_config = spot.drafter.config if spot is not None else None
        self.controller_sd: dict[str, Any] | None = None
        self._run_ids = 0
        self._open: tuple[RemoteSpot, tuple[int, Any], RolloutResult] | None = None  # a spot stint still stopping
        self._spot_worker = 0  # the idle worker whose capacity the spot trainer is using
        self.replaced = 0  # rollout actors replaced after dying (over the executor's life)
        self.replaced_spot = 0
        self.policy_ref = self.ray.put(to_wire(policy.state_dict()))
        self.drafter_ref = self.ray.put(_drafter_wire(spot.drafter)) if spot is not None else None
        Rollout, Spot = _actor_classes()
        self._Rollout = Rollout
        self.actors = [self._new_actor(w) for w in range(cfg.rollout_workers)]
        self._Spot = Spot
        self._spot_args: tuple[Any, ...] = ()
        self.spot: RemoteSpot | None = None
        if spot is not None and cfg.spot_training:  # without spot training the learner keeps its (idle) drafter
            self._spot_args = (policy.config, policy.dtype, spot.drafter.config, spot.trainer.cfg, spot.buffer_tokens,
                               cfg.threads, spot.duty)
            self.spot = RemoteSpot(self._new_spot(self.drafter_ref), spot.drafter, self._respawn_spot, policy)
        self.controller = RemoteController(self) if spot is not None else None
        self.ray.get([a.pid.remote() for a in self.actors])  # fail here, not mid-step, if an actor cannot start
        if self.spot is not None:
            self.ray.get(self.spot.actor.pid.remote())
        self.policy_ref = None  # loaded by every actor (see refresh_weights)

    def _new_spot(self, drafter_ref: Any) -> Any:
        config, dtype, drafter_config, train_cfg, buffer_tokens, threads, duty = self._spot_args
        return self._Spot.options(num_cpus=0, max_concurrency=2).remote(
            config, self._weights(fresh=False), dtype, drafter_config, drafter_ref, train_cfg, buffer_tokens, threads,
            duty)

    def _respawn_spot(self, mirror: Drafter) -> Any:
        """The spot actor died: a new one from the drafter the workers last received (its optimizer state and buffer
        are lost; the buffer refills from the next update, and the next checkpoint holds the new state)."""
        self.replaced_spot += 1
        if self.replaced_spot > 4:
            raise RayExecutorError("the spot trainer died 5 times; giving up (see the Ray logs under "
                                   "/tmp/ray/session_latest/logs)")
        log.warning("the spot drafter trainer died: starting a new one from the last synced drafter")
        return self._new_spot(self.ray.put(_drafter_wire(mirror)))

    def _new_actor(self, w: int, fresh_env: bool = False) -> Any:
        opts: dict[str, Any] = {"num_cpus": self.cfg.ray_worker_cpus, "num_gpus": self.cfg.ray_worker_gpus}
        opts.update(crash_env(fresh=fresh_env))
        return self._Rollout.options(**opts).remote(
            w, self.policy.config, self._weights(fresh=False), self.policy.dtype, self.eos, self.max_batch, self.max_model_len,
            self.num_draft_tokens, self.drafter_config, self.drafter_ref, self.bandit, self.cfg.threads,
            self.cfg.rollout_quantize, self.cfg.rollout_k)

    # ---- weights between steps -----------------------------------------------------------------------------------
    def refresh_weights(self) -> None:
        """The learner's weights changed: one object in the store, read by every worker and the spot trainer."""
        ref = self._weights()
        calls = [a.load_policy.remote(ref) for a in self.actors]
        if self.spot is not None:
            calls.append(self.spot.actor.load_policy.remote(ref))
        self.ray.get(calls)
        self.policy_ref = None  # every actor holds them now: the store's copy (a model's size) goes

    def _weights(self, fresh: bool = True) -> Any:
        """The learner's weights in the object store: put again after an update (or for an actor started between
        refreshes, when the last copy was already released)."""
        if fresh or self.policy_ref is None:
            self.policy_ref = self.ray.put(to_wire(self.policy.state_dict()))
        return self.policy_ref

    def load_drafter_weights(self, source: Drafter) -> None:
        self.drafter_ref = self.ray.put(_drafter_wire(source))
        self.ray.get([a.load_drafter.remote(self.drafter_ref) for a in self.actors])

    def close(self) -> None:
        for a in self.actors + ([self.spot.actor] if self.spot is not None else []):
            self.ray.kill(a)

    # ---- the rollout phase ---------------------------------------------------------------------------------------
    def run(self, requests: list[RolloutRequest], spot: Any = None, tag: str = "r", step: int = 0) -> RolloutResult:
        """Decode every request; `spot` (RemoteSpot or None) trains while at least one worker is idle."""
        ray = self.ray
        n = len(self.actors)
        shares = [list(range(w, len(requests), n)) for w in range(n)]
        reports = [WorkerReport(worker=w, num_requests=len(s), busy_s=0.0) for w, s in enumerate(shares)]
        result = RolloutResult(responses=[[] for _ in requests], seconds=0.0, workers=reports)
        if spot is not None:
            spot.join()
        t0 = time.perf_counter()
        pending = {self.actors[w].decode.remote(step, tag, s, requests): (w, s) for w, s in enumerate(shares)}
        idle: set[int] = set()  # live workers with nothing left to decode
        stint: tuple[int, Any] | None = None  # (run id, train() ref) while the spot trainer trains
        while pending:
            if spot is not None and stint is None and idle:
                self._run_ids += 1
                stint = (self._run_ids, spot.actor.train.remote(self._run_ids))
                self._spot_worker = min(idle)
            ready, _ = ray.wait(list(pending), num_returns=1)
            w, share = pending.pop(ready[0])
            try:
                out = ray.get(ready[0])
            except actor_died() as e:
                result.rerun_requests += len(share)
                target = self._replace(w, e, idle, pending)
                if target in idle:
                    idle.discard(target)
                    if stint is not None and not idle:  # rollouts need the capacity again: preempt the spot trainer
                        self._collect_stint(spot, stint, result)
                        stint = None
                pending[self.actors[target].decode.remote(step, tag, share, requests)] = (target, share)
                continue
            for i, r in out["responses"].items():
                result.responses[i] = r
                reports[w].tokens += len(r)
            for k, v in out["ks"].items():
                result.ks[k] = result.ks.get(k, 0) + v
            result.spec.merge(out["spec"])
            if not any(t == w for t, _ in pending.values()):
                idle.add(w)
                reports[w].busy_s = time.perf_counter() - t0
        result.seconds = time.perf_counter() - t0
        for r in reports:
            r.idle_s = result.seconds - r.busy_s
        # The phase is over: the spot trainer stops at its next training-step boundary, while the learner computes
        # rewards and the update; sync() collects it (the drafter it hands over is the one trained until then).
        self._open = (spot, stint, result) if stint is not None else None
        if stint is not None:
            spot.actor.stop.remote(stint[0])
        return result

    def _replace(self, dead: int, err: BaseException, idle: set[int], pending: dict[Any, tuple[int, list[int]]]) -> int:
        """A worker died mid-share: start a replacement actor (current weights) for the steps to come, and return
        the worker that decodes the lost share now: an idle live one, else the least loaded, else the replacement."""
        log.warning("rollout worker %d died (%s): its share is decoded again and a new actor replaces it", dead,
                    type(err).__name__)
        self.replaced += 1
        if self.replaced > 4 * len(self.actors):
            raise RayExecutorError(f"rollout workers died {self.replaced} times; giving up (see the Ray logs under "
                                   "/tmp/ray/session_latest/logs)") from err
        self.actors[dead] = self._new_actor(dead, fresh_env=True)
        if self.controller_sd is not None:
            self.actors[dead].load_controller_state_dict.remote(self.controller_sd)
        live = [w for w in range(len(self.actors)) if w != dead]
        if not live:
            return dead
        free = sorted(w for w in live if w in idle)
        if free:
            return free[0]
        load = {w: sum(len(s) for t, s in pending.values() if t == w) for w in live}
        return min(live, key=lambda w: (load[w], w))

    def _collect_stint(self, spot: RemoteSpot, stint: tuple[int, Any], result: RolloutResult) -> None:
        try:
            spot.actor.stop.remote(stint[0])
            out = self.ray.get(stint[1])
        except actor_died():  # it died while training: what it trained since the sync is lost
            spot.replace()
            return
        w = result.workers[self._spot_worker]
        w.spot_train_s += out["seconds"]
        w.spot_steps += int(out["steps"])
        result.spot_overrun_s += out["overrun_s"]

    def sync(self, spot: Any) -> None:
        """Between steps: finish the spot trainer's last stint (into its phase's report), its drafter to every
        worker, the learner's new weights to workers and spot trainer."""
        if self._open is not None:
            open_spot, stint, result = self._open
            self._open = None
            self._collect_stint(open_spot, stint, result)
        if spot is not None:
            self.load_drafter_weights(spot.drafter)
        self.refresh_weights()


