"""Target + drafter pairs in the registry (issue 13): policy versions, drafters naming their policy, aliases that
name both halves, drift refused unless allowed, rollback of both halves, gc that keeps what a pair needs, the
watcher reporting a move of either half, and registries written before pairs existed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from understudy.engine.loader import save_model
from understudy.engine.model import Transformer
from understudy.registry.store import Event, Registry, RegistryError
from understudy.registry.watch import RegistryWatcher

from .conftest import tiny_config

SHAPE = tiny_config().family_shape()


@pytest.fixture(scope="module")
def policy_dirs(tmp_path_factory) -> list[Path]:
    """Two policies of family fam-x (different weights), as the trainer saves them."""
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        folder = tmp_path_factory.mktemp("policies") / f"policy-{seed}"
        save_model(Transformer(tiny_config()), None, folder)
        out.append(folder)
    return out


def publish_policy(reg: Registry, folder: Path, family: str = "fam-x") -> int:
    return reg.publish_policy(folder, family_fingerprint=family, target=SHAPE).version


def test_a_policy_is_a_version_that_moves_no_alias(reg, policy_dirs):
    p = reg.publish_policy(policy_dirs[0], family_fingerprint="fam-x", target=SHAPE, note="step 4")
    assert p.kind == "policy" and p.policy is None and reg.aliases() == {}
    assert sorted(p.manifest["files"]) == ["config.json", "model.safetensors"]
    assert reg.verify(p.version) == []
    assert reg.checkout_policy(p.version, "fam-x") == p.path
    with pytest.raises(RegistryError, match="is a policy, not a drafter"):
        reg.checkout(p.version, "fam-x")


def test_a_drafter_names_its_policy_and_latest_names_the_pair(reg, policy_dirs, drafter_dir):
    p = publish_policy(reg, policy_dirs[0])
    d = reg.publish(drafter_dir, policy=p).version
    assert reg.info(d).policy == p
    assert reg.resolve_pair("latest") == (d, p) == reg.resolve_pair(d)
    doc = json.loads((reg.root / "aliases" / "latest.json").read_text())
    assert (doc["version"], doc["policy"], doc["history"][-1]["policy"]) == (d, p, p)
    base = reg.publish(drafter_dir).version  # no policy: the base model
    assert reg.resolve_pair("latest") == (base, None)


def test_a_drafter_cannot_name_a_policy_that_is_missing_a_drafter_or_of_another_family(reg, policy_dirs, drafter_dir):
    other = publish_policy(reg, policy_dirs[1], family="fam-y")
    d = reg.publish(drafter_dir).version
    before = reg.version_numbers()
    with pytest.raises(RegistryError, match="names policy version 99, which is not usable"):
        reg.publish(drafter_dir, policy=99)
    with pytest.raises(RegistryError, match="but that is a drafter"):
        reg.publish(drafter_dir, policy=d)
    with pytest.raises(RegistryError, match=r"its policy version .* of fam-y"):
        reg.publish(drafter_dir, policy=other)
    with pytest.raises(RegistryError, match="policy must be a policy version number"):
        reg.publish(drafter_dir, policy=0)
    assert reg.version_numbers() == before  # nothing published by a refused call


def test_drift_is_refused_unless_allowed_and_rollback_restores_both_halves(reg, policy_dirs, drafter_dir):
    p1, p2 = publish_policy(reg, policy_dirs[0]), publish_policy(reg, policy_dirs[1])
    d1 = reg.publish(drafter_dir, policy=p1).version
    d2 = reg.publish(drafter_dir, policy=p2).version
    reg.promote(d2, "serving")
    assert reg.resolve_pair("serving") == (d2, p2)
    with pytest.raises(RegistryError, match=rf"trained against policy version {p2}, not policy version {p1}.*"
                                            "--allow-drift"):
        reg.promote(d2, "serving", policy=p1)
    with pytest.raises(RegistryError, match="not the base model"):
        reg.promote(d2, "serving", policy=None)
    with pytest.raises(RegistryError, match="an alias names a pair by its drafter"):
        reg.promote(p1, "serving")
    assert reg.resolve_pair("serving") == (d2, p2)  # refused promotes changed nothing
    reg.promote(d2, "serving", policy=p1, allow_drift=True)
    assert reg.resolve_pair("serving") == (d2, p1)
    assert reg.rollback("serving") == d2 and reg.resolve_pair("serving") == (d2, p2)
    reg.promote(d1, "serving")
    assert reg.resolve_pair("serving") == (d1, p1)
    reg.rollback("serving")
    assert reg.resolve_pair("serving") == (d2, p2)
    reg.promote("latest", "canary")  # promoting an alias copies its pair
    assert reg.resolve_pair("canary") == (d2, p2)


def test_a_corrupted_policy_is_never_paired_or_served(reg, policy_dirs, drafter_dir):
    p = publish_policy(reg, policy_dirs[0])
    d = reg.publish(drafter_dir, policy=p).version
    weights = reg.version_path(p) / "model.safetensors"
    os.chmod(weights, stat.S_IRUSR | stat.S_IWUSR)
    with open(weights, "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(RegistryError, match=f"version {p} .* failed verification"):
        reg.checkout_policy(p, "fam-x")
    with pytest.raises(RegistryError, match="failed verification"):
        reg.promote(d, "serving")
    assert "serving" not in reg.aliases()
    with pytest.raises(RegistryError, match=r"does not match|fam-x"):
        reg.checkout_policy(p, "fam-other")


def test_gc_keeps_the_policy_of_every_kept_drafter_and_aliased_pair(reg, policy_dirs, drafter_dir):
    p1 = publish_policy(reg, policy_dirs[0])
    d1 = reg.publish(drafter_dir, policy=p1, keep_last=None).version
    reg.promote(d1, "serving")
    for _ in range(4):
        reg.publish(drafter_dir, keep_last=2, history_window=0)
    left = reg.version_numbers()
    assert d1 in left and p1 in left and len(left) == 4  # the pair serving names, plus the newest two
    reg.promote(left[-1], "serving")
    reg.gc(keep_last=2, history_window=0)
    assert {d1, p1} <= set(reg.version_numbers())  # still serving's rollback target
    reg.promote(left[-2], "serving")
    reg.gc(keep_last=2, history_window=0)
    assert p1 not in reg.version_numbers() and d1 not in reg.version_numbers()
    # a kept drafter keeps its policy even when no alias names it
    p2 = publish_policy(reg, policy_dirs[1])
    d2 = reg.publish(drafter_dir, policy=p2, keep_last=1, history_window=0).version
    assert {d2, p2} <= set(reg.version_numbers())


def test_the_watcher_reports_a_move_of_either_half(reg, policy_dirs, drafter_dir):
    p1, p2 = publish_policy(reg, policy_dirs[0]), publish_policy(reg, policy_dirs[1])
    d = reg.publish(drafter_dir, policy=p2).version
    reg.promote(d, "serving")
    w = RegistryWatcher(reg)
    reg.promote(d, "serving", policy=p1, allow_drift=True)
    assert w.poll() == [Event("alias", d, "serving", d, policy=p1)]
    assert w.poll() == []


def test_a_registry_written_before_pairs_reads_as_pairs_with_the_base_model(reg, policy_dirs, drafter_dir):
    p = publish_policy(reg, policy_dirs[0])
    d = reg.publish(drafter_dir, policy=p).version
    old = reg.publish(drafter_dir).version
    for alias, v in (("serving", d), ("old", old)):  # alias files as older versions wrote them: no "policy"
        (reg.root / "aliases" / f"{alias}.json").write_text(json.dumps(
            {"version": v, "history": [{"version": v, "at": "2026-01-01T00:00:00Z", "reason": "x", "action": "set"}]}))
    assert reg.resolve_pair("serving") == (d, p)  # the drafter's own policy
    assert reg.resolve_pair("old") == (old, None)
    reg.promote(old, "serving")
    assert reg.rollback("serving") == d and reg.resolve_pair("serving") == (d, p)


def test_cli_publishes_a_pair_and_promotes_it_with_drift_allowed_only_when_asked(tiny_llama, tiny_llama_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    from tests.registry.test_registry import run_cli
    from understudy.drafter.model import new_drafter, save_drafter

    root = str(tmp_path / "reg")
    save_drafter(new_drafter(tiny_llama.model, tiny_llama.fingerprint), tmp_path / "d")

    def cli(*args: str, code: int = 0) -> str:
        got, out, err = run_cli(monkeypatch, capsys, "drafters", *args, "--registry", root)
        assert got == code, err
        return out if code == 0 else err

    pol = json.loads(cli("publish-policy", str(tiny_llama_dir), "--json"))
    assert pol["manifest"]["kind"] == "policy" and pol["manifest"]["family_fingerprint"] == tiny_llama.fingerprint
    p = pol["version"]
    assert "aliases now on it: latest" in cli("publish", str(tmp_path / "d"), "--policy", str(p))
    base = json.loads(cli("publish", str(tmp_path / "d"), "--json"))["version"]
    assert f"serving -> {base} + base (new alias)" in cli("promote", str(base), "serving")
    assert "--allow-drift" in cli("promote", str(base), "serving", "--policy", str(p), code=2)
    assert f"serving -> {base} + v{p}" in cli("promote", str(base), "serving", "--policy", str(p), "--allow-drift")
    listed = json.loads(cli("list", "--json"))
    assert listed["pairs"]["serving"] == {"drafter": base, "policy": p}
    assert listed["pairs"]["latest"] == {"drafter": base, "policy": None}
    table = cli("list")
    assert "KIND" in table and "policy" in table and "drift" in table
    assert f"serving -> {base} + base" in cli("rollback", "serving")
