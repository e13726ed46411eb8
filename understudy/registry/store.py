"""The registry of target + drafter pairs: immutable numbered versions, atomic publish, aliases with history,
rollback, gc.

The contract between the trainer (publishes continuously) and the server (watches, validates, hot-swaps).

Two kinds of version share one number space: a **drafter** (config.json + model.safetensors, manifest `kind`
"drafter", the default for manifests written before kinds existed) and a **policy** (the target's own weights: an
HF folder of config.json, *.safetensors and tokenizer files; `kind` "policy"). A drafter's manifest names the
policy version it was trained against (`policy`: a policy version number, or null for the base model the server
was started with). A **pair** is a drafter version plus the policy it runs with; an alias names both
(`{"version": D, "policy": P}`): by default P is the drafter's own `policy`, and pairing a drafter with another
policy ("drift") needs an explicit `allow_drift`. Aliases, rollback and gc work on pairs: rolling an alias back
restores both halves, and gc never removes a policy that a kept drafter or an alias needs. Publishing a policy
moves no alias; publishing its drafter moves `latest` (and `best`) to the pair.
Layout (ROOT = --registry, else $UNDERSTUDY_REGISTRY, else $XDG_DATA_HOME/understudy/registry):

    ROOT/registry.json          format marker {"format": "understudy-registry-v1"}
    ROOT/.lock                  lock file: serialises number allocation + the rename, alias moves and gc
    ROOT/counter                highest version number ever allocated (numbers are never reused)
    ROOT/versions/000001/       drafter or policy files (read-only) + manifest.json
    ROOT/aliases/<name>.json    {"version": N, "policy": P, "history": [{"version", "policy", "at", "reason",
                                "action"}, ...]} (N a drafter version, P a policy version or null = base model)
    ROOT/.tmp/                  in-progress publishes and staged files (same filesystem: renames are atomic)
    ROOT/.tmp/publish-X.lock    locked by the publisher of .tmp/publish-X/ for as long as it lives

Invariants: a folder in versions/ is complete (files and manifest are written and fsynced inside a temp folder,
which one rename makes visible), an alias file is always whole (written aside, then os.replace), and a number is
handed out once (allocated under the lock from max(counter, newest folder)). A publisher killed at any point
leaves at most a folder in .tmp/ whose lock file nobody holds, which readers never look at and `gc` removes.

Locks are exclusive byte-range locks on regular files opened for writing (understudy.fsutil.locked), which NFSv4
honours across machines; readers take none. Every publish ends with a `gc` (keep_last, history_window), so a
trainer that publishes for days keeps a bounded number of versions; gc never removes a version an alias points
to, an alias's rollback target, or the version being published.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from understudy.drafter.format import DrafterConfig, DrafterError, check_family, validate_folder
from understudy.errors import UnderstudyError
from understudy.fsutil import fsync_dir, lock_fd, open_lock_file, sha256_file, try_lock

log = logging.getLogger(__name__)

REGISTRY_FORMAT = "understudy-registry-v1"
MANIFEST_FORMAT = "understudy-drafter-manifest-v1"
DRAFTER, POLICY = "drafter", "policy"  # the two kinds of version (manifest "kind"; absent = drafter)
BEST_METRIC = "heldout_acceptance_length"  # `best` follows the highest value of this training metric
MAX_HISTORY = 1000  # alias history entries kept per alias file (oldest dropped)
KEEP_LAST = 10  # gc (and the gc that ends every publish) keeps the newest this many versions ...
HISTORY_WINDOW = 10  # ... and what each alias pointed to in its last this many moves
TMP_MAX_AGE_S = 3600.0  # gc removes a .tmp/ entry without a lock file once it is this old
_ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_VERSION_RE = re.compile(r"[vV]?(\d+)")
_CHUNK = 1 << 20


class RegistryError(UnderstudyError, RuntimeError):
    """The registry is missing, unwritable or inconsistent, or a version/alias is unknown or fails checks."""

    http_status, error_type, code, expose = 500, "server_error", "registry_error", True


def default_registry_path() -> Path:
    """$UNDERSTUDY_REGISTRY, else $XDG_DATA_HOME/understudy/registry, else ~/.local/share/understudy/registry."""
    env = os.environ.get("UNDERSTUDY_REGISTRY")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "understudy" / "registry"


@dataclass(frozen=True)
class VersionInfo:
    version: int  # the immutable version number
    path: Path  # ROOT/versions/NNNNNN
    manifest: dict[str, Any]  # the parsed manifest.json

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics") or {}

    @property
    def family_fingerprint(self) -> str:
        return str(self.manifest.get("family_fingerprint"))

    @property
    def kind(self) -> str:
        return manifest_kind(self.manifest)

    @property
    def policy(self) -> int | None:
        """A drafter's policy version (None: the base model); None for a policy version."""
        return manifest_policy(self.manifest)

    @property
    def size_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.manifest["files"].values())

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "path": str(self.path), "manifest": self.manifest}


def manifest_kind(manifest: dict[str, Any]) -> str:
    return str(manifest.get("kind") or DRAFTER)


def manifest_policy(manifest: dict[str, Any]) -> int | None:
    p = manifest.get("policy") if manifest_kind(manifest) == DRAFTER else None
    return p if isinstance(p, int) and not isinstance(p, bool) else None


@dataclass(frozen=True)
class Event:
    kind: str  # "version" (a new version became visible) | "alias" (an alias now names another pair)
    version: int  # the new version, or the alias's new drafter version
    alias: str | None = None  # the alias name (kind == "alias")
    previous: int | None = None  # the alias's previous drafter version, None if the alias is new
    policy: int | None = None  # kind == "alias": the pair's policy version (None: the base model)


