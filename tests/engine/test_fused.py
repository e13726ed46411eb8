"""The fused native decoder (quant.FusedDecoder) of quantised models and of float32 models run by an engine: the
same computation as the op-by-op layers, rows independent of their batch and width (what keeps
speculation exactly lossless), clear errors."""

from __future__ import annotations

import gc

import pytest
import torch

from tests.conftest import build_tiny_hf
from understudy.drafter.model import new_drafter
from understudy.engine import qkernels, quant
from understudy.engine.engine import NATIVE_LINEAR_ROWS
from understudy.engine.loader import load_model
from understudy.engine.model import set_native_linears
from understudy.engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif(qkernels.load() is None, reason=f"native kernels: {qkernels.unavailable_reason()}")


@pytest.fixture(autouse=True)
def split_every_call():
    """The tiny test models' linears are below the size the kernels split across threads: split them anyway, and
    leave one thread and the default size behind."""
    qkernels.set_min_parallel(0)
    yield
    qkernels.set_min_parallel(1 << 16)
    qkernels.set_threads(1)


def _float_model(folder):
    model = load_model(str(folder), dtype="float32").model
    with torch.no_grad():  # HF initialises biases to zero: make them count
        for layer in model.layers:
            if layer.attn.wqkv.bias is not None:
                layer.attn.wqkv.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    model.fused = quant.FusedDecoder.for_float_model(model)
    assert model.fused is not None and model.fused.float_weights
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def float_model(request, tiny_llama_dir, tmp_path_factory):
    """float32 weights read in place (what an engine attaches when it runs one intra-op thread); the Qwen2 one has
    q/k/v biases."""
    folder = tiny_llama_dir if request.param == "llama" else build_tiny_hf(tmp_path_factory.mktemp("qwen2"), "qwen2")
    return _float_model(folder)


@pytest.fixture(scope="module", params=["int8", "int4", "float32", "float32-qwen2"])
def qmodel(request, tiny_llama_dir, tmp_path_factory):
    """A model with its fused decoder: quantised (attached by the loader) or float32."""
    if request.param == "float32":
        return _float_model(tiny_llama_dir)
    if request.param == "float32-qwen2":
        return _float_model(build_tiny_hf(tmp_path_factory.mktemp("qwen2"), "qwen2"))
    return load_model(str(tiny_llama_dir), dtype="float32", quantize=request.param).model


def _prefill(model, rows: list[list[int]], capacity: int = 128):
    """Each row prefilled op by op into its own slot (longer than FUSED_MAX_TOKENS, so both paths share it)."""
    cache = model.allocate_cache(len(rows), capacity)
    with torch.inference_mode():
        for b, toks in enumerate(rows):
            assert len(toks) > quant.FUSED_MAX_TOKENS
            model(torch.tensor([toks]), torch.arange(len(toks)).unsqueeze(0), cache, kv_len=len(toks), slot_start=b)
    return cache


def _rows(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _step(model, cache, tokens: torch.Tensor, start: torch.Tensor, slot_start: int = 0) -> torch.Tensor:
    T = tokens.shape[1]
    positions = start.unsqueeze(1) + torch.arange(T).unsqueeze(0)
    with torch.inference_mode():
        return model(tokens, positions, cache, kv_len=int(positions.max()) + 1, slot_start=slot_start)


def test_attached_by_quantisation_and_by_an_engine(qmodel, tiny_llama_dir):
    from understudy.engine.config import EngineConfig
    from understudy.engine.engine import Engine

    assert isinstance(qmodel.fused, quant.FusedDecoder)
    model = load_model(str(tiny_llama_dir), dtype="float32").model
    assert model.fused is None  # loading a float model attaches nothing
    Engine(model, EngineConfig(dtype="float32", num_threads=1))
    assert isinstance(model.fused, quant.FusedDecoder) and model.fused.float_weights
    assert model.lm_head.native_rows == NATIVE_LINEAR_ROWS  # the LM head runs the native kernel too
    drafter = new_drafter(model, "fp").attach(model, 64)  # and a drafter attached to this target follows it
    assert drafter.fc.native_rows == drafter._head[0].native_rows == NATIVE_LINEAR_ROWS
    Engine(model, EngineConfig(dtype="float32", num_threads=1, native_decoder=False))
    assert model.fused is None and model.lm_head.native_rows == 0
    assert drafter.attach(model, 64)._head[0].native_rows == 0
    eng = Engine(model, EngineConfig(dtype="float32", num_threads=2))  # the native kernels on two threads
    assert isinstance(model.fused, quant.FusedDecoder) and eng.threads == 2
    assert model.lm_head.native_rows == NATIVE_LINEAR_ROWS
    seen: list[int] = []
    real = model.fused  # wrapped: records the kernels' thread count at every call inside the engine's steps
    model.fused = lambda *a, **k: (seen.append(qkernels.get_threads()), real(*a, **k))[1]
    eng.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0))
    assert seen and set(seen) == {2} and qkernels.get_threads() == 1  # the process's own count is untouched
    eng.set_threads(1, prefill_threads=0)  # from the next step (the server's switch around its drafter job)
    assert eng.threads == 2
    seen.clear()
    eng.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0))
    assert eng.threads == 1 and set(seen) == {1} and torch.get_num_threads() == 1 and eng._prefill_threads is None
    model.fused = real
    eng.set_threads(1, prefill_threads=3)
    eng.step()
    assert eng._prefill_threads == 3
    with pytest.raises(ValueError, match="threads"):
        eng.set_threads(0)
    q = load_model(str(tiny_llama_dir), dtype="float32", quantize="int8").model
    own = q.fused
    Engine(q, EngineConfig(dtype="float32", num_threads=2, native_decoder=False))
    assert q.fused is own  # a quantised model keeps its own decoder whatever the engine's settings
    bf16 = load_model(str(tiny_llama_dir), dtype="bfloat16").model
    assert quant.FusedDecoder.for_float_model(bf16) is None  # the kernel reads float32 weights only


