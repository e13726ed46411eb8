"""The vLLM backend: vLLM's OpenAI server as a managed subprocess behind our front door, hot-swapped blue/green.

Serving: one *active* vLLM process (vllm_process.py) serves the target folder with the current drafter exported
to vLLM's `eagle` layout; the proxy (server/routes_vllm.py) leases it per request, counting requests in flight.

Hot swap (`VllmSwapManager`, same rules as the native `HotSwapManager`: the registry's alias events and admin
commands, family + checksum validation, failures keep the old pair, canary). Two ways, chosen per swap:
- **in place** (the default, `--vllm-swap in-place`), whenever the running process can take the new pair: same
  shapes (a pair's policy is of the target's family, so always) and speculation on both sides or on neither. Our
  worker extension (vllm_worker_ext.py) loads the new weights into the running vLLM through its `/collective_rpc`,
  between `/pause` and `/resume`. A drafter-only swap pauses with mode "keep": requests in flight stay in vLLM's
  queue and continue with the new drafter (speculation is lossless, so their output does not change), and the
  stall is the load itself. A policy swap drains first, as the native engine does: new requests wait at the proxy
  until every request in flight has finished on the old weights, then vLLM pauses (clearing its prefix cache,
  which holds the old weights' KV), loads, and resumes. Either way the process keeps its KV cache allocation,
  compiled state and port: no second process, no start-up.
- **blue/green** otherwise (speculation switched on or off, or `--vllm-swap blue-green`): export the new version,
  start a second ("green") vLLM with it, wait until its /health is OK, switch the proxy's target atomically, then
  let the requests in flight on the old ("blue") process finish and stop it.
A version is reported (header, metrics, admin API) only once it serves; the header of each response names the
pair of the process that served it, as it was when the response started.

Metrics: the proxy measures requests, TTFT, inter-chunk latency and e2e from the SSE stream; the active process's
spec-decode, token and queue counters are scraped from its /metrics and re-exported under `understudy:` names
(deltas, so they stay monotonic across swaps). The canary is fed from the same scrapes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import re
import shlex
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from safetensors import SafetensorError

from understudy.drafter.export import export_vllm
from understudy.drafter.format import DrafterError
from understudy.engine.config import ConfigError, ModelConfig, family_fingerprint
from understudy.engine.loader import (
    ModelLoadError,
    cache_dir,
    load_tokenizer,
    read_hf_config,
    resolve_model_path,
    tokenizer_digest,
)
from understudy.fsutil import remove_folder
from understudy.registry.store import Registry
from understudy.server.backends import open_registry
from understudy.server.backends.vllm_process import (
    WORKER_EXT,
    VllmError,
    VllmLaunch,
    VllmProcess,
    free_port,
    resolve_vllm_python,
)
from understudy.server.errors import APIError
from understudy.server.hotswap import SwapManager, SwapRecord, _Served, choose_initial_drafter
from understudy.server.metrics import ServerMetrics
from understudy.server.scheduler import Draining, Overloaded
from understudy.server.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetInfo:
    """The target as the front door needs it (no weights in this process: vLLM holds them)."""

    path: Path  # the HF safetensors folder vLLM serves
    config: ModelConfig
    tokenizer: Any
    fingerprint: str  # family fingerprint, identical to loader.load_model's


def describe_target(spec: str) -> TargetInfo:
    folder = resolve_model_path(spec)
    try:
        cfg = ModelConfig.from_hf(read_hf_config(folder))
    except (KeyError, TypeError, ConfigError) as e:
        raise ModelLoadError(f"{folder / 'config.json'}: {e}; it is not a Llama-family config") from e
    tok = load_tokenizer(folder)
    return TargetInfo(folder, cfg, tok, family_fingerprint(cfg, tokenizer_digest(tok)))


class ProxyAdmission:
    """Admission at the proxy (vLLM does the scheduling): 429 beyond `max_in_flight`, 503 while draining."""

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.draining = False
        self.in_flight = 0  # changed on the event loop only

    def enter(self, n: int = 1) -> None:
        """Admit a request that starts n sequences (n choices x prompts), counted as the native scheduler does."""
        if self.draining:
            raise Draining("the server is shutting down")
        if self.in_flight + n > self.max_in_flight:
            raise Overloaded(f"{self.in_flight} sequences in flight, this request adds {n} "
                             f"(limit {self.max_in_flight})")
        self.in_flight += n

    def exit(self, n: int = 1) -> None:
        self.in_flight -= n


# ---- the processes -----------------------------------------------------------------------------------------------
class VllmBackend:
    """The vLLM processes: the active one the proxy leases, and the retiring ones still finishing requests."""

    def __init__(self, launch: VllmLaunch, metrics: ServerMetrics, port: int = 0, startup_timeout_s: float = 600.0,
                 retire_timeout_s: float = 600.0, root: Path | None = None, in_place: bool = False) -> None:
        self.metrics = metrics
        self.startup_timeout_s, self.retire_timeout_s = startup_timeout_s, retire_timeout_s
        base = root or cache_dir() / "vllm"
        self.run_dir = base / f"run-{os.getpid()}-{int(time.time())}"  # exported drafters (removed at stop)
        self.log_dir = base / "logs"  # vLLM logs (kept)
        if in_place:  # the worker extension, under the module name vLLM's interpreter imports it by
            ext_dir = self.run_dir / "worker_ext"
            ext_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(__file__).with_name("vllm_worker_ext.py"),
                            ext_dir / (WORKER_EXT.split(".")[0] + ".py"))
            launch = dataclasses.replace(launch, worker_ext_dir=ext_dir)
        self.launch = launch
        self._held = False  # an in-place policy swap holds new leases (see lease())
        self._exports: list[Path] = []  # exported drafter folders still on disk, oldest first
        self.active: VllmProcess | None = None
        self.retiring: list[VllmProcess] = []
        self._procs: set[VllmProcess] = set()  # every process started and not yet stopped (starting ones too)
        self._ports = itertools.cycle([port, port + 1]) if port else None  # blue/green alternate
        self._count = itertools.count(1)
        self._lock = threading.Lock()
        self._scrape_lock = threading.Lock()
        self._closing = threading.Event()

    # ---- processes ------------------------------------------------------------------------------------------
    KEEP_EXPORTS = 2  # exported drafters kept besides those a process uses (a server may follow a trainer for days)

    def export(self, label: str, src: Path) -> Path:
        """The drafter folder `src` in vLLM's eagle layout, under this run's cache folder. Older exports that no
        process (starting, active or retiring) uses are removed, beyond the newest KEEP_EXPORTS."""
        out = self.run_dir / "drafters" / re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[-80:]
        try:
            export_vllm(src, out)
        except (KeyError, SafetensorError, OSError, ValueError) as e:
            raise DrafterError(f"{src}: cannot export it to vLLM's eagle layout ({type(e).__name__}: {e}); "
                               "re-publish or re-train the drafter") from e
        self._prune_exports(out)
        return out

    def _prune_exports(self, new: Path) -> None:
        with self._lock:
            self._exports = [p for p in self._exports if p != new] + [new]  # oldest first
            used = {p.drafter_dir for p in self._procs}
            doomed = [p for p in self._exports[:-self.KEEP_EXPORTS] if p not in used]
            self._exports = [p for p in self._exports if p not in doomed]
        for p in doomed:
            try:
                remove_folder(p)
            except OSError as e:  # the new export is fine: only an old one stays behind
                log.warning("could not remove the old vLLM drafter export %s (%s)", p, e)

    def spawn(self, label: str, drafter_dir: Path | None, model_dir: Path | None = None,
              policy: str = "base") -> VllmProcess:
        """Start a vLLM process (serving `model_dir`, default the launch's target: a pair's policy changes it) and
        wait until it is healthy (raises VllmError naming its log file)."""
        port = next(self._ports) if self._ports else free_port(self.launch.host)
        n = next(self._count)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.launch.served_model_name}-{os.getpid()}-{n}-{label}")
        launch = self.launch if model_dir is None else dataclasses.replace(self.launch, model_dir=model_dir)
        proc = VllmProcess(launch, port, label, drafter_dir, self.log_dir / f"vllm-{name[-100:]}.log", policy)
        with self._lock:
            if self._closing.is_set():
                raise VllmError("the server is shutting down: not starting another vLLM process")
            self._procs.add(proc)
            proc.start()
        try:
            proc.wait_healthy(self.startup_timeout_s, cancel=self._closing)
        except BaseException:
            self._stop(proc)
            raise
        log.info("vLLM (drafter %s) healthy after %.1f s", label, proc.started_s or 0.0)
        return proc

    def switch(self, new: VllmProcess) -> VllmProcess | None:
        """Make `new` the proxy's target (atomic for lease()); the old one starts retiring in the background."""
        with self._lock:
            old, self.active = self.active, new
            if old is not None:
                self.retiring.append(old)
        if old is not None:
            threading.Thread(target=self._retire, args=(old,), name=f"vllm-retire-{old.port}", daemon=True).start()
        return old

    def _retire(self, old: VllmProcess) -> None:
        deadline = time.monotonic() + self.retire_timeout_s
        while old.in_flight > 0 and time.monotonic() < deadline and not self._closing.is_set():
            time.sleep(0.05)
        if old.in_flight:
            log.warning("stopping vLLM (drafter %s) with %d requests still in flight", old.label, old.in_flight)
        self.scrape(old)  # its last counts, before it goes
        self._stop(old)
        with self._lock:
            if old in self.retiring:
                self.retiring.remove(old)

    def _stop(self, proc: VllmProcess) -> None:
        proc.stop()
        with self._lock:
            self._procs.discard(proc)

    def lease(self) -> VllmProcess | None:
        """The active process for one request (release() it when the request is done); None while an in-place
        policy swap holds new requests (acquire() waits that out)."""
        with self._lock:
            if self._held:
                return None
            proc = self.active
            if proc is None or not proc.alive:
                log_hint = f"; see {proc.log_path}" if proc is not None else ""
                log.error("the active vLLM process is not running%s", log_hint)
                raise APIError(503, "the vLLM backend is not running", "service_unavailable",
                               code="backend_unavailable", headers={"Retry-After": "5"})
            proc.in_flight += 1
            return proc

    async def acquire(self) -> VllmProcess:
        """lease(), waiting while an in-place policy swap drains and loads (that wait is the swap's stall)."""
        while (proc := self.lease()) is None:
            await asyncio.sleep(0.005)
        return proc

    def release(self, proc: VllmProcess) -> None:
        with self._lock:
            proc.in_flight -= 1

    # ---- in-place swaps -----------------------------------------------------------------------------------------
    def can_swap_in_place(self, drafter_dir: Path | None) -> bool:
        """Whether the active process can take a pair with this drafter without a restart: it runs our worker
        extension, and speculation stays on (or off) across the swap (vLLM's speculative config is fixed at
        start-up). Drafter shapes need no check: one target family exports one drafter shape."""
        proc = self.active
        return (self.launch.worker_ext_dir is not None and proc is not None and proc.alive
                and (proc.drafter_dir is None) == (drafter_dir is None))

    def swap_in_place(self, label: str, drafter_dir: Path | None, policy_label: str, model_dir: Path,
                      drain_timeout_s: float) -> dict[str, float]:
        """Load a new pair into the active process; returns {"drain_s", "load_s", "stall_s"}.

        A new policy: hold new leases, wait until every request in flight has finished (at most drain_timeout_s:
        past that the swap fails and nothing changed), pause vLLM clearing its caches, load the target (and the
        drafter), resume, then report the new pair and release the hold. A new drafter only: pause with mode
        "keep" (requests in flight wait in vLLM and go on with the new drafter), load, resume. If a load fails
        half-way, the old pair's weights are loaded back; if even that fails the process is replaced by a fresh
        one on the old pair, so a half-loaded model never serves."""
        proc = self.active
        assert proc is not None
        new_policy = policy_label != proc.policy_label or model_dir != proc.model_dir
        new_drafter = drafter_dir is not None and drafter_dir != proc.drafter_dir
        t0 = time.monotonic()
        drain_s = 0.0
        try:
            if new_policy:
                with self._lock:
                    self._held = True
                while proc.in_flight > 0:
                    if time.monotonic() - t0 > drain_timeout_s or self._closing.is_set():
                        raise VllmError(f"{proc.in_flight} requests still in flight after {drain_timeout_s:.0f} s "
                                        "(--request-timeout): the policy swap gave up; the old pair keeps serving")
                    time.sleep(0.005)
                drain_s = time.monotonic() - t0
            t1 = time.monotonic()
            with httpx.Client(timeout=httpx.Timeout(drain_timeout_s, connect=10.0), trust_env=False) as http:
                mode = "wait" if new_policy else "keep"
                self._post(http, proc, f"/pause?mode={mode}&clear_cache={'true' if new_policy else 'false'}")
                try:
                    self._load_pair(http, proc, model_dir if new_policy else None,
                                    drafter_dir if new_drafter or (new_policy and drafter_dir) else None)
                except Exception as e:
                    self._restore(http, proc, new_policy, e)
                    raise
                finally:
                    if proc.alive:
                        self._post(http, proc, "/resume")
            load_s = time.monotonic() - t1
            with self._lock:
                proc.label, proc.drafter_dir, proc.policy_label, proc.model_dir = label, drafter_dir, policy_label, \
                    model_dir
        finally:
            with self._lock:
                self._held = False
        return {"drain_s": drain_s, "load_s": load_s, "stall_s": time.monotonic() - t0}

    def _load_pair(self, http: httpx.Client, proc: VllmProcess, model_dir: Path | None,
                   drafter_dir: Path | None) -> None:
        # the target first: a drafter shares its embedding and LM head, which then already hold the new weights
        if model_dir is not None:
            self._rpc(http, proc, "understudy_load_target", str(model_dir))
        if drafter_dir is not None:
            self._rpc(http, proc, "understudy_load_drafter", str(drafter_dir))

    def _restore(self, http: httpx.Client, proc: VllmProcess, new_policy: bool, why: Exception) -> None:
        """After a failed load: the old pair's weights back into the process, or a fresh process on the old pair."""
        log.error("in-place load into vLLM (pid %s) failed (%s); restoring pair (drafter %s, policy %s)", proc.pid,
                  why, proc.label, proc.policy_label)
        try:
            self._load_pair(http, proc, proc.model_dir if new_policy else None, proc.drafter_dir)
            return
        except Exception as e:  # the process may hold a mix of two versions: never serve from it again
            log.error("restoring the old weights failed too (%s): starting a fresh vLLM on the old pair", e)
        fresh = self.spawn(proc.label, proc.drafter_dir, model_dir=proc.model_dir, policy=proc.policy_label)
        self.switch(fresh)

    @staticmethod
    def _post(http: httpx.Client, proc: VllmProcess, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            r = http.post(f"{proc.url}{path}", json=body)
        except httpx.HTTPError as e:
            raise VllmError(f"vLLM (pid {proc.pid}) {path}: {type(e).__name__}: {e}; see {proc.log_path}") from e
        if r.status_code != 200:
            raise VllmError(f"vLLM (pid {proc.pid}) {path} answered {r.status_code}: {r.text[:500]}; see "
                            f"{proc.log_path}")
        return r.json() if r.content else None

    def _rpc(self, http: httpx.Client, proc: VllmProcess, method: str, *args: str) -> Any:
        """One method of our worker extension on every vLLM worker (vLLM passes string arguments only)."""
        return self._post(http, proc, "/collective_rpc", {"method": method, "args": list(args)})

    def begin_close(self) -> None:
        """No new processes from now on; a start-up in progress gives up (and stops its process)."""
        self._closing.set()

    def stop_all(self) -> None:
        """Stop every process this backend started: active, retiring, and any still starting."""
        self.begin_close()
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            self._stop(p)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # ---- metrics ----------------------------------------------------------------------------------------------
    def scrape(self, proc: VllmProcess | None = None) -> dict[str, float]:
        """Add one process's counter deltas (default: the active one's) to our metrics; return them."""
        proc = proc or self.active
        if proc is None or not proc.alive:
            return {}
        with self._scrape_lock:
            deltas = proc.scrape()
            self._absorb(deltas)
            live = [p for p in [self.active, *self.retiring] if p is not None]
            self.metrics.set_queue(int(sum(p.gauges.get("vllm:num_requests_running", 0) for p in live)),
                                   int(sum(p.gauges.get("vllm:num_requests_waiting", 0) for p in live)))
        return deltas

    def _absorb(self, d: dict[str, float]) -> None:
        m, name = self.metrics, self.metrics.model_name
        pairs = [(m.num_drafts, "vllm:spec_decode_num_drafts_total"),
                 (m.num_draft_tokens, "vllm:spec_decode_num_draft_tokens_total"),
                 (m.num_accepted, "vllm:spec_decode_num_accepted_tokens_total"),
                 (m.prompt_tokens, "vllm:prompt_tokens_total"), (m.generation_tokens, "vllm:generation_tokens_total")]
        for counter, key in pairs:
            if d.get(key):
                counter.labels(name).inc(d[key])
        for key, v in d.items():
            if key.startswith("vllm:spec_decode_num_accepted_tokens_per_pos_total|"):
                m.accepted_per_pos.labels(name, key.rsplit("|", 1)[1]).inc(v)

    def describe(self) -> dict[str, Any]:
        def one(p: VllmProcess) -> dict[str, Any]:
            return {"drafter_version": p.label, "policy_version": p.policy_label, "pid": p.pid, "url": p.url, "alive": p.alive,
                    "in_flight": p.in_flight, "log": str(p.log_path), "started_s": p.started_s}

        with self._lock:
            return {"active": one(self.active) if self.active else None, "retiring": [one(p) for p in self.retiring]}


# ---- hot swap ----------------------------------------------------------------------------------------------------
class VllmSwapManager(SwapManager):
    """HotSwapManager's rules; a swap loads the new pair into the running vLLM process when it can (in place), else
    starts a new process with it (the policy's weights as its model, the drafter exported for vLLM) and switches
    to it once healthy, while the old process finishes what it holds (blue/green)."""

    SCRAPE_EVERY_S = 1.0

    def __init__(self, backend: VllmBackend, fingerprint: str, metrics: ServerMetrics, registry: Registry | None,
                 drain_timeout_s: float = 600.0, **kw: Any) -> None:
        super().__init__(fingerprint, metrics, registry, **kw)
        self.backend = backend
        self.drain_timeout_s = drain_timeout_s
        self._next_scrape = 0.0
        self._last: tuple[str, dict[str, float] | None] = ("", None)  # how the last swap went (for its record)

    def _load(self, version: int, target: Path | None) -> Path:
        assert self.registry is not None
        _, src = self.registry.checkout(version, self.fingerprint)  # family + sha256 of every file
        return self.backend.export(str(version), src)

    def _load_policy(self, policy: int | None) -> Path | None:
        """The folder vLLM loads as its model: the base model's (None) or the policy version's, verified."""
        assert self.registry is not None
        return None if policy is None else self.registry.checkout_policy(policy, self.fingerprint)

    def _install(self, new: _Served) -> None:  # slow; raises (the old pair keeps serving) if it cannot
        if self.backend.can_swap_in_place(new.drafter):
            model_dir = new.target if new.target is not None else self.backend.launch.model_dir
            timings = self.backend.swap_in_place(new.label, new.drafter, new.policy_label, model_dir,
                                                 self.drain_timeout_s)
            self._last = ("in place", timings)
            return
        proc = self.backend.spawn(new.label, new.drafter, model_dir=new.target, policy=new.policy_label)
        self.backend.switch(proc)
        self._last = ("blue/green", None)

    def _after_swap(self, rec: SwapRecord) -> None:
        how, timings = self._last
        if timings is not None:
            rec.stall_s = round(timings["stall_s"], 4)
            rec.reason += f" (in place: {timings['load_s']:.2f} s load"
            if rec.to_policy != rec.from_policy:
                rec.drain_s = round(timings["drain_s"], 4)
                self.metrics.policy_drain.labels(self.metrics.model_name).observe(rec.drain_s)
                rec.reason += f" after a {timings['drain_s']:.2f} s drain"
            rec.reason += ")"
            self.metrics.swap_stall.labels(self.metrics.model_name).observe(rec.stall_s)
            return
        active = self.backend.active
        if how == "blue/green" and active is not None and active.started_s is not None:
            rec.reason += f" (blue/green: new vLLM process healthy after {active.started_s:.1f} s)"

    def _tick(self) -> None:
        """Feed the canary from the active process's spec-decode counters (about once a second)."""
        if time.monotonic() < self._next_scrape:
            return
        self._next_scrape = time.monotonic() + self.SCRAPE_EVERY_S
        proc = self.backend.active
        if proc is None:
            return
        d = self.backend.scrape(proc)
        drafts = int(d.get("vllm:spec_decode_num_drafts_total", 0))
        if drafts and proc.label == self.served.label:
            self._observe(drafts, int(d.get("vllm:spec_decode_num_accepted_tokens_total", 0)),
                          int(d.get("vllm:spec_decode_num_draft_tokens_total", 0)) or None)


# ---- the state create_app holds ------------------------------------------------------------------------------------
@dataclass
class VllmState:
    settings: ServerSettings
    target: TargetInfo
    backend: VllmBackend
    scheduler: ProxyAdmission
    metrics: ServerMetrics
    hotswap: VllmSwapManager
    served_model_name: str
    first: tuple[str, Path | None]  # the drafter label and exported folder the first process serves
    client: httpx.AsyncClient | None = None
    _ready: bool = field(default=False, repr=False)

    @property
    def ready(self) -> bool:
        return self._ready and self.backend.active is not None and self.backend.active.alive

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    def drafter_label(self) -> str:
        return self.hotswap.served.label

    def policy_label(self, epoch: int | None = None) -> str:
        return self.hotswap.served.policy_label

    async def start(self) -> None:
        label, exported = self.first
        served = self.hotswap.served  # its policy: the manager has not started, so still the start-up pair
        proc = await asyncio.to_thread(self.backend.spawn, label, exported, served.target, served.policy_label)
        self.backend.switch(proc)
        s = self.settings
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(s.request_timeout_s, connect=10.0), trust_env=False,
                                        limits=httpx.Limits(max_connections=self.scheduler.max_in_flight + 8))
        self.hotswap.start()

    async def stop(self) -> None:
        self.backend.begin_close()  # a swap's start-up in progress stops waiting, so the manager thread can end
        await asyncio.to_thread(self.hotswap.stop)
        if self.client is not None:
            await self.client.aclose()
        await asyncio.to_thread(self.backend.stop_all)

    def health(self) -> dict[str, Any]:
        procs = self.backend.describe()
        alive = bool(procs["active"] and procs["active"]["alive"])
        status = "draining" if self.scheduler.draining else ("ok" if alive else "backend_down")
        return {"status": status, "model": self.served_model_name, "backend": "vllm",
                "drafter_version": self.drafter_label(), "policy_version": self.policy_label(),
                "in_flight": self.scheduler.in_flight,
                "max_in_flight": self.scheduler.max_in_flight, "vllm": procs,
                "controller": self.controller_state()}

    async def metrics_text(self) -> bytes:
        await asyncio.to_thread(self.backend.scrape)
        return self.metrics.render()

    def controller_state(self) -> dict[str, Any]:
        """vLLM drafts a fixed K per step (no adaptive controller on this backend)."""
        return {"kind": "fixed", "k": self.backend.launch.num_speculative_tokens, "backend": "vllm"}

    def pin_speculation(self, k: int | None) -> dict[str, Any]:
        raise APIError(409, "the vLLM backend cannot change K while it serves: vLLM fixes its speculative config "
                            "when it starts; restart the server with -k 0 (off) or -k N, or use the native "
                            "backend", code="not_pinnable")

    def release_cores(self, why: str) -> None:
        """vLLM fixes its threads when it starts: nothing to change."""


