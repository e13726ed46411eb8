"""Property-based fuzzing of the server's own OpenAPI schema with schemathesis: no input may cause a 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
        cmd = [str(exe), "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error",
               "--max-examples", "25", "--phases", "examples,coverage,fuzzing", "--workers", "1",
               "--request-timeout", "60", "--seed", "1", "--generation-database", "none",
               "-H", "Authorization: Bearer sk", "--max-time", "90", "--no-shrink"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        import re

        passed = re.search(r"(\d+) passed", r.stdout)
        assert passed and int(passed.group(1)) > 500, r.stdout[-2000:]  # it really generated and sent cases
        # the server is still healthy after the fuzzing
        import httpx

        assert httpx.get(f"{srv.url}/readyz", timeout=30).status_code == 200
    finally:
        srv.stop()
