"""Locust load test for an Understudy server on this machine: streaming chat and streaming completions.

With streaming, Locust's own response time stops at the response headers, so every request also fires custom
events, named by API and by the drafter version from the `x-understudy-drafter-version` header (`chat v3`):

    TTFT  time to the first chunk carrying text                     (one per request)
    TPOT  (E2E - TTFT) / (completion_tokens - 1), usage from the stream  (one per request with >= 2 tokens)
    ITL   gap between consecutive text-bearing chunks                (one per gap; a speculative step that
          commits several tokens arrives as one chunk, as in vLLM's benchmark_serving)
    E2E   request sent -> `data: [DONE]`                              (one per request)

Failures are counted apart: a non-2xx answer fails the `POST` row (`chat`/`completions`), an in-band
`{"error": ...}` event is a `STREAM_ERROR`, and a stream without `[DONE]` or without a finish_reason is
`TRUNCATED`. With UNDERSTUDY_EVENTS_FILE (or --events-file) set, one JSON line per request is appended there
(raw samples for loadtests/report.py; see loadtests/README.md).

Closed loop (default): every user sends its next request as soon as the last one ends (wait_time 0).
Open loop: --rate R sends R requests/s in total (Poisson arrivals, or --arrivals constant), split across
the users, whether or not earlier requests have finished (each user keeps at most --max-in-flight open).

    locust -f loadtests/locustfile.py --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:8000 \
        --api-key sk-... --max-tokens 64 --events-file runs/on/events.jsonl --csv runs/on/locust

Runs must be bounded (-t) and the host must be loopback: anything else is refused.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gevent
from gevent.pool import Group
from locust import HttpUser, constant, events, task
from requests.adapters import HTTPAdapter
from requests.exceptions import RequestException

try:
    from understudy.clients.client import DONE, DRAFTER_HEADER, SSEDecoder, UnderstudyAPIError, parse_event
except ModuleNotFoundError:  # `locust -f loadtests/locustfile.py` from a checkout: use the package beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from understudy.clients.client import DONE, DRAFTER_HEADER, SSEDecoder, UnderstudyAPIError, parse_event

log = logging.getLogger("understudy.loadtest")

BUILTIN_PROMPTS = (
    "Explain what a power grid operator does in two sentences.",
    "Write a haiku about wind turbines.",
    "List three causes of a transmission line trip.",
    "Summarise the idea of speculative decoding.",
    "What is the sum of 17 and 25? Answer briefly.",
    "Give a short definition of load flow analysis.",
    "Translate 'the solar farm is online' into French.",
    "Describe a risk of running a network near its limits.",
)


# ---- configuration ----------------------------------------------------------------------------------------------
@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    parser.add_argument("--model", default="", env_var="UNDERSTUDY_MODEL",
                        help="Model name (default: the first id of /v1/models)")
    parser.add_argument("--max-tokens", type=int, default=64, env_var="UNDERSTUDY_MAX_TOKENS")
    parser.add_argument("--temperature", type=float, default=0.0, env_var="UNDERSTUDY_TEMPERATURE")
    parser.add_argument("--api-key", default="", env_var="UNDERSTUDY_API_KEY", is_secret=True)
    parser.add_argument("--prompts-file", default="", env_var="UNDERSTUDY_PROMPTS_FILE",
                        help="Prompts, one per line (or JSONL with a 'prompt' field); default: built-in prompts")
    parser.add_argument("--rate", type=float, default=0.0, env_var="UNDERSTUDY_RATE",
                        help="Open loop: total requests/s across all users; 0 = closed loop")
    parser.add_argument("--arrivals", choices=["poisson", "constant"], default="poisson",
                        env_var="UNDERSTUDY_ARRIVALS", help="Open loop: inter-arrival distribution")
    parser.add_argument("--max-in-flight", type=int, default=64, env_var="UNDERSTUDY_MAX_IN_FLIGHT",
                        help="Open loop: open requests per user before new arrivals are dropped")
    parser.add_argument("--events-file", default="", env_var="UNDERSTUDY_EVENTS_FILE",
                        help="Append one JSON line per request here (input of loadtests/report.py)")


@dataclass(frozen=True)
class LoadConfig:
    model: str  # "" = ask /v1/models
    max_tokens: int  # per request
    temperature: float  # 0 = greedy
    api_key: str  # "" = no Authorization header
    prompts: tuple[str, ...]  # drawn uniformly per request
    rate: float  # open loop: total requests/s; 0 = closed loop
    arrivals: str  # "poisson" | "constant"
    max_in_flight: int  # open loop, per user
    users: int  # target user count (for the report's grouping)

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.rate < 0 or self.max_in_flight < 1 or not self.prompts:
            raise ValueError("--max-tokens and --max-in-flight must be >= 1, --rate >= 0, and prompts non-empty")


def load_prompts(path: str) -> tuple[str, ...]:
    if not path:
        return BUILTIN_PROMPTS
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            line = str(json.loads(line)["prompt"])
        if line:
            out.append(line)
    if not out:
        raise ValueError(f"--prompts-file {path}: no prompts (one per line, or JSONL with a 'prompt' field)")
    return tuple(out)


def is_loopback(host: str | None) -> bool:
    name = urlsplit(host or "").hostname
    if not name:
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def refuse(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


@events.init.add_listener
def on_init(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:  # used as a library: the caller sets environment.understudy itself
        return
    host = environment.host or opts.host
    if not host:
        refuse("no --host: pass the URL of a server on this machine, e.g. --host http://127.0.0.1:8000")
    if not is_loopback(host):
        refuse(f"--host {host!r} is not a loopback URL: this load test only targets a server on this machine "
               "(http://127.0.0.1:PORT, http://localhost:PORT or http://[::1]:PORT)")
    if not opts.run_time and not getattr(opts, "worker", False):
        refuse("runs must be bounded: pass -t/--run-time (e.g. -t 60s)")
    try:
        environment.understudy = LoadConfig(
            model=opts.model, max_tokens=opts.max_tokens, temperature=opts.temperature, api_key=opts.api_key,
            prompts=load_prompts(opts.prompts_file), rate=opts.rate, arrivals=opts.arrivals,
            max_in_flight=opts.max_in_flight, users=opts.num_users or 1)
    except (OSError, ValueError, KeyError) as e:
        refuse(str(e))
    environment.understudy_events = EventLog(opts.events_file) if opts.events_file else None


@events.quitting.add_listener
def on_quitting(environment: Any, **_: Any) -> None:
    ev = getattr(environment, "understudy_events", None)
    if ev is not None:
        ev.close()


class EventLog:
    """Append-only JSONL, one line per request, one write() per line (safe with several Locust processes)."""

    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", buffering=1)  # noqa: SIM115 - closed on quitting

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._fh.close()


# ---- one streamed request ---------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    api: str  # "chat" | "completions"
    t: float  # wall-clock start (unix seconds)
    status: int = 0  # HTTP status (0 = no answer)
    version: str = "unknown"  # x-understudy-drafter-version
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False  # saw data: [DONE]
    error: str | None = None

    @property
    def outcome(self) -> str:
        if not 200 <= self.status < 300:
            return "http_error"
        if self.error is not None and not self.error.startswith("truncated"):
            return "stream_error"
        return "ok" if self.done and self.finish_reason else "truncated"

    @property
    def tpot_s(self) -> float | None:
        n = self.completion_tokens
        if self.ttft_s is None or self.e2e_s is None or not n or n < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (n - 1)

    @property
    def name(self) -> str:
        return f"{self.api} v{self.version}" if self.version.isdigit() else f"{self.api} {self.version}"


def chunk_text(api: str, chunk: dict[str, Any]) -> str:
    out = []
    for ch in chunk.get("choices") or []:
        out.append((ch.get("delta") or {}).get("content") or "" if api == "chat" else ch.get("text") or "")
    return "".join(out)


def read_stream(resp: Any, r: StreamResult, t0: float) -> None:
    """Consume the SSE body, filling r's timings, usage and finish reason."""
    dec, last = SSEDecoder(), None
    try:
        for raw in resp.iter_lines(chunk_size=None):
            data = dec.feed(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
            if data is None:
                continue
            ev = parse_event(data)
            now = time.perf_counter()
            if ev is DONE:
                r.done, r.e2e_s = True, now - t0
                return
            usage = ev.get("usage") or {}  # type: ignore[union-attr]
            r.prompt_tokens = usage.get("prompt_tokens", r.prompt_tokens)
            r.completion_tokens = usage.get("completion_tokens", r.completion_tokens)
            for ch in ev.get("choices") or []:  # type: ignore[union-attr]
                r.finish_reason = ch.get("finish_reason") or r.finish_reason
            if chunk_text(r.api, ev):  # type: ignore[arg-type]
                if last is None:
                    r.ttft_s = now - t0
                else:
                    r.itl_s.append(now - last)
                last = now
        r.error = "truncated: the stream ended before data: [DONE]"
    except UnderstudyAPIError as e:
        r.error = str(e)
    except (RequestException, ValueError) as e:  # dropped connection, undecodable event
        r.error = f"truncated: {type(e).__name__}: {e}"
    r.e2e_s = time.perf_counter() - t0


def _ms(s: float | None) -> float:
    return 0.0 if s is None else s * 1000.0


# ---- users ------------------------------------------------------------------------------------------------------
class _StreamingUser(HttpUser):
    abstract = True
    wait_time = constant(0)  # closed loop; open loop paces itself in send()
    api = "chat"
    path = "/v1/chat/completions"

    def on_start(self) -> None:
        self.cfg: LoadConfig = self.environment.understudy
        self.rng = random.Random()
        self.headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        self.model = self.cfg.model or self._served_model()
        self.inflight = Group()
        self.next_arrival = time.monotonic()
        if self.cfg.rate > 0:  # concurrent streams on one session: a pool as large as the in-flight cap
            self.client.mount("http://", HTTPAdapter(pool_maxsize=self.cfg.max_in_flight))

    def on_stop(self) -> None:
        self.inflight.join(timeout=self.environment.stop_timeout or 0)
        self.inflight.kill(block=False)

    def _served_model(self) -> str:
        cached = getattr(self.environment, "understudy_model", None)
        if cached:
            return cached
        resp = self.client.get("/v1/models", headers=self.headers, name="/v1/models")
        resp.raise_for_status()
        self.environment.understudy_model = resp.json()["data"][0]["id"]
        return self.environment.understudy_model

    def body(self, prompt: str) -> dict[str, Any]:
        raise NotImplementedError

    @task
    def send(self) -> None:
        if self.cfg.rate <= 0:
            self.one_request()
            return
        per_user = self.cfg.rate / max(1, self.cfg.users)
        gap = self.rng.expovariate(per_user) if self.cfg.arrivals == "poisson" else 1.0 / per_user
        self.next_arrival += gap
        self._sleep(self.next_arrival - time.monotonic())
        if len(self.inflight) >= self.cfg.max_in_flight:
            self.environment.events.request.fire(
                request_type="DROPPED", name=self.api, response_time=0, response_length=0,
                exception=RuntimeError(f"{self.cfg.max_in_flight} requests already open (--max-in-flight)"))
            return
        self.inflight.spawn(self.one_request)

    @staticmethod
    def _sleep(seconds: float) -> None:
        if seconds > 0:
            gevent.sleep(seconds)

    def one_request(self) -> None:
        prompt = self.rng.choice(self.cfg.prompts)
        r = StreamResult(self.api, time.time())
        t0 = time.perf_counter()
        with self.client.post(self.path, json=self.body(prompt), headers=self.headers, stream=True,
                              catch_response=True, name=self.api) as resp:
            r.status = resp.status_code
            r.version = resp.headers.get(DRAFTER_HEADER, "unknown") if resp.headers else "unknown"
            if not 200 <= r.status < 300:
                r.error = f"HTTP {r.status}: {resp.text[:300] if r.status else resp.error}"
                r.e2e_s = time.perf_counter() - t0
                resp.failure(r.error)
            else:
                resp.success()  # this row is time-to-headers; the stream is measured below
                read_stream(resp, r, t0)
        self.report(r)

    def report(self, r: StreamResult) -> None:
        fire = self.environment.events.request.fire
        outcome = r.outcome
        if outcome in ("stream_error", "truncated"):
            fire(request_type=outcome.upper(), name=r.name, response_time=_ms(r.e2e_s), response_length=0,
                 exception=RuntimeError(r.error or "no finish_reason"))
        elif outcome == "ok":
            for kind, value in (("TTFT", r.ttft_s), ("TPOT", r.tpot_s), ("E2E", r.e2e_s)):
                if value is not None:
                    fire(request_type=kind, name=r.name, response_time=_ms(value), response_length=0,
                         exception=None)
            for gap in r.itl_s:
                fire(request_type="ITL", name=r.name, response_time=_ms(gap), response_length=0, exception=None)
        log_ = getattr(self.environment, "understudy_events", None)
        if log_ is not None:
            rec = {**asdict(r), "outcome": outcome, "tpot_s": r.tpot_s, "users": self.cfg.users,
                   "rate": self.cfg.rate or None, "max_tokens": self.cfg.max_tokens}
            rec["itl_s"] = [round(x, 9) for x in r.itl_s]  # ns: gaps of chunks read together are microseconds
            log_.write(rec)


class ChatStreamUser(_StreamingUser):
    """Streaming /v1/chat/completions with usage in the stream."""

    api, path = "chat", "/v1/chat/completions"

    def body(self, prompt: str) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                "max_tokens": self.cfg.max_tokens, "temperature": self.cfg.temperature,
                "stream_options": {"include_usage": True}}


class CompletionStreamUser(_StreamingUser):
    """Streaming /v1/completions with usage in the stream."""

    api, path = "completions", "/v1/completions"

    def body(self, prompt: str) -> dict[str, Any]:
        return {"model": self.model, "prompt": prompt, "stream": True, "max_tokens": self.cfg.max_tokens,
                "temperature": self.cfg.temperature, "stream_options": {"include_usage": True}}
