"""Hot-swap manager logic without a server process: which drafter a server starts with when its followed alias
points at a version made for another target (a registry shared by several targets), what happens when the
engine fails while a drafter serves (it is taken out of service; the server keeps answering, plain), and target +
drafter pairs (the policy installed with its drafter, drift refused, the canary rolling back both halves)."""

from __future__ import annotations

import pytest

from understudy.drafter.model import Drafter, load_drafter
from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine
from understudy.engine.sampling import SamplingParams
from understudy.registry.store import Registry, RegistryError
from understudy.server.backends.native import HotSwapManager
from understudy.server.hotswap import InitialDrafter, SwapError, choose_initial_drafter
from understudy.server.metrics import ServerMetrics


def test_followed_alias_on_another_family_falls_back_to_newest_compatible(server_assets, tmp_path):
    lm = server_assets["lm"]
    reg = Registry.open(tmp_path / "reg")
    v1 = reg.publish(server_assets["good"]).version
    v2 = reg.publish(server_assets["garbage"]).version  # same family: the newest compatible one
    v3 = reg.publish(server_assets["other"]).version  # another family: `latest` now points here
    assert reg.resolve("latest") == v3
    with pytest.raises(RegistryError):
        reg.checkout(v3, lm.fingerprint)
    first = choose_initial_drafter(None, lm.fingerprint, reg, "latest")
    assert (first.label, first.version) == (str(v2), v2)
    assert isinstance(load_drafter(first.path, lm.model, lm.fingerprint), Drafter)
    assert v1 < v2


def test_no_compatible_version_serves_without_drafter(server_assets, tmp_path):
    reg = Registry.open(tmp_path / "reg")
    reg.publish(server_assets["other"])
    assert choose_initial_drafter(None, server_assets["lm"].fingerprint, reg, "latest") == InitialDrafter(
        "none", None, None)


def test_explicit_foreign_version_is_refused_not_replaced(server_assets, tmp_path):
    reg = Registry.open(tmp_path / "reg")
    reg.publish(server_assets["good"])
    v2 = reg.publish(server_assets["other"]).version
    with pytest.raises(RegistryError, match=r"fingerprint|family"):
        choose_initial_drafter(str(v2), server_assets["lm"].fingerprint, reg, "latest")


def test_a_faulty_drafter_is_taken_out_of_service_and_its_request_still_succeeds(server_assets):
    """The drafter raises inside every draft step: the engine runs that step without drafts (so the request is
    unharmed and exact), reports the fault, and the manager takes the drafter out and marks it."""
    lm = server_assets["lm"]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompt = lm.tokenizer.encode("grid line flow risk")
    cfg = EngineConfig(max_batch_size=2, max_model_len=128, num_speculative_tokens=3, dtype="float32")
    plain = EngineConfig(max_batch_size=2, max_model_len=128, num_speculative_tokens=0, dtype="float32")
    ref = Engine(lm.model, plain, lm.eos_token_ids).generate([prompt], greedy)[0]
    drafter = load_drafter(server_assets["good"], lm.model, lm.fingerprint)
    eng = Engine(lm.model, cfg, lm.eos_token_ids, drafter=drafter)
    metrics = ServerMetrics("tiny")
    mgr = HotSwapManager(eng, lm, metrics, registry=None, wake=lambda: None, follow=None)
    mgr.set_initial("path:good", None, drafter)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated drafter fault")

    drafter.draft_logits = broken  # every draft step now raises inside engine.step()
    eng.add_request("a", prompt, greedy)
    got, faults = [], []
    while eng.has_unfinished():
        for o in eng.step():
            assert o.error is None
            got.extend(o.new_token_ids)
        if eng.last_step.drafter_fault:
            faults.append(eng.last_step.drafter_fault)
            mgr.on_step(eng.last_step, [], {}, 0.0)
    assert got == ref, "the request must not pay for the drafter's fault"
    assert faults and "simulated drafter fault" in faults[0]
    state = mgr.state()
    assert state["version"] == "none"
    assert state["history"][-1]["result"] == "rolled_back" and "simulated drafter fault" in state["history"][-1]["reason"]
    assert b'version="none"' in metrics.render()
    out = eng.generate([prompt], greedy)[0]  # the swap to "no drafter" applies at the next step: plain, exact
    assert eng.drafter is None and out == ref


# ---- target + drafter pairs (issue 13) ---------------------------------------------------------------------------
def publish_pair(reg: Registry, assets, held_out: float | None = None,  # type: ignore[no-untyped-def]
                 positions: list[float] | None = None) -> tuple[int, int]:
    plm = assets["policy_lm"]
    p = reg.publish_policy(assets["policy"], family_fingerprint=plm.fingerprint,
                           target=plm.config.family_shape()).version
    metrics: dict | None = {"heldout_acceptance_length": held_out} if held_out is not None else None  # type: ignore[type-arg]
    if positions is not None:
        metrics = {**(metrics or {}), "per_position_acceptance": positions}
    return p, reg.publish(assets["policy_drafter"], policy=p, metrics=metrics).version


class Stepper:
    """The engine thread, as the server runs it: step while there is work."""

    def __init__(self, eng: Engine) -> None:
        import threading

        self.eng, self.stop = eng, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import time

        while not self.stop.is_set():
            if self.eng.has_unfinished():
                self.eng.step()
            else:
                time.sleep(0.002)


