"""TLT's spot drafter trainer: trains the drafter on idle rollout capacity, with the EAGLE loss of
`understudy drafter train` (drafter/train.py), on features from the update's own log-prob forward pass.

Data: a bounded buffer of the most recent rollouts (tokens + the policy's final hidden states, captured in the
update phase). A slice of the newest step is held out for the acceptance estimate that goes into the registry.
`train_while_idle(phase_done)` trains step after step until the rollout phase ends; only one worker trains at a
time (there is one drafter being trained), the others simply wait.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from understudy.drafter.model import Drafter
from understudy.drafter.train import DrafterTrainConfig, DrafterTrainer, Sample, evaluate
from understudy.engine.model import Transformer

REST_POLL_S = 0.01  # how often a resting spot trainer checks whether the phase ended


class SpotDrafterTrainer:
    def __init__(self, drafter: Drafter, target: Transformer, cfg: DrafterTrainConfig, buffer_tokens: int,
                 heldout_fraction: float = 0.125, duty: float = 1.0) -> None:
        self.drafter = drafter  # the copy being trained (rollout engines hold their own copies)
        self.target = target
        self.trainer = DrafterTrainer(drafter, cfg)
        self.buffer: collections.deque[Sample] = collections.deque()
        self.heldout: list[Sample] = []
        self.buffer_tokens = buffer_tokens
        self.heldout_fraction = heldout_fraction
        self._lock = threading.Lock()
        self.duty = duty  # share of an idle window spent computing (TrainConfig.spot_duty)
        self.total_train_s = 0.0
        self.total_rest_s = 0.0  # duty-cycle rests inside idle windows
        self.last_step_s = 0.0  # duration of the latest training step (paces the next one)
        self.last_metrics: dict[str, float] = {}

    # ---- data ------------------------------------------------------------------------------------------------
    def add(self, samples: list[Sample]) -> None:
        """New rollouts with features; the newest step's first sequences become the held-out set."""
        n_held = max(1, int(len(samples) * self.heldout_fraction)) if len(samples) > 1 else 0
        self.heldout = samples[:n_held]
        self.buffer.extend(samples[n_held:])
        total = sum(len(s) for s in self.buffer)
        while self.buffer and total > self.buffer_tokens:
            total -= len(self.buffer.popleft())

    @property
    def has_data(self) -> bool:
        return bool(self.buffer)

    # ---- training --------------------------------------------------------------------------------------------
    def train_while_idle(self, phase_done: threading.Event) -> tuple[int, float]:
        """Train until `phase_done` is set (the last rollout worker finished). Returns (steps, seconds computing)
        taken here: 0 for a worker that finds another one already training, or nothing to train on."""
        if not self.has_data or not self._lock.acquire(blocking=False):
            phase_done.wait()  # nothing to do, or another idle worker is already training
            return 0, 0.0
        try:
            before = self.total_train_s
            steps = self.train_until(phase_done.is_set)
            return steps, self.total_train_s - before
        finally:
            self._lock.release()

    def train_until(self, should_stop: Callable[[], bool]) -> int:
        """Train step after step until should_stop() (checked between steps). Returns steps taken.

        With duty < 1 each step is preceded by a rest of (1/duty - 1) x the previous step's duration (it ends early,
        with no step, if should_stop()), so the trainer computes about `duty` of any idle window, its first step
        included. It is meant for nodes where the spot trainer shares memory bandwidth with a worker still decoding
        (CPU nodes): that worker's slowdown should scale with it, which the 2-vCPU VM's measurement noise did not
        let us confirm (docs/ray.md, "Spot duty cycle"; docs/results.md)."""
        t0 = time.perf_counter()
        rested = 0.0
        step_start = t0

        def paced_stop() -> bool:  # called before every step
            nonlocal rested, step_start
            if self.duty < 1.0 and self.last_step_s > 0 and not should_stop():
                now = time.perf_counter()
                until = now + self.last_step_s * (1.0 / self.duty - 1.0)
                while not should_stop() and time.perf_counter() < until:
                    time.sleep(min(REST_POLL_S, max(0.0, until - time.perf_counter())))
                rested += time.perf_counter() - now
            step_start = time.perf_counter()
            return should_stop()

        def on_step(m: dict[str, float]) -> None:
            self.last_metrics.update(m)
            self.last_step_s = time.perf_counter() - step_start

        steps = self.trainer.train(list(self.buffer), should_stop=paced_stop, on_step=on_step)
        self.total_train_s += time.perf_counter() - t0 - rested
        self.total_rest_s += rested
        return steps

    def train_for(self, seconds: float) -> int:
        """Train on the buffer for `seconds` (the drafter warm-up before step 1). Returns steps taken."""
        return self.trainer.train(list(self.buffer), seconds=seconds, on_step=lambda m: self.last_metrics.update(m))

    def evaluate(self, k: int) -> dict[str, Any] | None:
        if not self.heldout:
            return None
        return evaluate(self.drafter, self.target, self.heldout, k=k)

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors, dicts, numbers): the drafter, its optimizer, and the buffer it trains on."""
        return {"drafter": self.drafter.own_state_dict(), "trainer": self.trainer.state_dict(),
                "total_train_s": self.total_train_s, "buffer": pack_samples(list(self.buffer)),
                "heldout": pack_samples(self.heldout), "last_metrics": dict(self.last_metrics)}

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """The drafter drafts from these tokens from now on (the warm-up chooses them from its rollouts)."""
        with torch.no_grad():
            self.drafter.set_draft_vocab(token_ids)
        self.drafter.bind(self.target)  # the head's rows follow the vocabulary

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        with torch.no_grad():
            self.drafter.load_state_dict(sd["drafter"], strict=False)
        self.drafter.bind(self.target)  # the draft vocabulary may have changed with the state
        self.trainer.load_state_dict(sd["trainer"])
        self.total_train_s = float(sd.get("total_train_s", 0.0))
        self.buffer = collections.deque(unpack_samples(sd["buffer"]) if "buffer" in sd else [])
        self.heldout = unpack_samples(sd["heldout"]) if "heldout" in sd else []
        self.last_metrics = {k: float(v) for k, v in sd.get("last_metrics", {}).items()}


def pack_samples(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Samples as four tensors (a checkpoint stores a few tensors, not thousands of objects): the tokens and
    the features concatenated, each sample's length and prompt length."""
    if not samples:
        empty = torch.zeros(0, dtype=torch.long)
        return {"tokens": empty, "features": torch.zeros(0, 0), "lengths": empty, "prompt_lens": empty}
    return {"tokens": torch.cat([s.tokens for s in samples]), "features": torch.cat([s.features for s in samples]),
            "lengths": torch.tensor([len(s) for s in samples]),
            "prompt_lens": torch.tensor([s.prompt_len for s in samples])}


def unpack_samples(packed: dict[str, torch.Tensor]) -> list[Sample]:
    sizes = packed["lengths"].tolist()
    if not sizes:
        return []
    tokens, features = packed["tokens"].split(sizes), packed["features"].split(sizes)
    return [Sample(tokens=t.clone(), features=f.clone(), prompt_len=int(p))
            for t, f, p in zip(tokens, features, packed["prompt_lens"].tolist(), strict=True)]
