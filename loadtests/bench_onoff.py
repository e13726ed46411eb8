"""Speculation on vs off under Locust, one invocation: for each mode, start `understudy serve` on loopback, sweep the
closed-loop user counts with Locust (streaming chat), stop it; then build the side-by-side report.

    python loadtests/bench_onoff.py --model smollm2-135m --drafter DIR_OR_VERSION --users 1,4,16 --duration 60 \
        [--prompts heldout|ood|FILE]
    -> runs/onoff-<stamp>/{on,off}/events-u*.jsonl, report.md, report.png, report.json

"on" serves with the drafter and the adaptive controller (its choice of K, including off, is part of the
product); "off" is the same server with --num-speculative-tokens 0. Loopback only, every run time-bounded.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from understudy.engine.text import load_prompts

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, mode: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "understudy.cli.main", "serve", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--api-key", "sk-bench", "--max-batch-size", str(max(16, args.max_users)),
           "--served-model-name", "bench", "--dtype", args.dtype]
    if args.registry:
        cmd += ["--registry", args.registry]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--drafter", args.drafter, "-k", str(args.k)] if mode == "on" else ["-k", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server ({mode}) exited {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server ({mode}) not ready after 300 s; see {log}")


def prompts_file(spec: str, out: Path) -> str:
    """'' = the Locust file's built-in prompts; 'heldout' / 'ood' = that split of the shipped prompt set (the
    drafter never trained on them); anything else is a file for the Locust file's --prompts-file."""
    if spec in ("heldout", "ood"):
        path = out / f"prompts-{spec}.txt"
        path.write_text("".join(r["prompt"].replace("\n", " ") + "\n" for r in load_prompts(splits=(spec,))))
        return str(path)
    if spec and not Path(spec).is_file():
        raise SystemExit(f"--prompts {spec}: not a file (or use heldout / ood / leave it out for the built-ins)")
    return spec


def locust(url: str, users: int, out: Path, args: argparse.Namespace) -> int:
    env = {**os.environ, "UNDERSTUDY_EVENTS_FILE": str(out / f"events-u{users}.jsonl"),
           "UNDERSTUDY_PROMPTS_FILE": args.prompts_path}
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
           "-u", str(users), "-r", str(users), "-t", f"{args.duration}s", "--stop-timeout", "120", "--host", url,
           "--api-key", "sk-bench", "--max-tokens", str(args.max_tokens), "--csv", str(out / f"locust-u{users}"),
           "--only-summary", "ChatStreamUser"]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--drafter", required=True, help="drafter folder, or a version/alias of --registry")
    ap.add_argument("--registry", default=None)
    ap.add_argument("--users", default="1,4,16")
    ap.add_argument("--duration", type=int, default=60, help="seconds of load per user count")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="the servers' --threads (default: theirs, every core)")
    ap.add_argument("--prompts", default="", help="heldout | ood (splits of the shipped prompt set) | a file of "
                    "prompts; default: the Locust file's built-in prompts")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    users = [int(u) for u in args.users.split(",")]
    args.max_users = max(users)
    out = args.out or ROOT / "runs" / f"onoff-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    args.prompts_path = prompts_file(args.prompts, out)
    failures = 0
    for mode in ("on", "off"):
        d = out / mode
        d.mkdir(parents=True, exist_ok=True)
        proc, url = start_server(args, mode, d / "server.log")
        try:
            for u in users:
                print(f"[{mode}] {u} users for {args.duration}s ...", flush=True)
                failures += locust(url, u, d, args) != 0
            (d / "metrics.txt").write_text(httpx.get(f"{url}/metrics", timeout=30).text)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(180)
    subprocess.run([sys.executable, str(ROOT / "loadtests" / "report.py"), "--run", f"on={out / 'on'}",
                    "--run", f"off={out / 'off'}", "--out", str(out / "report.md"), "--plot",
                    str(out / "report.png")], cwd=ROOT, check=True)
    print((out / "report.md").read_text())
    print(f"wrote {out}; locust runs with failures: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
