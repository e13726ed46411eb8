"""Soak: Locust at the server's saturation point for a long stretch; RSS over time, errors, latency drift.

    python loadtests/soak.py --model smollm2-135m [--drafter DIR_OR_VERSION] [--users auto|N] [--minutes 10]
    -> runs/soak-<stamp>/{server.log, events.jsonl, soak.json}; a table printed

A benchmark, not a test: nothing here asserts. `--users auto` first sweeps closed-loop user counts (20 s each)
and takes the smallest one whose output tokens/s reaches 95% of the best: the saturation point. Then one Locust
run of --minutes at that load, while the server's resident set size is sampled from /proc every few seconds.
Reported: RSS at start, end and peak; requests served and failed (by kind); TPOT p50/p99 per minute and the
drift of the last two minutes against the first two. Loopback only; every run bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onoff import ROOT, prompts_file, start_server


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            v = rss_mib(self.pid)
            if v is not None:
                self.samples.append((round(time.monotonic() - self.t0, 1), round(v, 1)))
            self.stop.wait(self.every_s)


def run_locust(url: str, users: int, seconds: int, events: Path, args: argparse.Namespace) -> int:
    env = {**os.environ, "UNDERSTUDY_EVENTS_FILE": str(events), "UNDERSTUDY_PROMPTS_FILE": args.prompts_path}
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
           "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "120", "--host", url,
           "--api-key", "sk-bench", "--max-tokens", str(args.max_tokens), "--only-summary", "ChatStreamUser"]
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL).returncode


def load_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def tokens_per_s(events: list[dict[str, Any]]) -> float:
    ok = [e for e in events if e.get("outcome") == "ok"]
    if not ok:
        return 0.0
    span = max(e["t"] + e.get("e2e_s", 0) for e in ok) - min(e["t"] for e in ok)
    return sum(e.get("completion_tokens") or 0 for e in ok) / max(span, 1e-9)


def find_saturation(url: str, out: Path, args: argparse.Namespace) -> tuple[int, list[dict[str, Any]]]:
    sweep = []
    for users in (1, 2, 4, 8, 16):
        ev = out / f"sweep-u{users}.jsonl"
        run_locust(url, users, args.sweep_seconds, ev, args)
        tps = tokens_per_s(load_events(ev))
        sweep.append({"users": users, "output_tokens_per_s": round(tps, 2)})
        print(f"  sweep: {users:>2} users -> {tps:7.1f} output tok/s", flush=True)
    best = max(s["output_tokens_per_s"] for s in sweep)
    users = next(s["users"] for s in sweep if s["output_tokens_per_s"] >= 0.95 * best)
    return users, sweep


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def analyse(events: list[dict[str, Any]], rss: list[tuple[float, float]], minutes: float) -> dict[str, Any]:
    t0 = min((e["t"] for e in events), default=0.0)
    outcomes: dict[str, int] = {}
    for e in events:
        outcomes[e.get("outcome", "?")] = outcomes.get(e.get("outcome", "?"), 0) + 1
    per_minute = []
    for m in range(int(minutes + 0.999)):
        tpot = [e["tpot_s"] * 1000 for e in events if e.get("outcome") == "ok" and e.get("tpot_s")
                and m * 60 <= e["t"] - t0 < (m + 1) * 60]
        per_minute.append({"minute": m + 1, "requests": len(tpot), "tpot_p50_ms": pct(tpot, 50),
                           "tpot_p99_ms": pct(tpot, 99)})

    def window(ms: list[dict[str, Any]]) -> float | None:
        vals = [x["tpot_p99_ms"] for x in ms if x["tpot_p99_ms"] is not None]
        return statistics.median(vals) if vals else None

    first, last = window(per_minute[:2]), window(per_minute[-2:])
    return {
        "requests": len(events), "outcomes": outcomes,
        "errors": sum(n for k, n in outcomes.items() if k != "ok"),
        "rss_mib": {"start": rss[0][1] if rss else None, "end": rss[-1][1] if rss else None,
                    "peak": max((v for _, v in rss), default=None), "samples": rss},
        "tpot_per_minute": per_minute,
        "tpot_p99_drift": {"first_2min_ms": first, "last_2min_ms": last,
                           "ratio_last_to_first": (last / first) if first and last else None},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--drafter", default=None, help="drafter folder or registry version (default: plain decoding)")
    ap.add_argument("--registry", default=None)
    ap.add_argument("--users", default="auto", help="closed-loop users, or 'auto' (the saturation point)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sweep-seconds", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rss-every", type=float, default=5.0)
    ap.add_argument("--prompts", default="heldout")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.max_users = 16
    out = args.out or ROOT / "runs" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    args.prompts_path = prompts_file(args.prompts, out)
    mode = "on" if args.drafter else "off"
    proc, url = start_server(args, mode, out / "server.log")
    try:
        sweep = []
        if args.users == "auto":
            print("finding the saturation point ...", flush=True)
            users, sweep = find_saturation(url, out, args)
        else:
            users = int(args.users)
        sampler = RssSampler(proc.pid, args.rss_every)
        sampler.start()
        print(f"soak: {users} users for {args.minutes:g} min ...", flush=True)
        rc = run_locust(url, users, int(args.minutes * 60), out / "events.jsonl", args)
        sampler.stop.set()
        sampler.join(10)
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        (out / "metrics.txt").write_text(metrics)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(180)
    result = {"model": args.model, "drafter": args.drafter, "users": users, "minutes": args.minutes,
              "locust_exit": rc, "sweep": sweep, "server_exit": proc.returncode,
              **analyse(load_events(out / "events.jsonl"), sampler.samples, args.minutes)}
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "soak-latest.json").write_text(json.dumps(result, indent=2))
    r = result["rss_mib"]
    d = result["tpot_p99_drift"]
    print(f"\n| users | minutes | requests | errors | RSS start MiB | RSS end MiB | RSS peak MiB | "
          f"TPOT p99 first 2 min (ms) | last 2 min (ms) | drift |\n|---|---|---|---|---|---|---|---|---|---|\n"
          f"| {users} | {args.minutes:g} | {result['requests']} | {result['errors']} | {r['start']} | {r['end']} | "
          f"{r['peak']} | {d['first_2min_ms'] and round(d['first_2min_ms'], 1)} | "
          f"{d['last_2min_ms'] and round(d['last_2min_ms'], 1)} | "
          f"{d['ratio_last_to_first'] and round(d['ratio_last_to_first'], 3)} |")
    print(f"outcomes: {result['outcomes']}; wrote {out / 'soak.json'}")


if __name__ == "__main__":
    main()
