"""Model and engine configs: one frozen, typed dataclass per component, validated in __post_init__."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from understudy.errors import UnderstudyError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")


class ConfigError(UnderstudyError, ValueError):
    """A config value is invalid; the message names the field and what to do."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama, SmolLM2, Qwen2, Mistral without sliding window)."""

    architecture: str  # "llama" | "qwen2" | "mistral" (HF model_type)
    vocab_size: int  # rows of the embedding / LM head
    hidden_size: int  # H
    intermediate_size: int  # MLP width
    num_layers: int  # decoder layers
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int  # per-head width (usually H / num_heads)
    rope_theta: float = 10000.0  # RoPE base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama with attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama with attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down (Llama with mlp_bias)
    max_position_embeddings: int = 2048  # longest sequence the model was trained for
    rope_scaling: dict[str, Any] | None = None  # None or {"rope_type": "llama3", ...}

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported; Understudy implements "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family decoders)"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model config field {name!r} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ConfigError(
                    f"rope_scaling type {kind!r} is not supported (supported: llama3, default)"
                )

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """The Hugging Face config.json dict for this shape (the inverse of from_hf); every writer uses it."""
        hf: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if self.architecture == "qwen2" else "LlamaForCausalLM"],
            "model_type": self.architecture, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu", "torch_dtype": dtype,
        }
        if self.architecture != "qwen2":
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.rope_scaling:
            hf["rope_scaling"] = dict(self.rope_scaling)
        return hf

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Translate a Hugging Face config.json dict."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"config.json model_type {model_type!r} is not supported; Understudy implements "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if model_type in ("qwen2", "mistral") and cfg.get("use_sliding_window", False):
            raise ConfigError("sliding-window attention is not supported; set use_sliding_window=false")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        attention_bias = bool(cfg.get("attention_bias", False))
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 folds theta and scaling in here
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        return cls(
            architecture=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
        )

    def family_shape(self) -> dict[str, Any]:
        """The fields a drafter depends on: the target's shapes (not its trained weights)."""
        d = asdict(self)
        d.pop("max_position_embeddings")
        return d


def family_fingerprint(model: ModelConfig, tokenizer_digest: str) -> str:
    """Hash of architecture + shapes + tokenizer: a drafter only runs against a target with the same one.

    Two checkpoints of the same model family (e.g. successive RL policies) share it; a different model,
    shape or vocabulary does not.
    """
    payload = json.dumps({"model": model.family_shape(), "tokenizer": tokenizer_digest}, sort_keys=True)
    return "fam-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: batch and length limits, speculation, placement."""

    max_batch_size: int = 16  # concurrent sequences (KV-cache slots)
    max_model_len: int = 2048  # prompt + generated tokens per sequence
    num_speculative_tokens: int = 4  # K: upper bound on draft tokens per step (0 disables speculation)
    proposer: str = "auto"  # "auto" (drafter if given, else fallback_proposer), "drafter", "ngram", "none"
    fallback_proposer: str = "none"  # what "auto" drafts with while no drafter is set: "none" | "ngram"
    ngram_min: int = 2  # n-gram prompt lookup: shortest suffix to match (as vLLM; 1-token matches draft noise)
    ngram_max: int = 4  # n-gram prompt lookup: longest suffix to match
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    dtype: str = "bfloat16"  # "float32" | "bfloat16" | "float16"
    # threads on CPU: torch's intra-op threads and the native kernels' (each linear's outputs split across them);
    # None: torch's setting as it stands. Engine.set_threads changes it between steps.
    num_threads: int | None = 1
    # float32 on the CPU: cached decode/verify forwards run every decoder layer in one call of the native kernels
    # (engine/quant.py FusedDecoder), reading the float32 weights in place; False: torch ops
    native_decoder: bool = True
    # torch intra-op threads for a prompt prefill longer than the fused path takes: compute-bound, so unlike a
    # decode step it gains from more cores (1.5-1.6x with 2 on a 2-core CPU). None: every core this process may
    # use; 0: as num_threads. The server runs 1 while a background drafter job has the other core.
    prefill_threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # reserved for backend-specific knobs

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 0 <= self.num_speculative_tokens <= 16:
            raise ConfigError(f"num_speculative_tokens must be in [0, 16], got {self.num_speculative_tokens}")
        if self.proposer not in ("auto", "drafter", "ngram", "none"):
            raise ConfigError(f"proposer must be auto|drafter|ngram|none, got {self.proposer!r}")
        if self.fallback_proposer not in ("none", "ngram"):
            raise ConfigError(f"fallback_proposer must be none|ngram, got {self.fallback_proposer!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32|bfloat16|float16, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        if self.prefill_threads is not None and self.prefill_threads < 0:
            raise ConfigError(f"prefill_threads must be >= 0 (0: as num_threads) or None (every core), got "
                              f"{self.prefill_threads}")
