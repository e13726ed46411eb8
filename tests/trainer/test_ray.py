"""The Ray executor, for real, on an embedded local cluster with two rollout workers (CPU): rollouts equal the local
executor's token for token, a GRPO step runs end to end with TLT (rollout actors + spot-trainer actor), a rollout
worker killed mid-step has its share decoded again with every group whole, and a learner killed mid-run is
restarted from its checkpoint with each step's policy and drafter published exactly once."""

from __future__ import annotations

import json

import pytest
import ray

from tests.trainer.rl_setup import cfg_for
from understudy.drafter.model import save_drafter
from understudy.engine.sampling import SamplingParams
from understudy.registry.store import Registry
from understudy.trainer import crashpoints
from understudy.trainer.grpo import GRPOTrainer
from understudy.trainer.rollout import RolloutRequest, RolloutWorkers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drafter_dir(rl_assets, tmp_path_factory):
    """The session's tiny trained drafter as a folder (drafter_init), so that TLT rollouts accept from step 1."""
    out = tmp_path_factory.mktemp("drafter") / "d"
    save_drafter(rl_assets["drafter"], out)
    return str(out)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _greedy_requests(rl_assets, n: int = 8, max_tokens: int = 20) -> list[RolloutRequest]:
    return [RolloutRequest(rl_assets["prompts"][i], SamplingParams(max_tokens=max_tokens, temperature=0.0))
            for i in range(n)]


def _trainer(rl_assets, tmp_path, drafter_dir, **over) -> GRPOTrainer:
    return GRPOTrainer(cfg_for(rl_assets, tmp_path, drafter_init=drafter_dir, **over), progress=False)


def test_ray_rollouts_equal_the_local_executor_and_plain_greedy(ray_cluster, rl_assets, drafter_dir, tmp_path):
    """Greedy rollouts with speculation (drafter, adaptive K) through two rollout actors equal the local threads'
    and plain greedy decoding token for token; and after a GRPO step, the actors decode with the learner's new
    weights."""
    reqs = _greedy_requests(rl_assets)
    local = _trainer(rl_assets, tmp_path / "local", drafter_dir)
    remote = _trainer(rl_assets, tmp_path / "ray", drafter_dir, executor="ray")
    plain = _trainer(rl_assets, tmp_path / "plain", drafter_dir, speculation=False)
    try:
        want = plain.workers.run(reqs).responses
        got_local, got_ray = local.workers.run(reqs), remote.workers.run(reqs)
        assert got_ray.responses == got_local.responses == want
        assert all(want) and got_ray.spec.num_drafts > 0  # it speculated, and every response has tokens
        assert [w.num_requests for w in got_ray.workers] == [4, 4]
        # one GRPO step (sampled rollouts, an update on the learner), then new weights to the actors: their
        # speculative greedy output equals plain greedy decoding of the learner's updated policy in this process
        remote.train_step()
        learner_plain = RolloutWorkers(remote.policy, rl_assets["lm"].eos_token_ids, 2, 4, 512, 0, None)
        after = remote.workers.run(reqs).responses
        assert after == learner_plain.run(reqs).responses
        assert after != want  # lr 1e-3 moved the policy: the actors did load the learner's new weights
    finally:
        remote.close()


def test_quantized_rollout_actors_follow_the_learner(ray_cluster, rl_assets, drafter_dir, tmp_path):
    """rollout_quantize on Ray: each actor quantises its own copy and re-quantises the learner's float weights after
    an update; its speculative greedy output equals plain greedy decoding of a local quantised copy."""
    remote = _trainer(rl_assets, tmp_path / "ray", drafter_dir, executor="ray", rollout_quantize="int8")
    reqs = _greedy_requests(rl_assets)

    def local() -> list[list[int]]:
        return RolloutWorkers(remote.policy, rl_assets["lm"].eos_token_ids, 2, 4, 512, 0, None,
                              quantize="int8").run(reqs).responses

    try:
        before = remote.workers.run(reqs).responses
        assert before == local()
        remote.train_step()
        after = remote.workers.run(reqs).responses
        assert after == local() and after != before
    finally:
        remote.close()


def test_rollout_actors_use_a_fixed_rollout_k(ray_cluster, rl_assets, drafter_dir, tmp_path):
    t = _trainer(rl_assets, tmp_path, drafter_dir, executor="ray", steps=1, rollout_k=2)
    try:
        m = t.train_step()
        assert m["k_steps"] and set(m["k_steps"]) == {"2"} and m["spec"]["num_drafts"] > 0
        assert t.controller.state_dict() == {"kind": "fixed", "k": 2}
    finally:
        t.close()


