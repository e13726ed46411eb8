"""Hot swap under load (bounded, loopback): many versions published and promoted while streams run, bad versions
refused while the old one keeps serving, and a garbage drafter rolled back by the canary guard."""

from __future__ import annotations

import os
import shutil
import stat
import time

import httpx
import pytest

from tests.server.conftest import ServerProcess, StreamLoad
from understudy.registry.store import Registry

pytestmark = pytest.mark.slow

ADMIN = {"authorization": "Bearer adm"}


WORDS = ["grid", "line", "flow", "risk", "load", "sum"]


def chat_load(url: str, users: int = 4) -> StreamLoad:
    return StreamLoad(url, users, prompt=lambda i, n: " ".join(WORDS[(i + n + j) % 6] for j in range(1 + n % 4)),
                      max_tokens=24)


def admin_state(url: str) -> dict:
    return httpx.get(f"{url}/admin/drafter", headers=ADMIN, timeout=30).json()


def drafts_total(url: str) -> float:
    """understudy:spec_decode_num_drafts_total from /metrics (0 before the first draft)."""
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith("understudy:spec_decode_num_drafts_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(pred, timeout: float = 300.0, every: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()


def _start(server_assets, tmp_path_factory, canary_margin: str):  # type: ignore[no-untyped-def]
    reg_dir = tmp_path_factory.mktemp("swapreg")
    reg = Registry.open(reg_dir)
    first = reg.publish(server_assets["good"]).version
    reg.promote(first, "serving")
    srv = ServerProcess(["--model", str(server_assets["model"]), "--registry", str(reg_dir), "--follow", "serving",
                         "--admin-key", "adm", "--served-model-name", "tiny", "--controller", "fixed", "-k", "3",
                         "--max-batch-size", "8", "--canary-window", "128", "--canary-margin", canary_margin],
                        env={"UNDERSTUDY_WATCH_INTERVAL_S": "0.2"},
                        log=tmp_path_factory.mktemp("swaplog") / "server.log").wait_ready()
    return srv, reg, first


@pytest.fixture(scope="module")
def swap_server(server_assets, tmp_path_factory):
    """Swap mechanics under load, with the canary out of the way (a margin no acceptance drop reaches): these tests
    republish the same good drafter, and over 128-draft windows of a 4-stream load its live acceptance varies
    with the prompt mix by more than 0.5 (loaded CI run: 1.29 against 1.94 for identical weights), which the
    canary's fixed margin reads as a regression. The canary has its own server below."""
    srv, reg, first = _start(server_assets, tmp_path_factory, canary_margin="100")
    yield srv, reg, first
    srv.stop()


@pytest.fixture(scope="module")
def canary_server(server_assets, tmp_path_factory):
    srv, reg, first = _start(server_assets, tmp_path_factory, canary_margin="0.5")
    yield srv, reg, first
    srv.stop()


def test_versions_published_and_promoted_under_load_without_errors(swap_server, server_assets):
    srv, reg, first = swap_server
    assert admin_state(srv.url)["version"] == str(first)
    promoted = []
    with chat_load(srv.url) as load:
        time.sleep(1.0)
        for _ in range(10):
            v = reg.publish(server_assets["good"]).version
            reg.promote(v, "serving")
            promoted.append(v)
            assert wait_for(lambda v=v: admin_state(srv.url)["version"] == str(v), 300), srv.tail()
            time.sleep(0.3)
    assert load.failed == 0, (load.non_2xx, load.truncated, load.errors)
    assert load.ok >= 20
    assert len(set(load.versions)) >= 3, set(load.versions)  # the header followed the swaps
    hist = admin_state(srv.url)["history"]
    assert all(h["result"] == "success" for h in hist[-10:]), [(h["to_version"], h["result"], h["reason"]) for h in hist]
    assert any(h["stall_s"] is not None for h in hist)
    metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
    assert 'understudy:drafter_swaps_total{model_name="tiny",result="success"} 1' in metrics  # 10.0 or more
    assert "understudy:drafter_swap_stall_seconds_count" in metrics


def test_corrupt_and_foreign_versions_are_refused_while_old_keeps_serving(swap_server, server_assets):
    srv, reg, _ = swap_server
    before = admin_state(srv.url)["version"]
    # another model family, promoted through the followed alias: refused at validation
    foreign = reg.publish(server_assets["other"]).version
    reg.promote(foreign, "serving")
    assert wait_for(lambda: any(h["to_version"] == str(foreign) and h["result"] == "failed"
                                for h in admin_state(srv.url)["history"]), 30), srv.tail()
    assert admin_state(srv.url)["version"] == before
    assert "family" in [h for h in admin_state(srv.url)["history"] if h["to_version"] == str(foreign)][-1]["reason"]
    # a version whose weights were corrupted on disk after publishing: refused by checksum when pinned
    bad = reg.publish(server_assets["good"]).version
    f = reg.version_path(bad) / "model.safetensors"
    os.chmod(f, stat.S_IWUSR | stat.S_IRUSR)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    r = httpx.post(f"{srv.url}/admin/drafter/pin", json={"version": bad}, headers=ADMIN, timeout=60)
    assert r.status_code == 409 and "model.safetensors" in r.json()["error"]["message"]
    st = admin_state(srv.url)
    assert st["version"] == before and st["following"] == "serving"  # a refused pin changes nothing
    ok = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "grid"}], "max_tokens": 8})
    assert ok.status_code == 200 and ok.headers["x-understudy-drafter-version"] == before


