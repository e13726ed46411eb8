"""Per-request sampling parameters and the one place logits become a sampling distribution."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20


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

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
    logits = logits / temperature.unsqueeze(1)
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
