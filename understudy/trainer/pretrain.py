"""Pretrain a tiny Llama policy from scratch on a task's canonical worked solutions (docs/design.md, "Tiny policies"),
or fine-tune an existing model on them (`init`: supervised fine-tuning, the warm start before GRPO).

The result is a normal HF safetensors folder (config.json, model.safetensors, a character tokenizer with a chat
template, eos "</s>") that `understudy.engine.loader.load_model` loads: a fast, honest policy for RL smoke
tests, whose response lengths vary with the problem (a real long tail).

Each example is `chat(prompt) + solution + eos`; the loss is next-token cross-entropy on the solution and the
eos only. The solutions are written and checked by the task itself (`task.reward(problem, solution) == 1` for
every one used: a task whose writer and checker disagree is refused, naming the problem). AdamW, linear warm-up then cosine decay to `min_lr_ratio * lr` over the run, where the run's
progress is max(step / steps, training time / max_minutes). Greedy accuracy is measured through the engine
(`Engine.generate`, no speculation, float32) every `eval_every` steps and at the end.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from understudy.engine.config import EngineConfig, ModelConfig
from understudy.engine.engine import Engine
from understudy.engine.loader import TRAINING_PRECISIONS, resolve_dtype, save_model
from understudy.engine.model import Transformer, enable_cpu_packing
from understudy.engine.sampling import SamplingParams
from understudy.engine.text import encode_prompt, encode_text
from understudy.errors import UnderstudyError
from understudy.trainer.chartok import make_char_tokenizer
from understudy.trainer.tasks import Problem, SolvableTask, Task, TaskError, answer_line, get_task
from understudy.trainer.timing import PhaseTimes


class PretrainConfigError(UnderstudyError, ValueError):
    """A PretrainConfig (or `understudy pretrain` / `sft` option) that cannot work; the message names the field."""


@dataclass(frozen=True)
class PretrainConfig:
    """The tiny-policy recipe. Defaults: a 2.6M-parameter model on step-by-step arithmetic."""

    task: str = "arith"  # a registered task that writes canonical solutions (arith, countdown, grid-risk)
    init: str | None = None  # fine-tune this model (preset, HF folder, .gguf) with its own tokenizer (SFT); None:
    #                          a fresh tiny model with the character tokenizer (the fields below shape it)
    task_kwargs: dict[str, Any] = field(default_factory=dict)  # options of the task, e.g. {"max_digits": 2}
    hidden_size: int = 256  # model width H
    num_layers: int = 4  # decoder layers
    num_heads: int = 4  # attention heads (head_dim = H / heads; no grouped-query attention)
    intermediate_size: int = 512  # MLP width
    max_seq_len: int = 256  # longest prompt + solution (the model's max_position_embeddings)
    batch_size: int = 16  # sequences per optimizer step
    lr: float = 5e-4  # peak AdamW learning rate (2e-3 and 3e-3 learned slower: docs/trainer-tasks.md)
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 50  # linear warm-up from 0 to lr
    weight_decay: float = 0.01  # AdamW decay on matrices (not on norms)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    grad_clip: float = 1.0  # clip the global gradient norm
    steps: int | None = None  # stop after this many steps (None: time budget only)
    max_minutes: float | None = 9.0  # stop after this much training time, evaluation excluded (None: steps only)
    eval_every: int = 200  # greedy evaluation every this many steps (0 = only at the end)
    eval_problems: int = 64  # problems per periodic evaluation (a fixed set)
    final_eval_problems: int = 256  # problems in the final evaluation (includes the periodic set)
    max_new_tokens: int = 128  # generation budget per evaluation problem
    seed: int = 0  # model init, data and evaluation problems
    num_threads: int | None = 1  # torch threads on CPU (one is fastest on 2-core CPUs: docs/performance.md)
    train_layers: int | None = None  # with `init`: train only the top N decoder layers and the final norm (the
    #                                  embedding / LM head and the layers below stay frozen, so the backward pass
    #                                  stops at layer L-N); None trains every weight
    lora_rank: int | None = None  # with `init`: train LoRA adapters of this rank (peft) on every linear layer of the
    #                               decoder (attention and MLP) instead of the weights, merged into them at the end
    #                               (the saved policy is a plain model); None: full fine-tuning
    lora_alpha: float | None = None  # LoRA scale alpha / rank; None: alpha = 2 x rank
    precision: str = "float32"  # the training step's matmuls: float32, or bfloat16 (torch.autocast mixed precision:
    #                            the weights, gradients and optimizer state stay float32), or auto: bfloat16 where
    #                            the CPU multiplies bf16 natively (AMX / AVX512-BF16; 2.1x per SFT step measured,
    #                            docs/trainer-tasks.md), float32 elsewhere (AVX2 only emulates it). Evaluation is
    #                            always float32

    def __post_init__(self) -> None:
        if self.steps is None and self.max_minutes is None:
            raise PretrainConfigError("set steps, max_minutes or both: training needs a stopping rule")
        if (self.steps is not None and self.steps < 1) or (self.max_minutes is not None and self.max_minutes <= 0):
            raise PretrainConfigError(f"steps must be >= 1 and max_minutes > 0, got {self.steps}, {self.max_minutes}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise PretrainConfigError(f"hidden_size {self.hidden_size} must split into num_heads {self.num_heads} "
                                      "heads of even width")
        if self.batch_size < 1 or self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise PretrainConfigError("need batch_size >= 1, lr > 0 and 0 <= min_lr_ratio <= 1")
        if min(self.eval_problems, self.final_eval_problems, self.max_new_tokens) < 1 or self.eval_every < 0:
            raise PretrainConfigError("eval_problems, final_eval_problems and max_new_tokens must be >= 1, "
                                      "eval_every >= 0")
        if self.train_layers is not None and (self.train_layers < 1 or self.init is None):
            raise PretrainConfigError(f"train_layers={self.train_layers}: it must be >= 1 and needs init (the model to "
                                      "fine-tune); leave it unset to train every weight")
        if self.lora_rank is not None and (self.lora_rank < 1 or self.init is None or self.train_layers is not None):
            raise PretrainConfigError(f"lora_rank={self.lora_rank}: it must be >= 1, needs init (the model to adapt) and "
                                      "excludes train_layers; leave it unset for full fine-tuning")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise PretrainConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if self.precision not in TRAINING_PRECISIONS:
            raise PretrainConfigError(f"precision must be one of {', '.join(TRAINING_PRECISIONS)}, "
                                      f"got {self.precision!r}")

    @property
    def resolved_precision(self) -> str:
        """float32 or bfloat16: `auto` resolved for this machine (as the engine's dtype auto is)."""
        return resolve_dtype(self.precision, "cpu")



# ---- model and data -----------------------------------------------------------------------------------------
def build_model(cfg: PretrainConfig, vocab_size: int) -> Transformer:
    """A fresh Llama-architecture model: N(0, 0.02) init, residual projections scaled by 1/sqrt(2L) (GPT-2)."""
    mc = ModelConfig(architecture="llama", vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                     num_kv_heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads,
                     max_position_embeddings=cfg.max_seq_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Transformer(mc)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.num_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def example_ids(tokenizer: Any, task: SolvableTask, problem: Problem) -> tuple[list[int], int]:
    """(chat(prompt) + solution + eos, prompt length): what the policy sees and what it should write. The task
    checks its own solution first: only a solution its reward scores 1.0 is ever trained on."""
    solution = task.solution(problem)
    if task.reward(problem, solution) < 1.0:
        raise TaskError(f"task {task.name!r} wrote a solution its own check rejects (answer {problem.answer!r}); "
                        f"problem:\n{problem.prompt}\nsolution:\n{solution}\nfix the task's solution() or reward()")
    prompt = encode_prompt(tokenizer, problem.prompt, chat=True)
    return prompt + encode_text(tokenizer, solution) + [tokenizer.eos_token_id], len(prompt)


def make_batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """inputs [B, T], targets [B, T] (inputs shifted by one), loss mask [B, T] (solution and eos targets)."""
    T = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, (ids, prompt_len) in enumerate(examples):
        n = len(ids) - 1
        inputs[b, :n] = torch.tensor(ids[:-1])
        targets[b, :n] = torch.tensor(ids[1:])
        mask[b, prompt_len - 1:n] = True  # the target at position t is ids[t + 1]
    return inputs, targets, mask


def lm_loss(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked positions (LM head only on those rows)."""
    hidden = model(inputs)  # [B, T, H]
    logits = model.logits(hidden[mask])  # [N, V] float32
    return F.cross_entropy(logits, targets[mask])


def lr_at(cfg: PretrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from lr to lr * min_lr_ratio as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(cfg: PretrainConfig, model: Transformer) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() == 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


# ---- evaluation ---------------------------------------------------------------------------------------------
def generate_greedy(model: Transformer, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                    max_seq_len: int) -> list[str]:
    """Greedy completions of chat-templated prompts through the engine (float32, no speculation)."""
    ids = [encode_prompt(tokenizer, p, chat=True) for p in prompts]
    params = [SamplingParams(max_tokens=max(1, min(max_new_tokens, max_seq_len - len(x))), temperature=0.0)
              for x in ids]
    was_training = model.training
    engine = Engine(model, EngineConfig(max_batch_size=min(64, len(prompts)), max_model_len=max_seq_len,
                                        num_speculative_tokens=0, proposer="none", dtype="float32",
                                        num_threads=None), eos_token_ids=(tokenizer.eos_token_id,))
    try:
        outs = engine.generate(ids, params)
    finally:
        enable_cpu_packing(model, enabled=False)  # drop the packed inference copies before training resumes
        model.train(was_training)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def evaluate(model: Transformer, tokenizer: Any, task: Task, problems: list[Problem], max_new_tokens: int,
             max_seq_len: int) -> dict[str, Any]:
    """Greedy accuracy (mean reward), the share of responses with an `answer:` line, and accuracy per kind."""
    responses = generate_greedy(model, tokenizer, [p.prompt for p in problems], max_new_tokens, max_seq_len)
    rewards = [task.reward(p, r) for p, r in zip(problems, responses, strict=True)]
    by_kind: dict[str, list[float]] = {}
    for p, r in zip(problems, rewards, strict=True):
        by_kind.setdefault(str(p.meta.get("kind", task.name)), []).append(r)
    return {
        "accuracy": sum(rewards) / len(rewards),
        "format_rate": sum(answer_line(r) is not None for r in responses) / len(responses),
        "mean_response_chars": sum(map(len, responses)) / len(responses),
        "accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "rewards": rewards,
        "examples": [{"prompt": p.prompt, "response": r} for p, r in zip(problems[:3], responses[:3], strict=True)],
    }


def constant_answer_baseline(task: Task, problems: list[Problem]) -> tuple[str | None, float]:
    """The best accuracy one fixed reply (`answer: X`, X one of the set's answers) scores on these problems: what
    a policy that learnt the format and nothing else can reach. An accuracy is only evidence of learning the task
    above this line (grid-risk: `secure` scores about 1 - p_overload)."""
    scores = {a: sum(task.reward(p, f"answer: {a}") for p in problems) / len(problems)
              for a in sorted({str(p.answer) for p in problems})}
    best = max(scores, key=scores.__getitem__, default=None)
    return best, (scores[best] if best is not None else 0.0)


def constant_fails(task: Task, problems: list[Problem], constant: str | None) -> list[bool]:
    """Per problem: does the constant reply `answer: <constant>` score 0 there (always, without a constant)?"""
    return [constant is None or task.reward(p, f"answer: {constant}") == 0 for p in problems]


def accuracy_where_constant_fails(task: Task, problems: list[Problem], rewards: list[float],
                                  constant: str | None) -> float | None:
    """Mean reward on the problems that the constant reply gets wrong: the constant scores 0 there, so this is
    the part of an accuracy that the format alone cannot buy (None when the constant is never wrong)."""
    rest = [r for r, fails in zip(rewards, constant_fails(task, problems, constant), strict=True) if fails]
    return sum(rest) / len(rest) if rest else None


# ---- the recipe ---------------------------------------------------------------------------------------------
def _solvable_task(cfg: PretrainConfig) -> SolvableTask:
    task = get_task(cfg.task, **cfg.task_kwargs)
    if not isinstance(task, SolvableTask):
        raise TaskError(f"task {cfg.task!r} has no canonical solutions to pretrain on; use arith, countdown "
                        "or grid-risk")
    return task


def _sample_examples(task: SolvableTask, tokenizer: Any, rng: random.Random, n: int,
                     max_seq_len: int) -> list[tuple[list[int], int]]:
    out: list[tuple[list[int], int]] = []
    skipped = 0
    while len(out) < n:
        ids, prompt_len = example_ids(tokenizer, task, task.sample(rng))
        if len(ids) <= max_seq_len:  # an over-long example is skipped, not truncated
            out.append((ids, prompt_len))
            continue
        skipped += 1
        if skipped > 100 * n and skipped > 50 * len(out):
            raise TaskError(f"task {task.name!r}: {skipped} of {skipped + len(out)} examples are longer than "
                            f"max_seq_len {max_seq_len} tokens (the last: {len(ids)}); raise --max-seq-len")
    return out


def _progress(cfg: PretrainConfig, step: int, train_s: float) -> float:
    by_steps = step / cfg.steps if cfg.steps else 0.0
    by_time = train_s / (60.0 * cfg.max_minutes) if cfg.max_minutes else 0.0
    return max(by_steps, by_time)


def _train_step(model: Transformer, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...], lr: float,
                grad_clip: float, precision: str = "float32") -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        loss = lm_loss(model, *batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


def _initial_model(cfg: PretrainConfig) -> tuple[Transformer, Any]:
    if cfg.init is None:
        tokenizer = make_char_tokenizer()
        return build_model(cfg, len(tokenizer)), tokenizer
    from understudy.engine.loader import load_model

    lm = load_model(cfg.init, dtype="float32")
    if lm.tokenizer.eos_token_id is None:
        raise TaskError(f"{cfg.init}: its tokenizer has no eos token, which every worked solution must end with")
    lm.model.requires_grad_(cfg.train_layers is None)
    if cfg.train_layers is not None:
        layers = lm.model.layers
        if cfg.train_layers > len(layers):
            raise PretrainConfigError(f"train_layers {cfg.train_layers} > the {len(layers)} decoder layers of "
                                      f"{cfg.init}")
        for layer in layers[len(layers) - cfg.train_layers:]:
            layer.requires_grad_(True)
        lm.model.norm.requires_grad_(True)
    return lm.model, lm.tokenizer


LORA_TARGETS = ("wqkv", "wo", "w13", "w2")  # every linear layer of the decoder (the LM head and embedding stay frozen)


def add_lora(model: Transformer, rank: int, alpha: float | None) -> int:
    """Freeze `model` and inject LoRA adapters (peft, B = 0 at the start: the outputs are unchanged) into every
    decoder linear layer; returns the number of trainable parameters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise PretrainConfigError("lora_rank needs peft: pip install 'understudy[lora]' (or pip install peft)") from e
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2.0 * rank,
                                       lora_dropout=0.0, target_modules=list(LORA_TARGETS)), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: Transformer) -> int:
    """Fold every LoRA adapter into its layer's weight (W += scale * B @ A) and put the plain layer back, so the
    model saves and serves like any other; returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
            merged += 1
    return merged


def pretrain(cfg: PretrainConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Train a policy on `cfg.task`'s canonical solutions (a tiny one from scratch, or `cfg.init` fine-tuned) and
    save it to `out`.

    Returns the run's metrics: steps, tokens (non-padding), seconds per phase, initial/final loss, the
    evaluation history and the final greedy `accuracy` (also written into config.json, "understudy_pretrain");
    with `init`, also `initial_accuracy`: the same evaluation before the first step.
    """
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    task = _solvable_task(cfg)
    precision = cfg.resolved_precision
    model, tokenizer = _initial_model(cfg)
    lora_params = add_lora(model, cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank is not None else None
    model.train()
    opt = make_optimizer(cfg, model)
    rng, eval_rng = random.Random(cfg.seed), random.Random(cfg.seed + 7919)
    eval_set = [task.sample(eval_rng) for _ in range(max(cfg.eval_problems, cfg.final_eval_problems))]
    times, losses, history, tokens = PhaseTimes(), [], [], 0
    before: dict[str, Any] | None = None
    if cfg.init is not None:
        with times.timed("eval"):
            before = evaluate(model, tokenizer, task, eval_set[:cfg.final_eval_problems], cfg.max_new_tokens,
                              cfg.max_seq_len)

    def train_s() -> float:  # the budget counts data + optimizer steps, not evaluation
        return times.seconds.get("data", 0.0) + times.seconds.get("step", 0.0)

    bar = tqdm(total=cfg.steps, disable=not progress, unit="step",
               desc=f"{'sft' if cfg.init else 'pretrain'} {cfg.task}")
    while _progress(cfg, len(losses), train_s()) < 1.0:
        with times.timed("data"):
            examples = _sample_examples(task, tokenizer, rng, cfg.batch_size, cfg.max_seq_len)
            batch = make_batch(examples, tokenizer.pad_token_id)
            tokens += sum(len(ids) - 1 for ids, _ in examples)
        with times.timed("step"):
            lr = lr_at(cfg, len(losses), _progress(cfg, len(losses), train_s()))
            losses.append(_train_step(model, opt, batch, lr, cfg.grad_clip, precision))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}", refresh=False)
        if cfg.eval_every and len(losses) % cfg.eval_every == 0:
            with times.timed("eval"):
                ev = evaluate(model, tokenizer, task, eval_set[:cfg.eval_problems], cfg.max_new_tokens,
                              cfg.max_seq_len)
            history.append({"step": len(losses), "loss": losses[-1], "accuracy": ev["accuracy"]})
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{ev['accuracy']:.2f}")
    bar.close()
    if cfg.lora_rank is not None:
        merge_lora(model)  # the final evaluation and the saved policy use the merged weights
    with times.timed("eval"):
        final = evaluate(model, tokenizer, task, eval_set[:cfg.final_eval_problems], cfg.max_new_tokens,
                         cfg.max_seq_len)
    tail = losses[-min(20, len(losses)):]
    final_set = eval_set[:cfg.final_eval_problems]
    constant, constant_acc = constant_answer_baseline(task, final_set)  # the set's, once
    metrics: dict[str, Any] = {
        "constant_answer": constant, "constant_answer_accuracy": constant_acc,
        "problems_where_constant_fails": sum(constant_fails(task, final_set, constant)),
        "accuracy_where_constant_fails": accuracy_where_constant_fails(task, final_set, final["rewards"], constant),
        "out": str(out), "params": sum(p.numel() for p in model.parameters()), "lora_params": lora_params,
        "precision": precision,
        "steps": len(losses),
        "tokens": tokens, "train_seconds": train_s(), "phase_seconds": dict(times.seconds),
        "initial_loss": losses[0], "final_loss": sum(tail) / len(tail), "eval_history": history, **final,
    }
    if before is not None:
        metrics.update(initial_accuracy=before["accuracy"], initial_format_rate=before["format_rate"],
                       initial_examples=before["examples"], initial_accuracy_where_constant_fails=(
                           accuracy_where_constant_fails(task, final_set, before["rewards"], constant)))
    record = {"config": asdict(cfg), **{k: v for k, v in metrics.items()
                                        if k not in ("examples", "initial_examples", "out", "rewards")}}
    record = json.loads(json.dumps(record, default=str))  # task options may hold paths or tuples
    save_model(model, tokenizer, Path(out), extra_config={"understudy_pretrain": record})
    return metrics
