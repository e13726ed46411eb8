"""Bounded work before admission: what one request can make the server do is capped before it is admitted, and
tokenising/expanding a request never holds the event loop.

The server runs in this process (uvicorn in a thread) so that a test can hold a request inside its expansion
step and check that /livez is still answered meanwhile: if the expansion ran on the event loop, /livez could not
answer until it finished, and the held expansion would time out.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import uvicorn

from tests.server.conftest import free_port
from understudy.server import routes_openai
from understudy.server.app import create_app
from understudy.server.settings import ServerSettings

MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def local_server(server_assets):
    settings = ServerSettings(model=str(server_assets["model"]), served_model_name="tiny", port=free_port(),
                              max_batch_size=2, max_queue=4, max_model_len=256, max_body_bytes=MAX_BODY,
                              num_speculative_tokens=0, registry=None, follow_alias=None, dtype="float32")
    app = create_app(settings, preloaded=server_assets["lm"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        raise TimeoutError("in-process server did not get ready")
    yield url
    server.should_exit = True
    thread.join(30)


def post(url: str, path: str, body: dict | str, timeout: float = 120) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    assert len(content) <= MAX_BODY, "the test must stay under the body limit"
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"}, timeout=timeout)


def fill(template: dict, key: str, unit: object, target: int = MAX_BODY - 2048) -> dict:
    """The largest body of this shape the size limit lets through: `key` holds as many `unit`s as fit."""
    one = len(json.dumps(unit)) + 2
    return {**template, key: [unit] * ((target - len(json.dumps(template))) // one)}


def test_livez_answers_while_a_request_is_expanded(local_server, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = routes_openai.expand_completion

    def held(*args, **kwargs):
        entered.set()
        if not release.wait(60):  # only /livez answering can release it
            raise AssertionError("the expansion was never released: /livez did not answer meanwhile")
        return real(*args, **kwargs)

    monkeypatch.setattr(routes_openai, "expand_completion", held)
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", post(local_server, "/v1/completions", {
        "model": "tiny", "prompt": "grid line", "max_tokens": 2, "temperature": 0})))
    t.start()
    assert entered.wait(60), "the request never reached its expansion"
    assert httpx.get(f"{local_server}/livez", timeout=30).status_code == 200
    release.set()
    t.join(120)
    assert result["r"].status_code == 200, result["r"].text


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    # many prompts: refused by count before any tokenising
    (fill({"model": "tiny", "max_tokens": 1}, "prompt", "grid line flow"), 400, "prompt", "too_many_choices"),
    (fill({"model": "tiny", "max_tokens": 1, "n": 8}, "prompt", [1, 2, 3]), 400, "prompt", "too_many_choices"),
    # one enormous prompt: tokenised off the loop, then refused by the prompt-token cap
    ({"model": "tiny", "max_tokens": 1, "prompt": "grid " * ((MAX_BODY - 4096) // 5)}, 400, "prompt",
     "too_many_prompt_tokens"),
    (fill({"model": "tiny", "max_tokens": 1}, "prompt", 7) | {"prompt": [7] * ((MAX_BODY - 4096) // 3)}, 400,
     "prompt", "too_many_prompt_tokens"),
])
def test_the_largest_bodies_are_refused_naming_the_field(local_server, body, status, param, code):
    r = post(local_server, "/v1/completions", body)
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code, err
    assert httpx.get(f"{local_server}/livez", timeout=30).status_code == 200


@pytest.mark.parametrize(("extra", "param"), [
    ({"logit_bias": {str(i): 1.0 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {"999999": 1.0}}, "logit_bias"),  # not a token of this vocabulary
    ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"n": 9}, "n"),
    ({"temperature": 1e-320}, None),  # a denormal temperature is greedy: 200
])
def test_sampling_and_bias_limits(local_server, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "grid"}], "max_tokens": 2, **extra}
    r = post(local_server, "/v1/chat/completions", body)
    if param is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_numbers_are_refused_naming_the_field(local_server, literal):
    raw = ('{"model": "tiny", "messages": [{"role": "user", "content": "grid"}], "max_tokens": 2, '
           f'"temperature": {literal}}}')
    r = post(local_server, "/v1/chat/completions", raw)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text


def test_a_request_larger_than_the_free_capacity_is_refused_before_any_work(local_server):
    """max_batch_size 2 + max_queue 4 = 6 in flight: n=8 cannot ever fit; 429 before tokenising."""
    r = post(local_server, "/v1/chat/completions", {"model": "tiny", "n": 8, "max_tokens": 1,
                                                    "messages": [{"role": "user", "content": "grid"}]})
    assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded", r.text
    assert "Retry-After" in r.headers


def test_logit_bias_is_applied_by_the_server(local_server, server_assets):
    tok = server_assets["lm"].tokenizer
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "logit_bias": {"9": 100}}
    r = post(local_server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tok.decode([9] * 4)
