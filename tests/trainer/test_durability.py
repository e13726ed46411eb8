"""Trainer durability: plain-data checkpoints (weights_only), fsynced renames, torn metrics lines, the drafter buffer
and the controller in the checkpoint, and publishes that are neither lost nor duplicated across crashes.

The end-to-end test SIGKILLs `understudy train` at named crash points (UNDERSTUDY_CRASH_AT, crashpoints.py) and
resumes it each time."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.trainer.rl_setup import cfg_for, write_toml
from understudy.drafter.train import Sample
from understudy.engine.bandit import AdaptiveController, BanditConfig
from understudy.registry.store import Registry
from understudy.trainer import checkpoint as ckpt_mod
from understudy.trainer import crashpoints
from understudy.trainer.checkpoint import (
    CheckpointError,
    check_plain,
    load_checkpoint,
    random_state_from_plain,
    random_state_to_plain,
    save_checkpoint,
)
from understudy.trainer.grpo import GRPOTrainer
from understudy.trainer.lineage import parse_note, publish_note, reconcile, run_versions
from understudy.trainer.metrics_log import MetricsLog, read_metrics
from understudy.trainer.spot import pack_samples, unpack_samples

RUN = "0123456789abcdef0123456789abcdef"


# ---- checkpoints --------------------------------------------------------------------------------------------
def test_check_plain_names_the_key_that_weights_only_would_refuse():
    @dataclass
    class Thing:
        x: int = 1

    check_plain({"a": [1, 2.0, "s", None, True, (3, 4)], "t": torch.zeros(2), "n": {"k": {1: "v"}}})
    with pytest.raises(CheckpointError, match=r"state\['spot'\]\['cfg'\] is a Thing"):
        check_plain({"spot": {"cfg": Thing()}})
    with pytest.raises(CheckpointError, match=r"state\['rng'\]\[1\] is a Random"):
        check_plain({"rng": [0, random.Random(0)]})


def test_random_state_round_trips_through_plain_lists():
    rng = random.Random(7)
    rng.gauss(0, 1)  # a pending gauss_next is part of the state
    plain = random_state_to_plain(rng.getstate())
    assert isinstance(plain, list) and isinstance(plain[1], list)
    other = random.Random(0)
    other.setstate(random_state_from_plain(plain))
    assert [other.random() for _ in range(5)] == [rng.random() for _ in range(5)]


def test_save_checkpoint_is_weights_only_and_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):  # type: ignore[no-untyped-def]
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):  # type: ignore[no-untyped-def]
        events.append(("replace", str(b)))
        real_replace(a, b)

    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, {"step": 3, "w": torch.arange(4), "rng": random_state_to_plain(random.Random(1).getstate())})
    assert events == [("fsync", str(tmp_path / "run" / ".checkpoint.pt.tmp")), ("replace", str(path)),
                      ("fsync", str(tmp_path / "run"))]
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], torch.arange(4)) and loaded["format"] == 2
    with pytest.raises(CheckpointError, match="Random"):
        save_checkpoint(path, {"rng": random.Random(0)})
    assert load_checkpoint(path)["step"] == 3  # a refused save leaves the previous checkpoint


def test_load_checkpoint_refuses_pickled_objects_and_truncated_files(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"rng": random.Random(0)}, path)  # what weights_only=False used to accept
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)
    save_checkpoint(path, {"step": 1})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is unreadable"):
        load_checkpoint(path)
    assert load_checkpoint(tmp_path / "missing.pt") is None


def test_samples_pack_into_four_tensors_and_back():
    samples = [Sample(torch.tensor([1, 2, 3]), torch.arange(6.0).view(3, 2), 1),
               Sample(torch.tensor([4, 5]), torch.ones(2, 2), 2)]
    packed = pack_samples(samples)
    assert packed["lengths"].tolist() == [3, 2] and packed["features"].shape == (5, 2)
    back = unpack_samples(packed)
    for a, b in zip(samples, back, strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.features, b.features)
        assert a.prompt_len == b.prompt_len
    assert unpack_samples(pack_samples([])) == []


def test_controller_state_round_trips_and_continues_identically():
    a = AdaptiveController(BanditConfig(arms=(0, 2, 4), seed=3, min_samples=2))
    for i in range(40):
        k = a.choose(8 if i % 3 else 1)
        a.observe(8 if i % 3 else 1, k, num_tokens=10 + (k * 7 + i) % 13, seconds=1.0)
    sd = a.state_dict()
    json.dumps(sd)  # plain types only
    b = AdaptiveController(BanditConfig(arms=(0, 2, 4), seed=99, min_samples=2))
    b.load_state_dict(sd)
    assert b.state_dict() == sd and b.state() == a.state()
    for i in range(60):  # same choices from here on: same rewards, same RNG
        ka, kb = a.choose(8), b.choose(8)
        assert ka == kb, i
        a.observe(8, ka, 10 + i % 5, 1.0)
        b.observe(8, kb, 10 + i % 5, 1.0)
    with pytest.raises(ValueError, match="arms"):
        AdaptiveController(BanditConfig(arms=(0, 4))).load_state_dict(sd)


# ---- metrics.jsonl ------------------------------------------------------------------------------------------
def test_a_torn_metrics_line_is_skipped_with_a_warning_and_never_glued_to(tmp_path, caplog):
    log = MetricsLog(tmp_path)
    log.write({"step": 0, "a": 1})
    log.write({"step": 1, "a": 2})
    with open(log.path, "a") as fh:
        fh.write('{"step": 2, "a"')  # a crash mid-write
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(log.path)] == [0, 1]
    assert "metrics.jsonl:3 is not a JSON object" in caplog.text
    log.write({"step": 2, "a": 3})  # a run that appends without --resume: on a fresh line
    assert [r["step"] for r in read_metrics(log.path)] == [0, 1, 2]
    assert log.path.read_text().splitlines()[-1] == '{"step": 2, "a": 3}'
    log.truncate_after(1)  # --resume from step 1: the torn line and later steps are gone
    assert log.path.read_text() == '{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n'
    log.close()


# ---- lineage ----------------------------------------------------------------------------------------------------
def test_run_versions_and_reconcile_by_hand():
    assert parse_note(publish_note(RUN, 12)) == (RUN, 12)
    assert parse_note("killed") is None and parse_note(None) is None
    assert parse_note(f"understudy train run {RUN} step 3 extra") is None
    other = "f" * 32
    manifests = [(3, {"note": publish_note(RUN, 1)}), (4, {"note": publish_note(other, 1)}),
                 (5, {"note": "by hand"}), (6, {"note": publish_note(RUN, 2)}), (8, {"note": publish_note(RUN, 4)}),
                 (7, {"note": publish_note(RUN, 3)}), (9, {"note": publish_note(RUN, 3)})]
    assert run_versions(manifests, RUN) == {1: 3, 2: 6, 3: 7, 4: 8}  # 9 repeats step 3: the first is kept
    r = reconcile({1: 3, 2: 6, 3: 7, 4: 8}, step=2, last_published=6)
    assert r.last_published == 6 and r.ahead == {3: 7, 4: 8}
    r = reconcile({1: 3}, step=0, last_published=None)  # killed before the first checkpoint
    assert r.last_published is None and r.ahead == {1: 3}
    assert reconcile({}, step=5, last_published=2).last_published == 2  # versions gc'ed: keep the checkpoint's
    assert reconcile({1: 3, 2: 6}, step=2, last_published=3).last_published == 6  # the registry wins


def test_crash_point_spec_is_checked(monkeypatch):
    monkeypatch.setenv(crashpoints.ENV, "publish_after@3,metrics_write")
    assert crashpoints.armed("publish_after", 3) and not crashpoints.armed("publish_after", 2)
    assert crashpoints.armed("metrics_write", 7) and not crashpoints.armed("checkpoint_after", 3)
    monkeypatch.setenv(crashpoints.ENV, "publsh_after@3")
    with pytest.raises(crashpoints.CrashPointError, match="publsh_after"):
        crashpoints.armed("publish_after", 3)
    monkeypatch.delenv(crashpoints.ENV)
    assert not crashpoints.armed("publish_after", 3)


# ---- the trainer -----------------------------------------------------------------------------------------------
def test_checkpoint_holds_the_drafter_buffer_and_the_controller(rl_assets, tmp_path):
    cfg = cfg_for(rl_assets, tmp_path, steps=2)
    a = GRPOTrainer(cfg, progress=False)
    a.train_step()
    a.save()
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)  # plain data only
    assert ck["spot"]["buffer"]["lengths"].numel() == len(a.spot.buffer) > 0 and ck["controller"]["buckets"]
    b = GRPOTrainer(cfg, progress=False)
    assert b.resume() and b.step == 1
    assert len(b.spot.buffer) == len(a.spot.buffer) and len(b.spot.heldout) == len(a.spot.heldout) > 0
    for x, y in zip([*a.spot.buffer, *a.spot.heldout], [*b.spot.buffer, *b.spot.heldout], strict=True):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.features, y.features)
        assert x.prompt_len == y.prompt_len
    assert b.controller.state_dict() == a.controller.state_dict()
    assert b.rng.getstate() == a.rng.getstate() and b.run_id == a.run_id
    assert b.spot.trainer.step == a.spot.trainer.step


def test_a_step_published_before_a_crash_is_reused_not_published_again(rl_assets, tmp_path):
    cfg = cfg_for(rl_assets, tmp_path, steps=3, publish_every=1)
    reg = Registry.open(tmp_path / "reg")
    a = GRPOTrainer(cfg, progress=False)
    a.train_step()
    v1 = a.publish()["drafter_version"]
    a.save()
    a.train_step()
    v2 = a.publish()["drafter_version"]  # ... and the process dies before the checkpoint of step 2
    b = GRPOTrainer(cfg, progress=False)
    assert b.resume() and b.step == 1 and b.last_published == v1 and b.published_ahead == {2: v2}
    b.train_step()
    again = b.publish()
    assert again["drafter_version"] == v2 and again["reused"] and b.last_published == v2
    b.train_step()
    v3 = b.publish()["drafter_version"]
    versions = [v for v in reg.list_versions() if v.kind == "drafter"]
    assert [v.version for v in versions] == [v1, v2, v3]
    assert [v.manifest["policy_version"] for v in versions] == [1, 2, 3]
    policies = [v for v in reg.list_versions() if v.kind == "policy"]  # the step-2 policy was reused too
    assert [v.version for v in policies] == [v.policy for v in versions]
    assert [v.manifest["policy_version"] for v in policies] == [1, 2, 3]
    assert [v.manifest["parent"] for v in versions] == [None, v1, v2]
    assert {parse_note(v.manifest["note"]) for v in versions} == {(a.run_id, 1), (a.run_id, 2), (a.run_id, 3)}


def test_a_run_killed_before_its_first_checkpoint_keeps_its_identity(rl_assets, tmp_path):
    cfg = cfg_for(rl_assets, tmp_path, steps=2, publish_every=1)
    a = GRPOTrainer(cfg, progress=False)
    a.log.write({"step": 0})
    a.train_step()
    v1 = a.publish()["drafter_version"]  # no checkpoint yet
    a.log.write({"step": 1})
    b = GRPOTrainer(cfg, progress=False)
    assert not b.resume() and b.step == 0 and b.run_id == a.run_id and b.published_ahead == {1: v1}
    assert read_metrics(b.log.path) == []  # it restarts from step 0: so does its log


# ---- end to end: SIGKILL at each crash point, then --resume -------------------------------------------------
def _train(config: Path, crash: str | None, resume: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != crashpoints.ENV}
    if crash:
        env[crashpoints.ENV] = crash
    cmd = [sys.executable, "-m", "understudy.cli.main", "train", "--config", str(config), *(["--resume"] * resume)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_sigkilled_training_resumes_with_each_step_published_exactly_once(rl_assets, tmp_path):
    """Six attempts of one run; each of the first five SIGKILLs itself at a named point: after the publish of
    step 1 (before any checkpoint), mid-way through step 2's metrics line, between step 3's policy and drafter
    publishes, between step 3's checkpoint write and its rename, and just before step 4's drafter publish. The
    sixth finishes."""
    cfg = cfg_for(rl_assets, tmp_path, steps=4, publish_every=1, checkpoint_every=1)
    config = write_toml(cfg, tmp_path / "cfg.toml")
    crashes = ["publish_after@1", "metrics_write@2", "publish_policy_after@3", "checkpoint_before_rename@3",
               "publish_before@4"]
    for i, crash in enumerate(crashes):
        r = _train(config, crash, resume=i > 0)
        assert r.returncode == -9, (crash, r.returncode, r.stderr[-1500:])  # killed at the point, not failed
    r = _train(config, None, resume=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    everything = Registry.open(tmp_path / "reg", create=False).list_versions()
    versions = [v for v in everything if v.kind == "drafter"]
    policies = {v.version: v for v in everything if v.kind == "policy"}
    assert [v.manifest["policy_version"] for v in versions] == [1, 2, 3, 4]  # each step once, none lost
    assert sorted(v.manifest["policy_version"] for v in policies.values()) == [1, 2, 3, 4]  # policies too
    assert [policies[v.policy].manifest["policy_version"] for v in versions] == [1, 2, 3, 4]  # paired by step
    assert [v.manifest["parent"] for v in versions] == [None, *[v.version for v in versions[:-1]]]
    run_ids = {parse_note(v.manifest["note"])[0] for v in versions}
    assert len(run_ids) == 1 and json.loads((tmp_path / "run" / "run.json").read_text())["run_id"] in run_ids
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3, 4]  # every line whole, each step once
    assert [json.loads(x)["published"]["drafter_version"] for x in lines[1:]] == [v.version for v in versions]
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4 and ck["last_published"] == versions[-1].version
