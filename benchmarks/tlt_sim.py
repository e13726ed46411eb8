"""Project TLT's rollout and end-to-end speed-up beyond one machine: a small discrete-event simulator of GRPO steps
fed with measured (or explicitly assumed) costs.

    python benchmarks/tlt_sim.py [--costs FILE ...] [--lengths FILE] [--accelerators 1,8,64] [--out JSON]
                                 [--steps 20] [--warmup 3] [--seed 0]
    python benchmarks/tlt_sim.py --write-cpu-inputs   # re-derive sim_inputs/cpu-smollm2.json from results/

TLT ("Taming the Long Tail", Hu et al., ASPLOS '26) speeds up reasoning-RL rollouts by speculative decoding with a
small drafter that is trained on the accelerators the long tail of response lengths leaves idle, and picks the
speculation depth K (off included) per live batch size. This script asks what that mechanism gives at A
accelerators, given:

  * a costs file (`benchmarks/sim_inputs/*.json`; every field carries a "source" or an "assumption" string): the
    target's decode step time vs live batch size, the cost of a width-w (verification) forward relative to width 1,
    the drafter's per-position acceptance and how it grows with drafter-training minutes, the drafter's cost per
    drafted token, the learner's update cost per response token and its all-reduce, the response-length
    distribution and the batch;
  * optionally `--lengths FILE`: a JSON list of response lengths, or a `benchmarks/rl_step.py` result whose history
    rows carry `response_lengths` -- replaces the costs file's length model.

The model, per RL step: the step's responses are split round-robin over A accelerators (as the trainer does).
Each accelerator decodes its share with continuous batching: up to `max_batch_per_accelerator` requests start
together and a finished one frees its slot for a waiting one. An engine step at live batch b advances every live
sequence; without speculation by 1 token for decode_step_ms(b). With TLT an oracle controller (the expected-value
version of the engine's bandit: it knows the costs and the acceptance exactly, so it never explores) picks the K
from the arm set that maximises expected tokens per ms,

    b * L(K) / (decode_step_ms(b) * verify_vs_width(K + 1, b) + K * drafter_cost * decode_step_ms(b)),

with L(K) = 1 + a_1 + ... + a_K the mean acceptance length from *cumulative* per-position acceptance rates (a_i =
fraction of drafts whose position i was accepted, the engine's `per_position_acceptance`; positions past the
measured list count 0). Progress uses the expected acceptance length, not a sampled one: a sequence with r tokens
left finishes after r / L(K) engine steps (a fluid approximation; fractional steps allowed), so every run is
deterministic. When an accelerator has finished its share while others still decode, it trains the drafter ("spot
training") until the rollout phase ends; its idle seconds less a per-window start-up cost, times
`spot.efficiency`, become drafter-training minutes, and the acceptance of the next step follows the saturating
curve a_1(t) = a_max - (a_max - a0) * exp(-t / tau) (deeper positions scale in proportion to a_1). Three runs share
the same sampled lengths: "off" (no speculation), "tlt_no_spot" (controller on, drafter frozen at its initial
acceptance) and "tlt". The update phase costs tokens * update_s_per_token / A (data parallel, tokens balanced) plus
a ring all-reduce of the gradients. Reported per A: medians over the steps after the warm-up.

Scaling: weak by default -- each accelerator gets `prompts_per_accelerator * group_size` responses per step, so the
global batch grows with A (TLT's setting: one large batch per step spread over many accelerators); the tail of a
step is the longest response among more samples as A grows. `batch.scaling = "strong"` keeps
`global_prompts * group_size` responses per step whatever A.

Writes JSON (inputs, assumptions, results) to benchmarks/results/tlt_sim.json by default. Standard library only.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
INPUTS = HERE / "sim_inputs"
DEFAULT_COSTS = (INPUTS / "cpu-smollm2.json", INPUTS / "gpu-assumed.json")
MODES = ("off", "tlt_no_spot", "tlt")
PAPER = "TLT paper (Hu et al. 2026): 1.7-2.1x end to end on GPUs"

# What the simulator itself assumes, whatever the inputs (printed and written with the results).
MODEL_ASSUMPTIONS = (
    "oracle controller: per engine step it picks the arm K maximising expected tokens/ms from the true costs and "
    "acceptance (the engine's bandit has to explore, and pays for it; this does not)",
    "expected (not sampled) acceptance length, fluid progress: r tokens take r / L(K) engine steps; drafts past a "
    "sequence's end are not charged",
    "prefill, sampling, detokenisation and reward computation are not modelled (folded into the measured step cost "
    "where the source says so)",
    "every sequence's cost at batch b is the same: the KV length of each sequence is not tracked",
    "spot training only uses idle accelerator time in the rollout phase, is pre-empted at its end at no cost to the "
    "step, and its minutes add linearly over accelerators; acceptance changes between RL steps only",
    "the policy's drift away from the drafter during RL is not modelled (optimistic for tlt_no_spot)",
    "response lengths are i.i.d. per response (no per-prompt correlation) and identical across the three runs",
    "the update costs the same per response token at every step and divides perfectly over A (tokens rebalanced)",
)


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def interp(points: dict[float, float], x: float, extrapolate: bool = True) -> float:
    """Piecewise-linear y(x) through `points`; outside their range: the end segments' line, or the end value."""
    xs = sorted(points)
    if len(xs) == 1:
        return points[xs[0]]
    if x <= xs[0] or x >= xs[-1]:
        lo, hi = (xs[0], xs[1]) if x <= xs[0] else (xs[-2], xs[-1])
        if not extrapolate:
            return points[xs[0] if x <= xs[0] else xs[-1]]
    else:
        hi_i = next(i for i, v in enumerate(xs) if v >= x)
        lo, hi = xs[hi_i - 1], xs[hi_i]
    return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)


