"""Python client for an Understudy server: the OpenAI routes, health/metrics and the admin API, on httpx.

`UnderstudyClient` (sync) and `AsyncUnderstudyClient` (asyncio) have the same methods. Responses are plain dicts
(`Response`, a dict that also carries the HTTP headers and the drafter version that served the request);
streams are iterators of parsed chunk dicts that stop at `data: [DONE]`. Every failure raises an
`UnderstudyError` subclass: `UnderstudyAPIError` for the server's error shape, `UnderstudyConnectionError`
when the URL cannot be reached, `UnderstudyStreamError` when a stream ends before `[DONE]`.

Importing this module imports neither torch nor the server (check:
`python -c "import understudy.clients.client, sys; assert 'torch' not in sys.modules"`).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from understudy.errors import UnderstudyError

DRAFTER_HEADER = "x-understudy-drafter-version"
DEFAULT_TIMEOUT_S = 120.0


# ---- errors ---------------------------------------------------------------------------------------------------
class UnderstudyAPIError(UnderstudyError):
    """The server answered with its error shape {"error": {"message", "type", "param", "code"}}.

    status is the HTTP status, or None for an error sent in-band inside a stream (after the 200 headers).
    """

    def __init__(self, status: int | None, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None) -> None:
        where = f"HTTP {status}" if status is not None else "in-stream error"
        super().__init__(f"{where}: {message}" + (f" (param {param})" if param else "")
                         + (f" [{code}]" if code else ""))
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after


class UnderstudyConnectionError(UnderstudyError):
    """The server could not be reached (refused, DNS, TLS) or did not answer in time."""


class UnderstudyStreamError(UnderstudyError):
    """A stream ended before `data: [DONE]` (the connection dropped or the server stopped mid-answer)."""


class ClientConfigError(UnderstudyError):
    """The client is missing something it needs (an admin key, a model name)."""


# ---- pure helpers shared by the sync and async clients -----------------------------------------------------------
class Response(dict):  # type: ignore[type-arg]
    """A JSON object from the server, plus the response headers (`headers`, `drafter_version`)."""

    def __init__(self, body: dict[str, Any], headers: httpx.Headers | None = None) -> None:
        super().__init__(body)
        self.headers = headers if headers is not None else httpx.Headers()

    @property
    def drafter_version(self) -> str | None:
        return self.headers.get(DRAFTER_HEADER)


def normalize_base_url(url: str) -> str:
    """'http://h:p', 'http://h:p/' and the OpenAI-style 'http://h:p/v1' all name the same server root."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ClientConfigError(f"server URL {url!r} must start with http:// or https:// "
                                "(e.g. http://127.0.0.1:8000)")
    return url.removesuffix("/v1")


def api_error(resp: httpx.Response, body: bytes) -> UnderstudyAPIError:
    """Parse the error shape; anything else (a proxy's HTML page) keeps the status and the start of the text."""
    retry = resp.headers.get("retry-after")
    retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    try:
        err = json.loads(body)["error"]
        if isinstance(err, dict) and "message" in err:
            return UnderstudyAPIError(resp.status_code, str(err["message"]), err.get("type"), err.get("param"),
                                      err.get("code"), retry_after)
    except (ValueError, KeyError, TypeError):
        pass
    text = body.decode("utf-8", "replace").strip()[:300] or resp.reason_phrase
    return UnderstudyAPIError(resp.status_code, text, retry_after=retry_after)


def connection_error(url: str, e: httpx.TransportError) -> UnderstudyConnectionError:
    if isinstance(e, httpx.TimeoutException):
        return UnderstudyConnectionError(f"timed out talking to the Understudy server at {url} ({type(e).__name__}); "
                                         "raise timeout= or check that the server is not overloaded")
    return UnderstudyConnectionError(f"cannot reach the Understudy server at {url}: {e or type(e).__name__}; "
                                     "is it running (`understudy serve`) and is the URL right?")


def json_body(resp: httpx.Response) -> Response:
    try:
        body = resp.json()
    except ValueError as e:
        raise UnderstudyAPIError(resp.status_code, f"the server sent invalid JSON ({e}): {resp.text[:200]!r}") from e
    if not isinstance(body, dict):
        raise UnderstudyAPIError(resp.status_code, f"expected a JSON object, got {type(body).__name__}")
    return Response(body, resp.headers)


