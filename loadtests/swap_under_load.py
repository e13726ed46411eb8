"""Hot-swap drafters under load: publish and promote >= 10 drafter versions into a running server's registry
while streaming clients keep it busy, then report what the clients saw and the swap stall the server measured.

    python loadtests/swap_under_load.py --server http://127.0.0.1:8000 --registry /path/to/registry \
        --drafter runs/drafter-a --drafter runs/drafter-b --versions 10 --duration 60 --clients 4 \
        --api-key sk-... --admin-key adm-... --json swap.json

The server must follow an alias of that registry (`understudy serve --registry DIR`, following `latest` by
default); the script publishes each version (moving `latest`) and promotes it to the followed alias. It reports
non-2xx answers, in-band stream errors, truncated streams (no `[DONE]` or no finish_reason), the drafter
versions seen in `x-understudy-drafter-version`, and `understudy:drafter_swap_stall_seconds` from /metrics
(the extra duration of the first engine step after each swap). Exit status 0 when no request failed.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

try:
    from understudy.clients.client import (
        UnderstudyAPIError,
        UnderstudyClient,
        UnderstudyConnectionError,
        UnderstudyStreamError,
    )
except ModuleNotFoundError:  # `python loadtests/swap_under_load.py` from a checkout: use the package beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from understudy.clients.client import (
        UnderstudyAPIError,
        UnderstudyClient,
        UnderstudyConnectionError,
        UnderstudyStreamError,
    )

STALL = "understudy:drafter_swap_stall_seconds"
SWAPS = "understudy:drafter_swaps"
MAX_DURATION_S = 1800.0
PROMPTS = ("grid line flow risk", "Write a haiku about wind.", "Summarise speculative decoding.", "load sum trip")


def is_loopback(url: str) -> bool:
    name = urlsplit(url).hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# ---- the load ---------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What the streaming clients saw (guarded by lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    versions: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, header) per request
    errors: list[str] = field(default_factory=list)  # first few failure messages

    def add(self, outcome: str, version: str | None, error: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if version is not None:
                self.versions.append((time.monotonic(), version))
            if error and len(self.errors) < 10:
                self.errors.append(error)


def one_stream(c: UnderstudyClient, prompt: str, max_tokens: int) -> tuple[str, str | None, str | None]:
    """(outcome, drafter version, error) of one streamed chat request."""
    stream = c.chat_stream([{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0)
    finish = None
    try:
        for chunk in stream:
            for ch in chunk.get("choices") or []:
                finish = ch.get("finish_reason") or finish
    except UnderstudyAPIError as e:
        return ("non_2xx" if e.status is not None else "stream_error"), stream.drafter_version, str(e)
    except UnderstudyStreamError as e:
        return "truncated", stream.drafter_version, str(e)
    except UnderstudyConnectionError as e:
        return "connection_error", None, str(e)
    if finish is None:
        return "truncated", stream.drafter_version, "stream ended with [DONE] but no finish_reason"
    return "ok", stream.drafter_version, None


def client_loop(args: argparse.Namespace, idx: int, stop: threading.Event, tally: Tally) -> None:
    with UnderstudyClient(args.server, api_key=args.api_key, timeout=args.request_timeout) as c:
        n = idx
        while not stop.is_set():
            outcome, version, error = one_stream(c, PROMPTS[n % len(PROMPTS)], args.max_tokens)
            tally.add(outcome, version, error)
            n += 1


# ---- the swaps --------------------------------------------------------------------------------------------------
def publish_versions(args: argparse.Namespace, alias: str, deadline: float) -> list[dict[str, Any]]:
    """Publish args.versions drafters (cycling through args.drafter) and promote each to `alias`.

    All versions are always published (the load keeps running past --duration until they are): the run exists
    to show >= N swaps under load, so a slow machine stretches it rather than cutting it short."""
    from understudy.registry.store import Registry  # needs torch to validate drafters: imported only here

    reg = Registry.open(args.registry, create=False)
    interval = args.interval if args.interval is not None else 0.7 * args.duration / args.versions
    published = []
    for i in range(args.versions):
        t0 = time.monotonic()
        src = args.drafter[i % len(args.drafter)]
        info = reg.publish(src, note=f"swap_under_load {i + 1}/{args.versions}")
        if alias != "latest":  # publishing already moved latest
            reg.promote(info.version, alias, reason="swap_under_load")
        published.append({"version": info.version, "source": str(src), "at": round(time.time(), 3),
                          "publish_s": round(time.monotonic() - t0, 3)})
        if i + 1 < args.versions:
            time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    return published


def followed_alias(c: UnderstudyClient, wanted: str | None) -> str:
    if wanted:
        return wanted
    if not c.admin_key:
        return "latest"
    following = c.current_drafter().get("following")
    if not following:
        raise SystemExit("error: the server is pinned (it follows no alias), so publishing swaps nothing; run "
                         "`understudy drafters follow latest --server URL` first, or pass --alias")
    return str(following)


# ---- /metrics ---------------------------------------------------------------------------------------------------
def scrape(c: UnderstudyClient) -> dict[str, Any]:
    """Swap-stall histogram (sum, count, cumulative buckets) and swap counters from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {"sum": 0.0, "count": 0.0, "buckets": {}, "swaps": {}}
    for fam in text_string_to_metric_families(c.metrics_text()):
        for s in fam.samples:
            if s.name == f"{STALL}_sum":
                out["sum"] += s.value
            elif s.name == f"{STALL}_count":
                out["count"] += s.value
            elif s.name == f"{STALL}_bucket":
                le = float(s.labels["le"])
                out["buckets"][le] = out["buckets"].get(le, 0.0) + s.value
            elif s.name == f"{SWAPS}_total":
                out["swaps"][s.labels["result"]] = out["swaps"].get(s.labels["result"], 0.0) + s.value
    return out


