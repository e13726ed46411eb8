"""The app factory. `create_app(settings)` builds a FastAPI app whose lifespan owns the backend: with the native
backend it loads the target and its drafter, starts the engine thread and the hot-swap manager, and shuts both
down; with `backend="vllm"` it runs vLLM's OpenAI server as a managed subprocess behind the same front door
(server/backends/vllm_backend.py)."""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from understudy.engine.bandit import AdaptiveController, BanditConfig
from understudy.engine.config import EngineConfig
from understudy.engine.controller import FixedController, SpeculationController
from understudy.engine.engine import Engine
from understudy.engine.loader import LoadedModel, load_model
from understudy.engine.registry import Registry, RegistryError, default_registry_path
from understudy.server.backends import BackendState
from understudy.server.errors import APIError, error_body, install_error_handlers
from understudy.server.hotswap import HotSwapManager, load_initial_drafter
from understudy.server.metrics import ServerMetrics
from understudy.server.scheduler import AsyncEngine
from understudy.server.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    settings: ServerSettings
    target: LoadedModel
    engine: Engine
    scheduler: AsyncEngine
    metrics: ServerMetrics
    hotswap: HotSwapManager
    served_model_name: str
    ready: bool = False

    @property
    def tokenizer(self) -> Any:
        return self.target.tokenizer

    def drafter_label(self) -> str:
        return self.hotswap.served.label

    # ---- what create_app and the admin API need from any backend (see backends/__init__.py) ----------------
    async def start(self) -> None:
        self.scheduler.start()
        self.hotswap.start()

    async def stop(self) -> None:
        self.hotswap.stop()
        await self.scheduler.stop()

    def health(self) -> dict[str, Any]:
        e = self.engine
        return {"status": "draining" if self.scheduler.draining else "ok", "model": self.served_model_name,
                "drafter_version": self.drafter_label(), "running": e.num_running, "waiting": e.num_waiting,
                "in_flight": self.scheduler.in_flight, "max_in_flight": self.scheduler.max_in_flight,
                "steps": self.scheduler.steps, "spec_decode": e.stats.to_dict(), "controller": e.controller.state()}

    async def metrics_text(self) -> bytes:
        self.metrics.set_queue(self.engine.num_running, self.engine.num_waiting)
        self.metrics.set_controller(self.engine.controller.state())
        return self.metrics.render()

    def controller_state(self) -> dict[str, Any]:
        return self.engine.controller.state()


def get_state(request: Request) -> ServerState:
    state = getattr(request.app.state, "understudy", None)
    if state is None:
        raise APIError(503, "the server is starting", "service_unavailable", headers={"Retry-After": "2"})
    return state


State = Annotated[ServerState, Depends(get_state)]


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def require_api_key(request: Request, state: State) -> None:
    keys = state.settings.api_key
    if not keys:
        return
    given = _bearer(request) or ""
    if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key")


def require_admin(request: Request, state: State) -> None:
    key = state.settings.admin_key
    if not key:
        raise APIError(404, "the admin API is off (start the server with --admin-key)", "not_found_error")
    if not hmac.compare_digest((_bearer(request) or "").encode(), key.encode()):
        raise APIError(401, "invalid or missing admin key (send 'Authorization: Bearer <admin key>')",
                       code="invalid_admin_key")


def build_controller(s: ServerSettings) -> SpeculationController:
    if s.controller == "fixed" or s.num_speculative_tokens == 0:
        return FixedController(s.num_speculative_tokens)
    arms = tuple(sorted({a for a in s.controller_arms if a <= s.num_speculative_tokens} | {0}))
    return AdaptiveController(BanditConfig(arms=arms), max_k=s.num_speculative_tokens)


def open_registry(s: ServerSettings) -> Registry | None:
    path = s.registry or str(default_registry_path())
    try:
        return Registry.open(path, create=s.registry is not None)
    except RegistryError as e:
        if s.registry is not None or (s.drafter and not Path(s.drafter).expanduser().is_dir()):
            raise
        log.info("no drafter registry at %s (%s): hot swap off", path, e)
        return None


def build_state(s: ServerSettings, preloaded: LoadedModel | None = None) -> ServerState:
    from understudy.cli import resolve_dtype

    dtype = resolve_dtype(s.dtype, s.device)
    target = preloaded or load_model(s.model, dtype=dtype, device=s.device)
    registry = open_registry(s)
    follow = s.follow_alias if not s.drafter else None
    label, version, drafter = load_initial_drafter(s.drafter, target, registry, follow)
    engine_dtype = str(target.model.dtype).removeprefix("torch.")
    engine = Engine(target.model, EngineConfig(max_batch_size=s.max_batch_size, max_model_len=s.max_model_len,
                                               num_speculative_tokens=s.num_speculative_tokens, device=s.device,
                                               dtype=engine_dtype, num_threads=s.threads),
                    target.eos_token_ids, drafter=drafter, controller=build_controller(s))
    name = s.served_model_name or (s.model if "/" not in s.model else Path(s.model).name)
    metrics = ServerMetrics(name)
    scheduler = AsyncEngine(engine, max_queue=s.max_queue)
    hotswap = HotSwapManager(engine, target, metrics, registry, wake=scheduler._wake.set,
                             follow=follow if registry is not None else None, watch_interval_s=s.watch_interval_s,
                             canary_window=s.canary_window, canary_margin=s.canary_margin)
    hotswap.set_initial(label, version, drafter)
    if s.drafter and version is not None:
        hotswap.pinned = version
    scheduler.step_hooks += [metrics.on_step, hotswap.on_step]
    scheduler.failure_hooks.append(hotswap.on_step_failure)
    return ServerState(settings=s, target=target, engine=engine, scheduler=scheduler, metrics=metrics,
                       hotswap=hotswap, served_model_name=name)


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over the limit, by Content-Length or by counting a chunked body."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = JSONResponse(error_body(f"request body exceeds {self.max_bytes} bytes", "invalid_request_error",
                                          code="request_too_large"), status_code=413)
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited() -> dict:  # type: ignore[type-arg]
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await too_big(scope, receive, send)


class _TooLarge(Exception):
    pass


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


def create_app(settings: ServerSettings | None = None, preloaded: LoadedModel | None = None) -> FastAPI:
    s = settings or ServerSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if s.backend == "vllm":
            from understudy.server.backends.vllm_backend import build_vllm_state

            state: BackendState = build_vllm_state(s)
        else:
            state = build_state(s, preloaded)
        try:
            await state.start()
            app.state.understudy = state
            state.ready = True
            log.info("serving %s (drafter %s) on the %s backend (%s)", state.served_model_name,
                     state.drafter_label(), s.backend, s.device)
            yield
        finally:
            state.ready = False
            await state.stop()

    from understudy.server.routes_admin import router as admin_router

    if s.backend == "vllm":
        from understudy.server.backends.vllm_proxy import router as openai_router
    else:
        from understudy.server.routes_openai import router as openai_router

    app = FastAPI(title="Understudy", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server with a co-trained, hot-swappable speculative drafter.")
    app.state.understudy = None
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(admin_router)
    _document_served_model(app)

    @app.get("/livez", tags=["health"])
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> JSONResponse:
        st: ServerState | None = request.app.state.understudy
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
    return app
