"""Serving backends behind one front door.

The FastAPI app (auth, body limit, error shape, /metrics, /readyz, the admin API, the drafter-version header) is
the same for every backend; what differs is who generates tokens:

- `native` (default): our engine in this process (backends/native.py `ServerState`, server/routes_openai.py).
- `vllm`: vLLM's OpenAI server as a managed subprocess on a loopback port, serving the same target folder with
  the current drafter exported to vLLM's `eagle` layout; hot swap is blue/green (vllm_backend.py), and the
  OpenAI routes proxy to it (server/routes_vllm.py).

`BackendState` is what create_app, main.py (the SIGTERM drain) and the admin API use from either state object.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from understudy.registry.store import Registry, RegistryError, default_registry_path
from understudy.server.metrics import ServerMetrics
from understudy.server.settings import ServerSettings

log = logging.getLogger(__name__)


class Admission(Protocol):
    """Admits requests: `draining` (set by the SIGTERM handler: new requests get 503) and the in-flight count."""

    draining: bool

    @property
    def in_flight(self) -> int: ...


class BackendState(Protocol):
    settings: ServerSettings
    metrics: ServerMetrics
    served_model_name: str
    ready: bool
    scheduler: Admission  # the native AsyncEngine, or the vLLM proxy's admission gate
    hotswap: Any  # a server.hotswap.SwapManager (admin API: state(), submit(), registry)
    target: Any  # has .fingerprint (admin API: which registry versions are compatible)

    def drafter_label(self) -> str: ...

    def policy_label(self, epoch: int | None = None) -> str: ...  # "base" or a policy version

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def health(self) -> dict[str, Any]: ...

    async def metrics_text(self) -> bytes: ...

    def controller_state(self) -> dict[str, Any]: ...

    def pin_speculation(self, k: int | None) -> dict[str, Any]: ...  # POST /admin/controller; APIError if it can't

    def release_cores(self, why: str) -> None: ...  # the background drafter job's core is free (ended or never ran)


def open_registry(s: ServerSettings) -> Registry | None:
    path = s.registry or str(default_registry_path())
    try:
        # --ensure-drafter publishes into the registry: create the default one on a fresh machine
        return Registry.open(path, create=s.registry is not None or s.ensure_drafter)
    except RegistryError as e:
        if s.registry is not None or (s.drafter and not Path(s.drafter).expanduser().is_dir()):
            raise
        log.info("no drafter registry at %s (%s): hot swap off", path, e)
        return None
