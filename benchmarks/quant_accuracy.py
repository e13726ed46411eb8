"""How far the quantised targets are from float32 (SmolLM2 by default), on the same prompts and tokens.

    python benchmarks/quant_accuracy.py [--modes int8,int4] [--prompts 8] [--max-new-tokens 64]
                                        [--tasks arith,grid-risk] [--task-problems 64]

The float32 model generates greedy continuations; every model then scores prompt + continuation (teacher
forcing, one forward without a cache). Per mode: top-1 agreement with float32 over the continuation positions,
mean KL(fp32 || quantised), mean and max |logit difference|, and for the model's own greedy decoding (plain engine)
the fraction of prompts whose output equals float32's and the mean length of the common prefix. Task accuracy: each
model (float32 included) answers the same `--task-problems` problems of each task greedily (stopping at EOS), scored
by the task's own reward (correct = reward >= 1), as the trainer's held-out evaluation does.
Writes JSON to benchmarks/results/ and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine
from understudy.engine.loader import LoadedModel, load_model
from understudy.engine.sampling import SamplingParams
from understudy.engine.text import encode_prompt, load_prompts
from understudy.trainer.tasks import get_task

# the tasks as the shipped SmolLM2 configs pose them (configs/arith-smollm2*.toml; grid-risk with its defaults)
TASK_KWARGS: dict[str, dict[str, Any]] = {"arith": {"max_digits": 2, "instruct": True}, "grid-risk": {}}

RESULTS = Path(__file__).resolve().parent / "results"


def greedy(lm: LoadedModel, prompts: list[list[int]], n: int, ignore_eos: bool = True) -> list[list[int]]:
    cfg = EngineConfig(max_batch_size=min(len(prompts), 16), max_model_len=max(map(len, prompts)) + n + 1,
                       num_speculative_tokens=0, proposer="none", dtype="float32")
    eng = Engine(lm.model, cfg, lm.eos_token_ids)
    return eng.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=ignore_eos))


def task_accuracy(lm: LoadedModel, name: str, n: int, max_new_tokens: int) -> float:
    """Greedy accuracy on n problems of task `name` (a fixed seed: every model gets the same problems)."""
    task = get_task(name, **TASK_KWARGS.get(name, {}))
    rng = random.Random(10_007)
    problems = [task.sample(rng) for _ in range(n)]
    outs = greedy(lm, [encode_prompt(lm.tokenizer, p.prompt) for p in problems], max_new_tokens, ignore_eos=False)
    scores = [task.reward(p, lm.tokenizer.decode(o, skip_special_tokens=True)) for p, o in zip(problems, outs,
                                                                                                  strict=True)]
    return sum(s >= 1.0 for s in scores) / n


@torch.inference_mode()
def score(lm: LoadedModel, seqs: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
    """Log-probs [T_cont, V] at the continuation positions of each sequence."""
    out = []
    for seq, s in zip(seqs, starts, strict=True):
        hidden = lm.model(torch.tensor([seq]))
        out.append(torch.log_softmax(lm.model.logits(hidden[0, s - 1:-1]), dim=-1))
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modes", default="int8,int4")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--tasks", default="arith,grid-risk", help="comma-separated task names; empty for none")
    ap.add_argument("--task-problems", type=int, default=64)
    ap.add_argument("--task-max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = load_model(args.model, dtype="float32")
    rows = load_prompts(splits=("heldout",))[:args.prompts]
    prompts = [encode_prompt(ref.tokenizer, r["prompt"]) for r in rows]
    ref_out = greedy(ref, prompts, args.max_new_tokens)
    seqs = [p + o for p, o in zip(prompts, ref_out, strict=True)]
    starts = [len(p) for p in prompts]
    ref_lp = score(ref, seqs, starts)
    tasks = [t for t in args.tasks.split(",") if t]
    results: dict[str, Any] = {"config": vars(args) | {"out": str(args.out)}, "rows": [], "task_accuracy": {
        "float32": {t: task_accuracy(ref, t, args.task_problems, args.task_max_new_tokens) for t in tasks}}}
    print("float32 task accuracy", results["task_accuracy"]["float32"], flush=True)
    for mode in args.modes.split(","):
        lm = load_model(args.model, dtype="float32", quantize=mode)
        lp = score(lm, seqs, starts)
        top1 = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(ref_lp, lp, strict=True)])
        kl = torch.cat([F.kl_div(b, a, log_target=True, reduction="none").sum(-1) for a, b in zip(ref_lp, lp, strict=True)])
        dlogit = torch.cat([(a - b).abs().flatten() for a, b in zip(ref_lp, lp, strict=True)])
        outs = greedy(lm, prompts, args.max_new_tokens)
        same = [o == r for o, r in zip(outs, ref_out, strict=True)]
        prefix = [common_prefix(o, r) for o, r in zip(outs, ref_out, strict=True)]
        row = {"mode": mode, "top1_agreement": round(float(top1.mean()), 4), "mean_kl": float(kl.mean()),
               "max_kl": float(kl.max()), "mean_abs_logprob_diff": float(dlogit.mean()),
               "max_abs_logprob_diff": float(dlogit.max()), "greedy_identical": sum(same) / len(same),
               "greedy_common_prefix_mean": sum(prefix) / len(prefix)}
        results["task_accuracy"][mode] = {t: task_accuracy(lm, t, args.task_problems, args.task_max_new_tokens)
                                          for t in tasks}
        results["rows"].append(row)
        print(row, flush=True)
        del lm
    out = args.out or RESULTS / f"quant_accuracy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{len(prompts)} prompts x {args.max_new_tokens} float32-greedy tokens, teacher-forced\n")
    print("| mode | top-1 agreement | mean KL | max KL | mean abs log-prob diff | greedy outputs identical | "
          "mean common prefix (tokens) |")
    print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['mode']} | {r['top1_agreement']:.2%} | {r['mean_kl']:.4f} | {r['max_kl']:.3f} | "
              f"{r['mean_abs_logprob_diff']:.4f} | {r['greedy_identical']:.0%} | {r['greedy_common_prefix_mean']:.1f} |")
    if tasks:
        print(f"\ngreedy task accuracy, {args.task_problems} problems per task (the same for every model)\n")
        print("| model | " + " | ".join(tasks) + " |")
        print("|---|" + "---|" * len(tasks))
        for model, acc in results["task_accuracy"].items():
            print(f"| {model} | " + " | ".join(f"{acc[t]:.1%}" for t in tasks) + " |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
