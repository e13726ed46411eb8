"""The async scheduler around the engine: one engine thread runs `step()`; asyncio routes submit and consume.

Continuous batching is the engine's; this layer adds admission control (a bounded queue -> 429), per-request
output queues, cancellation (an aborted or disconnected request frees its engine slot at the next step
boundary), draining for graceful shutdown, and step hooks (metrics, the hot-swap canary).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from understudy.engine.engine import Engine, StepOutput, StepStats
from understudy.engine.sampling import SamplingParams
from understudy.errors import UnderstudyError

log = logging.getLogger(__name__)


class Overloaded(UnderstudyError):
    """The queue is full: the client should retry later (429 + Retry-After)."""

    http_status, error_type, code, retry_after_s = 429, "rate_limit_error", "overloaded", 1

    def public_message(self) -> str:
        return f"the server is overloaded ({self}); retry later"


class Draining(UnderstudyError):
    """The server is shutting down (503 + Retry-After)."""

    http_status, error_type, code, retry_after_s = 503, "service_unavailable", "draining", 5

    def public_message(self) -> str:
        return "the server is shutting down; retry on another replica"


class RequestFailed(UnderstudyError):
    """The engine could not finish this one request (its batch-mates went on); logged by the engine."""

    http_status, error_type, code, expose = 500, "server_error", "request_failed", True


class EngineFailed(UnderstudyError):
    """The engine raised while this request was in flight (a bug; logged with its traceback)."""

    http_status, error_type, code, expose = 500, "server_error", "engine_error", True


@dataclass
class RequestStream:
    request_id: str
    prompt_len: int
    arrival: float
    queue: asyncio.Queue[StepOutput | Exception] = field(default_factory=asyncio.Queue)
    epoch: int = 0  # the engine epoch (policy weights) this request runs on
    first_token_at: float | None = None
    last_token_at: float | None = None
    done: bool = False


StepHook = Callable[[StepStats, list[StepOutput], dict[str, RequestStream], float], None]


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int = 256) -> None:
        self.engine = engine
        self.max_in_flight = engine.config.max_batch_size + max_queue
        self.streams: dict[str, RequestStream] = {}
        self.step_hooks: list[StepHook] = []
        self.failure_hooks: list[Callable[[BaseException], None]] = []  # engine thread, after a failed step
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.steps = 0

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="understudy-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def in_flight(self) -> int:
        return len(self.streams)

    # ---- requests -------------------------------------------------------------------------------------------
    def check_capacity(self, n: int) -> None:
        """Refuse early (Draining, Overloaded) a request that would start n sequences, before any work on it;
        submit() checks again under the lock."""
        if self.draining:
            raise Draining("the server is shutting down")
        if len(self.streams) + n > self.max_in_flight:
            raise Overloaded(f"{len(self.streams)} requests in flight, this one adds {n} "
                             f"(limit {self.max_in_flight})")

    def submit(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams) -> RequestStream:
        """Queue a request (raises Draining, Overloaded, or engine.RequestError naming the field)."""
        if self.draining:
            raise Draining("the server is shutting down")
        with self._lock:
            if len(self.streams) >= self.max_in_flight:
                raise Overloaded(f"{len(self.streams)} requests in flight (limit {self.max_in_flight})")
            stream = RequestStream(request_id=request_id, prompt_len=len(prompt_ids), arrival=time.monotonic())
            self.streams[request_id] = stream  # before the engine can possibly emit for it
            try:
                stream.epoch = self.engine.add_request(request_id, prompt_ids, sampling)  # validates (RequestError)
            except BaseException:
                self.streams.pop(request_id, None)
                raise
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            stream = self.streams.pop(request_id, None)
        if stream is not None and not stream.done:
            self.engine.abort(request_id)
            self._wake.set()

    async def outputs(self, stream: RequestStream, timeout_s: float | None = None) -> AsyncIterator[StepOutput]:
        """Yield the request's outputs until it finishes; aborts it if the consumer goes away or times out."""
        deadline = None if timeout_s is None else stream.arrival + timeout_s
        try:
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(stream.queue.get(), remaining)
                except TimeoutError as e:
                    raise TimeoutError(f"request exceeded its {timeout_s:.0f} s timeout") from e
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self.abort(stream.request_id)  # no-op when finished; frees the slot on disconnect/cancel/timeout

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            t0 = time.monotonic()
            try:
                outs = self.engine.step()
            except Exception as e:  # a bug in the engine: fail the in-flight requests, keep serving
                log.exception("engine step failed; failing %d in-flight requests", len(self.streams))
                self._fail_all(EngineFailed(f"engine error: {type(e).__name__}: {e}"))
                for fhook in self.failure_hooks:  # e.g. take a faulty drafter out of service
                    try:
                        fhook(e)
                    except Exception:
                        log.exception("failure hook %r failed", fhook)
                continue
            self.steps += 1
            for hook in self.step_hooks:
                try:
                    hook(self.engine.last_step, outs, self.streams, t0)
                except Exception:
                    log.exception("step hook %r failed", hook)
            self._dispatch(outs)

    def _dispatch(self, outs: list[StepOutput]) -> None:
        assert self._loop is not None
        now = time.monotonic()
        for o in outs:
            stream = self.streams.get(o.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if stream.first_token_at is None:
                stream.first_token_at = now
            stream.last_token_at = now
            if o.finished:
                stream.done = True
                with self._lock:
                    self.streams.pop(o.request_id, None)
            item: StepOutput | Exception = o if o.error is None else RequestFailed(
                f"the engine could not finish this request: {o.error}")
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                self._loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, err: Exception) -> None:
        assert self._loop is not None
        with self._lock:
            streams = list(self.streams.values())
            self.streams.clear()
        for s in streams:
            self.engine.abort(s.request_id)
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(s.queue.put_nowait, err)
