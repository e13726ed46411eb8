"""Warm-up drafter training by self-distillation (`understudy drafter train`).

    prompts --engine (plain decoding, hidden states captured)--> (tokens, features) --EAGLE loss--> drafter
The generated data is cached as shards (keyed by model, prompts and generation settings; drafter/data.py): an
interrupted run resumes it, a repeated run skips straight to training. The learning-rate schedule spans the
run's time budget; with a checkpoint callback, training pauses every few minutes to measure held-out acceptance
and hands over each drafter that beats the earlier ones (`--publish-every-minutes`); a run that continues a trained
drafter (`--init-from`) must first beat that drafter's own held-out acceptance. The drafter folder is
written atomically, and Ctrl-C during training stops at a step boundary and still evaluates and saves what was
learned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from understudy.drafter.data import DataJob, ShardStore, generate_into
from understudy.drafter.model import Drafter, new_drafter, save_drafter
from understudy.drafter.train import (
    DrafterTrainConfig,
    DrafterTrainer,
    Sample,
    evaluate,
    select_draft_vocab,
)
from understudy.engine.config import EngineConfig
from understudy.engine.engine import Engine
from understudy.engine.loader import TRAINING_PRECISIONS, LoadedModel, cache_dir, resolve_dtype
from understudy.engine.sampling import SamplingParams
from understudy.engine.text import default_prompt_files, encode_prompt, load_prompts

log = logging.getLogger(__name__)


# The warm-up recipe's training settings, chosen by learning curve (benchmarks/drafter_recipe.py,
# docs/drafter-recipe.md): a schedule over the run's time budget, small batches (many steps in a short budget), and
# the loss led by the distillation term (what acceptance measures) with the feature regression as a helper.
WARMUP_TRAIN = DrafterTrainConfig(lr=1e-3, warmup_steps=10, tokens_per_batch=1024, hidden_loss_weight=0.1,
                                  ce_loss_weight=1.0, unroll_steps=3)


@dataclass(frozen=True)
class WarmupConfig:
    prompts: tuple[str, ...] = ()  # JSONL/text prompt files (default: the shipped general and grid-risk sets)
    max_minutes: float = 20.0  # wall-clock budget for the whole run (generation + training + eval)
    data_fraction: float = 0.5  # share of max_minutes for generating data (the rest trains; cached data is free)
    data_minutes: float | None = None  # the data budget itself, overriding max_minutes * data_fraction
    max_new_tokens: int = 256  # response length cap for generated training data
    data_dtype: str = "auto"  # the dtype the target decodes the data in: auto = the engine's default here (bfloat16
    #                           where the CPU multiplies bf16 natively, float32 elsewhere; loader.resolve_dtype), so
    #                           the drafter learns the features a server on this machine feeds it. On an AMX CPU
    #                           bf16 decodes the data 2.3x faster (docs/drafter-recipe.md), which leaves training
    #                           more of the budget
    sampled_copies: int = 1  # extra sampled responses per train prompt (temperature 0.8) besides the greedy one
    draft_vocab_size: int = 2048  # reduced draft vocabulary (0 = the full vocabulary); the head is most of a step
    gen_batch_size: int = 64  # batch size of each data-generating engine (tokens per CPU-second: 32 -> 64 +22%)
    data_workers: int = 2  # data-generating processes (one thread each)
    max_data_tokens: int | None = None  # stop generating after this many response tokens (bounds the cache)
    eval_k: int = 5  # chain length for the held-out acceptance estimate
    seed: int = 0
    train: DrafterTrainConfig = field(default_factory=lambda: WARMUP_TRAIN)

    def __post_init__(self) -> None:
        if self.data_dtype not in TRAINING_PRECISIONS:
            raise ValueError(f"data_dtype must be auto, float32 or bfloat16, got {self.data_dtype!r}")


def data_dtype(cfg: WarmupConfig, device: str = "cpu") -> str:
    """The dtype the data is decoded in on `device` (auto resolved as the engine resolves it)."""
    return resolve_dtype(cfg.data_dtype, device)


def data_budget_minutes(cfg: WarmupConfig) -> float:
    return cfg.data_minutes if cfg.data_minutes is not None else cfg.max_minutes * cfg.data_fraction


def prompt_files(cfg: WarmupConfig) -> list[Path]:
    return [Path(p) for p in cfg.prompts] if cfg.prompts else default_prompt_files()


def _data_key(lm: LoadedModel, files: list[Path], cfg: WarmupConfig, dtype: str) -> str:
    h = hashlib.sha256()
    h.update(lm.fingerprint.encode())
    weights = lm.path / "model.safetensors"
    if weights.exists():
        with open(weights, "rb") as fh:
            h.update(fh.read(1 << 20))  # header + first tensors: enough to tell checkpoints apart
    for f in files:
        h.update(f.read_bytes())
    budget = round(data_budget_minutes(cfg), 1)  # the data depends on its time budget
    h.update(json.dumps([cfg.max_new_tokens, cfg.sampled_copies, cfg.seed, budget]).encode())
    if dtype != "float32":  # float32 data keeps the key it had before the dtype was a setting
        h.update(dtype.encode())
    return h.hexdigest()[:16]


def generate_samples(lm: LoadedModel, prompts: list[list[int]], params: list[SamplingParams], batch_size: int,
                     desc: str, deadline: float | None = None) -> list[Sample | None]:
    """Plain continuous-batched generation that keeps the target's hidden states of every sequence.

    The engine computes the features anyway (they are the LM head's input), so capturing them costs a copy,
    where a second forward pass over the data would cost as much compute as generating it again.
    At `deadline` (time.monotonic()), requests not yet started are dropped (None) and running ones finish.
    """
    eng = Engine(lm.model, EngineConfig(max_batch_size=batch_size, max_model_len=max(len(p) for p in prompts) +
                                        max(s.max_tokens for s in params) + 1, num_speculative_tokens=0,
                                        dtype=str(lm.model.dtype).removeprefix("torch."), num_threads=None),
                 lm.eos_token_ids, capture_hidden=True)
    out: dict[str, Sample] = {}
    for i, (p, s) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(str(i), p, s)
    tokens: dict[str, list[int]] = {str(i): list(p) for i, p in enumerate(prompts)}
    cut = False
    with tqdm(total=len(prompts), desc=desc, unit="resp") as bar:
        while eng.has_unfinished():
            if deadline is not None and not cut and time.monotonic() > deadline:
                cut = True
                running = {q.request_id for q in eng.running}
                dropped = [str(i) for i in range(len(prompts)) if str(i) not in out and str(i) not in running]
                for rid in dropped:
                    eng.abort(rid)
                log.info("data budget spent: %d of %d responses generated, %d running, %d skipped", len(out),
                         len(prompts), len(running), len(dropped))
            for o in eng.step():
                tokens[o.request_id].extend(o.new_token_ids)
                if o.finished:
                    assert o.hidden is not None
                    n = o.hidden.shape[0]  # features for positions 0..n-1 (the last token was never fed)
                    out[o.request_id] = Sample(tokens=torch.tensor(tokens[o.request_id][:n]), features=o.hidden,
                                               prompt_len=o.num_prompt_tokens)
                    bar.update(1)
    return [out.get(str(i)) for i in range(len(prompts))]


def _unpack(rows: list[dict[str, Any]]) -> list[Sample]:
    return [Sample(tokens=r["tokens"].long(), features=r["features"].float(), prompt_len=int(r["prompt_len"]))
            for r in rows]


def _jobs(lm: LoadedModel, rows: list[dict[str, str]], cfg: WarmupConfig) -> list[DataJob]:
    """Held-out and out-of-domain prompts first (greedy; the report needs them), then each train prompt's greedy
    answer and `sampled_copies` sampled ones. With several prompt files the train jobs are interleaved, so a data
    budget that runs out keeps every file's share."""
    evals: list[DataJob] = []
    per_source: dict[str, list[DataJob]] = {}
    for i, r in enumerate(rows):
        ids = encode_prompt(lm.tokenizer, r["prompt"])
        split = r["split"] if r["split"] in ("heldout", "ood") else "train"
        greedy = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=0.0)
        src = r.get("source", "")
        if split != "train":
            evals.append(DataJob(split, ids, greedy, src))
            continue
        jobs = per_source.setdefault(src, [])
        jobs.append(DataJob(split, ids, greedy, src))
        for c in range(cfg.sampled_copies):
            jobs.append(DataJob(split, ids, SamplingParams(max_tokens=cfg.max_new_tokens, temperature=0.8, top_p=0.95,
                                                           seed=cfg.seed * 1000 + i * 10 + c), src))
    lists = list(per_source.values())
    # proportional interleave: job j of a list of length m sorts at (j + 0.5) / m
    order = sorted(((j + 0.5) / len(lst), k, j) for k, lst in enumerate(lists) for j in range(len(lst)))
    return evals + [lists[k][j] for _, k, j in order]


