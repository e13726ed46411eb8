"""Disconnects free the engine; SIGTERM drains: the stream completes, new requests get 503, exit 0."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.slow

KEY = {"authorization": "Bearer sk-test"}


def running_gauge(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("understudy:num_requests_running{"):
            return float(line.split()[-1])
    raise AssertionError("no running gauge")


def test_200_disconnects_mid_stream_then_a_fresh_request_is_fast(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "grid line flow"}], "max_tokens": 200,
            "stream": True, "ignore_eos": True}

    async def one(client: httpx.AsyncClient) -> bool:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=KEY) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    seen += 1
                if seen >= 2:  # mid-stream: at least one content chunk arrived; now hang up
                    return True
        return False

    async def main() -> int:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            done = 0
            for _ in range(10):  # 10 waves of 20 concurrent streams
                done += sum(await asyncio.gather(*[one(client) for _ in range(20)]))
            return done

    assert asyncio.run(main()) == 200
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=KEY, timeout=120,  # not wedged by the storm
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    assert r.status_code == 200
    deadline = time.monotonic() + 60
    while running_gauge(server.url) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running_gauge(server.url) == 0
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health["running"] == 0 and health["in_flight"] == 0


def test_sigterm_drains_in_flight_stream_refuses_new_and_exits_0(server_assets, tmp_path):
    srv = ServerProcess(["--model", str(server_assets["model"]), "--served-model-name", "tiny",
                         "--max-model-len", "60000", "--registry", str(tmp_path / "reg")],
                        log=tmp_path / "log").wait_ready()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    result: dict = {}

    def stream() -> None:
        lines = []
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=120) as r:
            result["status"] = r.status_code
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 4:
                    result["started"] = True
        result["lines"] = lines

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 60
    while not result.get("started") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert result.get("started"), srv.tail()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert t.is_alive(), "the stream must still be running while the server drains"
    r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 503 and "retry-after" in r.headers
    assert r.json()["error"]["code"] == "draining"
    assert httpx.get(f"{srv.url}/readyz", timeout=30).status_code == 503
    t.join(120)
    lines = [ln for ln in result["lines"] if ln.startswith("data: ")]
    assert result["status"] == 200 and lines[-1] == "data: [DONE]"
    assert sum('"finish_reason":"length"' in ln for ln in lines) == 1
    assert srv.proc.wait(60) == 0
    srv.stop()
