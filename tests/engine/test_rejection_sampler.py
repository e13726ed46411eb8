"""Sampled speculative decoding preserves the target distribution exactly (chi-square against enumeration)."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from understudy.drafter.model import new_drafter
from understudy.engine import rejection_sampler
from understudy.engine.config import EngineConfig, ModelConfig
from understudy.engine.engine import Engine
from understudy.engine.model import Transformer
from understudy.engine.proposer import BatchState, DraftProposal
from understudy.engine.sampling import SamplingParams, probs_from_logits

V = 6
PROMPT = [1, 4, 2]
LEN = 3  # joint distribution of the first three generated tokens (216 cells)


@pytest.fixture(scope="module")
def micro():
    cfg = ModelConfig(architecture="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else None
    return m.eval()


def exact_joint(model, temperature, top_k, top_p):
    """P(x1, x2, x3 | prompt) under the processed target distribution, by enumerating every prefix."""
    def dist(prefix):
        with torch.no_grad():
            logits = model.logits(model(torch.tensor([PROMPT + list(prefix)])))[0, -1:]
        return probs_from_logits(logits, torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p]))[0]

    joint = {}
    for x1 in range(V):
        p1 = dist(())[x1]
        for x2 in range(V):
            p2 = dist((x1,))[x2]
            d3 = dist((x1, x2))
            for x3 in range(V):
                joint[(x1, x2, x3)] = float(p1 * p2 * d3[x3])
    return joint


def sample_engine(model, proposer, temperature, top_k, top_p, n, fp="fam-test"):
    drafter = new_drafter(model, fp, seed=3) if proposer == "drafter" else None
    eng = Engine(model, EngineConfig(max_batch_size=64, max_model_len=16, num_speculative_tokens=3,
                                     proposer=proposer, dtype="float32", ngram_min=1),  # 1: enough n-gram drafts
                 eos_token_ids=(), drafter=drafter)
    counts: dict[tuple[int, ...], int] = {}
    outs: dict[str, list[int]] = {}
    for i in range(n):
        sp = SamplingParams(max_tokens=LEN + 1, temperature=temperature, top_k=top_k, top_p=top_p, seed=10_000 + i)
        eng.add_request(str(i), PROMPT, sp)
        outs[str(i)] = []
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id].extend(o.new_token_ids)
    for toks in outs.values():
        key = tuple(toks[:LEN])
        counts[key] = counts.get(key, 0) + 1
    return counts, eng.stats


def chi2_pvalue(counts, joint, n):
    impossible = sum(v for c, v in counts.items() if joint.get(c, 0.0) == 0.0)
    assert impossible == 0, f"{impossible} samples fell on sequences the target gives probability 0 (top-k/top-p)"
    cells = sorted((c for c in joint if joint[c] > 0), key=lambda c: -joint[c])
    obs, exp, rest_o, rest_e = [], [], 0.0, 0.0
    for c in cells:
        e = joint[c] * n
        if e >= 5:
            obs.append(counts.get(c, 0))
            exp.append(e)
        else:
            rest_o += counts.get(c, 0)
            rest_e += e
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    total = sum(obs)
    exp = [e * total / sum(exp) for e in exp]
    return chisquare(obs, exp).pvalue


@pytest.mark.parametrize(("proposer", "temperature", "top_k", "top_p"), [
    ("drafter", 1.0, 0, 1.0),
    ("drafter", 0.7, 4, 0.9),
    ("ngram", 1.0, 0, 1.0),
])
def test_sampled_speculation_preserves_target_distribution(micro, proposer, temperature, top_k, top_p):
    n = 6000
    joint = exact_joint(micro, temperature, top_k, top_p)
    counts, stats = sample_engine(micro, proposer, temperature, top_k, top_p, n)
    assert stats.num_draft_tokens > 500, "speculation must actually run"
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens, "both accepts and rejects must occur"
    p = chi2_pvalue(counts, joint, n)
    assert p > 1e-3, f"speculative samples do not follow the target distribution (chi-square p={p:.2e})"


def test_chi_square_has_power_against_a_biased_sampler(micro, monkeypatch):
    """Negative control: a sampler that accepts every draft (biased toward q) must be caught by the same test."""
    real = rejection_sampler._draft_probs_of

    def always_accept(proposal, rows, drafts):
        return torch.zeros_like(real(proposal, rows, drafts)) + 1e-12  # u*q < p always holds

    monkeypatch.setattr(rejection_sampler, "_draft_probs_of", always_accept)
    n = 6000
    joint = exact_joint(micro, 1.0, 0, 1.0)
    counts, _ = sample_engine(micro, "drafter", 1.0, 0, 1.0, n)
    assert chi2_pvalue(counts, joint, n) < 1e-6


def test_rejection_sample_single_position_matches_p():
    """Unit check of the acceptance maths: one draft from q, output token ~ p for arbitrary p, q."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.5, 0.2, 0.1])
    n = 20000
    logits = torch.log(p).expand(n, 2, 5).clone()  # position 0 and bonus position 1
    drafts = torch.multinomial(q, n, replacement=True, generator=g).unsqueeze(1)
    proposal = DraftProposal(token_ids=drafts, num_drafts=torch.ones(n, dtype=torch.long),
                             probs=q.expand(n, 1, 5).clone())
    batch = BatchState(token_ids=[[0]] * n, num_tokens=[1] * n, temperature=torch.ones(n),
                       top_k=torch.zeros(n, dtype=torch.long), top_p=torch.ones(n), generators=[g] * n)
    res = rejection_sampler.rejection_sample(logits, proposal, batch)
    first = torch.tensor([t[0] for t in res.tokens])
    obs = torch.bincount(first, minlength=5).tolist()
    assert chisquare(obs, (p * n).tolist()).pvalue > 1e-3
    # acceptance probability = sum_x min(p, q)
    acc = sum(res.num_accepted) / n
    assert abs(acc - float(torch.minimum(p, q).sum())) < 0.02


def test_all_cells_enumerated(micro):
    joint = exact_joint(micro, 1.0, 0, 1.0)
    assert len(joint) == V**LEN and abs(sum(joint.values()) - 1) < 1e-4
    assert set(joint) == set(itertools.product(range(V), repeat=LEN))


def test_tiny_top_p_keeps_the_top_token():
    """schemathesis found top_p=5e-324 (0 in float32) emptying the nucleus -> NaN probabilities -> a 500."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.2, 0.1]])
    p = probs_from_logits(logits.clone(), torch.ones(2), torch.zeros(2, dtype=torch.long),
                          torch.tensor([5e-324, 1e-9]))
    assert torch.isfinite(p).all()
    assert p[0].tolist() == [0.0, 1.0, 0.0] and p[1].tolist() == [1.0, 0.0, 0.0]
