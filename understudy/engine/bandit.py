"""The adaptive speculation controller: an epsilon-greedy bandit per live-batch-size bucket (TLT's adaptive engine).

Arms are speculation strategies: K draft tokens per step, K = 0 meaning "off". A step reports the tokens it
committed and the seconds it took. Per (bucket, arm) the controller keeps a window of recent steps and scores the
arm by its throughput over the window: tokens / seconds summed (steps slower than STALL_FACTOR x the window's
median step are left out: a stall of the shared machine, not the arm's speed). It exploits the best score,
explores a random other arm with probability epsilon, tries every arm `min_samples` times first, and only
switches away from the current arm when the challenger beats it by `switch_margin` (hysteresis: no
flip-flopping between near-equal arms).

Why a ratio of sums and not the median of per-step rates (the first version): a K=4 step commits 1 to 5 tokens,
so its rate is bimodal, and when more than half the steps accept nothing the median is the 1-token rate however
often the other steps take 5: it scored K=4 below "off" on prompts where K=4 was faster.

Exploration decays per bucket, epsilon_t = max(epsilon_min, epsilon * sqrt(n0 / (n0 + t))) with t the bucket's
pulls since the last reset: a losing arm costs a lot per pull (a K=4 verify where off is best), and measured
runs spent ~10 % of their steps on such pulls at a fixed epsilon of 0.1. The floor keeps the bandit watching
for a change (a better drafter, another prompt mix); a drafter swap resets the counts and so the exploration.

Rewards expire after `max_age` pulls of their bucket (a sliding-window bandit: the best arm moves with the prompt
mix, since acceptance does). An arm left with fewer than `min_samples` fresh rewards is tried again as at the
start. Without expiry, an arm that lost on a few hard prompts kept those rewards in its window and, pulled only
by exploration (one pull in ~30), needed hundreds of steps to win back: measured in the server at batch 1 on
random grid-risk prompts, the controller sat on "off" for 7 requests in a row (TPOT 44 ms) where K=4 ran at ~20.
"""

from __future__ import annotations

import bisect
import collections
import math
import random
import statistics
import threading
from dataclasses import dataclass, field
from typing import Any

STALL_FACTOR = 5.0  # a step this many times slower than the window's median step is not scored


@dataclass(frozen=True)
class BanditConfig:
    arms: tuple[int, ...] = (0, 2, 4)  # K values to choose from; must include at least two
    bucket_edges: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # bucket i holds batch sizes [edge_i, edge_{i+1})
    epsilon: float = 0.1  # exploration probability once every arm has min_samples (start of the decay)
    epsilon_min: float = 0.02  # floor of the decayed exploration probability
    epsilon_decay_pulls: int = 200  # n0 of the decay (epsilon halves after 3 * n0 pulls); 0 = no decay
    window: int = 32  # rewards kept per (bucket, arm)
    min_samples: int = 3  # tries per arm before exploiting
    switch_margin: float = 0.05  # challenger must beat the current arm's throughput by this fraction
    max_age: int = 128  # a reward expires after this many pulls of its bucket; 0 = never
    seed: int = 0

    def __post_init__(self) -> None:
        if len(set(self.arms)) < 2 or min(self.arms) < 0:
            raise ValueError(f"arms need at least two distinct K >= 0, got {self.arms}")
        if list(self.bucket_edges) != sorted(set(self.bucket_edges)) or self.bucket_edges[0] != 1:
            raise ValueError(f"bucket_edges must be increasing and start at 1, got {self.bucket_edges}")
        if not 0.0 <= self.epsilon <= 1.0 or self.window < 1 or self.min_samples < 1 or self.switch_margin < 0:
            raise ValueError("need 0 <= epsilon <= 1, window >= 1, min_samples >= 1, switch_margin >= 0")
        if not 0.0 <= self.epsilon_min <= self.epsilon or self.epsilon_decay_pulls < 0:
            raise ValueError("need 0 <= epsilon_min <= epsilon and epsilon_decay_pulls >= 0")
        if self.max_age < 0 or (self.max_age and self.max_age < self.min_samples * len(self.arms)):
            raise ValueError(f"max_age must be 0 (rewards never expire) or >= min_samples x arms "
                             f"({self.min_samples * len(self.arms)}), got {self.max_age}")

    def epsilon_at(self, pulls: int) -> float:
        """Exploration probability after `pulls` pulls of a bucket (since its last reset)."""
        if not self.epsilon_decay_pulls:
            return self.epsilon
        n0 = self.epsilon_decay_pulls
        return max(self.epsilon_min, self.epsilon * math.sqrt(n0 / (n0 + pulls)))