def test_a_server_starts_on_the_pair_its_alias_names(server_assets, tmp_path):
    lm = server_assets["lm"]
    reg = Registry.open(tmp_path / "reg")
    reg.publish(server_assets["good"])
    p, d = publish_pair(reg, server_assets)
    first = choose_initial_drafter(None, lm.fingerprint, reg, "latest")
    assert (first.version, first.policy, first.policy_path) == (d, p, reg.version_path(p))
    reg.promote(d, "drift", policy=None, allow_drift=True)
    with pytest.raises(SwapError, match=r"trained against policy .* refused"):
        choose_initial_drafter("drift", lm.fingerprint, reg, None)
    assert choose_initial_drafter("drift", lm.fingerprint, reg, None, allow_drift=True).policy is None


def test_pair_swaps_install_the_policy_refuse_drift_and_the_canary_rolls_back_both(server_assets, tmp_path):
    lm, plm = server_assets["lm"], server_assets["policy_lm"]
    reg = Registry.open(tmp_path / "reg")
    d1 = reg.publish(server_assets["good"]).version
    p, d2 = publish_pair(reg, server_assets, held_out=2.0)
    cfg = EngineConfig(max_batch_size=2, max_model_len=128, num_speculative_tokens=3, dtype="float32")
    eng = Engine(lm.model, cfg, lm.eos_token_ids, drafter=load_drafter(server_assets["good"], lm.model, lm.fingerprint))
    metrics = ServerMetrics("tiny")
    mgr = HotSwapManager(eng, lm, metrics, reg, wake=lambda: None, canary_window=8, canary_margin=0.5)
    mgr.set_initial(str(d1), d1, eng.drafter, policy=None, target=lm)
    stepper = Stepper(eng)
    try:
        mgr._swap_to(d1, "drift", policy=p)  # a base-model drafter paired with policy p: refused, nothing changes
        assert mgr.history[-1].result == "failed" and "trained against policy base" in mgr.history[-1].reason
        assert (mgr.served.version, mgr.served.policy, eng.epoch) == (d1, None, 0)

        mgr._swap_to(d2, "alias moved", policy=p)
        assert (mgr.served.version, mgr.served.policy, eng.epoch, eng.policy_label) == (d2, p, 1, str(p))
        greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        prompt = lm.tokenizer.encode("grid line flow risk")
        plain = EngineConfig(max_batch_size=2, max_model_len=128, num_speculative_tokens=0, dtype="float32")
        ref = Engine(plm.model, plain, plm.eos_token_ids).generate([prompt], greedy)[0]
        assert ref != Engine(lm.model, plain, lm.eos_token_ids).generate([prompt], greedy)[0]
        assert eng.model is not lm.model and eng.model.config == plm.model.config
        assert f'understudy:policy_info{{model_name="tiny",version="{p}"}} 1.0' in metrics.render().decode()

        # another policy: the pair is judged against its own held-out acceptance (2.0), not the previous pair's
        # live figure (another policy's); its drafter then accepts nothing over a full window
        assert mgr.canary["baseline"] == 2.0  # type: ignore[index]
        mgr._observe(8, 0)
        mgr._check_canary()
        assert (mgr.served.version, mgr.served.policy, eng.epoch, eng.model is lm.model) == (d1, None, 2, True)
        assert d2 in mgr.rejected and mgr.history[-1].result == "rolled_back"
        assert (mgr.history[-1].to_policy, mgr.history[-1].from_policy) == ("base", str(p))
    finally:
        stepper.stop.set()
        stepper.thread.join(5)


def test_the_canary_judges_a_new_policy_at_the_draft_lengths_it_served(server_assets, tmp_path):
    """A pair for another policy is judged against its manifest's held-out acceptance taken at the draft lengths
    the server drafted: the trainer measured L(4) = 3.1 (q = 0.8, 0.6, 0.45, 0.25), the adaptive controller drafts
    K=2, where 1 + 0.8 + 0.6 = 2.4 is the most the same drafter can show. A live 2.3 at K=2 keeps the pair (the
    bare L(4) would have rolled it back); a live 1.5 at K=2 rolls it back."""
    lm = server_assets["lm"]
    reg = Registry.open(tmp_path / "reg")
    d1 = reg.publish(server_assets["good"]).version
    q = [0.8, 0.6, 0.45, 0.25]
    p, d2 = publish_pair(reg, server_assets, held_out=1 + sum(q), positions=q)
    cfg = EngineConfig(max_batch_size=2, max_model_len=128, num_speculative_tokens=4, dtype="float32")
    eng = Engine(lm.model, cfg, lm.eos_token_ids, drafter=load_drafter(server_assets["good"], lm.model, lm.fingerprint))
    mgr = HotSwapManager(eng, lm, ServerMetrics("tiny"), reg, wake=lambda: None, canary_window=100, canary_margin=0.3)
    mgr.set_initial(str(d1), d1, eng.drafter, policy=None, target=lm)
    stepper = Stepper(eng)
    try:
        mgr._swap_to(d2, "alias moved", policy=p)
        assert mgr.canary["baseline_positions"] == q  # type: ignore[index]
        for _ in range(10):  # 100 drafts of 2 tokens, 130 accepted: live L 2.3
            mgr._observe(10, 13, 20)
        mgr._check_canary()
        assert mgr.served.version == d2 and mgr.history[-1].result == "success", mgr.history[-1]

        mgr._swap_to(d1, "operator", policy=None)  # back to the base pair, then the same pair again
        mgr._swap_to(d2, "alias moved", policy=p)
        for _ in range(10):  # live L 1.5 at K=2, 0.9 below the 2.4 it should reach there
            mgr._observe(10, 5, 20)
        mgr._check_canary()
        assert mgr.served.version == d1 and mgr.history[-1].result == "rolled_back"
        assert "held-out acceptance at the draft lengths served 2.40" in mgr.history[-1].reason, mgr.history[-1]
    finally:
        stepper.stop.set()
        stepper.thread.join(5)
