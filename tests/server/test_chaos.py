"""Chaos: SIGKILL the server in the middle of streaming load, start it again on the same registry: it serves
again, the registry is intact (every version verifies, aliases unchanged) and it serves the same drafter."""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.server.conftest import ServerProcess, StreamLoad
from understudy.registry.store import Registry

pytestmark = pytest.mark.slow
API = {"authorization": "Bearer sk-chaos"}
ADMIN = {"authorization": "Bearer adm-chaos"}


def start(server_assets, reg_dir, log) -> ServerProcess:
    return ServerProcess(["--model", str(server_assets["model"]), "--registry", str(reg_dir), "--api-key", "sk-chaos",
                          "--admin-key", "adm-chaos", "--max-batch-size", "4", "--max-model-len", "256",
                          "--served-model-name", "tiny", "-k", "3", "--watch-interval-s", "0.2"],
                         log=log).wait_ready()


def test_sigkill_mid_load_then_restart_serves_the_same_drafter(server_assets, tmp_path):
    reg = Registry.open(tmp_path / "reg")
    v = reg.publish(server_assets["good"]).version
    before_aliases = reg.aliases()
    srv = start(server_assets, reg.root, tmp_path / "first.log")
    served = httpx.get(f"{srv.url}/admin/drafter", headers=ADMIN, timeout=30).json()["version"]
    assert served == str(v)
    with StreamLoad(srv.url, users=3, prompt=lambda i, n: f"grid line {i} {n}", max_tokens=24,
                    headers=API, timeout=30) as load:
        while load.ok + load.failed < 6:  # wait until streams are really in flight
            load.stop.wait(0.2)
        srv.stop(signal.SIGKILL)  # no drain, no cleanup: the process is gone mid-stream
    assert srv.proc.returncode == -signal.SIGKILL

    assert reg.aliases() == before_aliases
    assert all(reg.verify(i.version) == [] for i in reg.list_versions())
    again = start(server_assets, reg.root, tmp_path / "second.log")
    try:
        state = httpx.get(f"{again.url}/admin/drafter", headers=ADMIN, timeout=30).json()
        assert state["version"] == served, state
        r = httpx.post(f"{again.url}/v1/chat/completions", headers=API, timeout=120, json={
            "model": "tiny", "messages": [{"role": "user", "content": "grid"}], "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-understudy-drafter-version"] == served, r.text
        with StreamLoad(again.url, users=2, prompt=lambda i, n: f"line {i} {n}", max_tokens=16, headers=API,
                        timeout=60) as load:
            while load.ok < 4 and load.failed == 0:
                load.stop.wait(0.2)
        assert load.failed == 0 and load.ok >= 4
    finally:
        again.stop()
