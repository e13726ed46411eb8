"""GRPO algorithms as registered pure functions (verl's `register_adv_est` style).

    advantages   ADVANTAGE_ESTIMATORS[name](rewards, group_ids) -> per-sequence advantages
    policy loss  POLICY_LOSSES[name](logp_new, logp_old, advantages, mask, ...) -> (loss, metrics)
    aggregation  LOSS_AGGREGATIONS[name](per_token [B, T], mask [B, T]) -> scalar

Callers look functions up by name once (`get_adv_estimator`, `get_policy_loss`); nothing here branches on a
name. Every function is unit-tested against numbers computed by hand (tests/trainer/test_algos.py).

Conventions:
  * group std is the *unbiased* (n-1) sample std, as verl's `compute_grpo_outcome_advantage` (torch.std);
  * a group of one sequence has no baseline to compare with: its advantage is 0 (verl instead uses
    mean 0, std 1, i.e. the raw reward);
  * the policy ratio is exp(logp_new - logp_old) with the log-ratio clamped to [-20, 20] (verl);
  * `approx_kl` = token-mean of (logp_old - logp_new) (verl's `ppo_kl`); the optional penalty to a reference
    policy uses the k3 estimator exp(ref - new) - (ref - new) - 1 (Schulman, "Approximating KL divergence").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from understudy.errors import UnderstudyError


class AlgoError(UnderstudyError, ValueError):
    """An unknown algorithm name or an invalid argument (names it and lists the choices)."""


AdvantageFn = Callable[..., torch.Tensor]
PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
AggregationFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
LOSS_AGGREGATIONS: dict[str, AggregationFn] = {}


def _register(table: dict[str, Any], kind: str, name: str) -> Callable[[Any], Any]:
    def deco(fn: Any) -> Any:
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = fn
        return fn

    return deco


def register_adv_est(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    return _register(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    return _register(POLICY_LOSSES, "policy loss", name)


def register_loss_agg(name: str) -> Callable[[AggregationFn], AggregationFn]:
    return _register(LOSS_AGGREGATIONS, "loss aggregation", name)


def _lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    if name not in table:
        raise AlgoError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def get_adv_estimator(name: str) -> AdvantageFn:
    return _lookup(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def get_policy_loss(name: str) -> PolicyLossFn:
    return _lookup(POLICY_LOSSES, "policy loss", name)


def get_loss_agg(name: str) -> AggregationFn:
    return _lookup(LOSS_AGGREGATIONS, "loss aggregation", name)


# ---- advantages --------------------------------------------------------------------------------------------
def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor | Sequence[Any] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence group mean, unbiased group std and group size, each shaped like the rewards.

    rewards: [N] with `group_ids` [N] (any hashable ids; sequences with equal ids form a group), or
    [G, n] with group_ids None (row g is group g). Computed in float64, returned in the rewards' dtype.
    """
    if group_ids is None:
        if rewards.dim() != 2:
            raise AlgoError(f"rewards must be [G, n] when group_ids is None, got shape {tuple(rewards.shape)}")
        r = rewards.double()
        n = torch.full_like(r, r.shape[1])
        mean = r.mean(dim=1, keepdim=True).expand_as(r)
        ss = ((r - mean) ** 2).sum(dim=1, keepdim=True).expand_as(r)
    else:
        if rewards.dim() != 1:
            raise AlgoError(f"rewards must be [N] with group_ids, got shape {tuple(rewards.shape)}")
        index = _group_index(group_ids, rewards.shape[0], rewards.device)  # [N] in 0..G-1
        r = rewards.double()
        G = int(index.max()) + 1 if index.numel() else 0
        counts = torch.zeros(G, dtype=torch.float64, device=r.device).index_add_(0, index, torch.ones_like(r))
        sums = torch.zeros(G, dtype=torch.float64, device=r.device).index_add_(0, index, r)
        mean = (sums / counts)[index]
        ss_g = torch.zeros(G, dtype=torch.float64, device=r.device).index_add_(0, index, (r - mean) ** 2)
        n, ss = counts[index], ss_g[index]
    std = torch.sqrt(ss / (n - 1).clamp_min(1.0))
    return mean.to(rewards.dtype), std.to(rewards.dtype), n.to(rewards.dtype)


def _group_index(group_ids: torch.Tensor | Sequence[Any], N: int, device: torch.device) -> torch.Tensor:
    if isinstance(group_ids, torch.Tensor):
        ids = group_ids.reshape(-1)
        if ids.numel() != N:
            raise AlgoError(f"group_ids has {ids.numel()} entries for {N} rewards")
        return torch.unique(ids, return_inverse=True)[1].to(device)
    ids_list = list(group_ids)
    if len(ids_list) != N:
        raise AlgoError(f"group_ids has {len(ids_list)} entries for {N} rewards")
    first: dict[Any, int] = {}
    return torch.tensor([first.setdefault(g, len(first)) for g in ids_list], dtype=torch.long, device=device)


