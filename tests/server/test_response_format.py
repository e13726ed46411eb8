"""response_format on the native server (JSON mode, JSON Schema; stream and non-stream; both endpoints; with a
drafter speculating), its 400s naming the field, and the vLLM proxy forwarding the field unchanged."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import ServerProcess
from understudy.trainer.tasks.grid_risk import answer_schema

KEY = {"authorization": "Bearer sk-test"}
GRID_SCHEMA = answer_schema()
GRID_FORMAT = {"type": "json_schema", "json_schema": {"name": "grid_risk", "schema": GRID_SCHEMA, "strict": True}}
MSG = [{"role": "user", "content": "N-1 check: L2 trips (flow -80). Is the grid secure?"}]


@pytest.fixture(scope="module")
def spec_server(server_assets, tmp_path_factory):
    """The tiny model with its trained drafter, speculating 3 tokens per step."""
    srv = ServerProcess(["--model", str(server_assets["model"]), "--drafter", str(server_assets["good"]),
                         "--registry", str(tmp_path_factory.mktemp("rf-reg")), "--api-key", "sk-test",
                         "--served-model-name", "tiny", "--max-batch-size", "8", "--max-model-len", "256",
                         "--controller", "fixed", "-k", "3"],
                        log=tmp_path_factory.mktemp("rf-logs") / "server.log").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(spec_server):
    return openai.OpenAI(base_url=f"{spec_server.url}/v1", api_key="sk-test", max_retries=0, timeout=120)


def post(server, path, body):
    return httpx.post(f"{server.url}{path}", json={"model": "tiny", **body}, headers=KEY, timeout=120)


@pytest.mark.slow
def test_json_schema_chat_validates_and_streams_the_same_text(client, spec_server):
    before = httpx.get(f"{spec_server.url}/health", timeout=30).json()
    assert before["proposer"] == "drafter"
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=200, temperature=0,
                                       response_format=GRID_FORMAT)
    c = r.choices[0]
    assert c.finish_reason == "stop", c
    jsonschema.validate(json.loads(c.message.content), GRID_SCHEMA)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=200, temperature=0,
                                                 response_format=GRID_FORMAT, stream=True))
    text = "".join(ch.delta.content or "" for k in chunks for ch in k.choices)
    reasons = [ch.finish_reason for k in chunks for ch in k.choices if ch.finish_reason is not None]
    assert reasons == ["stop"] and text == c.message.content
    spec = httpx.get(f"{spec_server.url}/health", timeout=30).json()["spec_decode"]
    assert spec["num_accepted_tokens"] > before["spec_decode"]["num_accepted_tokens"]  # drafts accepted under it


@pytest.mark.slow
def test_json_object_chat_parses(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "grid"}], max_tokens=200,
                                       temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # "text" is the default: no grammar (the same answer as without response_format)
    a = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=20, temperature=0,
                                       response_format={"type": "text"})
    b = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=20, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.slow
def test_sampled_choices_and_completions_validate(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=200, temperature=0.8, seed=7, n=3,
                                       response_format=GRID_FORMAT)
    for c in r.choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), GRID_SCHEMA)
    r = client.completions.create(model="tiny", prompt=["grid line", "flow risk"], max_tokens=200, temperature=0,
                                  extra_body={"response_format": GRID_FORMAT})
    for c in r.choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), GRID_SCHEMA)


BAD = [
    ({"type": "xml"}, "response_format.type", "json_schema"),
    ({"type": "json_schema"}, "response_format.json_schema", "name"),
    ({"type": "json_schema", "json_schema": {"name": "g"}}, "response_format.json_schema.schema", "JSON Schema"),
    ({"type": "json_schema", "json_schema": {"name": "g", "schema": "object"}}, "response_format.json_schema.schema",
     None),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "response_format.json_schema.name",
     "letters"),
    ({"type": "json_schema", "json_schema": {"name": "g", "schema": {"type": "frobnicate"}}},
     "response_format.json_schema.schema", "frobnicate"),
    ({"type": "json_schema", "json_schema": {"name": "g", "schema": {"type": "string", "pattern": "("}}},
     "response_format.json_schema.schema", "schema"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("rf", "param", "says"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_bad_response_format_is_a_400_naming_the_field(spec_server, rf, param, says, path):
    prompt = {"messages": MSG} if "chat" in path else {"prompt": "grid"}
    r = post(spec_server, path, {**prompt, "max_tokens": 8, "response_format": rf})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert param in err["message"] and (says is None or says in err["message"]), err


@pytest.mark.slow
def test_a_bad_schema_does_not_harm_requests_in_flight(spec_server):
    """A stream runs while bad schemas are refused; it finishes, and so do the requests after them."""
    good = {"messages": MSG, "max_tokens": 200, "temperature": 0, "response_format": GRID_FORMAT}
    alone = post(spec_server, "/v1/chat/completions", good).json()["choices"][0]["message"]["content"]
    bad = {**good, "response_format": {"type": "json_schema", "json_schema": {"name": "g",
                                                                              "schema": {"type": "frobnicate"}}}}
    with httpx.stream("POST", f"{spec_server.url}/v1/chat/completions", json={"model": "tiny", **good, "stream": True},
                      headers=KEY, timeout=120) as s:
        refused = [post(spec_server, "/v1/chat/completions", bad).status_code for _ in range(3)]
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert refused == [400, 400, 400]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == alone
    # greedy, and no end-of-sequence: a sampled 5-token answer can be empty by chance (it failed CI once that way)
    plain = post(spec_server, "/v1/chat/completions", {"messages": MSG, "max_tokens": 5, "temperature": 0,
                                                        "ignore_eos": True})
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length", body


# ---- the vLLM backend: the proxy forwards the field as the client sent it (no vLLM needed) -----------------------
@pytest.mark.parametrize("rf", [{"type": "json_object"}, GRID_FORMAT,
                                {"type": "json_schema", "json_schema": {"name": "g", "description": "d",
                                                                        "schema": {"type": "object"}}}])
def test_the_vllm_proxy_forwards_response_format_unchanged(rf):
    from starlette.requests import Request

    from understudy.server.routes_vllm import read_body

    raw = json.dumps({"model": "tiny", "messages": MSG, "response_format": rf}).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}, receive)
    state = SimpleNamespace(served_model_name="tiny", settings=SimpleNamespace(
        log_unknown_fields=False, max_choices_per_request=8, max_model_len=256))
    body, _ = asyncio.run(read_body(request, state, "/v1/chat/completions"))  # type: ignore[arg-type]
    assert body["response_format"] == rf


# ---- vLLM's structured-output fields: the JSON ones taken as response_format, the rest refused by name -----------
def _read_body(payload: dict) -> dict:
    from starlette.requests import Request

    from understudy.server.routes_vllm import read_body

    raw = json.dumps({"model": "tiny", "messages": MSG, **payload}).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}, receive)
    state = SimpleNamespace(served_model_name="tiny", settings=SimpleNamespace(
        log_unknown_fields=False, max_choices_per_request=8, max_model_len=256))
    return asyncio.run(read_body(request, state, "/v1/chat/completions"))[0]  # type: ignore[arg-type]


@pytest.mark.parametrize(("payload", "want"), [
    ({"guided_json": GRID_SCHEMA}, ("json_schema", GRID_SCHEMA)),
    ({"guided_json": json.dumps(GRID_SCHEMA)}, ("json_schema", GRID_SCHEMA)),
    ({"structured_outputs": {"json": GRID_SCHEMA}}, ("json_schema", GRID_SCHEMA)),
    ({"structured_outputs": {"json_object": True}}, ("json_object", None)),
])
def test_vllm_guided_json_is_taken_as_response_format_on_both_backends(payload, want):
    from understudy.server.protocol import ChatCompletionRequest

    req = ChatCompletionRequest.model_validate({"model": "tiny", "messages": MSG, **payload})
    assert req.output_format() == want and not req.unknown_fields()
    body = _read_body(payload)  # what the vLLM proxy forwards: response_format only
    assert ChatCompletionRequest.model_validate(body).output_format() == want
    assert not {"guided_json", "structured_outputs"} & set(body)


@pytest.mark.parametrize(("payload", "param", "says"), [
    ({"guided_regex": "[a-z]+"}, "guided_regex", "JSON only"),
    ({"guided_choice": ["secure", "overload"]}, "guided_choice", "json_schema"),
    ({"guided_grammar": "root ::= \"a\""}, "guided_grammar", "JSON only"),
    ({"structured_outputs": {"regex": "[a-z]+"}}, "structured_outputs", "regex"),
    ({"guided_json": "{not json"}, "guided_json", "not JSON"),
    ({"guided_json": 3}, "guided_json", None),
    ({"guided_json": GRID_SCHEMA, "response_format": GRID_FORMAT}, None, "not both"),
])
def test_unsupported_vllm_guides_are_refused_naming_the_field(payload, param, says):
    from pydantic import ValidationError

    from understudy.server.protocol import ChatCompletionRequest

    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate({"model": "tiny", "messages": MSG, **payload})
    err = e.value.errors()[0]
    assert (err["loc"][0] if err["loc"] else None) == param, err
    assert says is None or says in err["msg"], err


@pytest.mark.slow
def test_guided_json_constrains_the_served_answer_and_a_regex_is_a_400(spec_server):
    r = post(spec_server, "/v1/chat/completions", {"messages": MSG, "max_tokens": 200, "temperature": 0,
                                                   "guided_json": GRID_SCHEMA})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), GRID_SCHEMA)
    r = post(spec_server, "/v1/chat/completions", {"messages": MSG, "max_tokens": 8, "guided_regex": "[a-z]+"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text
