"""Drafter recipes compared by learning curve: held-out acceptance length at K=4 against CPU-minutes of training.

    python benchmarks/drafter_recipe.py [--recipes old,new] [--cpu-minutes 12] [--points 6] [--data-minutes 40]

Every recipe trains from the same initial drafter on the same cached self-distillation data (the warm-up's
`build_dataset`: the target's own answers to the shipped prompts, with its features; generated once, then reused
from the cache), single-threaded. Time is the process's CPU time spent in training steps, so a busy machine slows
a run down without bending its curve; evaluations (held-out acceptance, simulated exactly as the engine drafts)
are excluded from it. Writes JSON to benchmarks/results/ and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from understudy.drafter.model import new_drafter
from understudy.drafter.train import DrafterTrainConfig, DrafterTrainer, evaluate, select_draft_vocab
from understudy.drafter.warmup import WarmupConfig, build_dataset
from understudy.engine.loader import load_model
from understudy.engine.text import default_prompts_path

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (draft vocabulary size, train config, schedule by time?)
OLD = DrafterTrainConfig(lr=5e-4, warmup_steps=30, total_steps=2000, tokens_per_batch=4096, hidden_loss_weight=1.0,
                         ce_loss_weight=0.1, unroll_steps=3)
NEW = DrafterTrainConfig(lr=1e-3, warmup_steps=10, tokens_per_batch=1024, hidden_loss_weight=0.1,
                         ce_loss_weight=1.0, unroll_steps=3)
RECIPES: dict[str, tuple[int, DrafterTrainConfig, bool]] = {
    "old": (8192, OLD, False),  # the first wave's warm-up defaults: a 2000-step schedule, ~4k-token batches
    "new": (2048, NEW, True),
    "new-vocab8k": (8192, NEW, True),
    "new-hidden-loss": (2048, replace(NEW, hidden_loss_weight=1.0, ce_loss_weight=0.1), True),
    "new-batch4k": (2048, replace(NEW, tokens_per_batch=4096), True),
    "new-unroll2": (2048, replace(NEW, unroll_steps=2), True),
    "new-lr3e-3": (2048, replace(NEW, lr=3e-3), True),
    "new-hard": (2048, replace(NEW, hard_labels=True), True),
    "new-half-data": (2048, NEW, True),  # the same recipe on half the training sequences: is data the bound?
    "new-every-anchor": (2048, replace(NEW, draft_all_anchors=True), True),  # before scored anchors (same loss)
}
DATA_FRACTION = {"new-half-data": 0.5}  # recipes trained on a random subset of the training sequences


def response_tokens(samples: list[Any]) -> int:
    return sum(len(s) - s.prompt_len for s in samples)


def coverage(samples: list[Any], vocab: torch.Tensor, vocab_size: int) -> float:
    """Share of response tokens that are in the draft vocabulary (an upper bound on what it can draft)."""
    inside = torch.zeros(vocab_size, dtype=torch.bool)
    inside[vocab] = True
    n = response_tokens(samples)
    return sum(int(inside[s.tokens[s.prompt_len:]].sum()) for s in samples) / max(n, 1)


def run_recipe(name: str, lm: Any, train: list[Any], heldout: list[Any], cpu_minutes: float, points: int,
               k: int, seed: int) -> dict[str, Any]:
    vocab_size, cfg, by_time = RECIPES[name]
    cfg = replace(cfg, seed=seed)
    if name in DATA_FRACTION:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        train = [train[i] for i in sorted(keep[:round(len(train) * DATA_FRACTION[name])].tolist())]
    # a fixed sample of the training sequences, evaluated at the end beside the held-out set: their gap is overfitting
    seen = [train[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))[:len(heldout)]]
    V = lm.config.vocab_size
    vocab = select_draft_vocab(train, vocab_size, V, always=lm.eos_token_ids) if vocab_size < V else None
    torch.manual_seed(seed)
    d = new_drafter(lm.model, lm.fingerprint, vocab, seed=seed).float()
    d.bind(lm.model)
    tr = DrafterTrainer(d, cfg)
    tr.clock = time.process_time
    budget = cpu_minutes * 60
    if by_time:
        tr.set_horizon(budget)
    curve = []

    def point() -> None:
        ev = evaluate(d, lm.model, heldout, k=k, cache_greedy=True)
        curve.append({"cpu_minutes": round(tr.train_seconds / 60, 2), "steps": tr.step, "tokens_seen": tr.tokens_seen,
                      "acceptance_length": round(ev["expected_acceptance_length"], 4),
                      "per_position_acceptance": ev["per_position_acceptance"], "loss": tr.last_metrics.get("loss")})
        print(f"  {name}: {curve[-1]['cpu_minutes']:.1f} CPU-min, step {tr.step}: L(K={k}) "
              f"{curve[-1]['acceptance_length']:.3f} {ev['per_position_acceptance']}", flush=True)

    point()
    for i in range(1, points + 1):
        tr.train(train, seconds=budget * i / points - tr.train_seconds)
        point()
    ev_seen = evaluate(d, lm.model, seen, k=k, cache_greedy=True)
    print(f"  {name}: on {len(seen)} training sequences L(K={k}) {ev_seen['expected_acceptance_length']:.3f}", flush=True)
    return {"recipe": name, "draft_vocab_size": vocab_size, "train_sequences": len(train),
            "train_response_tokens": response_tokens(train),
            "acceptance_length_on_train": round(ev_seen["expected_acceptance_length"], 4),
            "schedule": "time" if by_time else "steps",
            "train_config": asdict(cfg), "draft_vocab_coverage_heldout": round(coverage(heldout, d.draft_vocab, V), 4)
            if vocab is not None else 1.0, "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="old,new", help=f"comma-separated, of: {', '.join(RECIPES)}")
    ap.add_argument("--cpu-minutes", type=float, default=12.0, help="training budget per recipe (CPU time)")
    ap.add_argument("--points", type=int, default=6, help="evaluations along the curve (besides step 0)")
    ap.add_argument("--k", type=int, default=4, help="draft length of the acceptance estimate")
    ap.add_argument("--data-minutes", type=float, default=60.0,
                    help="the warm-up data budget (max_minutes of WarmupConfig; half of it generates): the cache key")
    ap.add_argument("--sampled-copies", type=int, default=1,
                    help="sampled answers per train prompt besides the greedy one (WarmupConfig; part of the cache key)")
    ap.add_argument("--data-only", action="store_true", help="make (or check) the cached data and stop")
    ap.add_argument("--prompts", default=str(default_prompts_path()), help="comma-separated prompt files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    names = args.recipes.split(",")
    for n in names:
        if n not in RECIPES:
            ap.error(f"unknown recipe {n!r}; known: {', '.join(RECIPES)}")
    torch.set_num_threads(1)
    lm = load_model(args.model, dtype="float32")
    wcfg = WarmupConfig(prompts=tuple(args.prompts.split(",")), max_minutes=args.data_minutes,
                        sampled_copies=args.sampled_copies)
    train, heldout, _ = build_dataset(lm, wcfg)
    data = {"train_sequences": len(train), "train_tokens": sum(len(s) for s in train),
            "train_response_tokens": response_tokens(train), "heldout_sequences": len(heldout)}
    print(f"data: {data}", flush=True)
    if args.data_only:
        return
    runs = [run_recipe(n, lm, train, heldout, args.cpu_minutes, args.points, args.k, args.seed) for n in names]
    result = {"config": {**vars(args), "out": str(args.out)}, "data": data, "runs": runs,
              "machine": {"threads": 1, "torch": torch.__version__}}
    out = args.out or RESULTS / f"drafter_recipe-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nheld-out expected acceptance length at K={args.k} vs CPU-minutes of training "
          f"({data['train_response_tokens']} response tokens of training data)\n")
    pts = [p["cpu_minutes"] for p in runs[0]["curve"]]
    print("| recipe | vocab (coverage) | " + " | ".join(f"{m:.1f} min" for m in pts) + " | steps | L on train |")
    print("|---|---|" + "---|" * len(pts) + "---|---|")
    for r in runs:
        print(f"| {r['recipe']} | {r['draft_vocab_size']} ({r['draft_vocab_coverage_heldout']:.0%}) | " +
              " | ".join(f"{p['acceptance_length']:.2f}" for p in r["curve"]) +
              f" | {r['curve'][-1]['steps']} | {r['acceptance_length_on_train']:.2f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
