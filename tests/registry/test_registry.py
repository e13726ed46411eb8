"""The drafter registry (issue 3): atomic publish under concurrent and SIGKILLed publishers, checksums caught by
verify and by loading, family refusal, aliases + rollback, gc retention, the watcher, error messages (path and
fix, non-zero exit, registry unchanged) and the `understudy drafters` CLI."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.registry.helpers import snapshot, subprocess_env
from understudy import fsutil
from understudy.drafter.model import load_drafter, new_drafter, save_drafter
from understudy.registry import store as regmod
from understudy.registry.store import Event, Registry, RegistryError
from understudy.registry.watch import RegistryWatcher

ACC = regmod.BEST_METRIC






def flip_byte(path: Path, offset: int | None = None) -> None:
    os.chmod(path, 0o644)  # published files are read-only (root writes anyway)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---- publish ----------------------------------------------------------------------------------------------------
def test_publish_writes_a_complete_manifest_and_moves_latest_and_best(reg, drafter_dir):
    info = reg.publish(drafter_dir, metrics={ACC: 2.5}, training_config={"lr": 1e-3}, policy_version=7, note="first")
    assert info.version == 1 and info.path == reg.version_path(1)
    m = reg.manifest(1)
    assert set(m["files"]) == {"config.json", "model.safetensors"}
    for name, meta in m["files"].items():
        data = (drafter_dir / name).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        assert not os.stat(info.path / name).st_mode & stat.S_IWUSR  # immutable on disk too
    assert m["version"] == 1 and m["created"].endswith("Z") and m["family_fingerprint"] == "fam-x"
    assert m["target"]["architecture"] == "llama" and m["target"]["hidden_size"] == 32
    assert (m["metrics"], m["training_config"], m["policy_version"], m["parent"], m["note"]) == \
        ({ACC: 2.5}, {"lr": 1e-3}, 7, None, "first")
    assert reg.aliases() == {"best": 1, "latest": 1}
    assert reg.resolve(1) == reg.resolve("1") == reg.resolve("v1") == reg.resolve("latest") == 1
    assert reg.verify(1) == [] and [i.version for i in reg.list_versions()] == [1]
    assert reg.publish(drafter_dir, parent=1).manifest["parent"] == 1
    assert os.listdir(reg.tmp_dir) == []


def test_publish_defaults_metrics_and_config_from_the_drafter_folder(reg, target, tmp_path):
    src = tmp_path / "trained"
    save_drafter(new_drafter(target, "fam-x"), src, extra_training={ACC: 1.7, "config": {"lr": 0.1}, "steps": 5})
    m = reg.publish(src).manifest
    assert m["metrics"] == {ACC: 1.7, "steps": 5} and m["training_config"] == {"lr": 0.1}
    assert reg.aliases()["best"] == 1


def test_default_location_follows_env_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("UNDERSTUDY_REGISTRY", str(tmp_path / "env"))
    assert regmod.default_registry_path() == tmp_path / "env"
    assert Registry.open(None).root == tmp_path / "env"
    monkeypatch.delenv("UNDERSTUDY_REGISTRY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert regmod.default_registry_path() == tmp_path / "xdg" / "understudy" / "registry"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert regmod.default_registry_path() == tmp_path / "home" / ".local/share/understudy/registry"


def test_best_moves_only_when_heldout_acceptance_improves(reg, drafter_dir):
    for acc in (2.0, 1.5, None, 2.5, 2.5):
        reg.publish(drafter_dir, metrics={ACC: acc})
    assert reg.aliases() == {"latest": 5, "best": 4}
    assert [h["version"] for h in reg.alias_history("best")] == [1, 4]
    assert [h["version"] for h in reg.alias_history("latest")] == [1, 2, 3, 4, 5]


def test_version_numbers_are_never_reused(reg, drafter_dir):
    for _ in range(3):
        reg.publish(drafter_dir)
    shutil.rmtree(reg.version_path(3))  # even a version deleted by hand keeps its number
    assert reg.publish(drafter_dir).version == 4


PUBLISHER = r"""
import os, sys, time
from understudy.registry.store import Registry
import understudy.drafter.model  # noqa: F401  (import torch before the start signal so the publishes overlap)
root, src, go, n = sys.argv[1:5]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.002)
reg = Registry.open(root)
print(" ".join(str(reg.publish(src, metrics={"heldout_acceptance_length": float(i)}, keep_last=2, history_window=0)
                   .version) for i in range(int(n))))