@register_adv_est("grpo")
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | Sequence[Any] | None = None,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (r - mean_group) / (std_group + eps); singleton groups get 0."""
    mean, std, n = group_stats(rewards, group_ids)
    adv = (rewards - mean) / (std + eps)
    return torch.where(n > 1, adv, torch.zeros_like(adv))


@register_adv_est("drgrpo")
def drgrpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | Sequence[Any] | None = None,
                      eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): r - mean_group, no std division."""
    mean, _, n = group_stats(rewards, group_ids)
    adv = rewards - mean
    return torch.where(n > 1, adv, torch.zeros_like(adv))


# ---- loss aggregation --------------------------------------------------------------------------------------
@register_loss_agg("token-mean")
def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over every valid token of the batch / number of valid tokens (DAPO; long responses weigh more)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


@register_loss_agg("seq-mean-token-mean")
def seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean (the original GRPO; sequences without tokens skipped)."""
    m = mask.to(values.dtype)
    tokens = m.sum(dim=-1)  # [B]
    per_seq = (values * m).sum(dim=-1) / tokens.clamp_min(1.0)
    has = (tokens > 0).to(values.dtype)
    return (per_seq * has).sum() / has.sum().clamp_min(1.0)


# ---- policy loss -------------------------------------------------------------------------------------------
def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) from samples of pi: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = (logp_ref - logp).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0


@register_policy_loss("clip")
def clipped_surrogate_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                           logp_ref: torch.Tensor | None = None, kl_coef: float = 0.0,
                           loss_agg: str = "token-mean") -> tuple[torch.Tensor, dict[str, float]]:
    """PPO/DAPO clipped surrogate, ratio clipped to [1 - clip_low, 1 + clip_high] (clip-higher: clip_high > low).

    logp_new, logp_old, mask: [B, T]; advantages: [B] (one per sequence, broadcast over its tokens).
    Per token: max(-A * ratio, -A * clip(ratio)); aggregated by `loss_agg` (token-mean by default).
    Gradients flow through logp_new only. Returns (loss, metrics: pg_loss, clip_frac, approx_kl, kl, and the
    ratio's token-mean, min and max over valid tokens; 1.0 when there is none).
    """
    if logp_new.shape != logp_old.shape or logp_new.shape != mask.shape or logp_new.dim() != 2:
        raise AlgoError(f"logp_new, logp_old and mask must all be [B, T]; got {tuple(logp_new.shape)}, "
                        f"{tuple(logp_old.shape)}, {tuple(mask.shape)}")
    if advantages.shape != logp_new.shape[:1]:
        raise AlgoError(f"advantages must be [B] = [{logp_new.shape[0]}], got {tuple(advantages.shape)}")
    if clip_low < 0 or clip_low >= 1 or clip_high < 0:
        raise AlgoError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    agg = get_loss_agg(loss_agg)
    mask = mask.to(logp_new.dtype)
    log_ratio = (logp_new - logp_old.detach()).clamp(-20.0, 20.0)  # [B, T]
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(logp_new.dtype).unsqueeze(1)  # [B, 1]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)  # [B, T]
    pg_loss = agg(pg, mask)
    loss = pg_loss
    kl = torch.zeros((), dtype=logp_new.dtype, device=logp_new.device)
    if kl_coef:
        if logp_ref is None:
            raise AlgoError("kl_coef > 0 needs logp_ref (the reference policy's log-probs, [B, T])")
        kl = agg(kl_k3(logp_new, logp_ref.detach()), mask)
        loss = loss + kl_coef * kl
    with torch.no_grad():
        valid = ratio[mask > 0]
        metrics = {
            "pg_loss": float(pg_loss),
            "clip_frac": float(token_mean((clipped > unclipped).to(pg.dtype), mask)),
            "approx_kl": float(token_mean(-log_ratio, mask)),
            "kl": float(kl),
            "ratio_mean": float(valid.mean()) if valid.numel() else 1.0,
            "ratio_min": float(valid.min()) if valid.numel() else 1.0,
            "ratio_max": float(valid.max()) if valid.numel() else 1.0,
        }
    return loss, metrics


# ---- log-probs ---------------------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[b, t, tokens[b, t]] in float32: logits [B, T, V], tokens [B, T] -> [B, T].

    The caller aligns them: for a sequence x, logits at position t predict x[t + 1].
    """
    if logits.shape[:-1] != tokens.shape:
        raise AlgoError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree on [B, T]")
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(logits, dim=-1)
