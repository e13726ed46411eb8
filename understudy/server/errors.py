"""One error shape for every failure: {"error": {"message", "type", "param", "code"}} (OpenAI's).

Invalid input is 400 (never FastAPI's 422), unknown model 404, oversize body 413, overload 429 and draining
503 (both with Retry-After), auth 401, timeouts 408. Anything unexpected is a 500 whose traceback is logged.
Every error response is counted in `understudy:request_errors{status}` by app.py's ErrorCounter middleware, which
also sees the responses these handlers do not make (BodyLimit's 413).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from understudy.errors import UnderstudyError

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def to_api_error(exc: Exception) -> APIError:
    """Map exceptions to HTTP errors (used by handlers and inside SSE streams). Domain exceptions carry their own
    status, type and code (understudy.errors.UnderstudyError); nothing here knows the domain's classes."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnderstudyError):
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        return APIError(exc.http_status, exc.public_message(), exc.error_type, param=exc.param, code=exc.code,
                        headers=headers)
    if isinstance(exc, TimeoutError):
        return APIError(408, str(exc) or "request timed out", "timeout", code="timeout")
    return APIError(500, "internal server error", "server_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _is_type_tag(x: object) -> bool:
    """pydantic puts union members into error locations (stop.str, prompt.list[int]); they are not fields."""
    return isinstance(x, str) and ("[" in x or x in _TYPE_TAGS or x.startswith("function-"))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body" and not _is_type_tag(x)]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if e.get("type") in ("model_attributes_type", "dict_type") and not loc:
        return "the request body must be a JSON object (Content-Type: application/json)", None
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse(error_body(detail, kind), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        if err.status >= 500:
            log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(err)

    for cls in (APIError, UnderstudyError, TimeoutError):
        app.add_exception_handler(cls, _any)  # type: ignore[arg-type]
