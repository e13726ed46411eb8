"""Grammar-constrained decoding (response_format) in the engine: outputs parse and validate, speculation stays
lossless under the grammar (greedy token-exact with n-gram and drafter proposers, the sampled acceptance rule
with masked targets by chi-square), unconstrained batch-mates are untouched, and bad grammars fail alone."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from scipy.stats import chisquare

from tests.conftest import train_tiny_drafter
from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine, RequestError
from understudy.engine.proposer import BatchState, DraftProposal
from understudy.engine.rejection_sampler import rejection_sample
from understudy.engine.sampling import SamplingParams
from understudy.engine.structured import (
    GrammarError,
    StructuredOutputs,
    allowed_from_bitmask,
    apply_bitmask,
    new_bitmask,
)
from understudy.trainer.tasks.grid_risk import answer_schema

# The grid-risk answer as a tool would parse it (docs/structured-output.md)
GRID_SCHEMA = answer_schema()
MAX_TOKENS = 160


def engine(lm, k=0, proposer="auto", drafter=None, batch=8):
    return Engine(lm.model, EngineConfig(max_batch_size=batch, max_model_len=256, num_speculative_tokens=k,
                                         proposer=proposer, dtype="float32"), lm.eos_token_ids, drafter=drafter)


def run(eng, prompts, params):
    """Run to completion: {index: (tokens, finish_reason, error)}."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    toks: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    fin: dict[int, tuple[str | None, str | None]] = {}
    for i, (p, s) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(str(i), p, s)
    while eng.has_unfinished():
        for o in eng.step():
            toks[int(o.request_id)].extend(o.new_token_ids)
            if o.finished:
                fin[int(o.request_id)] = (o.finish_reason, o.error)
    return {i: (toks[i], *fin[i]) for i in toks}


@pytest.fixture(scope="module")
def so(tiny_llama):
    return StructuredOutputs(tiny_llama.tokenizer, tiny_llama.config.vocab_size, tiny_llama.eos_token_ids)


@pytest.fixture(scope="module")
def drafter(tiny_llama, tiny_prompts):
    return train_tiny_drafter(tiny_llama, tiny_prompts)


def greedy(grammar, **kw):
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, grammar=grammar, **kw)


def check_json(lm, result, schema=None):
    for i, (toks, reason, err) in result.items():
        assert err is None and reason == "stop", (i, reason, err, lm.tokenizer.decode(toks))
        doc = json.loads(lm.tokenizer.decode(toks, skip_special_tokens=True))
        if schema is None:
            assert isinstance(doc, dict)
        else:
            jsonschema.validate(doc, schema)


# ---- the matcher on its own -------------------------------------------------------------------------------------
def ids(lm, text):
    return [lm.tokenizer.convert_tokens_to_ids(c) for c in text]


def test_masks_follow_drafts_and_roll_back_to_what_was_committed(tiny_llama, so):
    lm, V = tiny_llama, tiny_llama.config.vocab_size
    g = so.json_schema({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                        "additionalProperties": False})
    m = g.matcher()
    good = ids(lm, '{"ok":')
    drafts = [*good[:3], ids(lm, "x")[0], *good[4:]]  # the 4th draft is forbidden ('x' after '{"o')
    masks = new_bitmask(len(drafts) + 1, vocab_size=V)
    assert m.fill_masks(drafts, masks) == 4  # positions 0..3: the forbidden draft's own position is the last
    allowed = allowed_from_bitmask(masks, V)
    assert allowed[0].nonzero().flatten().tolist() == ids(lm, "{")
    assert allowed[2].nonzero().flatten().tolist() == ids(lm, "o")
    assert not allowed[3, drafts[3]] and allowed[3, good[3]]  # position 3 forbids the draft there
    assert allowed[4:].all()  # rows past a forbidden draft are never used: left as the caller filled them
    # commit one draft and a bonus token that differs from the next draft: the state is the committed text
    committed = [good[0], *ids(lm, " ")]
    for t in committed:
        assert m.advance(t)
    m.settle()
    fresh = g.matcher()
    for t in committed:
        assert fresh.advance(t)
    a, b = new_bitmask(1, vocab_size=V), new_bitmask(1, vocab_size=V)
    m.fill_masks([], a)
    fresh.fill_masks([], b)
    assert torch.equal(a, b)
    # a token the grammar forbids is refused, and the grammar completes at '}' (only EOS may follow)
    m2 = g.matcher()
    assert not m2.advance(ids(lm, "x")[0]) and m2.error
    m3 = g.matcher()
    assert all(m3.advance(t) for t in ids(lm, '{"ok":true}')) and m3.stopped