class Costs(Protocol):
    def forward_ms(self, b: int, w: int) -> float:
        """One target forward of width w (1 = a plain decode step) over b live sequences, in ms."""
        ...


@dataclass
class TableCosts:
    """Measured: decode_step_ms(b) interpolated linearly in b (extrapolated past the table), times the width-w
    ratio of the nearest batch buckets (interpolated in b between buckets, the end bucket's beyond them; in w,
    interpolated between measured widths and extrapolated from the last two)."""

    step_ms: dict[float, float]
    verify: dict[float, dict[float, float]]

    def forward_ms(self, b: int, w: int) -> float:
        per_bucket = {bb: interp(table, w) for bb, table in self.verify.items()}
        return interp(self.step_ms, b) * interp(per_bucket, b, extrapolate=False)


@dataclass
class RooflineCosts:
    """Assumed accelerator: a forward reads the weights once and every live sequence's KV cache once (memory term)
    and does compute proportional to the b * w tokens it processes; it costs the larger of the two plus a fixed
    per-forward overhead."""

    overhead_ms: float
    weights_ms: float
    kv_ms_per_seq: float
    compute_ms_per_token: float

    def forward_ms(self, b: int, w: int) -> float:
        return self.overhead_ms + max(self.weights_ms + self.kv_ms_per_seq * b, self.compute_ms_per_token * b * w)


@dataclass
class Acceptance:
    """Cumulative per-position acceptance of the initial drafter and its growth with drafter-training minutes."""

    per_position: tuple[float, ...]
    a_max: float
    tau_min: float

    def at(self, minutes: float) -> tuple[float, ...]:
        a0 = self.per_position[0] if self.per_position else 0.0
        if a0 <= 0:
            return tuple(0.0 for _ in self.per_position)
        a1 = self.a_max - (self.a_max - a0) * math.exp(-minutes / self.tau_min) if self.tau_min > 0 else a0
        return tuple(min(1.0, p * a1 / a0) for p in self.per_position)


def acceptance_length(per_position: tuple[float, ...], k: int) -> float:
    """L(K) = 1 + a_1 + ... + a_K for cumulative per-position rates; positions past the list accept nothing."""
    return 1.0 + sum(per_position[:k])


@dataclass
class AllReduce:
    """Ring all-reduce of the gradients: 2 (A-1)/A * bytes over the slowest link in use."""

    grad_bytes: float
    node_size: int
    intra_GBps: float
    inter_GBps: float

    def seconds(self, a: int) -> float:
        if a <= 1:
            return 0.0
        bw = self.intra_GBps if a <= self.node_size else self.inter_GBps
        return 2 * (a - 1) / a * self.grad_bytes / (bw * 1e9)


@dataclass
class Lengths:
    """Response lengths: a capped lognormal, or a pool of observed lengths drawn with replacement."""

    max_new_tokens: int
    median: float = 0.0
    sigma: float = 0.0
    pool: tuple[int, ...] = ()

    def draw(self, rng: random.Random, n: int) -> list[int]:
        if self.pool:
            return [min(self.max_new_tokens, rng.choice(self.pool)) for _ in range(n)]
        mu = math.log(self.median)
        return [max(1, min(self.max_new_tokens, round(rng.lognormvariate(mu, self.sigma)))) for _ in range(n)]


@dataclass
class Batch:
    prompts_per_accelerator: int
    group_size: int
    max_batch_per_accelerator: int
    scaling: str = "weak"
    global_prompts: int = 0

    def responses(self, a: int) -> int:
        if self.scaling == "strong":
            return self.global_prompts * self.group_size
        return self.prompts_per_accelerator * self.group_size * a


