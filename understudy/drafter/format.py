"""The drafter's on-disk format, checked in one place, without torch.

A drafter folder holds `config.json` (a DrafterConfig) and `model.safetensors` (the drafter's own weights: fc,
one decoder layer, the draft vocabulary; never the target's embedding or LM head). Everything that takes a
drafter in (`load_drafter`, the registry's `publish` and `checkout`, the vLLM backend) validates it here:
`read_drafter_config` (format tag, JSON), `check_weights_header` (complete file, shapes match the config) and
`check_family` (trained for this target's family: architecture, shapes and tokenizer).
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from understudy.engine.config import ModelConfig
from understudy.errors import UnderstudyError

DRAFTER_FORMAT = "understudy-eagle-v1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class DrafterError(UnderstudyError, RuntimeError):
    """A drafter folder is missing, corrupt, or belongs to another model family."""


@dataclass(frozen=True)
class DrafterConfig:
    target: ModelConfig  # the target's shapes (the drafter's layer copies them)
    family_fingerprint: str  # the target family it was trained for (engine.config.family_fingerprint)
    draft_vocab_size: int  # rows of the reduced draft vocabulary (== target vocab_size: full vocab)
    format: str = DRAFTER_FORMAT
    training: dict[str, Any] = field(default_factory=dict)  # metrics + resolved training config, for manifests

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = asdict(self.target)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DrafterConfig:
        return cls(target=ModelConfig(**d["target"]), family_fingerprint=d["family_fingerprint"],
                   draft_vocab_size=int(d["draft_vocab_size"]), format=d.get("format", DRAFTER_FORMAT),
                   training=d.get("training", {}))

    def with_training(self, extra: dict[str, Any]) -> DrafterConfig:
        return DrafterConfig(target=self.target, family_fingerprint=self.family_fingerprint,
                             draft_vocab_size=self.draft_vocab_size, format=self.format,
                             training={**self.training, **extra})


def read_drafter_config(folder: Path) -> DrafterConfig:
    folder = Path(folder)
    cfg_file = folder / CONFIG_FILE
    if not folder.is_dir():
        raise DrafterError(f"drafter folder {folder} does not exist; pass a folder written by "
                           "`understudy drafter train` or a registry version")
    if not cfg_file.exists():
        raise DrafterError(f"{cfg_file} is missing: {folder} is not a drafter folder")
    try:
        raw = json.loads(cfg_file.read_text())
        if raw.get("format") != DRAFTER_FORMAT:
            raise DrafterError(f"{cfg_file}: format {raw.get('format')!r} is not {DRAFTER_FORMAT!r}; "
                               "re-train or re-export the drafter with this version of Understudy")
        return DrafterConfig.from_json(raw)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DrafterError(f"{cfg_file} is malformed ({type(e).__name__}: {e}); re-train or re-publish it") from e


def check_family(found: str, target_fingerprint: str, what: str, shape: str = "") -> None:
    """The one compatibility rule: a drafter serves only the model family it was trained for."""
    if found != target_fingerprint:
        raise DrafterError(
            f"{what} was trained for model family {found}{f' ({shape})' if shape else ''}, but the target is "
            f"{target_fingerprint} (different architecture, shapes or tokenizer). Pick a drafter of this family "
            "(`understudy drafters list` shows each one's family) or train one with "
            "`understudy drafter train --model ... --publish`")


def check_weights_header(path: Path, cfg: DrafterConfig) -> None:
    """Parse the safetensors header (no torch needed): the file is complete and shaped like cfg's drafter."""
    bad = f"{path} is not a valid drafter checkpoint"
    fix = "re-train or re-export the drafter"
    if not path.is_file():
        raise DrafterError(f"{path} is missing; a drafter folder holds {CONFIG_FILE} + {WEIGHTS_FILE}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
        shapes = {k: list(t["shape"]) for k, t in header.items()}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DrafterError(f"{bad} ({type(e).__name__}: {e}); {fix}") from e
    if end != size - 8 - n:
        raise DrafterError(f"{bad}: tensor data ends at byte {end} but the file holds {size - 8 - n} "
                           f"(truncated or padded); {fix}")
    h = cfg.target.hidden_size
    want = {"fc.weight": [h, 2 * h], "draft_vocab": [cfg.draft_vocab_size]}
    for key, shape in want.items():
        if shapes.get(key) != shape:
            raise DrafterError(f"{bad}: tensor {key} has shape {shapes.get(key)}, {CONFIG_FILE} implies {shape}; {fix}")


def validate_folder(folder: Path) -> DrafterConfig:
    """Config readable and in this format, weights complete and shaped as the config says."""
    cfg = read_drafter_config(folder)
    check_weights_header(Path(folder) / WEIGHTS_FILE, cfg)
    return cfg