class SSEDecoder:
    """Server-sent events: `data:` lines joined by newlines, dispatched on a blank line; comments ignored."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """One line (without its newline) in; the data of a complete event out, or None."""
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        data, self._data = self._data, []
        return "\n".join(data) if data else None


DONE = object()


def parse_event(data: str) -> dict[str, Any] | object:
    """One event's data -> a chunk dict, or DONE; an in-band {"error": ...} raises UnderstudyAPIError."""
    if data.strip() == "[DONE]":
        return DONE
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise UnderstudyStreamError(f"the stream sent an event that is not JSON: {data[:200]!r}") from e
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        err = obj["error"]
        raise UnderstudyAPIError(None, str(err.get("message")), err.get("type"), err.get("param"), err.get("code"))
    if not isinstance(obj, dict):
        raise UnderstudyStreamError(f"the stream sent a JSON {type(obj).__name__}, expected an object")
    return obj


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    dec = SSEDecoder()
    for line in lines:
        data = dec.feed(line)
        if data is not None:
            ev = parse_event(data)
            if ev is DONE:
                return
            yield ev  # type: ignore[misc]
    data = dec.flush()  # lenient: a last event without its blank line
    if data is not None and parse_event(data) is DONE:
        return
    raise UnderstudyStreamError("the stream ended before 'data: [DONE]' (connection closed mid-answer)")


