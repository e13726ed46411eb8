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
        return {"kind": "fixed", "k": self.k}
