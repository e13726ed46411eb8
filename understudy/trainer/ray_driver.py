"""`understudy train` with `executor = "ray"`: the learner is an actor, and this driver restarts it from its last
checkpoint when its process dies (`ray_learner_restarts` times). The learner creates and owns the rollout and spot
actors (ray_exec.py), so they go with it and a restarted learner starts its own.

A restarted learner resumes exactly as `understudy train --resume` does: weights, optimizer, drafter, buffer,
controller and RNGs from the checkpoint, then the registry's lineage notes so that no step's policy or drafter is
published twice or lost (lineage.py). A crash point armed for the first learner (crashpoints.py) is not armed for
its replacements: the fault tests inject one failure and watch the recovery.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from understudy.trainer.config import TrainConfig
from understudy.trainer.ray_exec import RayExecutorError, actor_died, crash_env, ensure_ray

log = logging.getLogger(__name__)


class LearnerActor:
    """The GRPO learner in its own process (wrapped by ray.remote in `train`)."""

    def __init__(self, cfg: TrainConfig, progress: bool) -> None:
        from understudy.trainer.grpo import GRPOTrainer

        self.trainer = GRPOTrainer(cfg, progress=progress)

    def fit(self, resume: bool) -> dict[str, Any]:
        t = self.trainer
        if resume:
            at = "resumed from the checkpoint at step" if t.resume() else "no checkpoint: starting at step"
            print(f"learner: {at} {t.step}", flush=True)
        out = t.fit()
        out["final_step"] = t.step
        t.close()
        return out


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """Actors may not share the driver's working directory: local paths become absolute."""
    changes: dict[str, Any] = {"out_dir": str(Path(cfg.out_dir).resolve())}
    if cfg.registry and "://" not in cfg.registry:
        changes["registry"] = str(Path(cfg.registry).resolve())
    for key in ("policy", "drafter_init"):
        value = getattr(cfg, key)
        if value and Path(value).exists():
            changes[key] = str(Path(value).resolve())
    return cfg.replace(**changes)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the learner as an actor until it finishes; restart it from its checkpoint if its process dies."""
    ray = ensure_ray(cfg.ray_address)
    cfg = _absolute(cfg)
    Learner = ray.remote(LearnerActor)
    restarts = 0
    while True:
        opts: dict[str, Any] = {"num_cpus": 0, **crash_env(fresh=restarts > 0)}
        learner = Learner.options(**opts).remote(cfg, progress)
        try:
            out = ray.get(learner.fit.remote(resume or restarts > 0))
            out["learner_restarts"] = restarts
            return out
        except actor_died() as e:
            restarts += 1
            if restarts > cfg.ray_learner_restarts:
                raise RayExecutorError(f"the learner died {restarts} times (ray_learner_restarts = "
                                       f"{cfg.ray_learner_restarts}): {e}. Its checkpoint is in {cfg.out_dir}; "
                                       "`understudy train --resume` continues from it") from e
            log.warning("the learner died (%s); restarting it from its last checkpoint in %s (restart %d of %d)",
                        type(e).__name__, cfg.out_dir, restarts, cfg.ray_learner_restarts)
            print(f"driver: the learner died; restarting it from {cfg.out_dir}/checkpoint.pt "
                  f"({restarts}/{cfg.ray_learner_restarts})", flush=True)