@dataclass
class _Bucket:
    rewards: dict[int, collections.deque[float]]  # tokens per second of each step
    current: int
    stamps: dict[int, collections.deque[int]] = field(default_factory=dict)  # the bucket's pull count per reward
    seconds: dict[int, collections.deque[float]] = field(default_factory=dict)  # each step's duration
    pulls: collections.Counter[int] = field(default_factory=collections.Counter)
    switches: int = 0
    since_reset: int = 0  # pulls since the last reset: drives the exploration decay


class AdaptiveController:
    """Implements engine.controller.SpeculationController. Thread-safe (the server reads state() concurrently)."""

    def __init__(self, cfg: BanditConfig | None = None, max_k: int | None = None) -> None:
        cfg = cfg or BanditConfig()
        arms = tuple(sorted(a for a in cfg.arms if max_k is None or a <= max_k))
        if len(arms) < 2:
            raise ValueError(f"fewer than two arms left after capping at max_k={max_k}: {arms}")
        self.cfg, self.arms = cfg, arms
        self._rng = random.Random(cfg.seed)
        self._buckets: dict[int, _Bucket] = {}
        self._lock = threading.Lock()

    def bucket_of(self, batch_size: int) -> int:
        """Index of the bucket holding this batch size."""
        return max(0, bisect.bisect_right(self.cfg.bucket_edges, max(1, batch_size)) - 1)

    def bucket_label(self, index: int) -> str:
        edges = self.cfg.bucket_edges
        lo = edges[index]
        hi = edges[index + 1] - 1 if index + 1 < len(edges) else None
        return f"{lo}" if hi == lo else (f"{lo}-{hi}" if hi else f"{lo}+")

    def _bucket(self, index: int) -> _Bucket:
        if index not in self._buckets:
            self._buckets[index] = _Bucket(
                rewards={a: collections.deque(maxlen=self.cfg.window) for a in self.arms}, current=max(self.arms),
                stamps={a: collections.deque(maxlen=self.cfg.window) for a in self.arms},
                seconds={a: collections.deque(maxlen=self.cfg.window) for a in self.arms})
        return self._buckets[index]

    def _fresh(self, b: _Bucket, arm: int) -> list[tuple[float, float]]:
        """The arm's (tokens per second, seconds) steps that have not expired (all of them with max_age 0)."""
        oldest = b.since_reset - self.cfg.max_age if self.cfg.max_age else -1
        return [(r, sec) for r, t, sec in zip(b.rewards[arm], b.stamps[arm], b.seconds[arm], strict=True)
                if t > oldest]

    @staticmethod
    def _score(steps: list[tuple[float, float]]) -> float:
        """Throughput over the steps: tokens / seconds summed, stalls (> STALL_FACTOR x the median step) left out."""
        limit = STALL_FACTOR * statistics.median(sec for _, sec in steps)
        kept = [(r, sec) for r, sec in steps if sec <= limit]
        return sum(r * sec for r, sec in kept) / sum(sec for _, sec in kept)

    def choose(self, batch_size: int) -> int:
        with self._lock:
            b = self._bucket(self.bucket_of(batch_size))
            untried = [a for a in self.arms if len(self._fresh(b, a)) < self.cfg.min_samples]
            if untried:  # initial exploration, and again for an arm whose rewards expired: min_samples tries
                return untried[0]
            if self._rng.random() < self.cfg.epsilon_at(b.since_reset):
                return self._rng.choice([a for a in self.arms if a != b.current])
            return b.current

    def observe(self, batch_size: int, k: int, num_tokens: int, seconds: float) -> None:
        if seconds <= 0 or k not in self.arms:
            return
        with self._lock:
            b = self._bucket(self.bucket_of(batch_size))
            b.rewards[k].append(num_tokens / seconds)
            b.pulls[k] += 1
            b.since_reset += 1
            b.stamps[k].append(b.since_reset)
            b.seconds[k].append(seconds)
            self._maybe_switch(b)

    def _maybe_switch(self, b: _Bucket) -> None:
        fresh = {a: self._fresh(b, a) for a in self.arms}
        scored = {a: self._score(r) for a, r in fresh.items() if len(r) >= self.cfg.min_samples}
        if b.current not in scored or len(scored) < 2:
            if scored and b.current not in scored:
                b.current = max(scored, key=scored.__getitem__)
            return
        best = max(scored, key=scored.__getitem__)
        if best != b.current and scored[best] > scored[b.current] * (1.0 + self.cfg.switch_margin):
            b.current = best
            b.switches += 1

    def reset(self) -> None:
        """Forget every reward (e.g. after a drafter swap: the K > 0 arms' speeds belong to the old drafter)."""
        with self._lock:
            for b in self._buckets.values():
                b.since_reset = 0
                for r in (*b.rewards.values(), *b.stamps.values(), *b.seconds.values()):
                    r.clear()

    def state_dict(self) -> dict[str, Any]:
        """Everything the controller has learned, as plain lists/dicts/numbers (a checkpoint can hold it)."""
        with self._lock:
            version, internal, gauss = self._rng.getstate()
            return {
                "arms": list(self.arms), "rng": [version, list(internal), gauss],
                "buckets": {str(i): {"rewards": {str(a): list(r) for a, r in b.rewards.items()},
                                     "stamps": {str(a): list(t) for a, t in b.stamps.items()},
                                     "seconds": {str(a): list(t) for a, t in b.seconds.items()}, "current": b.current,
                                     "pulls": {str(a): n for a, n in b.pulls.items()}, "switches": b.switches,
                                     "since_reset": b.since_reset} for i, b in sorted(self._buckets.items())},
            }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore state_dict(); the arms must be this controller's (ValueError otherwise)."""
        if "arms" not in sd:
            raise ValueError(f"controller state {sd} is not an adaptive controller's (a fixed K's?): resume with the "
                             "rollout_k the state was saved with")
        if [int(a) for a in sd["arms"]] != list(self.arms):
            raise ValueError(f"controller state is for arms {list(sd['arms'])}, this controller has {list(self.arms)}: "
                             "resume with the controller_arms and num_draft_tokens the state was saved with")
        version, internal, gauss = sd["rng"]
        buckets = {}
        for i, b in sd["buckets"].items():
            rewards = {a: collections.deque(b["rewards"].get(str(a), []), maxlen=self.cfg.window) for a in self.arms}
            # a state saved before rewards expired has no stamps: its rewards count as fresh at the saved pull count
            stamps = {a: collections.deque(b.get("stamps", {}).get(str(a), [int(b["since_reset"])] * len(rewards[a])),
                                           maxlen=self.cfg.window) for a in self.arms}
            # ... and no durations: equal ones, which score the arm by the mean of its rates
            seconds = {a: collections.deque(b.get("seconds", {}).get(str(a), [1.0] * len(rewards[a])),
                                            maxlen=self.cfg.window) for a in self.arms}
            if any(not len(stamps[a]) == len(seconds[a]) == len(rewards[a]) for a in self.arms):
                raise ValueError(f"controller state bucket {i}: rewards, stamps and seconds differ in length")
            buckets[int(i)] = _Bucket(rewards=rewards, stamps=stamps, seconds=seconds, current=int(b["current"]),
                                      pulls=collections.Counter({int(a): int(n) for a, n in b["pulls"].items()}),
                                      switches=int(b["switches"]), since_reset=int(b["since_reset"]))
        with self._lock:
            self._rng.setstate((version, tuple(internal), gauss))
            self._buckets = buckets

    def current_arm(self, batch_size: int) -> int:
        with self._lock:
            return self._bucket(self.bucket_of(batch_size)).current

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "kind": "adaptive", "arms": list(self.arms), "epsilon": self.cfg.epsilon,
                "buckets": {
                    self.bucket_label(i): {
                        "current_k": b.current, "switches": b.switches,
                        "epsilon_now": round(self.cfg.epsilon_at(b.since_reset), 4),
                        "tokens_per_s": {str(a): round(self._score(r), 2) for a in self.arms if (r := self._fresh(b, a))},
                        "pulls": {str(a): b.pulls[a] for a in self.arms},
                    } for i, b in sorted(self._buckets.items())
                },
            }
