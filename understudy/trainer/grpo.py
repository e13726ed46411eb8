"""GRPO with TLT-accelerated rollouts: the main loop, as named, timed phases.

    sample -> rollout (speculative; idle workers spot-train the drafter) -> reward -> update (log-prob forward,
    whose hidden states feed the drafter buffer) -> drafter sync (between steps) -> eval / publish / checkpoint

One policy update per batch (on-policy: logp_old is the same forward, detached). The learner and the rollout
engines share the policy's parameters in this process; `Linear`'s pre-packed weights follow in-place updates.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from understudy.drafter.model import Drafter, load_drafter, new_drafter, save_drafter
from understudy.drafter.train import DrafterTrainConfig, Sample
from understudy.engine.bandit import AdaptiveController, BanditConfig
from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine
from understudy.engine.loader import LoadedModel, save_model
from understudy.engine.sampling import SamplingParams
from understudy.engine.text import encode_prompt
from understudy.trainer.algos import get_adv_estimator, get_policy_loss, token_logprobs
from understudy.trainer.checkpoint import load_checkpoint, save_checkpoint
from understudy.trainer.config import TrainConfig
from understudy.trainer.metrics_log import MetricsLog
from understudy.trainer.policy import load_policy
from understudy.trainer.rollout import RolloutRequest, RolloutResult, RolloutWorkers
from understudy.trainer.spot import SpotDrafterTrainer
from understudy.trainer.tasks import Problem, get_task
from understudy.trainer.timing import PhaseTimes

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
        self.loss_fn = get_policy_loss(cfg.policy_loss)
        self.ref = self._reference() if cfg.kl_coef > 0 else None
        self.controller = AdaptiveController(BanditConfig(arms=cfg.controller_arms, seed=cfg.seed),
                                             max_k=cfg.num_draft_tokens) if cfg.tlt else None
        self.spot = self._spot_trainer() if cfg.tlt else None
        n_req = cfg.prompts_per_step * cfg.group_size
        self.max_prompt = 512
        self.workers = RolloutWorkers(
            self.policy, self.lm.eos_token_ids, cfg.rollout_workers, math.ceil(n_req / cfg.rollout_workers),
            self.max_prompt + cfg.max_new_tokens + 1, cfg.num_draft_tokens if cfg.tlt else 0, self.controller,
            drafter_factory=self._drafter_copy if cfg.tlt else None, threads=cfg.threads)
        self.step = 0
        self.last_published: int | None = None  # registry version this run published last (parent of the next)
        self.log = MetricsLog(self.out)

    # ---- construction helpers ------------------------------------------------------------------------------
    def _reference(self) -> Any:
        import copy

        ref = copy.deepcopy(self.policy).eval()
        ref.requires_grad_(False)
        return ref

    def _spot_trainer(self) -> SpotDrafterTrainer:
        c = self.cfg
        if c.drafter_init:
            d = load_drafter(Path(c.drafter_init), self.policy, self.lm.fingerprint)
        else:
            d = new_drafter(self.policy, self.lm.fingerprint, seed=c.seed)
        d = d.float().bind(self.policy)
        dcfg = DrafterTrainConfig(lr=c.drafter_lr, unroll_steps=c.drafter_unroll_steps, warmup_steps=10,
                                  total_steps=100_000, tokens_per_batch=c.drafter_tokens_per_batch, seed=c.seed)
        return SpotDrafterTrainer(d, self.policy, dcfg, buffer_tokens=c.drafter_buffer_tokens)

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
                reqs.append(RolloutRequest(ids, SamplingParams(max_tokens=c.max_new_tokens, temperature=c.temperature,
                                                               top_p=c.top_p, seed=seed)))
                groups.append(i)
        return reqs, groups

    def train_step(self) -> dict[str, Any]:
        c, ph = self.cfg, PhaseTimes()
        with ph.timed("sample"):
            problems = [self.task.sample(self.rng) for _ in range(c.prompts_per_step)]
            reqs, groups = self._requests(problems)
        with ph.timed("rollout"):
            spot = self.spot if (self.spot is not None and c.spot_training and self.spot.has_data) else None
            result = self.workers.run(reqs, spot=spot, tag=f"s{self.step}")
        with ph.timed("reward"):
            texts = [self.tok.decode(r, skip_special_tokens=True) for r in result.responses]
            rewards = [self.task.reward(problems[g], t) for g, t in zip(groups, texts, strict=True)]
        with ph.timed("update"):
            update = self._update(reqs, result.responses, rewards, groups)
        with ph.timed("drafter_sync"):
            if self.spot is not None:
                self.workers.load_drafter_weights(self.spot.drafter)
            self.workers.refresh_weights()
        self.step += 1
        return self._metrics(ph, result, rewards, update)

    def _update(self, reqs: list[RolloutRequest], responses: list[list[int]], rewards: list[float],
                groups: list[int]) -> dict[str, float]:
        c = self.cfg
        adv = self.adv_fn(torch.tensor(rewards, dtype=torch.float32), torch.tensor(groups))
        seqs = [(r.prompt_ids + resp, len(r.prompt_ids)) for r, resp in zip(reqs, responses, strict=True)]
        n_tokens = sum(len(s) - p for s, p in seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
        self.policy.train()
        self.opt.zero_grad(set_to_none=True)
        samples: list[Sample] = []
        agg: dict[str, float] = {}
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and (j - i + 1) * len(seqs[order[j]][0]) <= c.micro_batch_tokens:
                j += 1
            idx = order[i:j]
            m = self._micro_batch([seqs[k] for k in idx], adv[idx], n_tokens, samples)
            for k, v in m.items():
                agg[k] = agg.get(k, 0.0) + v * len(idx) / len(seqs)
            i = j
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.grad_clip))
        self.opt.step()
        self.policy.eval()
        if self.spot is not None:
            self.spot.add(samples)
        return {**agg, "grad_norm": grad_norm, "advantage_abs_mean": float(adv.abs().mean())}

    def _micro_batch(self, seqs: list[tuple[list[int], int]], adv: torch.Tensor, n_total: int,
                     samples: list[Sample]) -> dict[str, float]:
        c = self.cfg
        T = max(len(s) for s, _ in seqs)
        toks = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T - 1, dtype=torch.bool)
        for b, (s, p) in enumerate(seqs):
            toks[b, :len(s)] = torch.tensor(s)
            mask[b, p - 1:len(s) - 1] = True  # logits at t predict token t+1: the response tokens
        hidden = self.policy(toks)  # [b, T, H]: the update's own forward, also the drafter's features
        logp = token_logprobs(self.policy.logits(hidden[:, :-1]), toks[:, 1:])  # [b, T-1]
        ref = None
        if self.ref is not None:
            with torch.no_grad():
                ref = token_logprobs(self.ref.logits(self.ref(toks)[:, :-1]), toks[:, 1:])
        loss, m = self.loss_fn(logp, logp.detach(), adv, mask, clip_low=c.clip_low, clip_high=c.clip_high,
                               logp_ref=ref, kl_coef=c.kl_coef)
        (loss * (mask.sum() / max(n_total, 1))).backward()  # token-mean over the whole batch, not the chunk
        feats = hidden.detach().float()
        for b, (s, p) in enumerate(seqs):
            samples.append(Sample(tokens=toks[b, :len(s)].clone(), features=feats[b, :len(s)].clone(), prompt_len=p))
        return m

    # ---- reporting -----------------------------------------------------------------------------------------
    def _metrics(self, ph: PhaseTimes, result: RolloutResult, rewards: list[float], update: dict[str, float]) -> dict[str, Any]:
        lengths = [len(r) for r in result.responses]
        tokens = sum(lengths)
        m: dict[str, Any] = {
            "step": self.step, "reward_mean": sum(rewards) / len(rewards),
            "accuracy": sum(r >= 1.0 for r in rewards) / len(rewards),
            "response_len_p50": _percentile(lengths, 0.5), "response_len_p90": _percentile(lengths, 0.9),
            "response_len_max": max(lengths), "rollout_tokens": tokens,
            "rollout_tokens_per_s": tokens / result.seconds if result.seconds else 0.0,
            "time": {k: round(v, 4) for k, v in ph.seconds.items()},
            "idle_fraction": round(result.idle_fraction, 4),
            "spot_train_s": round(sum(w.spot_train_s for w in result.workers), 4),
            "spot_steps": sum(w.spot_steps for w in result.workers),
            "workers": [{"busy_s": round(w.busy_s, 3), "idle_s": round(w.idle_s, 3), "tokens": w.tokens}
                        for w in result.workers],
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
        return out

    # ---- publishing and checkpoints -------------------------------------------------------------------------
    def publish(self) -> dict[str, Any]:
        from understudy.registry.store import Registry

        out: dict[str, Any] = {}
        policy_dir = self.out / f"policy-step{self.step:05d}"
        save_model(self.policy, self.tok, policy_dir, extra_config={"understudy_policy_step": self.step})
        save_model(self.policy, self.tok, self.out / "policy", extra_config={"understudy_policy_step": self.step})
        out["policy"] = str(policy_dir)
        if self.spot is not None:
            ev = self.spot.evaluate(k=self.cfg.num_draft_tokens) or {}
            folder = self.out / f"drafter-step{self.step:05d}"
            save_drafter(self.spot.drafter, folder, extra_training={"heldout": ev, "policy_step": self.step})
            reg = Registry.open(self.cfg.registry)
            info = reg.publish(folder, metrics={"heldout_acceptance_length": ev.get("expected_acceptance_length"),
                                                "top1_agreement": ev.get("top1_agreement")},
                               training_config=self.cfg.to_json(), policy_version=self.step,
                               parent=self.last_published)
            self.last_published = info.version  # the next version's parent (kept across --resume)
            out.update(drafter_version=info.version, heldout_acceptance_length=ev.get("expected_acceptance_length"))
        return out

    def save(self) -> None:
        save_checkpoint(self.out / "checkpoint.pt", {
            "step": self.step, "policy": self.policy.state_dict(), "opt": self.opt.state_dict(),
            "spot": self.spot.state_dict() if self.spot is not None else None,
            "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state(), "config": self.cfg.to_json(),
            "last_published": self.last_published,
        })

    def resume(self) -> bool:
        ck = load_checkpoint(self.out / "checkpoint.pt")
        if ck is None:
            return False
        with torch.no_grad():
            self.policy.load_state_dict(ck["policy"])
        self.opt.load_state_dict(ck["opt"])
        if self.spot is not None and ck.get("spot"):
            self.spot.load_state_dict(ck["spot"])
            self.workers.load_drafter_weights(self.spot.drafter)
        self.rng.setstate(ck["rng"])
        self.last_published = ck.get("last_published")
        torch.set_rng_state(ck["torch_rng"])
        self.step = int(ck["step"])
        self.workers.refresh_weights()
        self.log.truncate_after(self.step)
        return True

    def warmup_drafter(self) -> dict[str, float]:
        """Self-distil the drafter on the initial policy's own sampled rollouts (a third of the budget generates,
        the rest trains), so TLT starts with a useful drafter. Problems come from a separate RNG: the RL data
        stream is the same with and without it."""
        from understudy.drafter.warmup import generate_samples

        assert self.spot is not None
        c, t0 = self.cfg, time.perf_counter()
        rng = random.Random(c.seed + 20_011)
        problems = [self.task.sample(rng) for _ in range(max(64, 4 * c.prompts_per_step * c.group_size))]
        prompts = [encode_prompt(self.tok, p.prompt)[-self.max_prompt:] for p in problems]
        params = [SamplingParams(max_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                 seed=c.seed + i) for i in range(len(prompts))]
        samples = [s for s in generate_samples(self.lm, prompts, params, 64, "drafter warm-up data",
                                               deadline=time.monotonic() + c.drafter_warmup_s / 3) if s is not None]
        self.spot.add(samples)
        steps = self.spot.trainer.train(list(self.spot.buffer), seconds=max(1.0, c.drafter_warmup_s
                                                                            - (time.perf_counter() - t0)))
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
            if (c.publish_every and self.step % c.publish_every == 0) or last:
                t0 = time.perf_counter()
                m["published"] = self.publish()
                m["time"]["publish"] = round(time.perf_counter() - t0, 4)
            if self.step % c.checkpoint_every == 0 or last:
                self.save()
            self.log.write(m)
            history.append(m)
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward_mean']:.2f}", acc=f"{m.get('eval_accuracy', m['accuracy']):.2f}",
                            accept=f"{m['spec']['mean_acceptance_length']:.2f}", refresh=False)
        bar.close()
        self.log.close()
        if history:
            (self.out / "summary.json").write_text(json.dumps(history[-1], indent=2, default=str))
        return {"history": history}
