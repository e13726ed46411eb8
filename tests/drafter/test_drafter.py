"""Drafter checkpoints: round trip, family check, corruption, vLLM export, and train/inference consistency."""

from __future__ import annotations

import json

import pytest
import torch

from understudy.drafter.export import export_vllm
from understudy.drafter.model import DrafterError, load_drafter, new_drafter, save_drafter
from understudy.drafter.train import (
    DrafterTrainConfig,
    DrafterTrainer,
    Sample,
    collate,
    eagle_loss,
    scored_anchors,
    select_draft_vocab,
    target_features,
    unrolled_forward,
)
from understudy.engine.config import EngineConfig
from understudy.engine.drafter_proposer import DrafterProposer
from understudy.engine.engine import Engine
from understudy.engine.proposer import BatchState
from understudy.engine.sampling import SamplingParams


def test_roundtrip_and_family_check(tmp_path, tiny_llama):
    lm = tiny_llama
    vocab = torch.arange(0, lm.config.vocab_size, 2)
    d = new_drafter(lm.model, lm.fingerprint, vocab, seed=1)
    save_drafter(d, tmp_path / "d")
    again = load_drafter(tmp_path / "d", lm.model, lm.fingerprint)
    assert torch.equal(again.draft_vocab, vocab)
    x = torch.randint(0, lm.config.vocab_size, (1, 5))
    f = torch.randn(1, 5, lm.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(again(x, f), d(x, f))
    with pytest.raises(DrafterError) as e:
        load_drafter(tmp_path / "d", lm.model, "fam-0000000000000000")
    msg = str(e.value)
    assert str(tmp_path / "d") in msg and lm.fingerprint in msg and "fam-0000000000000000" in msg


def test_corrupt_or_missing_drafter_files_name_the_file(tmp_path, tiny_llama):
    lm = tiny_llama
    save_drafter(new_drafter(lm.model, lm.fingerprint), tmp_path / "d")
    weights = tmp_path / "d" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DrafterError, match=r"model.safetensors"):
        load_drafter(tmp_path / "d", lm.model, lm.fingerprint)
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(DrafterError, match=r"config.json"):
        load_drafter(tmp_path / "d", lm.model, lm.fingerprint)
    with pytest.raises(DrafterError, match="does not exist"):
        load_drafter(tmp_path / "nope", lm.model, lm.fingerprint)


def test_vllm_export_keys_and_shapes(tmp_path, tiny_llama):
    lm = tiny_llama
    c = lm.config
    save_drafter(new_drafter(lm.model, lm.fingerprint), tmp_path / "d")
    shapes = export_vllm(tmp_path / "d", tmp_path / "vllm")
    H, inter, D = c.hidden_size, c.intermediate_size, c.head_dim
    assert shapes == {
        "fc.weight": [H, 2 * H],
        "layers.0.self_attn.q_proj.weight": [c.num_heads * D, H],
        "layers.0.self_attn.k_proj.weight": [c.num_kv_heads * D, H],
        "layers.0.self_attn.v_proj.weight": [c.num_kv_heads * D, H],
        "layers.0.self_attn.o_proj.weight": [H, c.num_heads * D],
        "layers.0.mlp.gate_proj.weight": [inter, H],
        "layers.0.mlp.up_proj.weight": [inter, H],
        "layers.0.mlp.down_proj.weight": [H, inter],
        "layers.0.post_attention_layernorm.weight": [H],
    }
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] == H and cfg["vocab_size"] == c.vocab_size


def _target(arch: str, tiny_llama, tmp_path):  # type: ignore[no-untyped-def]
    """tiny_llama, or a tiny Qwen2 with the same tokenizer (it has biases on the q/k/v projection)."""
    from tests.conftest import build_tiny_hf
    from understudy.engine.loader import load_model

    lm = tiny_llama if arch == "llama" else load_model(str(build_tiny_hf(tmp_path / arch, arch)), dtype="float32")
    assert (lm.model.layers[0].attn.wqkv.bias is not None) == (arch == "qwen2")
    return lm