def test_garbage_drafter_is_rolled_back_by_the_canary(canary_server, server_assets, tmp_path):
    srv, reg, _ = canary_server
    good = reg.publish(server_assets["good"]).version
    reg.promote(good, "serving")
    assert wait_for(lambda: admin_state(srv.url)["version"] == str(good), 300)
    garbage_dir = tmp_path / "garbage"
    shutil.copytree(server_assets["garbage"], garbage_dir)
    with chat_load(srv.url, users=4) as load:
        # the good version builds its acceptance baseline under load: a full canary window of its own drafts
        # (waited for by count, not by time: a busy machine drafts slowly)
        start = drafts_total(srv.url)
        assert wait_for(lambda: drafts_total(srv.url) - start >= 2 * 128, 600), drafts_total(srv.url)
        garbage = reg.publish(garbage_dir).version
        reg.promote(garbage, "serving")
        assert wait_for(lambda: any(h["to_version"] == str(garbage) and h["result"] == "success"
                                    for h in admin_state(srv.url)["history"]), 300), admin_state(srv.url)
        rolled = wait_for(lambda: admin_state(srv.url)["version"] == str(good), 600)
    st = admin_state(srv.url)
    assert rolled, st
    assert str(garbage) in st["rejected"] and "canary" in st["rejected"][str(garbage)]
    assert any(h["result"] == "rolled_back" for h in st["history"])
    assert load.failed == 0, (load.non_2xx, load.truncated, load.errors)
    # the rejected version is not swapped in again while the alias still points at it
    time.sleep(1.0)
    assert admin_state(srv.url)["version"] == str(good)


