"""The adaptive controller: learns the best arm per batch-size bucket, can turn speculation off, no flip-flop."""

from __future__ import annotations

import random

import pytest

from understudy.engine.bandit import AdaptiveController, BanditConfig
from understudy.engine.controller import OperatorOverride


def simulate(ctrl: AdaptiveController, speed: dict[int, dict[int, float]], steps: int, noise: float = 0.1, seed: int = 0):
    """speed[batch][k] = true tokens/s; rewards get multiplicative noise."""
    rng = random.Random(seed)
    picks: dict[int, list[int]] = {b: [] for b in speed}
    for i in range(steps):
        b = list(speed)[i % len(speed)]
        k = ctrl.choose(b)
        picks[b].append(k)
        tps = speed[b][k] * (1 + rng.uniform(-noise, noise))
        ctrl.observe(b, k, num_tokens=max(1, round(tps * 0.1)), seconds=0.1)
    return picks


def test_learns_best_arm_per_bucket_including_off():
    ctrl = AdaptiveController(BanditConfig(arms=(0, 2, 4), epsilon=0.1, seed=1))
    # small batches: speculation pays (K=4 best); large batches: verification is not free, off is best
    speed = {1: {0: 30.0, 2: 45.0, 4: 60.0}, 16: {0: 120.0, 2: 100.0, 4: 80.0}}
    picks = simulate(ctrl, speed, 600)
    assert ctrl.current_arm(1) == 4
    assert ctrl.current_arm(16) == 0
    # after the initial exploration the best arm dominates (exploration ~ epsilon)
    late1, late16 = picks[1][100:], picks[16][100:]
    assert late1.count(4) / len(late1) > 0.8
    assert late16.count(0) / len(late16) > 0.8
    assert set(late16) > {0}, "it must keep exploring"
    st = ctrl.state()
    assert st["buckets"]["1"]["current_k"] == 4 and st["buckets"]["16-31"]["current_k"] == 0


def test_hysteresis_prevents_flip_flop_between_near_equal_arms():
    ctrl = AdaptiveController(BanditConfig(arms=(0, 4), epsilon=0.2, switch_margin=0.05, seed=2))
    simulate(ctrl, {4: {0: 100.0, 4: 101.0}}, 800, noise=0.05)
    assert ctrl.state()["buckets"]["4-7"]["switches"] <= 2


def test_adapts_when_the_best_arm_changes():
    ctrl = AdaptiveController(BanditConfig(arms=(0, 4), epsilon=0.2, window=16, seed=3))
    simulate(ctrl, {1: {0: 30.0, 4: 60.0}}, 200)
    assert ctrl.current_arm(1) == 4
    simulate(ctrl, {1: {0: 30.0, 4: 10.0}}, 300, seed=4)  # e.g. a garbage drafter was swapped in
    assert ctrl.current_arm(1) == 0


def test_buckets_and_validation():
    ctrl = AdaptiveController(BanditConfig())
    assert [ctrl.bucket_label(ctrl.bucket_of(b)) for b in (1, 2, 3, 5, 9, 31, 64, 500)] == \
        ["1", "2-3", "2-3", "4-7", "8-15", "16-31", "64+", "64+"]
    with pytest.raises(ValueError):
        BanditConfig(arms=(4,))
    with pytest.raises(ValueError):
        AdaptiveController(BanditConfig(arms=(0, 8)), max_k=4)


def test_exploration_decays_to_its_floor_and_a_reset_restores_it():
    # rewards never expire here: the exploration measured is epsilon's alone (expiry re-tries arms on its own)
    cfg = BanditConfig(arms=(0, 2, 4), epsilon=0.1, epsilon_min=0.02, epsilon_decay_pulls=200, max_age=0, seed=5)
    assert cfg.epsilon_at(0) == 0.1 and abs(cfg.epsilon_at(600) - 0.05) < 1e-9 and cfg.epsilon_at(10**6) == 0.02
    assert BanditConfig(epsilon=0.1, epsilon_decay_pulls=0).epsilon_at(10**6) == 0.1  # decay off
    ctrl = AdaptiveController(cfg)
    speed = {1: {0: 60.0, 2: 30.0, 4: 20.0}}  # off is best: every exploration pull is a loss
    picks = simulate(ctrl, speed, 6000, seed=6)[1]
    early, late = picks[10:500], picks[4000:]
    explore_early = 1 - early.count(0) / len(early)
    explore_late = 1 - late.count(0) / len(late)
    assert 0.05 < explore_early < 0.15, explore_early  # ~ epsilon 0.1 .. 0.07 over the first 500 pulls
    assert 0.005 < explore_late < 0.04, explore_late  # ~ the 0.02 floor: it never stops watching
    assert ctrl.state()["buckets"]["1"]["epsilon_now"] == 0.02
    ctrl.reset()  # a new drafter: the K > 0 arms' speeds are unknown again
    assert ctrl.state()["buckets"]["1"]["epsilon_now"] == 0.1
    again = simulate(ctrl, speed, 300, seed=7)[1]
    assert {2, 4} <= set(again[:12])  # min_samples tries of every arm first


