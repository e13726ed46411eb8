"""What response_format (grammar-constrained decoding) costs per engine step, against the same step unconstrained.

    python benchmarks/structured_cost.py [--model smollm2-135m] [--batches 1,8] [--repeats 3] [--k 0,3]

For each batch size and speculation depth (k = 0: plain; k > 0: n-gram drafts, whose verification positions are
all masked), grid-risk prompts are decoded greedily twice per repeat, interleaved: unconstrained (ignore_eos,
`--tokens` tokens) and constrained by the grid-risk JSON Schema of docs/structured-output.md (until the grammar
completes). The medians of the full-batch decode steps' CPU time (this thread's clock, which a busy machine
disturbs less than the wall clock; prefill steps excluded) are reported side by side, with the median time the
constrained steps spent masking (`Engine._apply_grammars`: every verification position's mask + applying it).

Each pair runs after an untimed warm-up, in alternating order. The mask alone: the constrained answers are replayed through a fresh matcher, timing `fill_masks` (llguidance's
mask for one position, and for a position + 3 drafts) and `apply_bitmask` (unpack + masked_fill over the
vocabulary), medians in microseconds. Writes JSON to benchmarks/results/ and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine
from understudy.engine.loader import load_model
from understudy.engine.sampling import SamplingParams
from understudy.engine.structured import StructuredOutputs, apply_bitmask, new_bitmask
from understudy.engine.text import encode_prompt
from understudy.trainer.tasks.grid_risk import GridRiskTask, answer_schema

RESULTS = Path(__file__).resolve().parent / "results"
GRID_SCHEMA = answer_schema()


CLOCK = time.thread_time  # CPU time of this thread (torch runs on it with one thread): robust to a busy machine


def decode_steps(lm: Any, prompts: list[list[int]], params: SamplingParams,
                 k: int) -> tuple[list[float], list[float], list[list[int]]]:
    """Decode to the end; returns the full-batch decode steps' CPU seconds, the part of each spent masking
    (Engine._apply_grammars: llguidance masks for every verification position + applying them), and the outputs."""
    eng = Engine(lm.model, EngineConfig(max_batch_size=len(prompts), max_model_len=1024, num_speculative_tokens=k,
                                        proposer="ngram" if k else "none", dtype="float32", num_threads=1),
                 lm.eos_token_ids)
    masking = [0.0]
    inner = eng._apply_grammars

    def timed(*a: Any) -> Any:
        t0 = CLOCK()
        try:
            return inner(*a)
        finally:
            masking[0] += CLOCK() - t0

    eng._apply_grammars = timed  # type: ignore[method-assign]
    outs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    times, masks = [], []
    while eng.has_unfinished():
        masking[0] = 0.0
        t0 = CLOCK()
        for o in eng.step():
            outs[o.request_id].extend(o.new_token_ids)
        dt = CLOCK() - t0
        if eng.last_step.num_prefill_tokens == 0 and eng.last_step.batch_size == len(prompts):
            times.append(dt)  # full-batch decode steps only
            masks.append(masking[0])
    return times, masks, [outs[str(i)] for i in range(len(prompts))]


def mask_micro(so: StructuredOutputs, answers: list[list[int]], vocab: int) -> dict[str, float]:
    grammar = so.json_schema(GRID_SCHEMA)
    one, with_drafts, apply = [], [], []
    logits = torch.randn(1, vocab)
    for toks in answers:
        m = grammar.matcher()
        masks = new_bitmask(4, vocab_size=vocab)
        for i, t in enumerate(toks):
            t0 = time.perf_counter()
            m.fill_masks([], masks)
            one.append(time.perf_counter() - t0)
            drafts = toks[i:i + 3]  # what the model goes on to write: every draft allowed
            t0 = time.perf_counter()
            m.fill_masks(drafts, masks)
            with_drafts.append(time.perf_counter() - t0)
            m.settle()
            t0 = time.perf_counter()
            apply_bitmask(logits.clone(), masks[:1])
            apply.append(time.perf_counter() - t0)
            if not m.advance(t) or m.stopped:
                break
    us = 1e6
    return {"fill_mask_us": statistics.median(one) * us, "fill_mask_plus_3_drafts_us": statistics.median(with_drafts) * us,
            "apply_bitmask_us": statistics.median(apply) * us, "positions": len(one)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--k", default="0,3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--out", default=str(RESULTS / "structured_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model(args.model, dtype="float32")
    so = StructuredOutputs(lm.tokenizer, lm.config.vocab_size, lm.eos_token_ids)
    t0 = time.perf_counter()
    so.lltokenizer()
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = so.json_schema(GRID_SCHEMA)
    compile_s = time.perf_counter() - t0
    task = GridRiskTask()
    batches = [int(x) for x in args.batches.split(",")]
    ks = [int(x) for x in args.k.split(",")]
    prompts = [encode_prompt(lm.tokenizer, task.sample(random.Random(i)).prompt +
                             "\nAnswer as JSON: verdict, overloaded lines, n_minus_1_ok.") for i in range(max(batches))]
    plain = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=200, temperature=0.0, grammar=grammar)
    rows, answers = [], []
    for b in batches:
        for k in ks:
            free: list[float] = []
            json_steps: list[float] = []
            json_masks: list[float] = []
            decode_steps(lm, prompts[:b], SamplingParams(max_tokens=8, temperature=0.0), k)  # warm-up, not timed
            for r in range(args.repeats):
                for kind in (("free", "json") if r % 2 == 0 else ("json", "free")):  # alternate the order
                    if kind == "free":
                        free += decode_steps(lm, prompts[:b], plain, k)[0]
                        continue
                    t, m, outs = decode_steps(lm, prompts[:b], constrained, k)
                    json_steps += t
                    json_masks += m
                    answers = outs if len(outs) > len(answers) else answers
            f, c, m = statistics.median(free), statistics.median(json_steps), statistics.median(json_masks)
            rows.append({"batch": b, "k": k, "unconstrained_step_ms": f * 1e3, "constrained_step_ms": c * 1e3,
                         "masking_ms": m * 1e3, "masking_share": m / c, "ratio": c / f,
                         "steps": [len(free), len(json_steps)]})
    micro = mask_micro(so, answers, lm.config.vocab_size)
    result = {"model": args.model, "vocab_size": lm.config.vocab_size, "threads": 1, "dtype": "float32",
              "tokenizer_build_s": tokenizer_s, "schema_compile_s": compile_s, "mask": micro, "steps": rows,
              "example": lm.tokenizer.decode(answers[0], skip_special_tokens=True),
              "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"llguidance tokenizer build {tokenizer_s:.2f} s (once per server), schema compile {compile_s * 1e3:.1f} ms "
          f"(once per schema, cached); mask medians over {micro['positions']} positions: fill_masks "
          f"{micro['fill_mask_us']:.0f} us, with 3 drafts {micro['fill_mask_plus_3_drafts_us']:.0f} us, "
          f"apply_bitmask {micro['apply_bitmask_us']:.0f} us")
    print("| batch | k | unconstrained step | constrained step | of which masking | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['k']} | {r['unconstrained_step_ms']:.1f} ms | {r['constrained_step_ms']:.1f} ms | "
              f"{r['masking_ms']:.2f} ms ({100 * r['masking_share']:.1f}%) | x{r['ratio']:.3f} |")
    print("example:", result["example"])


if __name__ == "__main__":
    main()
