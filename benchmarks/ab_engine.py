"""A/B decode speed of the engine at two commits, interleaved in one run (a regression check for refactors).

    python benchmarks/ab_engine.py --base REV [--model smollm2-135m] [--rounds 3] [--max-new-tokens 64]

The base commit is checked out into a temporary git worktree; each round runs the same measurement in a fresh
interpreter on the base tree, then on this tree (ABAB...), so both see the same machine load. Modes: plain
decoding, n-gram K=4, and an untrained drafter at K=2 (its acceptance is ~0; it measures the drafter path's cost,
not its benefit) at batch 1 and 8, greedy, ignore_eos. Prints tokens/s medians and the ratio this/base, checks
that both trees emit the same tokens, and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Runs inside each tree; only APIs both layouts have (the drafter moved from engine/ to drafter/).
MEASURE = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine
from understudy.engine.loader import load_model
from understudy.engine.sampling import SamplingParams
from understudy.engine.text import encode_prompt, load_prompts
try:
    from understudy.drafter.model import new_drafter
except ImportError:
    from understudy.engine.drafter import new_drafter
model, max_new, batches = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
lm = load_model(model, dtype="float32")
prompts = [encode_prompt(lm.tokenizer, r["prompt"]) for r in load_prompts(splits=("heldout",))][:max(batches)]
greedy = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
out = {}
for mode, k, proposer in (("plain", 0, "none"), ("ngram-k4", 4, "ngram"), ("drafter-k2", 2, "drafter")):
    for b in batches:
        d = new_drafter(lm.model, lm.fingerprint, seed=0) if proposer == "drafter" else None
        eng = Engine(lm.model, EngineConfig(max_batch_size=b, max_model_len=1024, num_speculative_tokens=k,
                                            proposer=proposer, dtype="float32"), lm.eos_token_ids, drafter=d)
        eng.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
        t0 = time.perf_counter()
        toks = eng.generate(prompts[:b], greedy)
        dt = time.perf_counter() - t0
        out[f"{mode}@b{b}"] = {"tok_s": sum(map(len, toks)) / dt, "tokens": toks}
print("RESULT " + json.dumps(out))
"""


def run_tree(tree: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", MEASURE, args.model, str(args.max_new_tokens), args.batch_sizes],
                       cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"measurement in {tree} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit to compare against (e.g. the one before a refactor)")
    ap.add_argument("--this", default=None, help="the commit to measure (default: the working tree)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8")
    args = ap.parse_args()
    base_sha = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    head_sha = "working-tree" if args.this is None else subprocess.run(
        ["git", "rev-parse", "--short", args.this], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        trees = {"base": Path(tmp) / "base", "this": ROOT if args.this is None else Path(tmp) / "this"}
        for name, rev in (("base", args.base), ("this", args.this)):
            if rev is not None:
                subprocess.run(["git", "worktree", "add", "--detach", str(trees[name]), rev], cwd=ROOT, check=True,
                               capture_output=True)
        try:
            rounds: dict[str, list[dict]] = {"base": [], "this": []}
            for i in range(args.rounds):
                for name, tree in trees.items():
                    t0 = time.monotonic()
                    rounds[name].append(run_tree(tree, args))
                    print(f"round {i + 1} {name}: {time.monotonic() - t0:.0f} s", flush=True)
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    rows = []
    for key in rounds["this"][0]:
        b = statistics.median(r[key]["tok_s"] for r in rounds["base"])
        t = statistics.median(r[key]["tok_s"] for r in rounds["this"])
        same = all(r[key]["tokens"] == rounds["base"][0][key]["tokens"] for r in rounds["base"] + rounds["this"])
        rows.append({"mode": key, "base_tok_s": round(b, 2), "this_tok_s": round(t, 2), "ratio": round(t / b, 3),
                     "same_tokens": same})
    print(f"\n| mode | {base_sha} tok/s | {head_sha} tok/s | ratio | same tokens |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['base_tok_s']} | {r['this_tok_s']} | {r['ratio']} | {r['same_tokens']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"ab-engine-{base_sha}-{head_sha}.json"
    out.write_text(json.dumps({"base": base_sha, "this": head_sha, "rounds": args.rounds,
                               "max_new_tokens": args.max_new_tokens, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
