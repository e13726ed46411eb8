"""Lossless speculative decoding: greedy token-exactness (batched, ragged acceptance), KV cache after rejections,
continuous batching, stop conditions, aborts and drafter swaps."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import train_tiny_drafter
from understudy.drafter.model import Drafter, DrafterConfig, new_drafter
from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine, RequestError
from understudy.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def plain_engine(lm, batch=8, max_len=256):
    return Engine(lm.model, EngineConfig(max_batch_size=batch, max_model_len=max_len, num_speculative_tokens=0,
                                         dtype="float32"), lm.eos_token_ids)


@pytest.fixture(scope="module")
def trained_drafter(tiny_llama, tiny_prompts):
    """A drafter self-distilled for a few seconds on the tiny model's own greedy outputs (partial acceptance)."""
    return train_tiny_drafter(tiny_llama, tiny_prompts)


def test_greedy_speculative_equals_plain_token_for_token(tiny_llama, tiny_prompts, trained_drafter):
    lm = tiny_llama
    ref = plain_engine(lm).generate(tiny_prompts, GREEDY)
    eng = Engine(lm.model, EngineConfig(max_batch_size=8, max_model_len=256, num_speculative_tokens=4, dtype="float32"),
                 lm.eos_token_ids, drafter=trained_drafter)
    ragged_steps = 0
    outs = {i: [] for i in range(len(tiny_prompts))}
    for i, p in enumerate(tiny_prompts):
        eng.add_request(str(i), p, GREEDY)
    while eng.has_unfinished():
        before = eng.stats.num_accepted_tokens
        for o in eng.step():
            outs[int(o.request_id)].extend(o.new_token_ids)
        spec = eng.last_step.spec
        if spec.num_drafts >= 2 and 0 < spec.num_accepted_tokens < spec.num_draft_tokens:
            ragged_steps += 1
        assert eng.stats.num_accepted_tokens >= before
    assert len(tiny_prompts) >= 20
    for i in range(len(tiny_prompts)):
        assert outs[i] == ref[i], f"prompt {i}: speculative output diverged from plain greedy decoding"
    # the check must exercise partial acceptance, or it proves nothing about ragged batches
    assert eng.stats.num_accepted_tokens > 0
    assert 0 < eng.stats.acceptance_rate < 1
    assert ragged_steps > 0


def test_ngram_greedy_equals_plain(tiny_llama, tiny_prompts):
    lm = tiny_llama
    ref = plain_engine(lm).generate(tiny_prompts, GREEDY)
    eng = Engine(lm.model, EngineConfig(max_batch_size=8, max_model_len=256, num_speculative_tokens=3,
                                        proposer="ngram", dtype="float32"), lm.eos_token_ids)
    assert eng.generate(tiny_prompts, GREEDY) == ref
    assert eng.stats.num_draft_tokens > 0


