"""Decode speed: plain vs EAGLE drafter vs n-gram on Understudy's engine, with transformers' `generate` (plain and
prompt lookup) as the peer -- same prompts, same machine, same run. Every speed is printed beside the plain
baseline measured in this run (speedup = tokens/s over the engine's plain tokens/s). Beside the end-to-end rate
(prompt prefills included), the rate after each prompt's first token (prefills excluded), which is what a streaming
client's time per output token sees. `--threads N` runs torch and the native kernels on N threads.

    python benchmarks/decode.py --drafter DIR [--dtypes bfloat16,float32] [--batch-sizes 1,4,16]
    python benchmarks/decode.py --model POLICY_DIR --drafter DIR --prompts grid.jsonl   # a policy's own domain

In-domain prompts are the shipped set's `heldout` split (same kinds as training, never trained on);
out-of-domain prompts are its `ood` split (code, stories, trivia). Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from understudy.drafter.model import load_drafter
from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine
from understudy.engine.loader import LoadedModel, load_model
from understudy.engine.sampling import SamplingParams
from understudy.engine.text import encode_prompt, load_prompts

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Run:
    method: str
    tokens: int
    seconds: float
    outputs: list[list[int]]
    spec: dict[str, Any] | None = None
    prefill_seconds: float | None = None  # the engine's prompt prefills (each also gives the first token)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first per prompt, over the time after the prefills: what a streaming client's TPOT
        measures (time to first token aside)."""
        if self.prefill_seconds is None or self.seconds <= self.prefill_seconds:
            return None
        return (self.tokens - len(self.outputs)) / (self.seconds - self.prefill_seconds)


ENGINE_OPTS: dict[str, Any] = {}  # EngineConfig fields set from the command line (--prefill-threads)


def engine_run(lm: LoadedModel, prompts: list[list[int]], batch: int, max_new: int, proposer: str, k: int,
               drafter=None, native_decoder: bool = True) -> Run:  # type: ignore[no-untyped-def]
    dtype = str(lm.model.dtype).removeprefix("torch.")
    cfg = EngineConfig(max_batch_size=batch, max_model_len=max(map(len, prompts)) + max_new + 1,
                       num_speculative_tokens=k if proposer != "none" else 0, proposer=proposer, dtype=dtype,
                       native_decoder=native_decoder, **ENGINE_OPTS)
    eng = Engine(lm.model, cfg, lm.eos_token_ids, drafter=drafter)
    sp = SamplingParams(max_tokens=max_new, temperature=0.0)
    eng.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up (packing, allocator)
    eng.stats.__init__()  # type: ignore[misc]
    prefill = [0.0]
    inner = eng._prefill

    def timed_prefill(seq):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return inner(seq)
        finally:
            prefill[0] += time.perf_counter() - t

    eng._prefill = timed_prefill  # type: ignore[method-assign]
    outs: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs.extend(eng.generate(prompts[i:i + batch], sp))
    dt = time.perf_counter() - t0
    spec = eng.stats.to_dict() if proposer != "none" else None
    name = proposer if proposer != "none" else "plain" if native_decoder else "plain (torch ops)"
    return Run(method=name, tokens=sum(map(len, outs)), seconds=dt,
               outputs=outs, spec=spec, prefill_seconds=prefill[0])


def hf_run(hf, tok, prompts: list[list[int]], batch: int, max_new: int, eos: tuple[int, ...],
           prompt_lookup: int = 0) -> Run:  # type: ignore[no-untyped-def]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    outs: list[list[int]] = []
    kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": False, "pad_token_id": pad,
                              "eos_token_id": list(eos)}
    if prompt_lookup:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup
    with torch.inference_mode():
        hf.generate(torch.tensor([prompts[0]]), **{**kwargs, "max_new_tokens": 4})  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            L = max(map(len, chunk))
            ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk])  # left padding
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk])
            gen = hf.generate(ids, attention_mask=mask, **kwargs)[:, L:].tolist()
            for row in gen:
                out = []
                for t in row:
                    out.append(t)
                    if t in eos:
                        break
                outs.append(out)
        dt = time.perf_counter() - t0
    name = f"hf-prompt-lookup(k={prompt_lookup})" if prompt_lookup else "hf-generate"
    return Run(method=name, tokens=sum(map(len, outs)), seconds=dt, outputs=outs)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(len(a), 1)