def stall_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    n = after["count"] - before["count"]
    total = after["sum"] - before["sum"]
    cum = sorted((le, after["buckets"][le] - before["buckets"].get(le, 0.0)) for le in after["buckets"])

    def upper(q: float) -> float | None:  # the smallest bucket bound holding a fraction q of the swaps
        return next((le for le, c in cum if n and c >= q * n), None)

    return {"swaps_measured": int(n), "mean_s": round(total / n, 6) if n else None, "p50_le_s": upper(0.5),
            "p99_le_s": upper(0.99),
            "swaps_by_result": {k: int(v - before["swaps"].get(k, 0.0)) for k, v in after["swaps"].items()}}


# ---- main -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True, help="Loopback URL of the running server")
    ap.add_argument("--registry", required=True, type=Path, help="The registry folder the server watches")
    ap.add_argument("--drafter", required=True, action="append", type=Path, help="Drafter folder (repeatable)")
    ap.add_argument("--versions", type=int, default=10, help="Versions to publish and promote (>= 10)")
    ap.add_argument("--duration", type=float, default=60.0, help=f"Seconds of load (<= {MAX_DURATION_S:g})")
    ap.add_argument("--interval", type=float, default=None, help="Seconds between publishes (default: spread "
                    "the versions over 70%% of --duration)")
    ap.add_argument("--clients", type=int, default=4, help="Concurrent streaming clients")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--alias", default=None, help="Alias to promote to (default: what the server follows)")
    ap.add_argument("--api-key", default=None, help="Default: $UNDERSTUDY_API_KEY")
    ap.add_argument("--admin-key", default=None, help="Default: $UNDERSTUDY_ADMIN_KEY (for the swap history)")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--json", type=Path, default=None, help="Also write the report here")
    args = ap.parse_args(argv)
    if not is_loopback(args.server):
        ap.error(f"--server {args.server!r} is not a loopback URL: this load test only targets this machine")
    if args.versions < 10 or not 0 < args.duration <= MAX_DURATION_S or args.clients < 1:
        ap.error(f"need --versions >= 10, 0 < --duration <= {MAX_DURATION_S:g} and --clients >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    with UnderstudyClient(args.server, api_key=args.api_key, admin_key=args.admin_key) as c:
        if not c.ready():
            raise SystemExit(f"error: the server at {args.server} is not ready (/readyz)")
        alias = followed_alias(c, args.alias)
        before = scrape(c)
        tally, stop = Tally(), threading.Event()
        threads = [threading.Thread(target=client_loop, args=(args, i, stop, tally), daemon=True)
                   for i in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        published = publish_versions(args, alias, t0 + args.duration)
        time.sleep(max(0.0, t0 + args.duration - time.monotonic()))
        stop.set()
        for t in threads:
            t.join(timeout=args.request_timeout)
        after = scrape(c)
        history = c.current_drafter().get("history", []) if c.admin_key else []
    seen = [v for _, v in sorted(tally.versions)]
    changes = sum(1 for a, b in itertools.pairwise(seen) if a != b)
    failed = sum(n for k, n in tally.outcomes.items() if k != "ok")
    return {"server": args.server, "alias": alias, "seconds": round(time.monotonic() - t0, 2),
            "requests": sum(tally.outcomes.values()), "outcomes": dict(tally.outcomes), "failed": failed,
            "non_2xx": tally.outcomes["non_2xx"], "truncated": tally.outcomes["truncated"],
            "published": published, "versions_seen": sorted(set(seen), key=lambda v: (not v.isdigit(), v.zfill(9))),
            "swaps_seen": len(set(seen)), "version_changes_seen": changes,
            "swap_stall": stall_delta(before, after),
            "stalls_from_admin_s": [h.get("stall_s") for h in history if h.get("stall_s") is not None],
            "first_errors": tally.errors}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    st = report["swap_stall"]
    print(f"{report['requests']} requests in {report['seconds']} s: {report['failed']} failed "
          f"(non-2xx {report['non_2xx']}, truncated {report['truncated']}, all: {report['outcomes']})")
    print(f"published {len(report['published'])} versions to {report['alias']!r}; saw {report['swaps_seen']} drafter "
          f"versions in headers ({', '.join(report['versions_seen'])}), {report['version_changes_seen']} changes")
    print(f"swap stall (/metrics): {st['swaps_measured']} swaps, mean {st['mean_s']} s, p50 <= {st['p50_le_s']} s, "
          f"p99 <= {st['p99_le_s']} s; swaps by result {st['swaps_by_result']}")
    for e in report["first_errors"]:
        print(f"  error: {e}")
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
