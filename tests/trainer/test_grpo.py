"""The TLT GRPO loop on tiny models: updates, lossless speculative rollouts, the spot trainer's timing, resume."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from scipy.stats import fisher_exact

from tests.trainer.rl_setup import cfg_for, write_toml
from understudy.drafter.train import DrafterTrainConfig
from understudy.engine.loader import load_model
from understudy.engine.sampling import SamplingParams
from understudy.engine.text import encode_prompt
from understudy.trainer.config import TrainConfig, TrainConfigError, load_config
from understudy.trainer.grpo import GRPOTrainer
from understudy.trainer.rollout import RolloutRequest, RolloutWorkers
from understudy.trainer.spot import SpotDrafterTrainer


def test_one_grpo_step_changes_every_parameter(rl_assets, tmp_path):
    t = GRPOTrainer(cfg_for(rl_assets, tmp_path, steps=1, speculation=False), progress=False)
    before = {k: v.detach().clone() for k, v in t.policy.named_parameters()}
    m = t.train_step()
    assert 0 < m["reward_mean"] < 1, "the test task must give mixed rewards, or there is no gradient"
    unchanged = [k for k, v in t.policy.named_parameters() if torch.equal(v.detach(), before[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"


def test_ppo_epochs_make_the_ratio_and_the_clip_act(rl_assets, tmp_path):
    """One epoch: ratio 1, nothing clipped (the on-policy step). Two epochs at a large learning rate: the second
    epoch's ratio is measured against the rollout policy, departs from 1, and the clip bounds it."""
    one = GRPOTrainer(cfg_for(rl_assets, tmp_path / "one", steps=1, speculation=False, lr=0.05), progress=False)
    u1 = one.train_step()["update"]
    assert (u1["ratio_mean"], u1["clip_frac"], u1["optimizer_steps"]) == (1.0, 0.0, 1) and "epochs" not in u1
    two = GRPOTrainer(cfg_for(rl_assets, tmp_path / "two", steps=1, speculation=False, lr=0.05, ppo_epochs=2),
                      progress=False)
    u2 = two.train_step()["update"]
    assert u2["optimizer_steps"] == 2
    assert u2["epochs"]["1"]["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and u2["epochs"]["1"]["clip_frac"] == 0
    assert abs(u2["epochs"]["2"]["ratio_mean"] - 1.0) > 1e-3 and u2["epochs"]["2"]["clip_frac"] > 0
    assert u2["epochs"]["2"]["ratio_max"] > 1.28 or u2["epochs"]["2"]["ratio_min"] < 0.8  # outside the clip range


def test_greedy_speculative_rollouts_are_token_identical(rl_assets):
    lm, prompts = rl_assets["lm"], rl_assets["prompts"]
    reqs = [RolloutRequest(p, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)) for p in prompts[:16]]
    plain = RolloutWorkers(lm.model, lm.eos_token_ids, 2, 8, 256, 0, None).run(reqs)
    d = rl_assets["drafter"]
    spec = RolloutWorkers(lm.model, lm.eos_token_ids, 2, 8, 256, 3, None, drafter_factory=lambda: d).run(reqs)
    assert spec.responses == plain.responses
    assert spec.spec.num_accepted_tokens > 0


def test_sampled_speculative_rollouts_match_reward_distribution(rl_assets, tmp_path):
    """Rewards of sampled rollouts with and without speculation come from the same distribution (Fisher exact)."""
    import random

    from understudy.trainer.tasks import get_task

    lm = rl_assets["lm"]
    task = get_task("jsonl", path=str(rl_assets["task"]), reward="contains")
    rng = random.Random(0)
    problems = [task.sample(rng) for _ in range(8)]
    prompts = [encode_prompt(lm.tokenizer, p.prompt) for p in problems]
    n = 320

    def rewards(workers: RolloutWorkers, seed0: int) -> list[float]:
        reqs = [RolloutRequest(prompts[i % 8], SamplingParams(max_tokens=12, temperature=1.0, seed=seed0 + i))
                for i in range(n)]
        out = workers.run(reqs)
        return [task.reward(problems[i % 8], lm.tokenizer.decode(r, skip_special_tokens=True))
                for i, r in enumerate(out.responses)]

    d = rl_assets["drafter"]
    a = rewards(RolloutWorkers(lm.model, lm.eos_token_ids, 2, 64, 256, 0, None), 0)
    b = rewards(RolloutWorkers(lm.model, lm.eos_token_ids, 2, 64, 256, 3, None, drafter_factory=lambda: d), 10_000)
    ones_a, ones_b = sum(r >= 1 for r in a), sum(r >= 1 for r in b)
    assert 0.1 < ones_a / n < 0.9  # a non-degenerate reward
    p = fisher_exact([[ones_a, n - ones_a], [ones_b, n - ones_b]]).pvalue
    assert p > 1e-3, (ones_a, ones_b, p)


