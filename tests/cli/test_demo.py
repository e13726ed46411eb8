"""`understudy demo grid-risk` for real on a tiny model: a server following `latest`, Locust, SFT, GRPO + TLT
publishing pairs, speculation on vs off, drafter evaluations, the report; and no child process left behind,
after a complete run and after Ctrl-C. Nothing here asserts a time or a speed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import build_tiny_hf, train_tiny_drafter
from understudy.cli.demo import (
    GRPO_EVAL_OFFSET,
    PROFILES,
    SFT_SEED_OFFSET,
    Plan,
    _spread,
    check_requirements,
    make_prompt_files,
)
from understudy.cli.demo_procs import leftover_processes
from understudy.cli.demo_report import SECTIONS
from understudy.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory):
    """A tiny Llama (positions for GRPO's 512-token prompt window + 128 new tokens) and a generic drafter for it."""
    from understudy.drafter.model import save_drafter
    from understudy.engine.loader import load_model
    from understudy.engine.text import encode_prompt

    root = tmp_path_factory.mktemp("demo-assets")
    model = build_tiny_hf(root / "model", "llama", max_position_embeddings=1024)
    lm = load_model(str(model), dtype="float32")
    words = ["grid", "line", "flow", "risk", "load", "trip"]
    prompts = [encode_prompt(lm.tokenizer, " ".join(words[(i + j) % 6] for j in range(1 + i % 4))) for i in range(16)]
    save_drafter(train_tiny_drafter(lm, prompts, steps=30), root / "drafter")
    return model, root / "drafter"


def start_demo(out: Path, assets: tuple[Path, Path], minutes: float) -> subprocess.Popen:
    model, drafter = assets
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNDERSTUDY_")}
    # the run's drafter data (its cache key is the tiny model's, new every run) stays out of the user's cache
    env["UNDERSTUDY_CACHE"] = str(out.parent / "understudy-cache")
    return subprocess.Popen(
        [sys.executable, "-m", "understudy.cli.main", "demo", "grid-risk", "--model", str(model), "--generic-drafter",
         str(drafter), "--minutes", str(minutes), "--out", str(out), "--users", "2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_demo_runs_the_whole_loop_and_reports_it(demo_assets, tmp_path):
    out = tmp_path / "run"
    proc = start_demo(out, demo_assets, minutes=1)
    output, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, output[-5000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "ok" and s["budget_minutes"] == 1
    assert s["machine"]["cores"] and s["machine"]["cpu_model"]

    md = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in md, section
    for name in ("accuracy", "acceptance", "latency", "spec_onoff"):
        assert f"](plots/{name}.png)" in md and (out / "plots" / f"{name}.png").stat().st_size > 5_000
    assert all(v is not None for v in s["headline"].values()), s["headline"]
    h = s["headline"]  # the skill beyond the constant answer, from `understudy sft`'s own evaluation
    assert 0 < h["problems_where_constant_fails"] <= s["accuracy"]["problems"]
    assert h["accuracy_where_constant_fails_sft"] == s["sft"]["accuracy_where_constant_fails"]
    assert f"{h['problems_where_constant_fails']} of those problems that the constant answer gets wrong" in md

    # the generic drafter was given (not trained here): SFT gets its share of the budget too
    from understudy.cli.demo import SHARES

    sft = next(p for p in s["phases"] if p["name"].startswith("SFT"))
    assert sft["planned_s"] == pytest.approx(max(SHARES["sft"] * 60, SHARES["sft_end"] * 60 - sft["start_s"]),
                                             abs=1.0), s["phases"]

    # one held-out problem set, measured before SFT, after it, and at every GRPO step
    stages = [c["stage"] for c in s["accuracy"]["curve"]]
    assert stages[:2] == ["base", "SFT"] and stages.count("GRPO") >= 2  # step 0 (the SFT policy) and step 1..
    assert s["accuracy"]["before"] == s["sft"]["initial_accuracy"]

    # the SFT pair and every GRPO pair were published; the server swapped under load and no request failed
    published = s["grpo"]["published"]
    assert published and all(p["drafter_version"] and p["policy_version"] for p in published)
    swaps = s["serving"]["swaps"]
    assert sum(x["result"] == "success" for x in swaps) >= 2, swaps
    assert {x["to_policy"] for x in swaps if x["result"] == "success"} - {"base"}, swaps
    assert s["serving"]["requests"] >= 1 and s["serving"]["failed"] == 0, s["serving"]["outcomes"]
    assert s["failed_requests"] == {"run": 0, "spec_on": 0, "spec_off": 0}
    assert s["speculation"]["on_stats"]["ok"] >= 1 and s["speculation"]["off_stats"]["ok"] >= 1
    assert s["headline"]["tpot_p50_ms_spec_on"] > 0 and s["headline"]["tpot_p50_ms_spec_off"] > 0

    # the co-trained drafter beside the generic one, on the same (final) policy
    evaluated = {e["role"]: e for e in s["drafters"]["evaluated"]}
    assert {"final co-trained", "final generic"} <= set(evaluated)
    assert evaluated["final co-trained"]["target"] == evaluated["final generic"]["target"]
    assert all(e["acceptance_length"] >= 1.0 for e in evaluated.values())

    # the served prompts are held out: none is a problem the run trained on
    from understudy.trainer.tasks import get_task

    task, served = get_task("grid-risk"), {json.loads(x)["prompt"] for x in (out / "prompts" / "heldout.jsonl").open()}
    sft_rng, grpo_rng = random.Random(s["seed"] + SFT_SEED_OFFSET), random.Random(s["seed"])
    used = {task.sample(sft_rng).prompt for _ in range(20 * s["sft"]["steps"] * s["profile"]["sft_batch"])}
    used |= {task.sample(grpo_rng).prompt for _ in range(20 * s["grpo"]["steps"] * s["profile"]["grpo_prompts"])}
    assert served and not served & used

    assert s["children_left"] == 0 and leftover_processes(str(out)) == []
    assert all(c["returncode"] is not None for c in s["children"])


@pytest.mark.slow
def test_ctrl_c_stops_every_child(demo_assets, tmp_path):
    out = tmp_path / "run"
    proc = start_demo(out, demo_assets, minutes=5)
    progress = out / "progress.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:  # the server, Locust and SFT are running
        if progress.exists() and '"phase": "SFT' in progress.read_text():
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    # server, Locust and sft (and their own children) all running: counted, not timed (a busy machine can take
    # seconds to spawn a child)
    deadline = time.monotonic() + 300
    while len(leftover_processes(str(out))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert len(leftover_processes(str(out))) >= 3 and proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output[-3000:]
    assert leftover_processes(str(out)) == []
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["children_left"] == 0


# ---- fast checks ------------------------------------------------------------------------------------------------
def test_held_out_prompts_are_checked_against_the_training_streams(tmp_path):
    plan = Plan("tiny", tmp_path, 1.0, 2, 3, PROFILES["tiny"], 8, None)
    info = make_prompt_files(plan, tmp_path / "prompts")
    rows = [json.loads(x) for x in (tmp_path / "prompts" / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == info["count"] == PROFILES["tiny"].heldout_prompts
    assert {r["split"] for r in rows} == {"heldout"} and len({r["prompt"] for r in rows}) == len(rows)
    from understudy.trainer.tasks import get_task

    task = get_task("grid-risk")
    accuracy_rng = random.Random(3 + GRPO_EVAL_OFFSET)
    accuracy = {task.sample(accuracy_rng).prompt for _ in range(8)}
    assert not accuracy & {r["prompt"] for r in rows}
    adapt = [json.loads(x) for x in (tmp_path / "prompts" / "adapt.jsonl").read_text().splitlines()]
    assert {r["split"] for r in adapt} == {"train", "heldout"}


def test_sft_gets_the_generic_drafters_share_when_none_is_trained_in_the_run(tmp_path):
    from understudy.cli.demo import PROFILES, SHARES, Plan

    plan = Plan(model="smollm2-135m", out=tmp_path, minutes=40, users=2, seed=0, profile=PROFILES["full"],
                eval_problems=32, generic_drafter=None)
    # reused generic drafter: SFT starts a minute in and runs until sft_end (0.37 of 40 minutes)
    assert plan.sft_seconds(60.0) == pytest.approx(SHARES["sft_end"] * 2400 - 60.0)
    assert plan.sft_seconds(60.0) == pytest.approx(plan.share_s("sft") + plan.share_s("generic_drafter") - 60.0)
    # trained here (and overran its share): SFT keeps its own share, the phases after it move
    assert plan.sft_seconds(SHARES["generic_drafter"] * 2400 + 300.0) == pytest.approx(SHARES["sft"] * 2400)


def test_spread_covers_the_range_early():
    assert _spread([]) == [] and _spread([1]) == [1]
    order = _spread(list(range(7)))
    assert sorted(order) == list(range(7)) and order[:3] == [3, 1, 5]


def test_refuses_a_used_out_folder_and_bad_numbers(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        check_requirements(tmp_path, 10, 2)
    with pytest.raises(UserError, match="--minutes"):
        check_requirements(tmp_path / "new", 0, 2)
    with pytest.raises(UserError, match="--users"):
        check_requirements(tmp_path / "new", 10, 0)