def test_an_arm_that_lost_on_hard_prompts_wins_back_once_its_rewards_expire():
    """Acceptance moves with the prompts: K=4 loses on a stretch of hard prompts, then wins again. With expiry the
    old rewards go after max_age pulls, K=4 is re-tried and taken back; kept forever, they hold the window's
    median down while exploration adds one new reward in ~30 pulls."""
    hard, easy = {1: {0: 30.0, 4: 12.0}}, {1: {0: 30.0, 4: 60.0}}
    switched_at = {}
    for max_age in (128, 0):
        ctrl = AdaptiveController(BanditConfig(arms=(0, 4), epsilon=0.1, max_age=max_age, seed=8))
        simulate(ctrl, easy, 100, seed=1)
        simulate(ctrl, hard, 400, seed=2)
        assert ctrl.current_arm(1) == 0
        picks = simulate(ctrl, easy, 600, seed=3)[1]
        after = [i for i in range(len(picks)) if exploits_k4_from(picks, i)]
        switched_at[max_age] = after[0] if after else None
    assert switched_at[128] is not None and switched_at[128] <= 128 + 20, switched_at
    assert switched_at[0] is None or switched_at[0] > 2 * switched_at[128], switched_at


def exploits_k4_from(picks: list[int], i: int, run: int = 20) -> bool:
    """Pull i starts a run of `run` pulls of which at least 90 % are K=4 (the controller exploits it)."""
    window = picks[i:i + run]
    return len(window) == run and window.count(4) >= 0.9 * run


def test_expired_rewards_leave_the_state_and_the_checkpoint_round_trips():
    ctrl = AdaptiveController(BanditConfig(arms=(0, 4), epsilon=0.0, epsilon_min=0.0, max_age=16, seed=9))
    picks = simulate(ctrl, {1: {0: 30.0, 4: 60.0}}, 60)[1]
    assert ctrl.current_arm(1) == 4
    # no epsilon at all, yet K=0 is re-tried (min_samples pulls) each time its rewards expire
    assert picks[20:].count(0) >= 3, picks
    never = AdaptiveController(BanditConfig(arms=(0, 4), epsilon=0.0, epsilon_min=0.0, max_age=0, seed=9))
    assert simulate(never, {1: {0: 30.0, 4: 60.0}}, 60)[1][20:].count(0) == 0
    sd = ctrl.state_dict()
    twin = AdaptiveController(BanditConfig(arms=(0, 4), epsilon=0.0, epsilon_min=0.0, max_age=16, seed=9))
    twin.load_state_dict(sd)
    assert twin.state() == ctrl.state()
    legacy = {**sd, "buckets": {k: {f: v for f, v in b.items() if f != "stamps"} for k, b in sd["buckets"].items()}}
    twin.load_state_dict(legacy)  # saved before rewards expired: all count as fresh at the saved pull count
    assert twin.state()["buckets"]["1"]["tokens_per_s"].keys() == {"0", "4"}
    with pytest.raises(ValueError, match="max_age"):
        BanditConfig(arms=(0, 2, 4), min_samples=3, max_age=8)


def test_a_bimodal_arm_is_scored_by_its_throughput_not_its_median_step():
    """A K=4 step on a hard prompt: nothing accepted (1 token) 55 % of the time, all 4 drafts (5 tokens) 45 %, in
    50 ms: 56 tokens/s over many steps, against 30 for off; the median step is the 1-token one, 20 tokens/s."""
    rng = random.Random(11)
    ctrl = AdaptiveController(BanditConfig(arms=(0, 4), epsilon=0.1, seed=12))
    picks = []
    for _ in range(400):
        k = ctrl.choose(1)
        picks.append(k)
        if k == 0:
            ctrl.observe(1, 0, num_tokens=1, seconds=1 / 30)
        else:
            ctrl.observe(1, 4, num_tokens=1 if rng.random() < 0.55 else 5, seconds=0.05)
    assert ctrl.current_arm(1) == 4
    assert picks[100:].count(4) / 300 > 0.8
    assert 50 < ctrl.state()["buckets"]["1"]["tokens_per_s"]["4"] < 62


def test_a_stalled_step_does_not_sink_an_arm():
    ctrl = AdaptiveController(BanditConfig(arms=(0, 4), epsilon=0.0, epsilon_min=0.0, seed=13))
    for _ in range(3):
        ctrl.observe(1, 0, num_tokens=1, seconds=1 / 30)
    for i in range(8):
        ctrl.observe(1, 4, num_tokens=3, seconds=2.0 if i == 4 else 0.05)  # one step caught by a 2 s stall
    assert ctrl.current_arm(1) == 4
    assert ctrl.state()["buckets"]["1"]["tokens_per_s"]["4"] == 60.0


def test_epsilon_config_validation():
    with pytest.raises(ValueError, match="epsilon_min"):
        BanditConfig(epsilon=0.1, epsilon_min=0.2)
    with pytest.raises(ValueError, match="epsilon_decay_pulls"):
        BanditConfig(epsilon_decay_pulls=-1)


def test_operator_override_pins_k_and_leaves_the_bandit_as_it_was() -> None:
    inner = AdaptiveController(BanditConfig(arms=(0, 2, 4), min_samples=1, epsilon=0.0, epsilon_min=0.0), max_k=4)
    ctl = OperatorOverride(inner, max_k=4)
    for k in (0, 2, 4):  # one sample per arm: K=2 is the fastest
        ctl.observe(1, k, {0: 1, 2: 3, 4: 2}[k], 1.0)
    assert ctl.choose(1) == 2 and ctl.state()["pinned_k"] is None
    before = inner.state_dict()
    ctl.pin(0)
    assert [ctl.choose(b) for b in (1, 8, 64)] == [0, 0, 0]
    ctl.observe(1, 0, 100, 1.0)  # a pinned step teaches the bandit nothing
    assert inner.state_dict() == before and ctl.state()["pinned_k"] == 0
    ctl.pin(3)  # any K up to the server's maximum, not only an arm
    assert ctl.choose(1) == 3
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="between 0 and 4"):
            ctl.pin(bad)
    assert ctl.choose(1) == 3  # a refused pin changes nothing
    ctl.pin(None)
    assert ctl.choose(1) == 2 and ctl.state()["pinned_k"] is None
