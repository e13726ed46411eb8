"""Contract tests: the real server (uvicorn, loopback) called with the official `openai` SDK."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from understudy.registry.store import Registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=60)


MSG = [{"role": "user", "content": "grid line flow risk"}]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_non_stream_and_usage(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_role_first_one_finish_reason_and_usage(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=15, temperature=0, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    text = {0: "", 1: ""}
    for i in (0, 1):
        mine = [ch for c in chunks for ch in c.choices if ch.index == i]
        assert mine[0].delta.role == "assistant"
        assert sum(ch.finish_reason is not None for ch in mine) == 1 and mine[-1].finish_reason is not None
        text[i] = "".join(ch.delta.content or "" for ch in mine)
    full = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=15, temperature=0)
    assert text[0] == text[1] == full.choices[0].message.content  # greedy: n copies agree with non-stream
    assert usage_chunks[0].usage.completion_tokens == 2 * full.usage.completion_tokens


def test_completions_stream_and_non_stream(client):
    r = client.completions.create(model="tiny", prompt=["abc", "xyz"], max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and all(c.text for c in r.choices)
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.text for c in chunks for ch in c.choices)
    assert text == r.choices[0].text
    assert sum(ch.finish_reason is not None for c in chunks for ch in c.choices) == 1
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens // 2


def test_n_and_seed_reproducibility(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(n=3, seed=1234, **kw)
    b = client.chat.completions.create(n=3, seed=1234, **kw)
    c = client.chat.completions.create(n=3, seed=999, **kw)
    ta = [x.message.content for x in a.choices]
    assert len(ta) == 3 and ta == [x.message.content for x in b.choices]
    assert len(set(ta)) > 1, "n samples with one seed must differ (seed + index per choice)"
    assert ta != [x.message.content for x in c.choices]


def test_stop_strings_are_trimmed(client):
    full = client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[4:6]
    first = full.find(stop)
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[:first] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(ch.text for c in chunks for ch in c.choices) == full[:first]


def test_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.logprob - 1e-6  # greedy: the chosen token is the top one
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4


def test_greedy_identical_with_and_without_drafter_and_version_header(server, server_assets, client):
    """The server follows `latest`: publish a drafter, wait until the header reports it, compare outputs."""
    prompts = [[{"role": "user", "content": p}] for p in ("grid line", "flow risk load", "sum wind trip grid", "x")]
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=prompts[0], max_tokens=20, temperature=0)
    assert raw.headers["x-understudy-drafter-version"] == "none"
    before = [client.chat.completions.create(model="tiny", messages=m, max_tokens=40, temperature=0).choices[0].message.content
              for m in prompts]
    reg = Registry.open(server.registry)
    v = reg.publish(server_assets["good"]).version
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        raw = client.chat.completions.with_raw_response.create(model="tiny", messages=prompts[0], max_tokens=2)
        if raw.headers["x-understudy-drafter-version"] == str(v):
            break
        time.sleep(0.2)
    assert raw.headers["x-understudy-drafter-version"] == str(v)
    after = [client.chat.completions.create(model="tiny", messages=m, max_tokens=40, temperature=0).choices[0].message.content
             for m in prompts]
    assert after == before
    metrics = httpx.get(f"{server.url}/metrics").text
    drafted = [ln for ln in metrics.splitlines() if ln.startswith("understudy:spec_decode_num_draft_tokens_total")]
    assert drafted and float(drafted[0].split()[-1]) > 0
    assert f'version="{v}"' in metrics


def test_metrics_names(server, client):
    client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("understudy:num_requests_running", "understudy:num_requests_waiting",
                 "understudy:request_success_total", "understudy:prompt_tokens_total",
                 "understudy:generation_tokens_total", "understudy:time_to_first_token_seconds_bucket",
                 "understudy:inter_token_latency_seconds_bucket", "understudy:e2e_request_latency_seconds_bucket",
                 "understudy:request_queue_time_seconds_bucket", "understudy:spec_decode_num_drafts_total",
                 "understudy:spec_decode_num_accepted_tokens_total", "understudy:drafter_info",
                 "understudy:drafter_swaps_total"):
        assert name in text, name
    assert 'le="0.001"' in text  # ITL buckets start at 1 ms
