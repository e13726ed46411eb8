"""The EAGLE-style drafter head (Li et al. 2024, arXiv 2401.15077), as TLT trains it.

One decoder layer of the target's shape. Input at position i: fc(concat(embed(x_{i+1}), h_i)), fc: 2H -> H,
where h_i is the target's final (normed) hidden state at i; the output approximates h_{i+1}, and the target's
own LM head turns it into draft logits. The embedding and LM head are the target's, reused frozen and never
stored in drafter checkpoints. The first (only) layer has no input RMSNorm and there is no final norm (EAGLE-1;
vLLM's `eagle` layout).

Drafting is made cheap with a reduced draft vocabulary (EAGLE-3 style): the LM head is evaluated only on the
`draft_vocab` rows (the most frequent tokens of the training data). This adds no parameters (the rows are the
target's), and losslessness does not depend on it: the rejection sampler sees q = 0 outside it.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from understudy.drafter.format import (
    CONFIG_FILE,
    DRAFTER_FORMAT,
    WEIGHTS_FILE,
    DrafterConfig,
    DrafterError,
    check_family,
    read_drafter_config,
)
from understudy.engine.model import (
    DecoderLayer,
    KVCache,
    Linear,
    RotaryTable,
    Transformer,
    attention_mask,
    enable_cpu_packing,
    set_native_linears,
)
from understudy.engine.quant import FusedDecoder
from understudy.fsutil import atomic_folder

__all__ = ["Drafter", "DrafterConfig", "DrafterError", "load_drafter", "new_drafter", "save_drafter"]

class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig, max_positions: int | None = None) -> None:
        super().__init__()
        t = config.target
        self.config = config
        self.fc = Linear(2 * t.hidden_size, t.hidden_size, bias=False)
        self.layer = DecoderLayer(t, input_norm=False)
        self.rotary = RotaryTable(t, max_positions or t.max_position_embeddings)
        self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size, dtype=torch.long))  # [Vd]
        # Bound (frozen, not owned, never saved) from the target by bind():
        self.embed_weight: torch.Tensor | None = None  # [V, H]
        self.head_weight: torch.Tensor | None = None  # [Vd, H]: LM-head rows of the draft vocabulary
        self._head: list[Linear] = []
        # (view, decoder): the layer run by the native fused decoder, set by attach() for a one-thread CPU engine
        self._fused: list[tuple[_OneLayer, FusedDecoder]] = []

    # ---- binding to the target ---------------------------------------------------------------------------
    def bind(self, target: Transformer) -> Drafter:
        """Reuse the target's embedding and LM head (call again after the target's weights change)."""
        if target.config.family_shape() != self.config.target.family_shape():
            raise DrafterError("drafter shapes do not match the target model; train a drafter for this target")
        self.embed_weight = target.embed_tokens.weight.detach()
        head = target.lm_head.weight.detach()
        # Engines apply swaps inside step() (inference mode): a head made there would be an inference tensor,
        # which cannot be used by autograd later nor report the version the pre-packed Linear keys on.
        with torch.inference_mode(False):
            vocab = self.draft_vocab.to(head.device)
            full = vocab.numel() == head.shape[0] and bool((vocab == torch.arange(head.shape[0], device=head.device)).all())
            self.head_weight = head if full else head.index_select(0, vocab).contiguous()
        lin = Linear(self.head_weight.shape[1], self.head_weight.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(self.head_weight, requires_grad=False)
        lin.pack_enabled, lin.native_rows = self.fc.pack_enabled, self.fc.native_rows
        self._head = [lin]  # a list, so the bound head is not registered as a submodule nor saved
        return self

    def attach(self, target: Transformer, capacity: int) -> Drafter:
        """Ready to draft for `target` in an engine with `capacity` positions: rotary table long enough,
        pre-packed CPU weights, and bound to the target's embedding and head (again after a policy update)."""
        if self.rotary.cos.shape[0] < capacity:
            self.rotary = RotaryTable(self.config.target, capacity).to(target.device)
        enable_cpu_packing(self)
        native = getattr(target.lm_head, "native_rows", 0)  # as Engine._bind_model set the target
        set_native_linears(self, native)
        self._fused = []
        if native:  # the layer in one native call too (a draft step was ~41 small torch ops)
            view = _OneLayer(self)
            fused = FusedDecoder.for_float_model(view)  # type: ignore[arg-type]
            if fused is not None:
                self._fused = [(view, fused)]
        return self.bind(target)

    @property
    def full_vocab(self) -> bool:
        return self.config.draft_vocab_size == self.config.target.vocab_size

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        assert token_ids.numel() == self.config.draft_vocab_size
        self.draft_vocab.copy_(token_ids.to(self.draft_vocab.device))

    # ---- compute -----------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, kv_len: int | None = None, slot_start: int = 0) -> torch.Tensor:
        """tokens [B, T] (x_{i+1}), features [B, T, H] (h_i) -> predicted next features [B, T, H]."""
        assert self.embed_weight is not None, "call bind(target) first"
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        emb = nn.functional.embedding(tokens, self.embed_weight).to(features.dtype)
        x = self.fc(torch.cat([emb, features], dim=-1))
        if cache is not None:
            out = self._forward_fused(x, positions, cache, slot_start)
            if out is not None:
                return out
        cos, sin = self.rotary(positions, x.dtype)
        if cache is None:
            return self.layer(x, cos, sin, None, None, None, T)
        L = kv_len if kv_len is not None else int(positions.max()) + 1
        rows = (slot_start + torch.arange(B, device=x.device)).unsqueeze(1).expand_as(positions)
        t = self.config.target
        mask = attention_mask(positions, L, t.num_heads // t.num_kv_heads)
        kv = (cache.k[0][slot_start:slot_start + B], cache.v[0][slot_start:slot_start + B])
        return self.layer(x, cos, sin, mask, kv, (rows - slot_start, positions), L)

    def _forward_fused(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                       slot_start: int) -> torch.Tensor | None:
        if not self._fused:
            return None
        view, fused = self._fused[0]
        return fused(view, x, positions, cache, slot_start)  # type: ignore[arg-type]

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> float32 logits over the draft vocabulary [..., Vd]."""
        assert self.head_weight is not None, "call bind(target) first"
        return self._head[0](hidden).float()

    def allocate_cache(self, num_slots: int, capacity: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        t = self.config.target
        return KVCache.allocate(1, num_slots, t.num_kv_heads, capacity, t.head_dim, dtype, device)

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("rotary.")}


class _OneLayer:
    """What FusedDecoder reads of a model, for a drafter's one decoder layer (no input norm: its input is the fc
    of normed features) and its rotary table, which attach() may replace."""

    def __init__(self, drafter: Drafter) -> None:
        self._drafter = weakref.ref(drafter)
        self.config = drafter.config.target
        self.layers = nn.ModuleList([drafter.layer])

    @property
    def rotary(self) -> RotaryTable:
        d = self._drafter()
        assert d is not None
        return d.rotary

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].attn.wqkv.weight.dtype


# ---- persistence ---------------------------------------------------------------------------------------------
def new_drafter(target: Transformer, fingerprint: str, draft_vocab: torch.Tensor | None = None,
                seed: int = 0) -> Drafter:
    """A freshly initialised drafter for `target`: linear weights ~ N(0, 0.02) (HF's Llama init), RMSNorm weights 1,
    and fc = [0 | I] + noise, so the untrained drafter starts as "the next feature is the current one".

    (Starting the layer from the target's last layer looks like a prior but is not: that layer expects the
    residual stream, while the drafter sees final-normed features with ~10x larger values; measured on SmolLM2
    it made the initial SmoothL1 loss ~5e4 and training diverged.)"""
    t = target.config
    vd = t.vocab_size if draft_vocab is None else int(draft_vocab.numel())
    d = Drafter(DrafterConfig(target=t, family_fingerprint=fingerprint, draft_vocab_size=vd))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in d.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.02, generator=g)
                if m.bias is not None:
                    m.bias.zero_()
        d.fc.weight[:, t.hidden_size:] += torch.eye(t.hidden_size)
    if draft_vocab is not None:
        d.set_draft_vocab(draft_vocab)
    return d.to(dtype=target.dtype, device=target.device).bind(target)


def save_drafter(drafter: Drafter, out: Path, extra_training: dict[str, Any] | None = None) -> None:
    """Write config.json + model.safetensors into `out` atomically (temp folder, fsync, rename)."""
    cfg = drafter.config.with_training(extra_training) if extra_training else drafter.config
    with atomic_folder(Path(out)) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in drafter.own_state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": DRAFTER_FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_json(), indent=2))


def load_drafter(folder: Path, target: Transformer, target_fingerprint: str) -> Drafter:
    """Load and bind a drafter; refuse one trained for another model family with a message naming both."""
    folder = Path(folder)
    cfg = read_drafter_config(folder)
    check_family(cfg.family_fingerprint, target_fingerprint, f"drafter {folder}")
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        raise DrafterError(f"{weights} is missing; the drafter folder is incomplete")
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise DrafterError(f"{weights} is corrupt or truncated ({e}); re-publish or re-train the drafter") from e
    d = Drafter(cfg, max_positions=target.rotary.cos.shape[0])
    missing, unexpected = d.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.startswith("rotary.")]
    if missing or unexpected:
        raise DrafterError(f"{weights} does not match its config.json: missing {missing[:4]}, unexpected {unexpected[:4]}")
    d = d.to(dtype=target.dtype, device=target.device)
    d.rotary.to(dtype=torch.float32)
    return d.bind(target)
