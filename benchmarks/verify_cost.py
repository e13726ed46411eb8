"""Cost of a width-w target forward (what verifying w-1 drafts costs) relative to width 1, per weight format.

    python benchmarks/verify_cost.py [--modes none,int8,int4] [--widths 1,2,3,4,5,6,7,8] [--prefix 256]
    python benchmarks/verify_cost.py --modes none-unfused,none --widths 1,2,3,5,8   # float32: oneDNN vs fused
    python benchmarks/verify_cost.py --modes none --native-threads 1,2 --widths 1,5  # the native kernels on 1 vs 2 threads

For each mode the model is loaded (`load_model(quantize=...)`), a `--prefix`-token prompt is prefilled into a KV
cache, and then forward + LM head over w new tokens at positions prefix..prefix+w-1 is timed exactly as
`engine.verify` runs it (batch 1 by default). Modes and widths are interleaved within every repeat; the medians
are reported as ms, as the ratio to the same mode's width 1 and as the ratio to float32's width 1.

Roofline, per mode: bytes of linear weights read per token (layers + LM head; the embedding is a lookup), this
machine's read bandwidth measured in the same run (a plain `sum` over a 256 MB float32 tensor: bytes / seconds, on
one thread and, with --native-threads above 1, on that many),
the cap it puts on plain decoding (bandwidth / bytes per token) and the fraction of the cap a width-1 step reaches.
Writes JSON to benchmarks/results/ and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from understudy.engine import qkernels
from understudy.engine.engine import NATIVE_LINEAR_ROWS
from understudy.engine.loader import load_model
from understudy.engine.model import enable_cpu_packing, set_native_linears
from understudy.engine.quant import FusedDecoder, weight_bytes
from understudy.engine.text import encode_prompt

RESULTS = Path(__file__).resolve().parent / "results"
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def read_bandwidth(mb: int = 256, repeats: int = 7, threads: int = 1) -> float:
    """Bytes per second of a streaming read (sum over an `mb` MB float32 tensor) on `threads` torch threads, median."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = torch.ones(mb * (1 << 20) // 4)
        t.sum()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            t.sum()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return t.numel() * 4 / statistics.median(times)


class Setup:
    def __init__(self, mode: str, lm: Any, args: argparse.Namespace, prompt: list[int], threads: int = 1) -> None:
        self.mode = mode
        self.lm = lm
        self.model = self.lm.model
        self.threads = threads  # the native kernels' threads (set before every timed block)
        enable_cpu_packing(self.model)
        self.wmax = max(args.widths)
        self.cache = self.model.allocate_cache(args.batch, args.prefix + self.wmax + 1)
        self.prefix, self.batch = args.prefix, args.batch
        toks = torch.tensor([prompt] * args.batch)
        with torch.inference_mode():
            self.model(toks, torch.arange(args.prefix).expand(args.batch, -1), self.cache, kv_len=args.prefix)
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, self.model.config.vocab_size, (args.batch, self.wmax), generator=g)

    @torch.inference_mode()
    def step(self, w: int) -> torch.Tensor:
        positions = self.prefix + torch.arange(w).expand(self.batch, w)
        hidden = self.model(self.tokens[:, :w], positions, self.cache, kv_len=self.prefix + w)
        return self.model.logits(hidden)

    def time(self, w: int, calls: int, clock: str) -> float:
        now = CLOCKS[clock]
        qkernels.set_threads(self.threads)  # the native kernels on this setup's threads (setups share a model)
        self.step(w)
        t0 = now()
        for _ in range(calls):
            self.step(w)
        return (now() - t0) / calls