@dataclass
class Inputs:
    name: str
    costs: Costs
    drafter_cost: float
    arms: tuple[int, ...]
    acceptance: Acceptance
    update_s_per_token: float
    allreduce: AllReduce
    lengths: Lengths
    batch: Batch
    spot_efficiency: float
    spot_startup_s: float
    raw: dict[str, Any] = field(default_factory=dict)


def costs_from(spec: dict[str, Any], verify: dict[str, Any]) -> Costs:
    if "roofline" in spec:
        r = spec["roofline"]
        return RooflineCosts(r["overhead_ms"], r["weights_ms"], r["kv_ms_per_seq"], r["compute_ms_per_token"])
    if "by_batch" in verify:
        buckets = verify["by_batch"]
    elif "table" in verify:
        buckets = {"1": verify["table"]}  # one table, assumed to hold at every batch size
    else:
        raise ValueError("verify_vs_width needs 'by_batch' or 'table' (or decode_step_ms a 'roofline')")
    return TableCosts(step_ms={float(b): float(v) for b, v in spec["table"].items()},
                      verify={float(b): {float(w): float(r) for w, r in t.items()} for b, t in buckets.items()})


def lengths_from(spec: dict[str, Any]) -> Lengths:
    if "lognormal" in spec:
        ln = spec["lognormal"]
        return Lengths(max_new_tokens=int(ln["max_new_tokens"]), median=float(ln["median"]), sigma=float(ln["sigma"]))
    pool = tuple(int(x) for x in spec["pool"])
    return Lengths(max_new_tokens=int(spec.get("max_new_tokens", max(pool))), pool=pool)


def lengths_file(path: Path) -> Lengths:
    """A JSON list of ints, or an rl_step.py result whose history rows carry `response_lengths`."""
    data = json.loads(path.read_text())
    if isinstance(data, list):
        pool = [int(x) for x in data]
        cap = max(pool)
    else:
        rows = [r for mode_rows in data.get("history", {}).values() for r in mode_rows]
        pool = [int(x) for r in rows for x in r.get("response_lengths", [])]
        cap = int(data.get("config", {}).get("max_new_tokens", max(pool, default=1)))
    if not pool:
        raise SystemExit(f"{path}: no response lengths (a JSON list of ints, or an rl_step.py result whose history "
                         "rows carry 'response_lengths')")
    return Lengths(max_new_tokens=cap, pool=tuple(pool))


def load_inputs(path: Path, lengths: Lengths | None = None) -> Inputs:
    raw = json.loads(path.read_text())
    acc, upd, ar, b, spot = raw["acceptance"], raw["update"], raw["update"]["allreduce"], raw["batch"], raw["spot"]
    return Inputs(
        name=raw.get("name", path.stem),
        costs=costs_from(raw["decode_step_ms"], raw["verify_vs_width"]),
        drafter_cost=float(raw["drafter_cost"]["value"]),
        arms=tuple(int(k) for k in raw["arms"]["value"]),
        acceptance=Acceptance(tuple(acc["per_position"]), float(acc["growth"]["a_max"]),
                              float(acc["growth"]["tau_min"])),
        update_s_per_token=float(upd["s_per_token"]),
        allreduce=AllReduce(float(ar["grad_bytes"]), int(ar["node_size"]), float(ar["intra_GBps"]),
                            float(ar["inter_GBps"])),
        lengths=lengths or lengths_from(raw["lengths"]),
        batch=Batch(int(b["prompts_per_accelerator"]), int(b["group_size"]), int(b["max_batch_per_accelerator"]),
                    str(b.get("scaling", "weak")), int(b.get("global_prompts", 0))),
        spot_efficiency=float(spot["efficiency"]),
        spot_startup_s=float(spot["startup_s"]),
        raw=raw,
    )


def assumptions(node: Any, path: str = "") -> Iterator[str]:
    """Every "source" / "assumption" string of an inputs file, prefixed with where it sits."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("source", "assumption") and isinstance(value, str):
                yield f"{path or 'file'} ({key}): {value}"
            else:
                yield from assumptions(value, f"{path}.{key}" if path else key)


# ----------------------------------------------------------------------------------------------------------------
# The simulation

Pick = Callable[[int], tuple[int, float, float]]  # live batch -> (K, tokens per sequence per step, ms per step)


def controller(inp: Inputs, per_position: tuple[float, ...] | None) -> Pick:
    """The oracle K picker for one RL step's acceptance (None: speculation off), memoised per live batch size."""
    memo: dict[int, tuple[int, float, float]] = {}

    def pick(b: int) -> tuple[int, float, float]:
        if b not in memo:
            plain = inp.costs.forward_ms(b, 1)
            best = (0, 1.0, plain)
            for k in inp.arms if per_position is not None else ():
                if k <= 0:
                    continue
                length = acceptance_length(per_position, k)  # type: ignore[arg-type]
                ms = inp.costs.forward_ms(b, k + 1) + k * inp.drafter_cost * plain
                if length / ms > best[1] / best[2] * (1 + 1e-12):  # ties go to the shallower arm (off first)
                    best = (k, length, ms)
            memo[b] = best
        return memo[b]

    return pick


