"""Runs inside vLLM's worker process, not ours: the in-place weight loads of a pair swap.

vLLM mixes this class into its worker (`--worker-extension-cls`), and our server calls its methods through
vLLM's `/collective_rpc` (the pattern vLLM documents for RLHF weight updates). vLLM runs from its own
interpreter, where `understudy` is not installed: this file imports nothing of ours. VllmBackend copies it into
its run folder, puts that folder on the child's PYTHONPATH and names the class `understudy_vllm_worker.
UnderstudyWorker`.

The target's new weights load with vLLM's own `reload_weights` (layer-wise, so CPU weight repacking and any
post-load processing run again). The drafter's go through the same function, given the drafter model and its
own model config. Both copy into the tensors already there: the drafter keeps sharing the target's embedding
and LM head, and nothing is reallocated.
"""

from __future__ import annotations

import json
import time
import types
from pathlib import Path
from typing import Any


class UnderstudyWorker:
    """Methods vLLM's worker gains (`self` is the worker: `model_runner`, `vllm_config`)."""

    def understudy_load_target(self, folder: str) -> dict[str, Any]:
        """Load the target's weights from a HF safetensors folder of the same architecture, in place."""
        t0 = time.perf_counter()
        self.reload_weights(weights_path=folder, is_checkpoint_format=True)  # type: ignore[attr-defined]
        return {"seconds": time.perf_counter() - t0, "params": _count(self.model_runner.get_model())}  # type: ignore[attr-defined]

    def understudy_load_drafter(self, folder: str) -> dict[str, Any]:
        """Load an exported EAGLE drafter folder (config.json + model.safetensors) into the running drafter."""
        from safetensors.torch import load_file
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        t0 = time.perf_counter()
        proposer = getattr(self.model_runner, "drafter", None)  # type: ignore[attr-defined]
        model = getattr(proposer, "model", None)
        if model is None:
            raise RuntimeError("this vLLM process runs no drafter model (started without a speculative config)")
        cfg = self.vllm_config  # type: ignore[attr-defined]
        draft_cfg = cfg.speculative_config.draft_model_config
        want = json.loads((Path(folder) / "config.json").read_text())
        have = draft_cfg.hf_config.to_dict()
        shape_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                      "num_hidden_layers", "vocab_size", "attention_bias")
        diff = {k: (have.get(k), want.get(k)) for k in shape_keys if have.get(k) != want.get(k)}
        if diff:
            raise ValueError(f"{folder}: drafter shapes differ from the running one {diff}; needs a new process")
        weights = load_file(str(Path(folder) / "model.safetensors"))
        # reload_weights reads the model config (dtype, quantization) and lora config off the object it is given
        view = types.SimpleNamespace(model_config=draft_cfg, load_config=cfg.load_config, lora_config=None)
        with set_current_vllm_config(cfg):
            reload_weights(view, model, weights_iterator=iter(weights.items()), weights_path=None,  # type: ignore[arg-type]
                           is_checkpoint_format=True)
        return {"seconds": time.perf_counter() - t0, "tensors": len(weights)}


def _count(model: Any) -> int:
    return sum(1 for _ in model.parameters())
