"""The policy update (understudy/trainer/update.py): several PPO epochs make the ratio and the clip act; one epoch
is the on-policy step. Pure helpers against numbers worked out by hand; the updater on a tiny toy policy."""

from __future__ import annotations

import random

import pytest
import torch

from understudy.trainer.algos import clipped_surrogate_loss, token_logprobs
from understudy.trainer.update import (
    PolicyUpdater,
    UpdateConfig,
    UpdateConfigError,
    combine_metrics,
    mini_batches,
    pad_batch,
)

torch.set_num_threads(1)


class ToyPolicy(torch.nn.Module):
    """hidden = tanh(embed(x) @ W + cumulative mean of the embeddings); logits = hidden @ head^T. Causal."""

    def __init__(self, vocab: int = 7, hidden: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g))
        self.w = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) / hidden ** 0.5)
        self.head = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g))

    def forward(self, toks: torch.Tensor) -> torch.Tensor:
        e = self.embed[toks]
        ctx = e.cumsum(1) / torch.arange(1, toks.shape[1] + 1).view(1, -1, 1)
        return torch.tanh(e @ self.w + ctx)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.head.T


SEQS = [([1, 2, 3, 4, 5], 2), ([1, 3, 6], 2), ([2, 2, 5, 6, 1, 0], 3), ([4, 1, 2, 6], 1)]
ADV = torch.tensor([1.0, -1.0, 0.5, -0.5])


def make(lr: float, **cfg):  # type: ignore[no-untyped-def]
    policy = ToyPolicy()
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    return policy, PolicyUpdater(policy, opt, clipped_surrogate_loss, UpdateConfig(**cfg))


# ---- pure helpers -----------------------------------------------------------------------------------------------
def test_mini_batches_split_evenly_larger_parts_first():
    assert mini_batches(5, 1) == [[0, 1, 2, 3, 4]]
    assert mini_batches(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]  # 7 = 3 + 2 + 2
    assert mini_batches(4, 4) == [[0], [1], [2], [3]]
    shuffled = mini_batches(6, 2, random.Random(0))
    assert sorted(shuffled[0] + shuffled[1]) == list(range(6)) and shuffled != [[0, 1, 2], [3, 4, 5]]
    assert shuffled == mini_batches(6, 2, random.Random(0))  # a seeded shuffle is reproducible
    with pytest.raises(UpdateConfigError, match="ppo_mini_batches must be in"):
        mini_batches(3, 4)