def decode_share(lengths: list[int], max_batch: int, pick: Pick) -> tuple[float, dict[int, float]]:
    """Busy seconds of one accelerator decoding `lengths` with continuous batching, and engine steps per K.

    All live sequences advance alike, so progress is one counter (tokens per live sequence since the start); a
    sequence that joins at progress p with length n finishes at p + n. Between two finishes the live batch, hence K
    and the step cost, are constant, so the clock jumps from finish to finish."""
    waiting = list(reversed(lengths))
    live: list[float] = []
    progress = clock_ms = 0.0
    steps: dict[int, float] = {}
    while waiting or live:
        while waiting and len(live) < max_batch:
            heapq.heappush(live, progress + waiting.pop())
        k, tokens_per_step, ms = pick(len(live))
        n_steps = (live[0] - progress) / tokens_per_step
        clock_ms += n_steps * ms
        steps[k] = steps.get(k, 0.0) + n_steps
        progress = live[0]
        while live and live[0] <= progress:
            heapq.heappop(live)
    return clock_ms / 1000.0, steps


@dataclass
class StepResult:
    rollout_s: float
    update_s: float
    idle_s: float  # accelerator-seconds idle in the rollout phase, summed over accelerators
    spot_used_s: float  # of those, what the spot trainer trained for (0 unless mode "tlt")
    tokens: int
    acceptance_length_k4: float
    engine_steps: dict[int, float]

    @property
    def step_s(self) -> float:
        return self.rollout_s + self.update_s


def step_lengths(inp: Inputs, a: int, steps: int, seed: int) -> list[list[int]]:
    """Every step's response lengths for A accelerators (shared by the three runs)."""
    out = []
    for s in range(steps):
        rng = random.Random(seed * 1_000_003 + a * 10_007 + s)
        out.append(inp.lengths.draw(rng, inp.batch.responses(a)))
    return out


def run_mode(inp: Inputs, a: int, mode: str, lengths: list[list[int]]) -> list[StepResult]:
    """One run of len(lengths) RL steps on A accelerators in `mode` (off / tlt_no_spot / tlt)."""
    minutes = 0.0
    results = []
    for step in lengths:
        per_position = None if mode == "off" else inp.acceptance.at(minutes)
        pick = controller(inp, per_position)
        shares = [step[w::a] for w in range(a)]  # round-robin, as the trainer splits requests
        busy, engine_steps = [], {}
        for share in shares:
            seconds, ks = decode_share(share, inp.batch.max_batch_per_accelerator, pick)
            busy.append(seconds)
            for k, n in ks.items():
                engine_steps[k] = engine_steps.get(k, 0.0) + n
        rollout = max(busy)
        idle = [rollout - x for x in busy]
        used = sum(max(0.0, i - inp.spot_startup_s) for i in idle) if mode == "tlt" else 0.0
        minutes += used * inp.spot_efficiency / 60.0
        tokens = sum(step)
        update = tokens * inp.update_s_per_token / a + inp.allreduce.seconds(a)
        results.append(StepResult(rollout, update, sum(idle), used, tokens,
                                  acceptance_length(per_position, 4) if per_position else 1.0, engine_steps))
    return results


def summarise(rows: list[StepResult], a: int, warmup: int) -> dict[str, Any]:
    """Medians (rollout, update, step) and pooled fractions over the steps after the warm-up."""
    kept = rows[warmup:] if len(rows) > warmup else rows
    rollout_total = sum(r.rollout_s for r in kept)
    idle = sum(r.idle_s for r in kept)
    engine: dict[int, float] = {}
    for r in kept:
        for k, n in r.engine_steps.items():
            engine[k] = engine.get(k, 0.0) + n
    total_steps = sum(engine.values()) or 1.0
    return {
        "rollout_s": statistics.median(r.rollout_s for r in kept),
        "update_s": statistics.median(r.update_s for r in kept),
        "step_s": statistics.median(r.step_s for r in kept),
        "idle_fraction": idle / (a * rollout_total) if rollout_total else 0.0,
        "spot_used_fraction": sum(r.spot_used_s for r in kept) / idle if idle else 0.0,
        "k_share": {str(k): round(n / total_steps, 4) for k, n in sorted(engine.items())},
        "final_L_k4": rows[-1].acceptance_length_k4,
        "per_step": {"rollout_s": [round(r.rollout_s, 4) for r in rows],
                     "L_k4": [round(r.acceptance_length_k4, 4) for r in rows],
                     "tokens": [r.tokens for r in rows]},
    }


