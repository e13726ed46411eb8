"""`understudy drafter eval`: acceptance per position and per K on each prompt set, costs, predicted best K."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from understudy.drafter.evaluate import predict
from understudy.drafter.train import _walk

ROOT = Path(__file__).resolve().parents[2]


def test_predict_is_length_times_width1_cost_over_step_cost():
    acc = {"acceptance_length_at_k": {"1": 1.5, "2": 1.8, "3": 1.9}}
    costs = {"verify_s": {"1": 0.010, "2": 0.011, "3": 0.012, "4": 0.020}, "draft_step_s": 0.001}
    p = predict(acc, costs)
    assert p["speedup_at_k"]["0"] == 1.0
    assert p["speedup_at_k"]["1"] == pytest.approx(1.5 * 0.010 / (0.011 + 0.001), abs=1e-3)
    assert p["speedup_at_k"]["2"] == pytest.approx(1.8 * 0.010 / (0.012 + 0.002), abs=1e-3)
    assert p["speedup_at_k"]["3"] == pytest.approx(1.9 * 0.010 / (0.020 + 0.003), abs=1e-3)
    assert p["best_k"] == 2 and p["verify_cost_vs_width1"]["4"] == 2.0
    # nothing accepted: plain decoding is the best choice
    assert predict({"acceptance_length_at_k": {"1": 1.0, "2": 1.0}}, costs)["best_k"] == 0


def test_predict_uses_the_decoded_length_where_there_is_one():
    costs = {"verify_s": {"1": 0.010, "2": 0.011, "3": 0.012}, "draft_step_s": 0.001}
    acc = {"acceptance_length_at_k": {"1": 1.5, "2": 1.8}, "decoded_acceptance_length_at_k": {"1": 1.4, "2": 1.6}}
    assert predict(acc, costs)["speedup_at_k"]["2"] == pytest.approx(1.6 * 0.010 / (0.012 + 0.002), abs=1e-3)


def test_walk_decodes_as_the_engine_steps():
    """Anchors 1..10 of a 12-token sequence with a 3-token prompt; run[j] = drafts accepted from anchor 1 + j.
    Decoding starts at anchor 2 (after the prefill's token) and jumps past what each step commits."""
    run = torch.tensor([0, 0, 3, 0, 1, 0, 2, 0, 0, 0])
    out = _walk(run, first_anchor=1, prompt_len=3, length=12, k=3)
    # K=1: anchors 2,3,5,7,9 -> 1+2+2+2+1; K=2: 2,3,6,7 -> 1+3+1+3; K=3: 2,3,7 -> 1+4+3
    assert out.tolist() == [[8.0, 5.0], [8.0, 4.0], [8.0, 3.0]]


@pytest.mark.slow
def test_drafter_eval_reports_each_prompt_set(tmp_path, tiny_llama, tiny_llama_dir, tiny_prompts):
    from tests.conftest import train_tiny_drafter
    from understudy.drafter.model import save_drafter

    save_drafter(train_tiny_drafter(tiny_llama, tiny_prompts, steps=40), tmp_path / "d")
    words = ["grid", "line", "flow", "risk", "load", "sum"]
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"{words[i % 6]} {words[(i * 5) % 6]}", "split": s}) + "\n"
                         for i, s in enumerate(["train", "heldout", "heldout", "train", "heldout"])))
    b = tmp_path / "b.txt"
    b.write_text("solar wind\napple zeta omega\n")
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "drafter", "eval", str(tmp_path / "d"),
                        "--model", str(tiny_llama_dir), "--prompts", str(a), "--prompts", str(b), "--max-new-tokens",
                        "24", "--max-k", "3", "--dtype", "float32", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    first, second = out["sets"]
    assert (first["split"], first["num_sequences"]) == ("heldout", 3)  # a file with heldout rows: only those
    assert (second["split"], second["num_sequences"]) == ("all", 2)
    for s in out["sets"]:
        alpha = s["per_position_acceptance"]
        assert len(alpha) == 3 and all(x >= y for x, y in itertools.pairwise(alpha))
        for k in (1, 2, 3):
            assert s["acceptance_length_at_k"][str(k)] == pytest.approx(1 + sum(alpha[:k]), abs=1e-3)
            assert 1.0 <= s["decoded_acceptance_length_at_k"][str(k)] <= k + 1
        assert s["predicted"]["speedup_at_k"]["0"] == 1.0 and 0 <= s["predicted"]["best_k"] <= 3
    assert sorted(out["costs"]["verify_s"]) == ["1", "2", "3", "4"] and out["costs"]["draft_step_s"] > 0


def test_drafter_eval_bad_max_k_is_one_clear_error(tmp_path, tiny_llama_dir):
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "drafter", "eval", str(tmp_path),
                        "--model", str(tiny_llama_dir), "--max-k", "0"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 2 and "--max-k must be in [1, 8]" in r.stderr and "Traceback" not in r.stderr
