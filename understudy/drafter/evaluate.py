"""`understudy drafter eval`: how far a drafter gets on given prompts, and what that is worth on this machine.

Acceptance: the target answers each prompt greedily (its hidden states kept), and `train.evaluate` replays the
drafter exactly as the engine drafts, giving the per-position acceptance alpha_j (the chance that drafts 1..j are
all the target's greedy choice) and the expected acceptance length L(K) = 1 + sum_{j<=K} alpha_j.

Worth: one speculative step at draft length K costs a target forward over K+1 positions (verification) plus K
drafter forwards (the catch-up over the accepted tokens and K-1 chained drafts, each with its draft-vocabulary
head). Both are timed here, on this machine, over a KV-cached prefix at batch 1; the predicted speed-up over plain
decoding is L(K) * c(1) / (c(K+1) + K * d), and the best K is its argmax (K = 0, plain, is 1.0 by definition).
L(K) there is the tokens per step of greedy decoding walked over the same answers (`decoded_acceptance_length_at_k`),
lower than 1 + sum alpha_j: decoding drafts from the anchors its steps land on, more of them in hard stretches.
The prediction leaves out the per-step bookkeeping the engine adds to both, so `benchmarks/decode.py` is the
measurement to trust; this is the estimate to choose K and compare drafters by.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from understudy.drafter.model import Drafter
from understudy.drafter.train import Sample, evaluate
from understudy.drafter.warmup import generate_samples
from understudy.engine.loader import LoadedModel
from understudy.engine.model import enable_cpu_packing
from understudy.engine.sampling import SamplingParams
from understudy.engine.text import encode_prompt, load_prompts


def eval_samples(lm: LoadedModel, prompts_file: Path, max_new_tokens: int, batch_size: int = 16,
                 limit: int | None = None) -> tuple[list[Sample], str]:
    """The target's greedy answers, with its features, to the file's `heldout` prompts if it has any (else to
    all of them); returns them and the split used ("heldout" or "all")."""
    rows = load_prompts(prompts_file)
    split = "heldout" if any(r["split"] == "heldout" for r in rows) else "all"
    rows = [r for r in rows if split == "all" or r["split"] == "heldout"][:limit]
    if not rows:
        raise ValueError(f"{prompts_file}: no prompts to evaluate (--limit {limit})")
    ids = [encode_prompt(lm.tokenizer, r["prompt"]) for r in rows]
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=0.0)] * len(ids)
    out = generate_samples(lm, ids, params, batch_size, f"target answers ({prompts_file.name})")
    return [s for s in out if s is not None], split


def acceptance(drafter: Drafter, lm: LoadedModel, samples: list[Sample], max_k: int = 6) -> dict[str, Any]:
    ev = evaluate(drafter, lm.model, samples, k=max_k, cache_greedy=True)
    ev["num_sequences"] = len(samples)
    return ev


@torch.inference_mode()
def measure_costs(lm: LoadedModel, drafter: Drafter, max_width: int = 7, prefix: int = 256, repeats: int = 5,
                  calls: int = 3, seed: int = 0) -> dict[str, Any]:
    """Median seconds of a width-w verification forward (+ LM head) for w = 1..max_width, and of one drafter
    step (forward + draft head), at batch 1 over a `prefix`-token KV cache; interleaved, so drift hits all alike."""
    model = lm.model
    enable_cpu_packing(model)
    cap = prefix + max_width + 2
    g = torch.Generator().manual_seed(seed)
    V, H = model.config.vocab_size, model.config.hidden_size
    toks = torch.randint(0, V, (1, prefix + max_width), generator=g).to(model.device)
    cache = model.allocate_cache(1, cap)
    model(toks[:, :prefix], torch.arange(prefix, device=model.device).unsqueeze(0), cache, kv_len=prefix)
    d = drafter.attach(model, cap)
    dcache = d.allocate_cache(1, cap, model.dtype, model.device)
    feats = (torch.randn(1, prefix, H, generator=g) * 3).to(model.device, model.dtype)
    d(toks[:, 1:prefix + 1], feats, torch.arange(prefix, device=model.device).unsqueeze(0), dcache, kv_len=prefix)
    pos1 = torch.tensor([[prefix]], device=model.device)

    def verify(w: int) -> None:
        positions = prefix + torch.arange(w, device=model.device).unsqueeze(0)
        model.logits(model(toks[:, prefix:prefix + w], positions, cache, kv_len=prefix + w))

    def draft() -> None:
        out = d(toks[:, prefix:prefix + 1], feats[:, -1:], pos1, dcache, kv_len=prefix + 1)
        d.draft_logits(out[:, 0]).argmax(-1)

    def timed(fn: Any, *a: Any) -> float:
        fn(*a)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(*a)
        return (time.perf_counter() - t0) / calls

    widths = list(range(1, max_width + 1))
    verify_s: dict[int, list[float]] = {w: [] for w in widths}
    draft_s: list[float] = []
    for _ in range(repeats):
        for w in widths:
            verify_s[w].append(timed(verify, w))
        draft_s.append(timed(draft))
    return {"verify_s": {str(w): statistics.median(v) for w, v in verify_s.items()},
            "draft_step_s": statistics.median(draft_s), "prefix": prefix, "batch": 1,
            "threads": torch.get_num_threads(), "dtype": str(model.dtype).removeprefix("torch.")}


def predict(acc: dict[str, Any], costs: dict[str, Any]) -> dict[str, Any]:
    """Predicted speed-up per K and the best K (see the module docstring)."""
    c = {int(w): s for w, s in costs["verify_s"].items()}
    d = costs["draft_step_s"]
    # tokens per step as decoding realises them (train._walk), else the average over every anchor (higher)
    lengths = {int(k): v for k, v in (acc.get("decoded_acceptance_length_at_k") or acc["acceptance_length_at_k"]).items()}
    speedup = {0: 1.0}
    for k, length in lengths.items():
        if k + 1 in c:
            speedup[k] = length * c[1] / (c[k + 1] + k * d)
    best = max(speedup, key=lambda k: speedup[k])
    return {"speedup_at_k": {str(k): round(v, 3) for k, v in speedup.items()}, "best_k": best,
            "best_speedup": round(speedup[best], 3),
            "verify_cost_vs_width1": {str(w): round(s / c[1], 3) for w, s in c.items()},
            "draft_step_vs_width1": round(d / c[1], 3)}