def _perturbed_drafter(lm, seed: int):  # type: ignore[no-untyped-def]
    """A fresh drafter with every parameter moved off its init (biases too: a zero bias would hide a dropped one)."""
    d = new_drafter(lm.model, lm.fingerprint, seed=seed).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return d


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_unrolled_training_forward_equals_inference_drafting(arch, tiny_llama, tiny_prompts, tmp_path):
    """Step s of the training-time-test forward must compute exactly what the engine's drafter computes at draft
    step s (same features, same attention context) — otherwise training optimises the wrong thing."""
    lm = _target(arch, tiny_llama, tmp_path)
    d = _perturbed_drafter(lm, seed=2)
    seq = tiny_prompts[3] + tiny_prompts[5][:7]
    sample = target_features(lm.model, [(seq, 4)])[0]
    anchor = len(seq) - 5  # drafting starts after the sequence's first anchor+2 tokens are committed
    with torch.no_grad():
        outs = unrolled_forward(d, sample.tokens.unsqueeze(0), sample.features.unsqueeze(0), steps=3)
    # inference: a sequence with anchor+2 committed tokens, its true features in the hidden buffer
    hidden_buf = torch.zeros(1, 64, lm.config.hidden_size)
    hidden_buf[0, :len(seq)] = sample.features
    prop = DrafterProposer(d, hidden_buf, num_slots=1, capacity=64)
    n = anchor + 2
    batch = BatchState(token_ids=[seq[:n]], num_tokens=[n], temperature=torch.zeros(1),
                       top_k=torch.zeros(1, dtype=torch.long), top_p=torch.ones(1), generators=[torch.Generator()])
    # feed the *true* next tokens as drafts, as the unrolled forward does
    feats = []
    orig = d.forward

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        feats.append(out)
        return out

    d.forward = spy
    with torch.no_grad():
        prop.propose(batch, 1)
        f1 = feats[-1][0, -1]
        torch.testing.assert_close(f1, outs[0][0, anchor], atol=1e-5, rtol=1e-4)
        # step 2 by hand through the cached path: input (x_{a+2}, o_1[a]) at position a+1
        tok = torch.tensor([[seq[anchor + 2]]])
        f2 = d(tok, f1.view(1, 1, -1), torch.tensor([[anchor + 1]]), prop.cache, kv_len=anchor + 2)
        torch.testing.assert_close(f2[0, 0], outs[1][0, anchor], atol=1e-5, rtol=1e-4)
        tok = torch.tensor([[seq[anchor + 3]]])
        f3 = d(tok, f2, torch.tensor([[anchor + 2]]), prop.cache, kv_len=anchor + 3)
        torch.testing.assert_close(f3[0, 0], outs[2][0, anchor], atol=1e-5, rtol=1e-4)



@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_drafting_from_scored_anchors_only_computes_the_same_outputs_and_gradients(arch, tiny_llama, tiny_prompts,
                                                                                   tmp_path):
    """The loss drafts only from anchors it scores (packed, padded rows of different prompt and total lengths);
    their outputs and the parameters' gradients must equal those of drafting from every anchor (which the test
    above checks against the engine's own drafting)."""
    lm = _target(arch, tiny_llama, tmp_path)
    seqs = [(tiny_prompts[i] + tiny_prompts[i + 1][::-1] + tiny_prompts[i + 2], len(tiny_prompts[i])) for i in range(4)]
    samples = target_features(lm.model, seqs)
    assert len({s.prompt_len for s in samples}) > 1 and len({len(s) for s in samples}) > 1
    d = _perturbed_drafter(lm, seed=3)
    b = collate(samples)
    anchors, live = scored_anchors(b["lengths"], b["prompt_lens"], 4, 2)
    for r, smp in enumerate(samples):  # a row's live anchors: max(0, prompt_len - 4) .. length - 2, in order
        assert anchors[r][live[r]].tolist() == list(range(max(0, smp.prompt_len - 4), len(smp) - 1))
    full = unrolled_forward(d, b["tokens"], b["features"], 3)
    part = unrolled_forward(d, b["tokens"], b["features"], 3, anchors=anchors, live=live, lengths=b["lengths"])
    rows = torch.arange(len(samples)).unsqueeze(1).expand_as(anchors)
    for s in range(3):
        # step s+1 at anchor a is meaningful while x_{a+s+1} exists; beyond it both feed a zero token
        ok = live & (anchors + s + 1 < b["lengths"].unsqueeze(1))
        assert int(ok.sum()) > 20
        torch.testing.assert_close(part[s][ok], full[s][rows[ok], anchors[ok]], atol=1e-5, rtol=1e-4)
        assert bool((part[s][~live] == 0).all())

    def grads(o: list[torch.Tensor], a: torch.Tensor | None) -> list[torch.Tensor]:
        d.zero_grad(set_to_none=True)
        total = o[0].new_zeros(())
        for s in range(3):
            ok = live & (anchors + s + 1 < b["lengths"].unsqueeze(1))
            picked = o[s][ok] if a is None else o[s][rows[ok], anchors[ok]]
            total = total + (picked * torch.linspace(-1, 1, picked.shape[-1])).sum()
        total.backward()
        return [p.grad.clone() for p in d.parameters()]

    g_part = grads(unrolled_forward(d, b["tokens"], b["features"], 3, anchors=anchors, live=live,
                                    lengths=b["lengths"]), None)
    g_full = grads(unrolled_forward(d, b["tokens"], b["features"], 3), anchors)
    for gp, gf in zip(g_part, g_full, strict=True):
        torch.testing.assert_close(gp, gf, atol=1e-4, rtol=1e-3)

