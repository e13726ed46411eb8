"""What a process on the *other* core costs a decoding rollout worker: the bound on "spot training beside the long
tail is free" on one CPU node.

    python benchmarks/spot_interference.py [--model smollm2-135m] [--batch 4] [--tokens 48] [--rounds 3]

The decoding worker (this process) is pinned to core 0 and decodes greedily with its own engine, as a Ray rollout
actor does. A second process, pinned to core 1, runs one of:

  none      nothing (the baseline)
  compute   small matrix products that stay in the core's cache: busy CPU, no memory traffic
  memory    sums over a 512 MB tensor: memory bandwidth, little compute
  spot      the drafter's training pattern: a [tokens, hidden] x [hidden, vocab] product and a softmax over the
            vocabulary (2048 tokens per batch, the spot trainer's default), forward and backward

Rounds alternate the modes (none, compute, memory, spot, none, ...); the table gives median tok/s and the ratio to
`none` from the same run. If `compute` costs nothing and `memory`/`spot` cost what the spot trainer costs in
benchmarks/rl_step.py, the interference is the shared memory bus, which separate accelerators do not share.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("none", "compute", "memory", "spot")


def _background(mode: str, ready: mp.Event, stop: mp.Event, hidden: int, vocab: int) -> None:
    os.sched_setaffinity(0, {1})
    torch.set_num_threads(1)
    if mode == "compute":
        a = torch.randn(128, 128)
        ready.set()
        while not stop.is_set():
            for _ in range(200):
                a = torch.tanh(a @ a)
    elif mode == "memory":
        big = torch.ones(128 * 1024 * 1024)  # 512 MB
        ready.set()
        while not stop.is_set():
            big.sum()
    elif mode == "spot":
        x = torch.randn(2048, hidden, requires_grad=True)
        head = torch.randn(vocab, hidden) * 0.02
        target = torch.softmax(torch.randn(2048, vocab), -1)
        ready.set()
        while not stop.is_set():
            logits = x @ head.T
            loss = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
            loss.backward()
            x.grad = None
    else:
        ready.set()
        stop.wait()


def decode_tok_s(eng, prompts, params) -> float:
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    return sum(len(o) for o in outs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "spot_interference.json")
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 cores: the worker on core 0, the other process on core 1")

    from understudy.engine.config import EngineConfig
    from understudy.engine.engine import Engine
    from understudy.engine.loader import load_model
    from understudy.engine.sampling import SamplingParams
    from understudy.engine.text import encode_prompt, load_prompts

    os.sched_setaffinity(0, {0})
    lm = load_model(args.model, dtype="float32")
    eng = Engine(lm.model, EngineConfig(max_batch_size=args.batch, max_model_len=1024, num_speculative_tokens=0,
                                        num_threads=1), lm.eos_token_ids)
    prompts = [encode_prompt(lm.tokenizer, row["prompt"]) for row in load_prompts()[:args.batch]]
    params = [SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True) for _ in prompts]
    decode_tok_s(eng, prompts, params)  # warm-up: packed weights, caches
    cfg = lm.model.config
    ctx = mp.get_context("spawn")
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            ready, stop = ctx.Event(), ctx.Event()
            p = ctx.Process(target=_background, args=(mode, ready, stop, cfg.hidden_size, cfg.vocab_size))
            p.start()
            ready.wait()
            time.sleep(0.5)
            samples[mode].append(decode_tok_s(eng, prompts, params))
            stop.set()
            p.join()
            print(f"round {r + 1} {mode:<8} {samples[mode][-1]:.2f} tok/s", flush=True)
    base = statistics.median(samples["none"])
    rows = [{"mode": m, "tok_s": round(statistics.median(samples[m]), 3),
             "vs_none": round(statistics.median(samples[m]) / base, 3), "samples": [round(x, 3) for x in samples[m]]}
            for m in MODES]
    print(f"\n{args.model}, batch {args.batch}, {args.tokens} tokens each, greedy; worker on core 0, the other "
          f"process on core 1; medians of {args.rounds} rounds\n")
    print("| beside the worker | tok/s | vs none |\n|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['tok_s']:.2f} | {row['vs_none']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
