"""Every series the Grafana dashboard and the alert rules query is fed by the server: real servers (tiny model,
loopback) are driven until each one moves, read back through GET /metrics with prometheus_client's parser.

The series list is built from deploy/ (tests/deploy/queries.py), so a new panel or alert on a series that no
entry of FEEDERS names fails here. Each family is marked PLAIN (moves on a server without a drafter) or DRAFTER
(needs speculation or a drafter swap); the marks are checked both ways: a PLAIN series must move on the plain
server, a DRAFTER series must move on the drafter server and stay still on the plain one.

Two servers:
- `plain_run`: the real app (create_app + DrainingServer, as `understudy serve` runs it) under uvicorn on a
  loopback port in a thread of this process, with no drafter, so that a step hook (`Gate`) can park the engine
  thread: requests then stay running/queued for as long as the test needs, whatever the machine's speed (the
  running/waiting gauges, 429, aborts and the SIGTERM drain's 503 are deterministic).
- `drafter_run`: `understudy serve` in a subprocess (as the other server tests) following a registry alias, with
  the trained tiny drafter; versions are published into it until a swap succeeds, one fails and the canary rolls
  one back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.queries import Series, alert_queries, dashboard_queries, queried_series
from tests.server.conftest import ServerProcess, free_port

pytestmark = pytest.mark.slow

PLAIN, DRAFTER = "plain", "drafter"

# family -> (what it needs to move, who feeds it)
FEEDERS: dict[str, tuple[str, str]] = {
    "understudy:request_success": (PLAIN, "metrics.on_route_finish: the reason the route sent; on_step: abort = "
                                          "left the scheduler unfinished, a finish no route reported in HOLD_S"),
    "understudy:request_errors": (PLAIN, "app.ErrorCounter middleware: every response >= 400, by status"),
    "understudy:num_requests_running": (PLAIN, "GET /metrics: set_queue(engine.num_running)"),
    "understudy:num_requests_waiting": (PLAIN, "GET /metrics: set_queue(engine.num_waiting)"),
    "understudy:time_to_first_token_seconds": (PLAIN, "metrics.on_step: first token of a request"),
    "understudy:inter_token_latency_seconds": (PLAIN, "metrics.on_step: every later token"),
    "understudy:e2e_request_latency_seconds": (PLAIN, "metrics.on_route_finish / release_held: request end"),
    "understudy:request_queue_time_seconds": (PLAIN, "metrics.on_step: arrival to the first token's step"),
    "understudy:engine_step_seconds": (PLAIN, "metrics.on_step: every non-empty step"),
    "understudy:generation_tokens": (PLAIN, "metrics.on_step: tokens emitted"),
    "understudy:prompt_tokens": (PLAIN, "metrics.on_step: prefill tokens"),
    "understudy:controller_arm": (PLAIN, "GET /metrics: set_controller (the bandit records K=0 steps too)"),
    "understudy:controller_arm_pulls": (PLAIN, "GET /metrics: set_controller"),
    "understudy:spec_decode_num_drafts": (DRAFTER, "metrics.on_step: StepStats.spec"),
    "understudy:spec_decode_num_draft_tokens": (DRAFTER, "metrics.on_step: StepStats.spec"),
    "understudy:spec_decode_num_accepted_tokens": (DRAFTER, "metrics.on_step: StepStats.spec"),
    "understudy:spec_decode_num_accepted_tokens_per_pos": (DRAFTER, "metrics.on_step: StepStats.spec"),
    "understudy:drafter_info": (DRAFTER, "hot swap: set_initial / _apply -> metrics.set_drafter"),
    "understudy:drafter_swaps": (DRAFTER, "hot swap: _record (success, failed, rolled_back)"),
    "understudy:drafter_swap_stall_seconds": (DRAFTER, "HotSwapManager.on_step: the first step after a swap"),
}

KEY = {"authorization": "Bearer sk-metrics"}
CHAT = "/v1/chat/completions"
WORDS = ["grid", "line", "flow", "risk", "load", "sum", "wind", "trip"]
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


# ---- the series list, from deploy/ --------------------------------------------------------------------------------
def _families() -> dict[str, set[str]]:
    """family -> sample names, and the label values the server pre-creates, from a fresh ServerMetrics."""
    from understudy.server.metrics import ServerMetrics

    return {fam.name: {s.name for s in fam.samples} for fam in ServerMetrics("m").registry.collect()}


def family_of(sample: str, families: dict[str, Any]) -> str:
    if sample in families:
        return sample
    for suffix in SUFFIXES:
        if sample.endswith(suffix) and sample.removesuffix(suffix) in families:
            return sample.removesuffix(suffix)
    raise AssertionError(f"{sample} is not exposed by understudy/server/metrics.py")


def charted_series() -> dict[Series, str]:
    """Every queried series -> its family; plus, for each queried family whose label values the server pre-creates
    (finish reasons, swap results), one series per value: each value is a line on a chart and must move too."""
    from understudy.server.metrics import ServerMetrics

    queried = queried_series(dashboard_queries() + alert_queries())
    precreated: dict[str, set[Series]] = {}
    for fam in ServerMetrics("m").registry.collect():
        for s in fam.samples:
            pinned = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            if pinned and not s.name.endswith("_created"):
                precreated.setdefault(fam.name, set()).add((s.name, pinned))
    families = _families()
    out = {series: family_of(series[0], families) for series in queried}
    for fam in set(out.values()):
        for series in precreated.get(fam, ()):
            out.setdefault(series, fam)
    return out


SERIES = charted_series()


def series_id(series: Series) -> str:
    name, pinned = series
    return name + ("{" + ",".join(f"{k}={v}" for k, v in pinned) + "}" if pinned else "")


# ---- reading /metrics --------------------------------------------------------------------------------------------
Snapshot = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Snapshot:
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    out: Snapshot = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def reading(snap: Snapshot, series: Series) -> tuple[float, frozenset[tuple[tuple[str, str], ...]]]:
    """The series' value (summed over its other labels) and its label sets: a move is a change of either."""
    name, pinned = series
    rows = [(labels, v) for labels, v in snap.get(name, []) if all(labels.get(k) == want for k, want in pinned)]
    return sum(v for _, v in rows), frozenset(tuple(sorted(labels.items())) for labels, _ in rows)


