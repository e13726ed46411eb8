"""Cost of a drafter training step: scored anchors only (the default) against drafting from every anchor.

    python benchmarks/drafter_step.py [--batches 50] [--threads 1] [--data-minutes 15] [--sampled-copies 1]

The loss scores step s at anchor a only when token a+s+1 is a response token, so anchors deep in the prompt add
nothing to it but their true-feature keys. `eagle_loss` now drafts only from the anchors it scores, packed
(`DrafterTrainConfig.draft_all_anchors=False`); the old way drafted from every position. Both give the same loss
and gradients (tests/drafter/test_drafter.py checks it); this measures what the packing saves.

The data is the warm-up's cached self-distillation data (`build_dataset`; the default-budget `drafter train`
data, both shipped prompt sets, unless told otherwise). The same batches, in the training order, are run by both
variants, alternating which goes first, on one drafter in the default recipe (2,048-token draft vocabulary,
3-step unroll); each is timed on the process's CPU clock over the loss forward, backward and an AdamW step.
Reports the per-batch median ratio, the total ratio and tokens per CPU-second. JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from understudy.drafter.model import new_drafter
from understudy.drafter.train import batches, collate, eagle_loss, select_draft_vocab
from understudy.drafter.warmup import WARMUP_TRAIN, WarmupConfig, build_dataset
from understudy.engine.loader import load_model

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-minutes", type=float, default=15.0, help="the data set's budget (its cache key)")
    ap.add_argument("--sampled-copies", type=int, default=1, help="part of the data set's cache key")
    ap.add_argument("--prompts", default="", help="comma-separated prompt files (default: the shipped sets)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.batches < 2 or args.threads < 1:
        ap.error("--batches must be >= 2 and --threads >= 1")
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype="float32")
    prompts = tuple(p for p in args.prompts.split(",") if p)
    train, _, _ = build_dataset(lm, WarmupConfig(prompts=prompts, data_minutes=args.data_minutes,
                                                 sampled_copies=args.sampled_copies))
    cfg = WARMUP_TRAIN
    vocab = select_draft_vocab(train, 2048, lm.config.vocab_size, always=lm.eos_token_ids)
    drafter = new_drafter(lm.model, lm.fingerprint, vocab, seed=0).float()
    opt = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=cfg.lr)
    variants = {"scored anchors": cfg, "every anchor": replace(cfg, draft_all_anchors=True)}
    groups = list(batches(train, cfg.tokens_per_batch, torch.Generator().manual_seed(0)))[:args.batches]
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    tokens = prompt_tokens = 0
    for i, group in enumerate(groups):
        b = collate(group)
        tokens += int(b["lengths"].sum())
        prompt_tokens += int(b["prompt_lens"].sum())
        for name in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
            t0 = time.process_time()
            with torch.enable_grad():
                loss = eagle_loss(drafter, b, variants[name]).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            seconds[name].append(time.process_time() - t0)
    new, old = seconds["scored anchors"], seconds["every anchor"]
    ratios = [o / n for o, n in zip(old, new, strict=True)]
    rows = {name: {"cpu_seconds": round(sum(s), 2), "tokens_per_cpu_second": round(tokens / sum(s), 1)}
            for name, s in seconds.items()}
    result = {"config": {**vars(args), "out": str(args.out)}, "train_config": asdict(cfg),
              "data": {"batches": len(groups), "tokens": tokens, "prompt_share": round(prompt_tokens / tokens, 4)},
              "variants": rows, "speedup_total": round(sum(old) / sum(new), 4),
              "speedup_median_per_batch": round(statistics.median(ratios), 4),
              "machine": {"threads": args.threads, "torch": torch.__version__}}
    out = args.out or RESULTS / f"drafter_step-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{len(groups)} batches, {tokens} tokens ({prompt_tokens / tokens:.0%} prompt), {args.threads} thread(s), "
          "loss + backward + AdamW step, CPU time\n")
    print("| variant | CPU-s | tokens per CPU-s |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['cpu_seconds']} | {r['tokens_per_cpu_second']} |")
    print(f"\nscored anchors vs every anchor: {result['speedup_median_per_batch']}x per batch (median), "
          f"{result['speedup_total']}x in total\nwrote {out}")


if __name__ == "__main__":
    main()