def test_native_linear_matches_torch_and_each_row_is_the_same_at_any_row_count():
    g = torch.Generator().manual_seed(3)
    w, b, x = torch.randn(37, 48, generator=g), torch.randn(37, generator=g), torch.randn(2, 7, 48, generator=g)
    y = qkernels.f32_linear(x, w, b, 64)
    assert y.shape == (2, 7, 37)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    flat = x.reshape(14, 48)
    for m in (1, 2, 3, 4, 5, 6, 11):  # every tile shape, and row tiles that re-read the same outputs' weights
        part = qkernels.f32_linear(flat[:m], w, b, 64)
        assert torch.equal(part, y.reshape(14, 37)[:m]), m
        for threads in (2, 3, 16):  # outputs split across threads (37 outputs: ragged parts, fewer than threads)
            assert torch.equal(qkernels.f32_linear(flat[:m], w, b, 64, threads), part), (m, threads)
    assert torch.equal(qkernels.f32_linear(flat[:3], w, None, 64) + b, y.reshape(14, 37)[:3])  # bias added last
    # not taken (None: the caller runs its own matmul)
    assert qkernels.f32_linear(x, w, b, 13) is None  # more rows than allowed
    assert qkernels.f32_linear(x[..., :40], w[:, :40].contiguous(), b, 64) is not None
    assert qkernels.f32_linear(x[..., :44], w[:, :44].contiguous(), b, 64) is None  # K not a multiple of 8
    assert qkernels.f32_linear(x, w.t().contiguous().t(), b, 64) is None  # not contiguous
    assert qkernels.f32_linear(x.double(), w.double(), b.double(), 64) is None
    assert qkernels.f32_linear(x.bfloat16(), w, b, 64) is None


def test_lm_head_logits_of_a_verification_are_those_of_width_1_steps(float_model):
    """The head reads the same weights in the same order for every row: a verification's logits are bit for bit
    those of width-1 steps (greedy speculation then reproduces plain decoding even on near-ties)."""
    set_native_linears(float_model, NATIVE_LINEAR_ROWS)
    try:
        V = float_model.config.vocab_size
        hidden = torch.randn(2, 6, float_model.config.hidden_size, generator=torch.Generator().manual_seed(4))
        with torch.inference_mode():
            wide = float_model.logits(hidden)
            torch.testing.assert_close(wide, torch.nn.functional.linear(hidden, float_model.lm_head.weight),
                                       rtol=1e-5, atol=1e-5)
            assert wide.shape == (2, 6, V)
            for b in range(2):
                for t in range(6):
                    assert torch.equal(float_model.logits(hidden[b:b + 1, t:t + 1])[0, 0], wide[b, t]), (b, t)
    finally:
        set_native_linears(float_model, 0)


