"""Llama-family decoder (Llama, SmolLM2, Qwen2), gpt-fast style: fused projections and an external KV cache.

The same module serves two callers:
  * the engine: `forward(tokens, positions, cache)` over a preallocated per-slot KV cache, rows = slots 0..B-1;
  * the trainer: `forward(tokens, positions)` with no cache (plain causal attention) for log-probs and the
    hidden states that train the drafter (TLT takes them from the update's own forward pass).
`forward` returns the final *normed* hidden states (the LM head's input, which is also the EAGLE feature);
`logits()` applies the LM head, so callers only pay for the rows they need.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from understudy.engine import qkernels
from understudy.engine.config import ModelConfig


@dataclass
class KVCache:
    """Preallocated keys/values for every layer; batch row b of a forward lives in slot b."""

    k: list[torch.Tensor]  # per layer: [num_slots, num_kv_heads, capacity, head_dim]
    v: list[torch.Tensor]  # per layer: [num_slots, num_kv_heads, capacity, head_dim]

    @classmethod
    def allocate(cls, num_layers: int, num_slots: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> KVCache:
        shape = (num_slots, num_kv_heads, capacity, head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst (used to keep live slots contiguous)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length].copy_(k[src, :, :length])
            v[dst, :, :length].copy_(v[src, :, :length])


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim/2], with Llama-3 scaling when the config asks for it."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(is_mid, mid, scaled)
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF/Llama convention). x: [B, T, heads, D]; cos, sin: [B, T, 1, D] as RotaryTable
    returns them: cos = [c, c], sin = [-s, s]. Then x * cos + roll(x, D/2) * sin = [x1 c - x2 s, x2 c + x1 s],
    bit for bit the textbook form, in 4 ops instead of 9 (per-layer op overhead dominates small-batch decoding)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Linear(nn.Linear):
    """nn.Linear with an optional oneDNN pre-packed copy of the weight for CPU inference.

    MKL's sgemm re-packs the weight on every call, which doubles the cost of the skinny matmuls of decoding and
    verification (M = 2..16 rows; measured in docs/performance.md). A packed copy is made on first use under
    inference mode and re-made whenever the weight changes (its version counter moves, e.g. after an
    optimizer step), so it can never go stale. Training and autograd use the plain path.
    """

    pack_hint = 8  # batch-size hint for the packed layout (M = 2..16 all benefit)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pack_enabled = False
        # > 0: calls of at most this many rows (grad off, float32 CPU) run qkernels.f32_linear (set_native_linears)
        self.native_rows = 0
        self._packed: torch.Tensor | None = None
        self._packed_key: tuple[int, int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_rows and not torch.is_grad_enabled():
            out = qkernels.f32_linear(x, self.weight, self.bias, self.native_rows)
            if out is not None:
                return out
        if self.pack_enabled and not torch.is_grad_enabled():
            packed = self._packed_weight()
            if packed is not None:
                lead = x.shape[:-1]
                out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, self.bias,
                                                         "none", [], "")
                return out.view(*lead, out.shape[-1])
        return F.linear(x, self.weight, self.bias)

    def _packed_weight(self) -> torch.Tensor | None:
        w = self.weight
        # An inference tensor has no version counter (and cannot change outside inference mode): key on its storage.
        key = (id(w), -1 if w.is_inference() else w._version, w.data_ptr())
        if self._packed_key != key:
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), self.pack_hint)
            except RuntimeError:  # dtype the CPU cannot pack (e.g. bf16 without AVX512-BF16): plain path
                self.pack_enabled = False
                return None
            self._packed_key = key
        return self._packed


def enable_cpu_packing(module: nn.Module, enabled: bool = True) -> int:
    """Turn pre-packed oneDNN weights on for every Linear in `module` (CPU + mkldnn only). Returns how many."""
    if enabled and not (torch.backends.mkldnn.is_available() and next(module.parameters()).device.type == "cpu"):
        return 0
    n = 0
    for m in module.modules():
        if isinstance(m, Linear):
            m.pack_enabled = enabled
            m._packed, m._packed_key = None, None
            n += 1
    return n


def set_native_linears(module: nn.Module, max_rows: int) -> int:
    """Run every Linear in `module` through the native float32 kernel for calls of up to `max_rows` rows (0: off),
    which reads the weights in place; what an engine with its native decoder does (EngineConfig.native_decoder).
    Why: at 5 rows oneDNN's float32 matmul over SmolLM2's 49k-row LM head took 1.9x its 1-row time, the native one
    1.2x (docs/performance.md). Returns how many Linears."""
    n = 0
    for m in module.modules():
        if isinstance(m, Linear):
            m.native_rows = max_rows
            n += 1
    return n


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.wqkv = Linear(cfg.hidden_size, qkv_out, bias=cfg.qkv_bias)
        self.wo = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: tuple[torch.Tensor, torch.Tensor] | None, write_idx: tuple[torch.Tensor, torch.Tensor] | None,
                kv_len: int) -> torch.Tensor:
        B, T, _ = x.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, T, Hq + 2 * Hkv, D)
        qk = apply_rope(qkv[:, :, :Hq + Hkv], cos, sin)  # q and k rotated together: [B, T, Hq + Hkv, D]
        q, k = qk[:, :, :Hq], qk[:, :, Hq:]  # [B, T, Hq, D], [B, T, Hkv, D]
        v = qkv[:, :, Hq + Hkv:]  # [B, T, Hkv, D]
        if cache is not None:
            assert write_idx is not None
            k_cache, v_cache = cache  # [S, Hkv, C, D]
            rows, pos = write_idx  # [B, T] each
            k_cache[rows, :, pos] = k  # advanced indices first: the target view is [B, T, Hkv, D]
            v_cache[rows, :, pos] = v
            keys, values = k_cache[:B, :, :kv_len], v_cache[:B, :, :kv_len]  # [B, Hkv, L, D] views
        else:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D]
        # Grouped-query attention without copying K/V: fold the G query heads of each KV head into the
        # query-length axis, so q is [B, Hkv, G*T, D] against keys [B, Hkv, L, D].
        G = Hq // Hkv
        q = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
        if mask is None and cache is None:
            out = F.scaled_dot_product_attention(q.view(B, Hkv * G, T, D), keys.repeat_interleave(G, 1),
                                                 values.repeat_interleave(G, 1), is_causal=True)
            out = out.view(B, Hkv, G * T, D)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, Hkv, G*T, D]
        out = out.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, Hq * D)
        return self.wo(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w13 = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)  # [gate; up]
        self.w2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused op instead of seven (the same value in float32; per-op overhead matters when decoding)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in float32 and cast back before the scale, as HF Llama does (bit-parity in fp32).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, input_norm: bool = True) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if input_norm else nn.Identity()
        self.attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: tuple[torch.Tensor, torch.Tensor] | None,
                write_idx: tuple[torch.Tensor, torch.Tensor] | None, kv_len: int) -> torch.Tensor:
        h = x + self.attn(self.input_layernorm(x), cos, sin, mask, cache, write_idx, kv_len)
        return h + self.mlp(self.post_attention_layernorm(h))


class RotaryTable(nn.Module):
    """cos/sin for every position up to `max_positions`, looked up per token (positions differ per row).

    Stored full width in the form `apply_rope` wants: cos = [c, c] and sin = [-s, s] over the two halves."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(cfg))
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", torch.cat([cos, cos], dim=-1), persistent=False)  # [P, D]
        self.register_buffer("sin", torch.cat([-sin, sin], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(f"position {int(positions.max())} exceeds the rotary table ({self.cos.shape[0]})")
        return (self.cos[positions].unsqueeze(2).to(dtype),  # [B, T, 1, D]
                self.sin[positions].unsqueeze(2).to(dtype))


def attention_mask(positions: torch.Tensor, kv_len: int, group: int) -> torch.Tensor | None:
    """Boolean mask [B, 1, G*T, L]: the token at position p attends to cache positions 0..p of its own slot.

    Returns None when every query may see all of [0, L) (one token per row, all rows at position L-1).
    """
    B, T = positions.shape
    if T == 1 and bool((positions == kv_len - 1).all()):
        return None
    allowed = torch.arange(kv_len, device=positions.device) <= positions.unsqueeze(-1)  # [B, T, L]
    return allowed.unsqueeze(1).unsqueeze(1).expand(B, 1, group, T, kv_len).reshape(B, 1, group * T, kv_len)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryTable(cfg, max_positions or cfg.max_position_embeddings)
        # The decoder stack in one native call for cached decode/verify forwards: set by quant.quantize_model when
        # the layers fit it (engine/quant.py, FusedDecoder); returns None for forwards it does not take.
        self.fused: Callable[..., torch.Tensor | None] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                kv_len: int | None = None, slot_start: int = 0) -> torch.Tensor:
        """tokens [B, T] -> normed hidden states [B, T, H].

        With a cache, row b is slot b, `positions` [B, T] gives each token's absolute position and the
        keys/values are written there; `kv_len` (host int) = 1 + the largest position in the batch.
        Rows map to slots slot_start .. slot_start+B-1.
        Without a cache, rows are independent sequences starting at position 0 (causal attention).
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.embed_tokens(tokens)
        return self.run_layers(x, positions, cache, kv_len, slot_start)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                   kv_len: int | None, slot_start: int = 0) -> torch.Tensor:
        if cache is not None and self.fused is not None:
            out = self.fused(self, x, positions, cache, slot_start)
            if out is not None:
                return self.norm(out)
        cos, sin = self.rotary(positions, x.dtype)
        mask, write_idx, L = None, None, x.shape[1]
        if cache is not None:
            L = kv_len if kv_len is not None else int(positions.max()) + 1
            rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(positions)
            write_idx = (rows, positions)
            mask = attention_mask(positions, L, self.config.num_heads // self.config.num_kv_heads)
        B, s = x.shape[0], slot_start
        for i, layer in enumerate(self.layers):
            layer_cache = (cache.k[i][s:s + B], cache.v[i][s:s + B]) if cache is not None else None
            x = layer(x, cos, sin, mask, layer_cache, write_idx, L)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head in float32: [..., H] -> [..., V]."""
        return self.lm_head(hidden).float()

    def allocate_cache(self, num_slots: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache.allocate(c.num_layers, num_slots, c.num_kv_heads, capacity, c.head_dim, self.dtype,
                                self.device)

    # ---- weights -------------------------------------------------------------------------------------------
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load Hugging Face Llama/Qwen2 names into the fused layout; every expected tensor must be present.

        assign=True takes the given tensors as the parameters instead of copying into them (a model built on the
        meta device then costs no second copy of the weights while loading)."""
        own = hf_to_fused(sd, self.config)
        missing, unexpected = self.load_state_dict(own, strict=False, assign=assign)
        missing = [m for m in missing if not (m == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing or unexpected:
            raise KeyError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        if any(getattr(m, "quantized", False) for m in self.modules()):
            raise ValueError("this model's linear weights are quantised (load_model(quantize=...)): it is for "
                             "inference only and cannot be saved as a Hugging Face checkpoint; save the "
                             "unquantised model instead")
        return fused_to_hf(self.state_dict(), self.config)


def hf_to_fused(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {"embed_tokens.weight": sd.pop("embed_tokens.weight"),
                                    "norm.weight": sd.pop("norm.weight")}
    if "lm_head.weight" in sd:
        head = sd.pop("lm_head.weight")
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = head
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{p}self_attn.{n}_proj.{kind}", None) for n in ("q", "k", "v")]
            if all(t is not None for t in parts):
                out[f"{p}attn.wqkv.{kind}"] = torch.cat(parts, dim=0)
            if (t := sd.pop(f"{p}self_attn.o_proj.{kind}", None)) is not None:
                out[f"{p}attn.wo.{kind}"] = t
            gate, up = sd.pop(f"{p}mlp.gate_proj.{kind}", None), sd.pop(f"{p}mlp.up_proj.{kind}", None)
            if gate is not None and up is not None:
                out[f"{p}mlp.w13.{kind}"] = torch.cat([gate, up], dim=0)
            if (t := sd.pop(f"{p}mlp.down_proj.{kind}", None)) is not None:
                out[f"{p}mlp.w2.{kind}"] = t
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if (t := sd.pop(f"{p}{norm}.weight", None)) is not None:
                out[f"{p}{norm}.weight"] = t
    sd = {k: v for k, v in sd.items() if "rotary_emb" not in k}
    out.update(sd)  # leftovers surface as "unexpected" in load_hf_state_dict
    return out


def fused_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ".attn.wqkv." in k:
            p, kind = k.split(".attn.wqkv.")
            for n, t in zip("qkv", v.split([q_dim, kv_dim, kv_dim], dim=0), strict=True):
                out[f"model.{p}.self_attn.{n}_proj.{kind}"] = t.contiguous()
        elif ".attn.wo." in k:
            out["model." + k.replace(".attn.wo.", ".self_attn.o_proj.")] = v
        elif ".mlp.w13." in k:
            p, kind = k.split(".mlp.w13.")
            gate, up = v.chunk(2, dim=0)
            out[f"model.{p}.mlp.gate_proj.{kind}"] = gate.contiguous()
            out[f"model.{p}.mlp.up_proj.{kind}"] = up.contiguous()
        elif ".mlp.w2." in k:
            out["model." + k.replace(".mlp.w2.", ".mlp.down_proj.")] = v
        elif k == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[k] = v
        else:
            out["model." + k] = v
    return out
