"""Accept or reject draft tokens so the output is exactly what the target alone would produce.

Greedy rows (temperature 0): accept draft i while it equals the target's argmax at i; then emit the target's
argmax at the first mismatch (or the bonus token after the last draft). Token-exact with plain decoding.

Sampled rows (Leviathan et al. 2023, Chen et al. 2023, arXiv 2211.17192), p = target, q = draft distribution:
    q(d) <= p(d): always accept
    q(d) >  p(d): accept with probability p(d) / q(d)
    on the first rejection at i, sample from norm(max(p_i - q_i, 0)); if all drafts pass, sample p_{n+1}.
Every emitted token is then distributed exactly as p. A deterministic proposer (n-gram) is the case q = one-hot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from understudy.engine.proposer import BatchState, DraftProposal
from understudy.engine.sampling import probs_from_logits, sample_row


@dataclass
class SampleResult:
    tokens: list[list[int]]  # per row: accepted drafts followed by one target-sampled token (1..k+1 tokens)
    num_accepted: list[int]  # per row: how many drafts were accepted (0..num_drafts[b])
    failed: dict[int, str]  # row -> why its target distribution could not be sampled (that request fails alone)
    draft_fault: str | None = None  # the proposer sent a non-finite q: its drafts were rejected (q treated as 0)


def _draft_probs_of(proposal: DraftProposal, rows: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """q(d_i) for the given rows: [s, k]. One-hot proposers have q(d) = 1."""
    if proposal.probs is None:
        return torch.ones(drafts.shape, dtype=torch.float32, device=drafts.device)
    cols = drafts if proposal.vocab is None else _vocab_columns(proposal, drafts)
    q = proposal.probs[rows].gather(2, cols.clamp_min(0).unsqueeze(2)).squeeze(2).float()
    return torch.where(cols >= 0, q, torch.zeros_like(q))


def _vocab_columns(proposal: DraftProposal, tokens: torch.Tensor) -> torch.Tensor:
    """Column of each target-vocabulary token in the reduced draft vocabulary (-1 if absent)."""
    assert proposal.vocab is not None
    match = tokens.unsqueeze(-1) == proposal.vocab  # [..., Vd]
    return torch.where(match.any(-1), match.int().argmax(-1), torch.full_like(tokens, -1))


def _full_q(proposal: DraftProposal, row: int, pos: int, vocab_size: int) -> torch.Tensor:
    """The draft distribution of one row at one position over the full target vocabulary: [V]."""
    if proposal.probs is None:
        q = torch.zeros(vocab_size, device=proposal.token_ids.device)
        q[proposal.token_ids[row, pos]] = 1.0
        return q
    if proposal.vocab is None:
        return proposal.probs[row, pos].float()
    q = torch.zeros(vocab_size, device=proposal.probs.device)
    return q.index_copy_(0, proposal.vocab, proposal.probs[row, pos].float())


def rejection_sample(target_logits: torch.Tensor, proposal: DraftProposal, batch: BatchState) -> SampleResult:
    """target_logits: [B, k+1, V] float32, the target's logits at [last token, d_1..d_k]."""
    B, K1, V = target_logits.shape
    k = K1 - 1
    assert proposal.k == k, (proposal.k, k)
    drafts = proposal.token_ids  # [B, k]
    valid = torch.arange(k, device=drafts.device).unsqueeze(0) < proposal.num_drafts.unsqueeze(1)  # [B, k]
    n_drafts = proposal.num_drafts.tolist()
    tokens: list[list[int]] = [[] for _ in range(B)]
    num_acc = [0] * B
    failed: dict[int, str] = {}
    draft_fault = None
    greedy = batch.temperature == 0

    if bool(greedy.any()):
        rows = greedy.nonzero().squeeze(1)
        best = target_logits[rows].argmax(dim=-1)  # [g, k+1]
        match = (drafts[rows] == best[:, :k]) & valid[rows]
        acc = match.int().cumprod(dim=1).sum(dim=1)  # [g]: length of the matching prefix
        bonus = best.gather(1, acc.unsqueeze(1)).squeeze(1)
        for r, a, t in zip(rows.tolist(), acc.tolist(), bonus.tolist(), strict=True):
            tokens[r] = [*drafts[r, :a].tolist(), t]
            num_acc[r] = a

    if not bool(greedy.all()):
        rows = (~greedy).nonzero().squeeze(1)
        s = rows.numel()
        p = probs_from_logits(target_logits[rows].reshape(s * K1, V),
                              batch.temperature[rows].repeat_interleave(K1),
                              batch.top_k[rows].repeat_interleave(K1),
                              batch.top_p[rows].repeat_interleave(K1)).view(s, K1, V)
        bad_p = ~torch.isfinite(p).all(dim=2).all(dim=1)  # [s]: a row whose own distribution is broken
        d = drafts[rows]
        p_d = p[:, :k].gather(2, d.unsqueeze(2)).squeeze(2)  # [s, k]
        q_d = _draft_probs_of(proposal, rows, d)  # [s, k]
        bad_q = ~torch.isfinite(q_d).all(dim=1) | (q_d < 0).any(dim=1)
        if proposal.probs is not None:
            bad_q |= ~torch.isfinite(proposal.probs[rows].float()).flatten(1).all(dim=1)
        if bool(bad_q.any()):
            # Lossless with q = 0: nothing is accepted and the residual max(p - 0, 0) is p itself.
            draft_fault = f"the proposer sent a non-finite or negative draft distribution for {int(bad_q.sum())} row(s)"
            q_d = torch.where(bad_q.unsqueeze(1), torch.zeros_like(q_d), q_d)
        u = torch.stack([torch.rand(k, generator=batch.generators[r], device=p.device) for r in rows.tolist()])
        # accept iff u < p/q, written without a division; q_d = 0 (not draftable) never accepts
        accept = (u * q_d < p_d) & (q_d > 0) & valid[rows]
        acc = accept.int().cumprod(dim=1).sum(dim=1)
        for j, (r, a) in enumerate(zip(rows.tolist(), acc.tolist(), strict=True)):
            if bool(bad_p[j]):
                failed[r] = "the target distribution of this request is not finite (NaN/inf logits)"
                continue
            if a < n_drafts[r] and not bool(bad_q[j]):  # rejected at a: sample the residual max(p - q, 0)
                dist = (p[j, a] - _full_q(proposal, r, a, V)).clamp_min(0.0)
                if float(dist.sum()) <= 0.0:  # p == q there, so rejection had probability 0; fall back to p
                    dist = p[j, a]
            else:  # every draft accepted (or q was unusable): a token from p at the next position
                dist = p[j, a]
            try:
                tokens[r] = [*drafts[r, :a].tolist(), sample_row(dist, batch.generators[r])]
            except RuntimeError as e:  # one row's distribution; its batch-mates are unaffected
                failed[r] = f"sampling failed for this request ({e})"
                continue
            num_acc[r] = a
    return SampleResult(tokens=tokens, num_accepted=num_acc, failed=failed, draft_fault=draft_fault)
