"""Shared set-up of the RL trainer tests: a tiny Llama policy, a JSONL task with mixed rewards, a trained tiny
drafter (the session fixture `rl_assets` in conftest.py), and small configs for in-process and CLI runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import build_tiny_hf, train_tiny_drafter
from understudy.engine.loader import load_model
from understudy.engine.text import encode_prompt
from understudy.trainer.config import TrainConfig

WORDS = ["grid", "line", "flow", "risk", "load", "sum", "wind", "trip"]


def make_rl_assets(root: Path) -> dict[str, Any]:
    model_dir = build_tiny_hf(root / "policy", "llama")
    rows = [{"prompt": " ".join(WORDS[(i + j) % 8] for j in range(1 + i % 4)), "answer": "e"} for i in range(40)]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm = load_model(str(model_dir), dtype="float32")
    prompts = [encode_prompt(lm.tokenizer, r["prompt"]) for r in rows]
    return {"root": root, "model": model_dir, "task": root / "task.jsonl", "lm": lm, "prompts": prompts,
            "drafter": train_tiny_drafter(lm, prompts[:24], steps=60)}


def cfg_for(rl_assets: dict[str, Any], tmp_path: Path, **over: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        policy=str(rl_assets["model"]), task="jsonl", task_kwargs={"path": str(rl_assets["task"]), "reward": "contains"},
        steps=2, prompts_per_step=4, group_size=4, max_new_tokens=24, lr=1e-3, out_dir=str(tmp_path / "run"),
        registry=str(tmp_path / "reg"), publish_every=0, checkpoint_every=1, eval_every=0, eval_problems=4,
        rollout_workers=2)
    base.update(over)
    return TrainConfig(**base)


def write_toml(cfg: TrainConfig, path: Path) -> Path:
    """The config as a TOML file for `understudy train --config` (None fields left out)."""
    lines = []
    for k, v in cfg.to_json().items():
        if v is None:
            continue
        if isinstance(v, dict):
            lines.append(f"{k} = {{ " + ", ".join(f"{a} = {json.dumps(b)}" for a, b in v.items()) + " }")
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path
