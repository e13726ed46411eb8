"""OpenAI routes on the vLLM backend: /v1/chat/completions, /v1/completions and /v1/models, proxied to the active
vLLM process with httpx.

Our side: auth (router dependency), the model-name check (404 in our shape), admission (429/503), the
`x-understudy-drafter-version` and `x-understudy-policy-version` headers (the pair of the process that serves this
request), metrics measured from the stream, and vLLM's errors translated into our error shape. vLLM serves the target under our served
model name, so request and response bodies pass through unchanged (SSE events byte for byte).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import anyio
import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from understudy.server.backends.vllm_backend import VllmState
from understudy.server.backends.vllm_process import VllmProcess
from understudy.server.deps import get_state, require_api_key
from understudy.server.errors import APIError, error_body
from understudy.server.protocol import (
    VLLM_STRUCTURED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    new_id,
)

log = logging.getLogger(__name__)
router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])


def get_vllm_state(request: Request) -> VllmState:
    state = get_state(request)
    assert isinstance(state, VllmState), "the proxy routes are mounted only with backend='vllm'"
    return state


VState = Annotated[VllmState, Depends(get_vllm_state)]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "timeout", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}
_PYDANTIC = re.compile(r"validation error.*?'msg': '([^']*)'", re.S)
_CONTEXT = re.compile(r"max_model_len|maximum context length|context length", re.I)


def translate_error(status: int, raw: bytes) -> APIError:
    """vLLM's error (its own JSON shape, FastAPI's {"detail"}, or text) -> ours; 422 becomes 400."""
    try:
        doc = json.loads(raw)
        err = doc.get("error", doc) if isinstance(doc, dict) else {}
        message = str(err.get("message") or err.get("detail") or "")
        param = err.get("param")
    except (ValueError, AttributeError):
        message, param = raw.decode("utf-8", "replace")[:1000], None
    message = message or f"the vLLM backend answered HTTP {status}"
    if pydantic := _PYDANTIC.search(message):  # "1 validation error: {'type': ..., 'msg': '...'}" -> the msg
        message = f"{param.removeprefix('body.')}: {pydantic.group(1)}" if isinstance(param, str) else pydantic.group(1)
    status = 400 if status == 422 else status
    if status >= 500:
        return APIError(status if status in (502, 503, 504) else 500, f"the vLLM backend failed: {message}",
                        _TYPES.get(status, "server_error"), code="backend_error")
    param = param.removeprefix("body.") if isinstance(param, str) else None
    code = "context_length_exceeded" if _CONTEXT.search(message) else None
    return APIError(status, message, _TYPES.get(status, "invalid_request_error"), param=param, code=code)


# vLLM extensions forwarded as they are: they change only the response's format, not the work done.
PASSTHROUGH = frozenset({"return_token_ids"})
_MODELS: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


async def read_body(request: Request, state: VllmState, path: str) -> tuple[dict[str, Any], int]:
    """Parse and validate with the native backend's own models and limits (n, logprobs, stop, top_k,
    max_tokens, logit_bias, non-finite numbers), so both backends refuse the same requests with the same 400s.
    Returns the body to forward (unknown fields dropped and logged, as the native backend ignores them; only
    PASSTHROUGH's vLLM extensions, which change the response format and nothing else, are kept) and the
    number of sequences it starts (n x prompts), which admission counts."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise APIError(400, "the request body is not valid JSON") from e
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object (Content-Type: application/json)")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "model: field required (a string)", param="model")
    if model != state.served_model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.served_model_name!r}",
                       "not_found_error", param="model", code="model_not_found")
    try:
        req = _MODELS[path].model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from e
    unknown = [f for f in req.unknown_fields() if f not in PASSTHROUGH]
    if unknown and state.settings.log_unknown_fields:
        log.info("ignoring unknown request fields: %s", ", ".join(unknown))
    prompts = len(req.prompts()) if isinstance(req, CompletionRequest) else 1
    sequences = prompts * req.n
    cap = state.settings.max_choices_per_request
    if sequences > cap:
        raise APIError(400, f"this request would start {sequences} sequences; the limit is {cap} "
                            "(--max-choices-per-request); send fewer prompts or a smaller n",
                       param="prompt" if prompts > 1 else "n", code="too_many_choices")
    budget = req.max_tokens if isinstance(req, CompletionRequest) else req.token_budget()
    if budget is not None and budget >= state.settings.max_model_len:
        raise APIError(400, f"this model's maximum context length is {state.settings.max_model_len} tokens; "
                            f"max_tokens {budget} leaves no room for the prompt", param="max_tokens",
                       code="context_length_exceeded")
    # vLLM's guided_json / structured_outputs arrive here already as response_format (protocol.py)
    body = req.model_dump(mode="json", exclude_unset=True, exclude=set(unknown) | set(VLLM_STRUCTURED_FIELDS))
    return body, sequences


class _Relay(StreamingResponse):
    """A StreamingResponse whose cleanup (close upstream, release the lease) runs however the response ends:
    finished, client gone, or cancelled before the body iterator ever started."""

    def __init__(self, content: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]],
                 headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