def test_kv_cache_is_correct_after_rejections(tiny_llama, tiny_prompts):
    """With an untrained drafter nearly every draft is rejected; the cache must still equal a fresh prefill."""
    lm = tiny_llama
    d = new_drafter(lm.model, lm.fingerprint, seed=1)
    eng = Engine(lm.model, EngineConfig(max_batch_size=4, max_model_len=128, num_speculative_tokens=4, dtype="float32"),
                 lm.eos_token_ids, drafter=d)
    prompts = tiny_prompts[:3]
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    for _ in range(6):
        eng.step()
    assert eng.stats.num_draft_tokens > eng.stats.num_accepted_tokens  # rejections happened
    fresh = lm.model.allocate_cache(1, 128)
    for seq in eng.running:
        n = len(seq.token_ids) - 1  # positions 0..n-1 are in the cache
        with torch.inference_mode():
            lm.model(torch.tensor([seq.token_ids[:n]]), torch.arange(n).unsqueeze(0), fresh, n)
        for layer in range(lm.config.num_layers):
            torch.testing.assert_close(eng.cache.k[layer][seq.slot, :, :n], fresh.k[layer][0, :, :n], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(eng.cache.v[layer][seq.slot, :, :n], fresh.v[layer][0, :, :n], atol=1e-5, rtol=1e-4)


def test_continuous_batching_join_leave_and_abort(tiny_llama, tiny_prompts, trained_drafter):
    lm = tiny_llama
    ref = plain_engine(lm).generate(tiny_prompts[:6], GREEDY)
    eng = Engine(lm.model, EngineConfig(max_batch_size=3, max_model_len=256, num_speculative_tokens=3, dtype="float32"),
                 lm.eos_token_ids, drafter=trained_drafter)
    outs: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    for i in range(3):
        eng.add_request(str(i), tiny_prompts[i], GREEDY)
    eng.add_request("victim", tiny_prompts[10], GREEDY)
    steps = 0
    while eng.has_unfinished():
        if steps == 2:  # requests join mid-flight, one is aborted while queued or running
            for i in range(3, 6):
                eng.add_request(str(i), tiny_prompts[i], GREEDY)
            eng.abort("victim")
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finished[o.request_id] = o.finish_reason
        assert eng.num_running <= 3
        steps += 1
    for i in range(6):
        assert outs[str(i)] == ref[i]
        assert finished[str(i)] == "length"
    assert "victim" not in finished
    assert eng.num_running == 0 and not eng._done


def test_stop_token_and_max_tokens(tiny_llama, tiny_prompts, trained_drafter):
    lm = tiny_llama
    ref = plain_engine(lm).generate([tiny_prompts[0]], GREEDY)[0]
    stop_tok = ref[7]
    first = ref.index(stop_tok)
    eng = Engine(lm.model, EngineConfig(max_batch_size=2, max_model_len=256, num_speculative_tokens=4, dtype="float32"),
                 lm.eos_token_ids, drafter=trained_drafter)
    out = eng.generate([tiny_prompts[0]], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                         stop_token_ids=(stop_tok,)))[0]
    assert out == ref[:first + 1]
    out = eng.generate([tiny_prompts[0]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert out == ref[:5]


def test_drafter_swap_between_steps_keeps_output_exact(tiny_llama, tiny_prompts, trained_drafter):
    lm = tiny_llama
    ref = plain_engine(lm).generate(tiny_prompts[:4], GREEDY)
    other = new_drafter(lm.model, lm.fingerprint, seed=5)
    eng = Engine(lm.model, EngineConfig(max_batch_size=4, max_model_len=256, num_speculative_tokens=3, dtype="float32"),
                 lm.eos_token_ids, drafter=other)
    outs: dict[str, list[int]] = {}
    for i in range(4):
        eng.add_request(str(i), tiny_prompts[i], GREEDY)
    gen0 = eng.drafter_generation
    steps = 0
    while eng.has_unfinished():
        if steps == 3:
            eng.set_drafter(trained_drafter)
        if steps == 6:
            eng.set_drafter(None)  # speculation off mid-flight
        if steps == 8:
            eng.set_drafter(trained_drafter)  # and back on: full catch-up from position 0
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        steps += 1
    assert eng.drafter_generation == gen0 + 3
    assert [outs[str(i)] for i in range(4)] == ref


def test_logprobs_match_plain(tiny_llama, tiny_prompts, trained_drafter):
    lm = tiny_llama
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)

    def run(eng):
        eng.add_request("x", tiny_prompts[1], sp)
        lps = []
        while eng.has_unfinished():
            for o in eng.step():
                lps.extend(o.logprobs or [])
        return lps

    a = run(plain_engine(lm))
    b = run(Engine(lm.model, EngineConfig(max_batch_size=2, max_model_len=256, num_speculative_tokens=4,
                                          dtype="float32"), lm.eos_token_ids, drafter=trained_drafter))
    assert len(a) == len(b) == 12
    for x, y in zip(a, b, strict=True):
        assert x.token_id == y.token_id
        assert abs(x.logprob - y.logprob) < 1e-4
        assert [t for t, _ in x.top] == [t for t, _ in y.top] and len(x.top) == 3
        assert x.top[0][1] >= x.top[1][1] >= x.top[2][1]


def test_bad_requests_are_refused_with_the_field(tiny_llama):
    eng = plain_engine(tiny_llama, max_len=64)
    with pytest.raises(RequestError, match="empty") as e:
        eng.add_request("a", [], GREEDY)
    assert e.value.param == "prompt"
    with pytest.raises(RequestError, match="maximum context length") as e:
        eng.add_request("b", [5] * 60, SamplingParams(max_tokens=10))
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestError, match=r"\[0, "):
        eng.add_request("c", [10**6], GREEDY)
    eng.add_request("d", [5, 6], GREEDY)
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request("d", [5, 6], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_swap_to_reduced_vocab_drafter_inside_a_step(tiny_llama, tiny_prompts):
    """Regression: a swap is applied inside `step()` (inference mode); binding a reduced draft vocabulary there
    made its LM-head rows an inference tensor, and the pre-packed Linear then failed on every draft step."""
    lm = tiny_llama
    ref = plain_engine(lm).generate(tiny_prompts[:2], GREEDY)
    V = lm.config.vocab_size
    reduced = Drafter(DrafterConfig(target=lm.config, family_fingerprint=lm.fingerprint, draft_vocab_size=V // 2))
    reduced.set_draft_vocab(torch.randperm(V, generator=torch.Generator().manual_seed(0))[: V // 2].sort().values)
    eng = Engine(lm.model, EngineConfig(max_batch_size=2, max_model_len=256, num_speculative_tokens=3, dtype="float32"),
                 lm.eos_token_ids, drafter=new_drafter(lm.model, lm.fingerprint, seed=5))
    for i in range(2):
        eng.add_request(str(i), tiny_prompts[i], GREEDY)
    outs: dict[str, list[int]] = {}
    steps = 0
    while eng.has_unfinished():
        if steps == 2:
            eng.set_drafter(reduced)
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        steps += 1
    assert eng.stats.num_drafts > 0
    assert [outs[str(i)] for i in range(2)] == ref


def test_controller_is_not_charged_for_catch_up_after_an_off_stretch(tiny_llama, tiny_prompts, trained_drafter,
                                                                      monkeypatch):
    """The K>0 pull after a K=0 stretch pays the drafter's catch-up; the bandit must see the arm's own cost."""
    import time as _time

    from understudy.engine import drafter_proposer as dp

    lm = tiny_llama
    original = dp.DrafterProposer._catch_up_long_rows

    def slow_catch_up(self, batch):  # make a long catch-up unmistakable: +2 s whenever a row is far behind
        if any(n - 2 - self.drafter_len[b] > dp.LONG_CATCH_UP for b, n in enumerate(batch.num_tokens)):
            _time.sleep(2.0)
        return original(self, batch)

    monkeypatch.setattr(dp.DrafterProposer, "_catch_up_long_rows", slow_catch_up)

    class Scripted:  # off for 30 steps, then K=3; records what the engine reports
        def __init__(self):
            self.steps, self.seen = 0, []

        def choose(self, batch_size):
            self.steps += 1
            return 0 if self.steps <= 30 else 3

        def observe(self, batch_size, k, num_tokens, seconds):
            self.seen.append((k, seconds))

    ctrl = Scripted()
    eng = Engine(lm.model, EngineConfig(max_batch_size=1, max_model_len=256, num_speculative_tokens=3, dtype="float32"),
                 lm.eos_token_ids, drafter=trained_drafter, controller=ctrl)
    out = eng.generate([tiny_prompts[0]], SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))[0]
    assert out == plain_engine(lm).generate([tiny_prompts[0]], SamplingParams(max_tokens=60, temperature=0.0,
                                                                               ignore_eos=True))[0]
    switch = next(i for i, (k, _) in enumerate(ctrl.seen) if k == 3)
    assert switch >= 29 and all(k == 0 for k, _ in ctrl.seen[:switch])
    # the 2 s catch-up is not charged to K=3 (a tiny-model step takes milliseconds, even on a loaded machine)
    assert ctrl.seen[switch][1] < 2.0, ctrl.seen[switch]


def test_long_prefills_run_on_prefill_threads_and_decoding_goes_back_to_its_own(tiny_llama, monkeypatch):
    """EngineConfig.prefill_threads: a prefill longer than the fused path takes (a compute-bound GEMM) runs on
    more threads; decode steps (bound by reading the weights) and short prefills stay on num_threads."""
    lm, real, seen = tiny_llama, torch.set_num_threads, []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n))[1])
    long_prompt, short_prompt = [5 + i % 50 for i in range(60)], [5, 6, 7]
    outs = {}
    for pt in (0, 2):
        seen.clear()
        eng = Engine(lm.model, EngineConfig(max_batch_size=1, max_model_len=128, num_speculative_tokens=0,
                                            dtype="float32", num_threads=1, prefill_threads=pt), lm.eos_token_ids)
        outs[pt] = eng.generate([long_prompt, short_prompt], SamplingParams(max_tokens=8, temperature=0.0,
                                                                             ignore_eos=True))
        assert seen == ([1] if pt == 0 else [1, 2, 1])  # set at start; the long prompt only; back to 1
        assert torch.get_num_threads() == 1
    assert outs[0] == outs[2]
    with pytest.raises(ValueError, match="prefill_threads"):
        EngineConfig(prefill_threads=-1)