def test_training_reduces_loss_and_raises_acceptance(tiny_llama, tiny_prompts):
    from understudy.drafter.train import evaluate

    lm = tiny_llama
    plain = Engine(lm.model, EngineConfig(max_batch_size=24, max_model_len=256, num_speculative_tokens=0,
                                          dtype="float32"), lm.eos_token_ids)
    outs = plain.generate(tiny_prompts, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
    samples = target_features(lm.model, [(p + o, len(p)) for p, o in zip(tiny_prompts, outs, strict=True)])
    train = samples[:18]
    vocab = select_draft_vocab(train, 48, lm.config.vocab_size, always=lm.eos_token_ids)
    d = new_drafter(lm.model, lm.fingerprint, vocab, seed=0).float()
    before = evaluate(d, lm.model, train, k=3)
    cfg = DrafterTrainConfig(lr=3e-3, warmup_steps=5, total_steps=160, tokens_per_batch=1024, unroll_steps=2)
    with torch.no_grad():
        first = float(eagle_loss(d, collate(train[:6]), cfg).loss)
    DrafterTrainer(d, cfg).train(train, max_steps=160)
    with torch.no_grad():
        last = float(eagle_loss(d, collate(train[:6]), cfg).loss)
    after = evaluate(d, lm.model, train, k=3)  # random tiny targets: test fitting, not generalisation
    assert last < 0.85 * first
    assert after["expected_acceptance_length"] > before["expected_acceptance_length"] + 0.5
    assert after["top1_agreement"] > before["top1_agreement"]
    # per-source figures from one pass equal each source evaluated alone; the overall figures are unchanged
    for i, smp in enumerate(samples):
        smp.source = "a" if i % 3 else "b"
    both = evaluate(d, lm.model, samples, k=3, by_source=True)
    assert {k: v for k, v in both.items() if k != "by_source"} == evaluate(d, lm.model, samples, k=3)
    for src in ("a", "b"):
        assert both["by_source"][src] == evaluate(d, lm.model, [x for x in samples if x.source == src], k=3)


def test_bfloat16_mixed_precision_training_learns_and_keeps_float32_state(tiny_llama, tiny_prompts):
    """precision=bfloat16: the loss runs under torch.autocast (its value differs from float32's within bf16
    rounding), the drafter's weights and AdamW state stay float32, and the loss falls as in float32."""
    lm = tiny_llama
    plain = Engine(lm.model, EngineConfig(max_batch_size=24, max_model_len=256, num_speculative_tokens=0,
                                          dtype="float32"), lm.eos_token_ids)
    outs = plain.generate(tiny_prompts, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
    train = target_features(lm.model, [(p + o, len(p)) for p, o in zip(tiny_prompts, outs, strict=True)])[:12]
    vocab = select_draft_vocab(train, 48, lm.config.vocab_size, always=lm.eos_token_ids)
    d = new_drafter(lm.model, lm.fingerprint, vocab, seed=0).float()
    cfg = DrafterTrainConfig(lr=3e-3, warmup_steps=5, total_steps=160, tokens_per_batch=1024, unroll_steps=2,
                             precision="bfloat16")
    with torch.no_grad():
        first = float(eagle_loss(d, collate(train[:6]), cfg).loss)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = float(eagle_loss(d, collate(train[:6]), cfg).loss)
    assert mixed != first and abs(mixed - first) < 0.05 * first, (mixed, first)
    trainer = DrafterTrainer(d, cfg)
    assert trainer.precision == "bfloat16"
    trainer.train(train, max_steps=160)
    with torch.no_grad():
        last = float(eagle_loss(d, collate(train[:6]), cfg).loss)
    assert last < 0.85 * first, (first, last)
    assert {p.dtype for p in d.parameters()} == {torch.float32}
    assert {t.dtype for st in trainer.opt.state.values() for t in st.values() if t.dim()} == {torch.float32}
    with pytest.raises(ValueError, match="precision must be auto, float32 or bfloat16, got 'half'"):
        DrafterTrainConfig(precision="half")


def test_hard_labels_are_cross_entropy_against_the_targets_argmax(tiny_llama, tiny_prompts):
    lm = tiny_llama
    samples = target_features(lm.model, [(p + p[::-1], len(p)) for p in tiny_prompts[:3]])
    d = new_drafter(lm.model, lm.fingerprint, seed=0).float()
    cfg = DrafterTrainConfig(unroll_steps=1, hard_labels=True)
    b = collate(samples)
    with torch.no_grad():
        got = eagle_loss(d, b, cfg).metrics["ce_1"]
        soft = eagle_loss(d, b, DrafterTrainConfig(unroll_steps=1)).metrics["ce_1"]
        o = unrolled_forward(d, b["tokens"], b["features"], 1)[0]  # o[:, a] predicts position a + 1
        nll = []
        for r, smp in enumerate(samples):
            for a in range(smp.prompt_len - 2, len(smp) - 1):  # h_{a+1} exists and token a + 2 is a response one
                want = torch.nn.functional.linear(smp.features[a + 1], d.head_weight).argmax()
                nll.append(-torch.log_softmax(d.draft_logits(o[r, a]), -1)[want])
    assert got == pytest.approx(float(torch.stack(nll).mean()), rel=1e-5)
    assert got != pytest.approx(soft, rel=1e-3)


def test_draft_vocab_selection_counts_responses():
    s = [Sample(tokens=torch.tensor([1, 1, 5, 5, 5, 7]), features=torch.zeros(6, 4), prompt_len=2)]
    v = select_draft_vocab(s, 2, 10)
    assert v.tolist() == [1, 5]
    v = select_draft_vocab(s, 3, 10, always=(9,))
    assert 9 in v.tolist() and 5 in v.tolist()


def test_captured_hidden_states_equal_a_teacher_forced_forward(tiny_llama, tiny_prompts):
    """Warm-up training data comes from features captured while generating; they must be the target's."""
    lm = tiny_llama
    eng = Engine(lm.model, EngineConfig(max_batch_size=4, max_model_len=128, num_speculative_tokens=0, dtype="float32"),
                 lm.eos_token_ids, capture_hidden=True)
    prompts = {str(i): tiny_prompts[i] for i in (0, 5, 9)}
    for rid, p in prompts.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    toks = {rid: list(p) for rid, p in prompts.items()}
    hidden = {}
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id].extend(o.new_token_ids)
            if o.finished:
                hidden[o.request_id] = o.hidden
    for rid, t in toks.items():
        ref = target_features(lm.model, [(t[:-1], len(prompts[rid]))])[0]
        assert hidden[rid].shape == ref.features.shape == (len(t) - 1, lm.config.hidden_size)
        torch.testing.assert_close(hidden[rid], ref.features, atol=1e-5, rtol=1e-4)