class _Base:
    def __init__(self, base_url: str, api_key: str | None, admin_key: str | None, timeout: float) -> None:
        self.base_url = normalize_base_url(base_url)
        self.api_key = api_key if api_key is not None else os.environ.get("UNDERSTUDY_API_KEY")
        self.admin_key = admin_key if admin_key is not None else os.environ.get("UNDERSTUDY_ADMIN_KEY")
        self.timeout = timeout
        self._model: str | None = None  # first id of /v1/models, fetched once

    def _auth(self, admin: bool) -> dict[str, str]:
        key = self.admin_key if admin else self.api_key
        if admin and not key:
            raise ClientConfigError("the admin API needs the admin key: pass admin_key= (CLI: --admin-key) or set "
                                    "UNDERSTUDY_ADMIN_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _body(self, key: str, value: Any, model: str, params: dict[str, Any], stream: bool) -> dict[str, Any]:
        if "stream" in params:
            raise ClientConfigError("do not pass stream=: call chat_stream()/complete_stream() to stream")
        return {"model": model, key: value, **params, "stream": stream}

    @staticmethod
    def _first_model(body: dict[str, Any]) -> str:
        data = body.get("data") or []
        if not data:
            raise ClientConfigError("the server lists no models (/v1/models is empty); pass model=")
        return str(data[0]["id"])


# ---- sync -----------------------------------------------------------------------------------------------------
class Stream:
    """An SSE stream of chunk dicts. Opens on first iteration (or `with`); `headers`/`drafter_version` after."""

    def __init__(self, client: UnderstudyClient, path: str, body: dict[str, Any]) -> None:
        self._client, self._path, self._body = client, path, body
        self._resp: httpx.Response | None = None
        self.headers: httpx.Headers | None = None

    @property
    def drafter_version(self) -> str | None:
        return self.headers.get(DRAFTER_HEADER) if self.headers is not None else None

    def open(self) -> Stream:
        if self._resp is None:
            self._resp = self._client._send("POST", self._path, json=self._body, stream=True)
            self.headers = self._resp.headers
        return self

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.open()
        assert self._resp is not None
        try:
            yield from _events(self._resp.iter_lines())
        except httpx.TransportError as e:
            raise UnderstudyStreamError(f"the stream from {self._client.base_url}{self._path} broke: {e}") from e
        finally:
            self.close()

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()

    def __enter__(self) -> Stream:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class UnderstudyClient(_Base):
    """Sync client. `model=None` in chat/complete means the first id of /v1/models (asked once, cached)."""

    def __init__(self, base_url: str, api_key: str | None = None, admin_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(base_url, api_key, admin_key, timeout)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> UnderstudyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, *, admin: bool = False, json: Any = None,
              stream: bool = False, ok: tuple[int, ...] = ()) -> httpx.Response:
        req = self._http.build_request(method, path, json=json, headers=self._auth(admin))
        try:
            resp = self._http.send(req, stream=stream)
        except httpx.TransportError as e:
            raise connection_error(self.base_url, e) from e
        if resp.is_success or resp.status_code in ok:
            return resp
        try:
            body = resp.read()
        finally:
            resp.close()
        raise api_error(resp, body)

    def _json(self, method: str, path: str, admin: bool = False, json: Any = None) -> Response:
        return json_body(self._send(method, path, admin=admin, json=json))

    # ---- OpenAI routes -----------------------------------------------------------------------------------
    def models(self) -> Response:
        return self._json("GET", "/v1/models")

    def default_model(self) -> str:
        if self._model is None:
            self._model = self._first_model(self.models())
        return self._model

    def chat(self, messages: list[dict[str, Any]], model: str | None = None, **params: Any) -> Response:
        body = self._body("messages", messages, model or self.default_model(), params, stream=False)
        return self._json("POST", "/v1/chat/completions", json=body)

    def chat_stream(self, messages: list[dict[str, Any]], model: str | None = None, **params: Any) -> Stream:
        body = self._body("messages", messages, model or self.default_model(), params, stream=True)
        return Stream(self, "/v1/chat/completions", body)

    def complete(self, prompt: str | list[Any], model: str | None = None, **params: Any) -> Response:
        body = self._body("prompt", prompt, model or self.default_model(), params, stream=False)
        return self._json("POST", "/v1/completions", json=body)

    def complete_stream(self, prompt: str | list[Any], model: str | None = None, **params: Any) -> Stream:
        body = self._body("prompt", prompt, model or self.default_model(), params, stream=True)
        return Stream(self, "/v1/completions", body)

    # ---- health -------------------------------------------------------------------------------------------
    def health(self) -> Response:
        return self._json("GET", "/health")

    def ready(self) -> bool:
        """True when /readyz answers 200 (False while starting or draining)."""
        return self._send("GET", "/readyz", ok=(503,)).status_code == 200

    def metrics_text(self) -> str:
        return self._send("GET", "/metrics").text

    # ---- admin (admin key) --------------------------------------------------------------------------------
    def drafters(self) -> Response:
        return self._json("GET", "/admin/drafters", admin=True)

    def current_drafter(self) -> Response:
        return self._json("GET", "/admin/drafter", admin=True)

    def pin(self, version: int | str) -> Response:
        return self._json("POST", "/admin/drafter/pin", admin=True, json={"version": version})

    def follow(self, alias: str) -> Response:
        return self._json("POST", "/admin/drafter/follow", admin=True, json={"alias": alias})

    def rollback(self) -> Response:
        return self._json("POST", "/admin/drafter/rollback", admin=True)

    def controller(self) -> Response:
        return self._json("GET", "/admin/controller", admin=True)

    def pin_speculation(self, k: int | None) -> Response:
        """Every step uses K = k (0: speculation off) until `pin_speculation(None)` hands K back to the
        controller. Native backend only (the vLLM backend answers 409)."""
        return self._json("POST", "/admin/controller", admin=True, json={"k": k})


# ---- async ----------------------------------------------------------------------------------------------------
class AsyncStream:
    """The async twin of Stream: `async for chunk in client.chat_stream(...)`; opens on first iteration."""

    def __init__(self, client: AsyncUnderstudyClient, path: str, body: dict[str, Any]) -> None:
        self._client, self._path, self._body = client, path, body
        self._resp: httpx.Response | None = None
        self.headers: httpx.Headers | None = None

    @property
    def drafter_version(self) -> str | None:
        return self.headers.get(DRAFTER_HEADER) if self.headers is not None else None

    async def open(self) -> AsyncStream:
        if self._resp is None:
            self._resp = await self._client._send("POST", self._path, json=self._body, stream=True)
            self.headers = self._resp.headers
        return self

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        await self.open()
        assert self._resp is not None
        dec = SSEDecoder()
        try:
            async for line in self._resp.aiter_lines():
                data = dec.feed(line)
                if data is None:
                    continue
                ev = parse_event(data)
                if ev is DONE:
                    return
                yield ev  # type: ignore[misc]
            data = dec.flush()
            if data is None or parse_event(data) is not DONE:
                raise UnderstudyStreamError("the stream ended before 'data: [DONE]' (connection closed mid-answer)")
        except httpx.TransportError as e:
            raise UnderstudyStreamError(f"the stream from {self._client.base_url}{self._path} broke: {e}") from e
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._resp is not None:
            await self._resp.aclose()

    async def __aenter__(self) -> AsyncStream:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncUnderstudyClient(_Base):
    """Asyncio client with the same methods as UnderstudyClient (coroutines; the *_stream methods return an
    async iterator directly: `async for chunk in client.chat_stream(msgs)`)."""

    def __init__(self, base_url: str, api_key: str | None = None, admin_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(base_url, api_key, admin_key, timeout)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncUnderstudyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, *, admin: bool = False, json: Any = None,
                    stream: bool = False, ok: tuple[int, ...] = ()) -> httpx.Response:
        req = self._http.build_request(method, path, json=json, headers=self._auth(admin))
        try:
            resp = await self._http.send(req, stream=stream)
        except httpx.TransportError as e:
            raise connection_error(self.base_url, e) from e
        if resp.is_success or resp.status_code in ok:
            return resp
        try:
            body = await resp.aread()
        finally:
            await resp.aclose()
        raise api_error(resp, body)

    async def _json(self, method: str, path: str, admin: bool = False, json: Any = None) -> Response:
        return json_body(await self._send(method, path, admin=admin, json=json))

    async def models(self) -> Response:
        return await self._json("GET", "/v1/models")

    async def default_model(self) -> str:
        if self._model is None:
            self._model = self._first_model(await self.models())
        return self._model

    async def chat(self, messages: list[dict[str, Any]], model: str | None = None, **params: Any) -> Response:
        body = self._body("messages", messages, model or await self.default_model(), params, stream=False)
        return await self._json("POST", "/v1/chat/completions", json=body)

    def chat_stream(self, messages: list[dict[str, Any]], model: str | None = None, **params: Any) -> AsyncStream:
        return _LazyModelStream(self, "/v1/chat/completions", "messages", messages, model, params)

    async def complete(self, prompt: str | list[Any], model: str | None = None, **params: Any) -> Response:
        body = self._body("prompt", prompt, model or await self.default_model(), params, stream=False)
        return await self._json("POST", "/v1/completions", json=body)

    def complete_stream(self, prompt: str | list[Any], model: str | None = None, **params: Any) -> AsyncStream:
        return _LazyModelStream(self, "/v1/completions", "prompt", prompt, model, params)

    async def health(self) -> Response:
        return await self._json("GET", "/health")

    async def ready(self) -> bool:
        return (await self._send("GET", "/readyz", ok=(503,))).status_code == 200

    async def metrics_text(self) -> str:
        return (await self._send("GET", "/metrics")).text

    async def drafters(self) -> Response:
        return await self._json("GET", "/admin/drafters", admin=True)

    async def current_drafter(self) -> Response:
        return await self._json("GET", "/admin/drafter", admin=True)

    async def pin(self, version: int | str) -> Response:
        return await self._json("POST", "/admin/drafter/pin", admin=True, json={"version": version})

    async def follow(self, alias: str) -> Response:
        return await self._json("POST", "/admin/drafter/follow", admin=True, json={"alias": alias})

    async def rollback(self) -> Response:
        return await self._json("POST", "/admin/drafter/rollback", admin=True)

    async def controller(self) -> Response:
        return await self._json("GET", "/admin/controller", admin=True)

    async def pin_speculation(self, k: int | None) -> Response:
        return await self._json("POST", "/admin/controller", admin=True, json={"k": k})


class _LazyModelStream(AsyncStream):
    """An AsyncStream whose body is built on open, so `model=None` can await /v1/models first."""

    def __init__(self, client: AsyncUnderstudyClient, path: str, key: str, value: Any, model: str | None,
                 params: dict[str, Any]) -> None:
        client._body(key, value, model or "", params, stream=True)  # validate the arguments now, not on open
        super().__init__(client, path, {})
        self._key, self._value, self._model, self._params = key, value, model, params

    async def open(self) -> AsyncStream:
        if self._resp is None:
            model = self._model or await self._client.default_model()
            self._body = self._client._body(self._key, self._value, model, self._params, stream=True)
        return await super().open()