def test_a_pair_swap_under_streaming_load_fails_no_request_and_serves_the_policy(swap_server, server_assets):
    """Target + drafter pairs (issue 13): the alias moves to (policy p, its drafter) and back, under a 4-stream
    load. Requests in flight finish on the weights they started with (a drain), none fails, the policy header
    follows, and a greedy completion afterwards is the policy's own output token for token."""
    from understudy.engine.config import EngineConfig
    from understudy.engine.engine import Engine
    from understudy.engine.sampling import SamplingParams

    srv, reg, _ = swap_server
    plm = server_assets["policy_lm"]
    p = reg.publish_policy(server_assets["policy"], family_fingerprint=plm.fingerprint,
                           target=plm.config.family_shape()).version
    d = reg.publish(server_assets["policy_drafter"], policy=p).version
    served = admin_state(srv.url)  # (the alias may name a version the server refused: an earlier test's)
    assert served["policy"] == "base"
    base_pair = (int(served["version"]), None)
    with chat_load(srv.url) as load:
        time.sleep(1.0)
        reg.promote(d, "serving")
        assert wait_for(lambda: admin_state(srv.url)["policy"] == str(p), 300), srv.tail()
        assert wait_for(lambda: str(p) in load.policies, 300), set(load.policies)  # counted, not timed
        reg.promote(base_pair[0], "serving")  # both halves back
        assert wait_for(lambda: admin_state(srv.url)["policy"] == "base", 300), srv.tail()
        back = time.monotonic()
        assert wait_for(lambda: sum(t > back for t in load.started) >= 2, 300), (load.ok, load.failed)
    assert load.failed == 0, (load.non_2xx, load.truncated, load.errors)
    assert {"base", str(p)} <= set(load.policies), set(load.policies)
    assert {v for t, v in zip(load.started, load.policies, strict=True) if t > back} == {"base"}  # exact header
    hist = [h for h in admin_state(srv.url)["history"] if h["to_policy"] != h["from_policy"]]
    assert [(h["to_policy"], h["result"]) for h in hist[-2:]] == [(str(p), "success"), ("base", "success")]
    assert all(h["drain_s"] is not None for h in hist[-2:])
    assert admin_state(srv.url)["version"] == str(base_pair[0])

    reg.promote(d, "serving")
    assert wait_for(lambda: admin_state(srv.url)["policy"] == str(p), 300), srv.tail()
    ids = plm.tokenizer.encode("grid line flow risk")
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    plain = EngineConfig(max_batch_size=1, max_model_len=256, num_speculative_tokens=0, dtype="float32")
    want = Engine(plm.model, plain, plm.eos_token_ids).generate([ids], greedy)[0]
    r = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": ids, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200 and r.headers["x-understudy-policy-version"] == str(p)
    assert r.json()["usage"]["completion_tokens"] == len(want)
    assert r.json()["choices"][0]["text"] == plm.tokenizer.decode(want, skip_special_tokens=True)
    metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
    assert f'understudy:policy_info{{model_name="tiny",version="{p}"}} 1.0' in metrics
    assert "understudy:policy_swap_drain_seconds_count" in metrics
    assert httpx.get(f"{srv.url}/health", timeout=30).json()["policy_version"] == str(p)
    reg.promote(base_pair[0], "serving")
    assert wait_for(lambda: admin_state(srv.url)["policy"] == "base", 300), srv.tail()


def test_the_operator_turns_speculation_off_and_back_on_without_a_restart(swap_server):
    """POST /admin/controller: K pinned at 0 makes no drafts from the next step on (the no-speculation baseline
    on the same server and pair), greedy text unchanged; null hands K back; bad values name the field."""
    srv, _, _ = swap_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "grid line flow risk"}], "max_tokens": 24,
            "temperature": 0}

    def chat() -> str:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    def pin(k, headers=ADMIN):  # type: ignore[no-untyped-def]
        return httpx.post(f"{srv.url}/admin/controller", json={"k": k}, headers=headers, timeout=30)

    try:
        d0 = drafts_total(srv.url)
        spec_text = chat()
        assert drafts_total(srv.url) > d0, "the fixed K=3 controller drafts before any pin"
        r = pin(0)
        assert r.status_code == 200 and r.json()["pinned_k"] == 0, r.text
        assert httpx.get(f"{srv.url}/admin/controller", headers=ADMIN, timeout=30).json()["pinned_k"] == 0
        d1 = drafts_total(srv.url)
        assert chat() == spec_text, "speculation is lossless: greedy text is the same with it off"
        assert drafts_total(srv.url) == d1, "pinned off, no step drafts"
        for bad, status in ((-1, 400), (4, 400), ("two", 400)):  # the server's maximum K is 3
            r = pin(bad)
            assert r.status_code == status and r.json()["error"]["param"] == "k", r.text
        r = httpx.post(f"{srv.url}/admin/controller", json={}, headers=ADMIN, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "k", r.text
        assert pin(None, headers={}).status_code == 401
        assert httpx.get(f"{srv.url}/admin/controller", headers=ADMIN, timeout=30).json()["pinned_k"] == 0, \
            "refused requests leave the pin as it was"
        r = pin(None)
        assert r.status_code == 200 and r.json()["pinned_k"] is None, r.text
        assert chat() == spec_text and drafts_total(srv.url) > d1, "handed back: the controller drafts again"
    finally:
        pin(None)
