"""OpenAI routes: /v1/models, /v1/chat/completions, /v1/completions (stream and non-stream, n, stop, logprobs)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from understudy.engine.engine import TokenLogprob
from understudy.engine.sampling import SamplingParams
from understudy.engine.text import encode_chat, encode_text
from understudy.server.backends.native import ServerState
from understudy.server.deps import NativeState, require_api_key
from understudy.server.detok import Detokenizer
from understudy.server.errors import APIError, to_api_error
from understudy.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    _SamplingFields,
    new_id,
    now,
)
from understudy.server.scheduler import RequestStream

log = logging.getLogger(__name__)
router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])


@dataclass
class Choice:
    index: int
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stops: list[str]
    prefix_text: str = ""  # completions with echo
    stream: RequestStream | None = None
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Delta:
    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None


# ---- helpers --------------------------------------------------------------------------------------------------
def check_model(state: ServerState, model: str) -> None:
    if model != state.served_model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.served_model_name!r}",
                       "not_found_error", param="model", code="model_not_found")


def log_unknown(req: _SamplingFields, state: ServerState) -> None:
    extra = req.unknown_fields()
    if extra and state.settings.log_unknown_fields:
        log.info("ignoring unknown request fields: %s", ", ".join(extra))


def token_budget(state: ServerState, prompt_len: int, requested: int | None, param: str, prompt_param: str) -> int:
    limit = state.settings.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has "
                            f"{prompt_len} tokens; shorten the prompt", param=prompt_param,
                       code="context_length_exceeded")
    if requested is None:
        return min(state.settings.default_max_tokens, limit - prompt_len)
    if prompt_len + requested > limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens; you requested {prompt_len + requested}"
                            f" ({prompt_len} in the prompt, {requested} for the completion); lower {param} or shorten "
                            "the prompt", param=param, code="context_length_exceeded")
    return requested


def check_fanout(state: ServerState, num_choices: int, param: str) -> None:
    """Bounded work before admission: refuse what one request may not start, before any tokenising, and what
    the server cannot take now (429), before spending anything on it."""
    cap = state.settings.max_choices_per_request
    if num_choices > cap:
        raise APIError(400, f"this request would start {num_choices} sequences; the limit is {cap} "
                            f"(--max-choices-per-request); send fewer prompts or a smaller n", param=param,
                       code="too_many_choices")
    state.scheduler.check_capacity(num_choices)


class PromptBudget:
    """Counts prompt tokens across a request's prompts (n > 1 shares a prompt: counted once) against the cap."""

    def __init__(self, state: ServerState) -> None:
        self.cap, self.used = state.settings.max_prompt_tokens_per_request, 0

    def take(self, n: int, param: str) -> None:
        self.used += n
        if self.used > self.cap:
            raise APIError(400, f"the prompts of this request hold more than {self.cap} tokens "
                                "(--max-prompt-tokens-per-request); send fewer or shorter prompts", param=param,
                           code="too_many_prompt_tokens")


def submit_all(state: ServerState, choices: list[Choice]) -> None:
    """Queue every choice or none (a later failure aborts the earlier ones)."""
    done: list[Choice] = []
    try:
        for c in choices:
            c.stream = state.scheduler.submit(c.request_id, c.prompt_ids, c.sampling)
            done.append(c)
    except BaseException:
        for c in done:
            state.scheduler.abort(c.request_id)
        raise


async def choice_deltas(state: ServerState, c: Choice) -> AsyncIterator[Delta]:
    """Text deltas of one choice, honouring stop strings (trimmed) and the engine's finish reasons."""
    assert c.stream is not None
    detok = Detokenizer(state.tokenizer, c.stops)
    if c.prefix_text:
        yield Delta(c.index, c.prefix_text, [], None)
    outs = state.scheduler.outputs(c.stream, state.settings.request_timeout_s)
    async with contextlib.aclosing(outs):
        async for out in outs:
            c.completion_tokens = out.num_output_tokens
            text = detok.add(out.new_token_ids)
            lps = out.logprobs or []
            if detok.stopped:
                c.finish_reason = "stop"
                state.metrics.on_route_finish(c.stream, "stop")  # request_success{stop}: the abort below is not one
                yield Delta(c.index, text, lps, "stop")
                return  # aclosing -> the scheduler aborts the engine request
            if out.finished:
                c.finish_reason = "stop" if out.finish_reason == "stop" else "length"
                state.metrics.on_route_finish(c.stream, c.finish_reason)
                yield Delta(c.index, text + detok.finish(), lps, c.finish_reason)
                return
            if text or lps:
                yield Delta(c.index, text, lps, None)


