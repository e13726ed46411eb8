"""RL step time with TLT (speculative rollouts + spot drafter training) vs speculation off: same config, seed
and data, steps interleaved (on, off, on, off, ...) in one process so machine noise hits both alike.

    python benchmarks/rl_step.py --config configs/arith-tiny.toml [--steps 20] [--out benchmarks/results/...]

Prints per-phase times and the rollout / end-to-end speed-ups (off / on, medians over steps after warm-up),
writes JSON and a PNG with the reward and accuracy curves side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from understudy.trainer.config import load_config
from understudy.trainer.grpo import GRPOTrainer

RESULTS = Path(__file__).resolve().parent / "results"


def run(config: Path, steps: int, warmup: int, eval_every: int, out_dir: Path) -> dict[str, Any]:
    base = load_config(config, {"steps": steps})
    runs: dict[str, GRPOTrainer] = {}
    for name, spec in (("tlt", True), ("off", False)):
        cfg = base.replace(speculation=spec, out_dir=str(out_dir / name), registry=str(out_dir / f"registry-{name}"),
                           publish_every=0, eval_every=0)
        runs[name] = GRPOTrainer(cfg, progress=False)
    hist: dict[str, list[dict[str, Any]]] = {"tlt": [], "off": []}
    for name, t in runs.items():
        warm = t.warmup_drafter() if (t.spot is not None and t.cfg.drafter_warmup_s > 0) else {}
        hist[name].append({"step": 0, **t.evaluate(), **warm})
        print(f"step   0 {name:<4} {hist[name][0]}", flush=True)
    for step in range(1, steps + 1):
        for name, t in runs.items():  # interleaved: the same noise for both
            t0 = time.perf_counter()
            m = t.train_step()
            m["step_seconds"] = time.perf_counter() - t0
            if (eval_every and step % eval_every == 0) or step == steps:
                m.update(t.evaluate())
            hist[name].append(m)
            print(f"step {step:3d} {name:<4} reward {m['reward_mean']:.3f} rollout {m['time']['rollout']:.2f}s "
                  f"step {m['step_seconds']:.2f}s accept-len {m['spec']['mean_acceptance_length']:.2f} "
                  f"idle {m['idle_fraction']:.2f} spot {m['spot_train_s']:.2f}s k {m['k_steps']}", flush=True)
    return {"config": base.to_json(), "steps": steps, "warmup": warmup, "history": hist,
            "summary": summarize(hist, warmup)}


def summarize(hist: dict[str, list[dict[str, Any]]], warmup: int) -> dict[str, Any]:
    def med(name: str, key: str) -> float:
        rows = [m for m in hist[name][1:] if m["step"] > warmup]
        vals = [m["time"][key] if key != "step_seconds" else m["step_seconds"] for m in rows]
        return statistics.median(vals) if vals else float("nan")

    phases = ("rollout", "reward", "update", "drafter_sync")
    s: dict[str, Any] = {name: {p: med(name, p) for p in (*phases, "step_seconds")} for name in hist}
    s["rollout_speedup"] = s["off"]["rollout"] / s["tlt"]["rollout"]
    s["step_speedup"] = s["off"]["step_seconds"] / s["tlt"]["step_seconds"]
    # end to end over the whole run, the drafter warm-up (TLT's one-off cost) included
    total = {n: sum(m.get("step_seconds", 0.0) for m in hist[n][1:]) + hist[n][0].get("drafter_warmup_s", 0.0)
             for n in hist}
    s["total_seconds"] = total
    s["run_speedup_including_warmup"] = total["off"] / total["tlt"] if total["tlt"] else float("nan")
    s["drafter_warmup"] = {k: v for k, v in hist["tlt"][0].items() if k.startswith("drafter_warmup")}
    tlt = [m for m in hist["tlt"][1:] if m["step"] > warmup]
    s["tlt_mean_acceptance_length"] = statistics.median(m["spec"]["mean_acceptance_length"] for m in tlt) if tlt else None
    s["tlt_idle_fraction"] = statistics.median(m["idle_fraction"] for m in tlt) if tlt else None
    s["tlt_spot_train_s"] = statistics.median(m["spot_train_s"] for m in tlt) if tlt else None
    for name in hist:
        for key in ("eval_accuracy", "eval_accuracy_sampled"):
            accs = [m[key] for m in hist[name] if key in m]
            s[name][f"{key}_first_last"] = [accs[0], accs[-1]] if accs else None
        s[name]["reward_first_last"] = [hist[name][1]["reward_mean"], hist[name][-1]["reward_mean"]]
    return s


def plot(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, color in (("tlt", "tab:blue"), ("off", "tab:gray")):
        rows = res["history"][name][1:]
        axes[0].plot([m["step"] for m in rows], [m["reward_mean"] for m in rows], color=color, label=name)
        ev = [m for m in res["history"][name] if "eval_accuracy" in m]
        axes[1].plot([m["step"] for m in ev], [m["eval_accuracy"] for m in ev], "o-", color=color,
                     label=f"{name} greedy")
        sv = [m for m in ev if "eval_accuracy_sampled" in m]
        axes[1].plot([m["step"] for m in sv], [m["eval_accuracy_sampled"] for m in sv], "s--", color=color,
                     label=f"{name} sampled (T of the rollouts)")
        axes[2].plot([m["step"] for m in rows], [m["time"]["rollout"] for m in rows], color=color, label=f"{name} rollout")
    axes[0].set(title="reward (mean per step)", xlabel="step")
    axes[1].set(title="accuracy on held-out problems", xlabel="step")
    axes[2].set(title="rollout seconds per step", xlabel="step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    s = res["summary"]
    fig.suptitle(f"TLT vs speculation off: rollout x{s['rollout_speedup']:.2f}, step x{s['step_speedup']:.2f} "
                 f"(medians after step {res['warmup']})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def print_table(res: dict[str, Any]) -> None:
    s = res["summary"]
    print("\n| phase (median s/step) | TLT | off | off / TLT |")
    print("|---|---|---|---|")
    for p in ("rollout", "reward", "update", "drafter_sync", "step_seconds"):
        a, b = s["tlt"][p], s["off"][p]
        print(f"| {p} | {a:.3f} | {b:.3f} | {b / a if a else float('nan'):.2f}x |")
    print(f"\nrollout speed-up x{s['rollout_speedup']:.2f}, end-to-end step speed-up x{s['step_speedup']:.2f}; "
          f"TLT mean acceptance length {s['tlt_mean_acceptance_length']}, idle fraction {s['tlt_idle_fraction']}, "
          f"spot training {s['tlt_spot_train_s']} s/step")
    for name in ("tlt", "off"):
        print(f"{name}: held-out accuracy first->last: greedy {s[name]['eval_accuracy_first_last']}, "
              f"sampled {s[name]['eval_accuracy_sampled_first_last']}; "
              f"rollout reward first->last {s[name]['reward_first_last']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("configs/arith-tiny.toml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from the medians (drafter still cold)")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"rl_step-{stamp}.json"
    work = Path("runs") / f"rl_step-{stamp}"
    res = run(args.config, args.steps, args.warmup, args.eval_every, work)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    plot(res, out.with_suffix(".png"))
    print_table(res)
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
