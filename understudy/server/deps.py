"""What routers take from the app: the backend state and the auth checks, as `Annotated[..., Depends(...)]`
aliases. Routers import this module and the protocol/error modules, never app.py (which imports them)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from understudy.server.backends import BackendState
from understudy.server.backends.native import ServerState
from understudy.server.errors import APIError


def get_state(request: Request) -> BackendState:
    state = getattr(request.app.state, "understudy", None)
    if state is None:
        raise APIError(503, "the server is starting", "service_unavailable", headers={"Retry-After": "2"})
    return state


def get_native_state(request: Request) -> ServerState:
    return get_state(request)  # type: ignore[return-value]  # the native routers are mounted only for it


State = Annotated[BackendState, Depends(get_state)]
NativeState = Annotated[ServerState, Depends(get_native_state)]

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


