"""`understudy drafter train` end to end on a tiny model: data, training, held-out report, atomic save, publish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from understudy.drafter.model import load_drafter
from understudy.registry.store import Registry

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def write_prompts(tmp_path: Path, stride: int, longest: int, ood: bool) -> Path:
    """48 short prompts over a small vocabulary: every 6th held out (and the one after it out-of-domain if `ood`)."""
    words = ["grid", "line", "flow", "risk", "load", "sum", "apple", "zeta"]
    rows = [{"prompt": " ".join(words[(i * stride + j) % 8] for j in range(1 + i % longest)),
             "split": "heldout" if i % 6 == 0 else ("ood" if ood and i % 6 == 1 else "train")} for i in range(48)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prompts


def test_drafter_train_cli_publishes_a_drafter_with_its_heldout_acceptance(tmp_path, tiny_llama, tiny_llama_dir):
    prompts = write_prompts(tmp_path, 3, 5, ood=True)
    env = {**os.environ, "UNDERSTUDY_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "drafter", "train", "--model", str(tiny_llama_dir),
                        "--out", str(tmp_path / "d"), "--prompts", str(prompts), "--max-minutes", "0.6",
                        "--max-new-tokens", "40", "--draft-vocab-size", "0", "--lr", "3e-3", "--publish",
                        "--registry", str(tmp_path / "reg")], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out: top-1 agreement" in r.stdout and "published versions 1 in" in r.stdout
    d = load_drafter(tmp_path / "d", tiny_llama.model, tiny_llama.fingerprint)
    training = d.config.training
    assert training["heldout"]["expected_acceptance_length"] > 1.0
    assert training["steps"] > 0 and not training["interrupted"]
    reg = Registry.open(tmp_path / "reg", create=False)
    v = reg.list_versions()[0]
    assert v.metrics["heldout_acceptance_length"] == pytest.approx(training["heldout_acceptance_length"])
    assert reg.aliases()["latest"] == 1 and reg.aliases()["best"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d.")], "no temporary folder left behind"
    # a second run reuses the cached data and skips generation
    r2 = subprocess.run([sys.executable, "-m", "understudy.cli.main", "drafter", "train", "--model", str(tiny_llama_dir),
                         "--out", str(tmp_path / "d2"), "--prompts", str(prompts), "--max-minutes", "0.6",
                         "--max-new-tokens", "40", "--draft-vocab-size", "0"], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=600)
    assert r2.returncode == 0 and "generating training data" not in r2.stderr


def test_publish_every_publishes_only_improving_checkpoints_with_events(tmp_path, tiny_llama_dir):
    """What `serve --ensure-drafter` runs: checkpoints every few seconds; each one that beats the run's earlier
    ones becomes a version (latest moves to it) and is announced as one JSON line on stdout."""
    prompts = write_prompts(tmp_path, 5, 6, ood=False)
    env = {**os.environ, "UNDERSTUDY_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "drafter", "train", "--model", str(tiny_llama_dir),
                        "--out", str(tmp_path / "d"), "--prompts", str(prompts), "--max-minutes", "1.2",
                        "--max-new-tokens", "40", "--draft-vocab-size", "0", "--lr", "3e-3", "--publish",
                        "--publish-every-minutes", "0.05", "--events", "--registry", str(tmp_path / "reg")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"event"')]
    assert events, r.stdout
    lengths = [e["heldout_acceptance_length"] for e in events]
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths), "only strictly better ones publish"
    reg = Registry.open(tmp_path / "reg", create=False)
    assert [v.version for v in reg.list_versions()] == [e["version"] for e in events]
    assert reg.aliases()["latest"] == events[-1]["version"]
    for e in events:
        assert reg.info(e["version"]).metrics["heldout_acceptance_length"] == pytest.approx(e["heldout_acceptance_length"])


def test_data_minutes_must_fit_in_the_budget(tmp_path, tiny_llama_dir):
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "drafter", "train", "--model", str(tiny_llama_dir),
                        "--out", str(tmp_path / "d"), "--max-minutes", "5", "--data-minutes", "5"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "--data-minutes must be > 0 and below --max-minutes (5.0)" in r.stderr


def test_publish_every_needs_publish(tmp_path, tiny_llama_dir):
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "drafter", "train", "--model", str(tiny_llama_dir),
                        "--out", str(tmp_path / "d"), "--publish-every-minutes", "1"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "--publish-every-minutes needs --publish" in r.stderr


def test_threads_must_be_positive(tmp_path, tiny_llama_dir):
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "drafter", "train", "--model", str(tiny_llama_dir),
                        "--out", str(tmp_path / "d"), "--threads", "0"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 2 and "--threads must be >= 1, got 0" in r.stderr


def test_data_dtype_must_be_one_the_engine_decodes_in(tmp_path, tiny_llama_dir):
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "drafter", "train", "--model", str(tiny_llama_dir),
                        "--out", str(tmp_path / "d"), "--data-dtype", "float16"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "--data-dtype must be auto, float32 or bfloat16, got 'float16'" in r.stderr


def test_bad_prompt_file_is_one_clear_error(tmp_path, tiny_llama_dir):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "drafter", "train", "--model", str(tiny_llama_dir),
                        "--out", str(tmp_path / "d"), "--prompts", str(bad)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}:2" in r.stderr and "prompt" in r.stderr
    assert not (tmp_path / "d").exists()


def test_init_from_continues_a_trained_drafter_and_publishes_only_what_beats_it(tmp_path, tiny_llama, tiny_llama_dir):
    """`--init-from`: the run starts from the given drafter (its held-out acceptance, measured first, equals the
    one its own run reported; its draft vocabulary is kept) and publishes nothing that does not beat it."""
    prompts = write_prompts(tmp_path, 3, 5, ood=False)
    env = {**os.environ, "UNDERSTUDY_CACHE": str(tmp_path / "cache")}
    base = [sys.executable, "-m", "understudy.cli.main", "drafter", "train", "--model", str(tiny_llama_dir),
            "--prompts", str(prompts), "--max-minutes", "0.5", "--max-new-tokens", "40", "--lr", "3e-3"]
    r1 = subprocess.run([*base, "--out", str(tmp_path / "d1"), "--draft-vocab-size", "64"], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([*base, "--out", str(tmp_path / "d2"), "--init-from", str(tmp_path / "d1"), "--publish",
                         "--registry", str(tmp_path / "reg")], capture_output=True, text=True, cwd=ROOT, env=env,
                        timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert f"started from {tmp_path / 'd1'}" in r2.stdout
    d1 = load_drafter(tmp_path / "d1", tiny_llama.model, tiny_llama.fingerprint)
    d2 = load_drafter(tmp_path / "d2", tiny_llama.model, tiny_llama.fingerprint)
    start = d2.config.training["initial"]["heldout_acceptance_length"]
    assert start == pytest.approx(d1.config.training["heldout_acceptance_length"], abs=1e-6)
    assert d2.config.draft_vocab_size == 64 and bool((d2.draft_vocab == d1.draft_vocab).all())
    published = Registry.open(tmp_path / "reg").list_versions()
    assert all(v.metrics["heldout_acceptance_length"] > start for v in published)
    final = d2.config.training["heldout_acceptance_length"]
    if final > start:
        assert published and published[-1].metrics["heldout_acceptance_length"] == pytest.approx(final)
    else:
        assert not published and "does not beat the one it started from" in r2.stderr


def test_init_from_that_is_neither_folder_nor_version_is_one_clear_error(tmp_path, tiny_llama_dir):
    r = subprocess.run([sys.executable, "-m", "understudy.cli.main", "drafter", "train", "--model", str(tiny_llama_dir),
                        "--out", str(tmp_path / "d"), "--init-from", str(tmp_path / "nope"), "--registry",
                        str(tmp_path / "reg")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--init-from '{tmp_path / 'nope'}': not a folder, and not in the registry" in r.stderr
    assert not (tmp_path / "d").exists()
