"""Property-based tests (hypothesis) of SamplingParams and the sampler over their whole domain.

Every float a JSON body or a caller can produce (NaN, infinities, denormals, huge and tiny values) either is
refused with a SamplingError naming the field, or yields parameters the sampler turns into a proper
distribution: finite, non-negative, summing to 1, with the most likely token kept.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from understudy.engine.sampling import (
    MAX_LOGIT_BIAS,
    MIN_TEMPERATURE,
    SamplingError,
    SamplingParams,
    apply_logit_bias,
    probs_from_logits,
    sample_row,
)

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True, width=64)
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 5e-324, 1e-308, 1e-45, 1e-38, 1e-6, MIN_TEMPERATURE, 1e-4, 0.5, 1.0,
                               2.0, 100.0, 100.0000001, 1e308, float("inf"), float("-inf"), float("nan")])
FLOATS = st.one_of(ANY_FLOAT, EDGE_FLOATS)
COMMON = settings(max_examples=300, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])


def build(**kw):
    try:
        return SamplingParams(**kw)
    except SamplingError as e:
        assert e.param in kw, (e.param, kw)  # the error names the field at fault
        assert e.http_status == 400
        return None


@COMMON
@given(temperature=FLOATS, top_p=FLOATS, top_k=st.integers(-5, 10**6))
def test_params_are_refused_naming_the_field_or_normalised(temperature, top_p, top_k):
    p = build(temperature=temperature, top_p=top_p, top_k=top_k)
    if p is None:
        return
    assert math.isfinite(p.temperature) and math.isfinite(p.top_p)
    assert p.temperature == 0.0 or p.temperature >= MIN_TEMPERATURE
    assert 0.0 < p.top_p <= 1.0 and p.top_k >= 0
    assert p.greedy == (p.temperature == 0.0)


@COMMON
@given(temperature=FLOATS, top_p=FLOATS, top_k=st.integers(0, 70),
       scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4, 1e30, 1e36]), seed=st.integers(0, 2**31))
def test_the_sampler_always_gives_a_distribution(temperature, top_p, top_k, scale, seed):
    p = build(temperature=temperature, top_p=top_p, top_k=top_k)
    if p is None or p.greedy:
        return
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 64, generator=g) * scale  # any finite float32 logits
    probs = probs_from_logits(logits.clone(), torch.full((3,), p.temperature), torch.full((3,), p.top_k),
                              torch.full((3,), p.top_p, dtype=torch.float32))
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-4)
    top = logits.argmax(dim=1)
    assert (probs.gather(1, top.unsqueeze(1)) > 0).all(), "the most likely token is never dropped"
    assert 0 <= sample_row(probs[0], g) < 64


@COMMON
@given(bias=st.dictionaries(st.integers(-3, 70), FLOATS, max_size=8),
       size=st.sampled_from([0, 1, MAX_LOGIT_BIAS, MAX_LOGIT_BIAS + 1]))
def test_logit_bias_is_refused_or_applied(bias, size):
    entries = tuple(bias.items()) + tuple((i, 1.0) for i in range(100, 100 + size))
    p = build(temperature=0.0, logit_bias=entries)
    if p is None:
        return
    logits = torch.zeros(2, 500)
    apply_logit_bias(logits, p.logit_bias)
    for tok, b in p.logit_bias:
        assert logits[0, tok] == pytest.approx(b)


@pytest.mark.parametrize(("field", "value"), [("temperature", float("nan")), ("temperature", float("inf")),
                                              ("temperature", -1e-300), ("top_p", 0.0), ("top_p", float("nan")),
                                              ("top_k", -1), ("max_tokens", 0), ("max_tokens", True)])
def test_each_bad_field_is_named(field, value):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field and field in str(e.value)


def test_a_denormal_temperature_is_greedy():
    assert SamplingParams(temperature=5e-324).greedy and SamplingParams(temperature=MIN_TEMPERATURE * 0.99).greedy
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy
