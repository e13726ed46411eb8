"""Policy swaps in the engine (issue 13): new target weights and their drafter are installed between two steps,
after a drain. Requests added before the swap finish on the old weights, requests added after it run on the new
ones, and greedy outputs equal each policy's own plain outputs token for token."""

from __future__ import annotations

import pytest

from understudy.drafter.model import new_drafter
from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine
from understudy.engine.loader import load_model
from understudy.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)


def engine(model, drafter=None, k=3):
    return Engine(model, EngineConfig(max_batch_size=3, max_model_len=256, num_speculative_tokens=k,
                                      dtype="float32"), (), drafter=drafter)


@pytest.fixture(scope="module")
def policy_b(tiny_llama_policy_dir):
    return load_model(str(tiny_llama_policy_dir), dtype="float32")


def test_requests_finish_on_the_weights_they_started_with(tiny_llama, policy_b, tiny_prompts):
    a, b = tiny_llama, policy_b
    assert a.fingerprint == b.fingerprint  # one family: a drafter may follow the policy from one to the other
    old_p, new_p = tiny_prompts[:5], tiny_prompts[5:9]
    ref_a = engine(a.model, k=0).generate(old_p, GREEDY)
    ref_b = engine(b.model, k=0).generate(new_p, GREEDY)
    assert ref_a != engine(b.model, k=0).generate(old_p, GREEDY)  # the policies really differ

    eng = engine(a.model, new_drafter(a.model, a.fingerprint, seed=3))
    for i, p in enumerate(old_p):  # 5 requests, 3 slots: two of them wait, and still run on the old weights
        assert eng.add_request(f"old{i}", p, GREEDY) == 0
    outs: dict[str, list[int]] = {}
    first_new_at, last_old_at, step = None, None, 0
    for _ in range(2):
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        step += 1
    assert eng.set_policy(b.model, new_drafter(b.model, b.fingerprint, seed=4), label="v7") == 1
    for i, p in enumerate(new_p):
        assert eng.add_request(f"new{i}", p, GREEDY) == 1
    assert eng.policy_label is None and eng.policy_labels[1] == "v7"
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.request_id.startswith("new") and first_new_at is None:
                first_new_at = step
                assert eng.epoch == 1
            if o.request_id.startswith("old"):
                last_old_at = step
                assert eng.epoch == 0
        step += 1
    assert last_old_at < first_new_at  # a drain, not a mix
    assert [outs[f"old{i}"] for i in range(5)] == ref_a
    assert [outs[f"new{i}"] for i in range(4)] == ref_b
    assert eng.epoch == 1 and eng.policy_label == "v7" and eng.model is b.model


def test_an_idle_engine_swaps_at_its_next_step_and_two_swaps_queue_in_order(tiny_llama, policy_b, tiny_prompts):
    a, b = tiny_llama, policy_b
    eng = engine(a.model, k=0)
    eng.set_policy(b.model, None, "b")
    eng.set_policy(a.model, None, "a")
    assert eng.has_unfinished()  # pending swaps keep the engine stepping until they are in
    eng.step()
    assert (eng.epoch, eng.policy_label, eng.model is a.model, eng.has_unfinished()) == (2, "a", True, False)


def test_a_policy_of_other_shapes_is_refused_and_changes_nothing(tiny_llama, tmp_path):
    from tests.conftest import build_tiny_hf

    other = load_model(str(build_tiny_hf(tmp_path / "wide", "llama", hidden_size=32)), dtype="float32")
    eng = engine(tiny_llama.model, k=0)
    with pytest.raises(ValueError, match="needs the served model's shapes"):
        eng.set_policy(other.model, None, "x")
    assert (eng.epoch, eng._epoch_next, eng.has_unfinished()) == (0, 0, False)
