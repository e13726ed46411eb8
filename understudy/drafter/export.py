"""Export a drafter to vLLM's `eagle` layout (what `--speculative-config '{"method": "eagle", ...}'` loads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from understudy.drafter.format import WEIGHTS_FILE, read_drafter_config
from understudy.fsutil import atomic_folder


def export_vllm(src: Path, out: Path) -> dict[str, list[int]]:
    """Write vLLM's `eagle` layout: a 1-layer Llama config + fc.weight [H, 2H] + layers.0.* without
    input_layernorm; no embedding, no final norm, no lm_head (vLLM shares the target's). Returns key -> shape."""
    cfg = read_drafter_config(Path(src))
    sd = load_file(str(Path(src) / WEIGHTS_FILE))
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
    # vLLM's eagle layout: one layer of the target's shape; attention_bias says whether q/k/v carry biases
    hf_cfg = {**t.to_hf("float32"), "num_hidden_layers": 1, "attention_bias": t.qkv_bias,
              "understudy_family_fingerprint": cfg.family_fingerprint}
    with atomic_folder(Path(out)) as tmp:
        save_file(out_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return {k: list(v.shape) for k, v in out_sd.items()}
