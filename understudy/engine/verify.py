"""Score every row's [last committed token, d_1..d_k] with the target in one forward pass.

Row b feeds k+1 tokens at positions n_b-1 .. n_b-1+k (its own positions: rows are ragged in length). Their
keys/values are written into slot b at those positions; entries past what gets accepted are stale and are
overwritten by the next step, and the attention mask only ever looks at positions <= the query's, so a
rejection needs no cache rollback, only a shorter committed length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from understudy.engine.model import KVCache, Transformer
from understudy.engine.proposer import BatchState, DraftProposal


@dataclass
class VerifyOutput:
    hidden: torch.Tensor  # [B, k+1, H] target features at the verified positions
    logits: torch.Tensor  # [B, k+1, V] float32


def verify(model: Transformer, cache: KVCache, batch: BatchState, proposal: DraftProposal) -> VerifyOutput:
    B, k = batch.size, proposal.k
    device = model.device
    last = torch.tensor([toks[-1] for toks in batch.token_ids], dtype=torch.long, device=device)
    tokens = torch.cat([last.unsqueeze(1), proposal.token_ids.to(device)], dim=1)  # [B, k+1]
    start = torch.tensor(batch.num_tokens, dtype=torch.long, device=device) - 1
    positions = start.unsqueeze(1) + torch.arange(k + 1, device=device).unsqueeze(0)  # [B, k+1]
    hidden = model(tokens, positions, cache, kv_len=max(batch.num_tokens) + k)
    logits = model.logits(hidden)
    assert logits.shape == (B, k + 1, model.config.vocab_size)
    return VerifyOutput(hidden=hidden, logits=logits)
