"""Named, timed phases (verl's marked_timer): `with times.timed("rollout"): ...`; seconds accumulate per name."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class PhaseTimes:
    """Seconds spent per named phase: `with times.timed("step"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
