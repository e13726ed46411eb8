"""RL step time with TLT (speculative rollouts + spot drafter training) vs speculation off, and vs TLT without spot
training: same config, seed and data, steps interleaved in one process so machine noise hits all alike (tlt,
tlt-nospot, off, then off, tlt-nospot, tlt: every other step in reverse, so no mode always runs first).

    python benchmarks/rl_step.py --config configs/arith-tiny.toml [--steps 20] [--executor ray]
        [--length-profile long-tail] [--modes tlt,tlt-nospot,off] [--out benchmarks/results/...]

Modes:
  tlt         speculative rollouts; the drafter spot-trains on the capacity the long tail leaves idle
  tlt-nospot  the same rollouts with no spot training; its workers get the tlt run's drafter after every step, so
              the two differ only in whether spot training runs beside the rollout: the interference it costs
  off         speculation off (the baseline of every speed-up)
  MODE-int8, MODE-int4  any of the above with quantised rollouts (rollout_quantize): e.g. off,off-int8

With --executor ray each run's rollout workers and spot trainer are Ray actors (processes; the learner is this
process). The embedded cluster is given `workers x modes` logical CPUs: only one run's actors compute at a time.
With --length-profile long-tail every response decodes to a length drawn per request (EOS ignored; config.py), so
every mode decodes exactly the same number of tokens per step.

Prints per-phase medians, the rollout / end-to-end speed-ups (off / tlt, medians over steps after warm-up), the
spot-training interference (tlt / tlt-nospot rollout time, median of per-step ratios), each worker's idle fraction
and how much of the idle time the spot trainer used; writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from understudy.trainer.config import load_config
from understudy.trainer.grpo import GRPOTrainer

RESULTS = Path(__file__).resolve().parent / "results"
BASE_MODES = {"tlt": {"speculation": True, "spot_training": True},
              "tlt-nospot": {"speculation": True, "spot_training": False},
              "off": {"speculation": False}}
# each mode also with quantised rollouts: "off-int8", "tlt-int4", ... (rollout_quantize; the update stays float)
MODES = {**BASE_MODES, **{f"{name}-{q}": {**over, "rollout_quantize": q} for name, over in BASE_MODES.items()
                          for q in ("int8", "int4")}}


def run(config: Path, steps: int, warmup: int, eval_every: int, out_dir: Path, modes: list[str],
        overrides: dict[str, Any]) -> dict[str, Any]:
    base = load_config(config, {"steps": steps, **overrides})
    if base.executor == "ray":
        from understudy.trainer.ray_exec import ensure_ray

        ensure_ray(base.ray_address, num_cpus=base.rollout_workers * len(modes))
    runs: dict[str, GRPOTrainer] = {}
    for name in modes:
        cfg = base.replace(out_dir=str(out_dir / name), registry=str(out_dir / f"registry-{name}"), publish_every=0,
                           eval_every=0, **MODES[name])
        runs[name] = GRPOTrainer(cfg, progress=False)
    mirror = "tlt" in runs and "tlt-nospot" in runs
    hist: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    try:
        for name, t in runs.items():
            warm = {}
            if t.spot is not None and t.cfg.drafter_warmup_s > 0 and not (mirror and name == "tlt-nospot"):
                warm = t.warmup_drafter()
            hist[name].append({"step": 0, **t.evaluate(), **warm})
            print(f"step   0 {name:<10} {hist[name][0]}", flush=True)
        if mirror:
            runs["tlt-nospot"].workers.load_drafter_weights(runs["tlt"].spot.drafter)
        for step in range(1, steps + 1):
            order = list(runs.items())
            if step % 2 == 0:  # every other step in reverse, so that running first or second is no one mode's lot
                order.reverse()
            for position, (name, t) in enumerate(order):  # interleaved: the same noise for all
                t0 = time.perf_counter()
                m = t.train_step()
                m["step_seconds"] = time.perf_counter() - t0
                m["position"] = position
                if (eval_every and step % eval_every == 0) or step == steps:
                    m.update(t.evaluate())
                hist[name].append(m)
                print(f"step {step:3d} {name:<10} reward {m['reward_mean']:.3f} rollout {m['time']['rollout']:.2f}s "
                      f"step {m['step_seconds']:.2f}s tokens {m['rollout_tokens']} accept-len "
                      f"{m['spec']['mean_acceptance_length']:.2f} idle {m['idle_fraction']:.2f} spot "
                      f"{m['spot_train_s']:.2f}s k {m['k_steps']}", flush=True)
            if mirror:  # the same drafter for the next step: tlt and tlt-nospot differ only in spot training
                runs["tlt-nospot"].workers.load_drafter_weights(runs["tlt"].spot.drafter)
    finally:
        for t in runs.values():
            t.close()
    return {"config": base.to_json(), "modes": modes, "steps": steps, "warmup": warmup, "history": hist,
            "machine": machine(), "summary": summarize(hist, warmup)}


def machine() -> dict[str, Any]:
    import os
    import platform

    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def summarize(hist: dict[str, list[dict[str, Any]]], warmup: int) -> dict[str, Any]:
    def rows(name: str) -> list[dict[str, Any]]:
        return [m for m in hist[name][1:] if m["step"] > warmup]

    def secs(m: dict[str, Any], key: str) -> float:
        return m["step_seconds"] if key == "step_seconds" else m["time"][key]

    def med(name: str, key: str) -> float:
        vals = [secs(m, key) for m in rows(name)]
        return statistics.median(vals) if vals else float("nan")

    def pairs(a: str, b: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(a's step, b's step) for every step both ran, in b's order."""
        ra = {m["step"]: m for m in rows(a)}
        return [(ra[m["step"]], m) for m in rows(b) if m["step"] in ra]

    def ratios(a: str, b: str, key: str) -> list[float]:
        return [secs(ma, key) / secs(mb, key) for ma, mb in pairs(a, b)]

    def paired(a: str, b: str, key: str) -> float:
        """Median over steps of a's time / b's time (the steps ran back to back: a per-step pairing)."""
        r = ratios(a, b, key)
        return statistics.median(r) if r else float("nan")

    phases = ("rollout", "reward", "update", "drafter_sync")
    s: dict[str, Any] = {name: {p: med(name, p) for p in (*phases, "step_seconds")} for name in hist}
    if "off" in hist and "tlt" in hist:
        s["rollout_speedup"] = s["off"]["rollout"] / s["tlt"]["rollout"]
        s["step_speedup"] = s["off"]["step_seconds"] / s["tlt"]["step_seconds"]
        s["rollout_speedup_paired"] = paired("off", "tlt", "rollout")
        s["step_speedup_paired"] = paired("off", "tlt", "step_seconds")
        # end to end over the whole run, the drafter warm-up (TLT's one-off cost) included
        total = {n: sum(m.get("step_seconds", 0.0) for m in hist[n][1:]) + hist[n][0].get("drafter_warmup_s", 0.0)
                 for n in ("tlt", "off")}
        s["total_seconds"] = total
        s["run_speedup_including_warmup"] = total["off"] / total["tlt"] if total["tlt"] else float("nan")
    if "tlt" in hist and "tlt-nospot" in hist:
        r = ratios("tlt", "tlt-nospot", "rollout")
        s["spot_interference"] = statistics.median(r) if r else float("nan")  # 1.0 = spot training costs nothing
        s["spot_interference_ratios"] = r
        s["spot_interference_ci95"] = bootstrap_median_ci(r)
        both = pairs("tlt", "tlt-nospot")  # the steps behind r, in r's order
        total = sum(m["time"]["rollout"] for _, m in both)
        s["spot_interference_total"] = (sum(a["time"]["rollout"] for a, _ in both) / total if total
                                        else float("nan"))  # over the whole run: a long step weighs more
        by_order = {f"tlt_{'first' if pos == 0 else 'second'}": [x for x, (a, _) in zip(r, both, strict=True)
                                                                  if a.get("position") == pos] for pos in (0, 1)}
        s["spot_interference_by_order"] = {k: statistics.median(v) for k, v in by_order.items() if v}
        s["rollout_speedup_nospot"] = s["off"]["rollout"] / s["tlt-nospot"]["rollout"] if "off" in s else None
    for name in hist:
        r = rows(name)
        s[name]["mean_acceptance_length"] = statistics.median(m["spec"]["mean_acceptance_length"] for m in r) if r else None
        s[name]["idle_fraction"] = statistics.median(m["idle_fraction"] for m in r) if r else None
        n_workers = len(r[0]["workers"]) if r else 0
        s[name]["worker_idle_fraction"] = [
            statistics.median(m["workers"][w]["idle_s"] / m["time"]["rollout"] for m in r) for w in range(n_workers)]
        idle = sum(w["idle_s"] for m in r for w in m["workers"])
        s[name]["spot_train_s"] = statistics.median(m["spot_train_s"] for m in r) if r else None
        s[name]["spot_overrun_s"] = statistics.median(m.get("spot_overrun_s", 0.0) for m in r) if r else None
        s[name]["idle_used_by_spot"] = sum(m["spot_train_s"] for m in r) / idle if idle else 0.0
        s[name]["rollout_tokens"] = statistics.median(m["rollout_tokens"] for m in r) if r else None
        for key in ("eval_accuracy", "eval_accuracy_sampled"):
            accs = [m[key] for m in hist[name] if key in m]
            s[name][f"{key}_first_last"] = [accs[0], accs[-1]] if accs else None
        s[name]["reward_first_last"] = [hist[name][1]["reward_mean"], hist[name][-1]["reward_mean"]]
    if "tlt" in hist:
        s["drafter_warmup"] = {k: v for k, v in hist["tlt"][0].items() if k.startswith("drafter_warmup")}
    return s


