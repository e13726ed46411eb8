"""Per-request sampling parameters and the one place logits become a sampling distribution.

Float edges are settled here, once, for every caller (server, trainer, CLI): NaN and infinities are refused
with an error naming the field; a temperature below MIN_TEMPERATURE is greedy (dividing float32 logits by a
denormal temperature overflows to inf and the softmax to NaN, which once failed a whole batch); a top_p that
rounds to 0 keeps the most likely token (see probs_from_logits).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from understudy.errors import InputError

if TYPE_CHECKING:
    from understudy.engine.structured import Grammar

MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (vLLM uses the same epsilon)
MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's limit)


class SamplingError(InputError, ValueError):
    """A sampling parameter is out of its domain: 400 naming the field."""


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of decoding. temperature 0 = greedy (token-exact under speculation)."""

    max_tokens: int = 16  # new tokens to generate at most
    temperature: float = 1.0  # 0 = greedy; >0 scales logits before softmax
    top_p: float = 1.0  # nucleus: keep the smallest set with cumulative prob >= top_p
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    seed: int | None = None  # per-request generator seed (None = random)
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the request (EOS always does)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    logprobs: int | None = None  # None = none; 0 = the sampled token's; n = plus the n most likely
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), as OpenAI's logit_bias
    grammar: Grammar | None = None  # constrained decoding (engine.structured): only tokens it allows are drawn

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        t = _finite(self.temperature, "temperature")
        if not 0.0 <= t <= MAX_TEMPERATURE:
            raise SamplingError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {t}", "temperature")
        object.__setattr__(self, "temperature", 0.0 if t < MIN_TEMPERATURE else t)
        p = _finite(self.top_p, "top_p")
        if not 0.0 < p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {p}", "top_p")
        object.__setattr__(self, "top_p", p)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}", "top_k")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SamplingError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}",
                                "logit_bias")
        for tok, bias in self.logit_bias:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise SamplingError(f"logit_bias keys must be token ids >= 0, got {tok!r}", "logit_bias")
            if not -100.0 <= _finite(bias, "logit_bias") <= 100.0:
                raise SamplingError(f"logit_bias values must be in [-100, 100], got {bias}", "logit_bias")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _finite(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise SamplingError(f"{name} must be a number, got {x!r}", name)
    if not math.isfinite(x):
        raise SamplingError(f"{name} must be a finite number, got {x}", name)
    return float(x)


def apply_logit_bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> None:
    """Add a request's logit_bias to its logits [..., V] in place (ids outside the vocabulary are refused
    before a request is admitted)."""
    if bias:
        ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=logits.device)
        vals = torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device)
        logits.index_add_(-1, ids, vals.expand(*logits.shape[:-1], -1).contiguous())


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
    return g


def probs_from_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor) -> torch.Tensor:
    """Turn float32 logits [N, V] into the distribution a request samples from, row by row.

    temperature, top_k, top_p: [N]. Rows must have temperature > 0. top-k and top-p are applied only to
    the rows that ask for them (sorting 49k logits per row is the expensive part).
    """
    assert logits.dim() == 2 and logits.shape[0] == temperature.shape[0]
    # Shift so each row's largest logit is 0 before scaling: any finite logits and any temperature >=
    # MIN_TEMPERATURE then give values in [-inf, 0], and the softmax never sees inf - inf (NaN).
    logits = (logits - logits.amax(dim=1, keepdim=True)) / temperature.unsqueeze(1)
    need_k = top_k > 0
    if bool(need_k.any()):
        rows = need_k.nonzero().squeeze(1)
        sub = logits[rows]
        k = top_k[rows].clamp(max=sub.shape[1])
        kth = sub.topk(int(k.max()), dim=1).values.gather(1, (k - 1).unsqueeze(1))  # [n, 1]
        logits[rows] = sub.masked_fill(sub < kth, float("-inf"))
    need_p = top_p < 1.0
    if bool(need_p.any()):
        rows = need_p.nonzero().squeeze(1)
        sub = logits[rows]
        sorted_logits, order = sub.sort(dim=1, descending=True)
        cum = sorted_logits.softmax(dim=1).cumsum(dim=1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=1)) >= top_p[rows].unsqueeze(1)
        drop_sorted[:, 0] = False  # never drop the most likely token (top_p can underflow to 0 in float32)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits[rows] = sub.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=1)


def sample_row(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from a [V] distribution with the request's own generator."""
    return int(torch.multinomial(probs, 1, generator=generator))
