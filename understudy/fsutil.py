"""Filesystem primitives that also hold on shared storage (NFS): folders replaced without a gap, and locks.

Folders (`atomic_folder`): `out` is a symbolic link to an immutable generation folder next to it,
`.<name>@<random>`. A writer fills a new generation, fsyncs it, points a fresh link at it and os.replace()s the
link onto `out` (one atomic rename, also on NFS). The old generation is renamed `.<name>@retired-<random>` and
deleted RETIRED_GRACE_S later (by a later replacement), so a reader that was inside it (listing it, say) still
finds it whole. A reader that opens `out` at any moment finds the old or the new folder, complete; a reader
that needs several files from one generation resolves the link once (os.path.realpath) and reads from there
(FileNotFoundError there means the generation was retired: resolve again). A folder written by older code (a
plain directory) is swapped for the link with renameat2(RENAME_EXCHANGE) where the OS and filesystem have it;
elsewhere (NFS, macOS) that one-time conversion renames the directory aside first, so `out` is briefly missing
once.

Locks (`locked`, `try_lock`): an exclusive byte-range lock over a whole regular file opened for writing. Linux
NFS clients send byte-range (POSIX) locks to the server, and an exclusive one needs a descriptor open for
writing. We use the open-file-description flavour (F_OFD_SETLKW) so that, like flock, the lock belongs to the
open file rather than to the process: threads that open the file separately exclude each other, closing another
descriptor of the same file does not drop the lock, and a process can see its own lock from a second descriptor.
Where the OS has no OFD locks (macOS, BSD) we fall back to flock on the same file, which is correct on local
filesystems only. The kernel (or, on NFS, the server once the client's lease expires) releases a lock when its
holder dies. docs/registry.md says why in full.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)  # Linux >= 3.15 (Python >= 3.9 names it)
_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", None)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_GENERATION_SEP = "@"  # `.<name>@<random>`: a generation of the folder <name>
RETIRED_GRACE_S = 60.0  # a replaced generation stays this long for readers that are still inside it

log = logging.getLogger(__name__)


# ---- locks ----------------------------------------------------------------------------------------------------
def open_lock_file(path: Path, create: bool = True, new: bool = False) -> int:
    """Open a lock file for reading and writing (an NFS write lock needs it), creating it (mode 0666 less the
    umask) if allowed; `new`: it must not exist yet. Raises OSError (EACCES: read-only for this user)."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create or new else 0) | (os.O_EXCL if new else 0)
    return os.open(path, flags, 0o666)