def moved(snaps: list[Snapshot], series: Series) -> bool:
    return len({reading(s, series) for s in snaps}) > 1


def value(snap: Snapshot, name: str, **labels: str) -> float:
    return reading(snap, (name, tuple(sorted(labels.items()))))[0]


def errors_by_status(snap: Snapshot) -> dict[str, float]:
    return {labels["status"]: v for labels, v in snap.get("understudy:request_errors_total", [])}


def delta(before: Snapshot, after: Snapshot, name: str, label: str) -> dict[str, float]:
    """label value -> increase, for the values that changed."""
    old = {labels[label]: v for labels, v in before.get(name, [])}
    new = {labels[label]: v for labels, v in after.get(name, [])}
    return {k: v - old.get(k, 0.0) for k, v in new.items() if v != old.get(k, 0.0)}


def scrape_until(url: str, pred: Callable[[Snapshot], bool], describe: Callable[[], str]) -> Snapshot:
    def hit() -> Snapshot | None:
        snap = scrape(url)
        return snap if pred(snap) else None

    snap = wait_for(hit)
    assert snap is not None, describe()
    return snap


def wait_for(pred: Callable[[], Any], timeout: float = 300.0, every: float = 0.05) -> Any:
    """Poll a condition on the server's state (never a duration the test depends on); the deadline is a guard."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()


def chat(content: str, **over: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **over}


# ---- the plain server: in-process, with a gate on the engine thread -----------------------------------------------
class Gate:
    """A step hook: while closed, the engine thread parks at the end of every step until `advance()` lets one
    more step run (or `open()` lets all run). `parks` counts the steps that parked."""

    def __init__(self) -> None:
        self.closed = False
        self.parks = 0
        self._cond = threading.Condition()
        self._tickets = 0

    def __call__(self, *_: Any) -> None:
        with self._cond:
            if not self.closed:
                return
            self.parks += 1
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._tickets > 0 or not self.closed, timeout=300):
                raise TimeoutError("the test never reopened the engine gate")
            self._tickets = max(0, self._tickets - 1)

    def close(self) -> None:
        with self._cond:
            self.closed, self._tickets = True, 0

    def open(self) -> None:
        with self._cond:
            self.closed = False
            self._cond.notify_all()

    def wait_parked(self, more_than: int) -> int:
        with self._cond:
            assert self._cond.wait_for(lambda: self.parks > more_than, timeout=120), "the engine never parked"
            return self.parks

    def advance(self) -> int:
        """Let the parked engine run exactly one more step; return once it parked again."""
        with self._cond:
            n = self.parks
            self._tickets += 1
            self._cond.notify_all()
        return self.wait_parked(n)


class InProcessServer:
    def __init__(self, settings: Any) -> None:
        import uvicorn

        from understudy.server.app import create_app
        from understudy.server.main import DrainingServer

        self.app = create_app(settings)
        self.url = f"http://127.0.0.1:{settings.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="warning",
                                access_log=False, lifespan="on")
        self.server = DrainingServer(config, self.app, settings.drain_timeout_s)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        assert wait_for(self._ready, 120), "the in-process server did not become ready"

    def _ready(self) -> bool:
        if not self.thread.is_alive():
            raise RuntimeError("the in-process server exited during startup")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        return False

    @property
    def state(self) -> Any:
        return self.app.state.understudy

    def in_flight(self) -> int:
        return int(httpx.get(f"{self.url}/health", timeout=30).json()["in_flight"])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@contextlib.contextmanager
def held_stream(client: httpx.Client, body: dict[str, Any]) -> Iterator[httpx.Response]:
    """A streaming chat whose status line arrived (so it is queued in the scheduler) and that is never read: on
    exit the connection is closed, which the server sees as a client disconnect."""
    with client.stream("POST", CHAT, json=body, headers=KEY) as r:
        assert r.status_code == 200, r.read()
        yield r


@pytest.fixture(scope="module")
def plain_run(server_assets, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Drive the plain server through every PLAIN series; return its snapshots (in order) and what was sent."""
    from understudy.server.settings import ServerSettings

    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith("UNDERSTUDY_"):
                mp.delenv(k)
        settings = ServerSettings(
            model=str(server_assets["model"]), served_model_name="tiny", registry=str(tmp_path_factory.mktemp("empty-reg")),
            dtype="float32", host="127.0.0.1", port=free_port(), api_key=["sk-metrics"], max_batch_size=1,
            max_queue=1, max_model_len=256, max_body_bytes=1024, drain_timeout_s=60)
        srv = InProcessServer(settings)
    gate = Gate()
    srv.state.scheduler.step_hooks.append(gate)
    url = srv.url
    snaps: dict[str, Snapshot] = {}
    http = httpx.Client(base_url=url, timeout=60)
    try:
        snaps["start"] = scrape(url)
        # 1. error responses, one or two per status
        sent: dict[str, int] = {"400": 1, "401": 1, "404": 2, "405": 1, "413": 2}
        assert http.post(CHAT, json={"model": "tiny", "messages": []}, headers=KEY).status_code == 400
        assert http.post(CHAT, json=chat("grid", max_tokens=2)).status_code == 401
        assert http.get("/v1/no-such-route", headers=KEY).status_code == 404
        assert http.post(CHAT, json={**chat("grid", max_tokens=2), "model": "nope"}, headers=KEY).status_code == 404
        assert http.get(CHAT, headers=KEY).status_code == 405
        big = chat("x" * 2048, max_tokens=2)
        assert http.post(CHAT, json=big, headers=KEY).status_code == 413  # by Content-Length

        def chunks() -> Iterator[bytes]:
            yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            for _ in range(8):
                yield b"x" * 512
            yield b'"}]}'

        r = http.post(CHAT, content=chunks(), headers={**KEY, "content-type": "application/json"})
        assert r.status_code == 413, r.text  # chunked: counted while reading
        snaps["errors"] = scrape(url)

        # 2. completions: length (twice) and a stop string; the stop string's engine abort is not an "abort"
        first = http.post(CHAT, json=chat("grid line flow", max_tokens=12, ignore_eos=True), headers=KEY)
        assert first.status_code == 200 and first.json()["choices"][0]["finish_reason"] == "length"
        text = first.json()["choices"][0]["message"]["content"]
        stop = next(text[i:i + 2] for i in range(3, len(text) - 1) if text[i:i + 2].strip())
        # the same greedy start, with room to run on: the stop string ends the request before the engine does
        r = http.post(CHAT, json=chat("grid line flow", max_tokens=200, ignore_eos=True, stop=[stop]), headers=KEY)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop", (text, stop, r.text)
        # and a stop string that the engine's last output completes (its length limit, 12 tokens, in the same
        # step): the client is sent `stop`, and so must the metric count it (the route reports what it sent)
        end = next(text[-n:] for n in range(2, len(text) + 1) if text[-n:].strip() and text.find(text[-n:]) == len(text) - n)
        r = http.post(CHAT, json=chat("grid line flow", max_tokens=12, ignore_eos=True, stop=[end]), headers=KEY)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop", (text, end, r.text)
        assert r.json()["usage"]["completion_tokens"] == 12, r.text  # the engine's own end came in the same output
        r = http.post(CHAT, json=chat("risk load", max_tokens=6, ignore_eos=True), headers=KEY)  # steps after it
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        snaps["completions"] = scrape(url)

        # 3. one request running, one queued (max_batch_size 1, max_queue 1), a third refused with 429
        long = chat("wind trip", max_tokens=200, ignore_eos=True, stream=True)
        parks = gate.parks
        gate.close()
        with contextlib.ExitStack() as streams:
            streams.enter_context(held_stream(http, long))
            gate.wait_parked(parks)  # parked after the step that prefilled it: it is running
            streams.enter_context(held_stream(http, long))  # queued: the batch holds one
            gate.advance()  # one more step, which sees the queued request
            assert http.post(CHAT, json=chat("sum", max_tokens=2), headers=KEY).status_code == 429
            snaps["held"] = scrape(url)
        assert wait_for(lambda: srv.in_flight() == 0), "the server did not abort the disconnected streams"
        gate.open()
        before = value(snaps["held"], "understudy:request_success_total", finished_reason="abort")
        assert wait_for(lambda: value(scrape(url), "understudy:request_success_total", finished_reason="abort")
                        >= before + 2)
        snaps["released"] = scrape(url)

        # 4. SIGTERM with a request in flight: draining, a new request gets 503, then the server exits by itself
        parks = gate.parks
        gate.close()
        with held_stream(http, chat("flow", max_tokens=200, ignore_eos=True, stream=True)):
            gate.wait_parked(parks)
            srv.server.handle_exit(signal.SIGTERM, None)
            r = http.post(CHAT, json=chat("sum", max_tokens=2), headers=KEY)
            assert r.status_code == 503 and r.headers.get("retry-after"), r.text
            snaps["draining"] = scrape(url)
        gate.open()
        srv.thread.join(60)
        exited = not srv.thread.is_alive()
    finally:
        gate.open()
        http.close()
        srv.stop()
    assert exited, "the drain did not end the server"
    yield {"snaps": snaps, "sent_errors": sent}