def project(inp: Inputs, a: int, steps: int = 20, warmup: int = 3, seed: int = 0) -> dict[str, Any]:
    """The three runs at A accelerators and the speed-ups off / TLT."""
    lengths = step_lengths(inp, a, steps, seed)
    runs = {mode: summarise(run_mode(inp, a, mode, lengths), a, warmup) for mode in MODES}
    off, tlt, nospot = runs["off"], runs["tlt"], runs["tlt_no_spot"]
    return {
        "accelerators": a,
        "responses_per_step": inp.batch.responses(a),
        "runs": runs,
        "rollout_speedup": off["rollout_s"] / tlt["rollout_s"],
        "step_speedup": off["step_s"] / tlt["step_s"],
        "rollout_speedup_no_spot": off["rollout_s"] / nospot["rollout_s"],
        "step_speedup_no_spot": off["step_s"] / nospot["step_s"],
        "rollout_share_off": off["rollout_s"] / off["step_s"],
    }


# ----------------------------------------------------------------------------------------------------------------
# Report


def shown(path: Path) -> str:
    """A path as the report names it: relative to the repository root when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def table(name: str, rows: list[dict[str, Any]]) -> str:
    head = ("| A | rollout off s | rollout TLT s | rollout x | end-to-end x | no-spot e2e x | idle % | spot-used % "
            "| final L(K=4) | rollout % of step (off) |")
    lines = [f"### {name}", "", head, "|" + "---|" * 10]
    for r in rows:
        off, tlt = r["runs"]["off"], r["runs"]["tlt"]
        lines.append(
            f"| {r['accelerators']} | {off['rollout_s']:.2f} | {tlt['rollout_s']:.2f} | {r['rollout_speedup']:.2f}x "
            f"| {r['step_speedup']:.2f}x | {r['step_speedup_no_spot']:.2f}x | {100 * tlt['idle_fraction']:.1f} "
            f"| {100 * tlt['spot_used_fraction']:.1f} | {tlt['final_L_k4']:.2f} | {100 * r['rollout_share_off']:.0f} |")
    return "\n".join(lines)


def phases(rows: list[dict[str, Any]]) -> str:
    """Seconds per step (medians after warm-up) of every run, and how often each K ran."""
    lines = ["| A | run | rollout s | update s | step s | idle % | engine steps per K |", "|" + "---|" * 7]
    for r in rows:
        for mode in MODES:
            m = r["runs"][mode]
            share = ", ".join(f"K={k}: {100 * v:.0f} %" for k, v in m["k_share"].items())
            lines.append(f"| {r['accelerators']} | {mode} | {m['rollout_s']:.2f} | {m['update_s']:.2f} "
                         f"| {m['step_s']:.2f} | {100 * m['idle_fraction']:.1f} | {share} |")
    return "\n".join(lines)


def calibration_line(inp: Inputs, steps: int, warmup: int, seed: int) -> tuple[str, dict[str, Any]] | None:
    """Where the inputs name a measured run: the simulator at its accelerator count next to what was measured."""
    cal = inp.raw.get("calibration")
    if not cal:
        return None
    sim = project(inp, int(cal["accelerators"]), steps, warmup, seed)
    got = {"rollout_off_s": sim["runs"]["off"]["rollout_s"], "rollout_tlt_s": sim["runs"]["tlt"]["rollout_s"]}
    measured = cal["measured"]
    parts = [f"{k} {got[k]:.2f} vs {measured[k]:.2f}" for k in got if k in measured]
    return (f"calibration at A={cal['accelerators']} (simulated vs measured): " + ", ".join(parts),
            {"accelerators": cal["accelerators"], "simulated": got, "measured": measured})


# ----------------------------------------------------------------------------------------------------------------
# Deriving the CPU inputs from this repository's measurements


def fit_decode_step(decode: dict[str, Any]) -> tuple[float, float, float]:
    """Least squares (relative errors) of step_ms(b) = c0 + c1 * b over decode.py's plain cells.

    Each cell is one `generate` call per batch of b prompts (batch 1: sequential prompts), timed end to end, so its
    wall time is the sum over engine steps of step_ms(live batch), with the live batch shrinking as sequences end.
    Under the linear model that sum is c0 * engine_steps + c1 * tokens (every token is one sequence-step). Engine
    steps: the tokens at b = 1; at b > 1 the longest response's length, taken as max_new_tokens (the cap) per
    batch. Returns c0, c1 and the worst relative residual."""
    cap = decode["config"]["max_new_tokens"]
    eqs = []
    for cell in decode["cells"]:
        plain = next(r for r in cell["rows"] if r["method"] == "plain")
        b, tokens = cell["batch_size"], plain["tokens"]
        engine_steps = tokens if b == 1 else cap * math.ceil(cell["num_prompts"] / b)
        eqs.append((engine_steps, tokens, 1000.0 * tokens / plain["tok_s"]))
    s11 = sum((s / w) ** 2 for s, _, w in eqs)
    s12 = sum(s * t / w ** 2 for s, t, w in eqs)
    s22 = sum((t / w) ** 2 for _, t, w in eqs)
    r1 = sum(s / w for s, _, w in eqs)
    r2 = sum(t / w for _, t, w in eqs)
    det = s11 * s22 - s12 ** 2
    c0, c1 = (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det
    worst = max(abs((s * c0 + t * c1) / w - 1) for s, t, w in eqs)
    return c0, c1, worst


def derived_verify(decode: dict[str, Any], drafter_cost: float) -> dict[str, dict[str, float]]:
    """Width-(K+1) ratios per batch size from decode.py's end-to-end drafter cells: the measured speed-up over plain is
    L / (verify(K+1) + K * drafter_cost), so verify(K+1) = L / speed-up - K * drafter_cost; mean of the two prompt
    domains."""
    out: dict[str, dict[str, list[float]]] = {}
    for cell in decode["cells"]:
        b = cell["batch_size"]
        rows = {r["method"]: r for r in cell["rows"]}
        for k in decode["config"]["ks"]:
            r = rows[f"drafter k={k}"]
            speedup = r["tok_s"] / rows["plain"]["tok_s"]
            ratio = r["spec"]["mean_acceptance_length"] / speedup - k * drafter_cost
            out.setdefault(str(b), {}).setdefault(str(k + 1), []).append(ratio)
    return {b: {"1": 1.0, **{w: round(statistics.mean(v), 3) for w, v in t.items()}} for b, t in out.items()}


def fit_growth(points: list[tuple[float, float]], a_start: float) -> tuple[float, float]:
    """Grid least squares of a(t) = a_max - (a_max - a_start) * exp(-t / tau) through (minutes, a_1) points."""
    best = (math.inf, 0.0, 0.0)
    for a_max in (x / 200 for x in range(int(a_start * 200) + 1, 200)):
        for tau in (x / 2 for x in range(2, 600)):
            err = sum((a_max - (a_max - a_start) * math.exp(-t / tau) - a) ** 2 for t, a in points)
            best = min(best, (err, a_max, tau))
    return best[1], best[2]


def cpu_inputs(results: Path = RESULTS) -> dict[str, Any]:
    """benchmarks/sim_inputs/cpu-smollm2.json from the measured result files (and two figures from the docs)."""
    decode = json.loads((results / "decode-smollm2-fp32.json").read_text())
    verify = json.loads((results / "verify_cost-cpu.json").read_text())
    rl = json.loads((results / "rl_step-arith-smollm2.json").read_text())
    cfg = rl["config"]
    c0, c1, worst = fit_decode_step(decode)
    drafter_cost = 0.065
    v1 = next(r for r in verify["rows"] if r["mode"] == "none")["vs_width1"]
    derived = derived_verify(decode, drafter_cost)
    check = " / ".join(f"{derived['1'][w]:.2f}" for w in ("3", "5"))
    direct = " / ".join(f"{v1[w]:.2f}" for w in ("3", "5"))

    # Acceptance: the shipped drafter's held-out per-position rates, and its held-out L (K=5) during its 50-minute
    # one-thread training run (steps 100..495, ~10.1 min per 100 steps), turned into a_1 with the same profile.
    per_position = [0.55, 0.31, 0.18, 0.11, 0.07]
    profile = sum(per_position) / per_position[0]
    curve = [(0.0, 0.026), (10.1, 0.54 / profile), (20.2, 0.73 / profile), (30.3, 0.97 / profile),
             (40.4, 1.11 / profile), (50.5, 1.22 / profile)]
    a_max, tau = fit_growth(curve, 0.026)

    warm = rl["warmup"]
    post = [r for mode in ("tlt", "off") for r in rl["history"][mode] if r["step"] > warm]
    tlt_post = [r for r in rl["history"]["tlt"] if r["step"] > warm]
    s_per_token = rl["summary"]["tlt"]["update"] / statistics.median(r["rollout_tokens"] for r in tlt_post)
    median_len = statistics.median(r["response_len_p50"] for r in post)
    cap = cfg["max_new_tokens"]
    sigma = math.log(cap / median_len) / statistics.NormalDist().inv_cdf(0.9)
    workers = cfg["rollout_workers"]
    weight_bytes = next(r for r in verify["rows"] if r["mode"] == "none")["weight_bytes"]
    return {
        "name": "cpu-smollm2",
        "description": "SmolLM2-135M-Instruct, float32, one torch thread per rollout worker (an 'accelerator' here is "
                       "one single-threaded worker, as in rl_step.py), on this project's 2-core AVX2 machine. "
                       "Written by `python benchmarks/tlt_sim.py --write-cpu-inputs`.",
        "decode_step_ms": {
            "table": {str(b): round(c0 + c1 * b, 2) for b in (1, 4, 16)},
            "source": f"benchmarks/results/decode-smollm2-fp32.json plain cells (b = 1, 4, 16; both prompt domains): "
                      f"least-squares fit step_ms(b) = {c0:.1f} + {c1:.2f} * b of their end-to-end wall times "
                      f"(tokens / tok_s), worst residual {100 * worst:.0f} %. Not 1000 * b / tok_s: a batch's live "
                      f"size shrinks as its sequences end, so wall = c0 * engine_steps + c1 * tokens; engine steps "
                      f"= tokens at b = 1, the longest response = max_new_tokens ({decode['config']['max_new_tokens']})"
                      f" per batch at b > 1 (assumed: not recorded). Prefill is folded into the fit. Linear "
                      f"extrapolation past b = 16.",
        },
        "verify_vs_width": {
            "by_batch": {"1": {w: float(r) for w, r in v1.items()}, "4": derived["4"], "16": derived["16"]},
            "source": f"b = 1: benchmarks/results/verify_cost-cpu.json rows[mode=none].vs_width1 (width-w forward at "
                      f"batch 1, prefix 256, measured directly). b = 4, 16: derived from decode-smollm2-fp32.json's "
                      f"drafter K=2 / K=4 cells as L / speed-up - K * drafter_cost (widths 3 and 5; mean of the two "
                      f"prompt domains); the same derivation at b = 1 gives {check} against the directly measured "
                      f"{direct}, so it may read a little low. Interpolated in w between measured widths, linearly "
                      f"in b between buckets, the b = 16 bucket beyond it.",
        },
        "acceptance": {
            "kind": "cumulative",
            "per_position": per_position,
            "source": "docs/results.md (Decoding): the shipped SmolLM2 drafter's held-out per-position acceptance "
                      "0.55 / 0.31 / 0.18 / 0.11 / 0.07, cumulative (the engine's per_position_acceptance: fraction "
                      "of drafts whose position i was accepted; L(K) = 1 + sum of the first K). In-domain chat "
                      "prompts, not the RL task: on arithmetic at T = 1 the same drafter measured 0.43 / 0.18 / 0.01.",
            "growth": {
                "a0": per_position[0], "a_max": a_max, "tau_min": tau,
                "assumption": f"a_1(t) = a_max - (a_max - a0) exp(-t / tau) with a0 = {per_position[0]} at the start "
                              f"of RL; a_max = {a_max} and tau = {tau} one-thread minutes fitted to the drafter's "
                              f"held-out L during its 50-minute training run (docs/results.md: L 1.54 / 1.73 / 1.97 / "
                              f"2.11 / 2.22 at 100..495 steps) with the same position profile; that run saw a fixed "
                              f"100k-token data set, so spot training on fresh on-policy data may saturate higher.",
            },
        },
        "drafter_cost": {
            "value": drafter_cost,
            "source": "docs/performance.md / docs/results.md: 3.7 ms per drafter step (one decoder layer, 8,192-row "
                      "draft head) vs a 57 ms target step at batch 1 = 0.065; assumed to scale with the target step "
                      "at every batch size. By weight bytes: one layer (3.5M) + EAGLE input fc (0.7M) + 8,192-row head "
                      "(4.7M) = 8.9M of the target's 134.5M parameters = 0.066, consistent.",
        },
        "arms": {"value": cfg["controller_arms"],
                 "source": "benchmarks/results/rl_step-arith-smollm2.json config.controller_arms"},
        "update": {
            "s_per_token": round(s_per_token, 5),
            "source": f"benchmarks/results/rl_step-arith-smollm2.json: summary.tlt.update "
                      f"({rl['summary']['tlt']['update']:.1f} s, median of the steps after warm-up) / median "
                      f"rollout_tokens of those steps; float32 forward + backward of 135M parameters on one thread. "
                      f"Data parallel over A workers: tokens * s_per_token / A + all-reduce.",
            "allreduce": {
                "grad_bytes": weight_bytes, "node_size": 2, "intra_GBps": 5.0, "inter_GBps": 1.25,
                "assumption": "float32 gradients (the 538 MB of weights); 2 single-thread workers per 2-core machine; "
                              "5 GB/s between workers of one machine (shared memory), 1.25 GB/s between machines "
                              "(10 GbE). New weights reach the rollout engines with the all-reduce (replicated "
                              "data parallel: no extra sync).",
            },
        },
        "lengths": {
            "lognormal": {"median": median_len, "sigma": round(sigma, 3), "max_new_tokens": cap},
            "source": f"benchmarks/results/rl_step-arith-smollm2.json: median of the per-step response_len_p50 "
                      f"after warm-up (both runs) = {median_len}; every step's p90 sat at the cap ({cap}), so sigma "
                      f"is set for p90 = cap (a lower bound: the tail is censored).",
        },
        "batch": {
            "prompts_per_accelerator": cfg["prompts_per_step"] // workers, "group_size": cfg["group_size"],
            "max_batch_per_accelerator": 16, "scaling": "weak",
            "assumption": f"weak scaling: the measured run's {cfg['prompts_per_step']} prompts x {cfg['group_size']} "
                          f"samples on {workers} workers, per {workers} workers at every A; at most 16 live "
                          f"sequences per worker (the largest measured decode batch).",
        },
        "spot": {
            "efficiency": 1.0, "startup_s": 1.0,
            "assumption": "an idle worker-second trains the drafter for one one-thread second (the growth curve is in "
                          "one-thread minutes), less 1 s per idle window to start (load drafter and optimizer, fetch "
                          "hidden states). Each worker is assumed to have its own core: on one 2-core machine the "
                          "spot trainer measurably slows the worker still decoding (~18 %, docs/results.md); that "
                          "is not modelled.",
        },
        "calibration": {
            "accelerators": workers,
            "measured": {"rollout_off_s": rl["summary"]["off"]["rollout"],
                         "rollout_tlt_s": rl["summary"]["tlt"]["rollout"]},
            "source": "benchmarks/results/rl_step-arith-smollm2.json summary, rollout medians only (its learner is "
                      "one process, not data parallel, so its update is not comparable). The 2 workers there are "
                      "threads of one process on 2 cores: contention the decode benchmark did not have, plus the "
                      "bandit's exploration, spot training on the shared cores and a lower live acceptance on "
                      "arithmetic (L 1.68) in its TLT run.",
        },
    }


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--costs", type=Path, nargs="+", default=list(DEFAULT_COSTS),
                    help="inputs file(s); default: sim_inputs/cpu-smollm2.json and sim_inputs/gpu-assumed.json")
    ap.add_argument("--lengths", type=Path, default=None,
                    help="JSON list of response lengths, or an rl_step.py result with history[*].response_lengths")
    ap.add_argument("--accelerators", default="1,8,64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "tlt_sim.json")
    ap.add_argument("--write-cpu-inputs", action="store_true",
                    help="re-derive sim_inputs/cpu-smollm2.json from benchmarks/results/ and exit")
    args = ap.parse_args()
    if args.write_cpu_inputs:
        INPUTS.mkdir(exist_ok=True)
        (INPUTS / "cpu-smollm2.json").write_text(json.dumps(cpu_inputs(), indent=2) + "\n")
        print(f"wrote {shown(INPUTS / 'cpu-smollm2.json')}")
        return

    accelerators = [int(x) for x in args.accelerators.split(",")]
    lengths = lengths_file(args.lengths) if args.lengths else None
    config = {k: [shown(p) for p in v] if k == "costs" else shown(v) if isinstance(v, Path) else v
              for k, v in vars(args).items() if k != "write_cpu_inputs"}
    report: dict[str, Any] = {"config": config,
                              "model_assumptions": list(MODEL_ASSUMPTIONS), "inputs": {}}
    for path in args.costs:
        inp = load_inputs(path, lengths)
        rows = [project(inp, a, args.steps, args.warmup, args.seed) for a in accelerators]
        cal = calibration_line(inp, args.steps, args.warmup, args.seed)
        print(table(f"{inp.name} ({shown(path)})", rows), end="\n\n")
        print(phases(rows), end="\n\n")
        if cal:
            print(cal[0], end="\n\n")
        report["inputs"][inp.name] = {
            "file": shown(path), "inputs": inp.raw, "lengths_override": asdict(lengths) if lengths else None,
            "assumptions": list(assumptions(inp.raw)), "results": rows, "calibration": cal[1] if cal else None}
    print(PAPER, end="\n\n")
    for name, entry in report["inputs"].items():
        print(f"Assumptions, {name}:")
        for line in entry["assumptions"]:
            print(f"  - {line}")
    print("Simulator assumptions:")
    for line in MODEL_ASSUMPTIONS:
        print(f"  - {line}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwrote {shown(args.out)}")


if __name__ == "__main__":
    main()
