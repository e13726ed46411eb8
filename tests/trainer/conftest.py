from __future__ import annotations

import pytest

from tests.trainer.rl_setup import make_rl_assets


@pytest.fixture(scope="session")
def rl_assets(tmp_path_factory):
    """A tiny policy, a JSONL task and a tiny drafter, built once for every RL test module (~15 s)."""
    return make_rl_assets(tmp_path_factory.mktemp("rl"))
