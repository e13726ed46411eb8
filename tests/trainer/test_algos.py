"""GRPO algorithms against numbers computed by hand (the arithmetic is written out beside each number)."""

from __future__ import annotations

import math

import pytest
import torch

from understudy.trainer.algos import (
    ADVANTAGE_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    AlgoError,
    clipped_surrogate_loss,
    get_adv_estimator,
    get_policy_loss,
    group_stats,
    kl_k3,
    register_adv_est,
    token_logprobs,
)

torch.set_num_threads(1)
f64 = torch.float64


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=f64), torch.as_tensor(b, dtype=f64), atol=tol, rtol=0)


# ---- registries ------------------------------------------------------------------------------------------------
def test_registries_hold_the_algorithms_and_unknown_names_list_the_choices():
    assert {"grpo", "drgrpo"} <= set(ADVANTAGE_ESTIMATORS)
    assert "clip" in POLICY_LOSSES
    assert {"token-mean", "seq-mean-token-mean"} <= set(LOSS_AGGREGATIONS)
    assert get_policy_loss("clip") is clipped_surrogate_loss
    with pytest.raises(AlgoError, match="known: drgrpo, grpo"):
        get_adv_estimator("ppo-gae")
    with pytest.raises(ValueError, match="already registered"):
        register_adv_est("grpo")(lambda r, g=None: r)


# ---- advantages ------------------------------------------------------------------------------------------------
def test_grpo_one_group_by_hand():
    # rewards 1,0,1,1: mean = 3/4 = 0.75; deviations .25,-.75,.25,.25; squares sum = 3*.0625 + .5625 = .75
    # unbiased var = .75 / (4-1) = .25 -> std .5; advantages = dev / .5 = .5, -1.5, .5, .5
    r = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=f64)
    mean, std, n = group_stats(r)
    assert close(mean, [[0.75] * 4]) and close(std, [[0.5] * 4]) and close(n, [[4] * 4])
    assert close(get_adv_estimator("grpo")(r), [[0.5, -1.5, 0.5, 0.5]], tol=1e-5)  # eps = 1e-6 in the denominator
    assert close(get_adv_estimator("drgrpo")(r), [[0.25, -0.75, 0.25, 0.25]])


def test_grpo_with_interleaved_group_ids_matches_the_2d_form():
    # group "a" = rewards 1, 3 (mean 2, unbiased std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt 2)
    # group "b" = rewards 2, 4 (mean 3, std sqrt 2); advantages -+1/sqrt2 = -+0.70710678
    r = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=f64)
    h = 1 / math.sqrt(2)
    adv = get_adv_estimator("grpo")(r, ["a", "b", "a", "b"])
    assert close(adv, [-h, -h, h, h], tol=1e-5)
    assert close(get_adv_estimator("grpo")(r, torch.tensor([7, 9, 7, 9])), adv)
    two_d = get_adv_estimator("grpo")(torch.tensor([[1.0, 3.0], [2.0, 4.0]], dtype=f64))
    assert close(two_d, [[-h, h], [-h, h]], tol=1e-5)
    assert close(get_adv_estimator("drgrpo")(r, ["a", "b", "a", "b"]), [-1.0, -1.0, 1.0, 1.0])


def test_equal_rewards_and_singleton_groups_give_zero_advantage():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 5.0])
    ids = [0, 0, 0, 1, 2]  # group 0 all equal (std 0 -> 0 / eps = 0); groups 1, 2 are singletons
    for name in ("grpo", "drgrpo"):
        adv = get_adv_estimator(name)(r, ids)
        assert adv.dtype == r.dtype and torch.equal(adv, torch.zeros(5))


def test_advantage_shape_errors_name_the_problem():
    with pytest.raises(AlgoError, match=r"\[G, n\]"):
        get_adv_estimator("grpo")(torch.ones(4))
    with pytest.raises(AlgoError, match="3 entries for 4 rewards"):
        get_adv_estimator("grpo")(torch.ones(4), [0, 0, 1])


# ---- policy loss ------------------------------------------------------------------------------------------------
RATIOS = [[1.0, 1.5, 0.5], [1.1, 0.7, 1.3]]
ADV = [1.0, -2.0]
MASK = [[1, 1, 1], [1, 1, 0]]


def _inputs():
    logp_old = torch.zeros(2, 3, dtype=f64, requires_grad=True)  # old log-prob 0: ratio = exp(logp_new)
    logp_new = torch.tensor(RATIOS, dtype=f64).log().requires_grad_(True)
    adv = torch.tensor(ADV, dtype=f64, requires_grad=True)
    return logp_new, logp_old, adv, torch.tensor(MASK)


