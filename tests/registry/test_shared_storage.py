"""The registry on shared storage (NFS): locks on files opened for writing that exclude across open files (not only
processes), folders replaced without a moment where they are missing or partial, and bounded disk use (gc after
every publish that never takes an aliased version or the one being published, temp leftovers, vLLM exports)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.registry.helpers import snapshot, subprocess_env
from understudy import fsutil
from understudy.registry import store as regmod
from understudy.registry.store import Registry, RegistryError

ACC = regmod.BEST_METRIC






# ---- locks ----------------------------------------------------------------------------------------------------------
def test_every_lock_file_is_opened_for_writing_and_a_read_only_one_is_named_with_the_fix(reg, drafter_dir, monkeypatch):
    real_open, opened = os.open, []

    def spy(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        p = Path(os.fsdecode(path))
        if p.name.endswith(".lock"):
            opened.append((p, flags & os.O_ACCMODE))
            if flags & os.O_ACCMODE != os.O_RDONLY and p.exists() and not p.stat().st_mode & stat.S_IWUSR:
                raise PermissionError(errno.EACCES, "Permission denied", str(p))  # what the kernel says (not to root)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", spy)
    reg.publish(drafter_dir, metrics={ACC: 2.0})
    reg.promote(1, "serving")
    reg.gc()
    locks = {p.name if p.parent == reg.root else "tmp/*.lock" for p, _ in opened}
    assert locks == {".lock", "tmp/*.lock"}  # the registry's lock and the publisher's own
    assert {mode for _, mode in opened} == {os.O_RDWR}

    os.chmod(reg.lock_path, 0o444)
    before = snapshot(reg.root)
    for call in (lambda: reg.publish(drafter_dir), lambda: reg.promote(1, "canary"), lambda: reg.rollback("latest"),
                 lambda: reg.gc()):
        with pytest.raises(RegistryError) as e:
            call()
        msg = str(e.value)
        assert str(reg.lock_path) in msg and "for writing" in msg and f"chmod ug+w {reg.lock_path}" in msg, msg
        assert snapshot(reg.root) == before
    assert reg.resolve("serving") == 1 and reg.verify(1) == []  # readers need no lock
    os.chmod(reg.lock_path, 0o644)
    assert reg.publish(drafter_dir).version == 2


def test_a_lock_belongs_to_the_open_file_not_to_the_process(tmp_path):
    """Threads and a publisher's gc open the lock separately in one process: they must exclude each other, and
    closing one descriptor must not drop another's lock (classic per-process POSIX locks fail all three)."""
    path = tmp_path / "x.lock"
    with fsutil.locked(path):
        assert fsutil.try_lock(path) is False  # a second open file in the same process is refused
        os.close(fsutil.open_lock_file(path))  # another descriptor of the same file comes and goes ...
        assert fsutil.try_lock(path) is False  # ... and the lock stays
    assert fsutil.try_lock(path) is True
    assert fsutil.try_lock(tmp_path / "missing.lock") is None


