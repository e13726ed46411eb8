"""Speculative-decoding counters with vLLM's definitions.

  acceptance rate        = accepted draft tokens / draft tokens
  mean acceptance length = 1 + accepted draft tokens / drafts   (a "draft" = one row proposing >= 1 token in a step;
                           the 1 is the token the target always contributes)
  per-position acceptance[i] = drafts whose token at position i was accepted / drafts
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [position] accepted counts

    def record(self, num_drafts_per_row: list[int], accepted_per_row: list[int]) -> None:
        for n, a in zip(num_drafts_per_row, accepted_per_row, strict=True):
            if n <= 0:
                continue
            self.num_drafts += 1
            self.num_draft_tokens += n
            self.num_accepted_tokens += a
            if len(self.accepted_per_pos) < n:
                self.accepted_per_pos.extend([0] * (n - len(self.accepted_per_pos)))
            for i in range(a):
                self.accepted_per_pos[i] += 1

    def merge(self, other: SpecDecodeStats) -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        if len(self.accepted_per_pos) < len(other.accepted_per_pos):
            self.accepted_per_pos.extend([0] * (len(other.accepted_per_pos) - len(self.accepted_per_pos)))
        for i, c in enumerate(other.accepted_per_pos):
            self.accepted_per_pos[i] += c

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [c / self.num_drafts for c in self.accepted_per_pos] if self.num_drafts else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "per_position_acceptance": [round(x, 4) for x in self.per_position_acceptance],
        }