def lock_fd(fd: int, blocking: bool = True) -> bool:
    """Take an exclusive lock over the whole file `fd` (opened for writing). Blocking: waits, returns True.
    Non-blocking: False when another open file holds it. Released when the last descriptor of this open file
    is closed."""
    if _OFD_SETLKW is not None and _OFD_SETLK is not None:
        # struct flock {short l_type, l_whence; off_t l_start, l_len; pid_t l_pid}, native layout; l_len 0 =
        # to the end of the file, l_pid must be 0 for OFD locks
        arg = struct.pack("@hhqqi0q", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        try:
            fcntl.fcntl(fd, _OFD_SETLKW if blocking else _OFD_SETLK, arg)
        except OSError as e:
            if not blocking and e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def locked(path: Path) -> Iterator[int]:
    """Hold an exclusive lock on `path` (created if missing) for the block. OSError if it cannot be opened or
    locked; the descriptor is closed (the lock released) on the way out, also when the block raises."""
    fd = open_lock_file(path)
    try:
        lock_fd(fd)
        yield fd
    finally:
        os.close(fd)


def try_lock(path: Path) -> bool | None:
    """Whether `path`'s lock is free: True (it was, and is free again on return), False (a live holder has it),
    None (no such file, or this user may not open it for writing: cannot tell)."""
    try:
        fd = open_lock_file(path, create=False)
    except (FileNotFoundError, PermissionError):
        return None
    try:
        return lock_fd(fd, blocking=False)
    finally:
        os.close(fd)


# ---- files ----------------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file's content, read in chunks."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


# ---- folders --------------------------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under root (folders after their contents)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def _is_generation_of(out: Path, target: str) -> bool:
    """Whether a link target is one of `out`'s own generations (never remove what a user's link points at)."""
    return "/" not in target and target.startswith(f".{out.name}{_GENERATION_SEP}")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where the OS or filesystem lacks it."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28, musl >= 1.2.?
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. NFS, old kernels
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _retired_prefix(out: Path) -> str:
    return f".{out.name}{_GENERATION_SEP}retired-"


def _retire_and_sweep(out: Path, old: Path | None, grace_s: float) -> None:
    """After a replacement: keep the old generation `grace_s` seconds for readers still inside it (renamed to
    .<name>@retired-*, its mtime the time it left service), and delete retired ones older than that. Failures
    are logged: the new folder is in place, they only leave garbage behind (which a later call clears)."""
    try:
        if old is not None:
            retired = out.with_name(f"{_retired_prefix(out)}{secrets.token_hex(4)}")
            try:
                os.rename(old, retired)
                os.utime(retired)
            except FileNotFoundError:
                pass  # a concurrent writer retired it first
        now = time.time()
        for entry in os.scandir(out.parent):
            if entry.name.startswith(_retired_prefix(out)) and \
                    now - entry.stat(follow_symlinks=False).st_mtime >= grace_s:
                shutil.rmtree(entry.path)  # (killed half-way: the next call finishes it)
    except OSError as e:
        log.warning("could not clear the replaced generations of %s (%s); delete %s* by hand", out, e,
                    out.parent / _retired_prefix(out))


def _swap_in(out: Path, link: Path) -> Path | None:
    """Make `out` the symlink `link` (atomically); return the folder it replaced (None: none of ours)."""
    if out.is_symlink():
        target = os.readlink(out)
        os.replace(link, out)
        return out.parent / target if _is_generation_of(out, target) else None
    if out.is_dir():  # a plain folder (older code): exchange it for the link, no gap, where possible
        if _exchange(link, out):
            return link  # the link's name now holds the old folder
        legacy = out.with_name(f"{_retired_prefix(out)}{secrets.token_hex(4)}")
        os.rename(out, legacy)  # (no RENAME_EXCHANGE here: `out` is missing until the next line, this once)
        try:
            os.replace(link, out)
        except BaseException:
            os.rename(legacy, out)
            raise
        return legacy
    os.replace(link, out)  # new, or a plain file / dangling link the caller asked us to replace
    return None


@contextlib.contextmanager
def atomic_folder(out: Path, grace_s: float = RETIRED_GRACE_S) -> Iterator[Path]:
    """Yield a new empty folder; when the block succeeds, fsync it and make `out` point at it in one atomic
    rename (an existing `out` is replaced; its old generation is deleted `grace_s` seconds later, by a later
    replacement); when the block fails, remove it. Readers of `out` always find a complete folder, old or new,
    never a half-written or missing one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = Path(tempfile.mkdtemp(prefix=f".{out.name}{_GENERATION_SEP}", dir=out.parent))
    link = gen.with_name(f"{gen.name}.link")
    try:
        yield gen
        _fsync_tree(gen)
        os.symlink(gen.name, link)  # relative: the pair survives moving or mounting the parent elsewhere
        old = _swap_in(out, link)  # the commit point: from here on `out` is the new folder
    except BaseException:
        shutil.rmtree(gen, ignore_errors=True)  # never visible: nothing else refers to it
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        raise
    fsync_dir(out.parent)
    _retire_and_sweep(out, old, grace_s)


def remove_folder(out: Path) -> None:
    """Remove a folder written by atomic_folder (the link, its generation and retired ones) or a plain one, at
    once: for folders nobody reads any more."""
    out = Path(out)
    old: Path | None = None
    if out.is_symlink():
        target = os.readlink(out)
        out.unlink()
        old = out.parent / target if _is_generation_of(out, target) else None
    elif out.is_dir():
        old = out
    _retire_and_sweep(out, old, 0.0)  # (one rename out of sight, then delete, with any earlier retired ones)
    fsync_dir(out.parent)