def make_prompt(lm: Any, n: int) -> list[int]:
    base = encode_prompt(lm.tokenizer, "Explain how a refrigerator works, step by step, for a curious child.")
    return (base * (n // len(base) + 1))[:n]


def build_setups(args: argparse.Namespace, native_threads: list[int], error: Any) -> dict[str, Setup]:
    """One Setup per mode, and per native thread count for the fused modes (they share the mode's model)."""
    setups: dict[str, Setup] = {}
    prompt: list[int] | None = None
    for mode in args.modes.split(","):
        quantize, _, variant = mode.partition("-")
        if variant not in ("", "unfused"):
            error(f"--modes: {mode!r}; a mode is none, int8 or int4, optionally with -unfused")
        lm = load_model(args.model, dtype="float32", quantize=quantize)
        if variant == "unfused":  # the same weights run op by op (the A/B of the fused decoder)
            lm.model.fused = None
        elif quantize == "none":  # float32 as the engine runs it (EngineConfig.native_decoder)
            lm.model.fused = FusedDecoder.for_float_model(lm.model)
        if lm.model.fused is not None:  # the LM head native too, as an engine sets it
            set_native_linears(lm.model, NATIVE_LINEAR_ROWS)
        prompt = prompt or make_prompt(lm, args.prefix)
        for t in native_threads if lm.model.fused is not None else [1]:
            name = mode if len(native_threads) == 1 or lm.model.fused is None else f"{mode} x{t} threads"
            setups[name] = Setup(name, lm, args, prompt, threads=t)
        print(f"loaded {mode}: {weight_bytes(lm.model)['total'] / 1e6:.0f} MB of linear weights", flush=True)
    return setups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modes", default="none,int8,int4",
                    help="quantize modes (none = float32); none-unfused / int8-unfused / int4-unfused run the layers "
                         "op by op (oneDNN for float32) instead of in the fused native decoder")
    ap.add_argument("--widths", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--prefix", type=int, default=256, help="tokens already in the KV cache")
    ap.add_argument("--batch", type=int, default=1, help="sequences verified together")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=4, help="forwards per timed block")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or this thread's CPU time (steadier on a shared, oversubscribed machine)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the op-by-op modes)")
    ap.add_argument("--native-threads", default="1",
                    help="threads of the native kernels (fused modes), comma-separated: one row per mode and count")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.widths = [int(w) for w in args.widths.split(",")]
    native_threads = [int(t) for t in args.native_threads.split(",")]
    torch.set_num_threads(args.threads)
    setups = build_setups(args, native_threads, ap.error)
    modes = list(setups)
    samples: dict[str, dict[int, list[float]]] = {m: {w: [] for w in args.widths} for m in modes}
    bw: list[float] = []
    bw_threads: list[float] = []
    for r in range(args.repeats):
        bw.append(read_bandwidth())
        if max(native_threads) > 1:
            bw_threads.append(read_bandwidth(threads=max(native_threads)))
        for mode in modes:
            for w in args.widths:
                samples[mode][w].append(setups[mode].time(w, args.calls, args.clock))
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{m} w1 {samples[m][args.widths[0]][-1] * 1e3:.1f} ms" for m in modes), flush=True)
    bandwidth = statistics.median(bw)
    base_mode = modes[0]
    base = statistics.median(samples[base_mode][args.widths[0]])
    rows = []
    for mode in modes:
        ms = {w: statistics.median(samples[mode][w]) for w in args.widths}
        nbytes = weight_bytes(setups[mode].model)["total"]
        cap = bandwidth / nbytes
        rows.append({
            "mode": mode, "weight_bytes": nbytes,
            "ms": {str(w): round(v * 1e3, 2) for w, v in ms.items()},
            "vs_width1": {str(w): round(v / ms[args.widths[0]], 3) for w, v in ms.items()},
            f"vs_{base_mode}_width1": {str(w): round(v / base, 3) for w, v in ms.items()},
            "samples_ms": {str(w): [round(x * 1e3, 2) for x in samples[mode][w]] for w in args.widths},
            "roofline": {"bytes_per_token": nbytes, "read_GBps": round(bandwidth / 1e9, 2),
                         "cap_tok_s": round(cap, 1), "width1_tok_s": round(1 / ms[args.widths[0]], 1),
                         "fraction_of_cap": round((1 / ms[args.widths[0]]) / cap, 3)},
        })
    result = {"config": vars(args) | {"out": str(args.out)}, "read_bandwidth_GBps": round(bandwidth / 1e9, 2),
              "bandwidth_samples_GBps": [round(b / 1e9, 2) for b in bw], "rows": rows}
    if bw_threads:
        result[f"read_bandwidth_GBps_{max(native_threads)}_threads"] = round(statistics.median(bw_threads) / 1e9, 2)
    out = args.out or RESULTS / f"verify_cost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result, args.widths, base_mode)
    print(f"\nwrote {out}")


def print_table(result: dict[str, Any], widths: list[int], base_mode: str) -> None:
    c = result["config"]
    print(f"\nwidth-w forward + LM head over a {c['prefix']}-token KV-cached prefix, batch {c['batch']}, {c['clock']} "
          f"time: ms (x own width 1) [x {base_mode} width 1], medians of {c['repeats']}\n")
    print("| mode | " + " | ".join(f"w={w}" for w in widths) + " |")
    print("|---|" + "---|" * len(widths))
    for r in result["rows"]:
        cells = [f"{r['ms'][str(w)]:.1f} ({r['vs_width1'][str(w)]:.2f}) [{r[f'vs_{base_mode}_width1'][str(w)]:.2f}]"
                 for w in widths]
        print(f"| {r['mode']} | " + " | ".join(cells) + " |")
    more = [f"{v} GB/s on {k.rsplit('_', 2)[-2]} threads" for k, v in result.items() if k.endswith("_threads")]
    print(f"\nroofline (read bandwidth {result['read_bandwidth_GBps']} GB/s, single-threaded sum over 256 MB"
          f"{'; ' + ', '.join(more) if more else ''}; the cap below is the single-threaded one):\n")
    print("| mode | weight MB/token | cap tok/s | width-1 tok/s | fraction of cap |")
    print("|---|---|---|---|---|")
    for r in result["rows"]:
        f = r["roofline"]
        print(f"| {r['mode']} | {f['bytes_per_token'] / 1e6:.0f} | {f['cap_tok_s']} | {f['width1_tok_s']} | "
              f"{f['fraction_of_cap']:.0%} |")


if __name__ == "__main__":
    main()
