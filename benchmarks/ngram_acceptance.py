"""N-gram lookup rules compared offline on the target's own greedy outputs (exact for greedy decoding).

    python benchmarks/ngram_acceptance.py [--prompts 8] [--splits heldout] [--max-new-tokens 128] [--ks 2,4]

Under greedy decoding, speculation with a deterministic proposer is a deterministic walk over the target's plain
greedy output: at each step the proposer sees prompt + output[:i], the target accepts the longest prefix of the
proposal that agrees with output[i:], and emits it plus one token. So acceptance can be computed without running
the target again. The script generates the float32 greedy outputs once (ignore_eos, as the speed benchmarks do),
then replays every rule. Reported per rule and K:
  * mean acceptance length (vLLM's definition: 1 + accepted / steps that proposed),
  * proposal rate (steps that proposed / steps), tokens per target forward,
  * est. speed-up = tokens / sum of step costs, with a step verifying w tokens costing `--verify-cost`[w-1]
    times a plain step (defaults: float32 widths 1..5 measured by benchmarks/verify_cost.py on this machine).
Also checks the replay against the engine itself for the shipped rule (same acceptance counts).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine
from understudy.engine.loader import load_model
from understudy.engine.ngram import longest_match, lookup
from understudy.engine.sampling import SamplingParams
from understudy.engine.text import encode_prompt, load_prompts

RESULTS = Path(__file__).resolve().parent / "results"
Rule = Callable[[np.ndarray, int], list[int]]


def _match_start(tokens: np.ndarray, n_min: int, n_max: int, recent: bool) -> int | None:
    """Where the tokens after the longest suffix match (n in [n_min, n_max]) start: at its earliest occurrence
    (the engine's `longest_match`, as vLLM breaks ties) or at its most recent one. None: no match."""
    if not recent:
        end, _ = longest_match(tokens, n_min, n_max)
        return end + 1 if end >= 0 else None
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        windows = sliding_window_view(tokens[:L - 1], n)
        hits = np.flatnonzero((windows == tokens[L - n:]).all(axis=1))
        if hits.size:
            return int(hits[-1]) + n
    return None


def _rule(n_min: int, n_max: int, recent: bool, extend: bool) -> Rule:
    """Copy the k tokens after the match; with `extend`, keep copying through the proposal when the match is so
    recent that fewer than k tokens follow it."""
    def rule(tokens: np.ndarray, k: int) -> list[int]:
        start = _match_start(tokens, n_min, n_max, recent)
        if start is None:
            return []
        if not extend:
            return tokens[start:start + k].tolist()
        seq, L = tokens.tolist(), len(tokens)
        for j in range(k):
            seq.append(seq[start + j])
        return seq[L:L + k]
    return rule


def previous_rule(n_min: int, n_max: int) -> Rule:
    """The rule before this change: suffix lengths n_max..n_min, the most recent match, no extension (with the
    engine's default n_min = 1)."""
    return _rule(n_min, n_max, recent=True, extend=False)


def earliest_rule(n_min: int, n_max: int) -> Rule:
    """vLLM's tie-break: the longest match in [n_min, n_max], the earliest occurrence, no extension."""
    return _rule(n_min, n_max, recent=False, extend=False)


def shipped_rule(n_min: int, n_max: int) -> Rule:
    return lambda tokens, k: lookup(tokens, n_min, n_max, k)


def no_extension_rule(n_min: int, n_max: int) -> Rule:
    return _rule(n_min, n_max, recent=False, extend=False)


def recent_rule(n_min: int, n_max: int) -> Rule:
    """The shipped rule with the most recent of the equally long matches (extension kept)."""
    return _rule(n_min, n_max, recent=True, extend=True)


def replay(rule: Rule, prompt: list[int], output: list[int], k: int) -> dict[str, int | list[int]]:
    """Walk the greedy output as the engine would with this proposer; count steps, drafts, acceptances. The first
    token comes from the prefill (one plain forward, no proposal)."""
    i, steps, drafts, accepted, widths = 1, 1, 0, 0, [1]
    while i < len(output):
        ctx = np.asarray(prompt + output[:i], dtype=np.int64)
        room = len(output) - i - 1  # the engine never drafts past the token budget
        prop = rule(ctx, k)[:max(room, 0)]
        a = 0
        while a < len(prop) and prop[a] == output[i + a]:
            a += 1
        steps += 1
        if prop:
            drafts += 1
            accepted += a
        widths.append(len(prop) + 1)
        i += a + 1
    return {"steps": steps, "drafts": drafts, "accepted": accepted, "widths": widths}


def summarize(runs: list[dict[str, Any]], n_tokens: int, cost: list[float]) -> dict[str, float]:
    steps = sum(r["steps"] for r in runs)
    drafts = sum(r["drafts"] for r in runs)
    accepted = sum(r["accepted"] for r in runs)
    total_cost = sum(cost[min(w, len(cost)) - 1] for r in runs for w in r["widths"])
    return {"mean_acceptance_length": round(1 + accepted / drafts, 3) if drafts else 1.0,
            "proposal_rate": round(drafts / steps, 3), "tokens_per_forward": round(n_tokens / steps, 3),
            "est_speedup": round(n_tokens / total_cost, 3), "drafts": drafts, "accepted": accepted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per split")
    ap.add_argument("--splits", default="heldout", help="comma-separated splits of the shipped prompt set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--verify-cost", default="1,1.12,1.22,1.31,1.41,1.51,1.56,1.53",
                    help="cost of a width-w forward relative to width 1, w = 1, 2, ...")
    ap.add_argument("--no-engine-check", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cost = [float(c) for c in args.verify_cost.split(",")]
    lm = load_model(args.model, dtype="float32")
    rows = [r for s in args.splits.split(",") for r in load_prompts(splits=(s,))[:args.prompts]]
    prompts = [encode_prompt(lm.tokenizer, r["prompt"]) for r in rows]
    sp = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    cfg = dict(max_batch_size=len(prompts), max_model_len=max(map(len, prompts)) + args.max_new_tokens + 1,
               dtype="float32")
    outputs = Engine(lm.model, EngineConfig(num_speculative_tokens=0, **cfg), lm.eos_token_ids).generate(prompts, sp)
    n_tokens = sum(map(len, outputs))
    rules: dict[str, Rule] = {
        "previous (n 4..1, recent)": previous_rule(1, 4),
        "previous, n 4..2": previous_rule(2, 4),
        "vLLM-like (n 4..4, earliest)": earliest_rule(4, 4),
        "vLLM-like (n 4..2, earliest)": earliest_rule(2, 4),
        "longest n 2..4, earliest, no extension": no_extension_rule(2, 4),
        "shipped (n 2..4, earliest, extend)": shipped_rule(2, 4),
        "shipped rule, n 1..4": shipped_rule(1, 4),
        "shipped rule, n 3..4": shipped_rule(3, 4),
        "shipped rule, n 2..8": shipped_rule(2, 8),
        "shipped rule, n 2..16": shipped_rule(2, 16),
        "recent instead of earliest (n 2..4)": recent_rule(2, 4),
    }
    results: dict[str, Any] = {"config": vars(args) | {"out": str(args.out)}, "num_tokens": n_tokens, "rows": []}
    for k in (int(x) for x in args.ks.split(",")):
        for name, rule in rules.items():
            runs = [replay(rule, p, o, k) for p, o in zip(prompts, outputs, strict=True)]
            results["rows"].append({"rule": name, "k": k, **summarize(runs, n_tokens, cost)})
    if not args.no_engine_check:  # the replay must agree with the engine (shipped rule, K=4)
        eng = Engine(lm.model, EngineConfig(num_speculative_tokens=4, proposer="ngram", ngram_min=2, ngram_max=4,
                                            **cfg), lm.eos_token_ids)
        assert eng.generate(prompts, sp) == outputs, "n-gram speculation changed the greedy output"
        sim = next(r for r in results["rows"] if r["k"] == 4 and r["rule"].startswith("shipped (n 2..4"))
        results["engine_check"] = {"engine": eng.stats.to_dict(), "replay_accepted": sim["accepted"],
                                   "replay_drafts": sim["drafts"]}
        print(f"engine check: engine drafts {eng.stats.num_drafts} accepted {eng.stats.num_accepted_tokens}; "
              f"replay drafts {sim['drafts']} accepted {sim['accepted']}")
    out = args.out or RESULTS / f"ngram_acceptance-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{len(prompts)} prompts ({args.splits}), {n_tokens} greedy tokens\n")
    print("| rule | K | mean acceptance length | proposal rate | tokens / forward | est. speed-up |")
    print("|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['rule']} | {r['k']} | {r['mean_acceptance_length']:.2f} | {r['proposal_rate']:.2f} | "
              f"{r['tokens_per_forward']:.2f} | {r['est_speedup']:.2f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
