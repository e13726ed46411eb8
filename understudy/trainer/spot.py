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
from typing import Any

import torch

from understudy.drafter.model import Drafter
from understudy.drafter.train import DrafterTrainConfig, DrafterTrainer, Sample, evaluate
from understudy.engine.model import Transformer


class SpotDrafterTrainer:
    def __init__(self, drafter: Drafter, target: Transformer, cfg: DrafterTrainConfig, buffer_tokens: int,
                 heldout_fraction: float = 0.125) -> None:
        self.drafter = drafter  # the copy being trained (rollout engines hold their own copies)
        self.target = target
        self.trainer = DrafterTrainer(drafter, cfg)
        self.buffer: collections.deque[Sample] = collections.deque()
        self.heldout: list[Sample] = []
        self.buffer_tokens = buffer_tokens
        self.heldout_fraction = heldout_fraction
        self._lock = threading.Lock()
        self.total_train_s = 0.0
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
    def train_while_idle(self, phase_done: threading.Event) -> int:
        """Train until `phase_done` is set (the last rollout worker finished). Returns steps taken here."""
        if not self.has_data or not self._lock.acquire(blocking=False):
            phase_done.wait()  # nothing to do, or another idle worker is already training
            return 0
        try:
            t0 = time.perf_counter()
            steps = self.trainer.train(list(self.buffer), should_stop=phase_done.is_set,
                                       on_step=lambda m: self.last_metrics.update(m))
            self.total_train_s += time.perf_counter() - t0
            return steps
        finally:
            self._lock.release()

    def evaluate(self, k: int) -> dict[str, Any] | None:
        if not self.heldout:
            return None
        return evaluate(self.drafter, self.target, self.heldout, k=k)

    def state_dict(self) -> dict[str, Any]:
        return {"drafter": self.drafter.own_state_dict(),
                "trainer": self.trainer.state_dict(), "total_train_s": self.total_train_s}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        with torch.no_grad():
            self.drafter.load_state_dict(sd["drafter"], strict=False)
        self.trainer.load_state_dict(sd["trainer"])
        self.total_train_s = float(sd.get("total_train_s", 0.0))