def build_dataset(lm: LoadedModel, cfg: WarmupConfig) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, heldout, ood) samples with target features, cached on disk as resumable shards (drafter/data.py)."""
    files = prompt_files(cfg)
    rows = [{**r, "source": f.name} for f in files for r in load_prompts(f)]
    dtype = data_dtype(cfg, str(lm.model.device))
    key = _data_key(lm, files, cfg, dtype)
    legacy = cache_dir() / "drafter-data" / f"{key}.pt"  # one file per data set, before the shards
    if legacy.exists():
        try:
            data = torch.load(legacy, weights_only=True)
            log.info("reusing generated training data from %s", legacy)
            return _unpack(data["train"]), _unpack(data["heldout"]), _unpack(data["ood"])
        except Exception as e:  # a damaged cache is regenerated, never trusted
            log.warning("ignoring unreadable cache %s (%s)", legacy, e)
    store = ShardStore(cache_dir() / "drafter-data" / key)
    jobs = _jobs(lm, rows, cfg)
    done = store.load()
    if store.is_complete():
        log.info("reusing generated training data from %s (%d sequences)", store.folder, len(done))
    else:
        todo = [i for i in range(len(jobs)) if i not in done]
        if done:
            log.info("resuming the training data in %s: %d of %d sequences already there", store.folder, len(done),
                     len(jobs))
        if todo:
            generate_into(store, str(lm.path), dtype, jobs, todo,
                          cfg.data_workers, cfg.gen_batch_size, data_budget_minutes(cfg) * 60, cfg.max_data_tokens,
                          "generating training data")
            done = store.load()
        store.mark_complete({"sequences": len(done), "jobs": len(jobs), "prompts": [str(f) for f in files]})
    split_samples: dict[str, list[Sample]] = {"train": [], "heldout": [], "ood": []}
    for i, job in enumerate(jobs):
        if i in done:
            done[i].source = job.source
            split_samples[job.split].append(done[i])
    return split_samples["train"], split_samples["heldout"], split_samples["ood"]


Checkpoint = Callable[[Drafter, dict[str, Any]], None]


def _heldout_report(drafter: Drafter, lm: LoadedModel, heldout: list[Sample],
                    k: int) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """Held-out acceptance over every prompt file together, and per file (general vs in-domain, side by side)."""
    if not heldout:
        return None, {}
    ev = evaluate(drafter, lm.model, heldout, k=k, cache_greedy=True, by_source=True)  # one pass for both
    by = ev.pop("by_source")
    return ev, by if len(by) > 1 else {}


def _starting_point(drafter: Drafter, lm: LoadedModel, heldout: list[Sample], k: int) -> dict[str, Any] | None:
    """A continued run's bar: the trained drafter's own held-out acceptance, measured before training."""
    ev, by = _heldout_report(drafter, lm, heldout, k)
    if ev is None:
        return None
    log.info("continuing a trained drafter: held-out acceptance length %.3f at k=%d to beat%s",
             ev["expected_acceptance_length"], k, "".join(f"; {src} {e['expected_acceptance_length']:.3f}"
                                                          for src, e in by.items()))
    return {"heldout": ev, "heldout_by_prompts": by, "heldout_acceptance_length": ev["expected_acceptance_length"]}


def _against_start(report: dict[str, Any], initial: dict[str, Any] | None, out_dir: Path) -> None:
    """A continued run's report keeps its starting point, and says so when training did not beat it."""
    if initial is None:
        return
    report["initial"] = initial
    if report.get("heldout_acceptance_length", -math.inf) <= initial["heldout_acceptance_length"]:
        log.warning("the continued drafter (held-out acceptance length %.3f) does not beat the one it started from "
                    "(%.3f): it is written to %s but not handed over (published)",
                    report.get("heldout_acceptance_length", math.nan), initial["heldout_acceptance_length"], out_dir)