def test_a_drafter_layer_runs_fused_and_matches_its_op_by_op_forward(float_model):
    """A drafter attached to a target of a one-thread engine runs its layer (no input norm) in the fused decoder:
    the same features and KV-cache entries as op by op, for a batched catch-up and then single draft steps."""
    set_native_linears(float_model, NATIVE_LINEAR_ROWS)
    try:
        H, V = float_model.config.hidden_size, float_model.config.vocab_size
        d = new_drafter(float_model, "fp", seed=1)
        with torch.no_grad():  # make the norm and every projection count
            for p in d.layer.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        d.attach(float_model, 128)
        assert d._fused and d._head[0].native_rows == NATIVE_LINEAR_ROWS
        with torch.inference_mode():  # the fused path takes a drafter's cached forward (None would fall back)
            assert d._forward_fused(torch.zeros(2, 1, H), torch.tensor([[0], [1]]),
                                    d.allocate_cache(2, 8, torch.float32, "cpu"), 0) is not None
        g = torch.Generator().manual_seed(5)
        tokens, feats = torch.randint(0, V, (2, 5), generator=g), torch.randn(2, 5, H, generator=g)
        start = torch.tensor([[3], [9]])
        outs, caches = [], []
        for fused in (True, False):
            if not fused:
                d._fused = []  # op by op, the same weights
            cache = d.allocate_cache(2, 128, torch.float32, "cpu")
            with torch.inference_mode():
                pos = start + torch.arange(5)
                first = d(tokens, feats, pos, cache, kv_len=int(pos.max()) + 1)
                nxt = d(tokens[:, :1], first[:, -1:], pos[:, -1:] + 1, cache, kv_len=int(pos.max()) + 2)
            outs.append(torch.cat([first, nxt], dim=1))
            caches.append(cache)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        for a, b in zip((*caches[0].k, *caches[0].v), (*caches[1].k, *caches[1].v), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    finally:
        set_native_linears(float_model, 0)


def test_float_weights_loaded_in_place_are_read(float_model):
    """RL policy updates copy new weights into the same tensors: the fused path reads them at once (it holds
    pointers, not copies), and agrees with the op-by-op layers on them."""
    qmodel = float_model
    V = qmodel.config.vocab_size
    rows = _rows(V, [40])
    w = qmodel.layers[1].mlp.w2.weight
    old = w.detach().clone()
    before = _step(qmodel, _prefill(qmodel, rows), torch.tensor([[5, 6]]), torch.tensor([40]))
    try:
        with torch.no_grad():
            w.mul_(1.5)
        got = _step(qmodel, _prefill(qmodel, rows), torch.tensor([[5, 6]]), torch.tensor([40]))
        fused, qmodel.fused = qmodel.fused, None
        ref = _step(qmodel, _prefill(qmodel, rows), torch.tensor([[5, 6]]), torch.tensor([40]))
        qmodel.fused = fused
    finally:
        with torch.no_grad():
            w.copy_(old)
    assert not torch.equal(got, before)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_fused_equals_the_op_by_op_layers(qmodel):
    """Ragged rows (different lengths), a width-5 verification then a width-1 step: hidden states and the keys/
    values written agree with the op-by-op path to float32 rounding."""
    V = qmodel.config.vocab_size
    rows = _rows(V, [40, 57, 45])
    start = torch.tensor([len(r) for r in rows])
    drafts = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(1))
    fused_cache, ref_cache = _prefill(qmodel, rows), _prefill(qmodel, rows)
    fused = qmodel.fused
    try:
        got = [_step(qmodel, fused_cache, drafts, start), _step(qmodel, fused_cache, drafts[:, :1], start + 5)]
        qmodel.fused = None
        want = [_step(qmodel, ref_cache, drafts, start), _step(qmodel, ref_cache, drafts[:, :1], start + 5)]
    finally:
        qmodel.fused = fused
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    for kg, kw in zip(fused_cache.k + fused_cache.v, ref_cache.k + ref_cache.v, strict=True):
        torch.testing.assert_close(kg, kw, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got[0], _step(qmodel, _prefill(qmodel, _rows(V, [40, 57, 45], seed=3)), drafts, start))


def test_a_row_is_bitwise_the_same_at_any_width_batch_or_slot(qmodel):
    """Verification of w tokens gives, for each of them, exactly what w width-1 steps give, and a row's result does
    not depend on the other rows of its batch: greedy speculation reproduces plain decoding bit for bit."""
    V = qmodel.config.vocab_size
    rows = _rows(V, [41, 50])
    start = torch.tensor([len(r) for r in rows])
    drafts = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))
    wide = _step(qmodel, _prefill(qmodel, rows), drafts, start)  # [2, 6, H]: both rows, width 6
    cache = _prefill(qmodel, rows)
    for b in range(2):  # each row alone, one token at a time, in its own slot
        for t in range(6):
            one = _step(qmodel, cache, drafts[b:b + 1, t:t + 1], start[b:b + 1] + t, slot_start=b)
            assert torch.equal(one[0, 0], wide[b, t]), (b, t)


