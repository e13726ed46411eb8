"""Pair swaps on the vLLM backend under a streaming load: in place (collective_rpc) vs blue/green, one run.

    python benchmarks/vllm_swap.py [--model smollm2-135m] [--users 2] [--swaps 4] [--max-tokens 48]
                                   [--modes in-place,blue-green] [--baseline-s 40] [--gap-s 15]

For each mode: a fresh registry holding the base model's drafter pair and a policy version (a perturbed copy of
the target's weights, so a policy swap really changes every weight), `understudy serve --backend vllm --vllm-swap
MODE` following an alias of it, and `--users` closed-loop streaming chat clients. First `--baseline-s` seconds
without swaps, then `--swaps` alias moves, alternating a drafter-only swap (same policy, another drafter) and a
pair swap (the other policy and its drafter), `--gap-s` apart. Drafters are fresh (untrained) EAGLE drafters of
the target's shape: their acceptance is not under test, the cost of getting their weights in is.

Reported per mode: requests and failures; TTFT p50 of the baseline phase vs TTFT p50 / max of the streams sent
while a swap was in progress (promote -> the server reports the new pair); the server's own record per swap
(`stall_s`: how long new requests were held, `drain_s`, load seconds, or the new process's start-up); time from
promote to serving; peak resident memory of all vLLM processes. JSON to benchmarks/results/, a table printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
from benchmarks.peer import machine  # noqa: E402

API, ADMIN = "sk-bench", "adm-bench"
PROMPTS = ("Which line overloads if L2 trips?", "Summarise speculative decoding.", "Write a haiku about wind.",
           "Explain N-1 security in one paragraph.")


def build_assets(model: str, root: Path) -> dict[str, Any]:
    """Two drafters for the base model, a policy (perturbed weights) and a drafter for it, in a fresh registry."""
    import torch
    from safetensors.torch import load_file, save_file

    from understudy.drafter.model import new_drafter, save_drafter
    from understudy.engine.loader import load_model, resolve_model_path
    from understudy.registry.store import Registry

    lm = load_model(model, dtype="float32")
    src = resolve_model_path(model)
    policy = root / "policy"
    shutil.copytree(src, policy)
    g = torch.Generator().manual_seed(0)
    for f in policy.glob("*.safetensors"):
        sd = load_file(str(f))
        sd = {k: (v + 1e-3 * torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype))
              if v.is_floating_point() else v for k, v in sd.items()}
        save_file(sd, str(f), metadata={"format": "pt"})
    reg = Registry.open(root / "registry", create=True)
    drafters = []
    for seed in range(4):
        save_drafter(new_drafter(lm.model, lm.fingerprint, seed=seed), root / f"drafter-{seed}")
        drafters.append(root / f"drafter-{seed}")
    p = reg.publish_policy(policy, family_fingerprint=lm.fingerprint, target=lm.config.family_shape()).version
    base_a = reg.publish(drafters[0]).version  # moves latest: the pair the server starts on
    base_b = reg.publish(drafters[1]).version
    pol_c = reg.publish(drafters[2], policy=p).version
    pol_d = reg.publish(drafters[3], policy=p).version
    reg.promote(base_a, "serving")
    # alternating: a drafter-only swap, then a pair swap (the other policy)
    return {"registry": root / "registry", "plan": [base_b, pol_c, pol_d, base_a, base_b, pol_c], "policy": p}


def start_server(args: argparse.Namespace, registry: Path, mode: str, log: Path) -> tuple[subprocess.Popen, str]:
    from loadtests.bench_onoff import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "understudy.cli.main", "serve", "--backend", "vllm", "--model", args.model,
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "bench", "--registry", str(registry),
           "--follow", "serving", "--vllm-swap", mode, "-k", str(args.k), "--max-model-len", "1024",
           "--max-batch-size", "8"]
    env = {**os.environ, "UNDERSTUDY_API_KEY": API, "UNDERSTUDY_ADMIN_KEY": ADMIN, "UNDERSTUDY_WATCH_INTERVAL_S": "0.2",
           "UNDERSTUDY_CANARY_WINDOW": "1000000"}  # untrained drafters: keep the canary from rolling them back
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server ({mode}) exited {proc.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"server ({mode}) not ready after 900 s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


class Load:
    """Closed-loop streaming chat users; one record per stream: send time, TTFT, e2e, outcome, headers."""

    def __init__(self, url: str, users: int, max_tokens: int) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.records: list[dict[str, Any]] = []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._user, args=(i,), daemon=True) for i in range(users)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(300)

    def _user(self, i: int) -> None:
        n = i
        with httpx.Client(timeout=300, headers={"authorization": f"Bearer {API}"}) as http:
            while not self.stop.is_set():
                body = {"model": "bench", "messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
                        "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
                t0 = time.monotonic()
                rec: dict[str, Any] = {"sent": t0, "ok": False}
                try:
                    with http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                        rec["status"] = r.status_code
                        rec["drafter"] = r.headers.get("x-understudy-drafter-version")
                        rec["policy"] = r.headers.get("x-understudy-policy-version")
                        for line in r.iter_lines():
                            if line.startswith("data: ") and '"content"' in line and "ttft" not in rec:
                                rec["ttft"] = time.monotonic() - t0
                            if line == "data: [DONE]":
                                rec["ok"] = r.status_code == 200
                except httpx.HTTPError as e:
                    rec["error"] = f"{type(e).__name__}: {e}"
                rec["e2e"] = time.monotonic() - t0
                with self.lock:
                    self.records.append(rec)
                n += 1


def admin(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/admin/drafter", headers={"authorization": f"Bearer {ADMIN}"}, timeout=30).json()


def vllm_rss_mb(url: str) -> float:
    """Resident memory of every vLLM process (each one's session: API server + EngineCore)."""
    procs = httpx.get(f"{url}/health", timeout=30).json()["vllm"]
    total = 0.0
    for p in [procs["active"], *procs["retiring"]]:
        if not p or not p.get("pid"):
            continue
        out = subprocess.run(["ps", "-o", "rss=", "--sid", str(p["pid"])], capture_output=True, text=True).stdout
        total += sum(int(x) for x in out.split()) / 1024
    return total


def run_mode(args: argparse.Namespace, mode: str, work: Path) -> dict[str, Any]:
    assets = build_assets(args.model, work / mode)
    proc, url = start_server(args, assets["registry"], mode, work / f"server-{mode}.log")
    from understudy.registry.store import Registry

    reg = Registry.open(assets["registry"])
    swaps: list[dict[str, Any]] = []
    peak = 0.0
    try:
        with Load(url, args.users, args.max_tokens) as load:
            t_base = time.monotonic()
            while time.monotonic() - t_base < args.baseline_s:
                peak = max(peak, vllm_rss_mb(url))
                time.sleep(1.0)
            for version in assets["plan"][:args.swaps]:
                before = len(admin(url)["history"])
                t0 = time.monotonic()
                reg.promote(version, "serving")
                while True:
                    peak = max(peak, vllm_rss_mb(url))
                    hist = admin(url)["history"]
                    if len(hist) > before:
                        break
                    if time.monotonic() - t0 > 900:
                        raise SystemExit(f"{mode}: version {version} never swapped in; see the server log")
                    time.sleep(0.1)
                rec = hist[-1]
                swaps.append({"version": version, "window": (t0, time.monotonic()), "result": rec["result"],
                              "kind": "pair" if rec.get("to_policy") != rec.get("from_policy") else "drafter",
                              "promote_to_serving_s": round(time.monotonic() - t0, 3),
                              "stall_s": rec.get("stall_s"), "drain_s": rec.get("drain_s"), "reason": rec["reason"]})
                t_gap = time.monotonic()
                while time.monotonic() - t_gap < args.gap_s:
                    peak = max(peak, vllm_rss_mb(url))
                    time.sleep(1.0)
    finally:
        stop_server(proc)
    records = load.records
    base = [r for r in records if r["sent"] < t_base + args.baseline_s and r.get("ttft") is not None]
    during = [r for r in records if any(a <= r["sent"] <= b for a, b in (s["window"] for s in swaps))
              and r.get("ttft") is not None]
    # streams sent during a swap window that started before the new pair served; blue/green has no hold
    failed = [r for r in records if not r["ok"]]
    for s in swaps:
        s.pop("window")
    return {"mode": mode, "requests": len(records), "failed": len(failed),
            "first_failures": [{k: v for k, v in r.items() if k != "sent"} for r in failed[:5]],
            "ttft_p50_baseline_s": statistics.median(r["ttft"] for r in base) if base else None,
            "ttft_p50_during_swap_s": statistics.median(r["ttft"] for r in during) if during else None,
            "ttft_max_during_swap_s": max(r["ttft"] for r in during) if during else None,
            "streams_during_swaps": len(during), "peak_vllm_rss_mb": round(peak, 1), "swaps": swaps}


def print_table(out: dict[str, Any]) -> None:
    print("\n| mode | requests | failed | TTFT p50 no swap | TTFT p50 / max during swaps | promote -> serving "
          "(drafter / pair, median) | server stall (pair, median) | peak vLLM RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for m in out["modes"]:
        def med(kind: str, key: str, m: dict[str, Any] = m) -> str:
            xs = [s[key] for s in m["swaps"] if s["kind"] == kind and s.get(key) is not None]
            return f"{statistics.median(xs):.2f} s" if xs else "-"

        def fmt(x: float | None) -> str:
            return f"{x:.2f} s" if x is not None else "-"

        print(f"| {m['mode']} | {m['requests']} | {m['failed']} | {fmt(m['ttft_p50_baseline_s'])} | "
              f"{fmt(m['ttft_p50_during_swap_s'])} / {fmt(m['ttft_max_during_swap_s'])} | "
              f"{med('drafter', 'promote_to_serving_s')} / {med('pair', 'promote_to_serving_s')} | "
              f"{med('pair', 'stall_s')} | {m['peak_vllm_rss_mb']:.0f} MB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modes", default="in-place,blue-green")
    ap.add_argument("--users", type=int, default=2)
    ap.add_argument("--swaps", type=int, default=4, help="alias moves per mode (alternating drafter-only / pair)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--baseline-s", type=float, default=40.0)
    ap.add_argument("--gap-s", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not 1 <= args.swaps <= 6:
        ap.error("--swaps must be 1..6")
    work = Path(tempfile.mkdtemp(prefix="vllm_swap-"))
    try:
        modes = [run_mode(args, m.strip(), work) for m in args.modes.split(",")]
    finally:  # the server logs stay (small); the models, registries and drafters go
        for d in work.iterdir():
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
        print(f"server logs: {work}")
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "modes": modes}
    path = args.out or RESULTS / f"vllm_swap-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print_table(out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
