"""The child processes of `understudy demo`: each one in its own process group (so a stop reaches its own
children, e.g. the data workers of `drafter train`), logged to a file, stopped on any exit of the demo (a
finished run, a failing phase, Ctrl-C or SIGTERM); the Locust load that runs beside the training; and the
server's swap records, polled from the admin API (it shows only its newest 20).

Every child carries UNDERSTUDY_DEMO_RUN=<the run's folder> in its environment (and passes it on to its own
children), so a left-over process of a run can be found by that marker (`leftover_processes`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from understudy.errors import UnderstudyError

ROOT = Path(__file__).resolve().parents[2]  # the checkout: the demo drives its loadtests/
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
LOADTEST_REPORT = ROOT / "loadtests" / "report.py"
MARKER_ENV = "UNDERSTUDY_DEMO_RUN"
# what children may inherit from UNDERSTUDY_*: the model cache; the rest (a server flag such as
# UNDERSTUDY_NUM_SPECULATIVE_TOKENS, a registry, keys) would change what the demo measures
KEEP_ENV = ("UNDERSTUDY_CACHE", "UNDERSTUDY_DEBUG")


class DemoError(UnderstudyError):
    """A phase of the demo failed; the message names the phase, its log file and what to do."""


def child_env(marker: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNDERSTUDY_") or k in KEEP_ENV}
    env.update({MARKER_ENV: marker, "PYTHONUNBUFFERED": "1", **(extra or {})})
    return env


def tail(path: Path, n: int = 15) -> str:
    """The last n non-empty lines of a log (progress bars' carriage returns read as line ends)."""
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return f"(no log at {path})"
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-n:])[-4000:]