# ---- small durable-file helpers -------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _copy_file(src: Path, dst: Path) -> tuple[str, int]:
    """Copy src -> dst (new file), fsync it, and return (sha256, size) of the bytes written."""
    h, n = hashlib.sha256(), 0
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        while chunk := fi.read(_CHUNK):
            h.update(chunk)
            fo.write(chunk)
            n += len(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest(), n


def _write_durable(path: Path, data: bytes) -> None:
    """Write a new file and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _owner_lock(entry: Path) -> Path:
    """The lock file that marks a .tmp/ entry as owned by a live process."""
    return entry.with_name(entry.name + ".lock")


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, default=str) + "\n").encode()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _os_error(e: OSError, action: str, root: Path, unchanged: bool = True) -> RegistryError:
    """Translate an OSError into a message naming the path and the fix."""
    where = e.filename or root
    tail = "; the registry was not changed" if unchanged else ""
    if not Path(os.fsdecode(where)).absolute().is_relative_to(root):  # reading the source, not the registry
        msg = f"cannot read {where} while {action} ({e.strerror or e}); check that it exists and is readable"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = (f"disk full while {action} ({where}): free space on the filesystem holding {root} "
               f"(e.g. `understudy drafters gc --registry {root}`) and try again")
    elif e.errno in (errno.EACCES, errno.EPERM):
        msg = (f"permission denied while {action} ({where}): make {root} writable by this user "
               "(chmod/chown) or pass --registry to a folder you own")
    elif e.errno == errno.EROFS:
        msg = f"{where} is on a read-only filesystem ({action}); pass --registry to a writable folder"
    else:
        msg = f"cannot finish {action} ({where}: {e.strerror or e}); check the folder {root} and try again"
    return RegistryError(msg + tail)


# ---- source validation (what `publish` accepts) ---------------------------------------------------------------
def _source_files(src: Path) -> list[str]:
    """The files a version copies from src: top-level regular files, minus hidden ones and any old manifest."""
    names = []
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name.startswith(".") or entry.name == "manifest.json":
            continue
        if entry.is_dir():
            raise RegistryError(f"cannot publish {src}: it contains a folder {entry.name!r}; a drafter folder holds "
                                "only files (config.json, model.safetensors): publish the drafter folder itself")
        if entry.is_file():
            names.append(entry.name)
    return names


def _validate_source(src: Path, real: Path) -> DrafterConfig:
    """Check the drafter folder `src` (whose files are read from `real`: src with its link resolved)."""
    if not real.is_dir():
        raise RegistryError(f"cannot publish {src}: no such folder; pass a drafter folder (config.json + "
                            "model.safetensors) written by `understudy drafter train --out DIR`")
    try:
        return validate_folder(real)
    except DrafterError as e:
        raise RegistryError(f"cannot publish {src}: {e}") from e


def manifest_metric(manifest: dict[str, Any] | None) -> float | None:
    """The finite BEST_METRIC (held-out mean acceptance length) a manifest records, else None."""
    v = ((manifest or {}).get("metrics") or {}).get(BEST_METRIC)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def manifest_positions(manifest: dict[str, Any] | None) -> list[float] | None:
    """The held-out per-position acceptance a manifest records (position i: the share of drafts whose first i
    tokens were accepted), from its metrics or its nested `heldout` evaluation; None when it has none."""
    m = (manifest or {}).get("metrics") or {}
    for v in (m.get("per_position_acceptance"), (m.get("heldout") or {}).get("per_position_acceptance")):
        if isinstance(v, list) and v and all(isinstance(x, int | float) and not isinstance(x, bool)
                                             and math.isfinite(x) and 0 <= x <= 1 for x in v):
            return [float(x) for x in v]
    return None


# ---- alias history --------------------------------------------------------------------------------------------
_UNSET: Any = object()  # "the pair's policy is the drafter's own" (promote's default)


def _moved(doc: dict[str, Any] | None, version: int, reason: str, action: str = "set",
           policy: int | None = None) -> dict[str, Any]:
    history = list(doc["history"]) if doc else []
    history.append({"version": version, "policy": policy, "at": _now(), "reason": reason, "action": action})
    return {"version": version, "policy": policy, "history": history[-MAX_HISTORY:]}


def _pair_of(entry: dict[str, Any]) -> tuple[int, Any]:
    """(drafter, policy) of an alias doc or history entry; policy is _UNSET when an older registry wrote none."""
    return entry["version"], entry.get("policy", _UNSET)


def _rollback_target(history: list[dict[str, Any]]) -> tuple[int, Any] | None:
    """Replay the history as a stack ("set" pushes, "rollback" pops); the target is the pair under the top."""
    stack: list[tuple[int, Any]] = []
    for e in history:
        if e.get("action") == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != _pair_of(e):  # history trimmed: re-anchor on what it says
                stack.append(_pair_of(e))
        else:
            stack.append(_pair_of(e))
    return stack[-2] if len(stack) >= 2 else None


def _policy_ok(entry: dict[str, Any]) -> bool:
    p = entry.get("policy")
    return p is None or (isinstance(p, int) and not isinstance(p, bool))


def _check_alias_name(name: str) -> None:
    if not _ALIAS_RE.fullmatch(name) or _VERSION_RE.fullmatch(name):
        raise RegistryError(f"alias name {name!r} is invalid: use a letter followed by letters, digits, '_', '.' "
                            "or '-' (not a version number such as v3), e.g. `serving`")


class Registry:
    """A folder of immutable drafter versions. Build with Registry.open(); every method is safe to call from
    several processes at once (writers serialise on ROOT/.lock, readers take no lock)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions_dir = root / "versions"
        self.aliases_dir = root / "aliases"
        self.tmp_dir = root / ".tmp"
        self.lock_path = root / ".lock"
        self.counter_path = root / "counter"
        self.marker_path = root / "registry.json"

    # ---- opening ------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | None = None, create: bool = True) -> Registry:
        """Open the registry at `path` (None: $UNDERSTUDY_REGISTRY or the default); create it if allowed."""
        root = (Path(path).expanduser() if path else default_registry_path()).absolute()
        reg = cls(root)
        if reg.marker_path.exists():
            reg._check_marker()
            if create and not reg.tmp_dir.is_dir():
                reg._create()  # a creation that was interrupted after writing the marker
            return reg
        if not create:
            raise RegistryError(
                f"no drafter registry at {root} (no registry.json); pass --registry (or set UNDERSTUDY_REGISTRY) "
                f"to an existing registry, or create this one with `understudy drafters publish SRC_DIR --registry {root}`")
        reg._create()
        return reg

    def _check_marker(self) -> None:
        try:
            fmt = json.loads(self.marker_path.read_text()).get("format")
        except (OSError, ValueError, AttributeError) as e:
            raise RegistryError(f"{self.marker_path} is unreadable or malformed ({e}); it should hold "
                                f'{{"format": "{REGISTRY_FORMAT}"}}: restore it with that content') from e
        if fmt != REGISTRY_FORMAT:
            raise RegistryError(f"{self.marker_path}: format {fmt!r} is not {REGISTRY_FORMAT!r}; this folder was "
                                "written by another tool or version; pass --registry to an Understudy registry")

    def _create(self) -> None:
        known = {"versions", "aliases", ".tmp", ".lock", "counter", "registry.json"}
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"registry path {self.root} is a file; pass --registry to a folder")
        if self.root.is_dir() and set(os.listdir(self.root)) - known:
            raise RegistryError(f"{self.root} is not empty and is not a drafter registry (no registry.json); "
                                "pass --registry to an empty or new folder")
        try:
            for d in (self.root, self.versions_dir, self.aliases_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
            with self._lock():  # (creates .lock)
                if not self.marker_path.exists():
                    self._replace_json(self.marker_path, {"format": REGISTRY_FORMAT, "created": _now()})
        except OSError as e:
            raise _os_error(e, f"creating the registry {self.root}", self.root, unchanged=False) from e

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Hold the registry's writer lock: a byte-range lock on ROOT/.lock, opened for writing (NFS needs it)."""
        try:
            fd = open_lock_file(self.lock_path)
        except OSError as e:
            raise self._lock_error(e, "open") from e
        try:
            try:
                lock_fd(fd)
            except OSError as e:
                raise self._lock_error(e, "lock") from e
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock (also when the process is killed)

    def _lock_error(self, e: OSError, step: str) -> RegistryError:
        what = f"cannot {step} the registry's lock file {self.lock_path} ({e.strerror or e})"
        fix = "; the registry was not changed"
        if e.errno in (errno.EACCES, errno.EPERM):
            why = (f"{what}: every process that changes the registry (publish, promote, rollback, gc, a server that "
                   f"creates it) opens this file for writing, because a lock on shared storage (NFS) needs it; make it "
                   f"writable by this user (`chmod ug+w {self.lock_path}`, or chown it and {self.root} to the user "
                   "or group of every writer)")
        elif e.errno == errno.EROFS:
            why = (f"{what}: {self.root} is on a read-only filesystem; reading needs no lock, but changing the "
                   "registry does: mount it read-write here, or pass --registry to a writable folder")
        elif e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            why = (f"{what}: the filesystem holding {self.root} does not grant byte-range locks; on NFS use v4 (or "
                   "run rpc.statd/lockd for v3) and do not mount with `nolock` or `local_lock`; Linux >= 3.15 is "
                   "needed for the locks themselves")
        elif e.errno in (errno.ENOSPC, errno.EDQUOT):
            why = f"{what}: the disk is full; free space on it (e.g. `understudy drafters gc --registry {self.root}`)"
        else:
            why = f"{what}; check the folder {self.root} and try again"
        return RegistryError(why + fix)

    def _stage(self, data: bytes, suffix: str = ".json") -> Path:
        """Write data (fsynced) into .tmp/, to be os.replace'd into place under the lock."""
        path = self.tmp_dir / f"stage-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
        try:
            _write_durable(path, data)
        except BaseException:
            _remove(path)
            raise
        return path

    def _stage_json(self, doc: Any) -> Path:
        return self._stage(_json_bytes(doc))

    def _replace_json(self, dest: Path, doc: Any) -> None:
        staged = self._stage_json(doc)
        os.replace(staged, dest)
        fsync_dir(dest.parent)

    # ---- read side ----------------------------------------------------------------------------------------------
    def _vdir(self, v: int) -> Path:
        return self.versions_dir / f"{v:06d}"

    def version_numbers(self) -> list[int]:
        """Every numbered folder in versions/ (a folder there is complete by construction)."""
        try:
            names = os.listdir(self.versions_dir)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def _exists(self, v: int) -> bool:
        return (self._vdir(v) / "manifest.json").is_file()

    def version_path(self, v: int) -> Path:
        if not self._exists(v):
            raise self._unknown_version(v)
        return self._vdir(v)

    def manifest(self, v: int) -> dict[str, Any]:
        path = self._vdir(v) / "manifest.json"
        if not self._vdir(v).is_dir():
            raise self._unknown_version(v)
        fix = ("do not serve this version: restore the file from a backup, or re-publish the drafter and point "
               "aliases at the new version (`understudy drafters promote`)")
        try:
            m = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise RegistryError(f"{path} is missing, so version {v} is incomplete; {fix}") from e
        except (OSError, ValueError) as e:
            raise RegistryError(f"{path} is malformed ({type(e).__name__}: {e}); {fix}") from e
        problem = self._manifest_problem(m, v)
        if problem:
            raise RegistryError(f"{path} is malformed ({problem}); {fix}")
        return m

    @staticmethod
    def _manifest_problem(m: Any, v: int) -> str | None:
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            return f"format is not {MANIFEST_FORMAT!r}"
        if m.get("version") != v:
            return f"it names version {m.get('version')!r}, but lives in the folder of version {v}"
        files = m.get("files")
        if not isinstance(files, dict) or not files:
            return "no 'files' table"
        for name, meta in files.items():
            if "/" in name or name in (".", "..", "manifest.json") or not isinstance(meta, dict):
                return f"bad file entry {name!r}"
            if not isinstance(meta.get("sha256"), str) or not isinstance(meta.get("size"), int):
                return f"file entry {name!r} lacks sha256/size"
        if not isinstance(m.get("family_fingerprint"), str):
            return "no family_fingerprint"
        return None

    def list_versions(self) -> list[VersionInfo]:
        """All versions with a readable manifest, oldest first (a damaged one is logged and skipped)."""
        out = []
        for v in self.version_numbers():
            try:
                out.append(VersionInfo(v, self._vdir(v), self.manifest(v)))
            except RegistryError as e:
                log.warning("skipping version %d: %s", v, e)
        return out

    def info(self, spec: str | int) -> VersionInfo:
        v = self.resolve(spec)
        return VersionInfo(v, self._vdir(v), self.manifest(v))

    def _alias_path(self, name: str) -> Path:
        return self.aliases_dir / f"{name}.json"

    def _read_alias(self, name: str) -> dict[str, Any] | None:
        path = self._alias_path(name)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            doc = e
        ok = (isinstance(doc, dict) and isinstance(doc.get("version"), int) and isinstance(doc.get("history"), list)
              and all(isinstance(h, dict) and isinstance(h.get("version"), int) and _policy_ok(h)
                      for h in doc["history"]) and _policy_ok(doc))
        if not ok:
            raise RegistryError(f"alias file {path} is malformed ({doc if isinstance(doc, Exception) else 'bad fields'});"
                                f" restore it, or delete it and re-create the alias with "
                                f"`understudy drafters promote VERSION {name} --registry {self.root}`")
        return doc  # type: ignore[return-value]

    def alias_names(self) -> list[str]:
        try:
            return sorted(n[:-5] for n in os.listdir(self.aliases_dir) if n.endswith(".json"))
        except FileNotFoundError:
            return []

    def aliases(self) -> dict[str, int]:
        """alias name -> version it points to."""
        out = {}
        for name in self.alias_names():
            doc = self._read_alias(name)
            if doc is not None:
                out[name] = doc["version"]
        return out

    def alias_history(self, name: str) -> list[dict[str, Any]]:
        doc = self._read_alias(name)
        if doc is None:
            raise self._unknown_alias(name)
        return list(doc["history"])

    def resolve(self, spec: str | int) -> int:
        """A version number (7, "7", "v7") or an alias name -> an existing version number."""
        if isinstance(spec, int) and not isinstance(spec, bool):
            v = spec
        else:
            s = str(spec).strip()
            m = _VERSION_RE.fullmatch(s)
            if m:
                v = int(m.group(1))
            else:
                doc = self._read_alias(s) if _ALIAS_RE.fullmatch(s) else None
                if doc is None:
                    raise self._unknown_alias(s)
                return self._alias_target(s, doc)
        if not self._exists(v):
            raise self._unknown_version(v)
        return v

    def _alias_target(self, name: str, doc: dict[str, Any]) -> int:
        v = doc["version"]
        if not self._exists(v):
            raise RegistryError(f"alias {name!r} points to version {v}, which is not in {self.versions_dir}; "
                                f"point it at an existing version: `understudy drafters promote VERSION {name}`")
        return v

    def pair_policy(self, drafter: int, named: Any = _UNSET) -> int | None:
        """The policy of the pair (drafter, named): `named` when an alias recorded one, else the drafter's own."""
        if named is not _UNSET:
            return named
        return manifest_policy(self.manifest(drafter))

    def resolve_pair(self, spec: str | int) -> tuple[int, int | None]:
        """A drafter version or an alias -> (drafter version, policy version or None for the base model)."""
        s = str(spec).strip()
        if not isinstance(spec, int) and not _VERSION_RE.fullmatch(s) and _ALIAS_RE.fullmatch(s):
            doc = self._read_alias(s)  # read once: both halves from the same alias document, never a torn pair
            if doc is not None:
                v = self._alias_target(s, doc)
                return v, self.pair_policy(v, _pair_of(doc)[1])
        v = self.resolve(spec)
        return v, self.pair_policy(v)

    def _summary(self) -> str:
        nums = self.version_numbers()
        vs = "none" if not nums else (", ".join(map(str, nums)) if len(nums) <= 8 else
                                      f"{len(nums)} versions, {nums[0]}..{nums[-1]}")
        try:
            al = ", ".join(f"{k} -> {v}" for k, v in self.aliases().items()) or "none"
        except RegistryError:
            al = "unreadable"
        return f"versions: {vs}; aliases: {al}"

    def _unknown_version(self, v: int) -> RegistryError:
        return RegistryError(f"version {v} is not in the registry {self.root} ({self._summary()}); "
                             f"see `understudy drafters list --registry {self.root}`")

    def _unknown_alias(self, name: str) -> RegistryError:
        return RegistryError(f"{name!r} is neither a version number nor an alias in the registry {self.root} "
                             f"({self._summary()}); see `understudy drafters list --registry {self.root}`")

    # ---- verification and loading ---------------------------------------------------------------------------------
    def verify(self, v: int) -> list[str]:
        """Re-hash every file of version v against its manifest. Returns the problems (empty: the version is ok)."""
        try:
            m = self.manifest(v)
        except RegistryError as e:
            return [str(e)]
        vdir, problems = self._vdir(v), []
        for name, meta in m["files"].items():
            p = vdir / name
            try:
                sha, size = sha256_file(p, _CHUNK)
            except FileNotFoundError:
                problems.append(f"{p} is missing")
                continue
            except OSError as e:
                problems.append(f"{p} is unreadable ({e.strerror})")
                continue
            if size != meta["size"]:
                problems.append(f"{p} has {size} bytes, the manifest says {meta['size']} (truncated or changed)")
            elif sha != meta["sha256"]:
                problems.append(f"{p} fails its sha256 check (corrupted or modified after publishing)")
        for extra in sorted(set(os.listdir(vdir)) - set(m["files"]) - {"manifest.json"}):
            problems.append(f"{vdir / extra} is not listed in the manifest")
        return problems

    def verify_or_raise(self, v: int) -> None:
        problems = self.verify(v)
        if problems:
            raise RegistryError(
                f"version {v} ({self._vdir(v)}) failed verification: {'; '.join(problems)}. Do not serve it: point "
                "aliases at a good version (`understudy drafters rollback ALIAS` or `promote VERSION ALIAS`) and "
                "re-publish the drafter")

    def check_compatible(self, spec: str | int, target_fingerprint: str) -> int:
        """Refuse (RegistryError) a version trained for another model family. Cheap: reads the manifest only."""
        v = self.resolve(spec)
        m = self.manifest(v)
        if manifest_kind(m) != DRAFTER:
            raise RegistryError(f"version {v} is a {manifest_kind(m)}, not a drafter; name a drafter version (or an "
                                f"alias to one): see `understudy drafters list --registry {self.root}`")
        return self._check_family(v, m, target_fingerprint)

    def _check_family(self, v: int, m: dict[str, Any], target_fingerprint: str) -> int:
        t = m.get("target") or {}
        try:
            check_family(m["family_fingerprint"], target_fingerprint, f"version {v} ({self._vdir(v)})",
                         f"{t.get('architecture')}, hidden {t.get('hidden_size')}, vocab {t.get('vocab_size')}")
        except DrafterError as e:
            raise RegistryError(str(e)) from e
        return v

    def checkout(self, spec: str | int, target_fingerprint: str) -> tuple[int, Path]:
        """Resolve, check the family (from the manifest) and re-verify every checksum: the version's folder,
        ready for `understudy.drafter.model.load_drafter`. Reads files only (no torch)."""
        v = self.check_compatible(spec, target_fingerprint)
        self.verify_or_raise(v)
        return v, self._vdir(v)

    def checkout_policy(self, v: int, target_fingerprint: str) -> Path:
        """A policy version's folder, checked (kind, family from the manifest) and re-verified (checksums), ready
        for `understudy.engine.loader.load_model`. Reads files only (no torch)."""
        m = self.manifest(self.resolve(v))
        if manifest_kind(m) != POLICY:
            raise RegistryError(f"version {v} is a {manifest_kind(m)}, not a policy; a pair's policy must be a "
                                f"version published with `understudy drafters publish-policy`")
        self._check_family(v, m, target_fingerprint)
        self.verify_or_raise(v)
        return self._vdir(v)

    def _check_policy_for(self, policy: int, family: str, what: str) -> None:
        """A drafter may only name a policy version of its own family."""
        try:
            m = self.manifest(policy)
        except RegistryError as e:
            raise RegistryError(f"{what} names policy version {policy}, which is not usable: {e}") from e
        if manifest_kind(m) != POLICY:
            raise RegistryError(f"{what} names version {policy} as its policy, but that is a {manifest_kind(m)}; "
                                "publish the policy first (`understudy drafters publish-policy DIR`) and name it")
        if m.get("family_fingerprint") != family:
            raise RegistryError(f"{what} is of family {family}, its policy version {policy} of "
                                f"{m.get('family_fingerprint')}: a drafter only runs with a policy of its family")

    # ---- publish ----------------------------------------------------------------------------------------------------
    def publish(self, src_dir: str | Path, *, metrics: dict[str, Any] | None = None,
                training_config: dict[str, Any] | None = None, policy_version: str | int | None = None,
                policy: int | None = None, parent: int | None = None, note: str | None = None,
                keep_last: int | None = KEEP_LAST, history_window: int = HISTORY_WINDOW) -> VersionInfo:
        """Copy a drafter folder in as the next version: temp folder, fsync, one atomic rename under the lock.

        `policy` is the registry's policy version the drafter was trained against (None: the base model); the
        pair (this drafter, that policy) is what `latest` (and `best`) then name. `policy_version` is free-form
        lineage (e.g. the trainer's step). metrics / training_config default to what the drafter's config.json
        recorded under `training`. Moves `latest`, and `best` when metrics[heldout_acceptance_length] beats the
        current best's. Then runs gc(keep_last, history_window), which never removes this version or its policy
        (keep_last=None: no gc).
        """
        src = Path(src_dir)
        if keep_last is not None:
            _check_retention(keep_last, history_window)
        if parent is not None and (isinstance(parent, bool) or not isinstance(parent, int) or parent < 1):
            raise RegistryError(f"parent must be a version number >= 1, got {parent!r}")
        # read one generation of src: a folder written by atomic_folder is a link that a writer may swap meanwhile
        real = Path(os.path.realpath(src)) if src.is_symlink() else src
        cfg = _validate_source(src, real)
        files = _source_files(real)
        if policy is not None:
            if isinstance(policy, bool) or not isinstance(policy, int) or policy < 1:
                raise RegistryError(f"policy must be a policy version number >= 1 or None, got {policy!r}")
            self._check_policy_for(policy, cfg.family_fingerprint, f"the drafter {src}")
        training = cfg.training or {}
        if metrics is None:
            metrics = {k: training[k] for k in (BEST_METRIC, "heldout", "ood", "steps") if k in training}
        body = {
            "kind": DRAFTER,
            "policy": policy,
            "family_fingerprint": cfg.family_fingerprint,
            "target": cfg.target.family_shape(),
            "draft_vocab_size": cfg.draft_vocab_size,
            "drafter_format": cfg.format,
            "policy_version": policy_version,
            "parent": parent,
            "metrics": metrics,
            "training_config": training_config if training_config is not None else training.get("config"),
            "note": note,
            "source": str(src.absolute()),
        }
        info = self._publish_files(real, files, body)
        if keep_last is not None:
            self._gc_after_publish(info.version, keep_last, history_window)
        return info

    def publish_policy(self, src_dir: str | Path, *, family_fingerprint: str, target: dict[str, Any],
                       metrics: dict[str, Any] | None = None, training_config: dict[str, Any] | None = None,
                       policy_version: str | int | None = None, note: str | None = None,
                       keep_last: int | None = KEEP_LAST, history_window: int = HISTORY_WINDOW) -> VersionInfo:
        """Copy a policy (an HF folder: config.json, *.safetensors, tokenizer files, as `save_model` writes it)
        in as the next version, with the same guarantees as a drafter. Moves no alias: a pair becomes servable
        when a drafter naming this policy is published or promoted. The caller gives the family fingerprint
        (LoadedModel.fingerprint: this module does not load models); a server re-checks it after loading."""
        src = Path(src_dir)
        if keep_last is not None:
            _check_retention(keep_last, history_window)
        real = Path(os.path.realpath(src)) if src.is_symlink() else src
        if not real.is_dir():
            raise RegistryError(f"cannot publish {src}: no such folder; pass a policy folder (config.json, "
                                "model.safetensors, tokenizer files) as `save_model` or `understudy train` writes it")
        files = _source_files(real)
        if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
            raise RegistryError(f"cannot publish {src} as a policy: it needs config.json and *.safetensors weights "
                                f"(found: {', '.join(files) or 'nothing'})")
        if not isinstance(family_fingerprint, str) or not family_fingerprint.startswith("fam-"):
            raise RegistryError(f"family_fingerprint must be a target's fingerprint (fam-...), got {family_fingerprint!r}")
        body = {"kind": POLICY, "family_fingerprint": family_fingerprint, "target": target,
                "policy_version": policy_version, "parent": None, "metrics": metrics or {},
                "training_config": training_config, "note": note, "source": str(src.absolute())}
        info = self._publish_files(real, files, body)
        if keep_last is not None:
            self._gc_after_publish(info.version, keep_last, history_window)
        return info

    def _gc_after_publish(self, v: int, keep_last: int, history_window: int) -> None:
        """The version is published whatever happens here: a failing gc is logged (the next publish retries)."""
        try:
            removed = self.gc(keep_last, history_window, keep=(v,))
        except RegistryError as e:
            log.error("version %d is published, but the gc after it failed (the registry keeps growing until this "
                      "is fixed): %s", v, e)
            return
        if removed:
            log.info("gc after publishing version %d removed version(s) %s", v, ", ".join(map(str, removed)))

    def _begin_temp(self) -> tuple[Path, int]:
        """A temp folder .tmp/publish-X/ and its lock file .tmp/publish-X.lock, locked for as long as this publisher
        lives (gc leaves the pair alone until the lock is free). Returns the folder and the lock's descriptor."""
        tmp = self.tmp_dir / f"publish-{os.getpid()}-{secrets.token_hex(4)}"
        with self._lock():  # gc sweeps .tmp under this lock: it never sees the pair half-made
            fd = open_lock_file(_owner_lock(tmp), new=True)  # first the lock, then the folder: killed in between,
            try:  # we leave a lock file nobody holds, which gc removes
                if not lock_fd(fd, blocking=False):  # a fresh file: nobody else can hold it
                    raise RegistryError(f"cannot lock the new file {_owner_lock(tmp)}; check the folder {self.tmp_dir}")
                os.mkdir(tmp)
            except BaseException:
                os.close(fd)
                _remove(_owner_lock(tmp))
                raise
        return tmp, fd

    def _end_temp(self, tmp: Path, fd: int) -> None:
        """Release a publisher's lock and remove its lock file (the folder is gone: renamed or removed)."""
        os.close(fd)
        _remove(_owner_lock(tmp))

    def _publish_files(self, src: Path, files: list[str], body: dict[str, Any]) -> VersionInfo:
        try:
            tmp, fd = self._begin_temp()
        except OSError as e:
            raise _os_error(e, "starting a publish", self.root) from e
        staged: list[tuple[Path, Path]] = []
        v: int | None = None
        try:
            entries = {}
            for name in files:  # the expensive part (copy + hash + fsync) runs outside the lock
                sha, size = _copy_file(src / name, tmp / name)
                os.chmod(tmp / name, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
                entries[name] = {"sha256": sha, "size": size}
            with self._lock():
                nv = self._next_version()
                manifest = {"format": MANIFEST_FORMAT, "version": nv, "created": _now(), "files": entries, **body}
                _write_durable(tmp / "manifest.json", _json_bytes(manifest))
                os.chmod(tmp / "manifest.json", stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
                fsync_dir(tmp)
                if manifest_kind(manifest) == DRAFTER:  # a policy alone moves no alias
                    self._stage_publish(nv, manifest_metric(manifest), manifest_policy(manifest), staged)
                os.rename(tmp, self._vdir(nv))  # the commit point: the version is visible, whole, from here on
                v = nv
                self._commit_staged(staged)
        except OSError as e:
            action = f"publishing {src} (version {v} is published, but moving its aliases failed)" if v else \
                f"publishing {src}"
            raise _os_error(e, action, self.root, unchanged=v is None) from e
        finally:
            for s, _ in staged:
                _remove(s)
            if v is None:
                _remove(tmp)
            self._end_temp(tmp, fd)
        return VersionInfo(v, self._vdir(v), manifest)

    def _next_version(self) -> int:
        """Called under the lock: one more than any number ever handed out."""
        try:
            last = int(self.counter_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            last = 0
        return max([last, *self.version_numbers()]) + 1

    def _stage_publish(self, v: int, metric: float | None, policy: int | None,
                       staged: list[tuple[Path, Path]]) -> None:
        """Stage (in .tmp/) the counter and alias files a publish of v replaces; nothing visible changes yet.
        Appends (staged file, destination) to `staged` as it goes, so the caller can clean up after a failure."""
        staged.append((self._stage(str(v).encode(), ".txt"), self.counter_path))
        staged.append((self._stage_json(_moved(self._read_alias("latest"), v, "publish", policy=policy)), self._alias_path("latest")))
        best = self._read_alias("best")
        old = None
        if best is not None and self._exists(best["version"]):
            with contextlib.suppress(RegistryError):
                old = manifest_metric(self.manifest(best["version"]))
        if metric is not None and (best is None or old is None or metric > old):
            why = f"publish: {BEST_METRIC} {metric:.4g}" + (f" > {old:.4g}" if old is not None else "")
            staged.append((self._stage_json(_moved(best, v, why, policy=policy)), self._alias_path("best")))

    def _commit_staged(self, staged: list[tuple[Path, Path]]) -> None:
        fsync_dir(self.versions_dir)
        for s, dest in staged:
            os.replace(s, dest)
        fsync_dir(self.aliases_dir)
        fsync_dir(self.root)

    # ---- aliases ------------------------------------------------------------------------------------------------
    def promote(self, spec: str | int, alias: str, reason: str | None = None, *, policy: Any = _UNSET,
                allow_drift: bool = False) -> int:
        """Point `alias` at a pair (after re-verifying both halves): the drafter `spec` (a version or an alias,
        whose pair it copies) with its own policy, or with `policy` (a policy version, None = the base model),
        which must be the drafter's own unless allow_drift. Returns the drafter version."""
        _check_alias_name(alias)
        v, own = self.resolve_pair(spec)
        m = self.manifest(v)
        if manifest_kind(m) != DRAFTER:
            raise RegistryError(f"version {v} is a {manifest_kind(m)}: an alias names a pair by its drafter; promote "
                                f"a drafter trained against it (its manifest's `policy` is {v})")
        p = own if policy is _UNSET else policy
        if p != manifest_policy(m) and not allow_drift:
            raise RegistryError(
                f"drafter {v} was trained against {_policy_name(manifest_policy(m))}, not {_policy_name(p)}; pairing "
                "it with another policy (drift) lowers acceptance: publish a drafter trained against that policy, or "
                "pass --allow-drift to pair them anyway")
        if p is not None:
            self._check_policy_for(p, m["family_fingerprint"], f"drafter {v}")
            self.verify_or_raise(p)
        self.verify_or_raise(v)  # a corrupted version must never become what a server follows
        try:
            with self._lock():
                for x in (v, p):
                    if x is not None and not self._exists(x):
                        raise self._unknown_version(x)
                doc = self._read_alias(alias)
                if doc is None or (doc["version"], doc.get("policy", _UNSET)) != (v, p):
                    self._replace_json(self._alias_path(alias), _moved(doc, v, reason or f"promote {spec}", policy=p))
        except OSError as e:
            raise _os_error(e, f"moving alias {alias!r}", self.root) from e
        return v

    def rollback(self, alias: str, reason: str | None = None) -> int:
        """Return `alias` to the target it had before its last move. Returns the version it now points to."""
        try:
            with self._lock():
                doc = self._read_alias(alias)
                if doc is None:
                    raise self._unknown_alias(alias)
                back = _rollback_target(doc["history"])
                if back is None:
                    raise RegistryError(f"alias {alias!r} ({self._alias_path(alias)}) has no earlier target to roll "
                                        f"back to; point it somewhere with `understudy drafters promote VERSION {alias}`")
                target = back[0]
                policy = self.pair_policy(target, back[1]) if self._exists(target) else None
                for x in (target, policy):
                    if x is not None and not self._exists(x):
                        raise RegistryError(f"cannot roll {alias!r} back to the pair (drafter {target}, "
                                            f"{_policy_name(policy)}): version {x} is no longer in "
                                            f"{self.versions_dir}; promote an existing version instead")
                    if x is not None:
                        self.verify_or_raise(x)
                why = reason or f"rollback from {doc['version']}"
                self._replace_json(self._alias_path(alias), _moved(doc, target, why, action="rollback", policy=policy))
        except OSError as e:
            raise _os_error(e, f"rolling back alias {alias!r}", self.root) from e
        return target

    # ---- retention ----------------------------------------------------------------------------------------------
    def protected(self, history_window: int) -> set[int]:
        """Versions an alias reaches: the one it points to, the one `rollback` would return it to, and those it
        pointed to within its last `history_window` moves."""
        pairs: set[tuple[int, Any]] = set()
        for name in self.alias_names():
            doc = self._read_alias(name)  # a malformed alias file aborts gc: never delete what may be aliased
            if doc is None:
                continue
            pairs.add(_pair_of(doc))
            back = _rollback_target(doc["history"])
            if back is not None:
                pairs.add(back)
            if history_window > 0:
                pairs.update(_pair_of(h) for h in doc["history"][-history_window:])
        keep = {d for d, _ in pairs}
        keep.update(p for _, p in pairs if isinstance(p, int))
        return keep

    def gc(self, keep_last: int = KEEP_LAST, history_window: int = HISTORY_WINDOW, dry_run: bool = False, *,
           tmp_max_age_s: float = TMP_MAX_AGE_S, keep: Collection[int] = ()) -> list[int]:
        """Delete versions that are neither among the newest `keep_last`, nor reached by an alias (see protected),
        nor in `keep`; and what dead processes left in .tmp/ (see _sweep_tmp). Returns the versions removed (or,
        with dry_run, that would be; dry_run changes nothing)."""
        _check_retention(keep_last, history_window)
        if tmp_max_age_s < 0:
            raise RegistryError(f"gc needs tmp_max_age_s >= 0 (got {tmp_max_age_s})")
        removed: list[int] = []
        dead: list[Path] = []
        try:
            with self._lock():
                nums = self.version_numbers()
                spared = set(nums[-keep_last:]) | self.protected(history_window) | set(keep)
                spared |= self._policies_of(spared)  # a kept drafter keeps its policy
                doomed = [v for v in nums if v not in spared]
                if dry_run:
                    return doomed
                self._sweep_tmp(tmp_max_age_s)
                for v in doomed:  # out of versions/ in one rename each: readers see a version whole or not at all
                    dead.append(self.tmp_dir / f"delete-{v:06d}-{secrets.token_hex(4)}")
                    os.rename(self._vdir(v), dead[-1])
                    removed.append(v)
                fsync_dir(self.versions_dir)
        except OSError as e:
            raise _os_error(e, f"gc (removed so far: {removed or 'none'})", self.root, unchanged=not removed) from e
        finally:
            for d in dead:  # the slow part, outside the lock (a later gc sweeps anything left)
                shutil.rmtree(d, ignore_errors=True)
        return removed

    def _policies_of(self, versions: set[int]) -> set[int]:
        out = set()
        for v in versions:
            try:
                p = manifest_policy(self.manifest(v))
            except RegistryError:
                continue
            if p is not None:
                out.add(p)
        return out

    def _sweep_tmp(self, max_age_s: float) -> list[str]:
        """Called under the lock: remove what dead processes left in .tmp/. Returns the names removed.

        - an entry with a lock file (a publisher's folder, ENTRY.lock): once nobody holds that lock;
        - staged files (stage-*) and gc's delete-* folders: at once (they live only while their writer holds the
          registry lock, which we hold, or are being deleted anyway);
        - anything else (a lock file we may not open, leftovers of older versions, stray files): once its mtime
          is max_age_s old;
        - NFS's silly-renamed .nfs* files: never (the NFS client removes them when their last user closes them).
        """
        try:
            names = set(os.listdir(self.tmp_dir))
        except FileNotFoundError:
            return []
        now, gone = time.time(), []
        for name in sorted(names):
            if name.startswith(".nfs") or (name.endswith(".lock") and name[:-5] in names):
                continue  # a lock file is judged with the entry it guards
            lock = name if name.endswith(".lock") else f"{name}.lock"
            free = try_lock(self.tmp_dir / lock) if lock in names else None
            if free is False:
                continue  # a live owner
            if free is None and not name.startswith(("stage-", "delete-")) and not self._older(name, now, max_age_s):
                continue
            log.info("removing stale temp entry %s", self.tmp_dir / name)
            _remove(self.tmp_dir / name)
            if lock != name and lock in names:
                _remove(self.tmp_dir / lock)
            gone.append(name)
        return gone

    def _older(self, name: str, now: float, max_age_s: float) -> bool:
        try:
            return now - os.lstat(self.tmp_dir / name).st_mtime >= max_age_s
        except FileNotFoundError:
            return False


def _policy_name(p: int | None) -> str:
    return "the base model" if p is None else f"policy version {p}"


def _check_retention(keep_last: int, history_window: int) -> None:
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1 or \
            isinstance(history_window, bool) or not isinstance(history_window, int) or history_window < 0:
        raise RegistryError(f"gc needs keep_last >= 1 and history_window >= 0 (got {keep_last!r}, {history_window!r})")
