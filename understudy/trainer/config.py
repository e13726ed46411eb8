"""The RL run's one config: a frozen dataclass, loaded from TOML (`understudy train --config FILE`).

Every field has a comment; the resolved config is written into each checkpoint and each published drafter's
manifest. Unknown keys are errors that name the key and the file (a typo must not silently train something else).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from understudy.errors import UnderstudyError


class TrainConfigError(UnderstudyError, ValueError):
    """A config file or field is invalid (names the file/field and the fix)."""


@dataclass(frozen=True)
class TrainConfig:
    # ---- policy and task ----
    policy: str = "pretrain:arith"  # model to train: preset, HF folder, .gguf, or "pretrain:<task>" (tiny recipe, cached)
    pretrain_minutes: float = 4.0  # budget of the tiny pretraining recipe when policy = "pretrain:<task>"
    task: str = "arith"  # registered task (arith, countdown, grid-risk, jsonl)
    task_kwargs: dict[str, Any] = field(default_factory=dict)  # options of the task (e.g. {"max_digits": 3})
    # ---- GRPO ----
    steps: int = 30  # RL steps (one rollout + one policy update of ppo_epochs x ppo_mini_batches optimizer steps)
    prompts_per_step: int = 8  # distinct problems per step
    group_size: int = 8  # samples per problem (the GRPO group)
    max_new_tokens: int = 160  # response budget
    temperature: float = 1.0  # rollout sampling temperature
    top_p: float = 1.0  # rollout nucleus sampling
    advantage: str = "grpo"  # registered advantage estimator: grpo | drgrpo (no std normalisation)
    policy_loss: str = "clip"  # registered policy loss (token-mean clipped surrogate)
    clip_low: float = 0.2  # ratio clip below 1 - clip_low
    clip_high: float = 0.28  # ratio clip above 1 + clip_high (DAPO clip-higher)
    kl_coef: float = 0.0  # KL to the initial policy (k3); 0 = off
    ppo_epochs: int = 1  # optimisation passes over each rollout batch; > 1 makes the ratio (and the clip) act
    ppo_mini_batches: int = 1  # optimizer steps per epoch (the batch's sequences split evenly, reshuffled per epoch)
    lr: float = 1e-5  # policy AdamW learning rate
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_tokens: int = 8192  # tokens per forward/backward chunk of the update
    # ---- TLT: speculative rollouts + spot drafter training ----
    speculation: bool = True  # rollouts with speculative decoding (False = the no-TLT baseline)
    num_draft_tokens: int = 4  # largest K the adaptive controller may pick
    controller_arms: tuple[int, ...] = (0, 2, 4)  # K arms of the adaptive rollout controller (0 = off)
    rollout_k: int | None = None  # a fixed K for every rollout step instead of the adaptive controller (0: no
    #                               drafting, spot training still on: e.g. to measure spot training's interference)
    rollout_workers: int = 2  # rollout engines; the share of a worker that finishes early trains the drafter
    rollout_quantize: str = "none"  # none | int8 | int4: rollouts decode a weight-only quantised copy of the policy
    # (CPU), re-quantised after every update; log-probs and the update stay in float (docs/performance.md)
    spot_training: bool = True  # train the drafter on idle rollout capacity
    spot_duty: float = 1.0  # share of the idle window the spot trainer computes; below 1 it rests between steps
    # (rest = last step time x (1/duty - 1)), meant to leave more memory bandwidth to a worker still decoding
    drafter_init: str | None = None  # drafter folder to start from (None = fresh)
    drafter_warmup_s: float = 0.0  # before step 1: self-distil the drafter on the initial policy's own rollouts
    drafter_vocab_size: int = 2048  # a fresh drafter drafts from the warm-up rollouts' most frequent tokens (the
    # warm-up recipe's reduced head, docs/drafter-recipe.md; the head is most of a drafter step); 0 = the full
    # vocabulary, which is also what a run without warm-up (no data to choose from) or with drafter_init uses
    drafter_lr: float = 1e-3  # drafter AdamW learning rate
    drafter_unroll_steps: int = 2  # training-time-test depth of the drafter loss
    drafter_tokens_per_batch: int = 2048  # drafter training batch
    drafter_buffer_tokens: int = 60000  # most recent rollout tokens (with features) kept for drafter training
    length_profile: str = "task"  # "task": a response ends at EOS or max_new_tokens; "long-tail": a benchmark
    # workload with reasoning RL's spread: each response decodes (EOS ignored) to its own length, drawn from a
    # lognormal with median max_new_tokens / 8 and sigma 1 (about 1 in 20 reaches max_new_tokens)
    # ---- where the workers run ----
    executor: str = "local"  # local: rollout workers are threads of this process; ray: actors (docs/ray.md)
    ray_address: str | None = None  # Ray cluster to join ("auto", "HOST:6379"); None = an embedded local cluster
    ray_worker_cpus: float = 1.0  # CPUs each rollout actor reserves (the spot trainer and learner reserve none)
    ray_worker_gpus: float = 0.0  # GPUs each rollout actor reserves
    ray_learner_restarts: int = 2  # `understudy train` with Ray: restarts of a dead learner from its checkpoint
    # ---- publishing, checkpoints, logs ----
    out_dir: str = "runs/arith-tiny"  # checkpoints, policy folders, metrics.jsonl, TensorBoard events
    registry: str | None = None  # drafter registry (None = $UNDERSTUDY_REGISTRY or the user data dir)
    publish_every: int = 10  # publish the drafter (and save the policy) every N steps and at the end; 0 = end only
    checkpoint_every: int = 5  # resumable checkpoint every N steps (and at the end)
    eval_every: int = 5  # greedy accuracy on a fixed held-out problem set every N steps (0 = start and end only)
    eval_problems: int = 64  # held-out problems for the accuracy curve
    dtype: str = "float32"  # policy/learner dtype
    device: str = "cpu"
    threads: int = 1  # torch intra-op threads per worker
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.prompts_per_step >= 1 and self.group_size >= 2, "need prompts_per_step >= 1 and group_size >= 2"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (0 < self.temperature <= 2, "temperature must be in (0, 2] (GRPO samples)"),
            (self.lr > 0 and self.drafter_lr > 0, "lr and drafter_lr must be > 0"),
            (self.drafter_vocab_size >= 0, "drafter_vocab_size must be >= 0 (0 = the full vocabulary)"),
            (self.rollout_workers >= 1, "rollout_workers must be >= 1"),
            (self.rollout_quantize in ("none", "int8", "int4"), "rollout_quantize must be none, int8 or int4"),
            (self.rollout_quantize == "none" or (self.device == "cpu" and self.dtype == "float32"),
             "rollout_quantize needs device = \"cpu\" and dtype = \"float32\" (the kernels are CPU float32)"),
            (0 < self.spot_duty <= 1, "spot_duty must be in (0, 1] (1 = train through the whole idle window)"),
            (0 <= self.num_draft_tokens <= 16, "num_draft_tokens must be in [0, 16]"),
            (len(set(self.controller_arms)) >= 2, "controller_arms needs at least two distinct K (e.g. [0, 4])"),
            (self.rollout_k is None or 0 <= self.rollout_k <= self.num_draft_tokens,
             "rollout_k must be in [0, num_draft_tokens] (or unset: the adaptive controller picks K)"),
            (self.rollout_k is None or self.tlt, "rollout_k needs speculation = true and num_draft_tokens > 0 "
                                                  "(without speculation there is no K to fix)"),
            (self.dtype in ("float32", "bfloat16"), "dtype must be float32 or bfloat16"),
            (self.publish_every >= 0 and self.checkpoint_every >= 1, "publish_every >= 0, checkpoint_every >= 1"),
            (self.length_profile in ("task", "long-tail"), "length_profile must be \"task\" or \"long-tail\""),
            (self.executor in ("local", "ray"), "executor must be \"local\" or \"ray\" (docs/ray.md)"),
            (self.ray_worker_cpus >= 0 and self.ray_worker_gpus >= 0 and self.ray_learner_restarts >= 0,
             "ray_worker_cpus, ray_worker_gpus and ray_learner_restarts must be >= 0"),
            (self.ppo_epochs >= 1, "ppo_epochs must be >= 1 (1 = one optimizer pass per rollout batch)"),
            (1 <= self.ppo_mini_batches <= self.prompts_per_step * self.group_size,
             "ppo_mini_batches must be in [1, prompts_per_step * group_size]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainConfigError(f"train config: {msg}")

    @property
    def tlt(self) -> bool:
        return self.speculation and self.num_draft_tokens > 0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["controller_arms"] = list(self.controller_arms)
        return d

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    path = Path(path)
    if not path.exists():
        raise TrainConfigError(f"config file {path} does not exist (see configs/ for examples)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TrainConfigError(f"{path} is not valid TOML: {e}") from e
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise TrainConfigError(f"{path}: unknown field(s) {', '.join(unknown)}; valid fields are documented in "
                               "understudy/trainer/config.py")
    if "controller_arms" in raw:
        raw["controller_arms"] = tuple(raw["controller_arms"])
    try:
        return TrainConfig(**raw)
    except TypeError as e:
        raise TrainConfigError(f"{path}: {e}") from e
