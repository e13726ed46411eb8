"""The policy update of a GRPO step: `ppo_epochs` optimisation passes over the rollout batch, each split into
`ppo_mini_batches` optimizer steps, each accumulated over micro-batches under a token budget (PPO's K epochs of
mini-batch SGD; verl's `ppo_epochs` / `ppo_mini_batch_size`, TRL's `num_iterations`).

    old pass   only when epochs x mini-batches > 1: one no-grad forward of the rollout policy, before the first
               optimizer step, gives logp_old, the reference policy's log-probs and the drafter's features
    epoch e    for each mini-batch (reshuffled every epoch): forward with grad -> logp_new -> the registered
               policy loss against logp_old -> backward per micro-batch -> clip the grad norm -> optimizer step

With one epoch of one mini-batch there is no old pass: logp_old is the update's own forward, detached (the ratio
is 1 and nothing is clipped), the drafter's features come from that forward: the on-policy step. From the second
optimizer step on, the policy has moved, the ratio departs from 1 and clip_low / clip_high bound it. The result
holds the loss metrics (`clip_frac`, `ratio_mean/min/max`, `approx_kl`, ...) over every pass and, with several
epochs, per epoch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from understudy.drafter.train import Sample, length_buckets
from understudy.errors import UnderstudyError
from understudy.trainer.algos import PolicyLossFn, token_logprobs

Seq = tuple[list[int], int]  # (prompt + response token ids, prompt length)


class UpdateConfigError(UnderstudyError, ValueError):
    """An invalid policy-update setting (names the field and the valid range)."""


@dataclass(frozen=True)
class UpdateConfig:
    ppo_epochs: int = 1  # optimisation passes over each rollout batch (1 = on-policy: the ratio stays 1)
    ppo_mini_batches: int = 1  # optimizer steps per epoch; the sequences are split evenly, reshuffled per epoch
    micro_batch_tokens: int = 8192  # padded tokens per forward/backward chunk (gradient accumulation)
    clip_low: float = 0.2  # ratio clipped below 1 - clip_low
    clip_high: float = 0.28  # ratio clipped above 1 + clip_high
    kl_coef: float = 0.0  # k3 KL penalty to the reference policy (needs one)
    grad_clip: float = 1.0  # global gradient-norm clip of every optimizer step
    seed: int = 0  # with the step number, seeds the mini-batch shuffle (no other RNG is touched)

    def __post_init__(self) -> None:
        checks = [
            (self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {self.ppo_epochs}"),
            (self.ppo_mini_batches >= 1, f"ppo_mini_batches must be >= 1, got {self.ppo_mini_batches}"),
            (self.micro_batch_tokens >= 1, f"micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}"),
            (0 <= self.clip_low < 1 and self.clip_high >= 0, "need 0 <= clip_low < 1 and clip_high >= 0"),
            (self.kl_coef >= 0 and self.grad_clip > 0, "need kl_coef >= 0 and grad_clip > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UpdateConfigError(f"update config: {msg}")


# ---- pure helpers ------------------------------------------------------------------------------------------
def mini_batches(n: int, k: int, rng: random.Random | None = None) -> list[list[int]]:
    """Indices 0..n-1 in k parts whose sizes differ by at most one (the larger first), shuffled by rng first
    (None: in order)."""
    if not 1 <= k <= n:
        raise UpdateConfigError(f"cannot split {n} sequences into {k} mini-batches: ppo_mini_batches must be in "
                                f"[1, {n}] (prompts_per_step x group_size)")
    idx = list(range(n))
    if rng is not None:
        rng.shuffle(idx)
    size, extra = divmod(n, k)
    parts, start = [], 0
    for i in range(k):
        end = start + size + (i < extra)
        parts.append(idx[start:end])
        start = end
    return parts


def combine_metrics(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Combine per-chunk metrics: keys ending in `_min` / `_max` take the min / max, the others the mean weighted
    by each chunk's weight (its number of valid tokens). Chunks of weight 0 are left out."""
    out: dict[str, float] = {}
    total: dict[str, float] = {}
    for metrics, weight in parts:
        if weight <= 0:
            continue
        for key, v in metrics.items():
            if key.endswith("_min"):
                out[key] = min(out.get(key, v), v)
            elif key.endswith("_max"):
                out[key] = max(out.get(key, v), v)
            else:
                out[key] = out.get(key, 0.0) + v * weight
                total[key] = total.get(key, 0.0) + weight
    return {k: (v / total[k] if k in total else v) for k, v in out.items()}