def test_apply_bitmask_sets_exactly_the_disallowed_logits_to_minus_inf():
    V = 70  # not a multiple of 32: the last word is partial
    mask = torch.zeros(2, 3, dtype=torch.int32)
    mask[0, 0] = 1 << 5
    mask[0, 2] = 1 << 1  # token 65
    mask[1] = -1  # all allowed (bit 31 of each word included)
    logits = torch.randn(2, V)
    ref = logits.clone()
    apply_bitmask(logits, mask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [5, 65]
    assert torch.equal(logits[0, [5, 65]], ref[0, [5, 65]]) and torch.equal(logits[1], ref[1])


# ---- the engine ------------------------------------------------------------------------------------------------
def test_json_object_and_schema_outputs_parse_and_validate(tiny_llama, tiny_prompts, so):
    lm, prompts = tiny_llama, tiny_prompts[:6]
    check_json(lm, run(engine(lm), prompts, greedy(so.json_schema(GRID_SCHEMA))), GRID_SCHEMA)
    # sampled rows too (their own seeds), on the same grammar
    sampled = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=i, grammar=so.json_schema(GRID_SCHEMA))
               for i in range(len(prompts))]
    check_json(lm, run(engine(lm), prompts, sampled), GRID_SCHEMA)
    # json_object: any object; a random model may write a long key, so check only what it finished
    res = run(engine(lm), prompts, greedy(so.json_object()))
    done = {i: r for i, r in res.items() if r[1] == "stop"}
    assert len(done) >= len(prompts) // 2 and all(r[1] in ("stop", "length") for r in res.values())
    check_json(lm, done)


@pytest.mark.parametrize("kind", ["ngram", "drafter"])
def test_speculation_under_a_grammar_is_token_exact(tiny_llama, tiny_prompts, so, drafter, kind):
    lm, prompts = tiny_llama, tiny_prompts[:8]
    sp = greedy(so.json_schema(GRID_SCHEMA))
    ref = run(engine(lm), prompts, sp)
    check_json(lm, ref, GRID_SCHEMA)
    eng = engine(lm, k=3, proposer=kind, drafter=drafter if kind == "drafter" else None)
    got = run(eng, prompts, sp)
    assert got == ref
    # the check must exercise both outcomes: drafts accepted under the grammar, and drafts rejected
    assert 0 < eng.stats.num_accepted_tokens < eng.stats.num_draft_tokens


def test_sampled_speculation_under_a_grammar_keeps_the_schema(tiny_llama, tiny_prompts, so, drafter):
    lm, prompts = tiny_llama, tiny_prompts[:6]
    sampled = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=i, grammar=so.json_schema(GRID_SCHEMA))
               for i in range(len(prompts))]
    eng = engine(lm, k=3, proposer="drafter", drafter=drafter)
    check_json(lm, run(eng, prompts, sampled), GRID_SCHEMA)
    assert eng.stats.num_draft_tokens > 0


def test_the_grammar_ends_the_request_even_with_ignore_eos(tiny_llama, tiny_prompts, so):
    lm = tiny_llama
    toks, reason, _ = run(engine(lm), tiny_prompts[:1], greedy(so.json_schema(GRID_SCHEMA), ignore_eos=True))[0]
    assert reason == "stop" and lm.tokenizer.convert_ids_to_tokens(toks[-1]) == "}"
    # a budget that ends mid-document says so
    toks, reason, _ = run(engine(lm), tiny_prompts[:1], SamplingParams(max_tokens=5, temperature=0.0,
                                                                       grammar=so.json_schema(GRID_SCHEMA)))[0]
    assert reason == "length" and len(toks) == 5