async def collect(state: ServerState, request: Request, choices: list[Choice]) -> None:
    """Run every choice to completion (non-streaming); abort all if the client disconnects."""
    async def one(c: Choice) -> None:
        async for d in choice_deltas(state, c):
            c.text.append(d.text)
            c.logprobs.extend(d.logprobs)

    tasks = [asyncio.create_task(one(c)) for c in choices]
    watcher = asyncio.create_task(_watch_disconnect(request, tasks))
    try:
        await asyncio.gather(*tasks)
    finally:
        watcher.cancel()
        for t in tasks:
            t.cancel()


async def _watch_disconnect(request: Request, tasks: list[asyncio.Task]) -> None:  # type: ignore[type-arg]
    while not all(t.done() for t in tasks):
        if await request.is_disconnected():
            for t in tasks:
                t.cancel()
            return
        await asyncio.sleep(0.25)


async def merged_deltas(state: ServerState, choices: list[Choice]) -> AsyncIterator[Delta]:
    """Interleave the deltas of several choices as they arrive (n > 1 or several prompts)."""
    if len(choices) == 1:
        async for d in choice_deltas(state, choices[0]):
            yield d
        return
    q: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for d in choice_deltas(state, c):
                await q.put(d)
        except BaseException as e:  # surfaced to the consumer
            await q.put(e)
        finally:
            await q.put(None)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        left = len(tasks)
        while left:
            item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def headers(state: ServerState, rid: str, choices: list[Choice]) -> dict[str, str]:
    """Taken when the request is queued: the policy is the one its epoch runs on (exact across a pair swap)."""
    epoch = choices[0].stream.epoch if choices and choices[0].stream is not None else None
    return {"x-understudy-drafter-version": state.drafter_label(),
            "x-understudy-policy-version": state.policy_label(epoch), "x-request-id": rid}


def usage(choices: list[Choice]) -> dict[str, int]:
    distinct = {id(c.prompt_ids): len(c.prompt_ids) for c in choices}  # n > 1 shares one prompt: count it once
    prompt = sum(distinct.values())
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- logprob formats --------------------------------------------------------------------------------------------
def _tok(state: ServerState, t: int) -> str:
    return state.tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def chat_logprobs(state: ServerState, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(t: int, lp: float) -> dict[str, Any]:
        s = _tok(state, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]}
                        for x in lps]}


def completion_logprobs(state: ServerState, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens, offsets = [], []
    for x in lps:
        s = _tok(state, x.token_id)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [{_tok(state, t): v for t, v in x.top} for x in lps], "text_offset": offsets}


# ---- request expansion (a worker thread: tokenising and checking a 1 MB body must not hold the event loop) --------
def expand_chat(state: ServerState, req: ChatCompletionRequest, rid: str) -> list[Choice]:
    try:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = encode_chat(state.tokenizer, messages)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from e
    PromptBudget(state).take(len(ids), "messages")
    budget = token_budget(state, len(ids), req.token_budget(),
                          "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
                          "messages")
    grammar = state.grammar(*req.output_format())  # compiled here, once for the n choices; a bad schema -> 400
    return [Choice(i, f"{rid}-{i}", ids, req.sampling(budget, req.engine_logprobs(), i, grammar), req.stops())
            for i in range(req.n)]


def expand_completion(state: ServerState, req: CompletionRequest, prompts: list[str | list[int]],
                      rid: str) -> list[Choice]:
    choices: list[Choice] = []
    vocab = state.target.config.vocab_size
    tokens = PromptBudget(state)
    grammar = state.grammar(*req.output_format())  # one grammar for every prompt and choice; a bad schema -> 400
    for p_idx, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids = encode_text(state.tokenizer, prompt)
            if not ids:
                raise APIError(400, "prompt: the prompt encodes to zero tokens", param="prompt")
        else:
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= vocab for t in prompt):
                raise APIError(400, f"prompt: token ids must be integers in [0, {vocab})", param="prompt")
            ids = list(prompt)
        tokens.take(len(ids), "prompt")
        budget = token_budget(state, len(ids), req.max_tokens, "max_tokens", "prompt")
        echo = (prompt if isinstance(prompt, str) else state.tokenizer.decode(ids)) if req.echo else ""
        for i in range(req.n):
            idx = p_idx * req.n + i
            choices.append(Choice(idx, f"{rid}-{idx}", ids, req.sampling(budget, req.engine_logprobs(), idx, grammar),
                                  req.stops(), prefix_text=echo))
    return choices


