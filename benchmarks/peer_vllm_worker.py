"""vLLM side of benchmarks/peer.py: runs in vLLM's own interpreter (.venv-vllm/bin/python), imports nothing from
Understudy, reads a job (JSON: token ids and settings) and writes the outputs and timings (JSON).

    .venv-vllm/bin/python benchmarks/peer_vllm_worker.py JOB.json RESULT.json

Job fields: model_dir, dtype, batch (max concurrent sequences), batch_sizes, rounds, max_new_tokens,
max_model_len, prompts (token ids), method ("plain" | "ngram" | "eagle"), k, ngram_min, ngram_max, drafter_dir
(eagle), threads. For each batch size the prompts go in chunks of that size (one generate call each), greedy,
ignore_eos. Result: per batch size the outputs (token ids), seconds per round and vLLM's spec-decode counters;
startup_s (LLM built), import_s, peak_rss_mb / rss_mb (this process plus vLLM's engine-core process).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/ holds scripts whose names could shadow modules vLLM imports


def rss_tree_mb(field: str = "VmHWM:") -> float:
    """Sum of a /proc memory field (VmHWM: peak resident set, VmRSS: now) over this process and its live
    descendants (vLLM's engine core runs as a child process), in MB; this process's own peak off Linux."""
    pids, seen = [os.getpid()], set()
    total = 0.0
    while pids:
        pid = pids.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        total += next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith(field)), 0) / 1024
        pids.extend(int(c) for c in children)
    return total or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spec_counters(llm) -> dict[str, float]:  # type: ignore[no-untyped-def]
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                      "vllm:spec_decode_num_accepted_tokens"):
            out[m.name.split(":")[1]] = out.get(m.name.split(":")[1], 0.0) + float(getattr(m, "value", 0))
    return out


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                       "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
                       "OMP_NUM_THREADS": str(job.get("threads", 1))}.items():
        os.environ.setdefault(key, value)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import_s = time.perf_counter() - T0
    kwargs = {"model": job["model_dir"], "dtype": job["dtype"], "max_model_len": job["max_model_len"],
              "max_num_seqs": job["batch"], "enforce_eager": True, "seed": 0, "disable_log_stats": False}
    if job["method"] == "ngram":
        kwargs["speculative_config"] = {"method": "ngram", "num_speculative_tokens": job["k"],
                                        "prompt_lookup_min": job["ngram_min"], "prompt_lookup_max": job["ngram_max"]}
    elif job["method"] == "eagle":
        kwargs["speculative_config"] = {"method": "eagle", "model": job["drafter_dir"],
                                        "num_speculative_tokens": job["k"]}
    t = time.perf_counter()
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - t
    sp = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    cells = []
    for batch in job["batch_sizes"]:
        rounds, spec = [], {}
        for _ in range(job["rounds"]):
            before = spec_counters(llm)
            outputs: list[list[int]] = []
            t = time.perf_counter()
            for i in range(0, len(prompts), batch):  # chunks of the batch size, as every system here
                outputs.extend(list(r.outputs[0].token_ids) for r in llm.generate(prompts[i:i + batch], sp, use_tqdm=False))
            rounds.append(time.perf_counter() - t)
            after = spec_counters(llm)
            spec = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        tokens = sum(map(len, outputs))
        cells.append({"method": job["method"], "k": job["k"], "batch": batch, "gen_s": rounds, "outputs": outputs,
                      "tokens": tokens, "spec": spec or None})
        print(f"  vllm {job['dtype']} {job['method']} k={job['k']} batch {batch}: "
              f"{tokens / sorted(rounds)[len(rounds) // 2]:.1f} tok/s", flush=True)
    result = {"cells": cells, "startup_s": startup_s, "import_s": import_s, "peak_rss_mb": rss_tree_mb("VmHWM:"),
              "rss_mb": rss_tree_mb("VmRSS:"),
              "settings": {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                                                          "OMP_NUM_THREADS")} | {"llm_kwargs": kwargs}}
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
