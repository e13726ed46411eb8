"""Turn load-test runs into a markdown report, a PNG plot and JSON.

Input: the JSONL that loadtests/locustfile.py appends when UNDERSTUDY_EVENTS_FILE / --events-file is set (one
line per request, raw samples: exact percentiles, unlike Locust's bucketed --csv ones). A run is a JSONL file
or a folder of them (a user-count sweep may write several files; every record carries its `users`/`rate`).

    python loadtests/report.py --run on=runs/on --run off=runs/off --out report.md --plot report.png

writes report.md (p50/p90/p99 of TTFT, TPOT, ITL, E2E per (run, users), throughput and failure counts, and,
with two or more runs, the later runs side by side with the first, e.g. speculation on vs off), report.png
and report.json (the same numbers; --json to put it elsewhere).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = ("TTFT", "TPOT", "ITL", "E2E")
QUANTILES = (50, 90, 99)


# ---- loading ----------------------------------------------------------------------------------------------------
def parse_run(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = Path(spec).stem if Path(spec).is_file() else Path(spec).name, spec
    if not label or not path:
        raise SystemExit(f"error: --run {spec!r}: expected LABEL=PATH (a JSONL file or a folder of them)")
    return label, Path(path)


def load_records(path: Path) -> list[dict[str, Any]]:
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise SystemExit(f"error: {path}: no events JSONL found; run locust with UNDERSTUDY_EVENTS_FILE=FILE "
                         "(or --events-file FILE)")
    out = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise SystemExit(f"error: {f}:{n}: not a JSON line ({e})") from e
    return out


# ---- statistics -------------------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); xs must be sorted and non-empty."""
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_s: list[float]) -> dict[str, float | int | None]:
    xs = sorted(x * 1000.0 for x in samples_s)
    if not xs:
        return {"n": 0, "mean": None, **{f"p{q}": None for q in QUANTILES}}
    return {"n": len(xs), "mean": sum(xs) / len(xs), **{f"p{q}": percentile(xs, q) for q in QUANTILES}}


@dataclass(frozen=True, order=True)
class Load:
    users: int  # target Locust users
    rate: float  # open-loop requests/s (0 = closed loop)

    def __str__(self) -> str:
        return f"{self.users} users" + (f" @ {self.rate:g} req/s" if self.rate else "")


