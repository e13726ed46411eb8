"""Chain drafting with the EAGLE-style drafter.

Per sequence with n committed tokens x_0..x_{n-1} (x_{n-1} not yet in the target cache), drafter input at
position i is (x_{i+1}, h_i) and its output approximates h_{i+1}, whose logits predict x_{i+2}.

  1. catch up: feed the true target features h_i for every position the drafter has not yet seen with them,
     i = drafter_len .. n-2 (after a verify step that is the accepted drafts + 1; after admission, the prompt;
     after a drafter swap, the whole sequence). The last output predicts d_1.
  2. draft: k-1 more single-token steps at positions n-1, n, ..., each fed its own previous output feature.
Entries the drafter wrote speculatively (step 2) are simply overwritten by the next catch-up.
"""

from __future__ import annotations

import time

import torch

from understudy.engine.model import KVCache
from understudy.engine.proposer import BatchState, DraftModel, DraftProposal
from understudy.engine.sampling import probs_from_logits

LONG_CATCH_UP = 16  # rows with more positions to catch up than this run alone (no padding waste)


class DrafterProposer:
    name = "drafter"

    def __init__(self, drafter: DraftModel, hidden_buf: torch.Tensor, num_slots: int, capacity: int) -> None:
        self.drafter = drafter
        self.hidden_buf = hidden_buf  # [S, C, H] engine-owned: target features h_i per slot and position
        self.cache: KVCache = drafter.allocate_cache(num_slots, capacity, hidden_buf.dtype, hidden_buf.device)
        self.drafter_len = [0] * num_slots  # per slot: positions 0..len-1 hold true-feature drafter K/V

    # ---- slot bookkeeping (the engine keeps live slots contiguous) --------------------------------------
    def on_slot_reset(self, slot: int) -> None:
        self.drafter_len[slot] = 0

    def on_slot_moved(self, src: int, dst: int, length: int) -> None:
        self.cache.move_slot(src, dst, length)
        self.drafter_len[dst] = self.drafter_len[src]

    def reset_all(self) -> None:
        """Forget every slot's drafter state (after a drafter swap): the next step catches up from 0."""
        self.drafter_len = [0] * len(self.drafter_len)

    def swap_drafter(self, drafter: DraftModel) -> bool:
        """Same shapes (one family), so the draft KV cache is reused; the new drafter has seen none of the live
        sequences: full catch-up on the next step."""
        self.drafter = drafter
        self.reset_all()
        return True

    def on_verified(self, batch: BatchState, accepted: list[int]) -> None:
        return None

    # ---- proposing ----------------------------------------------------------------------------------------
    def propose(self, batch: BatchState, k: int) -> DraftProposal:
        assert k >= 1
        B = batch.size
        n = batch.num_tokens
        device = self.hidden_buf.device
        t0 = time.perf_counter()
        self._catch_up_long_rows(batch)
        catch_up_s = time.perf_counter() - t0
        # batched catch-up: every row has 1..LONG_CATCH_UP positions left (dl .. n-2)
        starts = [self.drafter_len[b] for b in range(B)]
        counts = [n[b] - 1 - starts[b] for b in range(B)]
        assert min(counts) >= 1, counts
        T = max(counts)
        tokens = torch.zeros(B, T, dtype=torch.long)
        for b in range(B):
            tokens[b, :counts[b]] = torch.tensor(batch.token_ids[b][starts[b] + 1:n[b]])
        start_t = torch.tensor(starts, dtype=torch.long)
        positions = start_t.unsqueeze(1) + torch.arange(T).unsqueeze(0)  # [B, T]; padding continues past n-2
        feats = self.hidden_buf[torch.arange(B).unsqueeze(1), positions.clamp(max=self.hidden_buf.shape[1] - 1)]
        out = self.drafter(tokens.to(device), feats, positions.to(device), self.cache,
                           kv_len=int(positions.max()) + 1)  # [B, T, H]
        last = torch.tensor(counts, device=device) - 1
        feat = out[torch.arange(B, device=device), last].unsqueeze(1)  # [B, 1, H]: h^_{n-1}
        for b in range(B):
            self.drafter_len[b] = n[b] - 1

        drafts = torch.zeros(B, k, dtype=torch.long, device=device)
        probs = None if batch.all_greedy else torch.zeros(B, k, self.drafter.config.draft_vocab_size, device=device)
        pos = torch.tensor(n, dtype=torch.long, device=device).unsqueeze(1) - 2  # [B, 1] position of the last input
        for j in range(k):
            if j > 0:
                pos = pos + 1
                feat = self.drafter(drafts[:, j - 1:j], feat, pos, self.cache, kv_len=int(pos.max()) + 1)
            drafts[:, j] = self._choose(self.drafter.draft_logits(feat[:, 0]), batch, probs, j)
        return DraftProposal(token_ids=drafts, num_drafts=torch.full((B,), k, dtype=torch.long, device=device),
                             probs=probs, vocab=None if self.drafter.full_vocab else self.drafter.draft_vocab,
                             catch_up_s=catch_up_s)

    def _choose(self, logits: torch.Tensor, batch: BatchState, probs: torch.Tensor | None, j: int) -> torch.Tensor:
        """Greedy rows take the argmax; sampled rows draw from q (kept for the rejection sampler). -> [B] target ids."""
        cols = logits.argmax(dim=-1)  # [B] column in the draft vocabulary
        if probs is not None:
            rows = (batch.temperature > 0).nonzero().squeeze(1)
            q = probs_from_logits(logits[rows], batch.temperature[rows], batch.top_k[rows], batch.top_p[rows])
            probs[rows, j] = q
            for i, r in enumerate(rows.tolist()):
                cols[r] = torch.multinomial(q[i], 1, generator=batch.generators[r])[0]
        return cols if self.drafter.full_vocab else self.drafter.draft_vocab[cols]

    def _catch_up_long_rows(self, batch: BatchState) -> None:
        """Rows far behind (new prompts, after a swap or a stretch of K=0) catch up alone, up to position n-3."""
        for b in range(batch.size):
            start, end = self.drafter_len[b], batch.num_tokens[b] - 2  # leave position n-2 for the batched pass
            if end - start <= LONG_CATCH_UP:
                continue
            toks = torch.tensor(batch.token_ids[b][start + 1:end + 1], device=self.hidden_buf.device).unsqueeze(0)
            positions = torch.arange(start, end, device=self.hidden_buf.device).unsqueeze(0)
            feats = self.hidden_buf[b, start:end].unsqueeze(0)
            self.drafter(toks, feats, positions, self.cache, kv_len=end, slot_start=b)
            self.drafter_len[b] = end