def bench_cell(lm: LoadedModel, hf, drafter, prompts: list[list[int]], batch: int, args) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """All methods on the same prompts, `--rounds` interleaved rounds; medians of tokens/s."""
    runs: dict[str, list[Run]] = {}
    for _ in range(args.rounds):
        order: list[tuple[str, Any]] = [("plain", lambda: engine_run(lm, prompts, batch, args.max_new_tokens, "none", 0))]
        if args.torch_ops_baseline:  # the engine before its float32 native decoder (EngineConfig.native_decoder)
            order.append(("plain (torch ops)", lambda: engine_run(lm, prompts, batch, args.max_new_tokens, "none", 0,
                                                                  native_decoder=False)))
        for k in args.ks:
            if drafter is not None:
                order.append((f"drafter k={k}", lambda k=k: engine_run(lm, prompts, batch, args.max_new_tokens,
                                                                        "drafter", k, drafter)))
            order.append((f"ngram k={k}", lambda k=k: engine_run(lm, prompts, batch, args.max_new_tokens, "ngram", k)))
        if hf is not None:
            order.append(("hf-generate", lambda: hf_run(hf, lm.tokenizer, prompts, batch, args.max_new_tokens, lm.eos_token_ids)))
            if batch == 1:  # transformers' assisted generation only supports batch size 1
                order.append(("hf-prompt-lookup", lambda: hf_run(hf, lm.tokenizer, prompts, batch, args.max_new_tokens,
                                                                 lm.eos_token_ids, prompt_lookup=max(args.ks))))
        for name, fn in order:
            runs.setdefault(name, []).append(fn())
            print(f"      {name}: {runs[name][-1].tok_s:.1f} tok/s", flush=True)
    base = statistics.median(r.tok_s for r in runs["plain"])
    dbase = statistics.median(r.decode_tok_s or 0.0 for r in runs["plain"])
    ref = runs["plain"][0].outputs
    rows = []
    for name, rs in runs.items():
        tok_s = statistics.median(r.tok_s for r in rs)
        dec = [r.decode_tok_s for r in rs if r.decode_tok_s is not None]
        dtok = statistics.median(dec) if len(dec) == len(rs) else None
        rows.append({"method": name, "tok_s": round(tok_s, 2), "speedup_vs_plain": round(tok_s / base, 3),
                     "decode_tok_s": round(dtok, 2) if dtok else None,
                     "decode_speedup_vs_plain": round(dtok / dbase, 3) if dtok and dbase else None,
                     "prefill_s_rounds": [round(r.prefill_seconds, 3) for r in rs if r.prefill_seconds is not None],
                     "tok_s_rounds": [round(r.tok_s, 2) for r in rs], "tokens": rs[0].tokens,
                     "agreement_with_plain": round(agreement(rs[0].outputs, ref), 3),
                     "spec": rs[-1].spec})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--drafter", help="drafter folder (trained for --model)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--ks", default="2,4", help="draft tokens per step to measure (comma-separated)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--prompts-per-batch-size", type=int, default=1,
                    help="prompts per domain = max(batch, this x batch) (batch 1: this many prompts, one at a time)")
    ap.add_argument("--batch1-prompts", type=int, default=6, help="prompts per domain at batch size 1")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (medians are reported)")
    ap.add_argument("--torch-ops-baseline", action="store_true",
                    help="also plain decoding with the layers run op by op (native_decoder=False)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill-threads", type=int, default=None,
                    help="EngineConfig.prefill_threads (default: the engine's, every core; 0: as --threads)")
    ap.add_argument("--prompts", type=Path, default=None,
                    help="JSONL prompt file: its 'heldout' rows are the in-domain prompts and its 'ood' rows, if any, "
                         "the out-of-domain ones (default: the shipped set)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.ks = [int(k) for k in str(args.ks).split(",")]
    torch.set_num_threads(args.threads)
    ENGINE_OPTS.update(num_threads=args.threads, prefill_threads=args.prefill_threads)
    rows_all = load_prompts(args.prompts)
    domains = {name: [r for r in rows_all if r["split"] == split]
               for name, split in (("in-domain", "heldout"), ("out-of-domain", "ood"))}
    domains = {name: rows for name, rows in domains.items() if rows}
    if not domains:
        raise SystemExit(f"--prompts {args.prompts}: no rows with split 'heldout' or 'ood' to measure on")
    results: dict[str, Any] = {"config": vars(args) | {"out": str(args.out), "prompts": str(args.prompts)},
                               "machine": machine_info(), "cells": []}
    for dtype in args.dtypes.split(","):
        lm = load_model(args.model, dtype=dtype)
        drafter = load_drafter(Path(args.drafter), lm.model, lm.fingerprint) if args.drafter else None
        hf = None
        if not args.no_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(str(lm.path), dtype=getattr(torch, dtype)).eval()
        for batch in map(int, args.batch_sizes.split(",")):
            for domain, rows in domains.items():
                n = args.batch1_prompts if batch == 1 else batch * args.prompts_per_batch_size
                prompts = [encode_prompt(lm.tokenizer, r["prompt"]) for r in rows[:n]]
                print(f"[{dtype} batch {batch} {domain}] {len(prompts)} prompts ...", flush=True)
                cell = bench_cell(lm, hf, drafter, prompts, batch, args)
                results["cells"].append({"dtype": dtype, "batch_size": batch, "domain": domain,
                                         "num_prompts": len(prompts), "rows": cell})
                print_cell(results["cells"][-1])
        del lm, hf, drafter
    out = args.out or RESULTS / f"decode-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwrote {out}")