def test_clipped_surrogate_token_mean_by_hand():
    # clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]; per token max(-A r, -A clip(r)):
    #   row 0, A = +1: r=1.0 -> -1.0 | r=1.5 -> max(-1.5, -1.28) = -1.28 (clipped) | r=0.5 -> max(-0.5, -0.8) = -0.5
    #   row 1, A = -2: r=1.1 -> 2.2  | r=0.7 -> max(1.4, 1.6) = 1.6 (clipped)      | r=1.3 masked out
    # token-mean = (-1 - 1.28 - 0.5 + 2.2 + 1.6) / 5 valid tokens = 1.02 / 5 = 0.204; clip_frac = 2/5
    logp_new, logp_old, adv, mask = _inputs()
    loss, m = clipped_surrogate_loss(logp_new, logp_old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert close(loss, 0.204) and m["pg_loss"] == pytest.approx(0.204)
    assert m["clip_frac"] == pytest.approx(0.4)
    # approx_kl = mean(logp_old - logp_new) = -(ln1 + ln1.5 + ln.5 + ln1.1 + ln.7) / 5 = 0.549047 / 5
    assert m["approx_kl"] == pytest.approx(0.1098094, abs=1e-6)
    assert m["kl"] == 0.0
    # ratio over the 5 valid tokens: (1.0 + 1.5 + 0.5 + 1.1 + 0.7) / 5 = 4.8 / 5 = 0.96, min 0.5, max 1.5
    assert m["ratio_mean"] == pytest.approx(0.96) and m["ratio_min"] == pytest.approx(0.5)
    assert m["ratio_max"] == pytest.approx(1.5)


def test_ratio_stats_ignore_masked_tokens_and_default_to_one():
    # valid ratios 2 and 0.5 (mean 1.25); the masked 9.0 and 0.1 must not count
    logp_new = torch.tensor([[2.0, 9.0], [0.5, 0.1]], dtype=f64).log()
    mask = torch.tensor([[1, 0], [1, 0]])
    _, m = clipped_surrogate_loss(logp_new, torch.zeros(2, 2, dtype=f64), torch.ones(2, dtype=f64), mask)
    assert (m["ratio_mean"], m["ratio_min"], m["ratio_max"]) == pytest.approx((1.25, 0.5, 2.0))
    # ratio 2 with A = +1 is above 1 + 0.2 (clipped), 0.5 with A = +1 is not: clip_frac = 1/2
    assert m["clip_frac"] == pytest.approx(0.5)
    _, none = clipped_surrogate_loss(logp_new, torch.zeros(2, 2, dtype=f64), torch.ones(2, dtype=f64),
                                     torch.zeros(2, 2))
    assert (none["ratio_mean"], none["ratio_min"], none["ratio_max"], none["clip_frac"]) == (1.0, 1.0, 1.0, 0.0)


def test_gradient_flows_only_through_logp_new_and_is_zero_where_clipped():
    logp_new, logp_old, adv, mask = _inputs()
    loss, _ = clipped_surrogate_loss(logp_new, logp_old, adv, mask, clip_low=0.2, clip_high=0.28)
    loss.backward()
    # d(-A r)/d logp = -A r, divided by the 5 valid tokens; clipped and masked tokens get 0:
    #   row 0: -1*1.0/5 = -0.2 | clipped 0 | -1*0.5/5 = -0.1;   row 1: 2*1.1/5 = 0.44 | clipped 0 | masked 0
    assert close(logp_new.grad, [[-0.2, 0.0, -0.1], [0.44, 0.0, 0.0]])
    assert logp_old.grad is None and adv.grad is None


def test_seq_mean_token_mean_aggregation_by_hand():
    # row 0 mean = (-1 - 1.28 - 0.5) / 3 = -0.926667; row 1 mean = (2.2 + 1.6) / 2 = 1.9; mean = 0.486667
    logp_new, logp_old, adv, mask = _inputs()
    loss, _ = clipped_surrogate_loss(logp_new, logp_old, adv, mask, clip_low=0.2, clip_high=0.28,
                                     loss_agg="seq-mean-token-mean")
    assert close(loss, (-2.78 / 3 + 1.9) / 2)


def test_token_mean_weighs_every_valid_token_equally():
    # one sequence with 1 valid token (loss -1) and one with 3 valid tokens (loss -2 each):
    # token-mean = (-1 - 6) / 4 = -1.75, whereas seq-mean-token-mean = (-1 + -2) / 2 = -1.5
    logp = torch.zeros(2, 3, dtype=f64)
    adv = torch.tensor([1.0, 2.0], dtype=f64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    assert close(clipped_surrogate_loss(logp, logp, adv, mask)[0], -1.75)
    assert close(clipped_surrogate_loss(logp, logp, adv, mask, loss_agg="seq-mean-token-mean")[0], -1.5)


@pytest.mark.parametrize("ratio, adv, grad_zero, clipped", [
    (1.28 + 1e-4, 1.0, True, True),    # above 1 + clip_high, A > 0: no incentive to push further
    (1.28 - 1e-4, 1.0, False, False),  # just inside: plain gradient
    (0.8 - 1e-4, -1.0, True, True),    # below 1 - clip_low, A < 0: clipped
    (0.8 + 1e-4, -1.0, False, False),
    (0.5, 1.0, False, False),          # A > 0, low ratio: PPO never clips the direction that undoes harm
    (2.0, -1.0, False, False),         # A < 0, high ratio: pessimistic bound keeps the gradient
])
def test_clip_boundaries(ratio, adv, grad_zero, clipped):
    logp_new = torch.tensor([[math.log(ratio)]], dtype=f64, requires_grad=True)
    loss, m = clipped_surrogate_loss(logp_new, torch.zeros(1, 1, dtype=f64), torch.tensor([adv], dtype=f64),
                                     torch.ones(1, 1), clip_low=0.2, clip_high=0.28)
    loss.backward()
    assert (float(logp_new.grad) == 0.0) == grad_zero
    assert m["clip_frac"] == (1.0 if clipped else 0.0)
    if not grad_zero:
        assert float(logp_new.grad) == pytest.approx(-adv * ratio)  # d(-A r)/d logp = -A r


def test_kl_penalty_k3_by_hand():
    # logp = 0, ref = ln 2: d = ln 2, k3 = e^d - d - 1 = 2 - 0.693147 - 1 = 0.306853 per token
    logp = torch.zeros(1, 2, dtype=f64, requires_grad=True)
    ref = torch.full((1, 2), math.log(2), dtype=f64)
    assert close(kl_k3(logp, ref), [[0.306853, 0.306853]])
    assert close(kl_k3(logp, logp), [[0.0, 0.0]])
    loss, m = clipped_surrogate_loss(logp, logp.detach(), torch.zeros(1, dtype=f64), torch.ones(1, 2),
                                     logp_ref=ref, kl_coef=0.1)
    assert close(loss, 0.1 * 0.306853) and m["kl"] == pytest.approx(0.306853, abs=1e-6)
    loss.backward()  # d k3 / d logp = -e^d + 1 = -1 per token, * 0.1 / 2 tokens
    assert close(logp.grad, [[-0.05, -0.05]])
    with pytest.raises(AlgoError, match="logp_ref"):
        clipped_surrogate_loss(logp, logp, torch.zeros(1, dtype=f64), torch.ones(1, 2), kl_coef=0.1)


def test_policy_loss_rejects_mismatched_shapes():
    with pytest.raises(AlgoError, match=r"\[B, T\]"):
        clipped_surrogate_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(AlgoError, match="advantages"):
        clipped_surrogate_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))


# ---- log-probs --------------------------------------------------------------------------------------------------
def test_token_logprobs_by_hand_and_in_float32():
    # logits (0, ln 3): softmax = (1/4, 3/4) -> log 3/4 for token 1, log 1/4 for token 0; 4 equal logits -> -ln 4
    logits = torch.tensor([[[0.0, math.log(3), -1e9, -1e9], [0.0, 0.0, 0.0, 0.0]]])
    tokens = torch.tensor([[1, 2]])
    lp = token_logprobs(logits, tokens)
    assert lp.shape == (1, 2) and lp.dtype == torch.float32
    assert close(lp, [[math.log(0.75), -math.log(4)]], tol=1e-6)
    half = logits.to(torch.bfloat16)  # low-precision logits are upcast before the softmax
    assert torch.equal(token_logprobs(half, tokens), token_logprobs(half.float(), tokens))
    big = torch.randn(2, 5, 11)
    toks = torch.randint(0, 11, (2, 5))
    ref = -torch.nn.functional.cross_entropy(big.reshape(-1, 11), toks.reshape(-1), reduction="none").view(2, 5)
    assert close(token_logprobs(big, toks), ref, tol=1e-5)
    with pytest.raises(AlgoError):
        token_logprobs(big, toks[:, :4])
