"""Linear-layer kernels at SmolLM2-135M's shapes: fp32 (MKL, oneDNN pre-packed) vs weight-only int8/int4.

    python benchmarks/linear_kernels.py [--rows 1,2,5,8,16] [--repeats 7] [--out FILE]

Each candidate computes y = x W^T for x [M, K] float32 and W [N, K]:
  fp32-mkl       F.linear (MKL sgemm, packs W on every call)
  fp32-onednn    oneDNN with W pre-packed once (understudy.engine.model.Linear's path; the baseline)
  int8-dequant   W int8 + per-channel scales, dequantised to fp32 on every call, then F.linear
  int8pack       torch.ops.aten._weight_int8pack_mm (int8 W, per-output-channel scales, fp32 x)
  int4pack-g{G}  torch.ops.aten._weight_int4pack_mm_for_cpu (W packed by _convert_weight_to_int4pack_for_cpu,
                 group-wise scale + zero over G input channels)
  *-bf16x        the same kernel fed bfloat16 activations (x cast to bf16, y cast back to fp32)
  fp16w-fbgemm   fbgemm's fp16-weight GEMM with fp32 activations (weight-only, half the traffic of fp32)
  int8-native    our AVX2 kernel (understudy.engine.qkernels): int8 W per-channel scales, fp32 x, lanes = outputs
  int4-native-g{G} our AVX2 kernel: 4-bit codes, fp16 scale + minimum per group of G inputs, fp32 x
  int8g-native-g{G} the same kernel with 8-bit codes (symmetric int8 per group of G inputs)
  w8a8-fbgemm    (informational) quantized.linear_dynamic: int8 W and int8 activations quantised per call;
                 not weight-only (activations lose precision too) and deprecated in torch 2.13

The whole model's weights (540 MB fp32) never fit in the 32 MB L3, so decoding streams every matrix from DRAM.
To measure that regime rather than a cache-resident one, each candidate cycles through enough copies of its
weight to exceed `--cold-bytes` (default 128 MB). Candidates are interleaved within every repeat; medians.
Writes JSON to benchmarks/results/ and prints a markdown table (ms per call, and the ratio to fp32-onednn).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from understudy.engine import qkernels
from understudy.engine.quant import quantize_int4, quantize_int8, quantize_int8_groups, torch_int4_pack

RESULTS = Path(__file__).resolve().parent / "results"

# (name, N out, K in): the brief's shapes, and the fused ones the model actually runs
SHAPES: list[tuple[str, int, int]] = [
    ("attn o 576x576", 576, 576),
    ("k or v 576x192", 192, 576),
    ("fused qkv 576x960", 960, 576),
    ("gate or up 576x1536", 1536, 576),
    ("fused gate+up 576x3072", 3072, 576),
    ("down 1536x576", 576, 1536),
    ("LM head 576x49152", 49152, 576),
]

Kernel = Callable[[torch.Tensor, int], torch.Tensor]  # (x, copy index) -> y


def copies_for(nbytes: int, cold_bytes: int) -> int:
    return max(1, -(-cold_bytes // max(nbytes, 1)))


def make_candidates(w: torch.Tensor, cold_bytes: int, groups: list[int]) -> dict[str, Kernel]:
    N, K = w.shape
    cands: dict[str, Kernel] = {}

    n = copies_for(w.numel() * 4, cold_bytes)
    ws = [w.clone() for _ in range(n)]
    cands["fp32-mkl"] = lambda x, i: F.linear(x, ws[i % n])
    packed = [torch.ops.mkldnn._reorder_linear_weight(t, 8) for t in ws]
    cands["fp32-onednn"] = lambda x, i: torch.ops.mkldnn._linear_pointwise(x, packed[i % n], None, "none", [], "")

    q8, s8 = quantize_int8(w)
    n8 = copies_for(q8.numel(), cold_bytes)
    q8s = [(q8.clone(), s8.clone()) for _ in range(n8)]
    cands["int8-dequant"] = lambda x, i: F.linear(x, q8s[i % n8][0].float() * q8s[i % n8][1].unsqueeze(1))
    cands["int8pack"] = lambda x, i: torch.ops.aten._weight_int8pack_mm(x, *q8s[i % n8])
    q8b = [(q, s.bfloat16()) for q, s in q8s]
    cands["int8pack-bf16x"] = lambda x, i: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), *q8b[i % n8]).float()

    for g in groups:
        if K % g:
            continue
        q4, sz = torch_int4_pack(*quantize_int4(w, g), torch.float32)
        n4 = copies_for(q4.numel() + sz.numel() * 4, cold_bytes)
        q4s = [(q4.clone(), sz.clone()) for _ in range(n4)]
        cands[f"int4pack-g{g}"] = (lambda x, i, g=g, q4s=q4s, n4=n4:
                                   torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4s[i % n4][0], g, q4s[i % n4][1]))
        q4b = [(q, sz.bfloat16()) for q, sz in q4s]
        cands[f"int4pack-bf16x-g{g}"] = (lambda x, i, g=g, q4b=q4b, n4=n4:
                                         torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), q4b[i % n4][0], g,
                                                                                    q4b[i % n4][1]).float())

    lib = qkernels.load()
    if lib is not None:
        P8, S8 = qkernels.pack_int8(q8), qkernels.pad_vector(s8)
        p8s = [(P8.clone(), S8) for _ in range(n8)]
        cands["int8-native"] = lambda x, i: native_int8(lib, x, *p8s[i % n8], N)
        for g in groups:
            if K % g:
                continue
            codes, scale, minimum = quantize_int4(w, g)
            packs = (qkernels.pack_int4(codes), qkernels.pack_groups(scale), qkernels.pack_groups(minimum))
            nn4 = copies_for(sum(t.numel() * t.element_size() for t in packs), cold_bytes)
            p4s = [tuple(t.clone() for t in packs) for _ in range(nn4)]
            cands[f"int4-native-g{g}"] = lambda x, i, g=g, p4s=p4s, nn4=nn4: native_grouped(lib, x, *p4s[i % nn4], g, 4, N)
            codes, scale, minimum = quantize_int8_groups(w, g)
            packs = (qkernels.pack_codes8(codes), qkernels.pack_groups(scale), qkernels.pack_groups(minimum))
            ng8 = copies_for(sum(t.numel() * t.element_size() for t in packs), cold_bytes)
            pg8 = [tuple(t.clone() for t in packs) for _ in range(ng8)]
            cands[f"int8g-native-g{g}"] = lambda x, i, g=g, pg8=pg8, ng8=ng8: native_grouped(lib, x, *pg8[i % ng8], g, 8, N)
    else:
        print(f"  (native kernels unavailable: {qkernels.unavailable_reason()})")

    nh = copies_for(N * K * 2, cold_bytes)
    zero = torch.zeros(N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "deprecated" (torch 2.13) but present
        f16 = [torch.fbgemm_pack_gemm_matrix_fp16(w) for _ in range(nh)]
    cands["fp16w-fbgemm"] = lambda x, i: torch.fbgemm_linear_fp16_weight(x, f16[i % nh], zero)

    try:
        with torch.no_grad():
            scale = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
            qw = torch.quantize_per_channel(w, scale, torch.zeros(N, dtype=torch.long), 0, torch.qint8)
            pw = torch.ops.quantized.linear_prepack(qw, None)
        nf = copies_for(N * K, cold_bytes)
        pws = [pw] + [torch.ops.quantized.linear_prepack(qw.clone(), None) for _ in range(nf - 1)]
        cands["w8a8-fbgemm"] = lambda x, i: torch.ops.quantized.linear_dynamic(x, pws[i % nf])
    except (RuntimeError, AttributeError) as e:  # quantized engine missing in this build
        print(f"  (w8a8-fbgemm unavailable: {e})")
    return cands


def native_int8(lib, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, N: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    M, K = x.shape
    y = torch.empty(M, N)
    lib.wq_int8_linear(x.data_ptr(), M, K, K, w.data_ptr(), s.data_ptr(), None, y.data_ptr(), N)
    return y


def native_grouped(lib, x: torch.Tensor, w: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor, g: int,  # type: ignore[no-untyped-def]
                   bits: int, N: int) -> torch.Tensor:
    M, K = x.shape
    y = torch.empty(M, N)
    lib.wq_grouped_linear(x.data_ptr(), M, K, K, w.data_ptr(), sc.data_ptr(), mn.data_ptr(), g, bits, None,
                          y.data_ptr(), N)
    return y


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_block(fn: Kernel, x: torch.Tensor, calls: int, start: int, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    t0 = now()
    for i in range(calls):
        fn(x, start + i)
    return (now() - t0) / calls


def bench_shape(N: int, K: int, rows: list[int], args: argparse.Namespace) -> dict[str, dict[int, float]]:
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.05
    cands = make_candidates(w, args.cold_bytes, args.groups)
    if args.kernels != "all":
        keep = args.kernels.split(",")
        cands = {k: v for k, v in cands.items() if k in keep}
    out: dict[str, dict[int, float]] = {name: {} for name in cands}
    for M in rows:
        x = torch.randn(M, K)
        calls: dict[str, int] = {}
        for name, fn in cands.items():  # warm-up + calibrate the number of calls per block (~block_s)
            fn(x, 0)
            t = time_block(fn, x, 3, 1)
            calls[name] = max(3, int(args.block_s / max(t, 1e-7)))
        samples: dict[str, list[float]] = {name: [] for name in cands}
        for r in range(args.repeats):
            for name, fn in cands.items():
                samples[name].append(time_block(fn, x, calls[name], r * calls[name], args.clock))
        for name in cands:
            out[name][M] = statistics.median(samples[name]) * 1e3
    return out


def check_accuracy() -> dict[str, float]:
    """Relative error of every kernel against the fp32 product of its own dequantised weights (sanity)."""
    torch.manual_seed(1)
    w, x = torch.randn(256, 576) * 0.05, torch.randn(5, 576)
    q8, s8 = quantize_int8(w)
    ref8 = x @ (q8.float() * s8.unsqueeze(1)).T
    got8 = torch.ops.aten._weight_int8pack_mm(x, q8, s8)
    return {"int8pack_vs_own_dequant": float((got8 - ref8).norm() / ref8.norm()),
            "int8_vs_fp32": float((got8 - x @ w.T).norm() / (x @ w.T).norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,5,8,16", help="M values (rows of x)")
    ap.add_argument("--groups", default="32", help="int4 group sizes")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--block-s", type=float, default=0.03, help="seconds per timed block")
    ap.add_argument("--cold-bytes", type=int, default=128 << 20, help="bytes of weight copies to cycle through")
    ap.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES, or 'all'")
    ap.add_argument("--kernels", default="all", help="comma-separated candidate names, or 'all'")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or this thread's CPU time (steadier on a shared, oversubscribed machine)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    args.groups = [int(g) for g in args.groups.split(",")]
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    results: dict[str, Any] = {"config": vars(args) | {"out": str(args.out)}, "accuracy": check_accuracy(),
                               "shapes": []}
    with torch.inference_mode():
        for label, N, K in shapes:
            print(f"[{label}] N={N} K={K}", flush=True)
            ms = bench_shape(N, K, rows, args)
            results["shapes"].append({"label": label, "N": N, "K": K, "ms": {k: {str(m): v for m, v in d.items()}
                                                                             for k, d in ms.items()}})
    out = args.out or RESULTS / f"linear_kernels-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print_table(results, rows)
    print(f"\nwrote {out}")


def print_table(results: dict[str, Any], rows: list[int]) -> None:
    print(f"\nms per call (ratio to fp32-onednn), median {results['config']['clock']} time; weights streamed from "
          "DRAM (cold)\n")
    print("| shape (K x N) | kernel | " + " | ".join(f"M={m}" for m in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for s in results["shapes"]:
        base = s["ms"]["fp32-onednn"]
        for name, d in s["ms"].items():
            cells = [f"{d[str(m)]:.3f} ({d[str(m)] / base[str(m)]:.2f})" for m in rows]
            print(f"| {s['label']} | {name} | " + " | ".join(cells) + " |")
    print(f"\naccuracy: {results['accuracy']}")


if __name__ == "__main__":
    main()
