"""The load-test kit for real: Locust (headless, loopback) against the test server, the report on its output,
the swap-under-load script, plus the report on synthetic events and the refusal of a non-loopback host."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import ROOT, server, server_assets  # noqa: F401

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"


def load_report_module():
    spec = importlib.util.spec_from_file_location("loadtest_report", ROOT / "loadtests" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def locust(*args: str, events: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNDERSTUDY_", "LOCUST_"))}
    if events is not None:
        env["UNDERSTUDY_EVENTS_FILE"] = str(events)
    return subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
                           "--loglevel", "WARNING", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def table_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]


# ---- real runs --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_locust_closed_and_open_loop_then_report(server, tmp_path):  # noqa: F811
    closed, opened = tmp_path / "closed", tmp_path / "open"
    # durations sized for a busy CI box (a loaded run completed no request at all within 8 s)
    r = locust("-u", "2", "-r", "2", "-t", "30s", "--stop-timeout", "60", "--host", server.url, "--api-key", "sk-test",
               "--max-tokens", "16", "--csv", str(closed / "locust"), events=closed / "events.jsonl")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r = locust("-u", "2", "-r", "2", "-t", "15s", "--stop-timeout", "60", "--host", server.url, "--api-key", "sk-test",
               "--max-tokens", "8", "--rate", "2", "ChatStreamUser", events=opened / "events.jsonl")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    recs = [json.loads(x) for x in (closed / "events.jsonl").read_text().splitlines()]
    assert len(recs) >= 4 and {x["api"] for x in recs} == {"chat", "completions"}
    assert all(x["outcome"] == "ok" and x["done"] and x["finish_reason"] for x in recs)
    assert all(0 < x["ttft_s"] <= x["e2e_s"] and x["completion_tokens"] <= 16 for x in recs)
    with open(closed / "locust_stats.csv") as f:
        kinds = {row["Type"] for row in csv.DictReader(f)}
    assert {"TTFT", "TPOT", "ITL", "E2E", "POST"} <= kinds
    with open(closed / "locust_failures.csv") as f:
        assert list(csv.DictReader(f)) == []
    open_recs = [json.loads(x) for x in (opened / "events.jsonl").read_text().splitlines()]
    assert open_recs and all(x["rate"] == 2 and x["api"] == "chat" and x["outcome"] == "ok" for x in open_recs)

    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, str(ROOT / "loadtests" / "report.py"), "--run", f"closed={closed}",
                          "--run", f"open={opened}", "--out", str(out / "report.md"), "--plot", str(out / "r.png")],
                         capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0, rep.stderr
    rows = table_rows((out / "report.md").read_text())
    latency = {(r[0], r[3]): r for r in rows if len(r) == 8 and r[3] in ("TTFT", "TPOT", "ITL", "E2E")}
    for label in ("closed", "open"):
        for metric in ("TTFT", "TPOT", "ITL", "E2E"):
            row = latency[(label, metric)]
            assert int(row[4]) > 0 and all(float(x) > 0 for x in row[5:8]), row
            assert float(row[5]) <= float(row[6]) <= float(row[7])  # p50 <= p90 <= p99
    summary = [r for r in rows if len(r) == 11 and r[0] in ("closed", "open")]
    assert len(summary) == 2 and all(r[5] == r[6] == r[7] == "0" for r in summary)  # no failures
    assert (out / "r.png").stat().st_size > 10_000 and (out / "report.json").exists()


@pytest.mark.slow
def test_swap_under_load(server, server_assets, tmp_path):  # noqa: F811
    out = tmp_path / "swap.json"
    r = subprocess.run([sys.executable, str(ROOT / "loadtests" / "swap_under_load.py"), "--server", server.url,
                        "--registry", str(server.registry), "--drafter", str(server_assets["good"]),
                        "--versions", "10", "--duration", "20", "--interval", "0.9", "--clients", "2",
                        "--max-tokens", "16", "--api-key", "sk-test", "--admin-key", "adm-test", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert len(rep["published"]) == 10 and rep["alias"] == "latest"
    assert rep["failed"] == 0 and rep["non_2xx"] == 0 and rep["truncated"] == 0 and rep["requests"] >= 6
    assert rep["swaps_seen"] >= 3, rep["versions_seen"]
    assert rep["swap_stall"]["swaps_measured"] >= 3 and rep["swap_stall"]["mean_s"] is not None
    assert rep["swap_stall"]["swaps_by_result"]["success"] >= 3


# ---- fast checks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["http://10.1.2.3:8000", "http://example.com", "http://0.0.0.0:8000", ""])
def test_non_loopback_host_is_refused(host):
    r = locust("-u", "1", "-t", "2s", *(["--host", host] if host else []), timeout=60)
    why = "not a loopback URL" if host else "no --host"
    assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_unbounded_run_is_refused():
    r = locust("-u", "1", "--host", "http://127.0.0.1:9", timeout=60)
    assert r.returncode == 2 and "bounded" in r.stderr, r.stderr[-2000:]


def _record(users, ttft, itl, n_tok=5, outcome="ok", version="3", t=100.0):
    e2e = ttft + itl * (n_tok - 1)
    return {"api": "chat", "t": t, "status": 200, "version": version, "ttft_s": ttft, "e2e_s": e2e,
            "itl_s": [itl] * (n_tok - 1), "completion_tokens": n_tok, "finish_reason": "length", "done": True,
            "outcome": outcome, "tpot_s": (e2e - ttft) / (n_tok - 1), "users": users, "rate": None}


def test_report_on_synthetic_events(tmp_path):
    on, off = tmp_path / "on.jsonl", tmp_path / "off"
    off.mkdir()
    # on: TTFT 10..100 ms (p50 55, p90 91, p99 99.1 by linear interpolation), ITL 5 ms; one truncated stream
    on.write_text("\n".join(json.dumps(_record(2, ttft=k / 100, itl=0.005, t=100 + k)) for k in range(1, 11)) + "\n"
                  + json.dumps({**_record(2, 0.5, 0.005), "outcome": "truncated", "done": False}) + "\n")
    (off / "a.jsonl").write_text("\n".join(json.dumps(_record(2, ttft=k / 50, itl=0.010)) for k in range(1, 11)))
    rep = load_report_module()
    assert rep.main(["--run", f"on={on}", "--run", f"off={off}", "--out", str(tmp_path / "r.md")]) == 0
    rows = table_rows((tmp_path / "r.md").read_text())
    ttft_on = next(r for r in rows if r[0] == "on" and r[3] == "TTFT")
    assert ttft_on[4:] == ["10", "55.0", "91.0", "99.1"]
    itl_on = next(r for r in rows if r[0] == "on" and r[3] == "ITL")
    assert itl_on[4:] == ["40", "5.00", "5.00", "5.00"]  # three significant digits
    tpot_off = next(r for r in rows if r[0] == "off" and r[3] == "TPOT")
    assert tpot_off[5] == "10.0"
    summary_on = next(r for r in rows if r[0] == "on" and len(r) == 11)
    assert summary_on[3:8] == ["11", "10", "0", "0", "1"]  # requests, ok, non-2xx, stream errors, truncated
    side = next(r for r in rows if r[0] == "2 users" and r[1] == "TTFT")
    assert side[2:5] == ["55.0", "110", "2.00"]  # off is twice as slow: ratio off/on = 2
    data = json.loads((tmp_path / "r.json").read_text())
    assert {r["label"] for r in data["runs"]} == {"on", "off"} and len(data["comparisons"]) == 4
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_report_refuses_an_empty_run(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    rep = load_report_module()
    with pytest.raises(SystemExit, match="no records"):
        rep.main(["--run", f"x={tmp_path / 'e.jsonl'}", "--out", str(tmp_path / "r.md")])


def test_report_keeps_microsecond_latencies_visible():
    """Inter-token gaps of chunks read together are tens of microseconds: the report must not print them as 0."""
    spec = importlib.util.spec_from_file_location("lt_report", ROOT / "loadtests" / "report.py")
    report = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = report  # its dataclasses look their module up
    spec.loader.exec_module(report)
    assert report._ms(0.0312) == "0.0312" and float(report._ms(4.1e-5)) > 0
    assert report._ms(1.234) == "1.23" and report._ms(55.55) == "55.5" and report._ms(1234.5) == "1234"
    assert report._ms(0.0) == "0" and report._ms(None) == "-"
    stats = report.summarize([0.00002, 0.00003, 0.00004])  # seconds -> ms
    assert all(float(report._ms(stats[f"p{q}"])) > 0 for q in report.QUANTILES)
