"""Drafter data shards: written as sequences finish, resumed after an interruption, damaged shards regenerated."""

from __future__ import annotations

import json

import pytest
import torch

from understudy.drafter.data import ShardStore
from understudy.drafter.train import Sample
from understudy.drafter.warmup import WarmupConfig, build_dataset

pytestmark = pytest.mark.slow


def _prompts(tmp_path):
    words = ["grid", "line", "flow", "risk", "load", "sum", "apple", "zeta"]
    rows = [{"prompt": " ".join(words[(i * 3 + j) % 8] for j in range(1 + i % 5)),
             "split": "heldout" if i % 6 == 0 else "train"} for i in range(40)]
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_shard_roundtrip(tmp_path):
    store = ShardStore(tmp_path / "s")
    a = Sample(tokens=torch.arange(5), features=torch.randn(5, 4), prompt_len=2)
    b = Sample(tokens=torch.arange(3) + 7, features=torch.randn(3, 4), prompt_len=1)
    store.write("shard-w0-1", [(4, a), (9, b)])
    got = store.load()
    assert sorted(got) == [4, 9] and got[9].tokens.tolist() == [7, 8, 9] and got[4].prompt_len == 2
    assert torch.allclose(got[4].features, a.features.to(torch.bfloat16).float())
    assert not store.is_complete()


def test_interrupted_data_resumes_and_a_damaged_shard_is_regenerated(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.setenv("UNDERSTUDY_CACHE", str(tmp_path / "cache"))
    cfg = WarmupConfig(prompts=(str(_prompts(tmp_path)),), max_minutes=20, max_new_tokens=24, sampled_copies=1,
                       gen_batch_size=8, data_workers=2)
    train, heldout, _ = build_dataset(tiny_llama, cfg)
    assert len(heldout) == 7 and len(train) == 66  # 33 train prompts x (greedy + 1 sampled)
    folder = next((tmp_path / "cache" / "drafter-data").iterdir())
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert len(shards) >= 2 and (folder / "complete.json").exists()
    # interrupted before it finished: no completion marker, one shard lost, one damaged
    (folder / "complete.json").unlink()
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    kept = {p: p.stat().st_mtime_ns for p in shards[2:]}
    train2, heldout2, _ = build_dataset(tiny_llama, cfg)
    assert len(train2) == len(train) and len(heldout2) == len(heldout)
    assert all(p.stat().st_mtime_ns == m for p, m in kept.items()), "finished shards are not regenerated"
    by_prompt = {tuple(s.tokens[:s.prompt_len].tolist()) for s in heldout}
    assert {tuple(s.tokens[:s.prompt_len].tolist()) for s in heldout2} == by_prompt
    # greedy answers are the same whichever run made them
    g1 = sorted(s.tokens.tolist() for s in heldout)
    g2 = sorted(s.tokens.tolist() for s in heldout2)
    assert g1 == g2


def test_train_jobs_of_several_prompt_files_are_interleaved(tiny_llama):
    """A data budget that runs out must keep every file's share: the train jobs alternate in proportion."""
    from understudy.drafter.warmup import _jobs

    rows = [{"prompt": f"a{i}", "split": "train", "source": "a"} for i in range(4)] + \
           [{"prompt": f"b{i}", "split": "train", "source": "b"} for i in range(2)] + \
           [{"prompt": "held", "split": "heldout", "source": "b"}]
    jobs = _jobs(tiny_llama, rows, WarmupConfig(sampled_copies=0))
    assert jobs[0].split == "heldout"
    assert [j.source for j in jobs[1:]] == ["a", "b", "a", "a", "b", "a"]


def test_a_budget_spent_before_the_first_step_stops_at_once(tmp_path, monkeypatch, tiny_llama):
    """At the deadline the worker stops at once (it keeps running answers of 8+ tokens: none exist yet here)."""
    monkeypatch.setenv("UNDERSTUDY_CACHE", str(tmp_path / "cache"))
    # 60 ns: over before the worker's first check whatever a step costs (6 ms was a few steps of the tiny model
    # once its steps got fast, and then 8-token partial answers were kept)
    cfg = WarmupConfig(prompts=(str(_prompts(tmp_path)),), max_minutes=20, data_minutes=1e-9, max_new_tokens=200,
                       sampled_copies=0, gen_batch_size=8, data_workers=1)
    train, heldout, _ = build_dataset(tiny_llama, cfg)  # the budget is spent before the first step
    assert len(train) + len(heldout) == 0


def test_captured_running_returns_partial_sequences_with_their_features(tiny_llama, tiny_prompts):
    from understudy.engine.config import EngineConfig
    from understudy.engine.engine import Engine
    from understudy.engine.sampling import SamplingParams

    eng = Engine(tiny_llama.model, EngineConfig(max_batch_size=4, max_model_len=128, num_speculative_tokens=0,
                                                dtype="float32"), tiny_llama.eos_token_ids, capture_hidden=True)
    for i, p in enumerate(tiny_prompts[:3]):
        eng.add_request(str(i), p, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    for _ in range(6):
        eng.step()
    got = eng.captured_running()
    assert len(got) == 3
    for rid, toks, hidden, plen in got:
        assert toks[:plen] == tiny_prompts[int(rid)] and len(toks) - plen >= 6
        assert hidden.shape == (len(toks) - 1, tiny_llama.config.hidden_size)
    # the features of a partial answer are those the finished answer will carry
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished and o.request_id == "0":
                assert torch.allclose(o.hidden[:got[0][2].shape[0]], got[0][2])


def test_data_is_decoded_in_its_dtype_and_the_dtype_keys_the_cache(tmp_path, monkeypatch, tiny_llama):
    """bfloat16 data is made by a bfloat16 engine (its own features, not float32 ones rounded) and cached apart
    from float32 data; an unknown dtype is refused naming the setting."""
    monkeypatch.setenv("UNDERSTUDY_CACHE", str(tmp_path / "cache"))
    base = dict(prompts=(str(_prompts(tmp_path)),), max_minutes=20, max_new_tokens=12, sampled_copies=0,
                gen_batch_size=8, data_workers=1)
    _, held32, _ = build_dataset(tiny_llama, WarmupConfig(**base, data_dtype="float32"))
    _, held16, _ = build_dataset(tiny_llama, WarmupConfig(**base, data_dtype="bfloat16"))
    assert len(list((tmp_path / "cache" / "drafter-data").iterdir())) == 2
    by_prompt = {tuple(s.tokens[:s.prompt_len].tolist()): s for s in held32}
    pairs = [(by_prompt[tuple(s.tokens[:s.prompt_len].tolist())], s) for s in held16]
    assert len(pairs) == len(held32) == 7
    # the prompt positions see the same tokens in both: their features differ only by the engine's arithmetic
    diff = max(float((a.features[:a.prompt_len] - b.features[:b.prompt_len]).abs().max()) for a, b in pairs)
    scale = max(float(a.features[:a.prompt_len].abs().max()) for a, _ in pairs)
    assert 0 < diff < 0.25 * scale, (diff, scale)
    with pytest.raises(ValueError, match="data_dtype must be auto, float32 or bfloat16"):
        build_dataset(tiny_llama, WarmupConfig(**base, data_dtype="float16"))
