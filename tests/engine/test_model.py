"""Our Transformer against transformers' on the same weights, and the KV-cache paths against the full forward."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_tiny_hf
from understudy.engine.loader import load_model, save_model

ARCHS = [
    ("llama", {}),  # grouped-query attention (4 query heads, 2 KV heads)
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),  # tied embeddings, MHA (SmolLM2-like)
    ("qwen2", {}),  # q/k/v bias
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
]


@pytest.mark.parametrize(("arch", "over"), ARCHS, ids=["llama-gqa", "llama-tied", "qwen2-bias", "llama-bias", "llama3-rope"])
def test_logits_match_transformers(tmp_path, arch, over):
    from transformers import AutoModelForCausalLM

    folder = build_tiny_hf(tmp_path / arch, arch, **over)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    lm = load_model(str(folder), dtype="float32")
    ids = torch.randint(0, lm.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = lm.model.logits(lm.model(ids))
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_cached_decode_matches_full_forward(tiny_llama):
    """Prefill + ragged multi-token steps through the KV cache == one full forward, per row."""
    m = tiny_llama.model
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, m.config.vocab_size, (n,), generator=g) for n in (30, 17, 41)]
    cache = m.allocate_cache(4, 64)
    with torch.no_grad():
        full = [m.logits(m(s.unsqueeze(0)))[0] for s in seqs]
        prefix = [9, 5, 20]
        for b, s in enumerate(seqs):  # prefill each row into its own slot
            m(s[:prefix[b]].unsqueeze(0), torch.arange(prefix[b]).unsqueeze(0), cache, prefix[b], slot_start=b)
        done = list(prefix)
        while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
            width = 4  # every row feeds 4 tokens at its own positions (ragged), padding past the end
            toks = torch.zeros(3, width, dtype=torch.long)
            pos = torch.zeros(3, width, dtype=torch.long)
            for b, s in enumerate(seqs):
                chunk = s[done[b]:done[b] + width]
                toks[b, :len(chunk)] = chunk
                pos[b] = done[b] + torch.arange(width)
            logits = m.logits(m(toks, pos, cache, int(pos.max()) + 1))
            for b, s in enumerate(seqs):
                n = min(width, len(s) - done[b])
                if n > 0:
                    torch.testing.assert_close(logits[b, :n], full[b][done[b]:done[b] + n], atol=2e-5, rtol=1e-4)
                    done[b] += n


def test_cpu_packed_linear_matches_plain(tiny_llama):
    from understudy.engine.model import enable_cpu_packing

    m = tiny_llama.model
    ids = torch.randint(0, m.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        enable_cpu_packing(m, False)
        a = m.logits(m(ids))
        n = enable_cpu_packing(m, True)
        b = m.logits(m(ids))
    if torch.backends.mkldnn.is_available():
        assert n > 0
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_packed_weights_follow_in_place_updates(tiny_llama_dir):
    """A pre-packed copy must never go stale after an optimizer step (the RL trainer updates in place)."""
    from understudy.engine.model import enable_cpu_packing

    lm = load_model(str(tiny_llama_dir), dtype="float32")
    m = lm.model
    enable_cpu_packing(m, True)
    ids = torch.randint(0, m.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        before = m.logits(m(ids))
    with torch.no_grad():
        m.layers[0].mlp.w13.weight.mul_(1.5)
    with torch.inference_mode():
        after = m.logits(m(ids))
    enable_cpu_packing(m, False)
    with torch.inference_mode():
        plain = m.logits(m(ids))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, plain, atol=1e-4, rtol=1e-4)


def test_save_model_roundtrip(tmp_path, tiny_llama):
    out = tmp_path / "saved"
    save_model(tiny_llama.model, tiny_llama.tokenizer, out)
    again = load_model(str(out), dtype="float32")
    assert again.fingerprint == tiny_llama.fingerprint
    ids = torch.arange(3, 20).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(again.model.logits(again.model(ids)), tiny_llama.model.logits(tiny_llama.model(ids)))
    assert not list(tmp_path.glob(".saved.*")), "no temporary folders may be left behind"
