"""Hot-swap manager logic without a server process: which drafter a server starts with when its followed alias
points at a version made for another target (a registry shared by several targets), and what happens when the
engine fails while a drafter serves (it is taken out of service; the server keeps answering, plain)."""

from __future__ import annotations

import pytest

from understudy.drafter.model import Drafter, load_drafter
from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine
from understudy.engine.sampling import SamplingParams
from understudy.registry.store import Registry, RegistryError
from understudy.server.backends.native import HotSwapManager
from understudy.server.hotswap import InitialDrafter, choose_initial_drafter
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
