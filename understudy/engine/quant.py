"""Weight-only quantisation of the Transformer's linear layers: int8 per output channel, int4 in groups.

Decoding at batch 1 on a CPU is bound by reading the weights: SmolLM2-135M streams 538 MB of float32 linear
weights per token. Stored as int8 (135 MB) or int4 groups (~84 MB with scales), that traffic shrinks; activations
stay in float32, only the weights are rounded. Kernels: understudy.engine.qkernels (our AVX2 code, chosen by
measurement over torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`, which are slower than float32 on
AVX2 CPUs: benchmarks/linear_kernels.py, docs/performance.md); torch's ops are the fallback where ours cannot build.

Modes (MODE_FORMATS): "int8" = every decoder linear and the LM head int8 per output channel; "int4" = decoder
linears in 4-bit groups of 32 (asymmetric: code * scale + minimum, float16 scale and minimum) and the LM head in
symmetric int8 groups of 32 (a 4-bit head alone costs ~10% top-1 agreement on SmolLM2).

`quantize_model` swaps every `Linear` of the decoder layers and the LM head for a quantised module in place, so the
engine, verification and speculation run unchanged on top: the quantised model *is* the target, and speculative
decoding stays lossless with respect to it. The token embedding stays float32 (a lookup reads one row per token).
A quantised model is for inference only: it has no trainable linear weights, and `Transformer.hf_state_dict`
refuses it.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from understudy.engine import qkernels
from understudy.engine.config import ConfigError
from understudy.engine.model import KVCache, Linear, RMSNorm, Transformer

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32  # measured: as fast as 64 at these shapes, more accurate, and GGUF Q4_1/Q8_0's own group
INT4_GROUP_SIZES = (32, 64, 128, 256)  # group sizes offered (what torch's int4 CPU op accepts too)


def check_mode(quantize: str, field: str = "quantize") -> str:
    if quantize not in QUANT_MODES:
        raise ConfigError(f"{field} must be one of {', '.join(QUANT_MODES)}, got {quantize!r}: pass "
                          f"{field}='int8' (4x less weight traffic) or 'int4', or 'none' for full precision")
    return quantize


# ---- quantisers (pure functions of a float weight) --------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q int8 [N, K], scales float32 [N]) with W ~ q * scales[:, None], symmetric in [-127, 127]."""
    wf = w.detach().float()
    scales = (wf.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(wf / scales.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float().unsqueeze(1)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] -> (codes uint8 [N, K] in 0..15, scale float16 [N, K/group], minimum float16 [N, K/group]) with
    W ~ codes * scale + minimum: asymmetric min/max over each group of `group` consecutive input channels.

    Scale and minimum are rounded to float16 first and the codes computed against the rounded values (what the
    kernels use). On weights that came from a GGUF Q4_1 file with the same groups (SmolLM2's layers) this recovers
    the file's own codes, scales and minima, i.e. it is lossless up to float32 rounding."""
    N, K = w.shape
    _check_group(group, K)
    wg = w.detach().float().reshape(N, K // group, group)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp_min(1e-6).to(torch.float16)  # float16 range: |W| < 65504, scales >= 6e-8
    minimum = lo.to(torch.float16)
    if not (torch.isfinite(scale).all() and torch.isfinite(minimum).all()):
        raise ConfigError("int4: a weight group is out of float16 range (|w| > 65504); use quantize='int8'")
    codes = torch.round((wg - minimum.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp_(0, 15)
    return codes.to(torch.uint8).reshape(N, K), scale, minimum


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    N, K = codes.shape
    g = K // scale.shape[1]
    w = codes.reshape(N, -1, g).float() * scale.float().unsqueeze(-1) + minimum.float().unsqueeze(-1)
    return w.reshape(N, K)


def quantize_int8_groups(w: torch.Tensor, group: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] -> (codes int8 [N, K] in -127..127, scale float16 [N, K/group], minimum float16 zeros) with
    W ~ codes * scale: symmetric int8 per group, in the code/scale/minimum form of int4 so that one kernel serves
    both. On weights from a GGUF Q8_0 tensor with the same groups (SmolLM2's tied embedding / LM head) it recovers
    the file's codes and scales exactly."""
    N, K = w.shape
    _check_group(group, K)
    wg = w.detach().float().reshape(N, K // group, group)
    scale = (wg.abs().amax(dim=-1) / 127.0).clamp_min(1e-6).to(torch.float16)
    if not torch.isfinite(scale).all():
        raise ConfigError("int8: a weight group is out of float16 range (|w| > 65504); use quantize='none'")
    q = torch.round(wg / scale.float().unsqueeze(-1)).clamp_(-127, 127)
    return q.to(torch.int8).reshape(N, K), scale, torch.zeros_like(scale)


def _check_group(group: int, K: int) -> None:
    if group not in INT4_GROUP_SIZES or K % group:
        raise ConfigError(f"group size must be one of {INT4_GROUP_SIZES} and divide the input width {K}, "
                          f"got {group}; use a group size that divides {K}")


def torch_int4_pack(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The same int4 weights in the layout of torch's `_weight_int4pack_mm_for_cpu`: W = (q - 8) * s + z, with the
    output channels zero-padded to a multiple of 16 (the kernel's requirement; callers slice the output)."""
    pad = -codes.shape[0] % 16
    codes, scale, minimum = (F.pad(t, (0, 0, 0, pad)) for t in (codes.to(torch.int32), scale.float(), minimum.float()))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    s, z = scale, minimum + 8.0 * scale
    return packed, torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [K/group, N, 2]


# ---- modules -------------------------------------------------------------------------------------------------
_warned: set[str] = set()


def _native(act_dtype: torch.dtype, device: torch.device) -> ctypes.CDLL | None:
    """Our AVX2 kernels when they apply (float32 activations on the CPU and a working build), else None."""
    if act_dtype != torch.float32 or device.type != "cpu":
        return None
    lib = qkernels.load()
    if lib is None and (why := qkernels.unavailable_reason()) not in _warned:
        _warned.add(why)  # torch's fallback ops are slower than float32 on AVX2 CPUs: say so once, loudly
        log.warning("weight-only quantisation without the native kernels (%s): torch's int8/int4 ops are used, "
                    "which on AVX2-only CPUs are slower than float32 (docs/performance.md)", why)
    return lib


class QuantizedLinear(nn.Module):
    """A frozen linear layer with quantised weights; `weight` dequantises (what the layer computes with).

    `backend` is "native" (understudy.engine.qkernels) or "torch" (torch's own ops); either computes in
    `act_dtype` (float32 for native) and returns the input's dtype. The stored formats are fixed: dtype casts of
    the model (`.to(torch.bfloat16)`, `.float()`) leave them alone, and moving off the CPU is refused."""

    quantized = True  # marker read by Transformer.hf_state_dict (model.py cannot import this module)
    in_features: int
    out_features: int
    backend: str
    act_dtype: torch.dtype
    bias: torch.Tensor | None

    def _setup(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype) -> None:
        self.out_features, self.in_features = weight.shape
        self._lib = _native(act_dtype, weight.device)
        self.backend = "native" if self._lib is not None else "torch"
        self.act_dtype = torch.float32 if self._lib is not None else act_dtype
        if bias is None:
            self.bias = None
        else:
            self.register_buffer("bias", bias.detach().to(self.act_dtype).contiguous().clone())

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        for t in self._buffers.values():  # probe with an empty slice: no copy of the weights
            if t is not None and fn(t[:0] if t.dim() else t).device != t.device:
                raise ConfigError("a quantised model runs on the CPU only and cannot be moved; load it with "
                                  "device='cpu', or load with quantize='none' to use another device")
        return self

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> a contiguous [M, K] in act_dtype on the CPU."""
        if not x.is_cpu:
            raise ConfigError("quantised layers run on the CPU only; keep the inputs on the CPU")
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.act_dtype:
            x2 = x2.to(self.act_dtype)
        return x2 if x2.is_contiguous() else x2.contiguous()

    def _bias_ptr(self) -> int | None:
        return self.bias.data_ptr() if self.bias is not None else None

    @property
    def weight(self) -> torch.Tensor:  # [N, K] float32, for callers that bind to the head (the drafter)
        with torch.inference_mode(False), torch.no_grad():
            return self.dequantize()

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def _encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored buffers for a float weight [N, K]."""
        raise NotImplementedError

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Quantise a new float weight (and bias) into the existing buffers, in place: their storage stays, so
        anything holding their pointers (the fused decoder) stays valid. Used by quantised RL rollouts after each
        policy update."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ConfigError(f"requantize: weight of shape {tuple(weight.shape)}, this layer is "
                              f"[{self.out_features}, {self.in_features}]")
        if (bias is None) != (self.bias is None):
            raise ConfigError("requantize: the new weights must have a bias exactly where this layer has one")
        for name, t in self._encode(weight.detach().float()).items():
            getattr(self, name).copy_(t)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.detach())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend}")


class Int8Linear(QuantizedLinear):
    """y = x W^T + b with W stored int8, one float32 scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype) -> None:
        super().__init__()
        self._setup(weight, bias, act_dtype)
        for name, t in self._encode(weight).items():
            self.register_buffer(name, t)

    def _encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scales = quantize_int8(weight)
        if self._lib is not None:
            return {"qweight": qkernels.pack_int8(q), "scales": qkernels.pad_vector(scales)}  # [NS, K, 32], [NS*32]
        return {"qweight": q, "scales": scales.to(self.act_dtype)}  # [N, K], [N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x2 = x.shape[:-1], self._input(x)
        if self._lib is None:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = torch.empty(x2.shape[0], self.out_features)
            self._lib.wq_int8_linear(x2.data_ptr(), x2.shape[0], self.in_features, self.in_features,
                                     self.qweight.data_ptr(), self.scales.data_ptr(), self._bias_ptr(), y.data_ptr(),
                                     self.out_features, qkernels.get_threads())
        return y.view(*lead, self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        N = self.out_features
        q = self.qweight if self._lib is None else qkernels.unpack(self.qweight, N)
        return dequantize_int8(q, self.scales[:N])


class GroupedLinear(QuantizedLinear):
    """y = x W^T + b with W stored as `bits`-bit codes (4: asymmetric min/max, 8: symmetric) and a float16
    (scale, minimum) per group of `group` input channels: W = code * scale + minimum.

    Without the native kernels, 4-bit layers use torch's int4 op and 8-bit ones keep the dequantised float weight
    (the same numbers, without the bandwidth saving: torch has no grouped int8 op)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype, bits: int = 4,
                 group: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ConfigError(f"grouped quantisation has 4 or 8 bits, got {bits}")
        self._setup(weight, bias, act_dtype)
        self.bits, self.group = bits, group
        for name, t in self._encode(weight).items():
            self.register_buffer(name, t)

    def _encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        codes, scale, minimum = (quantize_int4 if self.bits == 4 else quantize_int8_groups)(weight, self.group)
        if self._lib is not None:
            pack = qkernels.pack_int4 if self.bits == 4 else qkernels.pack_codes8
            return {"qweight": pack(codes),  # [NS, K*bits/8, 32]
                    "scale": qkernels.pack_groups(scale),  # [NS, K/group, 32] float16
                    "minimum": qkernels.pack_groups(minimum)}
        if self.bits == 4:
            packed, scale_zeros = torch_int4_pack(codes, scale, minimum, self.act_dtype)
            return {"qweight": packed, "scale_zeros": scale_zeros}
        return {"dequantized": dequantize_int4(codes, scale, minimum).to(self.act_dtype)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x2 = x.shape[:-1], self._input(x)
        if self._lib is None:
            if self.bits == 8:
                y = F.linear(x2, self.dequantized, self.bias)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group,
                                                                self.scale_zeros)[:, :self.out_features]
                if self.bias is not None:
                    y = y + self.bias
        else:
            y = torch.empty(x2.shape[0], self.out_features)
            self._lib.wq_grouped_linear(x2.data_ptr(), x2.shape[0], self.in_features, self.in_features,
                                        self.qweight.data_ptr(), self.scale.data_ptr(), self.minimum.data_ptr(),
                                        self.group, self.bits, self._bias_ptr(), y.data_ptr(), self.out_features,
                                        qkernels.get_threads())
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        N, K = self.out_features, self.in_features
        if self._lib is None:
            if self.bits == 8:
                return self.dequantized.float()
            # the kernel's own answer on the identity recovers W as it computes with it
            eye = torch.eye(K, dtype=self.scale_zeros.dtype)
            w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group, self.scale_zeros)
            return w.T[:N].float()
        codes = (qkernels.unpack_int4 if self.bits == 4 else qkernels.unpack)(self.qweight, N)
        return dequantize_int4(codes, qkernels.unpack(self.scale, N), qkernels.unpack(self.minimum, N))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, group={self.group}"


# Per-layer formats: "int8" = int8 per output channel; "int4" = 4-bit groups; "int8g" = symmetric int8 groups.
LAYER_FORMATS = ("int8", "int4", "int8g")
# What each --quantize mode stores: (decoder layers, LM head). The head is never 4-bit: on SmolLM2 a 4-bit head
# alone moves top-1 agreement with float32 to ~90% (measured, benchmarks/quant_accuracy.py), while int4 layers
# are exact there (the GGUF file is Q4_1 with the same groups). Grouped int8 recovers the file's Q8_0 head.
MODE_FORMATS: dict[str, tuple[str, str]] = {"int8": ("int8", "int8"), "int4": ("int4", "int8g")}


def quantize_linear(lin: nn.Module, fmt: str, group: int = INT4_GROUP_SIZE) -> QuantizedLinear:
    """A quantised copy of a Linear in format `fmt` (LAYER_FORMATS)."""
    act = lin.weight.dtype
    if fmt == "int8":
        return Int8Linear(lin.weight, lin.bias, act)
    if fmt in ("int4", "int8g"):
        return GroupedLinear(lin.weight, lin.bias, act, bits=4 if fmt == "int4" else 8, group=group)
    raise ConfigError(f"unknown layer format {fmt!r}; use one of {', '.join(LAYER_FORMATS)}")


@torch.no_grad()
def quantize_model(model: Transformer, quantize: str, group: int = INT4_GROUP_SIZE,
                   layers: str | None = None, head: str | None = None) -> int:
    """Replace every `Linear` in the decoder layers and the LM head by a quantised module, in place.

    `quantize` picks the formats of MODE_FORMATS; `layers` / `head` override them ("none" keeps float).
    Returns how many modules were replaced. The model must be on the CPU (the kernels are CPU ops)."""
    check_mode(quantize)
    fmt_layers, fmt_head = MODE_FORMATS.get(quantize, ("none", "none"))
    fmt_layers, fmt_head = layers or fmt_layers, head or fmt_head
    for name, fmt in (("layers", fmt_layers), ("head", fmt_head)):
        if fmt != "none" and fmt not in LAYER_FORMATS:
            raise ConfigError(f"{name} format must be none or one of {', '.join(LAYER_FORMATS)}, got {fmt!r}")
    if fmt_layers == "none" and fmt_head == "none":
        return 0
    if model.device.type != "cpu":
        raise ConfigError(f"quantize={quantize!r} runs on the CPU only; load the model with device='cpu'")
    targets: list[tuple[nn.Module, str, nn.Module, str]] = []
    if fmt_layers != "none":
        for parent in model.layers.modules():
            for name, child in parent.named_children():
                if isinstance(child, Linear):
                    targets.append((parent, name, child, fmt_layers))
    if fmt_head != "none" and isinstance(model.lm_head, Linear):
        targets.append((model, "lm_head", model.lm_head, fmt_head))
    for parent, name, child, fmt in targets:
        setattr(parent, name, quantize_linear(child, fmt, group))
    model.fused = FusedDecoder.for_model(model)
    return len(targets)


def quantized_copy(model: Transformer, quantize: str) -> Transformer:
    """A quantised copy of a float CPU model (the float model is untouched): what quantised RL rollouts decode with.
    Refresh it after the float model changes with load_float_weights(copy, model.state_dict())."""
    check_mode(quantize)
    twin = Transformer(model.config, max_positions=model.rotary.cos.shape[0]).to(model.dtype)
    twin.load_state_dict(model.state_dict())
    twin.requires_grad_(False)
    quantize_model(twin, quantize)
    return twin


@torch.no_grad()
def load_float_weights(qmodel: Transformer, state: dict[str, torch.Tensor]) -> None:
    """Load a float state dict (a float model's names and shapes) into a model, in place: quantised layers
    re-quantise their new weights into their existing buffers, everything else is copied (for a float model, this
    is a strict load_state_dict)."""
    quantised = {name: m for name, m in qmodel.named_modules() if isinstance(m, QuantizedLinear)}
    for name, m in quantised.items():
        if f"{name}.weight" not in state:
            raise ConfigError(f"load_float_weights: the state dict has no {name}.weight for quantised layer {name}")
        m.requantize_(state[f"{name}.weight"], state.get(f"{name}.bias"))
    rest = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in quantised}
    missing, unexpected = qmodel.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in quantised]
    if missing or unexpected:
        raise ConfigError(f"load_float_weights: state dict does not match the model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")


# ---- the decoder stack in one native call ------------------------------------------------------------------------
FUSED_MAX_TOKENS = 32  # tokens per row the fused path takes (decode steps, verification); longer prefills go op by op
MAX_FUSED_TABLES = 16  # pointer tables kept per model (one per engine cache in use)
_LAYER_FIELDS = 36  # wq_decoder_forward's table: norm1, norm2, 4 linears x 8 fields, k cache, v cache


def _float_linear(m: nn.Module) -> bool:
    """A float32 CPU Linear whose [N, K] weight the native kernel can read in place."""
    w = getattr(m, "weight", None)
    return isinstance(m, nn.Linear) and isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.is_cpu and \
        w.is_contiguous() and m.in_features % 8 == 0


class FusedDecoder:
    """Runs every decoder layer of a CPU model in one call of the native kernels (`wq_decoder_forward`): RMSNorm,
    the four matmuls (quantised, or float32 weights read in place), RoPE, the KV-cache writes, attention, SiLU-gate
    and residuals, row by row.

    Why: after quantisation about half of a batch-1 step was the ~41 small torch ops per layer around the matmuls
    (docs/performance.md); in float32, oneDNN's matmul costs 1.4x more at width 5 than at width 1 where the weights
    are read once either way (the float32 section there). Each row is computed alone in a fixed order, so its result is bitwise the same in a
    width-1 step and in a width-(k+1) verification, at any batch size: speculation stays exactly lossless.
    Taken for cached forwards of up to FUSED_MAX_TOKENS tokens per row with grad off; everything else (long
    prefills, training) runs op by op. The model is passed in on every call (a weak reference says which one the
    weight pointers came from). Pointer tables exist per KV cache, so engines in several threads may share one
    model; every call checks that the weights it points at are still the model's (identity of each tensor in its
    module, ~10 us) and looks its cache up by the cache's pointers."""

    def __init__(self) -> None:
        self.model: weakref.ref[Transformer] | None = None  # the model the weight pointers were read from
        # (module's parameter/buffer dict, name, tensor) for every weight pointer: replaced if one is no longer there
        self.weight_refs: list[tuple[dict[str, Any], str, torch.Tensor]] = []
        self.weight_rows: list[list[int]] = []  # per layer: the table's 34 weight fields
        # pointer tables [L, 36] (weights and cache), one per cache: engines in threads share a model, each with its
        # own cache, and must never see each other's table
        self.tables: dict[tuple[int, ...], torch.Tensor] = {}
        self.float_weights = False  # made by for_float_model (an engine's choice, which another engine may undo)

    @classmethod
    def for_model(cls, model: Transformer) -> FusedDecoder | None:
        """A fused decoder for `model`, or None where its layers do not fit the kernel (torch-backend quantised
        linears, another norm, shapes the kernel does not tile, not float32)."""
        return cls() if cls._fits(model) else None

    @classmethod
    def for_float_model(cls, model: Transformer) -> FusedDecoder | None:
        """The same for a model with float32 linears (none quantised): what an engine on the CPU
        decodes with (Engine._bind_model)."""
        if any(isinstance(m, QuantizedLinear) for m in model.layers.modules()) or not cls._fits(model):
            return None
        fused = cls()
        fused.float_weights = True
        return fused

    @staticmethod
    def _fits(model: Transformer) -> bool:
        c = model.config
        if model.dtype != torch.float32 or qkernels.load() is None:
            return False
        if c.head_dim % 16 or c.hidden_size % 8 or c.intermediate_size % 8 or c.num_heads % c.num_kv_heads:
            return False
        for layer in model.layers:
            linears = (layer.attn.wqkv, layer.attn.wo, layer.mlp.w13, layer.mlp.w2)
            if not all((isinstance(m, QuantizedLinear) and m.backend == "native") or _float_linear(m)
                       for m in linears):
                return False
            norms = (layer.post_attention_layernorm,) if isinstance(layer.input_layernorm, nn.Identity) else \
                (layer.input_layernorm, layer.post_attention_layernorm)  # a drafter's layer has no input norm
            if not all(isinstance(n, RMSNorm) and n.weight.dtype == torch.float32 for n in norms):
                return False
        return True

    @staticmethod
    def _layer_fields(layer: nn.Module, refs: list[tuple[dict[str, Any], str, torch.Tensor]]) -> list[int]:
        """The table's weight fields of one layer; every tensor read is recorded in `refs`."""

        def ptr(module: nn.Module, name: str) -> int:
            store = module._parameters if name in module._parameters else module._buffers
            t = store.get(name)
            if t is None:  # no bias
                return 0
            refs.append((store, name, t))
            return t.data_ptr()

        row = [ptr(layer.input_layernorm, "weight"), ptr(layer.post_attention_layernorm, "weight")]
        for m in (layer.attn.wqkv, layer.attn.wo, layer.mlp.w13, layer.mlp.w2):
            if isinstance(m, Int8Linear):
                row += [0, 8, 0, m.out_features, ptr(m, "qweight"), ptr(m, "scales"), 0, ptr(m, "bias")]
            elif not isinstance(m, QuantizedLinear):  # float32 [N, K], read in place
                row += [2, 32, 0, m.out_features, ptr(m, "weight"), 0, 0, ptr(m, "bias")]
            else:
                row += [1, m.bits, m.group, m.out_features, ptr(m, "qweight"), ptr(m, "scale"), ptr(m, "minimum"),
                        ptr(m, "bias")]
        return row

    def _table(self, model: Transformer, cache: KVCache) -> torch.Tensor | None:
        """The table pointing at the model's weights and the cache's tensors, either of which may be replaced (the
        loader copies the norms out of the file's memory map after quantising; an engine may allocate a new cache).
        None if the cache is not contiguous."""
        if self.model is None or self.model() is not model or \
                not all(store.get(name) is t for store, name, t in self.weight_refs):
            refs: list[tuple[dict[str, Any], str, torch.Tensor]] = []
            self.weight_rows = [self._layer_fields(layer, refs) for layer in model.layers]
            self.weight_refs, self.model = refs, weakref.ref(model)
            self.tables = {}  # tables of the old weights (replaced, not cleared: another thread may read it)
        k_ptrs, v_ptrs = [t.data_ptr() for t in cache.k], [t.data_ptr() for t in cache.v]
        key = (*k_ptrs, *v_ptrs)
        table = self.tables.get(key)
        if table is None:
            if not all(t.is_contiguous() for t in (*cache.k, *cache.v)):
                return None
            if len(self.tables) >= MAX_FUSED_TABLES:  # stale caches (freed, reallocated)
                self.tables = {}
            table = self.tables[key] = torch.tensor([[*w, k, v] for w, k, v in zip(self.weight_rows, k_ptrs, v_ptrs,
                                                                                   strict=True)], dtype=torch.int64)
        return table

    def __call__(self, model: Transformer, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 slot_start: int) -> torch.Tensor | None:
        """x [B, T, H] -> the residual stream after the last layer (before the final norm), or None if this
        forward is not one the fused path takes."""
        B, T, H = x.shape
        if T > FUSED_MAX_TOKENS or torch.is_grad_enabled() or x.dtype != torch.float32 or \
                cache.k[0].dtype != torch.float32 or not x.is_cpu:
            return None
        lib = qkernels.load()
        if lib is None:
            return None
        table = self._table(model, cache)  # held here for the call: another thread may clear the dict
        if table is None:
            return None
        c = model.config
        out = x.reshape(B * T, H).clone()
        pos = positions.to(torch.int64).contiguous()
        S, _, C, _ = cache.k[0].shape
        cos, sin = model.rotary.cos, model.rotary.sin
        rc = lib.wq_decoder_forward(out.data_ptr(), B, T, pos.data_ptr(), len(model.layers), H, c.num_heads,
                                    c.num_kv_heads, c.head_dim, c.intermediate_size, c.rms_norm_eps, cos.data_ptr(),
                                    sin.data_ptr(), cos.shape[0], table.data_ptr(), slot_start, S, C,
                                    qkernels.get_threads())
        if rc == -1:
            raise ValueError(f"position {int(pos.max())} (slots {slot_start}..{slot_start + B - 1}) is outside the "
                             f"rotary table ({cos.shape[0]}), the KV cache ({C} positions) or its {S} slots")
        if rc != 0:
            raise RuntimeError(f"wq_decoder_forward failed ({rc}) on a model it accepted; please report this")
        return out.view(B, T, H)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of linear weights (+ scales, biases) a forward reads per step: decoder layers and LM head (the
    embedding is a lookup of one row per token)."""
    layers, head = 0, 0
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            n = sum(t.numel() * t.element_size() for t in m.buffers(recurse=False))
        elif isinstance(m, nn.Linear):
            n = sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
        else:
            continue
        if name == "lm_head":
            head += n
        else:
            layers += n
    return {"layers": layers, "head": head, "total": layers + head}
