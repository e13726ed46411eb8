"""The report of `understudy demo grid-risk`: OUT/report.md with PNG plots in OUT/plots/, from OUT/summary.json
and the raw per-request events of OUT/load/. Every figure comes from that run.

Latency statistics reuse loadtests/report.py (the load-test kit's percentiles and tables), loaded from the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from understudy.cli.demo_procs import LOADTEST_REPORT

SECTIONS = ("## Headline", "## Held-out accuracy over training", "## Drafter acceptance per version",
            "## Serving during the run: TTFT and TPOT over time, pair swaps marked",
            "## Speculation on vs off (final pair, same prompts)", "## Failed requests", "## Phases",
            "## Held-out prompts", "## Files")


def loadtest_report() -> Any:
    """loadtests/report.py as a module (it is a script of the checkout, not part of the package)."""
    name = "understudy_loadtest_report"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, LOADTEST_REPORT)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{LOADTEST_REPORT}: the load-test report script is missing from this checkout")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# ---- figures from the raw data -------------------------------------------------------------------------------------
def request_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests, outcomes, failures and TTFT/TPOT percentiles (ms) of one set of Locust events."""
    rep = loadtest_report()
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[str(r.get("outcome"))] = outcomes.get(str(r.get("outcome")), 0) + 1
    lat = rep.samples(records)
    return {"requests": len(records), "ok": outcomes.get("ok", 0), "failed": len(records) - outcomes.get("ok", 0),
            "outcomes": outcomes, "ttft_ms": rep.summarize(lat["TTFT"]), "tpot_ms": rep.summarize(lat["TPOT"]),
            "drafter_versions_seen": sorted({str(r.get("version")) for r in records})}


