"""Every bad request gets its OpenAI-shaped 4xx, and the server then answers a normal request."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.slow

KEY = {"authorization": "Bearer sk-test"}
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def chat(**over):
    body = {**OK_CHAT, **over}
    return {k: v for k, v in body.items() if v is not ...}


CASES = [
    # (name, method, path, headers, body (dict -> json, str/bytes -> raw), expected status, expected param or None)
    ("max_tokens negative", "POST", CHAT, KEY, chat(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens zero", "POST", CHAT, KEY, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens huge", "POST", CHAT, KEY, chat(max_tokens=10**9), 400, "max_tokens"),
    ("max_tokens wrong type", "POST", CHAT, KEY, chat(max_tokens="ten"), 400, "max_tokens"),
    ("max_completion_tokens huge", "POST", CHAT, KEY, chat(max_tokens=..., max_completion_tokens=10**6), 400,
     "max_completion_tokens"),
    ("temperature too high", "POST", CHAT, KEY, chat(temperature=5), 400, "temperature"),
    ("temperature wrong type", "POST", CHAT, KEY, chat(temperature="hot"), 400, "temperature"),
    ("top_p zero", "POST", CHAT, KEY, chat(top_p=0), 400, "top_p"),
    ("top_k negative", "POST", CHAT, KEY, chat(top_k=-1), 400, "top_k"),
    ("n too large", "POST", CHAT, KEY, chat(n=1000), 400, "n"),
    ("n zero", "POST", CHAT, KEY, chat(n=0), 400, "n"),
    ("too many stop strings", "POST", CHAT, KEY, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop string", "POST", CHAT, KEY, chat(stop=[""]), 400, "stop"),
    ("stop wrong type", "POST", CHAT, KEY, chat(stop=42), 400, "stop"),
    ("seed negative", "POST", CHAT, KEY, chat(seed=-1), 400, "seed"),
    ("top_logprobs too many", "POST", CHAT, KEY, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("top_logprobs without logprobs", "POST", CHAT, KEY, chat(top_logprobs=2), 400, None),
    ("stream_options without stream", "POST", CHAT, KEY, chat(stream_options={"include_usage": True}), 400, None),
    ("messages missing", "POST", CHAT, KEY, chat(messages=...), 400, "messages"),
    ("messages empty", "POST", CHAT, KEY, chat(messages=[]), 400, "messages"),
    ("bad role", "POST", CHAT, KEY, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, None),
    ("image content part", "POST", CHAT, KEY,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages"),
    ("model missing", "POST", CHAT, KEY, chat(model=...), 400, "model"),
    ("unknown model", "POST", CHAT, KEY, chat(model="gpt-9"), 404, "model"),
    ("context overflow", "POST", CHAT, KEY, chat(messages=[{"role": "user", "content": "x" * 400}], max_tokens=...),
     400, "messages"),
    ("malformed JSON", "POST", CHAT, {**KEY, "content-type": "application/json"}, '{"model": "tiny", "messages": [',
     400, None),
    ("JSON array body", "POST", CHAT, {**KEY, "content-type": "application/json"}, "[1, 2, 3]", 400, None),
    ("wrong content type", "POST", CHAT, {**KEY, "content-type": "text/plain"}, "model=tiny", 400, None),
    ("oversize body", "POST", CHAT, KEY, chat(messages=[{"role": "user", "content": "x" * (2 << 20)}]), 413, None),
    ("missing API key", "POST", CHAT, {}, chat(), 401, None),
    ("wrong API key", "POST", CHAT, {"authorization": "Bearer nope"}, chat(), 401, None),
    ("admin with API key", "GET", "/admin/drafter", KEY, None, 401, None),
    ("admin pin unknown version", "POST", "/admin/drafter/pin", {"authorization": "Bearer adm-test"},
     {"version": 999}, 409, None),
    ("admin follow bad alias", "POST", "/admin/drafter/follow", {"authorization": "Bearer adm-test"},
     {"alias": "../etc"}, 400, "alias"),
    ("completion prompt empty list", "POST", COMP, KEY, {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("completion token id out of range", "POST", COMP, KEY, {"model": "tiny", "prompt": [10**7]}, 400, "prompt"),
    ("completion logprobs too many", "POST", COMP, KEY, {"model": "tiny", "prompt": "a", "logprobs": 9}, 400, "logprobs"),
    ("completion suffix", "POST", COMP, KEY, {"model": "tiny", "prompt": "a", "suffix": "b"}, 400, None),
    ("completion best_of", "POST", COMP, KEY, {"model": "tiny", "prompt": "a", "best_of": 3}, 400, "best_of"),
    ("unknown route", "GET", "/v1/nothing", KEY, None, 404, None),
    ("wrong method", "GET", CHAT, KEY, None, 405, None),
]


@pytest.mark.parametrize(("name", "method", "path", "headers", "body", "status", "param"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_gets_openai_error_and_server_survives(server, name, method, path, headers, body, status, param):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        kwargs: dict = {"headers": headers}
        if isinstance(body, dict):
            kwargs["content"] = json.dumps(body)
            kwargs["headers"] = {"content-type": "application/json", **headers}
        elif body is not None:
            kwargs["content"] = body
        r = http.request(method, path, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert isinstance(err["message"], str) and err["message"]
        if param is not None:
            assert err["param"] == param, (name, err)
        ok = http.post(CHAT, json=OK_CHAT, headers=KEY)
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"] is not None


def test_unknown_fields_are_accepted(server):
    r = httpx.post(f"{server.url}{CHAT}", json={**OK_CHAT, "some_future_field": {"x": 1}, "parallel_tool_calls": True},
                   headers=KEY, timeout=60)
    assert r.status_code == 200


def test_health_and_metrics_need_no_key(server):
    for path in ("/livez", "/readyz", "/health", "/metrics"):
        assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 200, path


def test_overload_gets_429_with_retry_after(server_assets, tmp_path):
    from tests.server.conftest import ServerProcess

    srv = ServerProcess(["--model", str(server_assets["model"]), "--max-batch-size", "1", "--max-queue", "0",
                         "--max-model-len", "60000",
                         "--served-model-name", "tiny", "--registry", str(tmp_path / "reg")],
                        log=tmp_path / "log").wait_ready()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http, http.stream(
                "POST", CHAT, json={**OK_CHAT, "max_tokens": 50000, "stream": True, "ignore_eos": True}) as long:
            assert long.status_code == 200, long.read()
            lines = long.iter_lines()  # keep the iterator: dropping it closes the connection (= a disconnect)
            assert next(lines).startswith("data: {")  # the one slot is now busy
            r = http.post(CHAT, json=OK_CHAT)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        srv.stop()
