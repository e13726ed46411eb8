"""Prometheus metrics with vLLM's names and definitions where they exist, under the `understudy:` prefix.

One CollectorRegistry per app (no process-global state). Spec-decode counters follow vLLM: a "draft" is one
sequence proposing >= 1 token in a step; mean acceptance length = 1 + accepted / drafts. Inter-token latency
is observed once per generated token: when a speculative step commits n tokens after dt seconds, each of the n
tokens is observed at dt / n (so TPOT = mean ITL stays comparable with and without speculation).

Who feeds what (tests/server/test_metrics.py drives a real server until each charted series moves):
- the engine thread's step hook `on_step`: tokens, latencies, spec-decode counters; and `request_success` once
  for every engine request it saw, labelled by the finish reason the client was sent. The route reports that
  reason (`on_route_finish`): the engine's (stop, length), or `stop` when the route ended the request on a stop
  string, also when the engine's last output both completed the stop string and hit its own length limit. A
  request the engine finished is therefore held (`_held`) until its route reports; one no route reports within
  `HOLD_S` (its consumer gone, or never started) is counted with the engine's reason. `abort`: the request left
  the scheduler unfinished (client disconnect, timeout, a failed step). A request the engine failed (finish
  reason "error") is not a success: its 500 is counted in request_errors;
- `/metrics` itself (`set_queue`, `set_controller`): the running/waiting gauges and the controller's arms;
- the hot-swap manager: `drafter_info`, `policy_info`, `drafter_swaps`, `drafter_swap_stall_seconds`,
  `policy_swap_drain_seconds`;
- app.py's `ErrorCounter` middleware: `request_errors{status}` for every response with status >= 400 (`on_error`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from understudy.engine.engine import StepOutput, StepStats
from understudy.server.scheduler import RequestStream

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0)
HOLD_S = 5.0  # how long a finished request waits for its route to report the finish reason it sent
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        lab = ["model_name"]
        self.model_name = model_name
        self.running = Gauge("understudy:num_requests_running", "Requests in the running batch", lab, registry=r)
        self.waiting = Gauge("understudy:num_requests_waiting", "Requests queued for a slot", lab, registry=r)
        self.success = Counter("understudy:request_success", "Finished requests by finish reason",
                               [*lab, "finished_reason"], registry=r)
        self.errors = Counter("understudy:request_errors", "Requests answered with an error, by HTTP status",
                              [*lab, "status"], registry=r)
        self.prompt_tokens = Counter("understudy:prompt_tokens", "Prefill tokens processed", lab, registry=r)
        self.generation_tokens = Counter("understudy:generation_tokens", "Tokens generated", lab, registry=r)
        self.ttft = Histogram("understudy:time_to_first_token_seconds", "Time to first token", lab,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("understudy:inter_token_latency_seconds", "Inter-token latency (per token)", lab,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("understudy:e2e_request_latency_seconds", "End-to-end request latency", lab,
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("understudy:request_queue_time_seconds", "Time waiting before the prefill step",
                                    lab, buckets=REQUEST_BUCKETS, registry=r)
        self.step_time = Histogram("understudy:engine_step_seconds", "Engine step duration", lab,
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.num_drafts = Counter("understudy:spec_decode_num_drafts", "Speculative drafts", lab, registry=r)
        self.num_draft_tokens = Counter("understudy:spec_decode_num_draft_tokens", "Draft tokens proposed", lab,
                                        registry=r)
        self.num_accepted = Counter("understudy:spec_decode_num_accepted_tokens", "Draft tokens accepted", lab,
                                    registry=r)
        self.accepted_per_pos = Counter("understudy:spec_decode_num_accepted_tokens_per_pos",
                                        "Accepted draft tokens by position", [*lab, "position"], registry=r)
        self.drafter_info = Gauge("understudy:drafter_info", "The drafter version serving (1 = current)",
                                  [*lab, "version", "source", "fingerprint"], registry=r)
        self.policy_info = Gauge("understudy:policy_info", "The policy (target weights) serving (1 = current); "
                                 "version 'base' = the model the server started with", [*lab, "version"], registry=r)
        self.swaps = Counter("understudy:drafter_swaps", "Drafter swaps by result", [*lab, "result"], registry=r)
        self.swap_stall = Histogram("understudy:drafter_swap_stall_seconds",
                                    "Extra duration of the first engine step after a swap (catch-up)", lab,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.policy_drain = Histogram("understudy:policy_swap_drain_seconds",
                                      "How long a policy swap waited for the requests in flight on the old weights",
                                      lab, buckets=LATENCY_BUCKETS, registry=r)
        self.controller_arm = Gauge("understudy:controller_arm", "Draft tokens (K) the controller picks, per batch-size bucket",
                                    [*lab, "bucket"], registry=r)
        self.controller_pulls = Gauge("understudy:controller_arm_pulls", "Steps run with each K, per bucket",
                                      [*lab, "bucket", "k"], registry=r)
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)
        for result in ("success", "failed", "rolled_back"):
            self.swaps.labels(model_name, result)
        # Request ends seen by on_step: ids in the scheduler at the last step (engine thread only), ids the
        # route already counted (stop strings: the route aborts the engine request, which must not count as
        # abort), and requests the engine finished whose route has not reported yet: id -> (the engine's reason,
        # arrival, when the engine finished it).
        self._live: set[str] = set()
        self._ended_by_route: set[str] = set()
        self._held: dict[str, tuple[str, float, float]] = {}
        self._lock = threading.Lock()

    # ---- hooks ---------------------------------------------------------------------------------------------
    def on_step(self, stats: StepStats, outs: list[StepOutput], streams: dict[str, RequestStream], t0: float) -> None:
        m = self.model_name
        now = time.monotonic()
        if stats.batch_size or stats.num_prefill_tokens:
            self.step_time.labels(m).observe(stats.seconds)
        self.prompt_tokens.labels(m).inc(stats.num_prefill_tokens)
        spec = stats.spec
        if spec.num_drafts:
            self.num_drafts.labels(m).inc(spec.num_drafts)
            self.num_draft_tokens.labels(m).inc(spec.num_draft_tokens)
            self.num_accepted.labels(m).inc(spec.num_accepted_tokens)
            for i, c in enumerate(spec.accepted_per_pos):
                if c:
                    self.accepted_per_pos.labels(m, str(i)).inc(c)
        finished = {o.request_id for o in outs if o.finished}
        for o in outs:
            s = streams.get(o.request_id)
            n = len(o.new_token_ids)
            self.generation_tokens.labels(m).inc(n)
            if s is not None and n:
                if s.first_token_at is None:  # this step produced the first token (dispatch sets it after hooks)
                    self.ttft.labels(m).observe(now - s.arrival)
                    self.queue_time.labels(m).observe(max(0.0, t0 - s.arrival))
                    n -= 1
                if n > 0 and s.last_token_at is not None:
                    per = (now - s.last_token_at) / n
                    for _ in range(n):
                        self.itl.labels(m).observe(per)
        self._count_ends(outs, finished, streams, now)

    def _count_ends(self, outs: list[StepOutput], finished: set[str], streams: dict[str, RequestStream],
                    now: float) -> None:
        """request_success by how each engine request ended; every request the engine saw is counted once."""
        m = self.model_name
        live = set(streams)  # one C-level copy: the event loop adds and removes streams meanwhile
        with self._lock:
            by_route = self._ended_by_route & (finished | (self._live - live))
            self._ended_by_route -= by_route
        for o in outs:
            if o.finished and o.request_id not in by_route and o.finish_reason != "error":  # an error is a 500
                s = streams.get(o.request_id)
                if s is None:  # its consumer is gone: nobody will report another reason
                    self.success.labels(m, o.finish_reason or "stop").inc()
                    continue
                with self._lock:  # the route reports the reason it sends once this output reaches it
                    self._held[o.request_id] = (o.finish_reason or "stop", s.arrival, now)
        aborted = self._live - live - finished - by_route  # left the scheduler unfinished since the last step
        if aborted:
            self.success.labels(m, "abort").inc(len(aborted))
        self._live = live - finished
        self.release_held(now)

    def on_route_finish(self, stream: RequestStream, reason: str) -> None:
        """The route sent this request's finish reason (`stop` or `length`): count it, once. For a stop string
        before the engine's own end the route aborts the engine request next, which is not an abort."""
        with self._lock:
            held = self._held.pop(stream.request_id, None)
            if held is None:
                if stream.done or stream.request_id in self._ended_by_route:
                    return  # counted already: held past HOLD_S and released with the engine's reason
                self._ended_by_route.add(stream.request_id)
        self.success.labels(self.model_name, reason).inc()
        self.e2e.labels(self.model_name).observe(time.monotonic() - stream.arrival)

    def release_held(self, now: float | None = None) -> None:
        """Count the finished requests no route reported within HOLD_S, with the engine's finish reason (also
        called by /metrics, so that an idle server's counts settle)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            late = [(rid, v) for rid, v in self._held.items() if now - v[2] >= HOLD_S]
            for rid, _ in late:
                del self._held[rid]
        for _, (reason, arrival, ended) in late:
            self.success.labels(self.model_name, reason).inc()
            self.e2e.labels(self.model_name).observe(ended - arrival)

    def on_error(self, status: int) -> None:
        """An HTTP response with status >= 400 (app.py's ErrorCounter middleware calls this)."""
        self.errors.labels(self.model_name, str(status)).inc()

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)
        self.release_held()

    def set_controller(self, state: dict[str, Any]) -> None:
        for bucket, b in state.get("buckets", {}).items():
            self.controller_arm.labels(self.model_name, bucket).set(b["current_k"])
            for k, n in b.get("pulls", {}).items():
                self.controller_pulls.labels(self.model_name, bucket, k).set(n)

    def set_drafter(self, version: str, source: str, fingerprint: str) -> None:
        self.drafter_info.clear()
        self.drafter_info.labels(self.model_name, version, source, fingerprint).set(1)

    def set_policy(self, version: str) -> None:
        self.policy_info.clear()
        self.policy_info.labels(self.model_name, version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
