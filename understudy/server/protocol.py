"""OpenAI protocol models (the boundary), in OpenAI's field order; our extensions in one marked block.

One conversion to engine sampling parameters: `to_sampling()`. Unknown fields are accepted and logged (clients
send new OpenAI fields all the time); wrong types and out-of-range values are 400s naming the field.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from understudy.engine.sampling import MAX_LOGIT_BIAS, SamplingParams

if TYPE_CHECKING:
    from understudy.engine.structured import Grammar

MAX_N = 8
MAX_STOP = 4
MAX_STOP_LEN = 64
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_SEED = 2**63 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


# vLLM's structured-output request fields: taken as response_format (JSON) or refused (the rest); never forwarded
VLLM_STRUCTURED_FIELDS = ("guided_json", "structured_outputs", "guided_regex", "guided_choice", "guided_grammar")
_ONLY_JSON = ("not supported: this server constrains output to JSON only; send response_format "
              "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}} or "
              "{\"type\": \"json_object\"} (docs/structured-output.md)")


def _schema_object(v: Any, field: str) -> dict[str, Any]:
    """A JSON Schema given as an object or as a JSON string (vLLM takes both)."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError as e:
            raise ValueError(f"{field} is a string but not JSON: give the JSON Schema as an object") from e
    if not isinstance(v, dict):
        raise ValueError(f"{field} must be a JSON Schema object (e.g. {{\"type\": \"object\", ...}})")
    return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema, as OpenAI defines it. `schema` is kept under its own name when the request is
    forwarded (the vLLM backend), so the field passes through unchanged."""

    model_config = ConfigDict(extra="allow", serialize_by_alias=True)
    name: str | None = Field(default=None, validate_default=True)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is always enforced (constrained decoding), strict or not

    @model_validator(mode="before")
    @classmethod
    def _name_the_missing_schema(cls, data: Any) -> Any:
        if isinstance(data, dict) and "schema" not in data:  # so that the error is located at "schema"
            data = {**data, "schema": None}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str:
        if v is None or not _SCHEMA_NAME.fullmatch(v):
            raise ValueError("give the schema a name: 1 to 64 letters, digits, '_' or '-' (e.g. \"grid_risk\")")
        return v

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any]:
        if v is None:
            raise ValueError('give the JSON Schema the answer must match, as an object (e.g. {"type": "object", '
                             '"properties": {...}, "required": [...]})')
        return v


class ResponseFormat(BaseModel):
    """OpenAI's response_format: {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}."""

    model_config = ConfigDict(extra="allow", serialize_by_alias=True)
    type: str | None = Field(default=None, validate_default=True)
    json_schema: JsonSchemaFormat | None = Field(default=None, validate_default=True)

    @field_validator("type")
    @classmethod
    def _type(cls, v: str | None) -> str:
        if v is None:
            raise ValueError("give the type: 'text', 'json_object' or 'json_schema'")
        if v not in RESPONSE_FORMAT_TYPES:
            raise ValueError(f"unknown type {v[:40]!r}: use 'text', 'json_object' or 'json_schema'")
        return v

    @field_validator("json_schema")
    @classmethod
    def _json_schema(cls, v: JsonSchemaFormat | None, info: ValidationInfo) -> JsonSchemaFormat | None:
        if v is None and info.data.get("type") == "json_schema":
            raise ValueError('required when type is "json_schema": give {"name": ..., "schema": {...}}')
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError("only text content parts are supported ({'type': 'text', 'text': ...})")
            parts.append(p["text"])
        return "".join(parts)


class _SamplingFields(_Request):
    """Fields shared by both endpoints, validated once. Floats refuse NaN and infinities (Python's JSON reader
    accepts them), so every float edge either is a 400 naming the field or is settled by SamplingParams."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    user: str | None = None
    response_format: ResponseFormat | None = None
    # ---- Understudy extensions (not in OpenAI's API) ----
    top_k: int | None = Field(default=None, ge=0, le=1000)
    ignore_eos: bool = False
    # ---- vLLM's structured-output extensions: the JSON ones become response_format (on both backends), the
    # others are refused by name rather than ignored (docs/structured-output.md) ----
    guided_json: dict[str, Any] | str | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None

    @field_validator("guided_regex", "guided_choice", "guided_grammar")
    @classmethod
    def _unsupported_guide(cls, v: Any) -> None:
        if v is not None:
            raise ValueError(_ONLY_JSON)
        return None

    @field_validator("guided_json")
    @classmethod
    def _guided_json(cls, v: dict[str, Any] | str | None) -> dict[str, Any] | None:
        return None if v is None else _schema_object(v, "guided_json")

    @field_validator("structured_outputs")
    @classmethod
    def _structured_outputs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return None
        other = sorted(k for k, x in v.items() if k not in ("json", "json_object") and x not in (None, False))
        if other:
            raise ValueError(f"{', '.join(other)}: {_ONLY_JSON}")
        if v.get("json") is not None:
            return {"json": _schema_object(v["json"], "structured_outputs.json")}
        return {"json_object": True} if v.get("json_object") else None

    @model_validator(mode="after")
    def _vllm_structured_as_response_format(self) -> _SamplingFields:
        so = self.structured_outputs or {}
        schema = self.guided_json if self.guided_json is not None else so.get("json")
        if schema is None and not so.get("json_object"):
            return self
        if self.response_format is not None:
            raise ValueError("give either response_format or vLLM's guided_json / structured_outputs, not both")
        self.response_format = ResponseFormat.model_validate(
            {"type": "json_object"} if schema is None else
            {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": schema}})
        return self

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(s) > MAX_STOP_LEN for s in stops):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_LEN} characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return None
        for key, bias in v.items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (decimal strings), got {key[:20]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"values must be in [-100, 100], got {bias}")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stops(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]

    def output_format(self) -> tuple[str, dict[str, Any] | None]:
        """What response_format asks for: ("text", None), ("json_object", None) or ("json_schema", schema)."""
        rf = self.response_format
        if rf is None or rf.type is None or rf.type == "text":
            return "text", None
        if rf.type == "json_schema":
            assert rf.json_schema is not None and rf.json_schema.schema_ is not None  # validated
            return "json_schema", rf.json_schema.schema_
        return rf.type, None

    def sampling(self, max_tokens: int, logprobs: int | None, index: int,
                 grammar: Grammar | None = None) -> SamplingParams:
        seed = None if self.seed is None else (self.seed + index) % (MAX_SEED + 1)
        bias = tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=seed,
                              ignore_eos=self.ignore_eos, logprobs=logprobs, logit_bias=bias, grammar=grammar)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    max_tokens: int | None = Field(default=16, ge=1)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("token-id prompts must not be empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def engine_logprobs(self) -> int | None:
        return self.logprobs


# ---- responses ---------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "understudy"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