def machine_info() -> dict[str, Any]:
    import os

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def print_cell(cell: dict[str, Any]) -> None:
    for r in cell["rows"]:
        spec = r["spec"] or {}
        dec = f" (after the first token {r['decode_tok_s']:.1f}, x{r['decode_speedup_vs_plain']})" \
            if r.get("decode_tok_s") else ""
        print(f"   {r['method']:<24} {r['tok_s']:>8.2f} tok/s  x{r['speedup_vs_plain']:<6}{dec} "
              f"agree {r['agreement_with_plain']:<5} accept-len {spec.get('mean_acceptance_length', '-')} "
              f"per-pos {spec.get('per_position_acceptance', '-')}", flush=True)


def print_table(results: dict[str, Any]) -> None:
    print("\n| dtype | batch | prompts | method | tok/s | vs plain | after the first token: tok/s (vs plain) | "
          "mean accept len | per-position acceptance | same output as plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in results["cells"]:
        for r in c["rows"]:
            spec = r["spec"] or {}
            pp = ", ".join(f"{x:.2f}" for x in spec.get("per_position_acceptance", [])) or "–"
            mal = f"{spec['mean_acceptance_length']:.2f}" if spec else "–"
            dec = f"{r['decode_tok_s']:.1f} ({r['decode_speedup_vs_plain']:.2f}x)" if r.get("decode_tok_s") else "–"
            print(f"| {c['dtype']} | {c['batch_size']} | {c['domain']} | {r['method']} | {r['tok_s']:.1f} | "
                  f"{r['speedup_vs_plain']:.2f}x | {dec} | {mal} | {pp} | {r['agreement_with_plain']:.0%} |")


if __name__ == "__main__":
    main()
