"""Self-distillation data for the drafter: the target's own answers with its features, on disk as shards.

Decoding is the slow part of making drafter data (on a 2-core AVX2 CPU, SmolLM2-135M decodes about 90 tokens per
CPU-second at batch 32 with one thread). The features are not: the engine computes them anyway (they are the LM
head's input), so keeping them costs a copy; a separate teacher-forced prefill would add about 40% (216 tokens per
CPU-second, measured on the same machine). So the data is made by plain continuous-batched decoding with the
features captured, on `workers` processes (one thread each: both cores busy, each at its most efficient), and
written as it completes:

    <cache>/drafter-data/<key>/shard-w<worker>-<n>.safetensors   tokens, features (bf16), offsets, prompt_len, job
    <cache>/drafter-data/<key>/complete.json                    written once generation ended (all done, or budget)

When the budget is spent, the running sequences are kept as they stand (partial answers) and the rest skipped.
Each shard is written atomically (temp file + rename), so an interrupted run loses at most the sequences in
flight; the next run with the same key loads the shards, skips their jobs and generates only the rest. Once
`complete.json` exists the data is final and reused as is. `max_tokens` bounds its size.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from understudy.drafter.train import Sample
from understudy.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

SHARD_SEQUENCES = 16  # sequences per shard: small enough that an interruption loses little


@dataclass(frozen=True)
class DataJob:
    split: str  # "train" | "heldout" | "ood"
    prompt_ids: list[int]
    sampling: SamplingParams
    source: str = ""  # the prompt file it came from


class ShardStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def is_complete(self) -> bool:
        return (self.folder / "complete.json").exists()

    def load(self) -> dict[int, Sample]:
        """job index -> Sample, from every readable shard (a damaged one is skipped and regenerated)."""
        out: dict[int, Sample] = {}
        for f in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                t = load_file(str(f))
            except (SafetensorError, OSError, ValueError) as e:
                log.warning("removing unreadable data shard %s (%s): its sequences are generated again", f, e)
                f.unlink(missing_ok=True)
                continue
            off = t["offsets"].tolist()
            for r, job in enumerate(t["job"].tolist()):
                a, b = off[r], off[r + 1]
                out[int(job)] = Sample(tokens=t["tokens"][a:b].long(), features=t["features"][a:b].float(),
                                       prompt_len=int(t["prompt_len"][r]))
        return out

    def write(self, name: str, items: list[tuple[int, Sample]]) -> None:
        lengths = [len(s) for _, s in items]
        offsets = torch.zeros(len(items) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(lengths).cumsum(0)
        tensors = {"tokens": torch.cat([s.tokens.to(torch.int32) for _, s in items]),
                   "features": torch.cat([s.features.to(torch.bfloat16) for _, s in items]).contiguous(),
                   "offsets": offsets, "prompt_len": torch.tensor([s.prompt_len for _, s in items]),
                   "job": torch.tensor([j for j, _ in items])}
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp"
        save_file(tensors, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / f"{name}.safetensors")

    def mark_complete(self, info: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / ".complete.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, self.folder / "complete.json")


def _worker(model_path: str, dtype: str, jobs: list[DataJob], todo: list[int], folder: str, worker: int,
            batch_size: int, budget_s: float, max_tokens: int | None, progress: Any) -> None:
    """One generating process: its share of the jobs, continuous-batched, shards written as sequences finish."""
    torch.set_num_threads(1)
    from understudy.engine.config import EngineConfig
    from understudy.engine.engine import Engine
    from understudy.engine.loader import load_model

    lm = load_model(model_path, dtype=dtype)
    store = ShardStore(Path(folder))
    mine = [jobs[i] for i in todo]
    eng = Engine(lm.model, EngineConfig(max_batch_size=batch_size, num_speculative_tokens=0, dtype=dtype,
                                        max_model_len=max(len(j.prompt_ids) + j.sampling.max_tokens for j in mine) + 1,
                                        num_threads=1, prefill_threads=0),  # one worker process per core
                 lm.eos_token_ids, capture_hidden=True)
    # the budget counts from here, once the model is loaded: on a busy machine start-up alone can take a
    # short budget's whole length, and a worker must get to generate
    deadline = time.monotonic() + budget_s
    pending = list(zip(todo, mine, strict=True))
    tokens: dict[str, list[int]] = {}
    buf: list[tuple[int, Sample]] = []
    shard, made = 0, 0

    def flush() -> None:
        nonlocal shard, buf
        if buf:
            store.write(f"shard-w{worker}-{time.time_ns()}-{shard:05d}", buf)
            progress.put(("done", len(buf), sum(len(s) - s.prompt_len for _, s in buf)))
            shard, buf = shard + 1, []

    def admit() -> None:  # keep the batch full, no more (the rest wait here, where the budget can drop them)
        while pending and len(eng.running) + len(eng.waiting) < batch_size:
            idx, job = pending.pop(0)
            tokens[str(idx)] = list(job.prompt_ids)
            eng.add_request(str(idx), job.prompt_ids, job.sampling)

    admit()
    while eng.has_unfinished():
        if time.monotonic() > deadline or (max_tokens is not None and made >= max_tokens):
            # Time is up: keep what the running sequences have so far (a partial answer is as good a training
            # sequence as a short one; decoding 64 of them to 256 tokens on a busy machine can take many minutes)
            partial = 0
            for rid, toks, hidden, plen in eng.captured_running():
                if len(toks) - plen >= 8:
                    buf.append((int(rid), Sample(tokens=torch.tensor(toks[:hidden.shape[0]]), features=hidden,
                                                 prompt_len=plen)))
                    partial += 1
            progress.put(("skipped", len(pending) + len(eng.running) + len(eng.waiting) - partial, 0))
            break
        for o in eng.step():
            tokens[o.request_id].extend(o.new_token_ids)
            if o.finished:
                assert o.hidden is not None
                n = o.hidden.shape[0]
                buf.append((int(o.request_id), Sample(tokens=torch.tensor(tokens.pop(o.request_id)[:n]),
                                                      features=o.hidden, prompt_len=o.num_prompt_tokens)))
                made += n - o.num_prompt_tokens
                if len(buf) >= SHARD_SEQUENCES:
                    flush()
        admit()
    flush()


def generate_into(store: ShardStore, model_path: str, dtype: str, jobs: list[DataJob], todo: list[int],
                  workers: int, batch_size: int, budget_s: float, max_tokens: int | None, desc: str) -> None:
    """Generate jobs `todo` on `workers` processes (job i goes to worker i % workers) until done or each worker
    has generated for `budget_s` seconds (the running sequences are kept as they stand, the rest are skipped)."""
    workers = max(1, min(workers, len(todo)))
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    per_worker_tokens = None if max_tokens is None else max_tokens // workers + 1
    procs = [ctx.Process(target=_worker, args=(model_path, dtype, jobs, todo[w::workers], str(store.folder), w,
                                               batch_size, budget_s, per_worker_tokens, progress), daemon=True)
             for w in range(workers)]
    for p in procs:
        p.start()
    made = 0
    try:
        with tqdm(total=len(todo), desc=desc, unit="resp") as bar:
            while any(p.is_alive() for p in procs) or not progress.empty():
                try:
                    kind, n, toks = progress.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "done":
                    made += toks
                    bar.update(n)
                    bar.set_postfix(response_tokens=made)
                else:  # the budget ran out: these were never started
                    bar.total -= n
                    bar.refresh()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(10)
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if failed:
        raise RuntimeError(f"drafter data worker(s) failed with exit status {failed}; the shards written so far "
                           f"in {store.folder} are kept and a rerun resumes from them")