# ---- routes ---------------------------------------------------------------------------------------------------
@router.get("/v1/models", response_model=ModelList)
async def list_models(state: NativeState) -> ModelList:
    return ModelList(data=[ModelCard(id=state.served_model_name)])


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(req: ChatCompletionRequest, request: Request, state: NativeState) -> Any:
    check_model(state, req.model)
    log_unknown(req, state)
    check_fanout(state, req.n, "n")
    rid = new_id("chatcmpl")
    choices = await asyncio.to_thread(expand_chat, state, req, rid)  # tokenising: off the event loop
    submit_all(state, choices)
    created, hdrs = now(), headers(state, rid, choices)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(chat_stream(state, req, choices, rid, created, include_usage),
                                 media_type="text/event-stream", headers=hdrs)
    await collect(state, request, choices)
    body = {
        "id": rid, "object": "chat.completion", "created": created, "model": req.model,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                     "logprobs": chat_logprobs(state, c.logprobs) if req.logprobs else None,
                     "finish_reason": c.finish_reason} for c in choices],
        "usage": usage(choices),
    }
    return JSONResponse(body, headers=hdrs)


async def chat_stream(state: ServerState, req: ChatCompletionRequest, choices: list[Choice], rid: str, created: int,
                      include_usage: bool) -> AsyncIterator[bytes]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
    extra = {"usage": None} if include_usage else {}
    try:
        for c in choices:  # the role comes first, once per choice
            yield sse({**base, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}], **extra})
        async for d in merged_deltas(state, choices):
            if d.finish_reason is None or d.text or d.logprobs:
                lp = chat_logprobs(state, d.logprobs) if req.logprobs and d.logprobs else None
                yield sse({**base, "choices": [{"index": d.index, "delta": {"content": d.text}, "logprobs": lp,
                                                "finish_reason": None}], **extra})
            if d.finish_reason is not None:
                yield sse({**base, "choices": [{"index": d.index, "delta": {}, "logprobs": None,
                                                "finish_reason": d.finish_reason}], **extra})
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(choices)})
        yield b"data: [DONE]\n\n"
    except Exception as e:  # headers are gone: report in-band, OpenAI style
        err = to_api_error(e)
        if err.status >= 500:
            log.error("stream %s failed", rid, exc_info=e)
        yield sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})


@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, request: Request, state: NativeState) -> Any:
    check_model(state, req.model)
    log_unknown(req, state)
    prompts = req.prompts()
    check_fanout(state, len(prompts) * req.n, "prompt" if len(prompts) > 1 else "n")
    rid = new_id("cmpl")
    choices = await asyncio.to_thread(expand_completion, state, req, prompts, rid)  # tokenising: off the loop
    submit_all(state, choices)
    created, hdrs = now(), headers(state, rid, choices)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(completion_stream(state, req, choices, rid, created, include_usage),
                                 media_type="text/event-stream", headers=hdrs)
    await collect(state, request, choices)
    body = {
        "id": rid, "object": "text_completion", "created": created, "model": req.model,
        "choices": [{"text": "".join(c.text), "index": c.index,
                     "logprobs": completion_logprobs(state, c.logprobs, len(c.prefix_text)) if req.logprobs is not None else None,
                     "finish_reason": c.finish_reason} for c in choices],
        "usage": usage(choices),
    }
    return JSONResponse(body, headers=hdrs)


async def completion_stream(state: ServerState, req: CompletionRequest, choices: list[Choice], rid: str, created: int,
                            include_usage: bool) -> AsyncIterator[bytes]:
    base = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
    extra = {"usage": None} if include_usage else {}
    offsets = {c.index: len(c.prefix_text) for c in choices}
    try:
        async for d in merged_deltas(state, choices):
            lp = None
            if req.logprobs is not None and d.logprobs:
                lp = completion_logprobs(state, d.logprobs, offsets[d.index])
            offsets[d.index] += len(d.text)
            yield sse({**base, "choices": [{"text": d.text, "index": d.index, "logprobs": lp,
                                            "finish_reason": d.finish_reason}], **extra})
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(choices)})
        yield b"data: [DONE]\n\n"
    except Exception as e:
        err = to_api_error(e)
        if err.status >= 500:
            log.error("stream %s failed", rid, exc_info=e)
        yield sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})
