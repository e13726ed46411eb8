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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from understudy.engine.config import ModelConfig
from understudy.engine.fsutil import atomic_folder
from understudy.engine.model import DecoderLayer, KVCache, Linear, RotaryTable, Transformer, attention_mask
from understudy.errors import UnderstudyError

DRAFTER_FORMAT = "understudy-eagle-v1"


class DrafterError(UnderstudyError, RuntimeError):
    """A drafter folder is missing, corrupt, or belongs to another model family."""


@dataclass(frozen=True)
class DrafterConfig:
    target: ModelConfig  # the target's shapes (the drafter's layer copies them)
    family_fingerprint: str  # the target family it was trained for (engine.config.family_fingerprint)
    draft_vocab_size: int  # rows of the reduced draft vocabulary (== target vocab_size: full vocab)
    format: str = DRAFTER_FORMAT
    training: dict[str, Any] = field(default_factory=dict)  # metrics + resolved training config, for manifests

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = asdict(self.target)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DrafterConfig:
        return cls(target=ModelConfig(**d["target"]), family_fingerprint=d["family_fingerprint"],
                   draft_vocab_size=int(d["draft_vocab_size"]), format=d.get("format", DRAFTER_FORMAT),
                   training=d.get("training", {}))


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
        lin.pack_enabled = self.fc.pack_enabled
        self._head = [lin]  # a list, so the bound head is not registered as a submodule nor saved
        return self

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
        cos, sin = self.rotary(positions, x.dtype)
        if cache is None:
            return self.layer(x, cos, sin, None, None, None, T)
        L = kv_len if kv_len is not None else int(positions.max()) + 1
        rows = (slot_start + torch.arange(B, device=x.device)).unsqueeze(1).expand_as(positions)
        t = self.config.target
        mask = attention_mask(positions, L, t.num_heads // t.num_kv_heads)
        kv = (cache.k[0][slot_start:slot_start + B], cache.v[0][slot_start:slot_start + B])
        return self.layer(x, cos, sin, mask, kv, (rows - slot_start, positions), L)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> float32 logits over the draft vocabulary [..., Vd]."""
        assert self.head_weight is not None, "call bind(target) first"
        return self._head[0](hidden).float()

    def allocate_cache(self, num_slots: int, capacity: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        t = self.config.target
        return KVCache.allocate(1, num_slots, t.num_kv_heads, capacity, t.head_dim, dtype, device)

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("rotary.")}


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
    cfg = drafter.config
    if extra_training:
        cfg = DrafterConfig(target=cfg.target, family_fingerprint=cfg.family_fingerprint,
                            draft_vocab_size=cfg.draft_vocab_size, training={**cfg.training, **extra_training})
    with atomic_folder(Path(out)) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in drafter.own_state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": DRAFTER_FORMAT})
        (tmp / "config.json").write_text(json.dumps(cfg.to_json(), indent=2))


def read_drafter_config(folder: Path) -> DrafterConfig:
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not folder.is_dir():
        raise DrafterError(f"drafter folder {folder} does not exist; pass a folder written by "
                           "`understudy drafter train` or a registry version")
    if not cfg_file.exists():
        raise DrafterError(f"{cfg_file} is missing: {folder} is not a drafter folder")
    try:
        raw = json.loads(cfg_file.read_text())
        if raw.get("format") != DRAFTER_FORMAT:
            raise DrafterError(f"{cfg_file}: format {raw.get('format')!r} is not {DRAFTER_FORMAT!r}; "
                               "re-train or re-export the drafter with this version of Understudy")
        return DrafterConfig.from_json(raw)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DrafterError(f"{cfg_file} is malformed ({type(e).__name__}: {e}); re-train or re-publish it") from e


def load_drafter(folder: Path, target: Transformer, target_fingerprint: str) -> Drafter:
    """Load and bind a drafter; refuse one trained for another model family with a message naming both."""
    folder = Path(folder)
    cfg = read_drafter_config(folder)
    if cfg.family_fingerprint != target_fingerprint:
        raise DrafterError(
            f"drafter {folder} was trained for model family {cfg.family_fingerprint}, but the target is "
            f"{target_fingerprint} (different architecture, shapes or tokenizer). Train one for this target "
            "with `understudy drafter train --model ...`, or pick a compatible version"
        )
    weights = folder / "model.safetensors"
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


def export_vllm(src: Path, out: Path) -> dict[str, list[int]]:
    """Write vLLM's `eagle` layout: a 1-layer Llama config + fc.weight [H, 2H] + layers.0.* without
    input_layernorm; no embedding, no final norm, no lm_head (vLLM shares the target's). Returns key -> shape."""
    cfg = read_drafter_config(Path(src))
    sd = load_file(str(Path(src) / "model.safetensors"))
    t = cfg.target
    q_dim, kv_dim = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    out_sd: dict[str, torch.Tensor] = {"fc.weight": sd["fc.weight"]}
    qkv = sd["layer.attn.wqkv.weight"]
    for name, part in zip("qkv", qkv.split([q_dim, kv_dim, kv_dim]), strict=True):
        out_sd[f"layers.0.self_attn.{name}_proj.weight"] = part
    if "layer.attn.wqkv.bias" in sd:
        for name, part in zip("qkv", sd["layer.attn.wqkv.bias"].split([q_dim, kv_dim, kv_dim]), strict=True):
            out_sd[f"layers.0.self_attn.{name}_proj.bias"] = part
    out_sd["layers.0.self_attn.o_proj.weight"] = sd["layer.attn.wo.weight"]
    gate, up = sd["layer.mlp.w13.weight"].chunk(2)
    out_sd["layers.0.mlp.gate_proj.weight"] = gate
    out_sd["layers.0.mlp.up_proj.weight"] = up
    out_sd["layers.0.mlp.down_proj.weight"] = sd["layer.mlp.w2.weight"]
    out_sd["layers.0.post_attention_layernorm.weight"] = sd["layer.post_attention_layernorm.weight"]
    out_sd = {k: v.contiguous() for k, v in out_sd.items()}
    hf_cfg = {
        "architectures": ["Qwen2ForCausalLM" if t.architecture == "qwen2" else "LlamaForCausalLM"],
        "model_type": t.architecture, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": 1, "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim, "vocab_size": t.vocab_size, "rope_theta": t.rope_theta,
        "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings, "hidden_act": "silu", "attention_bias": t.qkv_bias,
        "torch_dtype": "float32", "understudy_family_fingerprint": cfg.family_fingerprint,
    }
    if t.rope_scaling:
        hf_cfg["rope_scaling"] = t.rope_scaling
    with atomic_folder(Path(out)) as tmp:
        save_file(out_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return {k: list(v.shape) for k, v in out_sd.items()}
