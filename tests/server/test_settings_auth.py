"""`understudy serve` fails safe: a non-loopback bind needs an API key (or an explicit --allow-unauthenticated),
an admin key must differ from every API key, and every setting is a documented flag and UNDERSTUDY_* variable.

The CLI is run as a subprocess (`--print-settings` validates and exits without loading a model; it still imports
the server and torch first, ~5 s of CPU each, hence `slow`); the same rules are checked on ServerSettings directly
in the fast tests below."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from pydantic import ValidationError

from tests.server.conftest import ROOT, ServerProcess
from understudy.server.settings import ServerSettings

ENV_PREFIX = "UNDERSTUDY_"


def serve(*args: str, env: dict[str, str] | None = None, columns: int = 80) -> subprocess.CompletedProcess:
    """`understudy serve ARGS` with no UNDERSTUDY_* variable from the caller's environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return subprocess.run([sys.executable, "-m", "understudy.cli.main", "serve", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**base, "COLUMNS": str(columns), "NO_COLOR": "1", **(env or {})})


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(ENV_PREFIX):
            monkeypatch.delenv(k)
    return monkeypatch


# ---- through the CLI ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_non_loopback_host_without_a_key_is_refused():
    r = serve("--host", "0.0.0.0", "--print-settings")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "--api-key" in r.stderr and "--allow-unauthenticated" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not r.stdout.strip()


@pytest.mark.slow
def test_allow_unauthenticated_is_accepted_and_shown():
    r = serve("--host", "0.0.0.0", "--allow-unauthenticated", "--print-settings")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["host"] == "0.0.0.0" and shown["allow_unauthenticated"] is True and shown["api_key"] == []


@pytest.mark.slow
def test_an_admin_key_equal_to_an_api_key_is_refused_from_the_environment():
    r = serve("--print-settings", env={"UNDERSTUDY_API_KEY": "sk-a,sk-b", "UNDERSTUDY_ADMIN_KEY": "sk-b"})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "admin_key must differ from every API key" in r.stderr
    assert "sk-b" not in r.stderr + r.stdout, "the key itself must not be echoed"


def test_help_shows_a_flag_and_an_env_var_for_every_setting():
    r = serve("--help", columns=1000)  # wide: one line per option, nothing cut off
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in ServerSettings.model_fields:
        flag, env = "--" + name.replace("_", "-"), f"[env: {ENV_PREFIX}{name.upper()}]"
        rows = [ln for ln in lines if f" {flag} " in f" {ln.replace(',', ' ')} "]
        assert rows, f"`understudy serve --help` has no {flag}"
        assert any(env in ln for ln in rows), f"{flag}: its help does not name {env}: {rows}"


@pytest.mark.slow
def test_a_server_started_with_allow_unauthenticated_on_all_interfaces_serves_without_a_key(server_assets, tmp_path):
    srv = ServerProcess(["--model", str(server_assets["model"]), "--registry", str(tmp_path / "reg"),
                         "--served-model-name", "tiny", "--max-model-len", "128",
                         "--host", "0.0.0.0", "--allow-unauthenticated"],  # the later --host wins
                        log=tmp_path / "server.log")
    try:
        srv.wait_ready()
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "grid"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert "0.0.0.0" in srv.tail(200)  # uvicorn's "running on" line: it really bound all interfaces
    finally:
        assert srv.stop() == 0, srv.tail()


# ---- the same rules on ServerSettings (flags and environment) ------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "10.1.2.3", "server.example.com"])
def test_non_loopback_hosts_need_a_key(host, clean_env):
    with pytest.raises(ValidationError, match="--allow-unauthenticated"):
        ServerSettings(host=host)
    assert ServerSettings(host=host, api_key=["sk-a"]).api_key == ["sk-a"]
    assert ServerSettings(host=host, allow_unauthenticated=True).allow_unauthenticated
    clean_env.setenv("UNDERSTUDY_ALLOW_UNAUTHENTICATED", "true")
    assert ServerSettings(host=host).api_key == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]"])
def test_loopback_hosts_need_no_key(host, clean_env):
    assert ServerSettings(host=host).api_key == []


def test_admin_key_must_differ_from_every_api_key(clean_env):
    with pytest.raises(ValidationError, match="admin_key must differ"):
        ServerSettings(api_key=["sk-a", "sk-b"], admin_key="sk-a")
    clean_env.setenv("UNDERSTUDY_API_KEY", "sk-a, sk-b")
    with pytest.raises(ValidationError, match="admin_key must differ"):
        ServerSettings(admin_key="sk-b")  # comma-separated keys are stripped before the comparison
    assert ServerSettings(admin_key="adm-c").admin_key == "adm-c"