@pytest.mark.parametrize("threads", [2, 3])
def test_a_forward_is_bitwise_the_same_on_any_number_of_threads(qmodel, threads):
    """The kernels split each linear's outputs across threads (more threads than cores too): every output is still
    computed by one thread in its fixed order, so hidden states and the cache are exactly those of one thread."""
    V = qmodel.config.vocab_size
    rows = _rows(V, [41, 50, 44])
    start = torch.tensor([len(r) for r in rows])
    drafts = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(4))
    out, caches = [], []
    try:
        for n in (1, threads):
            qkernels.set_threads(n)
            cache = _prefill(qmodel, rows)
            out.append(torch.cat([_step(qmodel, cache, drafts, start), _step(qmodel, cache, drafts[:, :1], start + 5)],
                                 dim=1))
            caches.append(cache)
    finally:
        qkernels.set_threads(1)
    assert torch.equal(out[0], out[1])
    assert all(torch.equal(a, b) for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True))


def test_replaced_tensors_are_followed(qmodel):
    """The loader replaces the norms after quantising (out of the file's memory map), and an engine may allocate a
    new cache: the pointer table must follow both, never read a freed tensor."""
    V = qmodel.config.vocab_size
    rows = _rows(V, [40])
    norm = qmodel.layers[0].post_attention_layernorm
    old = norm.weight
    want = _step(qmodel, _prefill(qmodel, rows), torch.tensor([[5, 6]]), torch.tensor([40]))
    try:
        norm.weight = torch.nn.Parameter(old.detach() * 2.0)
        gc.collect()
        got = _step(qmodel, _prefill(qmodel, rows), torch.tensor([[5, 6]]), torch.tensor([40]))
        fused = qmodel.fused
        qmodel.fused = None
        ref = _step(qmodel, _prefill(qmodel, rows), torch.tensor([[5, 6]]), torch.tensor([40]))
        qmodel.fused = fused
    finally:
        norm.weight = old
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(_step(qmodel, _prefill(qmodel, rows), torch.tensor([[5, 6]]), torch.tensor([40])), want)


def test_long_forwards_and_grad_mode_run_op_by_op(qmodel):
    cache = qmodel.allocate_cache(1, 128)
    x = torch.zeros(1, quant.FUSED_MAX_TOKENS + 1, qmodel.config.hidden_size)
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    with torch.inference_mode():
        assert qmodel.fused(qmodel, x, pos, cache, 0) is None
    with torch.no_grad():
        assert qmodel.fused(qmodel, x[:, :2], pos[:, :2], cache, 0) is not None
    with torch.enable_grad():
        assert qmodel.fused(qmodel, x[:, :2], pos[:, :2], cache, 0) is None


def test_a_position_outside_the_cache_is_refused_by_name(qmodel):
    cache = qmodel.allocate_cache(1, 16)
    with pytest.raises(ValueError, match="KV cache"):
        _step(qmodel, cache, torch.tensor([[1, 2]]), torch.tensor([15]))
    with pytest.raises(ValueError, match="slots"):
        _step(qmodel, cache, torch.tensor([[1]]), torch.tensor([3]), slot_start=1)


@pytest.mark.parametrize("native_threads", [1, 2])
def test_engines_in_threads_share_a_model_safely(qmodel, native_threads):
    """Two threads decode on one model with their own caches (the RL rollout workers do): each gets exactly what it
    gets alone. With two native threads per call, one caller at a time has the kernels' thread pool and the other
    runs its call on its own thread: the same results either way."""
    import threading

    qkernels.set_threads(native_threads)

    V = qmodel.config.vocab_size
    rows = _rows(V, [40, 48], seed=5)
    toks = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(6))

    def decode(b: int) -> torch.Tensor:
        cache = _prefill(qmodel, [rows[b]])
        return torch.cat([_step(qmodel, cache, toks[b:b + 1, t:t + 1], torch.tensor([len(rows[b]) + t]))
                          for t in range(30)], dim=1)

    alone = [decode(0), decode(1)]
    out: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda b=b: out.__setitem__(b, decode(b))) for b in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    qkernels.set_threads(1)
    assert torch.equal(out[0], alone[0]) and torch.equal(out[1], alone[1])