@pytest.mark.parametrize("k", [0, 3])
def test_unconstrained_batch_mates_get_what_they_get_alone(tiny_llama, tiny_prompts, so, drafter, k):
    lm, prompts = tiny_llama, tiny_prompts[:8]
    plain = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    sampled = [SamplingParams(max_tokens=30, temperature=0.9, seed=100 + i, ignore_eos=True) for i in range(8)]
    constrained = greedy(so.json_schema(GRID_SCHEMA))
    mixed = [constrained if i % 2 else (plain if i % 4 == 0 else sampled[i]) for i in range(8)]

    def make():
        return engine(lm, k=k, proposer="drafter" if k else "none", drafter=drafter if k else None)

    together = run(make(), prompts, mixed)
    for i in range(0, 8, 2):
        alone = run(make(), [prompts[i]], [mixed[i]])[0]
        assert together[i] == alone, f"row {i} changed when constrained rows shared its batch"
    check_json(lm, {i: together[i] for i in range(1, 8, 2)}, GRID_SCHEMA)


def test_logprobs_stay_the_models_own_under_a_grammar(tiny_llama, tiny_prompts, so):
    lm = tiny_llama
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=2, grammar=so.json_schema(GRID_SCHEMA))
    eng = engine(lm)
    eng.add_request("x", tiny_prompts[0], sp)
    lps = []
    while eng.has_unfinished():
        for o in eng.step():
            lps.extend(o.logprobs or [])
    assert lps and all(x.logprob <= 0.0 for x in lps)
    # the grammar forces '{' first; the model's own top choices are reported beside it, as OpenAI does
    assert lm.tokenizer.convert_ids_to_tokens(lps[0].token_id) == "{" and len(lps[0].top) == 2


# ---- bad grammars ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema", [{"type": "frobnicate"}, {"type": "object", "properties": {"a": {"$ref": "#/x"}}},
                                    {"type": "string", "pattern": "("}])
def test_a_bad_schema_is_refused_naming_the_field(so, schema):
    with pytest.raises(GrammarError) as e:
        so.json_schema(schema)
    assert e.value.param == "response_format.json_schema.schema" and e.value.http_status == 400
    assert "response_format.json_schema.schema" in str(e.value)


def test_a_grammar_for_another_vocabulary_is_refused(tiny_llama, tiny_prompts):
    other = StructuredOutputs(tiny_llama.tokenizer, tiny_llama.config.vocab_size + 32, tiny_llama.eos_token_ids)
    eng = engine(tiny_llama)
    with pytest.raises(RequestError) as e:
        eng.add_request("a", tiny_prompts[0], greedy(other.json_object()))
    assert e.value.param == "response_format"


def test_compiled_grammars_are_cached_and_shared(so):
    assert so.json_schema(GRID_SCHEMA) is so.json_schema(json.loads(json.dumps(GRID_SCHEMA)))
    assert so.json_object() is so.json_object()


# ---- the acceptance rule with a masked target -------------------------------------------------------------------
def test_sampled_acceptance_with_a_masked_target_follows_the_masked_distribution():
    """A drafter that favours tokens the grammar forbids: every such draft is rejected, and the emitted token
    is distributed as the masked target (rejection sampling against p = softmax(masked logits))."""
    V, n = 8, 8000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, V, generator=g)
    mask = torch.tensor([[0b01101010], [0b11111111]], dtype=torch.int32).unsqueeze(0)  # position 0 allows 1,3,5,6
    apply_bitmask(logits, mask)
    q = torch.full((1, 1, V), 0.02)
    q[0, 0, 0], q[0, 0, 3] = 0.6, 0.26  # mass on a forbidden token (0) and on an allowed one (3)
    drafts = torch.multinomial(q[0, 0], n, replacement=True, generator=torch.Generator().manual_seed(2))
    batch = BatchState(token_ids=[[0]] * n, num_tokens=[1] * n, temperature=torch.ones(n),
                       top_k=torch.zeros(n, dtype=torch.long), top_p=torch.ones(n),
                       generators=[torch.Generator().manual_seed(i) for i in range(n)])
    prop = DraftProposal(token_ids=drafts.unsqueeze(1), num_drafts=torch.ones(n, dtype=torch.long),
                         probs=q.expand(n, 1, V))
    r = rejection_sample(logits.expand(n, 2, V), prop, batch)
    forbidden = ~torch.isfinite(logits[0, 0])
    assert all(a == 0 for d, a in zip(drafts.tolist(), r.num_accepted, strict=True) if forbidden[d])
    counts = torch.bincount(torch.tensor([t[0] for t in r.tokens]), minlength=V).float()
    p = torch.softmax(logits[0, 0], dim=-1)
    assert counts[forbidden].sum() == 0
    assert chisquare(counts[~forbidden].tolist(), (p[~forbidden] * n).tolist()).pvalue > 1e-3
