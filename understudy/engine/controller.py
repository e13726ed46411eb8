"""Speculation controllers: choose K (draft tokens per step, 0 = off) for the live batch size.

The engine asks `choose(batch_size)` before a step and reports `observe(...)` after it. `FixedController`
always answers the same K; the adaptive bandit (`AdaptiveController`) lives in `bandit.py`.
"""

from __future__ import annotations

from typing import Any, Protocol


class SpeculationController(Protocol):
    def choose(self, batch_size: int) -> int:
        """Number of draft tokens for the next step at this live batch size (0 = no speculation)."""
        ...

    def observe(self, batch_size: int, k: int, num_tokens: int, seconds: float) -> None:
        """The step that used k committed num_tokens tokens in `seconds`."""
        ...

    def state(self) -> dict[str, Any]:
        """JSON-able state for logs, metrics and the admin API."""
        ...


class FixedController:
    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k

    def choose(self, batch_size: int) -> int:
        return self.k

    def observe(self, batch_size: int, k: int, num_tokens: int, seconds: float) -> None:
        return None

    def state(self) -> dict[str, Any]:
        return {"kind": "fixed", "k": self.k, "buckets": {}}

    def state_dict(self) -> dict[str, Any]:  # a trainer checkpoint's controller state
        return {"kind": "fixed", "k": self.k}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("kind") != "fixed" or int(sd["k"]) != self.k:
            saved = f"fixed K={sd.get('k')}" if sd.get("kind") == "fixed" else "the adaptive controller's"
            raise ValueError(f"the controller state is {saved}, this run has a fixed K={self.k}: resume with the "
                             "rollout_k (and controller_arms) the state was saved with")


class OperatorOverride:
    """A controller with an operator's hand on it: `pin(k)` makes every step use K = k (0 = speculation off)
    until `pin(None)` hands the choice back. While pinned, the wrapped controller neither chooses nor observes,
    so what it learnt stays as it was (a pinned K need not be one of its arms). Thread-safe: the admin API pins
    from the event loop while the engine thread chooses."""

    def __init__(self, inner: SpeculationController, max_k: int) -> None:
        self.inner, self.max_k = inner, max_k
        self.pinned: int | None = None

    def pin(self, k: int | None) -> None:
        if k is not None and not 0 <= k <= self.max_k:
            raise ValueError(f"k must be between 0 and {self.max_k} (the server's num_speculative_tokens), got {k}")
        self.pinned = k  # one attribute store: atomic for the engine thread's next choose()

    def choose(self, batch_size: int) -> int:
        k = self.pinned
        return k if k is not None else self.inner.choose(batch_size)

    def observe(self, batch_size: int, k: int, num_tokens: int, seconds: float) -> None:
        if self.pinned is None:
            self.inner.observe(batch_size, k, num_tokens, seconds)

    def reset(self) -> None:
        reset = getattr(self.inner, "reset", None)
        if callable(reset):
            reset()

    def state(self) -> dict[str, Any]:
        return {**self.inner.state(), "pinned_k": self.pinned}