class Children:
    """Start, wait for and stop the demo's child processes; `stop_all` leaves none behind."""

    def __init__(self, logs: Path, cwd: Path, marker: str) -> None:
        self.logs, self.cwd, self.marker = logs, cwd, marker
        self.logs.mkdir(parents=True, exist_ok=True)
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._lock = threading.Lock()
        self.record: list[dict[str, Any]] = []  # every child started: name, pid, command, exit status

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None,
              stdout: Path | None = None) -> subprocess.Popen[bytes]:
        """Start `cmd` in a new session; stderr (and stdout, unless `stdout` names a file for it) go to the log."""
        log = self.log_path(name)
        with open(log, "ab") as fh, open(stdout or os.devnull, "wb") as out:
            fh.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=self.cwd, env=child_env(self.marker, env),
                                    stdout=out if stdout else fh, stderr=fh, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        with self._lock:
            self._procs.append((name, proc))
            self.record.append({"name": name, "pid": proc.pid, "command": cmd[:12], "log": str(log),
                                "started": time.time(), "returncode": None})
        return proc

    def wait(self, name: str, proc: subprocess.Popen[bytes], timeout_s: float | None = None) -> int:
        """Wait for `proc` (in short sleeps, so that Ctrl-C and SIGTERM reach the demo at once); a child past
        `timeout_s` is stopped and fails its phase."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                self.stop(proc)
                raise DemoError(f"{name} ran past its time limit ({timeout_s:.0f} s) and was stopped; see "
                                f"{self.log_path(name)} (a loaded machine: give the demo more --minutes)")
            time.sleep(0.2)
        self._sweep(proc)
        self._note_exit(proc)
        return int(proc.returncode)

    def run(self, name: str, cmd: list[str], timeout_s: float | None = None, env: dict[str, str] | None = None,
            what: str = "", stdout: Path | None = None) -> Path:
        """Run one command to its end; a non-zero exit fails the phase, quoting the end of its log."""
        proc = self.start(name, cmd, env, stdout)
        rc = self.wait(name, proc, timeout_s)
        log = self.log_path(name)
        if rc != 0:
            raise DemoError(f"{what or name} failed: `{' '.join(cmd[2:6])} ...` exited with status {rc}; the end of "
                            f"{log}:\n{tail(log)}")
        return log

    def stop(self, proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
        """SIGTERM to the child's process group, then SIGKILL after `grace_s`."""
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(10)
        self._sweep(proc)
        self._note_exit(proc)

    def stop_all(self, grace_s: float = 30.0) -> None:
        with self._lock:
            procs = [p for _, p in reversed(self._procs)]
        for proc in procs:
            self.stop(proc, grace_s)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _sweep(self, proc: subprocess.Popen[bytes]) -> None:
        """A child that exited may leave its own children in its group (daemon workers): they go too."""
        self._signal(proc, signal.SIGKILL)

    def _note_exit(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            for r in self.record:
                if r["pid"] == proc.pid and r["returncode"] is None:
                    r["returncode"], r["ended"] = proc.returncode, time.time()


def leftover_processes(marker: str) -> list[int]:
    """Pids of live processes (not zombies) whose environment carries this run's marker, other than this one."""
    found = []
    needle = f"{MARKER_ENV}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


# ---- the load ---------------------------------------------------------------------------------------------------
class LoadDriver(threading.Thread):
    """Locust, headless, against the server until `finish()`: one run up to `until` (unix time), and further
    runs while the caller has not finished (a phase ran past its plan). Each run is time-bounded (-t) and
    lets the streams open at its end complete (--stop-timeout); the runs append to one events file."""

    def __init__(self, children: Children, locustfile: Path, url: str, api_key: str, users: int, max_tokens: int,
                 prompts: Path, events: Path, until: float, min_run_s: float = 30.0, name: str = "locust") -> None:
        super().__init__(name=f"demo-{name}", daemon=True)
        self.children, self.locustfile, self.url, self.api_key = children, locustfile, url, api_key
        self.users, self.max_tokens, self.prompts, self.events = users, max_tokens, prompts, events
        self.until, self.min_run_s, self.label = until, min_run_s, name
        self.finishing = threading.Event()
        self.aborted = threading.Event()
        self.runs: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def command(self, seconds: int, n: int) -> list[str]:
        return [sys.executable, "-m", "locust", "-f", str(self.locustfile), "--headless", "--only-summary",
                "--loglevel", "WARNING", "-u", str(self.users), "-r", str(self.users), "-t", f"{seconds}s",
                "--stop-timeout", "180", "--host", self.url, "--max-tokens", str(self.max_tokens),
                "--temperature", "0", "--prompts-file", str(self.prompts), "--events-file", str(self.events),
                "--csv", str(self.events.with_name(f"{self.label}-{n}")), "ChatStreamUser"]

    def run(self) -> None:
        n = 0
        try:
            while not self.aborted.is_set():
                seconds = max(self.min_run_s, self.until - time.time())
                proc = self.children.start(f"{self.label}-{n}", self.command(round(seconds), n),
                                           {"UNDERSTUDY_API_KEY": self.api_key})
                started = time.time()
                rc = self.children.wait(f"{self.label}-{n}", proc)
                self.runs.append({"run": n, "seconds_planned": round(seconds), "started": started,
                                  "ended": time.time(), "returncode": rc})
                n += 1
                if self.finishing.is_set():
                    return
        except BaseException as e:  # reported by finish(): the demo fails with it
            self.error = e

    def finish(self, timeout_s: float) -> None:
        """No further run once the current one ends; wait for it."""
        self.finishing.set()
        self.join(timeout_s)
        if self.is_alive():
            raise DemoError(f"Locust ({self.label}) did not stop within {timeout_s:.0f} s of its planned end; see "
                            f"{self.children.logs}")
        if self.error is not None:
            raise DemoError(f"the Locust driver failed: {self.error}") from self.error

    def abort(self) -> None:
        self.aborted.set()
        self.finishing.set()


def run_locust_once(children: Children, locustfile: Path, url: str, api_key: str, users: int, max_tokens: int,
                    prompts: Path, events: Path, seconds: float, name: str) -> dict[str, Any]:
    """One bounded Locust run (the speculation on / off measurements), in the calling thread."""
    drv = LoadDriver(children, locustfile, url, api_key, users, max_tokens, prompts, events, time.time() + seconds,
                     min_run_s=seconds, name=name)
    drv.finishing.set()
    drv.run()  # in this thread: Ctrl-C reaches it
    if drv.error is not None:
        raise drv.error
    return drv.runs[0]


# ---- the server's swap records ----------------------------------------------------------------------------------
class SwapPoller(threading.Thread):
    """Polls /admin/drafter every `every_s` seconds and keeps every swap record it has seen (the server's own
    list holds the newest 20), in order, without duplicates."""

    def __init__(self, fetch: Callable[[], dict[str, Any]], every_s: float = 2.0) -> None:
        super().__init__(name="demo-swap-poller", daemon=True)
        self.fetch, self.every_s = fetch, every_s
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._seen: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.last_state: dict[str, Any] | None = None
        self.errors = 0
        self.last_error: str | None = None

    def poll_once(self) -> None:
        try:
            state = self.fetch()
        except Exception as e:  # the server is busy or restarting: the next poll catches up
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            return
        with self._lock:
            self.last_state = state
            for rec in state.get("history") or []:
                key = (rec.get("at"), rec.get("to_version"), rec.get("from_version"), rec.get("result"))
                self._seen.setdefault(key, dict(rec))

    def run(self) -> None:
        while not self.stop_event.wait(self.every_s):
            self.poll_once()

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(30)

    def swaps(self) -> list[dict[str, Any]]:
        with self._lock:
            return sorted(self._seen.values(), key=lambda r: r.get("at") or 0.0)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
