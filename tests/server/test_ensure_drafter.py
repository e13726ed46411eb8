"""Serve first, draft in the background: `serve --ensure-drafter` on an empty registry answers at once (n-gram
fallback), trains a drafter in a child process, and swaps in what it publishes, with no failed request."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.slow
ADMIN = {"authorization": "Bearer admin-secret"}


def test_ensure_drafter_serves_at_once_then_swaps_in_the_background_drafter(tmp_path, tiny_llama_dir):
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--registry", str(tmp_path / "reg"), "--ensure-drafter",
                         "--ensure-drafter-minutes", "1", "--fallback-proposer", "ngram",
                         "--admin-key", "admin-secret", "--watch-interval-s", "0.2"],
                        env={"UNDERSTUDY_CACHE": str(tmp_path / "cache")}, log=tmp_path / "server.log")
    try:
        srv.wait_ready()
        health = httpx.get(f"{srv.url}/health", timeout=30).json()
        assert health["drafter_version"] == "none" and health["proposer"] == "ngram"
        assert health["threads"] == 1  # the background job trains on the other core
        training = httpx.get(f"{srv.url}/admin/drafter", headers=ADMIN, timeout=30).json()["training"]
        assert training is not None and training["pid"] > 0
        statuses: list[int] = []
        state: dict = {}
        deadline = time.monotonic() + 900  # generous: the child imports torch and trains on a busy CI box
        while time.monotonic() < deadline:
            r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120,
                           json={"model": tiny_llama_dir.name, "max_tokens": 8,
                                 "messages": [{"role": "user", "content": f"grid line {len(statuses)}"}]})
            statuses.append(r.status_code)
            state = httpx.get(f"{srv.url}/admin/drafter", headers=ADMIN, timeout=30).json()
            if state["version"] != "none":
                break
            if state["training"]["state"] == "failed":
                pytest.fail(f"background training failed: {state['training']} {srv.tail()}")
        assert state["version"] == "1", srv.tail()
        assert statuses and set(statuses) == {200}, statuses
        assert state["training"]["published"][0]["version"] == 1
        assert state["history"][-1]["result"] == "success"
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120,
                       json={"model": tiny_llama_dir.name, "max_tokens": 8,
                             "messages": [{"role": "user", "content": "after the swap"}]})
        assert r.status_code == 200 and r.headers["x-understudy-drafter-version"] == "1"
        assert httpx.get(f"{srv.url}/health", timeout=30).json()["proposer"] == "drafter"
        log = (tmp_path / "server.log").read_text()
        assert "training one in the background" in log and "published v1" in log and "drafter v1 now serving" in log
        # the job decodes its data in the server's dtype (ServerProcess passes --dtype float32), so the drafter
        # learns the features this server feeds it
        job_log = next((tmp_path / "cache" / "drafter-jobs").glob("*/train.log")).read_text()
        assert "drafter train" in job_log and "--data-dtype float32" in job_log, job_log[:500]
        child = state["training"]["pid"]
    finally:
        srv.stop()
    if state.get("training", {}).get("state") == "running":  # stopped with the server, never orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)


def test_ensure_drafter_does_nothing_when_the_registry_has_one(tmp_path, tiny_llama, tiny_llama_dir, tiny_prompts):
    from tests.conftest import train_tiny_drafter
    from understudy.drafter.model import save_drafter
    from understudy.registry.store import Registry

    save_drafter(train_tiny_drafter(tiny_llama, tiny_prompts, steps=5), tmp_path / "d")
    Registry.open(tmp_path / "reg").publish(tmp_path / "d")
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--registry", str(tmp_path / "reg"), "--ensure-drafter",
                         "--admin-key", "admin-secret"], env={"UNDERSTUDY_CACHE": str(tmp_path / "cache")},
                        log=tmp_path / "server.log")
    try:
        srv.wait_ready()
        state = httpx.get(f"{srv.url}/admin/drafter", headers=ADMIN, timeout=30).json()
        assert state["version"] == "1" and state["training"] is None
        # no job needs the other core: the engine decodes on every core from its next step after the server has
        # decided so (which readiness does not wait for: poll, with a request to make a step each time)
        threads, deadline = None, time.monotonic() + 120
        while threads != len(os.sched_getaffinity(0)) and time.monotonic() < deadline:
            httpx.post(f"{srv.url}/v1/completions", timeout=120, json={"model": tiny_llama_dir.name,
                                                                        "prompt": "grid", "max_tokens": 2})
            threads = httpx.get(f"{srv.url}/health", timeout=30).json()["threads"]
        assert threads == len(os.sched_getaffinity(0))
        assert "no background drafter training needed: decoding on" in (tmp_path / "server.log").read_text()
    finally:
        srv.stop()


def test_background_training_continues_the_best_version_on_the_same_data_in_later_rounds(tmp_path, tiny_llama_dir,
                                                                                       monkeypatch):
    """Round 2 starts from the version round 1 published last (its best), reuses round 1's data instead of
    generating it again, and publishes only what beats that version; then the job ends with a reason."""
    from understudy.registry.store import Registry
    from understudy.server.drafter_job import DrafterTrainingJob

    monkeypatch.setenv("UNDERSTUDY_CACHE", str(tmp_path / "cache"))
    registry = Registry.open(tmp_path / "reg", create=True)
    ends: list[str] = []  # the server gives its engine every core back here (ServerState.release_cores)
    job = DrafterTrainingJob(str(tiny_llama_dir), registry, minutes=0.5, work_dir=tmp_path / "job", rounds=2, nice=0,
                             on_end=ends.append)
    assert "--init-from" not in job.command(1) and job.command(1)[job.command(1).index("--data-minutes") + 1] == "0.25"
    job.start()
    try:
        deadline = time.monotonic() + 900  # generous: each round imports torch on a busy CI box
        while job.state == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        job.stop()
    log = job.log_path.read_text()
    assert job.state == "finished", (job.status(), log[-3000:])
    assert ends == ["finished"]  # told once, when the last round ended
    first = [p for p in job.published if p["round"] == 1]
    assert first and job.round == 2, job.status()
    start_from = first[-1]["version"]
    round2 = log[log.index("round 2/2: "):]
    assert f"--init-from {start_from}" in round2.splitlines()[0] and "--data-minutes 0.25" in round2.splitlines()[0]
    assert "reusing generated training data" in round2 and "generating training data" not in round2
    assert "continuing a trained drafter" in round2
    # what round 2 published beats what it started from, in order (each publish beats the one before)
    lengths = [p["heldout_acceptance_length"] for p in job.published]
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths), job.published
    assert [v.version for v in registry.list_versions()] == [p["version"] for p in job.published]
    if len(job.published) == len(first):
        assert "stopped improving" in job.ended
    else:
        assert job.ended == f"{len(job.published)} version(s) published in 2 round(s)"


def test_background_training_rounds_must_be_positive(tmp_path):
    from understudy.registry.store import Registry
    from understudy.server.drafter_job import DrafterTrainingJob

    with pytest.raises(ValueError, match="rounds must be >= 1"):
        DrafterTrainingJob("m", Registry.open(tmp_path / "reg", create=True), 1.0, tmp_path / "job", rounds=0)
