"""Clients for a running Understudy server (no torch): `UnderstudyClient`, `AsyncUnderstudyClient`.

The names are loaded on first use (PEP 562), so `understudy.cli.main` can import `understudy.clients.cli_client`
without paying for httpx on commands that never talk to a server.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncUnderstudyClient", "ClientConfigError", "Response", "UnderstudyAPIError", "UnderstudyClient",
           "UnderstudyConnectionError", "UnderstudyStreamError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from understudy.clients import client

        return getattr(client, name)
    raise AttributeError(f"module 'understudy.clients' has no attribute {name!r}")
