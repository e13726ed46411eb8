"""GRPO with TLT-accelerated rollouts: the main loop, as named, timed phases.

    sample -> rollout (speculative; idle workers spot-train the drafter) -> reward -> update (log-prob forward,
    whose hidden states feed the drafter buffer) -> drafter sync (between steps) -> eval / publish / checkpoint

The update (update.py) takes `ppo_epochs` x `ppo_mini_batches` optimizer steps per batch (1 x 1 = on-policy:
logp_old is the same forward, detached). The learner and the rollout engines share the policy's parameters in
this process; `Linear`'s pre-packed weights follow in-place updates.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from understudy.drafter.model import Drafter, load_drafter, new_drafter, save_drafter
from understudy.drafter.train import Sample, select_draft_vocab
from understudy.engine.bandit import BanditConfig
from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine
from understudy.engine.loader import LoadedModel, save_model
from understudy.engine.model import enable_cpu_packing
from understudy.engine.sampling import SamplingParams
from understudy.engine.text import encode_prompt
from understudy.trainer import crashpoints
from understudy.trainer.algos import get_adv_estimator, get_policy_loss
from understudy.trainer.checkpoint import (
    load_checkpoint,
    random_state_from_plain,
    random_state_to_plain,
    save_checkpoint,
)
from understudy.trainer.config import TrainConfig
from understudy.trainer.lineage import (
    new_run_id,
    publish_note,
    read_run_id,
    reconcile,
    run_versions,
    write_run_id,
)
from understudy.trainer.metrics_log import MetricsLog
from understudy.trainer.policy import load_policy
from understudy.trainer.rollout import RolloutRequest, RolloutResult, RolloutWorkers, rollout_controller
from understudy.trainer.spot import SpotDrafterTrainer
from understudy.trainer.tasks import Problem, get_task
from understudy.trainer.timing import PhaseTimes
from understudy.trainer.update import PolicyUpdater, UpdateConfig

log = logging.getLogger(__name__)


def _percentile(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return float(s[min(len(s) - 1, int(q * len(s)))]) if s else 0.0


class GRPOTrainer:
    def __init__(self, cfg: TrainConfig, policy: LoadedModel | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.lm = policy or load_policy(cfg)
        self.policy = self.lm.model
        self.tok = self.lm.tokenizer
        self.task = get_task(cfg.task, **cfg.task_kwargs)
        self.rng = random.Random(cfg.seed)
        eval_rng = random.Random(cfg.seed + 10_007)
        self.eval_problems = [self.task.sample(eval_rng) for _ in range(cfg.eval_problems)]
        self.opt = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.adv_fn = get_adv_estimator(cfg.advantage)
        self.ref = self._reference() if cfg.kl_coef > 0 else None
        self.updater = PolicyUpdater(self.policy, self.opt, get_policy_loss(cfg.policy_loss), UpdateConfig(
            ppo_epochs=cfg.ppo_epochs, ppo_mini_batches=cfg.ppo_mini_batches, micro_batch_tokens=cfg.micro_batch_tokens,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_coef=cfg.kl_coef, grad_clip=cfg.grad_clip,
            seed=cfg.seed), ref=self.ref)
        self.controller = rollout_controller(BanditConfig(arms=cfg.controller_arms, seed=cfg.seed),
                                             cfg.num_draft_tokens, cfg.rollout_k) if cfg.tlt else None
        self.spot = self._spot_trainer() if cfg.tlt else None
        n_req = cfg.prompts_per_step * cfg.group_size
        self.max_prompt = 512
        max_batch, max_len = math.ceil(n_req / cfg.rollout_workers), self.max_prompt + cfg.max_new_tokens + 1
        self.workers: Any
        if cfg.executor == "ray":  # each worker an actor; the spot trainer an actor behind the same interface
            from understudy.trainer.ray_exec import RayRolloutWorkers

            self.workers = RayRolloutWorkers(self.policy, self.lm.eos_token_ids, cfg, max_batch, max_len, self.spot)
            self.controller = self.workers.controller
            if self.workers.spot is not None:  # with spot training, the spot actor holds the drafter being trained
                self.spot = self.workers.spot
        else:
            self.workers = RolloutWorkers(
                self.policy, self.lm.eos_token_ids, cfg.rollout_workers, max_batch, max_len,
                cfg.num_draft_tokens if cfg.tlt else 0, self.controller,
                drafter_factory=self._drafter_copy if cfg.tlt else None, threads=cfg.threads,
                quantize=cfg.rollout_quantize)
        self.step = 0
        self.last_published: int | None = None  # registry version this run published last (parent of the next)
        self.run_id: str | None = None  # this run's identity in the registry's notes (lineage.py)
        self.published_ahead: dict[int, int] = {}  # after a resume: step -> drafter a crashed attempt published
        self.policies_ahead: dict[int, int] = {}  # ... and step -> policy version
        self.log = MetricsLog(self.out)

    # ---- construction helpers ------------------------------------------------------------------------------
    def _reference(self) -> Any:
        import copy

        ref = copy.deepcopy(self.policy).eval()
        ref.requires_grad_(False)
        return ref

    def _spot_trainer(self) -> SpotDrafterTrainer:
        from understudy.drafter.warmup import WARMUP_TRAIN

        c = self.cfg
        self._choose_vocab = False  # the warm-up picks a fresh drafter's draft vocabulary from its rollouts
        if c.drafter_init:
            d = load_drafter(Path(c.drafter_init), self.policy, self.lm.fingerprint)
        else:
            vocab = None
            if c.drafter_warmup_s > 0 and 0 < c.drafter_vocab_size < self.policy.config.vocab_size:
                # the head's final size from the start (executors and checkpoints keep one shape); the ids are
                # a placeholder until warmup_drafter() chooses them, before anything drafts
                vocab = torch.arange(c.drafter_vocab_size)
                self._choose_vocab = True
            d = new_drafter(self.policy, self.lm.fingerprint, vocab, seed=c.seed)
        d = d.float().bind(self.policy)
        # the warm-up recipe's loss (distillation-led, drafter/warmup.py), with this run's rate, depth and batch
        dcfg = replace(WARMUP_TRAIN, lr=c.drafter_lr, unroll_steps=c.drafter_unroll_steps, warmup_steps=10,
                       total_steps=100_000, tokens_per_batch=c.drafter_tokens_per_batch, seed=c.seed)
        return SpotDrafterTrainer(d, self.policy, dcfg, buffer_tokens=c.drafter_buffer_tokens, duty=c.spot_duty)

    def _drafter_copy(self) -> Drafter:
        assert self.spot is not None
        src = self.spot.drafter
        d = Drafter(src.config)
        d.load_state_dict(src.state_dict())
        return d.to(dtype=self.policy.dtype).bind(self.policy)

    # ---- one step ------------------------------------------------------------------------------------------
    def _requests(self, problems: list[Problem]) -> tuple[list[RolloutRequest], list[int]]:
        c = self.cfg
        reqs, groups = [], []
        for i, p in enumerate(problems):
            ids = encode_prompt(self.tok, p.prompt)[-self.max_prompt:]
            for g in range(c.group_size):
                seed = (c.seed * 1_000_003 + self.step * 10_007 + i * 101 + g) % (2**63)
                length, ignore_eos = c.max_new_tokens, False
                if c.length_profile == "long-tail":  # the length is the workload's, drawn per request (config.py)
                    draw = random.Random(seed).gauss(0.0, 1.0)
                    length, ignore_eos = min(c.max_new_tokens, max(1, round(c.max_new_tokens / 8 * math.exp(draw)))), True
                reqs.append(RolloutRequest(ids, SamplingParams(max_tokens=length, temperature=c.temperature,
                                                               top_p=c.top_p, seed=seed, ignore_eos=ignore_eos)))
                groups.append(i)
        return reqs, groups

    def train_step(self) -> dict[str, Any]:
        c, ph = self.cfg, PhaseTimes()
        with ph.timed("sample"):
            problems = [self.task.sample(self.rng) for _ in range(c.prompts_per_step)]
            reqs, groups = self._requests(problems)
        with ph.timed("rollout"):
            spot = self.spot if (self.spot is not None and c.spot_training and self.spot.has_data) else None
            result = self.workers.run(reqs, spot=spot, tag=f"s{self.step}", step=self.step + 1)
        with ph.timed("reward"):
            texts = [self.tok.decode(r, skip_special_tokens=True) for r in result.responses]
            rewards = [self.task.reward(problems[g], t) for g, t in zip(groups, texts, strict=True)]
        with ph.timed("update"):
            update = self._update(reqs, result.responses, rewards, groups)
        with ph.timed("drafter_sync"):
            self.workers.sync(self.spot)
        self.step += 1
        return self._metrics(ph, result, rewards, update)

    def _update(self, reqs: list[RolloutRequest], responses: list[list[int]], rewards: list[float],
                groups: list[int]) -> dict[str, Any]:
        adv = self.adv_fn(torch.tensor(rewards, dtype=torch.float32), torch.tensor(groups))
        seqs = [(r.prompt_ids + resp, len(r.prompt_ids)) for r, resp in zip(reqs, responses, strict=True)]
        samples: list[Sample] | None = [] if self.spot is not None else None
        update = self.updater.update(seqs, adv, step=self.step, samples=samples)
        if self.spot is not None and samples is not None:
            self.spot.add(samples)
        return {**update, "advantage_abs_mean": float(adv.abs().mean())}

    # ---- reporting -----------------------------------------------------------------------------------------
    def _metrics(self, ph: PhaseTimes, result: RolloutResult, rewards: list[float], update: dict[str, Any]) -> dict[str, Any]:
        lengths = [len(r) for r in result.responses]
        tokens = sum(lengths)
        m: dict[str, Any] = {
            "step": self.step, "reward_mean": sum(rewards) / len(rewards),
            "accuracy": sum(r >= 1.0 for r in rewards) / len(rewards),
            "response_len_p50": _percentile(lengths, 0.5), "response_len_p90": _percentile(lengths, 0.9),
            "response_len_max": max(lengths), "rollout_tokens": tokens, "response_lengths": lengths,
            "rollout_tokens_per_s": tokens / result.seconds if result.seconds else 0.0,
            "time": {k: round(v, 4) for k, v in ph.seconds.items()},
            "idle_fraction": round(result.idle_fraction, 4),
            "spot_train_s": round(sum(w.spot_train_s for w in result.workers), 4),
            "spot_steps": sum(w.spot_steps for w in result.workers),
            "spot_overrun_s": round(result.spot_overrun_s, 4),
            "workers": [{"busy_s": round(w.busy_s, 3), "idle_s": round(w.idle_s, 3), "tokens": w.tokens}
                        for w in result.workers],
            "rerun_requests": result.rerun_requests,
            "spec": result.spec.to_dict(), "k_steps": {str(k): v for k, v in sorted(result.ks.items())},
            "update": update,
        }
        if self.controller is not None:
            m["controller"] = self.controller.state()["buckets"]
        if self.spot is not None and self.spot.last_metrics:
            m["drafter"] = {k: round(v, 4) for k, v in self.spot.last_metrics.items()}
        return m

    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        """Accuracy on the fixed held-out problems, plain decoding (it measures the policy only): greedy, and
        sampled at the rollout temperature with fixed per-problem seeds (the quantity GRPO optimises; identical
        seeds at every evaluation, so the curve moves only when the policy does)."""
        prompts = [encode_prompt(self.tok, p.prompt)[-self.max_prompt:] for p in self.eval_problems]
        eng = Engine(self.policy, EngineConfig(max_batch_size=len(prompts), max_model_len=self.max_prompt +
                                               self.cfg.max_new_tokens + 1, num_speculative_tokens=0,
                                               dtype=str(self.policy.dtype).removeprefix("torch."), num_threads=None),
                     self.lm.eos_token_ids)
        modes = [("eval_accuracy", 0.0)]
        if self.cfg.temperature > 0:  # greedy rollouts: the sampled accuracy would be the greedy one again
            modes.append(("eval_accuracy_sampled", self.cfg.temperature))
        out: dict[str, float] = {}
        for key, temp in modes:
            params = [SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=temp, top_p=self.cfg.top_p,
                                     seed=self.cfg.seed * 7_919 + i) for i in range(len(prompts))]
            outs = eng.generate(prompts, params)
            scores = [self.task.reward(p, self.tok.decode(o, skip_special_tokens=True))
                      for p, o in zip(self.eval_problems, outs, strict=True)]
            out[key] = sum(s >= 1.0 for s in scores) / len(scores)
        if self.cfg.executor == "ray":  # nothing else decodes here: drop the pre-packed weight copies (a model's size)
            enable_cpu_packing(self.policy, False)
        return out

    def close(self) -> None:
        """Release the rollout workers (the Ray executor's actors; nothing for the local one)."""
        self.workers.close()

    # ---- publishing and checkpoints -------------------------------------------------------------------------
    def publish(self) -> dict[str, Any]:
        """Save the policy; publish the pair: the policy, then the drafter trained against it, which names it
        (once per step per run: a step that a crashed attempt already published reuses those versions, see
        lineage.py). A server following `latest` then serves this policy with this drafter."""
        from understudy.registry.store import Registry

        out: dict[str, Any] = {}
        policy_dir = self.out / f"policy-step{self.step:05d}"
        save_model(self.policy, self.tok, policy_dir, extra_config={"understudy_policy_step": self.step})
        save_model(self.policy, self.tok, self.out / "policy", extra_config={"understudy_policy_step": self.step})
        out["policy"] = str(policy_dir)
        if self.spot is None:
            return out
        reg = Registry.open(self.cfg.registry)
        out["policy_version"] = pv = self._publish_policy(reg, policy_dir)
        if self.step in self.published_ahead:  # published before a crash; the checkpoint did not know yet
            self.last_published = self.published_ahead.pop(self.step)
            log.info("step %d already has drafter version %d (published before the crash): not publishing again",
                     self.step, self.last_published)
            return {**out, "drafter_version": self.last_published, "reused": True}
        ev = self.spot.evaluate(k=self.cfg.num_draft_tokens) or {}
        folder = self.out / f"drafter-step{self.step:05d}"
        save_drafter(self.spot.drafter, folder, extra_training={"heldout": ev, "policy_step": self.step})
        crashpoints.reach("publish_before", self.step)
        info = reg.publish(
            folder, metrics={"heldout_acceptance_length": ev.get("expected_acceptance_length"),
                             "top1_agreement": ev.get("top1_agreement"),
                             # the server's canary compares live acceptance at the K it drafts with these
                             "per_position_acceptance": ev.get("per_position_acceptance")},
            training_config=self.cfg.to_json(), policy_version=self.step, policy=pv, parent=self.last_published,
            note=publish_note(self._run_id(), self.step))
        crashpoints.reach("publish_after", self.step)
        self.last_published = info.version  # the next version's parent (kept across --resume)
        return {**out, "drafter_version": info.version,
                "heldout_acceptance_length": ev.get("expected_acceptance_length")}

    def _publish_policy(self, reg: Any, policy_dir: Path) -> int:
        """The step's policy version: published now, or the one a crashed attempt of this step published."""
        if self.step in self.policies_ahead:
            v = self.policies_ahead.pop(self.step)
            log.info("step %d already has policy version %d (published before the crash): not publishing again",
                     self.step, v)
            return v
        info = reg.publish_policy(policy_dir, family_fingerprint=self.lm.fingerprint,
                                  target=self.lm.config.family_shape(), policy_version=self.step,
                                  training_config=self.cfg.to_json(), note=publish_note(self._run_id(), self.step))
        crashpoints.reach("publish_policy_after", self.step)
        return info.version

    def _run_id(self) -> str:
        """This run's id; a fresh run gets one (written to OUT_DIR/run.json before its first publish)."""
        if self.run_id is None:
            self.run_id = new_run_id()
            write_run_id(self.out, self.run_id)
        return self.run_id

    def save(self) -> None:
        save_checkpoint(self.out / "checkpoint.pt", {
            "step": self.step, "policy": self.policy.state_dict(), "opt": self.opt.state_dict(),
            "spot": self.spot.state_dict() if self.spot is not None else None,
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "rng": random_state_to_plain(self.rng.getstate()), "torch_rng": torch.get_rng_state(),
            "config": self.cfg.to_json(), "run_id": self._run_id(), "last_published": self.last_published,
        }, step=self.step)
        crashpoints.reach("checkpoint_after", self.step)

    def resume(self) -> bool:
        """Continue from OUT_DIR/checkpoint.pt (False: none, start at step 0 but keep the run's identity), then
        reconcile with the registry so that no step's drafter is published twice or lost."""
        ck = load_checkpoint(self.out / "checkpoint.pt")
        if ck is None:
            self.run_id = read_run_id(self.out)  # a run killed before its first checkpoint
            self.log.truncate_after(-1)  # it restarts from scratch: its log does too
            self._reconcile()
            return False
        with torch.no_grad():
            self.policy.load_state_dict(ck["policy"])
        self.opt.load_state_dict(ck["opt"])
        if self.spot is not None and ck.get("spot"):
            self.spot.load_state_dict(ck["spot"])
            self.workers.load_drafter_weights(self.spot.drafter)
        if self.controller is not None and ck.get("controller"):
            self.controller.load_state_dict(ck["controller"])
        self.rng.setstate(random_state_from_plain(ck["rng"]))
        self.last_published = ck.get("last_published")
        self.run_id = ck.get("run_id") or read_run_id(self.out)
        torch.set_rng_state(ck["torch_rng"])
        self.step = int(ck["step"])
        self.workers.refresh_weights()
        self.log.truncate_after(self.step)
        self._reconcile()
        return True

    def _reconcile(self) -> None:
        if self.spot is None or self.run_id is None:
            return
        from understudy.registry.store import Registry

        versions = Registry.open(self.cfg.registry).list_versions()
        r = reconcile(run_versions(((v.version, v.manifest) for v in versions), self.run_id), self.step,
                      self.last_published)
        self.last_published, self.published_ahead = r.last_published, r.ahead
        policies = run_versions(((v.version, v.manifest) for v in versions), self.run_id, kind="policy")
        self.policies_ahead = {s: v for s, v in policies.items() if s > self.step}
        if r.ahead:
            log.info("resuming at step %d: steps %s were already published (versions %s) and will not be again",
                     self.step, sorted(r.ahead), [r.ahead[s] for s in sorted(r.ahead)])

    def warmup_drafter(self) -> dict[str, float]:
        """Self-distil the drafter on the initial policy's own sampled rollouts (a third of the budget generates,
        the rest trains), so TLT starts with a useful drafter. Problems come from a separate RNG: the RL data
        stream is the same with and without it."""
        from understudy.drafter.warmup import generate_samples

        assert self.spot is not None
        c, t0 = self.cfg, time.perf_counter()
        rng = random.Random(c.seed + 20_011)
        problems = [self.task.sample(rng) for _ in range(max(256, 16 * c.prompts_per_step * c.group_size))]  # the deadline stops it
        prompts = [encode_prompt(self.tok, p.prompt)[-self.max_prompt:] for p in problems]
        params = [SamplingParams(max_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                 seed=c.seed + i) for i in range(len(prompts))]
        samples = [s for s in generate_samples(self.lm, prompts, params, 64, "drafter warm-up data",
                                               deadline=time.monotonic() + c.drafter_warmup_s / 3) if s is not None]
        if self._choose_vocab and samples:
            self.spot.set_draft_vocab(select_draft_vocab(samples, c.drafter_vocab_size, self.policy.config.vocab_size,
                                                         always=self.lm.eos_token_ids))
        self.spot.add(samples)
        steps = self.spot.train_for(max(1.0, c.drafter_warmup_s - (time.perf_counter() - t0)))
        self.workers.load_drafter_weights(self.spot.drafter)
        ev = self.spot.evaluate(k=c.num_draft_tokens) or {}
        return {"drafter_warmup_s": round(time.perf_counter() - t0, 2), "drafter_warmup_steps": steps,
                "drafter_warmup_acceptance_length": ev.get("expected_acceptance_length", 0.0)}

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        c = self.cfg
        history: list[dict[str, Any]] = []
        if self.step == 0:
            warm = self.warmup_drafter() if (self.spot is not None and c.drafter_warmup_s > 0) else {}
            first = {"step": 0, **self.evaluate(), **warm}
            self.log.write(first)
            history.append(first)
        bar = tqdm(total=c.steps, initial=self.step, desc="GRPO", unit="step", disable=not self.progress)
        while self.step < c.steps:
            m = self.train_step()
            last = self.step == c.steps
            if (c.eval_every and self.step % c.eval_every == 0) or last:
                t0 = time.perf_counter()
                m.update(self.evaluate())
                m["time"]["eval"] = round(time.perf_counter() - t0, 4)
            published = bool(c.publish_every and self.step % c.publish_every == 0) or last
            if published:
                t0 = time.perf_counter()
                m["published"] = self.publish()
                m["time"]["publish"] = round(time.perf_counter() - t0, 4)
            self.log.write(m)  # before the checkpoint: a resume never lacks the line of a checkpointed step
            if published or self.step % c.checkpoint_every == 0 or last:  # a publish is always checkpointed
                self.save()
            history.append(m)
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward_mean']:.2f}", acc=f"{m.get('eval_accuracy', m['accuracy']):.2f}",
                            accept=f"{m['spec']['mean_acceptance_length']:.2f}", refresh=False)
        bar.close()
        self.log.close()
        if history:
            (self.out / "summary.json").write_text(json.dumps(history[-1], indent=2, default=str))
        return {"history": history}