def _initial_drafter(lm: LoadedModel, cfg: WarmupConfig, train: list[Sample]) -> Drafter:
    V = lm.config.vocab_size
    vocab = None
    if 0 < cfg.draft_vocab_size < V:
        vocab = select_draft_vocab(train, cfg.draft_vocab_size, V, always=lm.eos_token_ids)
    return new_drafter(lm.model, lm.fingerprint, vocab, seed=cfg.seed)


def warmup_train(lm: LoadedModel, out_dir: Path, cfg: WarmupConfig, drafter: Drafter | None = None,
                 on_checkpoint: Checkpoint | None = None, checkpoint_every_s: float | None = None) -> dict[str, Any]:
    """The whole recipe. Returns a report (also stored in the drafter's config.json under `training`).

    With `on_checkpoint`, training stops every `checkpoint_every_s` seconds to measure held-out acceptance, and
    calls on_checkpoint(drafter, report) whenever it beats every earlier checkpoint (`understudy serve
    --ensure-drafter` publishes those, so a server following the registry swaps each better drafter in).

    With `drafter` (a trained one, `drafter train --init-from`), training continues it on its own draft vocabulary,
    and a checkpoint is handed over only if it beats that drafter's held-out acceptance, measured first."""
    t_start = time.monotonic()
    deadline = t_start + cfg.max_minutes * 60
    torch.manual_seed(cfg.seed)
    train, heldout, ood = build_dataset(lm, cfg)
    if not train:
        raise ValueError("no training prompts (split 'train') in the prompt file")
    continuing = drafter is not None
    drafter = _initial_drafter(lm, cfg, train) if drafter is None else drafter
    drafter = drafter.float()
    drafter.bind(lm.model)
    initial = _starting_point(drafter, lm, heldout, cfg.eval_k) if continuing else None
    best = initial["heldout_acceptance_length"] if initial else -math.inf  # what a checkpoint must beat
    trainer = DrafterTrainer(drafter, cfg.train)
    n_eval_tokens = sum(len(s) for s in heldout + ood)
    eval_reserve = 30.0 + 0.002 * n_eval_tokens
    budget = max(10.0, deadline - time.monotonic() - eval_reserve)
    if on_checkpoint is not None and checkpoint_every_s:  # each checkpoint evaluates the held-out set
        budget = max(10.0, budget - (budget // checkpoint_every_s) * (5.0 + 0.001 * n_eval_tokens))
    trainer.set_horizon(budget)  # the learning-rate schedule spans this run's time, whatever its step count
    chunk = checkpoint_every_s if on_checkpoint is not None and checkpoint_every_s else budget
    interrupted = False

    def checkpoint() -> None:
        nonlocal best
        if not heldout or trainer.step == 0:
            return
        ev, by_prompts = _heldout_report(drafter, lm, heldout, cfg.eval_k)
        length = ev["expected_acceptance_length"]
        better = length > best
        log.info("checkpoint at step %d (%.0f s of training): held-out acceptance length %.3f at k=%d%s",
                 trainer.step, trainer.train_seconds, length, cfg.eval_k, "" if better else " (no better: kept)")
        if better:
            best = length
            assert on_checkpoint is not None
            on_checkpoint(drafter, {"steps": trainer.step, "tokens_seen": trainer.tokens_seen,
                                    "train_seconds": round(trainer.train_seconds, 1), "heldout": ev,
                                    "heldout_by_prompts": by_prompts,
                                    "heldout_acceptance_length": length, "target": lm.name,
                                    "config": {**asdict(cfg), "train": asdict(cfg.train)}})

    with tqdm(total=int(budget), desc="training drafter", unit="s",
              bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}s {postfix}") as bar:

        def on_step(m: dict[str, float]) -> None:
            bar.n = min(int(trainer.train_seconds), bar.total)
            bar.set_postfix(step=trainer.step, loss=f"{m['loss']:.3f}", top1=f"{m.get('top1_1', 0):.2f}")

        try:
            while trainer.train_seconds < budget - 1.0:
                trainer.train(train, seconds=min(chunk, budget - trainer.train_seconds), on_step=on_step)
                if on_checkpoint is not None and trainer.train_seconds < budget - 1.0:
                    checkpoint()
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: evaluating and saving the drafter as trained so far")
    report: dict[str, Any] = {
        "steps": trainer.step, "tokens_seen": trainer.tokens_seen, "interrupted": interrupted,
        "train_seconds": round(time.monotonic() - t_start, 1), "num_train_sequences": len(train),
        "precision": trainer.precision, "data_dtype": data_dtype(cfg, str(lm.model.device)),
        **dict(zip(("heldout", "heldout_by_prompts"), _heldout_report(drafter, lm, heldout, cfg.eval_k), strict=True)),
        "ood": evaluate(drafter, lm.model, ood, k=cfg.eval_k, cache_greedy=True) if ood else None,
        "config": {**asdict(cfg), "train": asdict(cfg.train)},
        "target": lm.name,
    }
    if report["heldout"]:
        report["heldout_acceptance_length"] = report["heldout"]["expected_acceptance_length"]
    _against_start(report, initial, out_dir)
    save_drafter(drafter, out_dir, extra_training=report)
    if on_checkpoint is not None and report.get("heldout_acceptance_length", -math.inf) > best:
        on_checkpoint(drafter, report)
    return report
