"""benchmarks/tlt_sim.py: the TLT projection's simulator keeps the properties its conclusions rest on.

No speculation gain without acceptance; idleness (and so spot training) exists only with unequal lengths, and grows
with their spread; the speed-up grows with acceptance; the event engine's clock matches a hand count. Small, seeded
inputs: every test is deterministic and takes milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    """benchmarks/ is not a package: import the script by path (registered first, as dataclasses need)."""
    name = "tlt_sim_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "tlt_sim.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


sim = _load()


def inputs(per_position=(0.6, 0.4, 0.25, 0.15), drafter_cost=0.05, sigma=0.8, pool=(), a_max=0.8, tau=5.0,
           startup_s=0.0, cap=400):
    """A CPU-like cost table (verification costs more at larger batches), lognormal or pooled lengths."""
    costs = sim.TableCosts(step_ms={1.0: 10.0, 16.0: 40.0},
                           verify={1.0: {1.0: 1.0, 5.0: 1.3}, 16.0: {1.0: 1.0, 5.0: 2.5}})
    lengths = (sim.Lengths(max_new_tokens=max(pool), pool=tuple(pool)) if pool
               else sim.Lengths(max_new_tokens=cap, median=60, sigma=sigma))
    return sim.Inputs(
        name="test", costs=costs, drafter_cost=drafter_cost, arms=(0, 2, 4),
        acceptance=sim.Acceptance(tuple(per_position), a_max=a_max, tau_min=tau),
        update_s_per_token=0.001, allreduce=sim.AllReduce(1e8, 2, 10.0, 1.0), lengths=lengths,
        batch=sim.Batch(prompts_per_accelerator=2, group_size=4, max_batch_per_accelerator=8),
        spot_efficiency=1.0, spot_startup_s=startup_s)


def test_no_acceptance_means_the_controller_stays_off():
    inp = inputs(per_position=(0.0, 0.0, 0.0, 0.0), drafter_cost=0.05)
    for a in (1, 4):
        r = sim.project(inp, a, steps=4, warmup=1)
        off, tlt, nospot = r["runs"]["off"], r["runs"]["tlt"], r["runs"]["tlt_no_spot"]
        assert tlt["k_share"] == {"0": 1.0} == nospot["k_share"]
        assert tlt["rollout_s"] == off["rollout_s"] and tlt["step_s"] == off["step_s"]
        assert r["rollout_speedup"] == 1.0 and tlt["final_L_k4"] == 1.0


def test_a_long_tail_leaves_accelerators_idle_and_more_spread_leaves_more():
    # no effective cap here: with one, a spread so wide that every accelerator hits the cap evens them out again
    idle = [sim.project(inputs(sigma=s, cap=10**9), 8, steps=6, warmup=1)["runs"]["off"]["idle_fraction"]
            for s in (0.1, 0.3, 0.6, 1.2)]
    assert 0 < idle[0] < idle[1] < idle[2] < idle[3]


def test_equal_lengths_leave_nothing_idle_and_nothing_to_spot_train():
    r = sim.project(inputs(pool=(64,)), 8, steps=4, warmup=1)
    tlt, nospot = r["runs"]["tlt"], r["runs"]["tlt_no_spot"]
    assert r["runs"]["off"]["idle_fraction"] == 0.0 == tlt["idle_fraction"]
    assert tlt["spot_used_fraction"] == 0.0
    assert tlt["per_step"]["L_k4"] == nospot["per_step"]["L_k4"]  # the drafter never trained
    assert tlt["rollout_s"] == nospot["rollout_s"]


def test_the_speed_up_grows_with_acceptance():
    speedups = []
    for a1 in (0.2, 0.4, 0.6, 0.8):
        profile = (a1, a1 ** 2, a1 ** 3, a1 ** 4)
        speedups.append(sim.project(inputs(per_position=profile, a_max=a1), 4, steps=4, warmup=1)["rollout_speedup"])
    assert speedups == sorted(speedups) and len(set(speedups)) == len(speedups)
    assert speedups[0] >= 1.0 and speedups[-1] > 1.5  # never slower than off: "off" is one of the arms


def test_spot_training_raises_acceptance_and_only_from_idle_time():
    r = sim.project(inputs(sigma=1.0, tau=0.5), 8, steps=6, warmup=1)
    tlt, nospot = r["runs"]["tlt"], r["runs"]["tlt_no_spot"]
    assert tlt["per_step"]["L_k4"][0] == nospot["per_step"]["L_k4"][0]
    assert tlt["per_step"]["L_k4"][-1] > nospot["per_step"]["L_k4"][-1]
    assert 0 < tlt["spot_used_fraction"] <= 1 and tlt["rollout_s"] < nospot["rollout_s"]
    # a start-up cost longer than any idle window leaves the drafter where it started
    long_start = sim.project(inputs(sigma=1.0, tau=0.5, startup_s=1e9), 8, steps=3, warmup=1)["runs"]["tlt"]
    assert long_start["spot_used_fraction"] == 0.0 and long_start["final_L_k4"] == nospot["final_L_k4"]


def test_continuous_batching_clock_matches_a_hand_count():
    # lengths 3, 1, 2 with two slots, 1 ms per step at any batch, one token per step: the length-1 request ends
    # after step 1 and the waiting length-2 request takes its slot; both live ones end after step 3.
    seconds, steps = sim.decode_share([3, 1, 2], 2, lambda b: (0, 1.0, 1.0))
    assert seconds == pytest.approx(0.003) and steps == {0: pytest.approx(3.0)}
    # a step that emits 2 tokens per sequence and costs b ms: batch 2 for 1 step (2 ms), then batch 2 for 1 step
    seconds, _ = sim.decode_share([4, 2, 2], 2, lambda b: (2, 2.0, float(b)))
    assert seconds == pytest.approx(0.004)


def test_acceptance_length_uses_cumulative_rates():
    assert sim.acceptance_length((0.55, 0.31, 0.18, 0.11, 0.07), 2) == pytest.approx(1.86)
    assert sim.acceptance_length((0.5,), 4) == pytest.approx(1.5)  # positions past the list accept nothing
    grown = sim.Acceptance((0.5, 0.25), a_max=0.9, tau_min=10.0).at(1e6)
    assert grown == pytest.approx((0.9, 0.45))  # deeper positions scale with position 1


def test_lengths_file_accepts_a_list_or_an_rl_step_result(tmp_path: Path):
    plain = tmp_path / "lengths.json"
    plain.write_text(json.dumps([5, 9, 100]))
    assert sim.lengths_file(plain) == sim.Lengths(max_new_tokens=100, pool=(5, 9, 100))
    result = tmp_path / "rl.json"
    result.write_text(json.dumps({"config": {"max_new_tokens": 64}, "history": {
        "tlt": [{"step": 0}, {"step": 1, "response_lengths": [3, 64]}], "off": [{"step": 1, "response_lengths": [7]}]}}))
    assert sorted(sim.lengths_file(result).pool) == [3, 7, 64] and sim.lengths_file(result).max_new_tokens == 64
    empty = tmp_path / "old.json"
    empty.write_text(json.dumps({"history": {"tlt": [{"step": 1, "response_len_p50": 3}]}}))
    with pytest.raises(SystemExit, match="response_lengths"):
        sim.lengths_file(empty)


def test_the_shipped_input_files_load_and_run():
    for path in sim.DEFAULT_COSTS:
        inp = sim.load_inputs(path)
        inp = replace(inp, batch=replace(inp.batch, prompts_per_accelerator=1))
        r = sim.project(inp, 2, steps=2, warmup=0)
        assert r["rollout_speedup"] >= 1.0
        assert all(line for line in sim.assumptions(inp.raw))