def samples(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    ok = [r for r in records if r.get("outcome") == "ok"]
    return {"TTFT": [r["ttft_s"] for r in ok if r.get("ttft_s") is not None],
            "TPOT": [r["tpot_s"] for r in ok if r.get("tpot_s") is not None],
            "ITL": [x for r in ok for x in r.get("itl_s") or []],
            "E2E": [r["e2e_s"] for r in ok if r.get("e2e_s") is not None]}


def throughput(records: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {k: sum(r.get("outcome") == k for r in records) for k in ("ok", "http_error", "stream_error", "truncated")}
    start = min(r["t"] for r in records)
    end = max(r["t"] + (r.get("e2e_s") or 0.0) for r in records)
    span = max(end - start, 1e-9)
    tokens = sum(r.get("completion_tokens") or 0 for r in records if r.get("outcome") == "ok")
    return {"requests": len(records), **counts, "seconds": round(span, 3), "req_per_s": counts["ok"] / span,
            "output_tokens_per_s": tokens / span, "drafter_versions": sorted({str(r.get("version")) for r in records})}


def analyze(runs: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One row per (run label, load): latency percentiles in ms and the throughput/failure summary."""
    rows = []
    for label, records in runs:
        groups: dict[Load, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            groups[Load(int(r.get("users") or 0), float(r.get("rate") or 0.0))].append(r)
        for load in sorted(groups):
            recs = groups[load]
            rows.append({"label": label, "users": load.users, "rate": load.rate or None, "load": str(load),
                         "summary": throughput(recs),
                         "latency_ms": {m: summarize(xs) for m, xs in samples(recs).items()}})
    return rows


# ---- markdown ---------------------------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ms(x: float | None) -> str:
    """Milliseconds with 3 significant digits, never in exponent form and never rounded to a misleading 0:
    inter-token gaps of chunks that arrive in one network read are tens of microseconds (0.0312 ms), and a
    fixed one-decimal format printed them as 0.0."""
    if x is None:
        return "-"
    if x == 0 or x >= 100:
        return f"{x:.0f}"
    digits = max(0, 2 - math.floor(math.log10(abs(x))))
    return f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def latency_table(rows: list[dict[str, Any]]) -> list[str]:
    body = [[r["label"], str(r["users"]), _f(r["rate"], 2), m, str(s["n"]), *(_ms(s[f"p{q}"]) for q in QUANTILES)]
            for r in rows for m, s in r["latency_ms"].items()]
    return _table(["run", "users", "rate (req/s)", "metric", "n", *(f"p{q} (ms)" for q in QUANTILES)], body)


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    body = []
    for r in rows:
        s = r["summary"]
        body.append([r["label"], str(r["users"]), _f(r["rate"], 2), str(s["requests"]), str(s["ok"]),
                     str(s["http_error"]), str(s["stream_error"]), str(s["truncated"]), _f(s["req_per_s"], 2),
                     _f(s["output_tokens_per_s"], 1), ", ".join(s["drafter_versions"])])
    return _table(["run", "users", "rate (req/s)", "requests", "ok", "non-2xx", "stream errors", "truncated",
                   "req/s", "output tok/s", "drafter versions"], body)


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each later run against the first one, per load both ran and metric; ratio = other / first."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["load"]): r for r in rows}
    out = []
    for other in labels[1:]:
        for r in (r for r in rows if r["label"] == labels[0] and (other, r["load"]) in by):
            o = by[(other, r["load"])]
            for m in METRICS:
                a, b = r["latency_ms"][m], o["latency_ms"][m]
                ratio = {f"p{q}": (b[f"p{q}"] / a[f"p{q}"] if a[f"p{q}"] and b[f"p{q}"] is not None else None)
                         for q in (50, 99)}
                out.append({"base": labels[0], "other": other, "load": r["load"], "metric": m,
                            "base_ms": {q: a[q] for q in ("p50", "p99")}, "other_ms": {q: b[q] for q in ("p50", "p99")},
                            "ratio": ratio})
    return out


def comparison_tables(comps: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for other in dict.fromkeys(c["other"] for c in comps):
        mine = [c for c in comps if c["other"] == other]
        a, b = mine[0]["base"], other
        lines += ["", f"## {a} vs {b} (side by side; ratio = {b} / {a}, > 1 means {a} is faster)", ""]
        lines += _table(["load", "metric", f"p50 {a}", f"p50 {b}", "p50 ratio", f"p99 {a}", f"p99 {b}", "p99 ratio"],
                        [[c["load"], c["metric"], _ms(c["base_ms"]["p50"]), _ms(c["other_ms"]["p50"]),
                          _f(c["ratio"]["p50"], 2), _ms(c["base_ms"]["p99"]), _ms(c["other_ms"]["p99"]),
                          _f(c["ratio"]["p99"], 2)] for c in mine])
    return lines


def markdown(rows: list[dict[str, Any]], comps: list[dict[str, Any]], sources: dict[str, str]) -> str:
    lines = ["# Understudy load test", "", "Runs: " + "; ".join(f"`{k}` = {v}" for k, v in sources.items()), "",
             "TTFT: request sent -> first text chunk. TPOT: (E2E - TTFT) / (completion tokens - 1). ITL: gap between "
             "text chunks. E2E: request sent -> `[DONE]`. Successful requests only.", "", "## Latency", ""]
    lines += latency_table(rows)
    lines += ["", "## Throughput and failures", ""]
    lines += summary_table(rows)
    lines += comparison_tables(comps)
    return "\n".join(lines) + "\n"


# ---- plot -------------------------------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(dict.fromkeys(r["load"] for r in sorted(rows, key=lambda r: (r["users"], r["rate"] or 0))))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, m in zip(axes.flat, METRICS, strict=True):
        for i, label in enumerate(dict.fromkeys(r["label"] for r in rows)):
            mine = {r["load"]: r["latency_ms"][m] for r in rows if r["label"] == label}
            xs = [j for j, ld in enumerate(loads) if ld in mine and mine[ld]["n"]]
            color = f"C{i}"
            ax.plot(xs, [mine[loads[j]]["p50"] for j in xs], "o-", color=color, label=f"{label} p50")
            ax.plot(xs, [mine[loads[j]]["p99"] for j in xs], "s--", color=color, alpha=0.6, label=f"{label} p99")
        ax.set_title(m)
        ax.set_ylabel("ms")
        ax.set_xticks(range(len(loads)), loads, fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Understudy streaming latency (p50 solid, p99 dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=PATH",
                    help="A run: its label and its events JSONL (file or folder); repeat to compare (first = base)")
    ap.add_argument("--out", type=Path, default=Path("report.md"), help="Markdown output")
    ap.add_argument("--plot", type=Path, default=None, help="PNG output (default: beside --out)")
    ap.add_argument("--json", type=Path, default=None, help="JSON output (default: beside --out)")
    args = ap.parse_args(argv)
    specs = [parse_run(s) for s in args.run]
    if len({label for label, _ in specs}) != len(specs):
        raise SystemExit("error: two --run share a label; give each run its own LABEL=")
    runs = [(label, load_records(path)) for label, path in specs]
    for label, recs in runs:
        if not recs:
            raise SystemExit(f"error: run {label!r} has no records (did the load test send any request?)")
    rows = analyze(runs)
    comps = comparisons(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, comps, {label: str(path) for label, path in specs}))
    png, js = args.plot or args.out.with_suffix(".png"), args.json or args.out.with_suffix(".json")
    plot(rows, png)
    js.write_text(json.dumps({"runs": rows, "comparisons": comps}, indent=2))
    print(f"wrote {args.out}, {png}, {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
