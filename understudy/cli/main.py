"""The `understudy` command line. Every command fails with one clear line (what is wrong, where, what to do)
and a non-zero exit status, never a bare traceback (set UNDERSTUDY_DEBUG=1 to see one)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from understudy.cli.demo import demo_app
from understudy.clients import cli_client
from understudy.errors import UnderstudyError, UserError
from understudy.registry.cli import drafters_app

log = logging.getLogger("understudy.cli")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"obj": {"remote_admin": cli_client}},  # `drafters list/rollback --server`
                  help="Understudy: an inference server that ships the drafter co-trained with its target model.")
drafter_app = typer.Typer(no_args_is_help=True, help="Train and export the EAGLE-style drafter.")
app.add_typer(drafter_app, name="drafter")
app.add_typer(drafters_app, name="drafters")
app.add_typer(demo_app, name="demo")  # understudy demo grid-risk: the whole loop, measured (understudy/cli/demo.py)
cli_client.register(app, drafters_app)  # chat, complete; drafters current|pin|follow (a live server)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    quantize: Annotated[str, typer.Option("--quantize", help="none | int8 | int4: weight-only quantised linear layers "
                                          "(CPU; docs/performance.md)")] = "none",
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    seed: Annotated[int | None, typer.Option(help="Per-request seed")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 128,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(
        help="threads on CPU, torch's and the native kernels' (default: every core)")] = None,
    registry: Annotated[str | None, typer.Option("--registry", help="Registry folder (for version/alias)")] = None,
) -> None:
    """Generate one completion, optionally with speculative decoding, and report its spec-decode stats."""
    from understudy.engine.config import EngineConfig
    from understudy.engine.engine import Engine
    from understudy.engine.loader import load_model, resolve_dtype
    from understudy.engine.sampling import SamplingParams
    from understudy.engine.text import encode_prompt

    if drafter and ngram:
        raise UserError("--drafter and --ngram are exclusive: pick one proposer")
    dt = resolve_dtype(dtype, device)
    lm = load_model(model, dtype=dt, device=device, quantize=quantize)
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
                  "proposer": proposer, "dtype": dt, "quantize": quantize},
    }
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(text)
        s = result["stats"]
        typer.echo(f"\n[{s['num_tokens']} tokens, {s['tokens_per_s']} tok/s, proposer {proposer}, dtype {dt}, "
                   f"mean acceptance length {s['mean_acceptance_length']}]", err=True)


def _load_drafter_arg(spec: str, lm, registry: str | None, option: str = "--drafter"):  # type: ignore[no-untyped-def]
    from understudy.drafter.model import load_drafter

    path = Path(spec).expanduser()
    if path.is_dir():
        return load_drafter(path, lm.model, lm.fingerprint)
    from understudy.registry.store import Registry, RegistryError

    try:
        _, folder = Registry.open(registry, create=False).checkout(spec, lm.fingerprint)  # family + checksums
    except RegistryError as e:
        raise UserError(f"{option} {spec!r}: not a folder, and not in the registry ({e})") from e
    return load_drafter(folder, lm.model, lm.fingerprint)


# ---- drafter ------------------------------------------------------------------------------------------------------
def _check_drafter_train_args(publish: bool, publish_every_minutes: float, threads: int | None, precision: str,
                              data_minutes: float | None, max_minutes: float, feature_noise: float,
                              data_dtype: str = "auto") -> None:
    if publish_every_minutes < 0:
        raise UserError(f"--publish-every-minutes must be >= 0, got {publish_every_minutes}")
    if publish_every_minutes and not publish:
        raise UserError("--publish-every-minutes needs --publish (it publishes improving checkpoints)")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    from understudy.engine.loader import TRAINING_PRECISIONS

    if precision not in TRAINING_PRECISIONS:
        raise UserError(f"--precision must be auto, float32 or bfloat16, got {precision!r}")
    if data_dtype not in TRAINING_PRECISIONS:
        raise UserError(f"--data-dtype must be auto, float32 or bfloat16, got {data_dtype!r}")
    if feature_noise < 0:
        raise UserError(f"--feature-noise must be >= 0, got {feature_noise}")
    if data_minutes is not None and not 0 < data_minutes < max_minutes:
        raise UserError(f"--data-minutes must be > 0 and below --max-minutes ({max_minutes}), got {data_minutes}")


@drafter_app.command("train")
def drafter_train(
    out: Annotated[Path, typer.Option("--out", help="Drafter folder to write (atomically)")],
    model: Annotated[str, typer.Option("--model")] = "smollm2-135m",
    prompts: Annotated[list[Path] | None, typer.Option(
        "--prompts", help="JSONL ('prompt', optional 'split') or text file; repeatable (default: the shipped general "
        "and grid-risk sets)")] = None,
    max_minutes: Annotated[float, typer.Option("--max-minutes", help="Wall-clock budget for the whole run")] = 20.0,
    data_minutes: Annotated[float | None, typer.Option(
        "--data-minutes", help="Budget for generating data (default: half of --max-minutes); data made earlier with "
        "the same budget, prompts and model is reused from the cache")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Response length for training data")] = 256,
    sampled_copies: Annotated[int, typer.Option("--sampled-copies", help="Extra sampled responses per prompt")] = 1,
    draft_vocab_size: Annotated[int, typer.Option("--draft-vocab-size", help="Reduced draft vocabulary (0 = full)")] = 2048,
    unroll_steps: Annotated[int, typer.Option("--unroll-steps", help="Draft steps trained per position (TTT)")] = 3,
    feature_noise: Annotated[float, typer.Option(
        "--feature-noise", help="Std of Gaussian noise on the target features the drafter reads (EAGLE's "
        "augmentation; the features' per-dimension std is about 1)")] = 0.0,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    precision: Annotated[str, typer.Option(
        "--precision", help="Training matmuls: float32, bfloat16 (mixed precision), or auto (bfloat16 where the "
        "CPU has AMX / AVX512-BF16 or on CUDA). float32 by default: on an AMX CPU bf16 made a drafter step only "
        "1.17x cheaper, with a higher loss (docs/drafter-recipe.md)")] = "float32",
    data_dtype: Annotated[str, typer.Option(
        "--data-dtype", help="dtype the target decodes the training data in: auto (the engine's default here: "
        "bfloat16 where the CPU has AMX / AVX512-BF16, 2.3x faster there; float32 elsewhere), float32 or bfloat16. "
        "Pass the serving engine's dtype, so the drafter learns the features it will be fed")] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    publish: Annotated[bool, typer.Option("--publish", help="Publish the result to the registry")] = False,
    publish_every_minutes: Annotated[float, typer.Option(
        "--publish-every-minutes", help="With --publish: every N minutes of training, measure held-out "
        "acceptance and publish the drafter if it beats every earlier version of this run (0 = at the end only)",
    )] = 0.0,
    events: Annotated[bool, typer.Option("--events", help="Print one JSON line per published version on stdout "
                                         "(read by `understudy serve --ensure-drafter`)")] = False,
    registry: Annotated[str | None, typer.Option("--registry")] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="torch threads for training (default: every core; `serve --ensure-drafter` passes 1, "
        "beside the server)")] = None,
    init_from: Annotated[str | None, typer.Option(
        "--init-from", help="Continue a trained drafter (folder, registry version or alias) instead of starting "
        "fresh: its draft vocabulary is kept (--draft-vocab-size is ignored), and with --publish only what beats "
        "its held-out acceptance is published")] = None,
) -> None:
    """Self-distil a drafter for MODEL: the target answers the prompts, the drafter learns its hidden states."""
    from dataclasses import replace

    import torch

    from understudy.drafter.warmup import WARMUP_TRAIN, WarmupConfig, warmup_train
    from understudy.engine.loader import load_model

    _check_drafter_train_args(publish, publish_every_minutes, threads, precision, data_minutes, max_minutes,
                              feature_noise, data_dtype)
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = WarmupConfig(prompts=tuple(str(p) for p in prompts or ()), max_minutes=max_minutes, data_minutes=data_minutes,
                       max_new_tokens=max_new_tokens, sampled_copies=sampled_copies, data_dtype=data_dtype,
                       draft_vocab_size=draft_vocab_size, seed=seed,
                       train=replace(WARMUP_TRAIN, lr=lr, unroll_steps=unroll_steps, seed=seed, precision=precision,
                                     feature_noise=feature_noise))
    lm = load_model(model, dtype="float32")
    start = _load_drafter_arg(init_from, lm, registry, "--init-from") if init_from else None
    publisher = _Publisher(registry, out, events) if publish else None
    report = warmup_train(lm, out, cfg, drafter=start, on_checkpoint=publisher,
                          checkpoint_every_s=publish_every_minutes * 60 or None)
    ho, ood = report.get("heldout") or {}, report.get("ood") or {}
    typer.echo(f"drafter written to {out} ({report['steps']} steps, {report['tokens_seen']} tokens, "
               f"{report['precision']} training)")
    if report.get("initial"):
        first = report["initial"]
        typer.echo(f"started from {init_from}: held-out expected acceptance length {first['heldout_acceptance_length']:.2f} "
                   f"at k={first['heldout']['k']}" + "".join(
                       f"; {src} {e['expected_acceptance_length']:.2f}"
                       for src, e in (first.get("heldout_by_prompts") or {}).items()))
    if ho:
        typer.echo(f"held-out: top-1 agreement {ho['top1_agreement']:.3f}, expected acceptance length "
                   f"{ho['expected_acceptance_length']:.2f} at k={ho['k']} (per position {ho['per_position_acceptance']})")
    for src, ev in (report.get("heldout_by_prompts") or {}).items():
        typer.echo(f"  held-out {src}: expected acceptance length {ev['expected_acceptance_length']:.2f} at "
                   f"k={ev['k']} (per position {ev['per_position_acceptance']})")
    if ood:
        typer.echo(f"out-of-domain: top-1 agreement {ood['top1_agreement']:.3f}, expected acceptance length "
                   f"{ood['expected_acceptance_length']:.2f}")
    if publisher is not None:
        if publisher.published:
            typer.echo(f"published versions {', '.join(map(str, publisher.published))} in {publisher.registry.root}")
        else:
            typer.echo("nothing published: no checkpoint had a held-out acceptance estimate", err=True)


class _Publisher:
    """`drafter train --publish`: each improving checkpoint (and the final drafter, if better still) becomes a
    registry version; `latest` moves to it, so servers following the alias swap it in."""

    def __init__(self, registry: str | None, out: Path, events: bool) -> None:
        from understudy.registry.store import Registry

        self.registry = Registry.open(registry)
        self.staging_parent = out.parent
        self.events = events
        self.published: list[int] = []

    def __call__(self, drafter, report: dict) -> None:  # type: ignore[no-untyped-def, type-arg]
        import tempfile

        from understudy.drafter.model import save_drafter

        length = report.get("heldout_acceptance_length")
        ho = report.get("heldout") or {}
        self.staging_parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".publish-", dir=self.staging_parent) as tmp:
            staged = Path(tmp) / "drafter"
            save_drafter(drafter, staged, extra_training=report)
            info = self.registry.publish(staged, metrics={"heldout_acceptance_length": length, "heldout": ho,
                                                          "heldout_by_prompts": report.get("heldout_by_prompts"),
                                                          "steps": report.get("steps")},
                                         training_config=report.get("config"),
                                         note=f"understudy drafter train: step {report.get('steps')}")
        self.published.append(info.version)
        log.info("published drafter version %d (held-out acceptance length %s at k=%s)", info.version,
                 f"{length:.3f}" if length is not None else "n/a", ho.get("k"))
        if self.events:
            print(json.dumps({"event": "published", "version": info.version, "heldout_acceptance_length": length,
                              "per_position_acceptance": ho.get("per_position_acceptance"), "k": ho.get("k"),
                              "by_prompts": {src: ev["expected_acceptance_length"]
                                             for src, ev in (report.get("heldout_by_prompts") or {}).items()},
                              "steps": report.get("steps")}), flush=True)


@drafter_app.command("eval")
def drafter_eval(
    drafter: Annotated[str, typer.Argument(help="Drafter folder, registry version or alias")],
    model: Annotated[str, typer.Option("--model")] = "smollm2-135m",
    prompts: Annotated[list[Path] | None, typer.Option(
        "--prompts", help="Prompt file (JSONL or text; repeatable). Its `heldout` rows if it has any, else all rows. "
        "Default: the shipped general set and the grid-risk set, side by side")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Length of the target's answers")] = 128,
    max_k: Annotated[int, typer.Option("--max-k", help="Longest draft length to evaluate")] = 6,
    limit: Annotated[int | None, typer.Option("--limit", help="At most this many prompts per file")] = None,
    dtype: DtypeOpt = "auto",
    threads: Annotated[int, typer.Option(help="torch threads (costs are timed with these)")] = 1,
    registry: Annotated[str | None, typer.Option("--registry")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Per-position acceptance and L at K = 1..max-k on each prompt set, this machine's verify cost per width,
    and the best K with the speed-up it predicts (understudy/drafter/evaluate.py)."""
    import torch

    from understudy.drafter.evaluate import acceptance, eval_samples, measure_costs, predict
    from understudy.engine.loader import load_model, resolve_dtype
    from understudy.engine.text import default_prompt_files

    if not 1 <= max_k <= 8:
        raise UserError(f"--max-k must be in [1, 8], got {max_k}")
    torch.set_num_threads(threads)
    dt = resolve_dtype(dtype, "cpu")
    lm = load_model(model, dtype=dt)
    d = _load_drafter_arg(drafter, lm, registry)
    sets = []
    for f in prompts or default_prompt_files():
        samples, split = eval_samples(lm, f, max_new_tokens, limit=limit)
        sets.append({"prompts": str(f), "split": split, **acceptance(d, lm, samples, max_k)})
    costs = measure_costs(lm, d, max_width=max_k + 1)
    for s in sets:
        s["predicted"] = predict(s, costs)
    result = {"drafter": drafter, "model": lm.name, "dtype": dt, "sets": sets, "costs": costs}
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"\ndrafter {drafter} on {lm.name} ({dt}, {threads} thread(s))\n")
    ks = range(1, max_k + 1)
    typer.echo("| prompts | seqs | " + " | ".join(f"a{k}" for k in ks) + " | " + " | ".join(f"L({k})" for k in ks) +
               " | best K | L decoded at best K | predicted speed-up |")
    typer.echo("|---|---|" + "---|" * (2 * max_k) + "---|---|---|")
    for s in sets:
        alpha = s["per_position_acceptance"]
        lk = s["acceptance_length_at_k"]
        p = s["predicted"]
        typer.echo(f"| {Path(s['prompts']).name} ({s['split']}) | {s['num_sequences']} | " +
                   " | ".join(f"{a:.2f}" for a in alpha) + " | " + " | ".join(f"{lk[str(k)]:.2f}" for k in ks) +
                   f" | {p['best_k']} | {s['decoded_acceptance_length_at_k'].get(str(p['best_k']), 1.0):.2f}"
                   f" | {p['best_speedup']:.2f}x |")
    v = sets[0]["predicted"]["verify_cost_vs_width1"]
    typer.echo(f"\nverify cost vs width 1 (batch 1, {costs['prefix']}-token prefix, median of 5): " +
               ", ".join(f"w{w} {x:.2f}" for w, x in v.items()) +
               f"; one drafter step {sets[0]['predicted']['draft_step_vs_width1']:.2f}; width 1 = "
               f"{costs['verify_s']['1'] * 1e3:.1f} ms")


