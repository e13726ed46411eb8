"""One request never harms another, and the drafter is blamed only when the step succeeds without it.

Each test puts one faulty thing into a batch (a request whose distribution cannot be sampled, a drafter that
raises, a drafter that sends NaN probabilities, a verify that fails only with drafts) and checks that the
batch-mates finish with exactly the tokens they get alone, that the faulty request fails alone with a reason,
and what the step reports as the drafter's fault.
"""

from __future__ import annotations

import pytest
import torch

from understudy.drafter.model import new_drafter
from understudy.engine import engine as engine_mod
from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine
from understudy.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)


def engine(lm, k=0, drafter=None, batch=4):
    cfg = EngineConfig(max_batch_size=batch, max_model_len=128, num_speculative_tokens=k, dtype="float32")
    return Engine(lm.model, cfg, lm.eos_token_ids, drafter=drafter)


def run(eng: Engine, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Drive to completion; per request: (tokens, error); and every drafter fault the steps reported."""
    for rid, (p, s) in requests.items():
        eng.add_request(rid, p, s)
    toks = {rid: [] for rid in requests}
    errors: dict[str, str | None] = dict.fromkeys(requests)
    faults = []
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id].extend(o.new_token_ids)
            if o.error is not None:
                assert o.finished and o.finish_reason == "error"
                errors[o.request_id] = o.error
        if eng.last_step.drafter_fault:
            faults.append(eng.last_step.drafter_fault)
    return toks, errors, faults


def poisoned(params: SamplingParams, **fields) -> SamplingParams:
    """Parameters that slipped past validation (as a bug elsewhere could let through): set fields raw."""
    for k, v in fields.items():
        object.__setattr__(params, k, v)
    return params


def alone(lm, prompt, params):
    return run(engine(lm), {"x": (prompt, params)})[0]["x"]


@pytest.mark.parametrize("k", [0, 3])
def test_a_request_whose_distribution_is_nan_fails_alone(tiny_llama, tiny_prompts, k):
    lm = tiny_llama
    bad = poisoned(SamplingParams(max_tokens=12, temperature=0.5, ignore_eos=True), temperature=float("nan"))
    drafter = new_drafter(lm.model, lm.fingerprint, seed=0) if k else None
    toks, errors, _ = run(engine(lm, k=k, drafter=drafter), {
        "greedy": (tiny_prompts[0], GREEDY), "bad": (tiny_prompts[1], bad), "sampled": (tiny_prompts[2], SAMPLED)})
    assert errors["bad"] is not None and errors["greedy"] is None and errors["sampled"] is None
    assert toks["greedy"] == alone(lm, tiny_prompts[0], GREEDY)
    assert len(toks["sampled"]) == SAMPLED.max_tokens


def test_a_request_that_fails_in_decode_does_not_stop_its_batch_mates(tiny_llama, tiny_prompts):
    """Valid at prefill (greedy), then its row turns un-samplable mid-generation: it fails there, alone."""
    # (A denormal temperature, the cause of the old 500 for the whole batch, is now greedy by validation and
    # harmless in the sampler anyway: test_sampling_properties.py.)
    lm = tiny_llama
    eng = engine(lm)
    eng.add_request("ok", tiny_prompts[0], GREEDY)
    eng.add_request("turns-bad", tiny_prompts[1], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    toks, errors = {"ok": [], "turns-bad": []}, {}
    for o in eng.step():  # both prefilled (and one decode step)
        toks[o.request_id].extend(o.new_token_ids)
    seq = next(s for s in eng.running if s.request_id == "turns-bad")
    poisoned(seq.sampling, temperature=float("nan"))  # NaN probabilities from here on
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id].extend(o.new_token_ids)
            if o.error:
                errors[o.request_id] = o.error
    assert "turns-bad" in errors and "ok" not in errors
    assert toks["ok"] == alone(lm, tiny_prompts[0], GREEDY)


def test_a_drafter_that_raises_is_blamed_and_the_step_runs_without_it(tiny_llama, tiny_prompts):
    lm = tiny_llama
    drafter = new_drafter(lm.model, lm.fingerprint, seed=0)

    def broken(*a, **kw):
        raise RuntimeError("drafter exploded")

    drafter.draft_logits = broken
    toks, errors, faults = run(engine(lm, k=3, drafter=drafter), {
        "a": (tiny_prompts[0], GREEDY), "b": (tiny_prompts[1], GREEDY)})
    assert errors == {"a": None, "b": None}
    assert toks["a"] == alone(lm, tiny_prompts[0], GREEDY) and toks["b"] == alone(lm, tiny_prompts[1], GREEDY)
    assert faults and "drafter exploded" in faults[0]


def test_a_drafter_sending_nan_probabilities_is_rejected_losslessly(tiny_llama, tiny_prompts):
    """Sampled rows: q = NaN is treated as q = 0 (nothing accepted, the token comes from p), and reported."""
    lm = tiny_llama
    drafter = new_drafter(lm.model, lm.fingerprint, seed=0)
    real = drafter.draft_logits
    drafter.draft_logits = lambda h: torch.full_like(real(h), float("nan"))
    toks, errors, faults = run(engine(lm, k=3, drafter=drafter), {
        "s": (tiny_prompts[0], SAMPLED), "g": (tiny_prompts[1], GREEDY)})
    assert errors == {"s": None, "g": None}
    assert len(toks["s"]) == SAMPLED.max_tokens
    assert toks["g"] == alone(lm, tiny_prompts[1], GREEDY)
    assert faults and "probability" in faults[0]  # multinomial refused q while drafting: propose raised


def test_a_non_finite_draft_distribution_is_treated_as_q_zero(tiny_llama):
    """A proposer that returns NaN q without raising: nothing is accepted, the token is drawn from p (exactly
    what q = 0 means in the acceptance rule), and the result names the fault."""
    from understudy.engine.proposer import BatchState, DraftProposal
    from understudy.engine.rejection_sampler import rejection_sample

    V, k = tiny_llama.model.config.vocab_size, 2
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, k + 1, V, generator=g)
    batch = BatchState(token_ids=[[1, 2], [3, 4]], num_tokens=[2, 2], temperature=torch.tensor([0.7, 0.7]),
                       top_k=torch.tensor([0, 0]), top_p=torch.tensor([1.0, 1.0]),
                       generators=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    probs = torch.softmax(torch.randn(2, k, V, generator=g), dim=-1)
    probs[1] = float("nan")
    proposal = DraftProposal(token_ids=torch.tensor([[3, 4], [5, 6]]), num_drafts=torch.tensor([k, k]), probs=probs)
    r = rejection_sample(logits, proposal, batch)
    assert r.failed == {} and r.num_accepted[1] == 0 and len(r.tokens[1]) == 1
    assert r.draft_fault is not None and "non-finite" in r.draft_fault


def test_verify_failing_only_with_drafts_blames_the_drafter(tiny_llama, tiny_prompts, monkeypatch):
    lm = tiny_llama
    real_verify = engine_mod.verify

    def verify_that_fails_with_drafts(model, cache, batch, proposal):
        if proposal.k > 0:
            raise RuntimeError("bad draft shape")
        return real_verify(model, cache, batch, proposal)

    monkeypatch.setattr(engine_mod, "verify", verify_that_fails_with_drafts)
    toks, errors, faults = run(engine(lm, k=2, drafter=new_drafter(lm.model, lm.fingerprint, seed=0)),
                               {"a": (tiny_prompts[0], GREEDY)})
    assert errors == {"a": None}
    monkeypatch.setattr(engine_mod, "verify", real_verify)
    assert toks["a"] == alone(lm, tiny_prompts[0], GREEDY)
    assert faults and all("bad draft shape" in f for f in faults)


def test_a_step_that_fails_without_drafts_too_is_not_the_drafters_fault(tiny_llama, tiny_prompts, monkeypatch):
    lm = tiny_llama

    def always_fails(model, cache, batch, proposal):
        raise RuntimeError("engine bug")

    eng = engine(lm, k=2, drafter=new_drafter(lm.model, lm.fingerprint, seed=0))
    eng.add_request("a", tiny_prompts[0], GREEDY)
    eng.step()  # prefill
    monkeypatch.setattr(engine_mod, "verify", always_fails)
    with pytest.raises(RuntimeError, match="engine bug"):
        eng.step()
    assert eng.last_step.drafter_fault is None


def test_logit_bias_steers_greedy_output_and_speculation_stays_exact(tiny_llama, tiny_prompts):
    lm = tiny_llama
    target = 5
    biased = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logit_bias=((target, 100.0),))
    plain = run(engine(lm), {"x": (tiny_prompts[0], biased)})[0]["x"]
    assert plain == [target] * 8
    spec = run(engine(lm, k=3, drafter=new_drafter(lm.model, lm.fingerprint, seed=0)),
               {"x": (tiny_prompts[0], biased)})[0]["x"]
    assert spec == plain
