"""Real servers for contract tests: `understudy serve` in a subprocess on a free loopback port, tiny models."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import build_tiny_hf, train_tiny_drafter

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_fh = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "understudy.cli.main", "serve", "--port", str(self.port), "--host", "127.0.0.1",
             "--dtype", "float32", *args],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=self._log_fh, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600.0) -> ServerProcess:  # returns at once when ready; a busy CI box is slow to import torch
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s: {self.tail()}")

    def tail(self, n: int = 40) -> str:
        if self.log and self.log.exists():
            return "\n".join(self.log.read_text().splitlines()[-n:])
        return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_fh is not subprocess.DEVNULL:
            self._log_fh.close()
        return self.proc.returncode


class StreamLoad:
    """Streaming chat clients in threads for swap-under-load tests. A stream is ok when it is a 200 that ends
    with exactly one finish_reason and `data: [DONE]`; anything else is counted as non_2xx, truncated or error."""

    def __init__(self, url: str, users: int, prompt: Callable[[int, int], str], max_tokens: int,
                 headers: dict[str, str] | None = None, timeout: float = 60.0) -> None:
        self.url, self.prompt, self.max_tokens = url, prompt, max_tokens
        self.headers, self.timeout = headers or {}, timeout
        self.stop = threading.Event()
        self.ok = self.non_2xx = self.truncated = self.errors = 0
        self.versions: list[str] = []  # x-understudy-drafter-version of every stream, in order
        self.policies: list[str] = []  # x-understudy-policy-version of every stream, in order
        self.started: list[float] = []  # when each stream was sent (time.monotonic), in the same order
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._user, args=(i,), daemon=True) for i in range(users)]

    @property
    def failed(self) -> int:
        return self.non_2xx + self.truncated + self.errors

    def __enter__(self) -> StreamLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout)

    def _user(self, i: int) -> None:
        n = 0
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout) as http:
            while not self.stop.is_set():
                n += 1
                body = {"model": "tiny", "messages": [{"role": "user", "content": self.prompt(i, n)}],
                        "max_tokens": self.max_tokens, "temperature": 0, "stream": True}
                version, policy, outcome, t0 = "?", "?", "errors", time.monotonic()
                try:
                    with http.stream("POST", "/v1/chat/completions", json=body) as r:
                        version = r.headers.get("x-understudy-drafter-version", "?")
                        policy = r.headers.get("x-understudy-policy-version", "?")
                        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                    if r.status_code != 200:
                        outcome = "non_2xx"
                    elif lines and lines[-1] == "data: [DONE]" and sum('"finish_reason":"' in ln for ln in lines) == 1:
                        outcome = "ok"
                    else:
                        outcome = "truncated"
                except httpx.HTTPError:
                    pass
                with self.lock:
                    setattr(self, outcome, getattr(self, outcome) + 1)
                    self.versions.append(version)
                    self.policies.append(policy)
                    self.started.append(t0)


@pytest.fixture(scope="session")
def server_assets(tmp_path_factory):
    """Tiny model + a trained drafter + a garbage drafter + a drafter of another family, as folders."""
    from understudy.drafter.model import Drafter, DrafterConfig, new_drafter, save_drafter
    from understudy.engine.loader import load_model
    from understudy.engine.text import encode_prompt

    root = tmp_path_factory.mktemp("server-assets")
    model_dir = build_tiny_hf(root / "tiny", "llama")
    lm = load_model(str(model_dir), dtype="float32")
    words = ["grid", "line", "flow", "risk", "load", "sum", "wind", "trip"]
    prompts = [encode_prompt(lm.tokenizer, " ".join(words[(i * 3 + j) % 8] for j in range(1 + i % 6))) for i in range(32)]
    save_drafter(train_tiny_drafter(lm, prompts, steps=80), root / "drafter-good")
    garbage = Drafter(DrafterConfig(target=lm.config, family_fingerprint=lm.fingerprint,
                                    draft_vocab_size=lm.config.vocab_size))  # random init: ~nothing accepted
    save_drafter(garbage, root / "drafter-garbage")
    other = load_model(str(build_tiny_hf(root / "other", "llama", hidden_size=32, intermediate_size=64)), dtype="float32")
    save_drafter(new_drafter(other.model, other.fingerprint), root / "drafter-other-family")
    policy_dir = build_tiny_hf(root / "policy", "llama", seed=1)  # the same family with other weights (a new policy)
    policy = load_model(str(policy_dir), dtype="float32")
    save_drafter(train_tiny_drafter(policy, prompts, steps=40), root / "drafter-for-policy")
    return {"root": root, "model": model_dir, "good": root / "drafter-good", "garbage": root / "drafter-garbage",
            "other": root / "drafter-other-family", "lm": lm, "policy": policy_dir, "policy_lm": policy,
            "policy_drafter": root / "drafter-for-policy"}


@pytest.fixture(scope="module")
def server(server_assets, tmp_path_factory):
    """A server following `latest` in an (initially empty) registry; API key required, admin API on."""
    reg = tmp_path_factory.mktemp("reg")
    srv = ServerProcess(["--model", str(server_assets["model"]), "--registry", str(reg), "--api-key", "sk-test",
                         "--admin-key", "adm-test", "--max-batch-size", "8", "--max-model-len", "256",
                         "--served-model-name", "tiny", "--controller", "fixed", "-k", "3", "--max-queue", "512"],
                        log=tmp_path_factory.mktemp("logs") / "server.log").wait_ready()
    srv.registry = reg  # type: ignore[attr-defined]
    yield srv
    srv.stop()
