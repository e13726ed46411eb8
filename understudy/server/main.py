"""Run the server with uvicorn, with a graceful drain on SIGTERM/SIGINT.

First signal: readiness turns 503, new requests get 503 + Retry-After, in-flight requests (streams included)
run to completion (up to drain_timeout_s), then uvicorn exits and the process returns 0. A second signal exits
at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import uvicorn

from understudy.server.app import create_app
from understudy.server.settings import ServerSettings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.understudy_app = app
        self.drain_timeout_s = drain_timeout_s
        self._draining = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = getattr(self.understudy_app.state, "understudy", None)
        if self._draining or state is None:
            return super().handle_exit(sig, frame)
        self._draining = True
        state.scheduler.draining = True
        log.info("signal %s: draining %d in-flight requests (new requests get 503)", sig, state.scheduler.in_flight)
        threading.Thread(target=self._drain, args=(state,), name="understudy-drain", daemon=True).start()

    def _drain(self, state: Any) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while state.scheduler.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if state.scheduler.in_flight:
            log.warning("drain timeout: %d requests still in flight", state.scheduler.in_flight)
        time.sleep(0.2)  # let the last stream chunks ([DONE]) flush
        self.should_exit = True


def serve(settings: ServerSettings, log_level: str = "info") -> None:
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, access_log=False,
                            timeout_keep_alive=5, lifespan="on")
    DrainingServer(config, app, settings.drain_timeout_s).run()
