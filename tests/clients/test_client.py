"""The Python client and the client CLI commands against the real server (plus SSE parsing on a mock transport)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from tests.server.conftest import ROOT, free_port, server, server_assets  # noqa: F401
from understudy.clients.client import (
    AsyncUnderstudyClient,
    ClientConfigError,
    UnderstudyAPIError,
    UnderstudyClient,
    UnderstudyConnectionError,
    UnderstudyStreamError,
    normalize_base_url,
)
from understudy.registry.store import Registry

MSG = [{"role": "user", "content": "grid line flow risk"}]


@pytest.fixture(scope="module")
def client(server):  # noqa: F811
    with UnderstudyClient(server.url + "/v1", api_key="sk-test", admin_key="adm-test", timeout=60) as c:
        yield c


def chat_text(chunks: list[dict]) -> str:
    return "".join((ch.get("delta") or {}).get("content") or "" for c in chunks for ch in c["choices"])


# ---- OpenAI routes ---------------------------------------------------------------------------------------------
def test_models_default_model_and_non_stream(client):
    assert [m["id"] for m in client.models()["data"]] == ["tiny"]
    r = client.chat(MSG, max_tokens=8, temperature=0)  # model=None -> the first of /v1/models
    assert r["model"] == "tiny" and r["object"] == "chat.completion"
    assert r["choices"][0]["message"]["content"] and 0 < r["usage"]["completion_tokens"] <= 8
    assert r.drafter_version is not None and r.headers["x-request-id"] == r["id"]
    c = client.complete("abc", model="tiny", max_tokens=6, temperature=0)
    assert c["object"] == "text_completion" and c["choices"][0]["text"]


def test_streams_match_non_stream(client):
    full = client.chat(MSG, max_tokens=12, temperature=0)
    stream = client.chat_stream(MSG, max_tokens=12, temperature=0, stream_options={"include_usage": True})
    chunks = list(stream)
    assert stream.drafter_version is not None
    assert chat_text(chunks) == full["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == full["usage"]["completion_tokens"]
    assert sum(ch["finish_reason"] is not None for c in chunks for ch in c["choices"]) == 1
    whole = client.complete("abc", max_tokens=8, temperature=0)["choices"][0]["text"]
    with client.complete_stream("abc", max_tokens=8, temperature=0) as s:
        assert "".join(ch["text"] for c in s for ch in c["choices"]) == whole


def test_health_ready_metrics(client):
    assert client.health()["model"] == "tiny"
    assert client.ready() is True
    assert "understudy:num_requests_running" in client.metrics_text()


def test_async_client(server):  # noqa: F811
    async def run() -> None:
        async with AsyncUnderstudyClient(server.url, api_key="sk-test", admin_key="adm-test", timeout=60) as c:
            assert (await c.models())["data"][0]["id"] == "tiny"
            full = await c.chat(MSG, max_tokens=10, temperature=0)
            stream = c.chat_stream(MSG, max_tokens=10, temperature=0)  # model resolved on open
            chunks = [chunk async for chunk in stream]
            assert chat_text(chunks) == full["choices"][0]["message"]["content"]
            assert stream.drafter_version == full.drafter_version
            whole = (await c.complete("xyz", max_tokens=5, temperature=0))["choices"][0]["text"]
            assert "".join([ch["text"] async for c2 in c.complete_stream("xyz", max_tokens=5, temperature=0)
                            for ch in c2["choices"]]) == whole
            assert (await c.health())["model"] == "tiny" and await c.ready()
            assert "understudy:" in await c.metrics_text()
            assert "version" in await c.current_drafter() and isinstance(await c.controller(), dict)
            with pytest.raises(UnderstudyAPIError) as e:
                await c.chat(MSG, model="nope")
            assert e.value.status == 404 and e.value.param == "model"
            with pytest.raises(UnderstudyAPIError) as e:
                async for _ in c.chat_stream(MSG, model="nope"):
                    pass
            assert e.value.status == 404

    asyncio.run(run())


# ---- errors ----------------------------------------------------------------------------------------------------
def test_error_shape_is_parsed(client, server):  # noqa: F811
    with pytest.raises(UnderstudyAPIError) as e:
        client.chat(MSG, model="gpt-4")
    err = e.value
    assert (err.status, err.param, err.code, err.type) == (404, "model", "model_not_found", "not_found_error")
    assert "gpt-4" in err.message and "HTTP 404" in str(err)
    with pytest.raises(UnderstudyAPIError) as e:
        client.chat(MSG, max_tokens=-1)
    assert e.value.status == 400 and e.value.param == "max_tokens"
    with pytest.raises(UnderstudyAPIError) as e:
        list(client.chat_stream(MSG, model="gpt-4"))
    assert e.value.status == 404
    with UnderstudyClient(server.url, api_key="wrong", admin_key="wrong") as bad:
        with pytest.raises(UnderstudyAPIError) as e:
            bad.models()
        assert e.value.status == 401 and e.value.code == "invalid_api_key"
        with pytest.raises(UnderstudyAPIError) as e:
            bad.current_drafter()
        assert e.value.status == 401 and e.value.code == "invalid_admin_key"
    with pytest.raises(ClientConfigError, match="stream"):
        client.chat(MSG, stream=True)


def test_connection_error_names_the_url(monkeypatch):
    monkeypatch.delenv("UNDERSTUDY_ADMIN_KEY", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    with UnderstudyClient(url, timeout=5) as c:
        with pytest.raises(UnderstudyConnectionError, match=url.replace(".", r"\.")):
            c.health()
        with pytest.raises(ClientConfigError, match="admin key"):
            c.current_drafter()
    with pytest.raises(ClientConfigError, match="http://"):
        normalize_base_url("127.0.0.1:8000")
    assert normalize_base_url("http://h:1/v1/") == "http://h:1"


def _mock_client(body: bytes, status: int = 200) -> UnderstudyClient:
    c = UnderstudyClient("http://127.0.0.1:9", api_key="k")
    c._http.close()
    c._http = httpx.Client(base_url=c.base_url, transport=httpx.MockTransport(
        lambda req: httpx.Response(status, content=body, headers={"x-understudy-drafter-version": "7"})))
    return c


def test_sse_parsing_in_band_error_truncation_and_comments():
    ok = b': keep-alive\n\ndata: {"choices": [{"text": "a"}]}\n\ndata:{"choices": [{"text": "b"}]}\n\ndata: [DONE]\n\n'
    s = _mock_client(ok).complete_stream("x", model="m")
    assert [c["choices"][0]["text"] for c in s] == ["a", "b"] and s.drafter_version == "7"
    in_band = b'data: {"choices": []}\n\ndata: {"error": {"message": "boom", "type": "server_error", ' \
              b'"param": null, "code": "engine_error"}}\n\n'
    with pytest.raises(UnderstudyAPIError) as e:
        list(_mock_client(in_band).complete_stream("x", model="m"))
    assert e.value.status is None and e.value.code == "engine_error" and e.value.message == "boom"
    with pytest.raises(UnderstudyStreamError, match="DONE"):
        list(_mock_client(b'data: {"choices": []}\n\n').complete_stream("x", model="m"))
    html = _mock_client(b"<html>bad gateway</html>", status=502)
    with pytest.raises(UnderstudyAPIError) as e:
        html.complete("x", model="m")
    assert e.value.status == 502 and "bad gateway" in e.value.message


# ---- admin -----------------------------------------------------------------------------------------------------
def test_admin_pin_current_rollback_follow(client, server, server_assets):  # noqa: F811
    reg = Registry.open(server.registry)
    v1 = reg.publish(server_assets["good"]).version
    v2 = reg.publish(server_assets["good"]).version
    listed = client.drafters()
    assert {v1, v2} <= {v["version"] for v in listed["versions"]} and listed["aliases"]["latest"] == v2
    state = client.pin(v1)
    assert state["version"] == str(v1) and state["pinned"] == v1 and state["following"] is None
    assert client.current_drafter()["version"] == str(v1)
    assert client.chat(MSG, max_tokens=2).drafter_version == str(v1)
    assert client.pin(f"v{v2}")["version"] == str(v2)
    back = client.rollback()
    assert back["version"] == str(v1) and back["pinned"] == v1
    followed = client.follow("latest")
    assert followed["following"] == "latest" and followed["version"] == str(v2)
    assert isinstance(client.controller(), dict)
    with pytest.raises(UnderstudyAPIError) as e:
        client.pin(999)
    assert e.value.status == 409 and e.value.code == "swap_failed"


# ---- CLI -------------------------------------------------------------------------------------------------------
def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "understudy.cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, input=stdin if stdin is not None else "")


def test_cli_chat_and_complete(client, server):  # noqa: F811
    want = client.chat(MSG, max_tokens=10, temperature=0)["choices"][0]["message"]["content"]
    r = cli("chat", "--server", server.url, "--api-key", "sk-test", "--max-tokens", "10", "--temperature", "0", "-v",
            MSG[0]["content"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n" and "[drafter version " in r.stderr and "finish_reason" in r.stderr
    r = cli("chat", "--server", server.url + "/v1", "--api-key", "sk-test", "--max-tokens", "10", "--temperature",
            "0", "--no-stream", "--json", "-", stdin=MSG[0]["content"])
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == want
    sys_msgs = [{"role": "system", "content": "be brief"}, *MSG]
    want = client.chat(sys_msgs, max_tokens=10, temperature=0)["choices"][0]["message"]["content"]
    r = cli("chat", "--server", server.url, "--api-key", "sk-test", "--max-tokens", "10", "--temperature", "0",
            "--no-stream", "--system", "be brief", MSG[0]["content"])
    assert r.returncode == 0 and r.stdout == want + "\n", r.stderr
    want = client.complete("abc", max_tokens=6, temperature=0)["choices"][0]["text"]
    r = cli("complete", "--server", server.url, "--api-key", "sk-test", "--max-tokens", "6", "--temperature", "0",
            "abc")
    assert r.returncode == 0 and r.stdout == want + "\n", r.stderr


def test_cli_errors_are_one_line_exit_2(server):  # noqa: F811
    r = cli("chat", "--server", server.url, "--api-key", "sk-test", "--model", "gpt-4", "hi")
    assert r.returncode == 2 and r.stderr.startswith("error: HTTP 404") and len(r.stderr.splitlines()) == 1
    url = f"http://127.0.0.1:{free_port()}"
    r = cli("complete", "--server", url, "abc")
    assert r.returncode == 2 and url in r.stderr and "Traceback" not in r.stderr
    r = cli("drafters", "rollback")
    assert r.returncode == 2 and "--server" in r.stderr
    r = cli("drafters", "rollback", "latest", "--server", server.url, "--admin-key", "adm-test")
    assert r.returncode == 2 and "takes no ALIAS" in r.stderr


def test_cli_drafters_live_server(client, server, server_assets):  # noqa: F811
    v = Registry.open(server.registry).publish(server_assets["good"]).version
    admin = ["--server", server.url, "--admin-key", "adm-test"]
    r = cli("drafters", "pin", str(v), *admin)
    assert r.returncode == 0 and r.stdout.startswith(f"serving drafter {v} "), r.stderr
    r = cli("drafters", "current", *admin, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["pinned"] == v, r.stderr
    r = cli("drafters", "list", *admin)
    assert r.returncode == 0 and f"  {v}  compatible" in r.stdout, r.stderr
    r = cli("drafters", "rollback", *admin)
    assert r.returncode == 0 and "serving drafter" in r.stdout and client.current_drafter()["version"] != str(v)
    r = cli("drafters", "follow", "latest", *admin, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["following"] == "latest", r.stderr
    r = cli("drafters", "current", "--server", server.url, "--admin-key", "wrong")
    assert r.returncode == 2 and "admin key" in r.stderr


def test_cli_speculation_off_pins_k_and_auto_hands_it_back(client, server):  # noqa: F811
    admin = ["--server", server.url, "--admin-key", "adm-test"]
    try:
        r = cli("speculation", "off", *admin)
        assert r.returncode == 0 and r.stdout.startswith("speculation: off (pinned K=0)"), (r.stdout, r.stderr)
        assert client.controller()["pinned_k"] == 0
        r = cli("speculation", *admin, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["pinned_k"] == 0, r.stderr
        r = cli("speculation", "twice", *admin)
        assert r.returncode == 2 and "off, auto or a number" in r.stderr
        r = cli("speculation", "auto", *admin)
        assert r.returncode == 0 and r.stdout.startswith("speculation: controller chooses"), r.stderr
        assert client.controller()["pinned_k"] is None
    finally:
        client.pin_speculation(None)
