"""The app factory. `create_app(settings)` builds a FastAPI app whose lifespan owns the backend: with the native
backend it loads the target and its drafter, starts the engine thread and the hot-swap manager, and shuts both
down; with `backend="vllm"` it runs vLLM's OpenAI server as a managed subprocess behind the same front door
(server/backends/vllm_backend.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from understudy.engine.loader import LoadedModel, cache_dir
from understudy.server.backends import BackendState
from understudy.server.deps import State
from understudy.server.errors import error_body, install_error_handlers
from understudy.server.settings import ServerSettings

log = logging.getLogger(__name__)


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over the limit, by Content-Length or by counting a chunked body.

    A chunked body is cut off inside the app (whoever reads the body) with `BodyTooLarge`, an HTTPException:
    FastAPI re-raises those from body parsing (any other exception there becomes a 400 "error parsing the body"),
    and the handler `create_app` installs for it answers the same 413 as the Content-Length check."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large_response(BodyTooLarge(self.max_bytes))(scope, receive, send)
        seen = 0

        async def limited() -> dict:  # type: ignore[type-arg]
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return msg

        await self.app(scope, limited, send)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds {max_bytes} bytes")


def too_large_response(exc: BodyTooLarge) -> JSONResponse:
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code="request_too_large"),
                        status_code=413)


class ErrorCounter:
    """Pure ASGI middleware, outside every other one of ours: counts each response with status >= 400 in
    `understudy:request_errors{status}`, whoever answered it (validation 400, auth 401, unknown route or model 404,
    BodyLimit's 413, 429, 503, ...), before its status line goes out (so a client that saw the error and then
    reads /metrics sees it counted). An exception that escapes before a response started becomes Starlette's 500
    (its ServerErrorMiddleware, outside this one, answers it): counted as 500 and re-raised. Not counted: answers
    given before the backend is up (there is no metrics registry yet) and errors reported inside an SSE stream
    whose status line (200) was already sent."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counting_send(msg: dict) -> None:  # type: ignore[type-arg]
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                if msg["status"] >= 400:
                    self._count(scope, msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self._count(scope, 500)
            raise

    @staticmethod
    def _count(scope: dict, status: int) -> None:  # type: ignore[type-arg]
        state = getattr(scope["app"].state, "understudy", None)
        if state is not None:
            state.metrics.on_error(status)


def _document_served_model(app: FastAPI) -> None:
    """The OpenAPI schema names the one model this server serves (an enum on `model`), so clients and fuzzers
    see what a 404 would otherwise tell them."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = default_openapi()
        state = getattr(app.state, "understudy", None)
        if state is not None:
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                props = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
                if "model" in props:
                    props["model"] = {**props["model"], "enum": [state.served_model_name],
                                      "examples": [state.served_model_name]}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _ensure_drafter(s: ServerSettings, state: BackendState) -> Any:
    """Start the background drafter job if the registry has no drafter for the target; the engine gets the job's
    core back when it ends (or at once if none starts)."""
    from understudy.server.drafter_job import maybe_start

    job = await asyncio.to_thread(maybe_start, s.model, state.hotswap.fingerprint, state.hotswap.registry,
                                  s.ensure_drafter_minutes, cache_dir() / "drafter-jobs", s.ensure_drafter_rounds,
                                  lambda end: state.release_cores(f"background drafter training {end}"), s.dtype)
    state.hotswap.training = job
    if job is None:
        state.release_cores("no background drafter training needed")
    return job


def create_app(settings: ServerSettings | None = None, preloaded: LoadedModel | None = None) -> FastAPI:
    s = settings or ServerSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if s.backend == "vllm":
            from understudy.server.backends.vllm_backend import build_vllm_state

            state: BackendState = build_vllm_state(s)
        else:
            from understudy.server.backends.native import build_state

            state = build_state(s, preloaded)
        job = None
        try:
            await state.start()
            app.state.understudy = state
            state.ready = True
            log.info("serving %s (drafter %s) on the %s backend (%s)", state.served_model_name,
                     state.drafter_label(), s.backend, s.device)
            if s.may_train_drafter:
                job = await _ensure_drafter(s, state)
            yield
        finally:
            state.ready = False
            if job is not None:
                await asyncio.to_thread(job.stop)
            await state.stop()

    from understudy.server.routes_admin import router as admin_router

    if s.backend == "vllm":
        from understudy.server.routes_vllm import router as openai_router
    else:
        from understudy.server.routes_openai import router as openai_router

    app = FastAPI(title="Understudy", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server with a co-trained, hot-swappable speculative drafter.")
    app.state.understudy = None
    install_error_handlers(app)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return too_large_response(exc)

    app.include_router(openai_router)
    app.include_router(admin_router)
    _document_served_model(app)

    @app.get("/livez", tags=["health"])
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> JSONResponse:
        st: BackendState | None = request.app.state.understudy
        ok = st is not None and st.ready and not st.scheduler.draining
        body = {"status": "ready" if ok else ("draining" if st and st.scheduler.draining else "starting")}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/health", tags=["health"])
    async def health(state: State) -> dict[str, Any]:
        return state.health()

    @app.get("/metrics", tags=["health"])
    async def metrics(state: State) -> Response:
        return Response(await state.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if s.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=s.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(BodyLimit, max_bytes=s.max_body_bytes)
    app.add_middleware(ErrorCounter)  # added last = outermost: it sees BodyLimit's 413 and CORS's 400 too
    return app
