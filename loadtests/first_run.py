"""A new user's first `make serve`: how soon it answers, and how the drafter arrives while it serves.

    python loadtests/first_run.py [--command "make serve"] [--minutes 35] [--every 5] [--out runs/first-run.json]

Starts the command (in this checkout, with a fresh registry and cache unless --keep-state: XDG_DATA_HOME and
UNDERSTUDY_CACHE point into a new folder, as on a new machine), then one client sends a short chat request every
`--every` seconds from the moment the port opens. Recorded: seconds from start to the first answered chat, every
request's status and the drafter version that served it (`x-understudy-drafter-version`), the background
training's published versions (from the server log), and the first request served by a hot-swapped drafter.
Stops after --minutes or once the background training has finished and a request was served by its last version.
A measurement, not a test: nothing here asserts; the JSON and a summary are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--command", default="make serve")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--minutes", type=float, default=35.0)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between chat requests")
    ap.add_argument("--keep-state", action="store_true", help="use the existing registry and cache")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / f"first-run-{time.strftime('%Y%m%d-%H%M%S')}.json")
    args = ap.parse_args()
    env = dict(os.environ)
    state = None
    if not args.keep_state:
        state = Path(tempfile.mkdtemp(prefix="understudy-first-run-"))
        env.update(XDG_DATA_HOME=str(state / "data"), UNDERSTUDY_CACHE=str(state / "cache"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_suffix(".log")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args.command, shell=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    requests: list[dict] = []
    first_ok = None
    deadline = t0 + args.minutes * 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            t = time.monotonic() - t0
            try:
                r = httpx.post(f"{args.url}/v1/chat/completions", timeout=120, json={
                    "model": "smollm2-135m", "max_tokens": 32,
                    "messages": [{"role": "user", "content": f"What is an N-1 contingency? ({len(requests)})"}]})
                rec = {"t": round(t, 1), "status": r.status_code, "seconds": round(time.monotonic() - t0 - t, 2),
                       "drafter": r.headers.get("x-understudy-drafter-version")}
                requests.append(rec)
                if r.status_code == 200 and first_ok is None:
                    first_ok = rec["t"] + rec["seconds"]
                    print(f"first chat answered {first_ok:.0f} s after start", flush=True)
            except httpx.HTTPError:
                if first_ok is not None:  # the port was open before: a failure to count
                    requests.append({"t": round(t, 1), "status": None, "error": "connection"})
                time.sleep(1.0)
                continue
            text = log_path.read_text(errors="replace")
            done = "background drafter training finished" in text or "background drafter training failed" in text
            published = re.findall(r"published v(\d+)", text)
            if done and published and requests[-1].get("drafter") == published[-1]:
                break
            time.sleep(max(0.0, args.every - rec["seconds"]))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text(errors="replace")
    swaps = [{"line": ln.split(": ", 1)[-1]} for ln in text.splitlines() if "now serving" in ln]
    pubs = [ln.split(": ", 1)[-1] for ln in text.splitlines() if "background drafter training published" in ln]
    first_swap = next((r for r in requests if r.get("drafter") not in (None, "none")), None)
    result = {"command": args.command, "fresh_state": str(state) if state else None,
              "seconds_to_first_answer": first_ok, "requests": len(requests),
              "failed": sum(1 for r in requests if r.get("status") != 200),
              "first_request_on_a_swapped_drafter": first_swap, "published": pubs, "swaps": swaps,
              "log": str(log_path), "timeline": requests}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