def accuracy_curve(sft: dict[str, Any], grpo_steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Greedy held-out accuracy at every measured point, on one problem set: the base model and the SFT policy
    (`understudy sft`, before and after), then each GRPO step (`understudy train`'s metrics.jsonl; step 0 is the
    SFT policy measured again by the trainer)."""
    curve: list[dict[str, Any]] = []
    if sft.get("initial_accuracy") is not None:
        curve.append({"stage": "base", "label": "base model", "greedy": sft["initial_accuracy"],
                      "format_rate": sft.get("initial_format_rate"), "by": "understudy sft, before its first step"})
    if sft.get("accuracy") is not None:
        prec = " bf16" if sft.get("precision") == "bfloat16" else ""
        curve.append({"stage": "SFT", "label": f"SFT ({sft.get('steps')} steps{prec})", "greedy": sft["accuracy"],
                      "format_rate": sft.get("format_rate"), "by": "understudy sft, after its last step"})
    for r in grpo_steps:
        if r.get("eval_accuracy") is not None:
            curve.append({"stage": "GRPO", "step": r["step"], "label": f"GRPO step {r['step']}",
                          "greedy": r["eval_accuracy"], "sampled": r.get("eval_accuracy_sampled"),
                          "by": "understudy train (metrics.jsonl)"})
    return curve


def _read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- formatting -------------------------------------------------------------------------------------------------
def _f(x: Any, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms" if x >= 100 else f"{x:.1f} ms"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


# ---- plots ------------------------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(curve: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = list(range(len(curve)))
    ax.plot(xs, [c["greedy"] for c in curve], "o-", label="greedy")
    sampled = [(i, c["sampled"]) for i, c in enumerate(curve) if c.get("sampled") is not None]
    if sampled:
        ax.plot([i for i, _ in sampled], [v for _, v in sampled], "s--", alpha=0.7, label="sampled (T = 1)")
    ax.set_xticks(xs, [c["label"].replace("GRPO step ", "step ") for c in curve], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Held-out grid-risk accuracy (one problem set)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_acceptance(evals: list[dict[str, Any]], k: int, path: Path) -> None:
    plt = _plt()
    order = sorted(evals, key=lambda e: ({"generic": 0, "sft-adapted": 1}.get(e["kind"], 2), e.get("step") or 0,
                                         e["target_label"]))
    colors = {"generic": "C7", "sft-adapted": "C1", "co-trained": "C0"}
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(order)), 4))
    xs = range(len(order))
    bars = ax.bar(xs, [e["acceptance_length"] for e in order], color=[colors[e["kind"]] for e in order])
    for b, e in zip(bars, order, strict=True):
        ax.annotate(f"{e['acceptance_length']:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [f"{e['label']}\n(v{e.get('drafter_version')}) on\n{e['target_label']}" for e in order],
                  fontsize=7)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_ylabel(f"acceptance length L({k})")
    ax.set_title(f"Drafters on held-out grid-risk prompts, L({k})")
    kinds = [kd for kd in colors if any(e["kind"] == kd for e in order)]
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=colors[kd]) for kd in kinds], kinds, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SHADES = {"SFT (": "C1", "SFT pair": "C8", "GRPO": "C4"}  # phase name prefix -> shading of the latency plot


def plot_latency(events: dict[str, list[dict[str, Any]]], swaps: list[dict[str, Any]],
                 phases: list[dict[str, Any]], t0: float, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    styles = {"run": ("C0", "training run"), "spec-on": ("C2", "speculation on"), "spec-off": ("C3", "speculation off")}
    for (metric, key), ax in zip((("TTFT", "ttft_s"), ("TPOT", "tpot_s")), axes, strict=True):
        for name, recs in events.items():
            pts = [((r["t"] - t0) / 60, r[key] * 1000) for r in recs if r.get("outcome") == "ok" and r.get(key)]
            if pts:
                color, label = styles[name]
                ax.plot([x for x, _ in pts], [y for _, y in pts], ".", color=color, ms=4, alpha=0.7, label=label)
        bad = [(r["t"] - t0) / 60 for recs in events.values() for r in recs if r.get("outcome") != "ok"]
        for x in bad:
            ax.axvline(x, color="red", lw=2, alpha=0.8)
        for s in swaps:
            result = s.get("result")
            color = {"success": "k", "rolled_back": "orange"}.get(str(result), "red")
            ax.axvline((s["at"] - t0) / 60, color=color, ls="--", lw=1)
        for p in phases:
            color = next((c for prefix, c in SHADES.items() if p["name"].startswith(prefix)), None)
            if color and p["seconds"]:
                ax.axvspan(p["start_s"] / 60, (p["start_s"] + p["seconds"]) / 60, alpha=0.08, color=color)
        ax.set_ylabel(f"{metric} (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    axes[1].set_xlabel("minutes since the start; dashed: pair swaps; shaded: SFT, SFT pair, GRPO")
    axes[0].set_title("Per-request latency of the streaming chat users")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spec(on: dict[str, Any], off: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, key, title in ((axes[0], "tpot_ms", "TPOT"), (axes[1], "ttft_ms", "TTFT")):
        vals = [on[key]["p50"] or 0.0, off[key]["p50"] or 0.0]
        bars = ax.bar(["speculation on", "speculation off"], vals, color=["C2", "C3"])
        for b, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{title} p50 (ms)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Final pair, same held-out prompts and load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the markdown -----------------------------------------------------------------------------------------------
def _intro(s: dict[str, Any]) -> list[str]:
    m = s["machine"]
    lines = ["# Grid risk end to end: `understudy demo grid-risk`", ""]
    if s.get("status") != "ok":
        lines += [f"**This run did not complete ({s.get('status')}: {s.get('error')}).** Figures below are what it "
                  "measured before it stopped.", ""]
    lines += [
        f"Run of {s['started_at']}: budget **{s['budget_minutes']:g} minutes** (`--minutes`), "
        f"{s['elapsed_minutes']:.1f} minutes elapsed. Model `{s['model']}`, {s['users']} streaming Locust users, "
        f"seed {s['seed']}.",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable), {m.get('memory_gib')} GiB; "
        f"load average {m['load_average_start']} at the start, {m.get('load_average_end')} at the end. The server, "
        "the trainer and Locust share these cores throughout, so every time below is a time under that load.",
        "",
        f"Every figure in this report was measured in this run, from the files in `{s['out']}`.", ""]
    return lines


def _headline(s: dict[str, Any]) -> list[str]:
    h, acc, sw = s["headline"], s["accuracy"], s["serving"]
    on, off = s["speculation"].get("on_stats") or {}, s["speculation"].get("off_stats") or {}
    pair = s["speculation"].get("pair") or {}
    final = next((c["label"] for c in reversed(acc["curve"]) if c["stage"] == "GRPO"), "-")
    rows = [
        [f"greedy held-out accuracy before training (base model, {acc['problems']} problems)", _f(h["accuracy_before"])],
        [f"greedy held-out accuracy after training ({final})", _f(h["accuracy_after"])],
        [f"... the best constant answer on the same problems (`answer: {h.get('constant_answer')}`: the format and "
         "nothing else)", _f(h.get("constant_answer_accuracy"))],
        [f"greedy accuracy on the {h.get('problems_where_constant_fails', '?')} of those problems that the constant "
         "answer gets wrong (what the format alone cannot buy): base model -> SFT policy",
         f"{_f(h.get('accuracy_where_constant_fails_before'))} -> {_f(h.get('accuracy_where_constant_fails_sft'))}"],
        [f"acceptance length L({s['k']}) on held-out grid-risk prompts: co-trained drafter of the last published pair",
         _f(h["cotrained_acceptance_length"])],
        ["... the generic drafter, on the same policy", _f(h["generic_acceptance_length"])],
        [f"served TPOT p50, speculation on (final pair: drafter v{pair.get('drafter_version')}, policy "
         f"{pair.get('policy')})", f"{_ms(h['tpot_p50_ms_spec_on'])} ({on.get('ok', 0)} requests)"],
        ["served TPOT p50, speculation off (same server and pair, K pinned at 0)",
         f"{_ms(h['tpot_p50_ms_spec_off'])} ({off.get('ok', 0)} requests)"],
        [f"failed requests during the run, across {h['pair_swaps']} successful pair swaps "
         f"({len(sw['swaps'])} swap records)", f"**{h['failed_requests_across_swaps']}** of {sw['requests']}"],
    ]
    return ["## Headline", "", *_table(["figure", "value"], rows), ""]


def _accuracy(s: dict[str, Any]) -> list[str]:
    acc = s["accuracy"]
    rows = [[c["label"], _f(c["greedy"]), _f(c.get("sampled")), _f(c.get("format_rate")), c["by"]]
            for c in acc["curve"]]
    return ["## Held-out accuracy over training", "",
            f"{acc['problems']} held-out problems, the same set at every point (the GRPO trainer's held-out set; "
            f"`understudy sft` was given the seed that makes its own held-out set the same problems), decoded "
            f"greedily with up to {acc['max_new_tokens']} tokens. GRPO step 0 is the SFT policy measured again by "
            "the trainer. 'sampled' is the accuracy at the rollout temperature with fixed seeds.", "",
            "![accuracy](plots/accuracy.png)", "",
            *_table(["point", "greedy", "sampled", "answer format", "measured by"], rows), ""]


def _drafters(s: dict[str, Any]) -> list[str]:
    d = s["drafters"]
    rows = [[e["label"], _f(e.get("drafter_version")), e["target_label"], _f(e["acceptance_length"]),
             ", ".join(f"{a:.2f}" for a in e["per_position_acceptance"]), str(e["num_sequences"]),
             f"{e['best_k']} ({e['predicted_speedup']:.2f}x)"] for e in d["evaluated"]]
    skipped = d.get("not_evaluated_for_time")
    gen = s.get("generic_drafter") or {}
    return ["## Drafter acceptance per version", "",
            f"`understudy drafter eval` on the held-out prompts ({s['profile']['drafter_eval_prompts']} of them, the "
            f"target's greedy answers of up to {s['profile']['drafter_eval_tokens']} tokens): per-position acceptance "
            f"and L({d['k']}) = 1 + their sum. Each co-trained drafter is measured on the policy it was published "
            "with; the generic drafter on the final policy (beside the final co-trained one) and on its own base "
            f"model. Generic drafter: {gen.get('source')}"
            + (" (trained in this run, for its share of the budget)" if gen.get("trained_here") else "") + ".", "",
            "![acceptance](plots/acceptance.png)", "",
            *_table(["drafter", "registry version", "target", f"L({d['k']})", "per position", "sequences",
                     "best K (predicted speed-up)"], rows), "",
            *([f"Not evaluated, the budget being spent: {'; '.join(skipped)}.", ""] if skipped else [])]


def _serving(s: dict[str, Any], rep: Any, events: dict[str, list[dict[str, Any]]]) -> list[str]:
    sw, t0 = s["serving"], s["t0"]
    rows = [[f"{(x['at'] - t0) / 60:.1f}", f"v{x.get('from_version')} + {x.get('from_policy')}",
             f"v{x.get('to_version')} + {x.get('to_policy')}", str(x.get("result")), _f(x.get("drain_s"), 1),
             _f(x.get("stall_s"), 3), str(x.get("reason", ""))[:90]] for x in sw["swaps"]]
    lines = ["## Serving during the run: TTFT and TPOT over time, pair swaps marked", "",
             f"The server followed `latest` in the run's registry; Locust ran {s['users']} closed-loop streaming chat "
             f"users on the held-out prompts (max {s['profile']['locust_max_tokens']} tokens, temperature 0) from "
             "the server's start to the end of training. Swap times are the server's own records "
             "(`/admin/drafter`): dashed lines, black for a swap that took effect, orange for a canary rollback, red "
             "for a refused one; a solid red line marks a failed request. Shading: SFT (orange), the SFT pair's "
             "drafter adaptation (yellow), GRPO (purple).", "", "![latency](plots/latency.png)", "",
             *_table(["minute", "from (drafter + policy)", "to", "result", "drain (s)", "stall (s)", "reason"], rows),
             ""]
    runs = [(label, recs) for label, recs in (("run", events["run"]),) if recs]
    if runs:
        rows_ = rep.analyze(runs)
        lines += ["Latency over the whole run (successful requests; from loadtests/report.py):", "",
                  *rep.latency_table(rows_), "", *rep.summary_table(rows_), ""]
    return lines


def _spec(s: dict[str, Any], rep: Any, events: dict[str, list[dict[str, Any]]]) -> list[str]:
    sp = s["speculation"]
    lines = ["## Speculation on vs off (final pair, same prompts)", ""]
    if not sp.get("pair"):
        return [*lines, "Not measured: the run stopped before this phase.", ""]
    ratio = sp.get("tpot_p50_ratio_off_over_on")
    pulls = [f"- On window {w + 1}, steps the adaptive controller ran with each K: " + ("; ".join(
        f"batch {b}: " + ", ".join(f"K={k} {n}" for k, n in arms.items() if n) for b, arms in p.items()) or "none")
        for w, p in enumerate(sp.get("on_arm_pulls") or [])]
    lines += [f"Final pair: drafter v{sp['pair'].get('drafter_version')} with policy {sp['pair'].get('policy')}. "
              f"On: {sp['on']}. Off: {sp['off']}. Each mode ran {sp['seconds_each']} s of Locust with the same users "
              f"and prompts, in {sp.get('windows', 1)} windows alternating on and off (a drift of the box's load falls "
              f"on both), after two warm-up requests. TPOT p50 off / on = {_f(ratio)} (above 1: speculation made "
              "each token faster; below 1: slower).", "", *pulls, *([""] if pulls else []),
              "![speculation](plots/spec_onoff.png)", ""]
    runs = [(label, events[key]) for label, key in (("on", "spec-on"), ("off", "spec-off")) if events[key]]
    if len(runs) == 2:
        rows = rep.analyze(runs)
        lines += [*rep.latency_table(rows), "", *rep.summary_table(rows), *rep.comparison_tables(rep.comparisons(rows)),
                  ""]
    return lines


def _failures(s: dict[str, Any]) -> list[str]:
    fr = s["failed_requests"]
    rows = [[name, str(st["requests"]), str(st["failed"]), json.dumps(st["outcomes"])]
            for name, st in (("training run (all pair swaps)", s["serving"]), ("speculation on", s["speculation"]
                             .get("on_stats") or {}), ("speculation off", s["speculation"].get("off_stats") or {}))
            if st]
    return ["## Failed requests", "",
            "A request fails when it gets a non-2xx answer, an error event in its stream, or a stream that ends "
            "without `[DONE]` and a finish reason (loadtests/locustfile.py).", "",
            *_table(["phase", "requests", "failed", "outcomes"], rows), "",
            f"Total failed: **{sum(v for v in fr.values())}**.", ""]


def _phases(s: dict[str, Any]) -> list[str]:
    rows = [[p["name"], _f(p["start_s"] / 60, 1), _planned(p["planned_s"]),
             _f(None if p["seconds"] is None else p["seconds"] / 60, 1)] for p in s["phases"]]
    g = s["grpo"]
    return ["## Phases", "",
            f"Shares of the budget: {json.dumps(s['shares'])} (durations, or for `*_end` the point in the budget "
            f"where the phase ends). GRPO ran {g['steps']} step(s), one `understudy train --resume` each, "
            f"publishing {len(g['published'])} pair(s).", "",
            *_table(["phase", "start (min)", "planned (min)", "took (min)"], rows), ""]


def _planned(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f}" if seconds > 0 else "0 (earlier phases overran)"


def _heldout(s: dict[str, Any]) -> list[str]:
    h = s["heldout_prompts"]
    c = h.get("checked_against", {})
    return ["## Held-out prompts", "",
            f"{h.get('count')} grid-risk problems drawn by the task with seed {h.get('seed')} (no training stream "
            f"uses it), written to `{h.get('file')}`. None of them is among the first "
            f"{c.get('sft_training_problems')} problems of the SFT training stream, the first "
            f"{c.get('grpo_training_problems')} of the GRPO training stream (the run used "
            f"{s['sft'].get('steps', '?')} SFT steps of {s['profile']['sft_batch']} and {s['grpo']['steps']} GRPO steps "
            f"of {s['profile']['grpo_prompts']}), the {c.get('accuracy_problems')} accuracy problems, or the "
            f"{c.get('shipped_prompt_files')} prompts of the shipped prompt files; {h.get('drawn_and_rejected_as_seen')} "
            "drawn problems were rejected as seen. The accuracy problems themselves appear "
            f"{h.get('accuracy_problems_in_training_streams')} times among those training problems.", ""]


def _files(s: dict[str, Any]) -> list[str]:
    return ["## Files", "",
            "- `summary.json`: every figure above, and the phases, swaps, Locust runs and child processes",
            "- `load/events-*.jsonl`: one line per request (loadtests/locustfile.py); `load/*_stats.csv`: Locust's own",
            "- `registry/`: the run's registry (pairs, aliases and their history)",
            "- `sft/`, `sft-drafter/`, `grpo/` (metrics.jsonl, policy-step*/, drafter-step*/): what was trained",
            "- `eval/drafter-*.json`: `understudy drafter eval --json` outputs; `logs/`: every child's log",
            f"- child processes left running after the run: {s.get('children_left')}", ""]


def write_report(summary: dict[str, Any], out: Path) -> Path:
    """Write OUT/report.md and OUT/plots/*.png from a complete run's summary and events."""
    rep = loadtest_report()
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    events = {k: _read_events(out / "load" / f"events-{k}.jsonl") for k in ("run", "spec-on", "spec-off")}
    plot_accuracy(summary["accuracy"]["curve"], plots / "accuracy.png")
    plot_acceptance(summary["drafters"]["evaluated"], summary["k"], plots / "acceptance.png")
    plot_latency(events, summary["serving"]["swaps"], summary["phases"], summary["t0"], plots / "latency.png")
    plot_spec(summary["speculation"]["on_stats"], summary["speculation"]["off_stats"], plots / "spec_onoff.png")
    lines = [*_intro(summary), *_headline(summary), *_accuracy(summary), *_drafters(summary),
             *_serving(summary, rep, events), *_spec(summary, rep, events), *_failures(summary), *_phases(summary),
             *_heldout(summary), *_files(summary)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