HOLDER = r"""
import sys
from pathlib import Path
from understudy import fsutil
with fsutil.locked(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert fsutil.try_lock(path) is False
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs; the kernel releases the lock
        holder.wait(timeout=60)
    assert fsutil.try_lock(path) is True


# ---- atomic_folder --------------------------------------------------------------------------------------------------
FILES = ("config.json", "model.safetensors", "tokenizer.json")


def write_generation(folder: Path, gen: int, size: int = 4096) -> None:
    for name in FILES:
        payload = bytes(random.Random(f"{gen}-{name}").randbytes(size))
        (folder / name).write_bytes(f"{gen}\n".encode() + payload + hashlib.sha256(payload).hexdigest().encode())


def read_generation(folder: Path) -> int:
    """The generation a folder holds; AssertionError if it is missing a file, has an extra one, a file is partial,
    or its files come from different generations."""
    assert sorted(os.listdir(folder)) == sorted(FILES), os.listdir(folder)
    gens = set()
    for name in FILES:
        data = (folder / name).read_bytes()
        head, _, rest = data.partition(b"\n")
        payload, digest = rest[:-64], rest[-64:]
        assert hashlib.sha256(payload).hexdigest().encode() == digest, f"{name} is partial"
        gens.add(int(head))
    assert len(gens) == 1, gens
    return gens.pop()


def test_replacing_a_folder_never_leaves_it_missing_or_partial_at_any_step(tmp_path, monkeypatch):
    """Check `out` before and after every filesystem call atomic_folder makes: always one complete generation."""
    out, seen = tmp_path / "d", []

    def check() -> None:
        if seen:  # (before the first folder exists there is nothing to see)
            seen.append(read_generation(out))

    def checked(fn):  # type: ignore[no-untyped-def]
        def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
            check()
            try:
                return fn(*a, **kw)
            finally:
                check()
        return wrapper

    with fsutil.atomic_folder(out) as tmp:
        write_generation(tmp, 0)
    seen.append(read_generation(out))
    out_plain = tmp_path / "plain"  # a folder written by older code: a plain directory, converted on replace
    out_plain.mkdir()
    write_generation(out_plain, 0)
    for fn in ("replace", "rename", "symlink", "unlink", "mkdir", "rmdir"):
        monkeypatch.setattr(os, fn, checked(getattr(os, fn)))
    monkeypatch.setattr(shutil, "rmtree", checked(shutil.rmtree))
    for gen in range(1, 4):
        with fsutil.atomic_folder(out, grace_s=0) as tmp:  # (0: the replaced generation is deleted at once)
            write_generation(tmp, gen)
        assert read_generation(out) == gen
    assert sorted(set(seen)) == [0, 1, 2, 3] and len(seen) > 20  # every step was checked
    assert seen == sorted(seen)  # and never went back
    out, seen[:] = out_plain, [0]
    with fsutil.atomic_folder(out, grace_s=0) as tmp:  # RENAME_EXCHANGE: the plain folder and the link swap
        write_generation(tmp, 1)
    assert read_generation(out) == 1 and out.is_symlink() and seen[-1] == 1 and set(seen) == {0, 1}
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink()) == [os.readlink(tmp_path / "d"),
                                                                                os.readlink(out_plain)]


READER = r"""
import hashlib, os, sys
from pathlib import Path
out, stop, names = Path(sys.argv[1]), Path(sys.argv[2]), sorted(sys.argv[3:])
reads = snapshots = retries = 0
last = -1
print("ready", flush=True)
while not stop.exists():
    got = sorted(os.listdir(out))  # FileNotFoundError here: the folder was missing
    assert got == names, got
    for name in names:  # each file whole, through the stable name
        rest = (out / name).read_bytes().partition(b"\n")[2]
        assert hashlib.sha256(rest[:-64]).hexdigest().encode() == rest[-64:], name + " is partial"
    reads += 1
    real = Path(os.path.realpath(out))  # one generation: resolve once, read everything from there
    try:
        gens = {(real / n).read_bytes().partition(b"\n")[0] for n in names}
    except FileNotFoundError:
        retries += 1  # replaced (and removed) meanwhile: a reader resolves again
        continue
    assert len(gens) == 1, gens
    gen = int(gens.pop())
    assert gen >= last, (gen, last)  # never back in time
    last, snapshots = gen, snapshots + 1
