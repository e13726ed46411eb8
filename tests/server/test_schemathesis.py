"""Property-based fuzzing of the server's own OpenAPI schema with schemathesis: no input may cause a 5xx."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_server_errors(server_assets, tmp_path):
    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        exe = Path(shutil.which("schemathesis") or "schemathesis")
    srv = ServerProcess(["--model", str(server_assets["model"]), "--served-model-name", "tiny", "--max-model-len", "128",
                         "--api-key", "sk", "--admin-key", "adm", "--registry", str(tmp_path / "reg"),
                         "--max-queue", "64"], log=tmp_path / "server.log").wait_ready()
    try:
        base = [str(exe), "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "25",
                "--phases", "examples,coverage,fuzzing", "--workers", "1", "--request-timeout", "60", "--seed", "1",
                "--generation-database", "none", "--no-shrink"]
        runs = [  # the OpenAI routes with the API key, the admin routes with the admin key
            [*base, "-H", "Authorization: Bearer sk", "--exclude-path-regex", "^/admin", "--max-time", "70"],
            [*base, "-H", "Authorization: Bearer adm", "--include-path-regex", "^/admin", "--max-time", "30"],
        ]
        for cmd in runs:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
            assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
            cases = re.search(r"Test cases:\s+(\d+) generated", r.stdout)
            assert cases and int(cases.group(1)) > 100, r.stdout[-2000:]  # it really generated and sent cases
            assert "Authentication failed" not in r.stdout, r.stdout[-3000:]
        assert httpx.get(f"{srv.url}/readyz", timeout=30).status_code == 200  # still healthy after the fuzzing
    finally:
        srv.stop()