def test_spot_trainer_runs_only_on_idle_workers_and_stops_with_the_rollout(rl_assets):
    lm, prompts = rl_assets["lm"], rl_assets["prompts"]
    from understudy.drafter.train import target_features

    d = rl_assets["drafter"]
    spot = SpotDrafterTrainer(d, lm.model, DrafterTrainConfig(tokens_per_batch=256, unroll_steps=1), 100_000)
    spot.add(target_features(lm.model, [(p, 1) for p in prompts]))
    steps: list[tuple[float, float, str]] = []
    real = spot.trainer.train_step

    def traced(group):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = real(group)
        steps.append((t0, time.perf_counter(), threading.current_thread().name))
        return out

    spot.trainer.train_step = traced  # type: ignore[method-assign]
    # worker 0 gets the even requests (short), worker 1 the odd ones (a long tail)
    reqs = [RolloutRequest(prompts[i], SamplingParams(max_tokens=4 if i % 2 == 0 else 400, temperature=0.0,
                                                      ignore_eos=True)) for i in range(8)]
    workers = RolloutWorkers(lm.model, lm.eos_token_ids, 2, 4, 512, 0, None)
    t_start = time.perf_counter()
    res = workers.run(reqs, spot=spot)
    t_end = t_start + res.seconds
    w0, w1 = res.workers
    assert w0.busy_s < w1.busy_s and w0.idle_s > 0 and w1.idle_s == 0
    assert w0.spot_steps > 0 and w1.spot_steps == 0
    assert len(steps) == w0.spot_steps
    assert all(name == "rollout-0" for _, _, name in steps), "only the idle worker may train"
    assert min(s for s, _, _ in steps) >= t_start + w0.busy_s - 1e-3, "training began before the worker was idle"
    longest = max(e - s for s, e, _ in steps)
    # at most the step in progress may finish after the rollout (plus scheduling slack on a loaded machine)
    assert max(e for _, e, _ in steps) <= t_end + longest + 1.0, "training ran on after the rollout ended"
    n = len(steps)
    time.sleep(0.3)
    assert len(steps) == n  # nothing trains between rollouts
    assert 0 < res.idle_fraction < 1 and w0.spot_train_s <= w0.idle_s + longest + 1.0


def test_resume_reproduces_the_next_step(rl_assets, tmp_path):
    """Speculation off: rollouts are a pure function of (seed, step, state), so resume must match exactly."""
    full = GRPOTrainer(cfg_for(rl_assets, tmp_path / "a", steps=2, speculation=False), progress=False)
    full.train_step()
    m2 = full.train_step()
    part = GRPOTrainer(cfg_for(rl_assets, tmp_path / "b", steps=2, speculation=False), progress=False)
    part.train_step()
    part.save()
    resumed = GRPOTrainer(cfg_for(rl_assets, tmp_path / "b", steps=2, speculation=False), progress=False)
    assert resumed.resume() and resumed.step == 1
    r2 = resumed.train_step()
    assert r2["reward_mean"] == m2["reward_mean"] and r2["rollout_tokens"] == m2["rollout_tokens"]
    for (k, a), (_, b) in zip(full.policy.named_parameters(), resumed.policy.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)


def test_the_warmup_picks_the_draft_vocabulary_from_its_rollouts_and_a_resume_keeps_it(rl_assets, tmp_path):
    """A fresh drafter drafts from the warm-up rollouts' most frequent tokens (the head's size is fixed from the
    start; its ids are chosen at warm-up); the workers, the checkpoint and a resumed run all hold that choice."""
    cfg = cfg_for(rl_assets, tmp_path, steps=1, drafter_warmup_s=6.0, drafter_vocab_size=24)
    tr = GRPOTrainer(cfg, progress=False)
    assert tr.spot is not None and tr.spot.drafter.draft_vocab.tolist() == list(range(24))  # the placeholder
    tr.fit()
    vocab = tr.spot.drafter.draft_vocab.clone()
    assert vocab.numel() == 24 and vocab.tolist() != list(range(24))
    assert set(tr.lm.eos_token_ids) <= set(vocab.tolist())
    torch.testing.assert_close(tr.spot.drafter.head_weight, tr.policy.lm_head.weight[vocab].float())
    for eng in tr.workers.engines:
        assert torch.equal(eng.drafter.draft_vocab, vocab)
    from understudy.drafter.model import load_drafter
    from understudy.registry.store import Registry

    reg = Registry.open(tmp_path / "reg", create=False)
    drafters = [v for v in reg.list_versions() if v.kind == "drafter"]
    assert drafters, "the last step publishes its pair"
    published = load_drafter(reg.version_path(drafters[-1].version), tr.policy, tr.lm.fingerprint)
    assert torch.equal(published.draft_vocab, vocab)
    resumed = GRPOTrainer(cfg_for(rl_assets, tmp_path, steps=2, drafter_warmup_s=6.0, drafter_vocab_size=24),
                          progress=False)
    assert resumed.resume() and resumed.step == 1
    assert torch.equal(resumed.spot.drafter.draft_vocab, vocab)
    torch.testing.assert_close(resumed.spot.drafter.head_weight, resumed.policy.lm_head.weight[vocab].float())
    for eng in resumed.workers.engines:
        assert torch.equal(eng.drafter.draft_vocab, vocab)
    # without a warm-up there is nothing to choose from: the full vocabulary
    plain = GRPOTrainer(cfg_for(rl_assets, tmp_path / "plain", steps=1, drafter_vocab_size=24), progress=False)
    assert plain.spot is not None and plain.spot.drafter.full_vocab