def test_combine_metrics_by_hand():
    # clip_frac: (0.5 * 2 tokens + 0.0 * 6 tokens) / 8 = 0.125; ratio_mean (1.2 * 2 + 1.0 * 6) / 8 = 1.05
    # ratio_min = min(0.9, 1.0) = 0.9, ratio_max = max(1.5, 1.0) = 1.5; the empty chunk is left out
    parts = [({"clip_frac": 0.5, "ratio_mean": 1.2, "ratio_min": 0.9, "ratio_max": 1.5}, 2.0),
             ({"clip_frac": 0.0, "ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0}, 6.0),
             ({"clip_frac": 9.0, "ratio_mean": 9.0, "ratio_min": 0.0, "ratio_max": 9.0}, 0.0)]
    assert combine_metrics(parts) == pytest.approx({"clip_frac": 0.125, "ratio_mean": 1.05, "ratio_min": 0.9,
                                                    "ratio_max": 1.5})
    assert combine_metrics([]) == {}


def test_pad_batch_masks_the_response_tokens():
    toks, mask = pad_batch([([5, 6, 7], 2), ([1, 2], 1)])
    assert toks.tolist() == [[5, 6, 7], [1, 2, 0]]
    # logits at t predict t+1: seq 0 response = token 2 (index 2) -> mask[1]; seq 1 response = token 1 -> mask[0]
    assert mask.tolist() == [[False, True], [True, False]]


def test_update_config_validates():
    with pytest.raises(UpdateConfigError, match="ppo_epochs"):
        UpdateConfig(ppo_epochs=0)
    with pytest.raises(UpdateConfigError, match="kl_coef > 0 needs a reference"):
        make(1e-3, kl_coef=0.1)


# ---- the updater ------------------------------------------------------------------------------------------------
def test_one_epoch_is_the_on_policy_step():
    """ppo_epochs=1: exactly one forward with grad, logp_old = its detached copy, one AdamW step; the parameters
    equal those of that step written out here, the ratio is 1 and nothing is clipped."""
    policy, upd = make(0.05)
    ref = ToyPolicy()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.0)
    order = sorted(range(len(SEQS)), key=lambda i: len(SEQS[i][0]))  # one micro-batch, shortest first
    toks, mask = pad_batch([SEQS[i] for i in order])
    logp = token_logprobs(ref.logits(ref(toks)[:, :-1]), toks[:, 1:])
    loss, _ = clipped_surrogate_loss(logp, logp.detach(), ADV[order], mask, clip_low=0.2, clip_high=0.28)
    (loss * (mask.sum() / mask.sum())).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()

    m = upd.update(SEQS, ADV, step=0)
    for (name, a), (_, b) in zip(policy.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert m["optimizer_steps"] == 1 and "epochs" not in m
    assert (m["ratio_mean"], m["ratio_min"], m["ratio_max"], m["clip_frac"]) == (1.0, 1.0, 1.0, 0.0)


def test_second_epoch_moves_the_ratio_and_the_clip_acts():
    _, upd = make(0.5, ppo_epochs=2, clip_low=0.2, clip_high=0.28)
    m = upd.update(SEQS, ADV, step=0)
    first, second = m["epochs"]["1"], m["epochs"]["2"]
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and first["clip_frac"] == 0.0  # rollout policy
    assert abs(second["ratio_mean"] - 1.0) > 0.05 and second["ratio_max"] - second["ratio_min"] > 0.1
    assert second["clip_frac"] > 0.0  # lr 0.5 moves the policy far past the clip range
    assert m["optimizer_steps"] == 2 and m["clip_frac"] == pytest.approx(second["clip_frac"] / 2)


def test_old_logprobs_are_computed_once_before_the_first_step():
    policy, upd = make(0.1, ppo_epochs=3, ppo_mini_batches=2, micro_batch_tokens=6)
    calls: list[bool] = []
    real = policy.forward

    def traced(toks):  # type: ignore[no-untyped-def]
        calls.append(torch.is_grad_enabled())
        return real(toks)

    policy.forward = traced  # type: ignore[method-assign]
    samples: list = []
    m = upd.update(SEQS, ADV, step=3, samples=samples)
    # micro_batch_tokens 6: the old pass buckets lengths 3,4,5,6 as [3],[4],[5],[6] -> 4 no-grad forwards first
    assert calls[:4] == [False] * 4 and all(calls[4:]) and len(calls) > 4
    assert m["optimizer_steps"] == 6 and set(m["epochs"]) == {"1", "2", "3"}
    # the drafter's features come from the rollout policy's (old) pass: one sample per sequence, shortest first
    assert [s.tokens.tolist() for s in samples] == [SEQS[1][0], SEQS[3][0], SEQS[0][0], SEQS[2][0]]
    # the second mini-batch of epoch 1 already sees a moved policy
    assert m["epochs"]["1"]["ratio_max"] > 1.0 + 1e-4 or m["epochs"]["1"]["ratio_min"] < 1.0 - 1e-4


def test_mini_batch_shuffle_depends_on_the_step_only():
    a_policy, a = make(0.1, ppo_epochs=2, ppo_mini_batches=2)
    b_policy, b = make(0.1, ppo_epochs=2, ppo_mini_batches=2)
    a.update(SEQS, ADV, step=5)
    b.update(SEQS, ADV, step=5)
    for (name, x), (_, y) in zip(a_policy.named_parameters(), b_policy.named_parameters(), strict=True):
        assert torch.equal(x, y), name
