"""Resolve the policy to train: a model spec (preset, folder, .gguf), or `pretrain:<task>` = the tiny recipe,
trained once and cached under the user cache directory."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from understudy.engine.loader import LoadedModel, cache_dir, load_model
from understudy.trainer.config import TrainConfig

log = logging.getLogger(__name__)


def pretrained_tiny_policy(task: str, minutes: float, seed: int, task_kwargs: dict | None = None) -> Path:
    from understudy.trainer.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(task=task, task_kwargs=dict(task_kwargs or {}), max_minutes=minutes, seed=seed)
    key = hashlib.sha256(json.dumps([task, minutes, seed, task_kwargs or {}], sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / "policies" / f"pretrain-{task}-{key}"
    if (out / "config.json").exists():
        return out
    log.info("pretraining a tiny %s policy for %.1f min (cached at %s)", task, minutes, out)
    pretrain(cfg, out)
    return out


def load_policy(cfg: TrainConfig) -> LoadedModel:
    spec = cfg.policy
    if spec.startswith("pretrain:"):
        spec = str(pretrained_tiny_policy(spec.split(":", 1)[1], cfg.pretrain_minutes, cfg.seed))
    lm = load_model(spec, dtype=cfg.dtype, device=cfg.device)
    lm.model.requires_grad_(True)
    return lm