@pytest.mark.slow
def test_train_cli_publishes_drafters_and_policy(rl_assets, tmp_path):
    import subprocess
    import sys

    from understudy.registry.store import Registry

    cfg = cfg_for(rl_assets, tmp_path, steps=4, publish_every=2, eval_every=2)
    path = write_toml(cfg, tmp_path / "cfg.toml")
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "train", "--config", str(path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    reg = Registry.open(tmp_path / "reg", create=False)
    versions = [v for v in reg.list_versions() if v.kind == "drafter"]
    policies = {v.version: v for v in reg.list_versions() if v.kind == "policy"}
    assert len(versions) == 2 and len(policies) == 2  # a pair per publishing step
    assert all(v.metrics.get("heldout_acceptance_length") is not None for v in versions)
    assert [v.manifest.get("policy_version") for v in versions] == [2, 4]
    assert [v.manifest.get("parent") for v in versions] == [None, versions[0].version]  # lineage of the run
    assert [policies[v.policy].manifest["policy_version"] for v in versions] == [2, 4]  # each names its policy
    assert reg.resolve_pair("latest") == (versions[-1].version, versions[-1].policy)
    assert all("eval_accuracy_sampled" in r for r in [json.loads(x) for x in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] if "eval_accuracy" in r)
    assert load_model(str(tmp_path / "run" / "policy"), dtype="float32").fingerprint == rl_assets["lm"].fingerprint
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert {"rollout", "reward", "update", "drafter_sync"} <= set(rows[1]["time"])
    # --resume picks up at the end: nothing left to do, same summary
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "train", "--config", str(path), "--resume"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resumed" in r.stderr


def test_config_errors_name_the_field(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('stepz = 3\n')
    with pytest.raises(TrainConfigError, match="stepz"):
        load_config(p)
    p.write_text('group_size = 1\n')
    with pytest.raises(TrainConfigError, match="group_size"):
        load_config(p)
    with pytest.raises(TrainConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    p.write_text('ppo_epochs = 0\n')
    with pytest.raises(TrainConfigError, match="ppo_epochs"):
        load_config(p)
    p.write_text('prompts_per_step = 2\ngroup_size = 4\nppo_mini_batches = 9\n')  # 8 sequences per batch
    with pytest.raises(TrainConfigError, match="ppo_mini_batches"):
        load_config(p)
    p.write_text('drafter_vocab_size = -1\n')
    with pytest.raises(TrainConfigError, match="drafter_vocab_size"):
        load_config(p)
    p.write_text('prompts_per_step = 2\ngroup_size = 4\nppo_mini_batches = 8\nppo_epochs = 3\n')
    assert (load_config(p).ppo_mini_batches, load_config(p).ppo_epochs) == (8, 3)


class _FakeClock:
    """perf_counter / sleep on a simulated clock: the duty cycle's arithmetic checked without wall time."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


@pytest.mark.parametrize("duty, starts, resting, next_starts", [
    (1.0, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 0.0, [20, 21, 22]),
    (0.25, [0, 4, 8], 7.0, []),  # the next window's 3 s rest outlasts it
    (0.5, [0, 2, 4, 6, 8], 5.0, [21])])
def test_spot_duty_cycle_rests_before_each_step_and_stops_with_the_phase(rl_assets, monkeypatch, duty, starts,
                                                                         resting, next_starts):
    """Each simulated training step takes 1 s; the idle window is [0, 10) s. With duty d the trainer rests
    (1/d - 1) s before each step but the very first (the previous step's duration is not known yet); a rest ends
    early, with no step, when the phase does. The next window starts with a rest."""
    from understudy.drafter.train import target_features
    from understudy.trainer import spot as spot_mod

    lm, prompts = rl_assets["lm"], rl_assets["prompts"]
    spot = SpotDrafterTrainer(rl_assets["drafter"], lm.model, DrafterTrainConfig(tokens_per_batch=256, unroll_steps=1),
                              100_000, duty=duty)
    spot.add(target_features(lm.model, [(p, 1) for p in prompts[:4]]))
    clock = _FakeClock()
    monkeypatch.setattr(spot_mod, "time", clock)
    began: list[float] = []

    def step(group):  # type: ignore[no-untyped-def]
        began.append(clock.now)
        clock.now += 1.0
        return {"loss": 0.0}

    spot.trainer.train_step = step  # type: ignore[method-assign]
    taken = spot.train_until(lambda: clock.now >= 10.0 - 1e-9)
    assert taken == len(starts) and began == pytest.approx(starts, abs=0.02)
    assert spot.total_train_s == pytest.approx(len(starts), abs=0.02)
    assert spot.total_rest_s == pytest.approx(resting, abs=0.02)
    clock.now, began[:] = 20.0, []  # the next idle window, [20, 22.5)
    spot.train_until(lambda: clock.now >= 22.5 - 1e-9)
    assert began == pytest.approx(next_starts, abs=0.02)


def test_spot_duty_must_be_a_share():
    with pytest.raises(TrainConfigError, match="spot_duty"):
        TrainConfig(spot_duty=0.0)
    with pytest.raises(TrainConfigError, match="spot_duty"):
        TrainConfig(spot_duty=1.5)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_rollouts_follow_the_learners_updates(rl_assets, tmp_path, quantize):
    """rollout_quantize: the workers decode a quantised copy of the float policy. Before and after a GRPO step their
    speculative greedy output equals plain greedy decoding of a fresh quantised copy of the learner's weights; the
    learner stays float, the copy is re-quantised in place (its buffers keep their storage)."""
    from understudy.engine.quant import is_quantized

    t = GRPOTrainer(cfg_for(rl_assets, tmp_path, steps=1, rollout_quantize=quantize), progress=False)
    lm = rl_assets["lm"]
    reqs = [RolloutRequest(p, SamplingParams(max_tokens=20, temperature=0.0)) for p in rl_assets["prompts"][:8]]

    def fresh() -> list[list[int]]:
        return RolloutWorkers(t.policy, lm.eos_token_ids, 2, 4, 512, 0, None, quantize=quantize).run(reqs).responses

    assert is_quantized(t.workers.policy) and not is_quantized(t.policy)
    before = t.workers.run(reqs).responses
    assert before == fresh()
    ptr = t.workers.policy.layers[0].attn.wqkv.qweight.data_ptr()
    t.train_step()
    after = t.workers.run(reqs).responses
    assert after == fresh()
    assert after != before  # lr 1e-3 moved the policy, and the quantised copy followed it
    assert t.workers.policy.layers[0].attn.wqkv.qweight.data_ptr() == ptr


def test_rollout_quantize_is_checked():
    with pytest.raises(TrainConfigError, match="rollout_quantize"):
        TrainConfig(rollout_quantize="int3")
    with pytest.raises(TrainConfigError, match="rollout_quantize"):
        TrainConfig(rollout_quantize="int8", dtype="bfloat16")


def test_rollout_k_fixes_k_keeps_spot_training_and_resumes(rl_assets, tmp_path):
    """rollout_k = 0: every rollout step decodes without drafting while the drafter still spot-trains (the
    interference measurement of benchmarks/rl_step.py); rollout_k = 2: every step drafts 2. The fixed K is
    checkpointed, and resuming it under the adaptive controller is refused with the field to change."""
    for k in (0, 2):
        t = GRPOTrainer(cfg_for(rl_assets, tmp_path / f"k{k}", steps=1, rollout_k=k, num_draft_tokens=3),
                        progress=False)
        m = t.train_step()
        assert set(m["k_steps"]) == {str(k)}, m["k_steps"]
        assert t.spot is not None and t.workers.engines[0].drafter is not None  # spot training and drafter kept
        t.save()
    with pytest.raises(ValueError, match="rollout_k"):
        GRPOTrainer(cfg_for(rl_assets, tmp_path / "k2", steps=2, num_draft_tokens=3), progress=False).resume()


def test_rollout_k_is_checked():
    with pytest.raises(TrainConfigError, match="rollout_k"):
        TrainConfig(rollout_k=5, num_draft_tokens=4)
    with pytest.raises(TrainConfigError, match="rollout_k"):
        TrainConfig(rollout_k=-1)
    with pytest.raises(TrainConfigError, match="rollout_k needs speculation"):
        TrainConfig(rollout_k=0, speculation=False)
