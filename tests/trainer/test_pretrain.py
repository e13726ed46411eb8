"""The tiny-policy recipe: a short run on easy arithmetic learns, saves a loadable folder, and beats the
untrained model on the easiest problems (the full recipe's figures are in docs/trainer-tasks.md)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from understudy.engine.loader import load_model
from understudy.trainer.chartok import make_char_tokenizer
from understudy.trainer.pretrain import (
    PretrainConfig,
    build_model,
    evaluate,
    example_ids,
    lr_at,
    make_batch,
    pretrain,
)
from understudy.trainer.tasks import ArithTask, Problem, TaskError

torch.set_num_threads(1)

SMALL = dict(task_kwargs={"max_digits": 2, "mul_fraction": 0.0}, hidden_size=128, num_layers=2, num_heads=4,
             intermediate_size=256, max_seq_len=96, batch_size=16, lr=3e-3, warmup_steps=20, steps=600,
             max_minutes=0.6, eval_every=0, eval_problems=16, final_eval_problems=32, max_new_tokens=48)


def one_digit_sums(n: int) -> list[Problem]:
    rng = random.Random(123)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append(Problem(f"{a}+{b}=", a + b, {"kind": "add", "a": a, "b": b, "digits": 1}))
    return out


def test_batch_masks_only_the_solution_and_eos():
    tok = make_char_tokenizer()
    task = ArithTask()
    p = Problem("2+3=", 5, {"kind": "add", "a": 2, "b": 3, "digits": 1})
    ids, prompt_len = example_ids(tok, task, p)
    assert tok.decode(ids[prompt_len:]) == "2+3=5 >5\nanswer: 5</s>" and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:prompt_len]) == "<|user|>2+3=<|end|><|assistant|>"
    short = example_ids(tok, task, Problem("1+1=", 2, {"kind": "add", "a": 1, "b": 1, "digits": 1}))
    inputs, targets, mask = make_batch([(ids, prompt_len), short], tok.pad_token_id)
    assert inputs.shape == targets.shape == mask.shape == (2, len(ids) - 1)
    assert torch.equal(targets[0], torch.tensor(ids[1:]))
    assert tok.decode(targets[0][mask[0]].tolist()) == "2+3=5 >5\nanswer: 5</s>"
    assert int(mask[1].sum()) == len(short[0]) - short[1]  # padding is never a target


def test_schedule_and_config_validation(tmp_path):
    cfg = PretrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, steps=100, max_minutes=None)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(1e-4)  # warm-up: (0 + 1) / 10 of the peak
    assert lr_at(cfg, 50, 0.5) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # cosine midpoint
    assert lr_at(cfg, 100, 1.0) == pytest.approx(1e-4)  # ends at min_lr_ratio * lr
    with pytest.raises(ValueError, match="stopping rule"):
        PretrainConfig(steps=None, max_minutes=None)
    with pytest.raises(ValueError, match="num_heads"):
        PretrainConfig(hidden_size=100, num_heads=3)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "hi", "answer": "hello"}\n')
    with pytest.raises(TaskError, match="no canonical solutions"):
        pretrain(PretrainConfig(task="jsonl", task_kwargs={"path": rows}, steps=1), tmp_path / "never")


def test_short_pretrain_learns_saves_and_beats_the_untrained_model(tmp_path):
    cfg = PretrainConfig(**SMALL)
    out = tmp_path / "tiny-arith"
    m = pretrain(cfg, out, progress=False)
    assert m["steps"] >= 30 and m["initial_loss"] > 3.5  # starts near ln(vocab) = ln 103 = 4.63
    assert m["final_loss"] < 0.4 * m["initial_loss"], (m["initial_loss"], m["final_loss"])

    # (b) the folder is a normal HF model folder that the engine loader reads back
    saved = json.loads((out / "config.json").read_text())
    assert saved["understudy_pretrain"]["config"]["hidden_size"] == 128 and saved["eos_token_id"] == 2
    loaded = load_model(str(out), dtype="float32")
    assert loaded.eos_token_ids == (2,) and loaded.tokenizer.chat_template
    assert sum(p.numel() for p in loaded.model.parameters()) == m["params"]

    # (c) on the easiest problems the trained model writes the format and mostly the right answer; the
    # untrained model (same shape and init) writes neither
    problems = one_digit_sums(16)
    trained = evaluate(loaded.model, loaded.tokenizer, ArithTask(), problems, 48, cfg.max_seq_len)
    untrained_model = build_model(cfg, len(loaded.tokenizer))
    untrained = evaluate(untrained_model, loaded.tokenizer, ArithTask(), problems, 48, cfg.max_seq_len)
    assert untrained["format_rate"] == 0.0 and untrained["accuracy"] == 0.0
    assert trained["format_rate"] >= 0.75, trained["examples"]
    assert trained["accuracy"] >= 0.5, trained["examples"]  # measured: 1.0 (0.97 on the 2-digit eval set)
    assert math.isfinite(m["accuracy"]) and 0.0 <= m["accuracy"] <= 1.0


# ---- supervised fine-tuning of an existing model (the warm start before GRPO, issue 13) ------------------------
def test_sft_fine_tunes_an_existing_model_on_checked_solutions_and_keeps_its_family(tiny_llama_dir, tmp_path):
    cfg = PretrainConfig(task="grid-risk", task_kwargs={"num_lines": 3}, init=str(tiny_llama_dir), steps=40,
                         max_minutes=None, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, eval_problems=8,
                         final_eval_problems=8, max_new_tokens=64, max_seq_len=256)
    m = pretrain(cfg, tmp_path / "sft", progress=False)
    assert m["steps"] == 40 and m["final_loss"] < 0.6 * m["initial_loss"], (m["initial_loss"], m["final_loss"])
    assert 0.0 <= m["initial_accuracy"] <= 1.0 and 0.0 <= m["initial_format_rate"] <= 1.0  # measured before step 1
    fails = m["problems_where_constant_fails"]  # 8 problems: the constant answer is right on 8 - fails of them
    assert m["constant_answer_accuracy"] == (8 - fails) / 8
    if fails:  # the reported split agrees with the overall accuracy: right where the constant fails <= right
        assert m["accuracy_where_constant_fails"] * fails <= m["accuracy"] * 8 + 1e-9
    base, tuned = load_model(str(tiny_llama_dir), dtype="float32"), load_model(str(tmp_path / "sft"), dtype="float32")
    assert tuned.fingerprint == base.fingerprint  # the same family: a policy version its drafters pair with
    assert not torch.equal(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)
    saved = json.loads((tmp_path / "sft" / "config.json").read_text())["understudy_pretrain"]
    assert saved["config"]["init"] == str(tiny_llama_dir) and "initial_accuracy" in saved


def test_bfloat16_mixed_precision_sft_learns_and_keeps_float32_weights(tiny_llama_dir, tmp_path):
    """precision=bfloat16: the step's matmuls run in bf16 under torch.autocast (its loss differs from float32's
    on the same batch, within bf16's rounding), the weights and optimizer state stay float32, and it learns."""
    from understudy.engine.loader import resolve_dtype
    from understudy.trainer.pretrain import (
        _initial_model,
        _sample_examples,
        _solvable_task,
        lm_loss,
        make_batch,
    )

    cfg = PretrainConfig(task="grid-risk", task_kwargs={"num_lines": 3}, init=str(tiny_llama_dir), steps=30,
                         max_minutes=None, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, eval_problems=4,
                         final_eval_problems=4, max_new_tokens=16, max_seq_len=256, precision="bfloat16")
    model, tok = _initial_model(cfg)
    batch = make_batch(_sample_examples(_solvable_task(cfg), tok, random.Random(0), 4, 256), tok.pad_token_id)
    with torch.no_grad():
        full = lm_loss(model, *batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = lm_loss(model, *batch)
    assert mixed.dtype == torch.float32 and mixed != full and abs(mixed - full) < 0.05 * full, (mixed, full)
    m = pretrain(cfg, tmp_path / "bf16", progress=False)
    assert m["precision"] == "bfloat16" and m["final_loss"] < 0.6 * m["initial_loss"], m
    from safetensors.torch import load_file

    saved_weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in saved_weights.values()} == {torch.float32}  # the master weights: never cast
    saved = json.loads((tmp_path / "bf16" / "config.json").read_text())["understudy_pretrain"]
    assert saved["precision"] == "bfloat16" and saved["config"]["precision"] == "bfloat16"
    assert PretrainConfig(precision="auto").resolved_precision == resolve_dtype("auto", "cpu")
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, got 'fp8'"):
        PretrainConfig(precision="fp8")