print(reads, snapshots, retries, flush=True)
"""


def test_a_reader_polling_during_many_replacements_never_sees_the_folder_missing_or_partial(tmp_path):
    out, stop, n = tmp_path / "d", tmp_path / "stop", 300
    with fsutil.atomic_folder(out) as tmp:
        write_generation(tmp, 0)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out), str(stop), *FILES], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert reader.stdout.readline().strip() == "ready"
        for gen in range(1, n + 1):
            with fsutil.atomic_folder(out) as tmp:
                write_generation(tmp, gen)
            assert reader.poll() is None, reader.stderr.read()  # the reader fails (exits) at its first bad read
        stop.touch()
        out_, err = reader.communicate(timeout=120)
    finally:
        reader.kill()
    assert reader.returncode == 0, err
    reads, snapshots, _ = map(int, out_.split())
    assert reads >= 1 and snapshots >= 1
    assert read_generation(out) == n
    retired = [p for p in tmp_path.iterdir() if p.name.startswith(".d@retired-")]
    assert len(retired) == n  # kept for readers still inside them (grace period) ...
    with fsutil.atomic_folder(out, grace_s=0) as tmp:
        write_generation(tmp, n + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", "stop", os.readlink(out)])  # ... then gone


def test_atomic_folder_failures_and_foreign_links_are_left_alone(tmp_path):
    out = tmp_path / "d"
    with fsutil.atomic_folder(out) as tmp:
        write_generation(tmp, 1)
    before = snapshot(tmp_path)
    with pytest.raises(ZeroDivisionError), fsutil.atomic_folder(out) as tmp:
        write_generation(tmp, 2)
        _ = 1 / 0
    assert snapshot(tmp_path) == before and read_generation(out) == 1  # the failed write left nothing
    mine = tmp_path / "elsewhere"  # a user's own link to a folder of theirs: replaced, their folder kept
    mine.mkdir()
    write_generation(mine, 7)
    user_link = tmp_path / "u"
    user_link.symlink_to(mine)
    with fsutil.atomic_folder(user_link) as tmp:
        write_generation(tmp, 8)
    assert read_generation(user_link) == 8 and read_generation(mine) == 7
    fsutil.remove_folder(out)
    fsutil.remove_folder(user_link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


def test_a_plain_folder_is_converted_also_where_rename_exchange_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)  # as on NFS
    out = tmp_path / "d"
    out.mkdir()
    write_generation(out, 1)
    with fsutil.atomic_folder(out, grace_s=0) as tmp:
        write_generation(tmp, 2)
    assert read_generation(out) == 2 and out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", os.readlink(out)])


def test_callers_of_atomic_folder_keep_working(tmp_path, target, drafter_dir, reg):
    from understudy.drafter.export import export_vllm
    from understudy.drafter.model import load_drafter, new_drafter, save_drafter
    from understudy.engine.loader import save_model

    out = tmp_path / "d"
    for seed in (1, 2):  # the trainer saves over its folder, then publishes it
        save_drafter(new_drafter(target, "fam-x", seed=seed), out)
        load_drafter(out, target, "fam-x")
        info = reg.publish(out)
        assert reg.verify(info.version) == [] and info.manifest["source"] == str(out.absolute())
    assert reg.manifest(1)["files"]["model.safetensors"] != reg.manifest(2)["files"]["model.safetensors"]
    left = {p.name for p in tmp_path.iterdir()} - {"reg", "d", os.readlink(out)}
    assert len(left) == 1 and left.pop().startswith(".d@retired-")  # the first save, kept for a grace period
    for _ in range(2):
        shapes = export_vllm(out, tmp_path / "vllm")
        assert (tmp_path / "vllm" / "model.safetensors").is_file() and "fc.weight" in shapes
    for _ in range(2):
        save_model(target, None, tmp_path / "m")
        assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".m.*")) and not list(tmp_path.glob(".d.*"))  # what the engine's tests check


# ---- gc after every publish ---------------------------------------------------------------------------------------
def test_aliased_versions_and_rollback_targets_survive_any_number_of_publishes(reg, drafter_dir):
    reg.publish(drafter_dir, metrics={ACC: 3.0}, keep_last=None)  # 1: best, and serving's rollback target
    reg.promote(1, "serving")
    reg.publish(drafter_dir, metrics={ACC: 1.0}, keep_last=None)
    reg.promote(2, "serving")
    sizes = set()
    for _ in range(30):
        last = reg.publish(drafter_dir, metrics={ACC: 1.0}, keep_last=2, history_window=0).version
        sizes.add(len(reg.version_numbers()))
    assert reg.version_numbers() == [1, 2, last - 1, last] and sizes == {3, 4}  # bounded all along
    assert all(reg.verify(v) == [] for v in reg.version_numbers())
    assert reg.rollback("serving") == 1 and reg.resolve("best") == 1
    reg.publish(drafter_dir, keep_last=1, history_window=0)
    assert 2 not in reg.version_numbers() and 1 in reg.version_numbers()  # serving left 2: it may go


def test_gc_during_a_publish_never_removes_the_version_being_published(reg, drafter_dir, monkeypatch):
    """A gc that runs while a publish copies (the same process: it sees the publisher's lock too) and one that
    runs after newer versions pushed this one out of every keep rule (publish's own gc spares it anyway)."""
    real_copy, other = regmod._copy_file, Registry.open(reg.root)

    def copy_then_gc(src: Path, dst: Path) -> tuple[str, int]:
        assert other.gc(keep_last=1, history_window=0, tmp_max_age_s=0) == []
        assert dst.parent.is_dir()  # the live publisher's temp folder survived
        return real_copy(src, dst)

    monkeypatch.setattr(regmod, "_copy_file", copy_then_gc)
    assert reg.publish(drafter_dir, keep_last=1).version == 1
    monkeypatch.undo()
    real_gc = reg.gc

    def others_publish_first(*a, **kw):  # type: ignore[no-untyped-def]
        for _ in range(2):
            other.publish(drafter_dir, keep_last=None)
        return real_gc(*a, **kw)

    monkeypatch.setattr(reg, "gc", others_publish_first)
    info = reg.publish(drafter_dir, keep_last=1, history_window=0)  # 2; then 3 and 4 arrive before its gc
    assert info.version == 2 and reg.verify(2) == []
    assert reg.version_numbers() == [2, 3, 4]  # 1 went; 2 only because it was just published


def test_a_failing_gc_after_publish_is_reported_and_the_version_stays_published(reg, drafter_dir, caplog):
    reg.publish(drafter_dir)
    (reg.aliases_dir / "broken.json").write_text("{")
    v = reg.publish(drafter_dir).version
    assert v == 2 and reg.verify(2) == [] and reg.resolve("latest") == 2
    assert any(r.levelname == "ERROR" and "version 2 is published, but the gc after it failed" in r.getMessage()
               and "broken.json" in r.getMessage() for r in caplog.records)
    with pytest.raises(RegistryError, match="keep_last >= 1"):
        reg.publish(drafter_dir, keep_last=0)
    assert reg.version_numbers() == [1, 2]


# ---- vLLM exports ---------------------------------------------------------------------------------------------------
class FakeProcess:
    def __init__(self, drafter_dir: Path) -> None:
        self.drafter_dir = drafter_dir


def test_vllm_exports_keep_only_those_in_use_and_the_newest(tmp_path, drafter_dir):
    from understudy.server.backends.vllm_backend import VllmBackend
    from understudy.server.backends.vllm_process import VllmLaunch
    from understudy.server.metrics import ServerMetrics

    launch = VllmLaunch(python=Path("/bin/false"), model_dir=tmp_path, served_model_name="x", dtype="float32",
                        max_model_len=64, max_num_seqs=1, num_speculative_tokens=0)
    backend = VllmBackend(launch, ServerMetrics("x"), root=tmp_path / "cache")
    first = backend.export("1", drafter_dir)
    user = FakeProcess(first)  # the active process serves version 1 for the whole test
    backend._procs.add(user)
    for v in range(2, 9):
        backend.export(str(v), drafter_dir)
    folder = first.parent
    visible = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert visible == ["1", "7", "8"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == \
        sorted(os.readlink(folder / name) for name in visible)  # nothing else left behind
    assert backend.export("7", drafter_dir) == folder / "7"  # re-exporting a label replaces it in place
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["1", "7", "8"]
    backend._procs.discard(user)  # (stop_all would stop it)
    backend.stop_all()
    assert not backend.run_dir.exists()