@drafter_app.command("export-vllm")
def drafter_export_vllm(
    src: Annotated[Path, typer.Argument(help="Understudy drafter folder")],
    out: Annotated[Path, typer.Argument(help="Output folder in vLLM's eagle layout")],
) -> None:
    """Write a drafter in vLLM's `eagle` layout (use with --speculative-config '{"method": "eagle", ...}')."""
    from understudy.drafter.export import export_vllm

    shapes = export_vllm(src, out)
    typer.echo(f"wrote {len(shapes)} tensors to {out}")
    for k, v in shapes.items():
        typer.echo(f"  {k}: {v}")


# ---- serve ----------------------------------------------------------------------------------------------------------
def _serve_options(
    print_settings: Annotated[bool, typer.Option("--print-settings", help="Print the resolved settings "
                                                 "(flags > environment > defaults) as JSON and exit")] = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run the OpenAI-compatible server. Every setting is a flag and an UNDERSTUDY_* environment variable."""


def _run_serve(overrides: dict, opts: dict) -> None:  # type: ignore[type-arg]
    from pydantic import ValidationError

    from understudy.server.main import serve as run_server
    from understudy.server.settings import ServerSettings

    try:
        settings = ServerSettings(**overrides)
    except ValidationError as e:
        first = e.errors()[0]
        where = f"--{str(first['loc'][0]).replace('_', '-')}: " if first["loc"] else ""
        raise UserError(f"{where}{str(first['msg']).removeprefix('Value error, ')}") from e
    if opts["print_settings"]:
        shown = settings.model_dump(mode="json")
        for secret in ("api_key", "admin_key"):
            if shown.get(secret):
                shown[secret] = "***"
        typer.echo(json.dumps(shown, indent=2))
        return
    run_server(settings, log_level=opts["log_level"])


def _register_serve() -> None:
    from understudy.cli.settings_cli import settings_command
    from understudy.server.settings import ServerSettings

    app.command("serve")(settings_command(ServerSettings, "UNDERSTUDY_", _serve_options, _run_serve))


_register_serve()


@drafters_app.command("publish-policy")
def drafters_publish_policy(
    src: Annotated[Path, typer.Argument(help="A policy folder (config.json, model.safetensors, tokenizer files), "
                                        "e.g. OUT_DIR/policy written by `understudy train`")],
    note: Annotated[str | None, typer.Option("--note", help="Free-text note stored in the manifest")] = None,
    registry: Annotated[str | None, typer.Option("--registry", help="Registry folder")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts)")] = False,
) -> None:
    """Import a policy (the target's own weights) as the next version; it moves no alias. Then publish a drafter
    trained against it with `understudy drafters publish DIR --policy N`: `latest` names that pair."""
    from understudy.engine.loader import folder_family
    from understudy.registry.store import Registry

    fingerprint, shape = folder_family(str(src))
    info = Registry.open(registry, create=True).publish_policy(src, family_fingerprint=fingerprint, target=shape,
                                                                note=note)
    if as_json:
        typer.echo(json.dumps({"version": info.version, "path": str(info.path), "manifest": info.manifest}, indent=2))
    else:
        typer.echo(f"published policy version {info.version} ({fingerprint}) to {info.path}")


# ---- RL training ----------------------------------------------------------------------------------------------------
@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", help="TOML config (see configs/ and understudy/trainer/config.py)")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT_DIR/checkpoint.pt")] = False,
    steps: Annotated[int | None, typer.Option("--steps", help="Override the number of steps")] = None,
    out_dir: Annotated[str | None, typer.Option("--out-dir", help="Override out_dir")] = None,
    registry: Annotated[str | None, typer.Option("--registry", help="Override the drafter registry")] = None,
    speculation: Annotated[bool | None, typer.Option("--speculation/--no-speculation", help="TLT on/off")] = None,
    executor: Annotated[str | None, typer.Option("--executor", help="local (threads) or ray (actors; docs/ray.md)")] = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Ray cluster to join (auto, HOST:6379); implies --executor ray")] = None,
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="none | int8 | int4: rollouts decode with a weight-only quantised copy of the policy, "
                           "re-quantised after every update (the update itself stays in float)")] = None,
) -> None:
    """GRPO with TLT-accelerated rollouts; publishes policy + drafter pairs and saves the policy as it goes."""
    from understudy.trainer.config import load_config

    if ray_address and executor is None:
        executor = "ray"
    cfg = load_config(config, {"steps": steps, "out_dir": out_dir, "registry": registry, "speculation": speculation,
                               "executor": executor, "ray_address": ray_address, "rollout_quantize": quantize})
    if cfg.executor == "ray":  # the learner is an actor; the driver restarts it from its checkpoint if it dies
        from understudy.trainer import ray_driver

        result = ray_driver.train(cfg, resume=resume)
        _print_train_result(cfg, result, result.get("final_step", 0))
        return
    from understudy.trainer.grpo import GRPOTrainer

    trainer = GRPOTrainer(cfg)
    if resume:
        if trainer.resume():
            typer.echo(f"resumed from {cfg.out_dir}/checkpoint.pt at step {trainer.step}", err=True)
        else:
            typer.echo(f"no checkpoint in {cfg.out_dir}: starting from step 0", err=True)
    _print_train_result(cfg, trainer.fit(), trainer.step)


def _print_train_result(cfg: Any, result: dict[str, Any], step: int) -> None:
    if not result["history"]:
        typer.echo(f"nothing to do: {cfg.out_dir} already finished {step} of {cfg.steps} steps", err=True)
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


@app.command()
def sft(
    out: Annotated[Path, typer.Option("--out", help="Folder for the fine-tuned HF model (a policy for `train`)")],
    model: Annotated[str, typer.Option("--model", help="Model to fine-tune (preset, HF folder, .gguf)")] = "smollm2-135m",
    task: Annotated[str, typer.Option("--task", help="A task that writes and checks worked solutions")] = "grid-risk",
    max_minutes: Annotated[float, typer.Option("--max-minutes", help="Training time (evaluation excluded)")] = 10.0,
    steps: Annotated[int | None, typer.Option("--steps")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate (docs/trainer-tasks.md)")] = 3e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per optimizer step")] = 8,
    eval_problems: Annotated[int, typer.Option("--eval-problems", help="Held-out problems, before and after")] = 64,
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", help="Longest prompt + solution (tokens)")] = 384,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", help="Response budget of the accuracy evaluations (grid-risk solutions: about 120)")] = 160,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="torch threads (default: every core; 1 beside a server using the other core)")] = None,
    train_layers: Annotated[int | None, typer.Option(
        "--train-layers", help="Train only the top N decoder layers (+ final norm); default: every weight")] = None,
    lora_rank: Annotated[int | None, typer.Option(
        "--lora-rank", help="Train LoRA adapters of this rank (peft), merged at the end; default: every weight")] = None,
    precision: Annotated[str, typer.Option(
        "--precision", help="auto (bfloat16 mixed precision where the CPU has AMX / AVX512-BF16, else float32), "
                            "float32 or bfloat16")] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Supervised fine-tuning on a task's worked solutions (written and checked by the task): the warm start
    before GRPO. Prints held-out greedy accuracy before and after; the result is a policy folder."""
    from understudy.trainer.pretrain import PretrainConfig
    from understudy.trainer.pretrain import pretrain as run_pretrain

    cfg = PretrainConfig(task=task, init=model, max_minutes=max_minutes, steps=steps, lr=lr, batch_size=batch_size,
                         warmup_steps=5, eval_every=0, eval_problems=eval_problems,
                         final_eval_problems=eval_problems, max_seq_len=max_seq_len, max_new_tokens=max_new_tokens,
                         seed=seed, num_threads=threads, train_layers=train_layers, lora_rank=lora_rank,
                         precision=precision)
    report = run_pretrain(cfg, out)
    typer.echo(json.dumps({k: report.get(k) for k in ("out", "steps", "tokens", "train_seconds", "precision",
                                                      "lora_params",
                                                      "initial_accuracy",
                                                      "accuracy", "constant_answer", "constant_answer_accuracy",
                                                      "problems_where_constant_fails",
                                                      "initial_accuracy_where_constant_fails",
                                                      "accuracy_where_constant_fails", "initial_format_rate",
                                                      "format_rate")}))


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