def test_sft_of_the_top_layers_only_leaves_the_rest_bitwise_unchanged(tiny_llama_dir, tmp_path):
    base = load_model(str(tiny_llama_dir), dtype="float32")
    n = len(base.model.layers)
    cfg = PretrainConfig(task="grid-risk", task_kwargs={"num_lines": 3}, init=str(tiny_llama_dir), steps=3,
                         max_minutes=None, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=0, eval_problems=2,
                         final_eval_problems=2, max_new_tokens=8, max_seq_len=256, train_layers=1)
    m = pretrain(cfg, tmp_path / "top1", progress=False)
    tuned = load_model(str(tmp_path / "top1"), dtype="float32")
    before, after = base.model.state_dict(), tuned.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {k for k in before if k.startswith((f"layers.{n - 1}.", "norm."))}
    assert changed and changed <= trainable, sorted(changed)  # the top layer moved, nothing below it did
    assert any(k.startswith(f"layers.{n - 1}.") for k in changed) and m["steps"] == 3
    with pytest.raises(ValueError, match="train_layers=0"):
        PretrainConfig(init=str(tiny_llama_dir), train_layers=0)
    with pytest.raises(ValueError, match="needs init"):
        PretrainConfig(train_layers=2)  # a fresh model from scratch has nothing to freeze
    with pytest.raises(ValueError, match=f"train_layers {n + 1} > the {n} decoder layers"):
        pretrain(PretrainConfig(task="grid-risk", init=str(tiny_llama_dir), steps=1, max_minutes=None,
                                train_layers=n + 1), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_solution_the_task_itself_rejects_is_never_trained_on():
    from understudy.trainer.tasks import GridRiskTask

    class Broken(GridRiskTask):
        def solution(self, problem: Problem) -> str:  # the arithmetic is shown, the verdict is wrong
            return super().solution(problem).rsplit("answer:", 1)[0] + "answer: overload L9"

    task, tok = Broken(num_lines=3), make_char_tokenizer()
    with pytest.raises(TaskError, match="wrote a solution its own check rejects"):
        example_ids(tok, task, task.sample(random.Random(0)))
    ids, prompt_len = example_ids(tok, GridRiskTask(num_lines=3), GridRiskTask(num_lines=3).sample(random.Random(0)))
    assert 0 < prompt_len < len(ids) and ids[-1] == tok.eos_token_id


def test_examples_longer_than_the_window_are_refused_by_name_and_the_constant_answer_line_is_measured():
    from understudy.trainer.pretrain import (
        _sample_examples,
        accuracy_where_constant_fails,
        constant_answer_baseline,
    )
    from understudy.trainer.tasks import GridRiskTask

    task, tok = GridRiskTask(num_lines=3), make_char_tokenizer()
    with pytest.raises(TaskError, match=r"longer than max_seq_len 40 tokens.*raise --max-seq-len"):
        _sample_examples(task, tok, random.Random(0), 4, 40)  # every grid-risk example is > 40 characters
    problems = [Problem("", a, {}) for a in ("secure", "secure", "overload L1", "secure", "overload L1 L3")]
    assert constant_answer_baseline(task, problems) == ("secure", 0.6)  # what the format alone can score
    # the skill beyond the constant: the mean reward on the two problems that `secure` gets wrong
    assert accuracy_where_constant_fails(task, problems, [1.0, 1.0, 1.0, 0.0, 0.0], "secure") == 0.5
    assert accuracy_where_constant_fails(task, problems, [1.0, 1.0, 0.0, 1.0, 0.0], "secure") == 0.0
    assert accuracy_where_constant_fails(task, problems[:2], [1.0, 1.0], "secure") is None  # never wrong there


def test_sft_with_lora_trains_adapters_only_and_saves_a_merged_plain_model(tiny_llama_dir, tmp_path):
    base = load_model(str(tiny_llama_dir), dtype="float32")
    cfg = PretrainConfig(task="grid-risk", task_kwargs={"num_lines": 3}, init=str(tiny_llama_dir), steps=3,
                         max_minutes=None, batch_size=4, lr=3e-2, warmup_steps=1, eval_every=0, eval_problems=2,
                         final_eval_problems=2, max_new_tokens=8, max_seq_len=256, lora_rank=2)
    m = pretrain(cfg, tmp_path / "lora", progress=False)
    assert 0 < m["lora_params"] < m["params"] / 10 and m["steps"] == 3
    tuned = load_model(str(tmp_path / "lora"), dtype="float32")
    before, after = base.model.state_dict(), tuned.model.state_dict()
    assert set(after) == set(before)  # merged: no adapter tensors, the same plain model
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    linear = {k for k in before if k.split(".")[-2] in ("wqkv", "wo", "w13", "w2") and k.endswith(".weight")}
    assert changed and changed <= linear, sorted(changed)  # the merged deltas; embedding, norms and head untouched
    with pytest.raises(ValueError, match="lora_rank=0"):
        PretrainConfig(init=str(tiny_llama_dir), lora_rank=0)
    with pytest.raises(ValueError, match="needs init"):
        PretrainConfig(lora_rank=4)
    with pytest.raises(ValueError, match="excludes train_layers"):
        PretrainConfig(init=str(tiny_llama_dir), lora_rank=4, train_layers=2)