"""


def test_concurrent_publishers_in_separate_processes_get_distinct_versions(tmp_path, drafter_dir):
    """Each publish ends with an aggressive gc (keep 2) that runs while the others copy: it must never take a
    live publisher's temp folder (that publish would fail) nor an aliased version."""
    root, go, procs, n = tmp_path / "reg", tmp_path / "go", 3, 8  # the registry is created by the racers too
    ps = [subprocess.Popen([sys.executable, "-c", PUBLISHER, str(root), str(drafter_dir), str(go), str(n)],
                           stdout=subprocess.PIPE, text=True, env=subprocess_env()) for _ in range(procs)]
    try:
        assert all(p.stdout.readline().strip() == "ready" for p in ps)
        go.touch()
        outs = [p.communicate(timeout=120)[0] for p in ps]
    finally:
        for p in ps:
            p.kill()
    assert all(p.returncode == 0 for p in ps), outs
    got = [[int(x) for x in out.split()] for out in outs]
    assert all(g == sorted(g) and len(g) == n for g in got)
    flat = sorted(v for g in got for v in g)
    assert flat == list(range(1, procs * n + 1))  # distinct, and no number skipped or reused
    reg = Registry.open(root, create=False)
    left = reg.version_numbers()
    assert all(reg.verify(v) == [] for v in left)
    assert reg.aliases()["latest"] == procs * n  # moved under the same lock as the rename
    assert sorted(h["version"] for h in reg.alias_history("latest")) == flat
    assert set(left) == {procs * n - 1, procs * n} | set(reg.aliases().values()) | reg.protected(0)
    assert os.listdir(reg.tmp_dir) == []


KILLED_PUBLISHER = r"""
import os, random, signal, sys, time, traceback
from understudy.registry.store import Registry
import understudy.drafter.model  # noqa: F401  (torch is imported once, before any fork)
root, src = sys.argv[1], sys.argv[2]
for line in sys.stdin:  # one line per trial: the delay before SIGKILL
    pid = os.fork()
    if pid == 0:
        try:
            reg = Registry.open(root)
            while True:  # each publish ends with a gc: kills land mid-copy, mid-rename and mid-gc
                reg.publish(src, metrics={"heldout_acceptance_length": random.random() * 3}, note="killed",
                            keep_last=3, history_window=0)
        except BaseException:
            traceback.print_exc()
        os._exit(1)
    time.sleep(float(line))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    print("killed" if os.WIFSIGNALED(status) else f"exited {status}", flush=True)
"""


def load_version(reg, spec, target, fingerprint):  # type: ignore[no-untyped-def]
    """What a server does with a registry version: checkout (family + checksums), then load the folder."""
    _, folder = reg.checkout(spec, fingerprint)
    return load_drafter(folder, target, fingerprint)



def assert_consistent(reg: Registry) -> None:
    nums = reg.version_numbers()
    for v in nums:  # every visible version is whole: a killed publisher never exposes a partial one
        assert reg.verify(v) == [], (v, reg.verify(v))
    assert [i.version for i in reg.list_versions()] == nums
    assert set(reg.aliases().values()) <= set(nums)


