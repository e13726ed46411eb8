"""Poll-based change feed over a registry: new versions and alias moves, a move being a change of either half of
the pair an alias names (the server's hot-swap source)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from understudy.registry.store import Event, Registry, RegistryError, default_registry_path

log = logging.getLogger(__name__)

# ---- the watcher ----------------------------------------------------------------------------------------------
class RegistryWatcher:
    """Poll-based change feed for the server: new versions and alias moves, from a cheap directory snapshot.

    Each poll() lists versions/ (stat'ing only new names) and stats aliases/*.json, reading an alias file only
    when its (mtime, size, inode) changed (os.replace gives every write a new inode). No threads: call poll()
    from a loop or use watch().
    """

    def __init__(self, registry: Registry | str | Path | None = None, include_existing: bool = False) -> None:
        self.registry = registry if isinstance(registry, Registry) else Registry(
            (Path(registry).expanduser() if registry else default_registry_path()).absolute())
        self._versions: set[int] = set()
        self._alias_keys: dict[str, tuple[int, int, int]] = {}
        self._alias_targets: dict[str, tuple[int, int | None]] = {}  # alias -> (drafter, policy)
        if not include_existing:
            self.poll()  # the present state is the baseline

    def poll(self) -> list[Event]:
        """New versions (oldest first), then alias moves; a version is always reported before an alias to it."""
        events = self._poll_versions()
        moves = self._poll_aliases()
        late = sorted(v for v in {e.version for e in moves} - self._versions if self.registry._exists(v))
        self._versions.update(late)
        return events + [Event("version", v) for v in late] + moves

    def _poll_versions(self) -> list[Event]:
        reg = self.registry
        try:
            names = os.listdir(reg.versions_dir)
        except FileNotFoundError:
            names = []
        now = {int(n) for n in names if n.isdigit()}
        new = sorted(v for v in now - self._versions if reg._exists(v))
        self._versions = (self._versions & now) | set(new)
        return [Event("version", v) for v in new]

    def _poll_aliases(self) -> list[Event]:
        events, seen = [], set()
        try:
            entries = [e for e in os.scandir(self.registry.aliases_dir) if e.name.endswith(".json")]
        except FileNotFoundError:
            entries = []
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name[:-5]
            seen.add(name)
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._alias_keys.get(name) == key:
                continue
            try:
                doc = self.registry._read_alias(name)
            except RegistryError as e:
                log.warning("watcher: %s", e)
                continue  # retried on the next poll
            self._alias_keys[name] = key
            pair = (doc["version"], doc.get("policy")) if doc is not None else None
            if pair is not None and pair != self._alias_targets.get(name):
                prev = self._alias_targets.get(name)
                events.append(Event("alias", pair[0], name, prev[0] if prev else None, policy=pair[1]))
                self._alias_targets[name] = pair
        for gone in set(self._alias_keys) - seen:
            self._alias_keys.pop(gone)
            self._alias_targets.pop(gone, None)
        return events

    def watch(self, interval_s: float = 1.0, stop: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Yield events as they appear, polling every interval_s seconds until stop() returns True."""
        while stop is None or not stop():
            yield from self.poll()
            time.sleep(interval_s)