# ---- the drafter server: a subprocess following a registry alias --------------------------------------------------
@pytest.fixture(scope="module")
def drafter_run(server_assets, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Drive speculation and every kind of swap (success, failed, rolled_back by the canary)."""
    from understudy.registry.store import Registry

    reg_dir = tmp_path_factory.mktemp("metrics-reg")
    reg = Registry.open(reg_dir)
    good = reg.publish(server_assets["good"]).version
    reg.promote(good, "serving")
    srv = ServerProcess(["--model", str(server_assets["model"]), "--registry", str(reg_dir), "--follow", "serving",
                         "--served-model-name", "tiny", "--max-batch-size", "4", "--max-model-len", "256",
                         "-k", "4", "--canary-window", "4", "--canary-margin", "0.2"],
                        env={"UNDERSTUDY_WATCH_INTERVAL_S": "0.2"},
                        log=tmp_path_factory.mktemp("metrics-log") / "server.log").wait_ready()
    snaps: list[Snapshot] = [scrape(srv.url)]
    n = 0

    def traffic() -> None:
        nonlocal n
        n += 1
        prompt = " ".join(WORDS[(n * 3 + j) % 8] for j in range(1 + n % 6))
        r = httpx.post(f"{srv.url}{CHAT}", json=chat(prompt, max_tokens=24), timeout=60)
        assert r.status_code == 200, r.text

    def until(pred: Callable[[Snapshot], bool], what: str, requests: int = 200) -> Snapshot:
        """Send requests one at a time until the scraped metrics satisfy pred (bounded by a request count)."""
        for _ in range(requests):
            snap = scrape(srv.url)
            if pred(snap):
                snaps.append(snap)
                return snap
            traffic()
        raise AssertionError(f"{what} after {requests} requests:\n{srv.tail()}")

    swaps = "understudy:drafter_swaps_total"
    stall = "understudy:drafter_swap_stall_seconds_count"
    try:
        # the first drafter's acceptance baseline (the canary compares a new version against it)
        until(lambda s: value(s, "understudy:spec_decode_num_drafts_total") >= 16, "too few drafts")
        # a drafter of another model family: refused at validation
        foreign = reg.publish(server_assets["other"]).version
        reg.promote(foreign, "serving")
        snaps.append(scrape_until(srv.url, lambda s: value(s, swaps, result="failed") >= 1, srv.tail))
        assert value(snaps[-1], swaps, result="failed") == 1, srv.tail()
        # a garbage drafter: swapped in (success, a stall), then rolled back by the canary under traffic
        garbage_dir = tmp_path_factory.mktemp("garbage") / "garbage"
        shutil.copytree(server_assets["garbage"], garbage_dir)
        garbage = reg.publish(garbage_dir).version
        reg.promote(garbage, "serving")
        snaps.append(scrape_until(srv.url, lambda s: value(s, swaps, result="success") >= 1 and value(s, stall) >= 1,
                                  srv.tail))
        assert value(snaps[-1], "understudy:drafter_info", version=str(garbage)) == 1, srv.tail()
        until(lambda s: value(s, swaps, result="rolled_back") >= 1, "no canary rollback")
        assert value(snaps[-1], "understudy:drafter_info", version=str(good)) == 1
    finally:
        code = srv.stop()
    assert code == 0, srv.tail()
    yield {"snaps": snaps, "versions": (good, foreign, garbage)}


# ---- the tests ---------------------------------------------------------------------------------------------------
def test_every_charted_series_has_a_feeder():
    families = set(SERIES.values())
    assert len(families) >= 15, sorted(families)
    missing = families - FEEDERS.keys()
    assert not missing, f"charted in deploy/ but no feeder is declared (and tested) here: {sorted(missing)}"
    stale = FEEDERS.keys() - families
    assert not stale, f"FEEDERS names families that no panel or alert queries: {sorted(stale)}"
    assert all(need in (PLAIN, DRAFTER) for need, _ in FEEDERS.values())


def test_the_series_list_comes_from_the_files():
    # pinned label values of the alerts and the pre-created values both count as series of their own
    assert ("understudy:drafter_swaps_total", (("result", "failed"),)) in SERIES
    assert ("understudy:drafter_swaps_total", (("result", "rolled_back"),)) in SERIES
    assert ("understudy:request_success_total", (("finished_reason", "abort"),)) in SERIES
    assert ("understudy:request_errors_total", ()) in SERIES


@pytest.mark.parametrize("series", sorted(SERIES), ids=series_id)
def test_series_moves(series, request):
    need, feeder = FEEDERS[SERIES[series]]
    plain = list(request.getfixturevalue("plain_run")["snaps"].values())
    if need == PLAIN:
        assert moved(plain, series), f"{series_id(series)} never moved on the plain server (feeder: {feeder})"
        return
    assert not moved(plain, series), f"{series_id(series)} moved without a drafter: mark it PLAIN"
    snaps = request.getfixturevalue("drafter_run")["snaps"]
    assert moved(snaps, series), f"{series_id(series)} never moved on the drafter server (feeder: {feeder})"


def test_request_errors_count_every_error_response_once_by_status(plain_run):
    s = plain_run["snaps"]
    assert delta(s["start"], s["errors"], "understudy:request_errors_total", "status") == plain_run["sent_errors"]
    assert delta(s["errors"], s["held"], "understudy:request_errors_total", "status") == {"429": 1}
    assert delta(s["released"], s["draining"], "understudy:request_errors_total", "status") == {"503": 1}
    assert all(labels["model_name"] == "tiny" for labels, _ in s["draining"]["understudy:request_errors_total"])


def test_finish_reasons_stop_string_length_and_abort(plain_run):
    s = plain_run["snaps"]
    # two length finishes and one stop string; the stop string's engine request is aborted by the route, and
    # that is not a client abort
    assert delta(s["errors"], s["completions"], "understudy:request_success_total", "finished_reason") == \
        {"length": 2, "stop": 2}
    # both held streams (one running, one queued) were dropped by their clients: two aborts, nothing else
    assert delta(s["completions"], s["released"], "understudy:request_success_total", "finished_reason") == \
        {"abort": 2}
    e2e = "understudy:e2e_request_latency_seconds_count"
    assert value(s["completions"], e2e) - value(s["errors"], e2e) == 4  # the stop-string requests have an E2E too


def test_queue_gauges_while_a_request_runs_and_one_waits(plain_run):
    s = plain_run["snaps"]
    assert value(s["start"], "understudy:num_requests_running") == 0
    assert value(s["held"], "understudy:num_requests_running") == 1
    assert value(s["held"], "understudy:num_requests_waiting") == 1
    assert value(s["released"], "understudy:num_requests_running") == 0
    assert value(s["released"], "understudy:num_requests_waiting") == 0


def test_swaps_by_result_and_the_drafter_serving(drafter_run):
    snaps = drafter_run["snaps"]
    good, _, garbage = drafter_run["versions"]
    first, last = snaps[0], snaps[-1]
    assert value(first, "understudy:drafter_info", version=str(good)) == 1
    assert delta(first, last, "understudy:drafter_swaps_total", "result") == {"failed": 1, "success": 1,
                                                                              "rolled_back": 1}
    assert any(value(s, "understudy:drafter_info", version=str(garbage)) == 1 for s in snaps)
    assert value(last, "understudy:drafter_info", version=str(good)) == 1
    assert value(last, "understudy:spec_decode_num_accepted_tokens_total") > 0


def test_error_counter_counts_unhandled_500_and_handler_made_errors():
    """In-process (no model): an exception no handler maps is Starlette's 500, counted before it is re-raised;
    one mapped by a handler (TimeoutError -> 408) is counted from its response; a 200 is not counted."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from understudy.server.app import create_app
    from understudy.server.metrics import ServerMetrics
    from understudy.server.settings import ServerSettings

    app = create_app(ServerSettings(api_key=["k"]))
    metrics = ServerMetrics("m")
    app.state.understudy = SimpleNamespace(metrics=metrics)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/slow")
    async def slow() -> None:
        raise TimeoutError("too slow")

    client = TestClient(app, raise_server_exceptions=False)  # no `with`: no lifespan, nothing loaded
    assert client.get("/boom").status_code == 500
    assert client.get("/slow").status_code == 408
    assert client.get("/livez").status_code == 200
    counted = {s.labels["status"]: s.value for fam in metrics.registry.collect() for s in fam.samples
               if s.name == "understudy:request_errors_total"}
    assert counted == {"500": 1.0, "408": 1.0}


def test_a_finish_is_counted_once_with_the_reason_the_client_was_sent():
    """In-process, no model: the engine finishes a request on its length limit in the step whose output also
    completes a stop string; the route sends `stop` and the metric counts `stop`, not the engine's `length`. A
    finish whose route never reports is counted with the engine's reason once HOLD_S has passed."""
    import time

    from understudy.engine.engine import StepOutput, StepStats
    from understudy.server.metrics import HOLD_S, ServerMetrics
    from understudy.server.scheduler import RequestStream

    def counts(metrics: ServerMetrics) -> dict[str, float]:
        return {smp.labels["finished_reason"]: smp.value for fam in metrics.registry.collect() for smp in fam.samples
                if smp.name == "understudy:request_success_total" and smp.value}

    metrics, now = ServerMetrics("m"), time.monotonic()
    a, b = RequestStream("a", 3, now), RequestStream("b", 3, now)
    streams = {"a": a, "b": b}
    out = [StepOutput("a", [7], True, "length"), StepOutput("b", [8], True, "length")]
    metrics.on_step(StepStats(), out, streams, now)
    assert counts(metrics) == {}  # held: the routes have not said what they sent
    a.done = b.done = True  # the scheduler's dispatch, after the hooks
    metrics.on_route_finish(a, "stop")  # its last token completed a stop string
    metrics.on_route_finish(a, "stop")  # counted once
    assert counts(metrics) == {"stop": 1.0}
    metrics.release_held(now + HOLD_S / 2)
    assert counts(metrics) == {"stop": 1.0}  # b's route may still report
    metrics.release_held(time.monotonic() + HOLD_S)  # it never did (its client went away): the engine's reason
    assert counts(metrics) == {"stop": 1.0, "length": 1.0}
    metrics.on_route_finish(b, "length")  # a late report counts nothing more
    assert counts(metrics) == {"stop": 1.0, "length": 1.0}
