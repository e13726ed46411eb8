"""The proposer protocol: something that guesses the next K tokens of every running sequence.

A step is schedule -> propose -> verify -> accept -> emit. Proposers see the running batch (row b = KV slot b)
and return a ragged proposal: row b offers `num_drafts[b] <= k` tokens. Two implementations: the EAGLE-style
drafter (`drafter_proposer.py`) and n-gram prompt lookup (`ngram.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class BatchState:
    """The running batch at the start of a step. Row b lives in KV slot b."""

    token_ids: list[list[int]]  # per row: every committed token (prompt + output); the last is not yet in the KV cache
    num_tokens: list[int]  # per row: len(token_ids[b]) = n_b; the target cache holds positions 0..n_b-2
    temperature: torch.Tensor  # [B] float32; 0 = greedy
    top_k: torch.Tensor  # [B] int64; 0 = off
    top_p: torch.Tensor  # [B] float32
    generators: list[torch.Generator]  # per row: the request's own RNG

    @property
    def size(self) -> int:
        return len(self.token_ids)

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperature == 0).all())


@dataclass
class DraftProposal:
    """Draft tokens for one step, padded to k columns."""

    token_ids: torch.Tensor  # [B, k] int64; entries at and after num_drafts[b] are padding (0)
    num_drafts: torch.Tensor  # [B] int64, 0 <= num_drafts[b] <= k
    probs: torch.Tensor | None = None  # [B, k, Vd] draft distribution q the tokens were sampled from;
    #                                    None = a deterministic proposer (q is one-hot on token_ids)
    vocab: torch.Tensor | None = None  # [Vd] int64 target-vocabulary id of each column of probs; None = full vocab
    catch_up_s: float = 0.0  # seconds spent catching up rows far behind (after K=0 stretches, swaps, admissions)

    def __post_init__(self) -> None:
        B, k = self.token_ids.shape
        assert self.num_drafts.shape == (B,)
        if self.probs is not None:
            assert self.probs.shape[:2] == (B, k), (self.probs.shape, (B, k))

    @property
    def k(self) -> int:
        return self.token_ids.shape[1]

    @classmethod
    def empty(cls, batch_size: int, device: torch.device | str = "cpu") -> DraftProposal:
        return cls(token_ids=torch.zeros(batch_size, 0, dtype=torch.long, device=device),
                   num_drafts=torch.zeros(batch_size, dtype=torch.long, device=device))


class Proposer(Protocol):
    """Guesses up to k tokens per row. Must be cheap relative to one target step."""

    name: str

    def propose(self, batch: BatchState, k: int) -> DraftProposal: ...

    def on_verified(self, batch: BatchState, accepted: list[int]) -> None:
        """Called after verification with the number of drafts each row accepted (for stateful proposers)."""
        ...