def build_launch(s: ServerSettings, target: TargetInfo, served_name: str) -> VllmLaunch:
    dtype = s.dtype if s.dtype != "auto" else ("bfloat16" if s.device.startswith("cuda") else "float32")
    return VllmLaunch(python=resolve_vllm_python(s.vllm_python), model_dir=target.path,
                      served_model_name=served_name, dtype=dtype, max_model_len=s.max_model_len,
                      max_num_seqs=s.max_batch_size, num_speculative_tokens=s.num_speculative_tokens,
                      enforce_eager=s.device == "cpu", extra_args=tuple(shlex.split(s.vllm_args)))


def build_vllm_state(s: ServerSettings) -> VllmState:
    """Validate everything that can be checked without vLLM (interpreter, target, drafter); start nothing."""
    if s.backend != "vllm":
        raise VllmError(f"build_vllm_state needs backend='vllm', got {s.backend!r}")
    target = describe_target(s.model)
    name = s.served_model_name or (s.model if "/" not in s.model else Path(s.model).name)
    launch = build_launch(s, target, name)
    metrics = ServerMetrics(name)
    registry = open_registry(s)
    follow = s.follow_alias if not s.drafter else None
    first = choose_initial_drafter(s.drafter, target.fingerprint, registry, follow, s.allow_drafter_drift)
    label, version, folder = first.label, first.version, first.path
    backend = VllmBackend(launch, metrics, port=s.vllm_port, startup_timeout_s=s.vllm_startup_timeout_s,
                          retire_timeout_s=s.request_timeout_s, in_place=s.vllm_swap == "in-place")
    exported = backend.export(label, folder) if folder is not None else None
    hotswap = VllmSwapManager(backend, target.fingerprint, metrics, registry, drain_timeout_s=s.request_timeout_s,
                                   follow=follow if registry is not None else None,
                                   watch_interval_s=s.watch_interval_s, canary_window=s.canary_window,
                                   canary_margin=s.canary_margin, allow_drift=s.allow_drafter_drift)
    hotswap.set_initial(label, version, exported, policy=first.policy, target=first.policy_path)
    if s.drafter and version is not None:
        hotswap.pinned = version
    admission = ProxyAdmission(s.max_batch_size + s.max_queue)
    return VllmState(settings=s, target=target, backend=backend, scheduler=admission, metrics=metrics,
                     hotswap=hotswap, served_model_name=name, first=(label, exported))