def test_a_grpo_step_with_ray_workers_trains_the_drafter_on_idle_capacity(ray_cluster, rl_assets, drafter_dir, tmp_path):
    """Full TLT steps: from the second on there is buffer data, so the spot-trainer actor trains while the first
    worker to finish is idle; its drafter reaches the rollout actors and the controller state comes back from them.
    A spot actor that dies is replaced and training goes on."""
    t = _trainer(rl_assets, tmp_path, drafter_dir, executor="ray", steps=3, length_profile="long-tail", max_new_tokens=48)
    try:
        first, second, third = (t.train_step() for _ in range(3))
        assert first["spot_steps"] == 0  # no buffer yet at step 1
        for m in (first, second, third):
            assert m["rollout_tokens"] == sum(w["tokens"] for w in m["workers"])
            assert m["idle_fraction"] > 0 and m["rerun_requests"] == 0
        assert second["spec"]["num_drafts"] > 0 and "controller" in second
        lengths = sorted(len(r) for r in t.workers.run(t._requests([t.task.sample(t.rng)] * 4)[0]).responses)
        assert lengths[0] < lengths[-1]  # long-tail profile: the responses' lengths spread
        # A tail made to measure, so the idle window does not depend on sampled lengths: worker 0's share answers in
        # 1 token, worker 1's decodes 160. The spot trainer starts when worker 0 is idle and is stopped only when
        # worker 1 finishes, so it takes steps however loaded the machine is (both sides slow down together).
        tail = [RolloutRequest(rl_assets["prompts"][i], SamplingParams(max_tokens=1 if i % 2 == 0 else 160,
                                                                       temperature=0.0, ignore_eos=True))
                for i in range(8)]
        r = t.workers.run(tail, spot=t.spot)
        t.workers.sync(t.spot)  # collects the stint into r
        assert r.workers[1].busy_s > r.workers[0].busy_s  # worker 1 is the tail
        assert r.workers[0].spot_steps > 0 and r.workers[0].spot_train_s > 0  # trained on worker 0's idle capacity
        sd = t.spot.state_dict()
        assert sd["trainer"]["step"] == sum(m["spot_steps"] for m in (first, second, third)) + r.workers[0].spot_steps
        ray.kill(t.spot.actor)  # the spot trainer dies: a new one starts from the last synced drafter
        fourth = t.train_step()
        assert t.workers.replaced_spot == 1 and fourth["rerun_requests"] == 0
        assert t.spot.state_dict()["trainer"]["step"] == 0 and t.spot.has_data  # fresh optimizer, refilled buffer
    finally:
        t.close()


def test_the_warmup_picks_the_draft_vocabulary_for_the_ray_actors_too(ray_cluster, rl_assets, tmp_path):
    """A fresh drafter's vocabulary, chosen at warm-up, reaches the spot actor (read back from it) and the rollout
    actors, whose speculative greedy output still equals plain greedy decoding of the learner's policy."""
    tr = GRPOTrainer(cfg_for(rl_assets, tmp_path / "ray", executor="ray", steps=1, drafter_warmup_s=6.0,
                             drafter_vocab_size=24, rollout_k=2), progress=False)  # K fixed: it does draft
    try:
        tr.fit()
        vocab = tr.spot.drafter.draft_vocab  # the mirror, reloaded from the spot actor
        assert vocab.numel() == 24 and vocab.tolist() != list(range(24))
        assert set(tr.lm.eos_token_ids) <= set(vocab.tolist())
        reqs = _greedy_requests(rl_assets)
        got = tr.workers.run(reqs)
        learner_plain = RolloutWorkers(tr.policy, rl_assets["lm"].eos_token_ids, 2, 4, 512, 0, None)
        assert got.responses == learner_plain.run(reqs).responses and got.spec.num_drafts > 0
    finally:
        tr.close()


def test_a_rollout_worker_killed_mid_step_is_replaced_and_every_group_comes_back(ray_cluster, rl_assets, drafter_dir, tmp_path,
                                                                                 monkeypatch):
    """Worker 0 SIGKILLs itself after its first decode step: its whole share is decoded again on the other worker,
    the result equals a run without the fault (greedy), and a new actor serves worker 0 in the next step."""
    reqs = _greedy_requests(rl_assets)
    clean = _trainer(rl_assets, tmp_path / "clean", drafter_dir, executor="ray")
    try:
        want = clean.workers.run(reqs).responses
    finally:
        clean.close()
    monkeypatch.setenv(crashpoints.ENV, "rollout_worker@1")
    t = _trainer(rl_assets, tmp_path / "crash", drafter_dir, executor="ray")
    try:
        old_pid = ray.get(t.workers.actors[0].pid.remote())
        got = t.workers.run(reqs, step=1)
        assert got.rerun_requests == 4 and t.workers.replaced == 1
        assert got.responses == want  # every request answered, once, as without the fault
        assert got.workers[1].tokens == sum(len(r) for r in want)  # the survivor decoded both shares
        new_pid = ray.get(t.workers.actors[0].pid.remote())
        assert new_pid != old_pid
        again = t.workers.run(reqs, step=1)  # the replacement is not re-armed, and decodes its share itself
        assert again.rerun_requests == 0 and again.responses == want and again.workers[0].tokens > 0
        m = t.train_step()  # a whole GRPO step after the fault (step 1: the crash point is spent, not re-armed)
        assert m["rerun_requests"] == 0 and m["step"] == 1
    finally:
        t.close()


def test_a_learner_killed_mid_run_is_restarted_and_publishes_each_step_once(ray_cluster, rl_assets, drafter_dir, tmp_path,
                                                                              monkeypatch):
    """`understudy train` with Ray: the learner actor SIGKILLs itself just after publishing step 2's drafter (before
    its checkpoint); the driver restarts it from step 1's checkpoint; step 2 is not published again."""
    from understudy.trainer import ray_driver

    monkeypatch.setenv(crashpoints.ENV, "publish_after@2")
    cfg = cfg_for(rl_assets, tmp_path, executor="ray", steps=3, publish_every=1, checkpoint_every=1,
                  drafter_init=drafter_dir)
    out = ray_driver.train(cfg, progress=False)
    assert out["learner_restarts"] == 1 and out["final_step"] == 3
    everything = Registry.open(tmp_path / "reg", create=False).list_versions()
    drafters = [v for v in everything if v.kind == "drafter"]
    policies = {v.version: v for v in everything if v.kind == "policy"}
    assert [v.manifest["policy_version"] for v in drafters] == [1, 2, 3]  # each step once, none lost
    assert sorted(v.manifest["policy_version"] for v in policies.values()) == [1, 2, 3]
    assert [policies[v.policy].manifest["policy_version"] for v in drafters] == [1, 2, 3]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3]
    assert [x["published"]["drafter_version"] for x in lines[1:]] == [v.version for v in drafters]
