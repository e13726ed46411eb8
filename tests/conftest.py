"""Shared fixtures: tiny Llama-family models built locally (random weights, a small character tokenizer)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(autouse=True)
def _pinned_seeds():
    """Every test starts from the same global RNG states (torch, random, numpy): a test that draws without its
    own generator is still deterministic, run alone or in any order."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def make_char_tokenizer(folder: Path):
    """A character-level fast tokenizer (~100 symbols) with chat special tokens, saved into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=specials[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def hf_config(arch: str, vocab_size: int, **over):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    common.update(over)
    if arch == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def build_tiny_hf(folder: Path, arch: str = "llama", seed: int = 0, **over) -> Path:
    """Random HF model + char tokenizer saved as a normal safetensors folder."""
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_char_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = hf_config(arch, len(tok), **over)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default init: peaky, deterministic-looking distributions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_hf(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from understudy.engine.loader import load_model

    return load_model(str(tiny_llama_dir), dtype="float32")


@pytest.fixture(scope="session")
def tiny_llama_policy_dir(tmp_path_factory) -> Path:
    """Another policy of tiny_llama's family: same shapes and tokenizer, other weights (as after an RL update)."""
    return build_tiny_hf(tmp_path_factory.mktemp("tiny-llama-policy"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_prompts(tiny_llama) -> list[list[int]]:
    """24 prompts of varied length (chat-templated)."""
    from understudy.engine.text import encode_prompt

    words = ["grid", "line", "flow", "risk", "load", "sum", "apple", "zeta", "omega", "solar", "wind", "trip"]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 9)) for i in range(24)]
    return [encode_prompt(tiny_llama.tokenizer, t) for t in texts]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def train_tiny_drafter(lm, prompts: list[list[int]], steps: int = 60, seed: int = 0):
    """Self-distil a drafter for a tiny model on its own greedy outputs (seconds; partial acceptance)."""
    from understudy.drafter.model import new_drafter
    from understudy.drafter.train import DrafterTrainConfig, DrafterTrainer, target_features
    from understudy.engine.config import EngineConfig
    from understudy.engine.engine import Engine
    from understudy.engine.sampling import SamplingParams

    eng = Engine(lm.model, EngineConfig(max_batch_size=32, max_model_len=256, num_speculative_tokens=0,
                                        dtype="float32"), lm.eos_token_ids)
    outs = eng.generate(prompts, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
    samples = target_features(lm.model, [(p + o, len(p)) for p, o in zip(prompts, outs, strict=True)])
    d = new_drafter(lm.model, lm.fingerprint, seed=seed).float()
    DrafterTrainer(d, DrafterTrainConfig(lr=3e-3, warmup_steps=5, total_steps=steps, tokens_per_batch=1024,
                                         unroll_steps=2, seed=seed)).train(samples, max_steps=steps)
    return d