def bootstrap_median_ci(values: list[float], n: int = 10_000, seed: int = 0) -> list[float] | None:
    """95% percentile-bootstrap interval of the median (seeded: the same data give the same interval)."""
    import random

    if len(values) < 3:
        return None
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return [meds[int(0.025 * n)], meds[int(0.975 * n) - 1]]


def plot(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"tlt": "tab:blue", "tlt-nospot": "tab:orange", "off": "tab:gray"}
    for name in res["history"]:
        color = colors.get(name, f"C{3 + list(res['modes']).index(name)}")  # the quantised-rollout modes
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
    if "rollout_speedup" in s:
        fig.suptitle(f"TLT vs speculation off: rollout x{s['rollout_speedup']:.2f}, step x{s['step_speedup']:.2f} "
                     f"(medians after step {res['warmup']})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def print_table(res: dict[str, Any]) -> None:
    s, names = res["summary"], list(res["history"])
    print("\n| phase (median s/step) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for p in ("rollout", "reward", "update", "drafter_sync", "step_seconds"):
        print(f"| {p} | " + " | ".join(f"{s[n][p]:.3f}" for n in names) + " |")
    for key in ("mean_acceptance_length", "idle_fraction", "worker_idle_fraction", "spot_train_s", "spot_overrun_s",
                "idle_used_by_spot", "rollout_tokens"):
        print(f"| {key} | " + " | ".join(_fmt(s[n][key]) for n in names) + " |")
    print()
    if "rollout_speedup" in s:
        print(f"off / tlt: rollout x{s['rollout_speedup']:.2f} (paired x{s['rollout_speedup_paired']:.2f}), "
              f"end-to-end step x{s['step_speedup']:.2f} (paired x{s['step_speedup_paired']:.2f}), whole run with "
              f"the drafter warm-up x{s['run_speedup_including_warmup']:.2f}")
    if "spot_interference" in s:
        print(f"spot training's cost to the rollout: tlt / tlt-nospot rollout time x{s['spot_interference']:.3f} "
              f"(median of {len(s['spot_interference_ratios'])} per-step ratios; 1.000 = none; bootstrap 95% "
              f"interval of the median {_fmt(s['spot_interference_ci95'])}); total rollout time "
              f"x{s['spot_interference_total']:.3f}; by order "
              + ", ".join(f"{k} x{v:.3f}" for k, v in s["spot_interference_by_order"].items()))
    for name in names:
        print(f"{name}: held-out accuracy first->last: greedy {s[name]['eval_accuracy_first_last']}, "
              f"sampled {s[name]['eval_accuracy_sampled_first_last']}; "
              f"rollout reward first->last {s[name]['reward_first_last']}")


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("configs/arith-tiny.toml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from the medians (drafter still cold)")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--modes", default="tlt,tlt-nospot,off", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--executor", choices=("local", "ray"), default=None, help="override the config's executor")
    ap.add_argument("--length-profile", choices=("task", "long-tail"), default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a config field (TOML value syntax), e.g. --set spot_duty=0.3")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    torch.set_num_threads(1)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"rl_step-{stamp}.json"
    work = Path("runs") / f"rl_step-{stamp}"
    overrides: dict[str, Any] = {"executor": args.executor, "length_profile": args.length_profile}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            ap.error(f"--set {item!r}: expected FIELD=VALUE")
        try:
            overrides[field.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[field.strip()] = value  # a bare string
    res = run(args.config, args.steps, args.warmup, args.eval_every, work, modes,
              {k: v for k, v in overrides.items() if v is not None})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    plot(res, out.with_suffix(".png"))
    print_table(res)
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