def pad_batch(seqs: list[Seq]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [b, T] and the response mask [b, T-1] (logits at t predict token t+1)."""
    T = max(len(s) for s, _ in seqs)
    toks = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1, dtype=torch.bool)
    for b, (s, p) in enumerate(seqs):
        toks[b, :len(s)] = torch.tensor(s)
        mask[b, p - 1:len(s) - 1] = True
    return toks, mask


def _pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=rows[0].dtype)
    for b, r in enumerate(rows):
        out[b, :r.numel()] = r
    return out


@dataclass
class OldLogprobs:
    """The rollout policy's per-sequence log-probs ([len - 1] each), and the reference policy's when KL is on."""

    logp: list[torch.Tensor]
    ref: list[torch.Tensor] | None


# ---- the updater -------------------------------------------------------------------------------------------
class PolicyUpdater:
    """Runs the update of one batch. `policy(tokens) -> hidden`, `policy.logits(hidden) -> logits` (the engine's
    Transformer); `ref` is a frozen copy when `kl_coef > 0`."""

    def __init__(self, policy: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: PolicyLossFn,
                 cfg: UpdateConfig, ref: torch.nn.Module | None = None) -> None:
        if cfg.kl_coef > 0 and ref is None:
            raise UpdateConfigError("update config: kl_coef > 0 needs a reference policy")
        self.policy, self.opt, self.loss_fn, self.cfg, self.ref = policy, opt, loss_fn, cfg, ref

    def update(self, seqs: list[Seq], adv: torch.Tensor, step: int,
               samples: list[Sample] | None = None) -> dict[str, Any]:
        """All optimizer steps of one batch. Appends the rollout policy's features to `samples` (drafter data)
        unless it is None. Returns the metrics (overall, and per epoch under "epochs" when there are several)."""
        c = self.cfg
        self.policy.train()
        try:
            old = self._old_pass(seqs, samples) if c.ppo_epochs * c.ppo_mini_batches > 1 else None
            rng = random.Random(c.seed * 1_000_003 + step) if c.ppo_mini_batches > 1 else None
            epochs: list[list[tuple[dict[str, float], float]]] = []
            norms: list[float] = []
            for _ in range(c.ppo_epochs):
                parts: list[tuple[dict[str, float], float]] = []
                for mb in mini_batches(len(seqs), c.ppo_mini_batches, rng):
                    norms.append(self._optimizer_step(seqs, mb, adv, old, parts, samples if old is None else None))
                epochs.append(parts)
        finally:
            self.policy.eval()
        out: dict[str, Any] = {**combine_metrics([p for e in epochs for p in e]),
                               "grad_norm": sum(norms) / len(norms), "optimizer_steps": len(norms)}
        if c.ppo_epochs > 1:
            out["epochs"] = {str(e + 1): combine_metrics(parts) for e, parts in enumerate(epochs)}
        return out

    def _ref_logprobs(self, toks: torch.Tensor) -> torch.Tensor | None:
        if self.ref is None or not self.cfg.kl_coef:
            return None
        with torch.no_grad():
            return token_logprobs(self.ref.logits(self.ref(toks)[:, :-1]), toks[:, 1:])

    @torch.no_grad()
    def _old_pass(self, seqs: list[Seq], samples: list[Sample] | None) -> OldLogprobs:
        logp: list[torch.Tensor | None] = [None] * len(seqs)
        ref: list[torch.Tensor | None] | None = [None] * len(seqs) if self._uses_ref else None
        for idx in length_buckets([len(s) for s, _ in seqs], self.cfg.micro_batch_tokens):
            toks, _ = pad_batch([seqs[k] for k in idx])
            hidden = self.policy(toks)
            lp = token_logprobs(self.policy.logits(hidden[:, :-1]), toks[:, 1:])
            rp = self._ref_logprobs(toks)
            for b, k in enumerate(idx):
                n = len(seqs[k][0]) - 1
                logp[k] = lp[b, :n].clone()
                if ref is not None and rp is not None:
                    ref[k] = rp[b, :n].clone()
            if samples is not None:
                _collect(samples, toks, hidden, [seqs[k] for k in idx])
        return OldLogprobs(logp=[x for x in logp if x is not None],
                           ref=[x for x in ref if x is not None] if ref is not None else None)

    @property
    def _uses_ref(self) -> bool:
        return self.ref is not None and self.cfg.kl_coef > 0

    def _optimizer_step(self, seqs: list[Seq], mb: list[int], adv: torch.Tensor, old: OldLogprobs | None,
                        parts: list[tuple[dict[str, float], float]], samples: list[Sample] | None) -> float:
        """One optimizer step on the mini-batch `mb`, accumulated over length-bucketed micro-batches."""
        self.opt.zero_grad(set_to_none=True)
        n_tokens = sum(len(seqs[k][0]) - seqs[k][1] for k in mb)
        for chunk in length_buckets([len(seqs[k][0]) for k in mb], self.cfg.micro_batch_tokens):
            idx = [mb[i] for i in chunk]
            parts.append(self._micro_batch(seqs, idx, adv, old, n_tokens, samples))
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # a model's size of gradients is not kept between steps
        return float(norm)

    def _micro_batch(self, seqs: list[Seq], idx: list[int], adv: torch.Tensor, old: OldLogprobs | None,
                     n_tokens: int, samples: list[Sample] | None) -> tuple[dict[str, float], float]:
        c = self.cfg
        toks, mask = pad_batch([seqs[k] for k in idx])
        hidden = self.policy(toks)  # [b, T, H]
        logp = token_logprobs(self.policy.logits(hidden[:, :-1]), toks[:, 1:])  # [b, T-1]
        if old is None:  # on-policy: the rollout policy is this forward's
            logp_old, ref = logp.detach(), self._ref_logprobs(toks)
            if samples is not None:
                _collect(samples, toks, hidden, [seqs[k] for k in idx])
        else:
            logp_old = _pad_rows([old.logp[k] for k in idx], logp.shape[1])
            ref = _pad_rows([old.ref[k] for k in idx], logp.shape[1]) if old.ref is not None else None
        loss, m = self.loss_fn(logp, logp_old, adv[idx], mask, clip_low=c.clip_low, clip_high=c.clip_high,
                               logp_ref=ref, kl_coef=c.kl_coef)
        (loss * (mask.sum() / max(n_tokens, 1))).backward()  # token-mean over the mini-batch, not the chunk
        return m, float(mask.sum())


def _collect(samples: list[Sample], toks: torch.Tensor, hidden: torch.Tensor, seqs: list[Seq]) -> None:
    feats = hidden.detach().float()
    for b, (s, p) in enumerate(seqs):
        samples.append(Sample(tokens=toks[b, :len(s)].clone(), features=feats[b, :len(s)].clone(), prompt_len=p))