async def proxy_post(state: VllmState, request: Request, path: str) -> Response:
    body, sequences = await read_body(request, state, path)
    state.scheduler.enter(sequences)  # Draining (503) / Overloaded (429)
    try:
        proc = await state.backend.acquire()
    except BaseException:
        state.scheduler.exit(sequences)
        raise
    done = False
    upstream: httpx.Response | None = None

    async def cleanup() -> None:
        nonlocal done
        if done:
            return
        done = True
        state.backend.release(proc)
        state.scheduler.exit(sequences)
        if upstream is not None:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()

    rid = new_id("req")
    t0 = time.monotonic()
    try:
        upstream = await send_upstream(state, proc, path, body, rid)
        if upstream.status_code != 200:
            raise translate_error(upstream.status_code, await upstream.aread())
        headers = {"x-understudy-drafter-version": proc.label, "x-understudy-policy-version": proc.policy_label,
                   "x-request-id": rid}
        if body.get("stream"):
            return _Relay(relay(state, upstream, t0), cleanup, headers)
        raw = await upstream.aread()
        observe_body(state, raw, t0)
        return Response(raw, media_type="application/json", headers=headers)
    finally:
        if not body.get("stream") or upstream is None or upstream.status_code != 200:
            await cleanup()


async def send_upstream(state: VllmState, proc: VllmProcess, path: str, body: dict[str, Any],
                        rid: str) -> httpx.Response:
    assert state.client is not None
    req = state.client.build_request("POST", f"{proc.url}{path}", json=body, headers={"x-request-id": rid})
    try:
        return await state.client.send(req, stream=True)
    except httpx.TimeoutException as e:
        raise APIError(408, f"the vLLM backend did not answer in time ({type(e).__name__})", "timeout",
                       code="timeout") from e
    except httpx.HTTPError as e:
        log.error("vLLM at %s unreachable (%s); see %s", proc.url, e, proc.log_path)
        raise APIError(503, "the vLLM backend is unavailable; retry later", "service_unavailable",
                       code="backend_unavailable", headers={"Retry-After": "5"}) from e


# ---- metrics from the proxied traffic ------------------------------------------------------------------------------
def _has_text(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta") or {}
    return bool(choice.get("text") or delta.get("content") or delta.get("reasoning_content"))


def observe_body(state: VllmState, raw: bytes, t0: float) -> None:
    m, name = state.metrics, state.metrics.model_name
    m.e2e.labels(name).observe(time.monotonic() - t0)
    try:
        choices = json.loads(raw).get("choices") or []
    except (ValueError, AttributeError):
        return
    for c in choices:
        m.success.labels(name, c.get("finish_reason") or "stop").inc()


async def relay(state: VllmState, upstream: httpx.Response, t0: float) -> AsyncIterator[bytes]:
    """Pass vLLM's SSE events through unchanged (errors reported in-band are put in our shape), measuring TTFT,
    the latency between chunks that carry text, and e2e."""
    m, name = state.metrics, state.metrics.model_name
    last: float | None = None
    buf = b""
    try:
        async for chunk in upstream.aiter_raw():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                obj = _event_json(event)
                if obj is not None and "error" in obj and "choices" not in obj:
                    err = translate_error(int(_status_of(obj)), json.dumps(obj).encode())
                    event = b"data: " + json.dumps(error_body(err.message, err.type, err.param, err.code)).encode()
                elif obj is not None:
                    chunks = obj.get("choices") or []
                    if any(_has_text(c) for c in chunks):
                        now = time.monotonic()
                        if last is None:
                            m.ttft.labels(name).observe(now - t0)
                        else:  # per chunk: with speculation vLLM sends all tokens of a step in one chunk
                            m.itl.labels(name).observe(now - last)
                        last = now
                    for c in chunks:
                        if c.get("finish_reason"):
                            m.success.labels(name, c["finish_reason"]).inc()
                yield event + b"\n\n"
        if buf.strip():
            yield buf
        m.e2e.labels(name).observe(time.monotonic() - t0)
    except httpx.HTTPError as e:  # headers are gone: report in-band, OpenAI style
        log.error("vLLM stream broke: %s", e)
        yield b"data: " + json.dumps(error_body("the vLLM backend stream broke; retry", "server_error",
                                                code="backend_error")).encode() + b"\n\n"


def _event_json(event: bytes) -> dict[str, Any] | None:
    if not event.startswith(b"data: ") or event == b"data: [DONE]":
        return None
    try:
        obj = json.loads(event[6:])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _status_of(obj: dict[str, Any]) -> int:
    code = (obj.get("error") or {}).get("code") if isinstance(obj.get("error"), dict) else None
    return code if isinstance(code, int) and 400 <= code < 600 else 500


# ---- routes -------------------------------------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(state: VState) -> JSONResponse:
    proc = await state.backend.acquire()
    try:
        assert state.client is not None
        r = await state.client.get(f"{proc.url}/v1/models")
    except httpx.HTTPError as e:
        raise APIError(503, "the vLLM backend is unavailable; retry later", "service_unavailable",
                       code="backend_unavailable", headers={"Retry-After": "5"}) from e
    finally:
        state.backend.release(proc)
    if r.status_code != 200:
        raise translate_error(r.status_code, r.content)
    doc = r.json()
    for card in doc.get("data", []):
        card["root"] = card.get("id")  # not the server's local folder
    return JSONResponse(doc, headers={"x-understudy-drafter-version": proc.label,
                                      "x-understudy-policy-version": proc.policy_label})


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, state: VState) -> Response:
    return await proxy_post(state, request, "/v1/chat/completions")


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, state: VState) -> Response:
    return await proxy_post(state, request, "/v1/completions")
