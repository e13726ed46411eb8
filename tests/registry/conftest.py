"""Fixtures shared by the registry tests: a tiny target, a drafter folder for it (family "fam-x"), a registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from understudy.drafter.model import new_drafter, save_drafter
from understudy.engine.config import ModelConfig
from understudy.engine.model import Transformer
from understudy.registry.store import Registry


def tiny_config() -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def target() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config())


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory, target) -> Path:
    folder = tmp_path_factory.mktemp("drafters") / "fam-x"
    save_drafter(new_drafter(target, "fam-x"), folder)  # (a link to its generation folder: see fsutil)
    return folder


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry.open(tmp_path / "reg")
