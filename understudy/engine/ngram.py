"""N-gram prompt lookup (Saxena 2023; vLLM's `ngram`): copy what followed the latest earlier occurrence of
the sequence's last n tokens. Free to run, no model, deterministic (q is one-hot on the proposal)."""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from understudy.engine.proposer import BatchState, DraftProposal, StatelessProposer


def lookup(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier match of the longest matching suffix (n_max..n_min)."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = tokens[L - n:]
        windows = sliding_window_view(tokens[:L - 1], n)  # windows[i] = tokens[i:i+n], all end before the suffix
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


class NgramProposer(StatelessProposer):
    name = "ngram"

    def __init__(self, n_min: int = 1, n_max: int = 4) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.n_min, self.n_max = n_min, n_max

    def propose(self, batch: BatchState, k: int) -> DraftProposal:
        B = batch.size
        out = torch.zeros(B, k, dtype=torch.long)
        num = torch.zeros(B, dtype=torch.long)
        for b, toks in enumerate(batch.token_ids):
            found = lookup(np.asarray(toks, dtype=np.int64), self.n_min, self.n_max, k)
            if found:
                out[b, :len(found)] = torch.tensor(found)
                num[b] = len(found)
        return DraftProposal(token_ids=out, num_drafts=num)
