"""The proposer protocol: something that guesses the next K tokens of every running sequence.

A step is schedule -> propose -> verify -> accept -> emit. Proposers see the running batch (row b = KV slot b)
and return a ragged proposal: row b offers `num_drafts[b] <= k` tokens. Two implementations: the EAGLE-style
drafter (`drafter_proposer.py`) and n-gram prompt lookup (`ngram.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

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
    """Guesses up to k tokens per row. Must be cheap relative to one target step. The engine sees proposers only
    through this protocol: slot events keep per-slot state (a drafter's KV cache) in step with the target's."""

    name: str

    def propose(self, batch: BatchState, k: int) -> DraftProposal: ...

    def on_verified(self, batch: BatchState, accepted: list[int]) -> None:
        """Called after verification with the number of drafts each row accepted (for stateful proposers)."""
        ...

    def on_slot_reset(self, slot: int) -> None:
        """A new sequence took `slot`: forget what the proposer knew of the slot."""
        ...

    def on_slot_moved(self, src: int, dst: int, length: int) -> None:
        """The sequence in `src` moved to `dst` (its first `length` positions are valid)."""
        ...

    def swap_drafter(self, drafter: Any) -> bool:
        """Take a new draft model in place (True), or say this proposer has none (False: the engine rebuilds)."""
        ...


class DraftModel(Protocol):
    """What the engine needs of a draft model (the EAGLE-style one is understudy.drafter.model.Drafter)."""

    config: Any  # .draft_vocab_size: int, .target: ModelConfig
    draft_vocab: torch.Tensor  # [Vd] target-vocabulary ids of the draft vocabulary

    @property
    def full_vocab(self) -> bool: ...

    def __call__(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor | None = None,
                 cache: Any = None, kv_len: int | None = None, slot_start: int = 0) -> torch.Tensor: ...

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def allocate_cache(self, num_slots: int, capacity: int, dtype: torch.dtype, device: torch.device | str) -> Any: ...

    def attach(self, target: Any, capacity: int) -> DraftModel:
        """Bind to the target's embedding and LM head, sized for `capacity` positions (again after the target's
        weights change)."""
        ...


class StatelessProposer:
    """Slot events and drafter swaps are no-ops for proposers without per-slot state or a model (n-gram)."""

    def on_verified(self, batch: BatchState, accepted: list[int]) -> None:
        return None

    def on_slot_reset(self, slot: int) -> None:
        return None

    def on_slot_moved(self, src: int, dst: int, length: int) -> None:
        return None

    def swap_drafter(self, drafter: Any) -> bool:
        return False