def test_sigkilled_publishers_never_leave_a_visible_version_that_fails_verification(tmp_path, drafter_dir):
    root, rng, trials = tmp_path / "reg", random.Random(1234), 60
    # The registry exists before its publishers (as in any deployment). Otherwise, on a busy machine the first
    # kill can land before the first publisher has written registry.json, and open(create=False) below fails
    # for a reason this test is not about (creation resumes on the next open(create=True)).
    Registry.open(root)
    helper = subprocess.Popen([sys.executable, "-c", KILLED_PUBLISHER, str(root), str(drafter_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env())
    own, mid_publish = [], 0
    try:
        for _ in range(trials):
            helper.stdin.write(f"{rng.uniform(0.0, 0.08)}\n")
            helper.stdin.flush()
            assert helper.stdout.readline().strip() == "killed"  # (not "exited": the publisher never failed)
            reg = Registry.open(root, create=False)
            assert_consistent(reg)
            mid_publish += any(n.startswith("publish-") for n in os.listdir(reg.tmp_dir))
            own.append(reg.publish(drafter_dir, note="after kill", keep_last=3, history_window=0).version)
            assert reg.verify(own[-1]) == [] and reg.resolve("latest") == own[-1]  # still usable, at once
            assert not any(n.startswith("publish-") for n in os.listdir(reg.tmp_dir))  # its gc swept the dead
    finally:
        helper.stdin.close()
        helper.wait(timeout=60)
    assert own == sorted(set(own))
    assert own[-1] > trials  # the killed publishers did publish in between
    assert mid_publish >= 10  # many kills landed mid-publish (their temp folders were left)
    assert len(reg.version_numbers()) <= 3 + len(reg.protected(0))  # and the gc after each publish kept up
    assert reg.gc(keep_last=10**6, history_window=10**6) == []
    assert os.listdir(reg.tmp_dir) == []  # gc sweeps what killed publishers left; readers never saw it
    assert_consistent(reg)


# ---- checksums and families ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_flipped_byte_is_caught_by_verify_loading_and_promote(reg, drafter_dir, target, name):
    v = reg.publish(drafter_dir).version
    path = reg.version_path(v) / name
    assert load_version(reg, v, target, "fam-x") is not None
    flip_byte(path)
    problems = reg.verify(v)
    assert len(problems) == 1 and str(path) in problems[0] and "sha256" in problems[0]
    with pytest.raises(RegistryError, match="failed verification") as e:
        load_version(reg, "latest", target, "fam-x")
    assert str(path) in str(e.value) and "rollback" in str(e.value)
    with pytest.raises(RegistryError, match="failed verification"):
        reg.promote(v, "serving")
    assert "serving" not in reg.aliases()


def test_a_truncated_file_is_reported_with_its_size(reg, drafter_dir):
    v = reg.publish(drafter_dir).version
    path = reg.version_path(v) / "model.safetensors"
    os.chmod(path, 0o644)
    os.truncate(path, 100)
    assert "truncated" in reg.verify(v)[0]


def test_a_drafter_of_another_family_is_refused_with_a_clear_error(reg, drafter_dir, target, tmp_path):
    v = reg.publish(drafter_dir).version
    other = tmp_path / "fam-y"
    save_drafter(new_drafter(target, "fam-y"), other)  # same shapes, other tokenizer: still incompatible
    w = reg.publish(other).version  # families may coexist; the manifest records which is which
    assert reg.manifest(w)["family_fingerprint"] == "fam-y"
    with pytest.raises(RegistryError) as e:
        load_version(reg, w, target, "fam-x")
    msg = str(e.value)
    assert "fam-y" in msg and "fam-x" in msg and str(reg.version_path(w)) in msg and "train" in msg
    assert reg.check_compatible(v, "fam-x") == v
    d = load_version(reg, v, target, "fam-x")
    ref = load_drafter(drafter_dir, target, "fam-x")
    assert all(torch.equal(a, b) for a, b in zip(d.own_state_dict().values(), ref.own_state_dict().values(),
                                                  strict=True))


# ---- aliases, rollback, gc ------------------------------------------------------------------------------------------
def test_rollback_returns_an_alias_to_its_previous_target(reg, drafter_dir):
    for _ in range(4):
        reg.publish(drafter_dir)
    for v in (1, 2, "v3"):
        reg.promote(v, "serving")
    assert reg.aliases()["serving"] == 3
    assert reg.rollback("serving") == 2 and reg.aliases()["serving"] == 2
    assert reg.rollback("serving") == 1
    before = snapshot(reg.root)
    with pytest.raises(RegistryError, match="no earlier target") as e:
        reg.rollback("serving")
    assert str(reg.aliases_dir / "serving.json") in str(e.value)
    assert snapshot(reg.root) == before
    reg.promote(1, "serving")  # already there: a no-op, not a history entry
    reg.promote(4, "serving")
    assert reg.rollback("serving") == 1
    hist = reg.alias_history("serving")
    assert [(h["version"], h["action"]) for h in hist] == [
        (1, "set"), (2, "set"), (3, "set"), (2, "rollback"), (1, "rollback"), (4, "set"), (1, "rollback")]
    assert reg.rollback("latest") == 3  # latest moved 1, 2, 3, 4 on publish
    assert reg.publish(drafter_dir).version == 5 and reg.aliases()["latest"] == 5
    with pytest.raises(RegistryError, match="latest -> 5"):
        reg.rollback("nope")


def test_gc_keeps_the_newest_and_every_aliased_version(reg, drafter_dir):
    for acc in (1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0):
        reg.publish(drafter_dir, metrics={ACC: acc})
    for v in (3, 5, 6):
        reg.promote(v, "serving")
    # kept: newest 2 (9, 10), latest 10, best 2 (+1 in its window), serving 6 (+5 in its window of 2)
    dry = reg.gc(keep_last=2, history_window=2, dry_run=True)
    assert dry == [3, 4, 7, 8] and len(reg.version_numbers()) == 10
    assert reg.gc(keep_last=2, history_window=2) == dry
    assert reg.version_numbers() == [1, 2, 5, 6, 9, 10]
    assert reg.gc(keep_last=1, history_window=0) == []  # targets and rollback targets: 10 9, 2 1, 6 5
    reg.promote(10, "serving")
    assert reg.gc(keep_last=1, history_window=0) == [5]  # serving's rollback target is now 6
    assert reg.version_numbers() == [1, 2, 6, 9, 10] and reg.aliases() == {"best": 2, "latest": 10, "serving": 10}
    assert reg.rollback("serving") == 6 and reg.rollback("best") == 1 and reg.rollback("latest") == 9
    for bad in ({"keep_last": 0}, {"history_window": -1}, {"tmp_max_age_s": -1}):
        with pytest.raises(RegistryError, match="gc needs"):
            reg.gc(**bad)


def test_gc_never_removes_an_aliased_version_random_histories(reg, drafter_dir):
    rng = random.Random(7)
    for _ in range(25):
        reg.publish(drafter_dir, metrics={ACC: rng.uniform(1, 3)})
        alive = reg.version_numbers()
        for _ in range(rng.randint(0, 2)):
            reg.promote(rng.choice(alive), rng.choice(["serving", "canary"]))
        if rng.random() < 0.3 and "serving" in reg.aliases():
            with contextlib.suppress(RegistryError):  # no earlier target, or it was collected: refused
                reg.rollback("serving")
        keep_last, window = rng.randint(1, 3), rng.randint(0, 3)
        must_keep = set(reg.version_numbers()[-keep_last:])
        for name, v in reg.aliases().items():
            must_keep |= {v} | {h["version"] for h in reg.alias_history(name)[-window:]} if window else {v}
        before = set(reg.version_numbers())
        removed = reg.gc(keep_last=keep_last, history_window=window)
        assert not set(removed) & must_keep
        assert must_keep & before <= set(reg.version_numbers())
        assert all(reg.verify(v) == [] for v in reg.aliases().values())


def test_gc_sweeps_dead_publishers_temp_folders_but_not_live_ones(reg, drafter_dir):
    reg.publish(drafter_dir)
    dead, live = reg.tmp_dir / "publish-dead", reg.tmp_dir / "publish-live"
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
        (reg.tmp_dir / f"{d.name}.lock").touch()
    orphan_lock, staged = reg.tmp_dir / "publish-gone.lock", reg.tmp_dir / "stage-1-ab.json"
    orphan_lock.touch()
    staged.write_text("{}")  # a writer killed while it held the registry lock
    fd = os.open(reg.tmp_dir / "publish-live.lock", os.O_RDWR)
    assert fsutil.lock_fd(fd, blocking=False)  # what a running publisher holds
    try:
        assert reg.list_versions()[0].version == 1 and reg.version_numbers() == [1]  # readers ignore .tmp
        reg.gc()
        assert sorted(os.listdir(reg.tmp_dir)) == ["publish-live", "publish-live.lock"]
    finally:
        os.close(fd)
    reg.gc()
    assert os.listdir(reg.tmp_dir) == []


def test_gc_removes_unowned_temp_entries_only_once_they_are_old(reg, drafter_dir):
    """Entries without a lock file (a publisher of an older release, stray files) are judged by age."""
    reg.publish(drafter_dir)
    old, young = reg.tmp_dir / "publish-1234-old", reg.tmp_dir / "someone-elses-file"
    old.mkdir()
    young.write_text("x")
    os.utime(old, (1_000_000_000, 1_000_000_000))  # 2001
    reg.gc()
    assert os.listdir(reg.tmp_dir) == [young.name]
    reg.gc(tmp_max_age_s=0)
    assert os.listdir(reg.tmp_dir) == []


# ---- watcher ------------------------------------------------------------------------------------------------------
def test_watcher_yields_new_versions_and_alias_moves(tmp_path, drafter_dir):
    root = tmp_path / "reg"
    w = RegistryWatcher(root)  # the server may start before the first publish
    assert w.poll() == []
    reg = Registry.open(root)
    reg.publish(drafter_dir, metrics={ACC: 2.0})
    assert w.poll() == [Event("version", 1), Event("alias", 1, "best"), Event("alias", 1, "latest")]
    assert w.poll() == []
    reg.publish(drafter_dir, metrics={ACC: 1.0})
    reg.publish(drafter_dir, metrics={ACC: 1.0})
    assert w.poll() == [Event("version", 2), Event("version", 3), Event("alias", 3, "latest", 1)]
    reg.promote(1, "serving")
    reg.promote(3, "serving")
    assert w.poll() == [Event("alias", 3, "serving", None)]
    reg.rollback("serving")
    assert w.poll() == [Event("alias", 1, "serving", 3)]
    reg.gc(keep_last=1, history_window=0)
    assert w.poll() == []
    full = RegistryWatcher(reg, include_existing=True).poll()  # (2 stays: latest's rollback target)
    assert full == [Event("version", 1), Event("version", 2), Event("version", 3), Event("alias", 1, "best"),
                    Event("alias", 3, "latest"), Event("alias", 1, "serving")]
    gen = w.watch(interval_s=0.01)
    reg.publish(drafter_dir)
    assert next(gen) == Event("version", 4)


# ---- errors: path + fix, registry unchanged ------------------------------------------------------------------------
def test_a_missing_registry_is_reported_not_created(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(RegistryError) as e:
        Registry.open(missing, create=False)
    assert str(missing) in str(e.value) and "--registry" in str(e.value)
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "drafters", "list", "--registry", str(missing)],
                       capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and str(missing) in r.stderr
    assert "Traceback" not in r.stderr and not missing.exists()


def test_a_folder_that_is_not_a_registry_is_refused(tmp_path):
    (tmp_path / "stuff.txt").write_text("mine")
    with pytest.raises(RegistryError, match="not empty and is not a drafter registry"):
        Registry.open(tmp_path)
    assert os.listdir(tmp_path) == ["stuff.txt"]
    bad = tmp_path / "bad"
    Registry.open(bad)
    (bad / "registry.json").write_text("{oops")
    with pytest.raises(RegistryError, match=r"registry\.json is unreadable or malformed") as e:
        Registry.open(bad)
    assert "restore it" in str(e.value)




def test_permission_denied_publish_names_the_path_and_changes_nothing(reg, drafter_dir, monkeypatch):
    reg.publish(drafter_dir)
    before = snapshot(reg.root)
    dirs = [reg.root, reg.versions_dir, reg.aliases_dir, reg.tmp_dir]
    for d in dirs:
        os.chmod(d, 0o555)
    try:
        probe = reg.tmp_dir / "probe"
        try:
            probe.mkdir()
            probe.rmdir()  # root ignores mode bits: simulate what the kernel would say

            def denied(path: Path, create: bool = True, new: bool = False) -> int:
                if Path(path).parent == reg.tmp_dir:
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return real_open(path, create, new)

            real_open = regmod.open_lock_file
            monkeypatch.setattr(regmod, "open_lock_file", denied)
        except PermissionError:
            pass
        with pytest.raises(RegistryError) as e:
            reg.publish(drafter_dir)
    finally:
        for d in dirs:
            os.chmod(d, 0o755)
    msg = str(e.value)
    assert "permission denied" in msg and str(reg.root) in msg and "chmod" in msg and "not changed" in msg
    assert snapshot(reg.root) == before


@pytest.mark.parametrize("stage", ["copy", "manifest", "alias"])
def test_disk_full_during_publish_leaves_no_version_and_no_temp(reg, drafter_dir, monkeypatch, stage):
    reg.publish(drafter_dir, metrics={ACC: 1.0})
    before = snapshot(reg.root)

    real_copy, real_write, copies = regmod._copy_file, regmod._write_durable, []

    def copy_then_full(src: Path, dst: Path) -> tuple[str, int]:  # the first file copies, the second fails
        copies.append(dst)
        if len(copies) > 1:
            dst.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst)

    def write_full(path: Path, data: bytes) -> None:
        hit = path.name == "manifest.json" if stage == "manifest" else path.name.startswith("stage-") and \
            path.suffix == ".json"  # the alias files, staged after the counter
        if hit:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    if stage == "copy":
        monkeypatch.setattr(regmod, "_copy_file", copy_then_full)
    else:
        monkeypatch.setattr(regmod, "_write_durable", write_full)
    with pytest.raises(RegistryError) as e:
        reg.publish(drafter_dir, metrics={ACC: 2.0})
    msg = str(e.value)
    assert "disk full" in msg and str(reg.root) in msg and "not changed" in msg
    assert snapshot(reg.root) == before  # no visible version, no temp folder, aliases and counter untouched
    monkeypatch.undo()
    assert reg.publish(drafter_dir).version == 2


def test_unknown_versions_and_aliases_list_what_exists(reg, drafter_dir, target):
    reg.publish(drafter_dir)
    before = snapshot(reg.root)
    for spec in (99, "99", "v99"):
        with pytest.raises(RegistryError, match="version 99 is not in the registry") as e:
            reg.resolve(spec)
        assert str(reg.root) in str(e.value) and "latest -> 1" in str(e.value)
    with pytest.raises(RegistryError, match="'nope' is neither") as e:
        reg.resolve("nope")
    assert "latest -> 1" in str(e.value) and str(reg.root) in str(e.value)
    for call in (lambda: reg.version_path(99), lambda: reg.manifest(99), lambda: reg.promote(99, "serving"),
                 lambda: load_version(reg, "nope", target, "fam-x"), lambda: reg.alias_history("nope")):
        with pytest.raises(RegistryError):
            call()
    with pytest.raises(RegistryError, match="alias name 'v2' is invalid"):
        reg.promote(1, "v2")
    assert snapshot(reg.root) == before


def test_a_malformed_manifest_is_named_and_the_version_never_served(reg, drafter_dir, target):
    reg.publish(drafter_dir)
    reg.publish(drafter_dir)
    mpath = reg.version_path(1) / "manifest.json"
    os.chmod(mpath, 0o644)
    mpath.write_text("{not json")
    before = snapshot(reg.root)
    with pytest.raises(RegistryError, match="is malformed") as e:
        reg.manifest(1)
    assert str(mpath) in str(e.value) and "re-publish" in str(e.value)
    assert str(mpath) in reg.verify(1)[0]
    assert [i.version for i in reg.list_versions()] == [2]
    for call in (lambda: load_version(reg, 1, target, "fam-x"), lambda: reg.promote(1, "serving")):
        with pytest.raises(RegistryError, match="malformed"):
            call()
    mpath.write_text(json.dumps({**reg.manifest(2), "version": 7}))
    with pytest.raises(RegistryError, match="names version 7"):
        reg.manifest(1)
    mpath.write_text("{not json")
    assert snapshot(reg.root) == before


def test_a_malformed_alias_file_stops_gc_and_is_named(reg, drafter_dir):
    for _ in range(3):
        reg.publish(drafter_dir)
    apath = reg.aliases_dir / "serving.json"
    apath.write_text('{"version": "x"}')
    before = snapshot(reg.root)
    with pytest.raises(RegistryError, match="malformed") as e:
        reg.resolve("serving")
    assert str(apath) in str(e.value) and "promote VERSION serving" in str(e.value)
    with pytest.raises(RegistryError, match="malformed"):
        reg.gc(keep_last=1, history_window=0)  # never delete what might be aliased
    assert snapshot(reg.root) == before


def test_publish_refuses_folders_that_are_not_drafters(reg, drafter_dir, tmp_path):
    before = snapshot(reg.root)
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = tmp_path / "truncated"
    shutil.copytree(drafter_dir, truncated)
    os.truncate(truncated / "model.safetensors", (truncated / "model.safetensors").stat().st_size - 10)
    nested = tmp_path / "nested"
    shutil.copytree(drafter_dir, nested / "sub")
    shutil.copy(drafter_dir / "config.json", nested)
    shutil.copy(drafter_dir / "model.safetensors", nested)
    cases = {tmp_path / "missing": "no such folder", empty: "config.json is missing",
             truncated: "truncated", nested: "contains a folder 'sub'"}
    for src, why in cases.items():
        with pytest.raises(RegistryError, match=why) as e:
            reg.publish(src)
        assert str(src) in str(e.value)
    assert snapshot(reg.root) == before


# ---- CLI ------------------------------------------------------------------------------------------------------------
def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from understudy.cli.main import main

    monkeypatch.setattr(sys, "argv", ["understudy", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_publish_list_show_promote_rollback_verify_gc(tmp_path, drafter_dir, monkeypatch, capsys):
    root = str(tmp_path / "reg")

    def cli(*args):
        code, out, err = run_cli(monkeypatch, capsys, "drafters", *args, "--registry", root)
        assert code == 0, err
        return out

    doc = json.loads(cli("publish", str(drafter_dir), "--metric", f"{ACC}=2.5", "--policy-version", "12",
                         "--note", "hi", "--json"))
    assert doc["version"] == 1 and doc["aliases"] == ["best", "latest"] and doc["manifest"]["policy_version"] == 12
    assert "published version 2" in cli("publish", str(drafter_dir), "--parent", "1")
    cli("publish", str(drafter_dir))
    table = cli("list").splitlines()
    assert table[1].split()[0] == "VERSION" and table[2].split()[0] == "1" and table[4].split()[-1] == "latest"
    listed = json.loads(cli("list", "--json"))
    assert [v["version"] for v in listed["versions"]] == [1, 2, 3] and listed["aliases"]["best"] == 1
    shown = json.loads(cli("show", "latest", "--json"))
    assert shown["version"] == 3 and [h["version"] for h in shown["alias_history"]] == [1, 2, 3]
    assert "sha256" in cli("show", "2") and "parent: 1" in cli("show", "2")
    assert "serving -> 1 + base (new alias)" in cli("promote", "1", "serving")  # + the pair's policy (base model)
    assert "serving -> 2 + base (was 1)" in cli("promote", "v2", "serving", "--reason", "canary ok")
    assert json.loads(cli("rollback", "serving", "--json")) == {"alias": "serving", "version": 1, "policy": None,
                                                                 "previous": 2}
    assert cli("verify").count(": ok") == 3
    assert "published version 4" in cli("publish", str(drafter_dir), "--keep-last", "0")  # 0: no gc
    assert json.loads(cli("gc", "--keep-last", "1", "--history-window", "0", "--dry-run", "--json"))["removed"] == [2]
    assert "removed 1 version(s): 2" in cli("gc", "--keep-last", "1", "--history-window", "0", "--tmp-max-age", "0")
    assert cli("resolve", "serving").split("\t")[0] == "1"
    for _ in range(2):  # each publish's gc keeps the newest, 1 (best, serving) and latest's rollback target
        cli("publish", str(drafter_dir), "--keep-last", "1", "--history-window", "0")
    monkeypatch.setenv("UNDERSTUDY_REGISTRY", root)
    code, out, _ = run_cli(monkeypatch, capsys, "drafters", "list", "--json")
    assert code == 0 and [v["version"] for v in json.loads(out)["versions"]] == [1, 5, 6]


def test_cli_errors_exit_non_zero_name_the_path_and_change_nothing(tmp_path, drafter_dir, monkeypatch, capsys):
    root = tmp_path / "reg"
    reg = Registry.open(root)
    reg.publish(drafter_dir)
    before = snapshot(root)
    for args, why in ((["show", "99"], "version 99 is not in the registry"), (["rollback", "latest"], "no earlier"),
                      (["rollback", "nope"], "'nope' is neither"), (["promote", "1", "v9"], "is invalid"),
                      (["publish", str(tmp_path)], "config.json is missing"), (["gc", "--keep-last", "0"], "keep_last"),
                      (["publish", str(reg.version_path(1)), "--keep-last", "-1"], "--keep-last -1")):
        code, _, err = run_cli(monkeypatch, capsys, "drafters", *args, "--registry", str(root))
        assert code == 2 and err.startswith("error: ") and why in err, (args, err)
        assert snapshot(root) == before, args
    path = reg.version_path(1) / "model.safetensors"
    flip_byte(path)
    code, out, err = run_cli(monkeypatch, capsys, "drafters", "verify", "--registry", str(root), "--json")
    assert code == 2 and json.loads(out)["results"][0]["ok"] is False and "failed verification" in err
    code, out, err = run_cli(monkeypatch, capsys, "drafters", "verify", "--registry", str(root))
    assert code == 2 and "FAILED" in out and str(path) in out
