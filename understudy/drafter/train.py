"""Training the EAGLE-style drafter: data from the target, the loss, a resumable time-boxed trainer, evaluation.

Used by `understudy drafter train` (warm-up self-distillation) and by the RL trainer's spot drafter trainer,
which feeds it the hidden states of its own log-prob forward pass (TLT).

Loss (docs/design.md): SmoothL1 between the predicted and the target's next hidden state (weight 1.0) + soft
cross-entropy against the target's next-token distribution (weight 0.1), on response tokens only. The
distributions are taken over the reduced draft vocabulary (what the drafter drafts from). With
`unroll_steps > 1` the loss also covers draft steps 2..n fed the drafter's *own* features, with the same
attention context as at inference (EAGLE-3's "training-time test"); this is what keeps later draft
positions accepted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from understudy.drafter.model import Drafter
from understudy.engine.loader import TRAINING_PRECISIONS, resolve_dtype
from understudy.engine.model import Transformer, apply_rope


@dataclass
class Sample:
    """One sequence for drafter training: tokens [T], target features [T, H], and where the response starts."""

    tokens: torch.Tensor  # [T] int64
    features: torch.Tensor  # [T, H] float32: the target's final normed hidden state at every position
    prompt_len: int  # tokens[prompt_len:] is the response
    greedy: torch.Tensor | None = None  # [T] the target's argmax at every position (filled once by evaluate)
    source: str = ""  # where its prompt came from (a prompt file's name), for per-domain reports

    def __len__(self) -> int:
        return int(self.tokens.numel())


@dataclass(frozen=True)
class DrafterTrainConfig:
    lr: float = 5e-4  # AdamW peak learning rate
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 30  # linear warm-up, then cosine to 10% of lr over `total_steps` (or the time horizon)
    total_steps: int = 2000  # schedule length in steps; a time-boxed run sets a time horizon instead (set_horizon)
    tokens_per_batch: int = 4096  # sequences are packed by length up to this many tokens
    hidden_loss_weight: float = 1.0  # SmoothL1 on the next hidden state
    ce_loss_weight: float = 0.1  # soft cross-entropy against the target's distribution
    unroll_steps: int = 3  # draft steps trained per anchor (1 = EAGLE-1 teacher forcing)
    unroll_decay: float = 0.8  # weight of step s is decay**(s-1)
    feature_noise: float = 0.0  # std of Gaussian noise added to the true features (EAGLE's augmentation)
    hard_labels: bool = False  # cross-entropy against the target's argmax instead of its whole distribution
    draft_all_anchors: bool = False  # draft from every position, prompt too (same loss, ~1.3x the FLOPs): the
    # way before scored anchors, kept as benchmarks/drafter_step.py's baseline
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "float32"  # the loss's matmuls: float32, bfloat16 (torch.autocast mixed precision; the drafter's
    #                            weights, gradients and optimizer state stay float32), or auto: bfloat16 where the CPU
    #                            multiplies bf16 natively (AMX / AVX512-BF16), float32 elsewhere (loader.resolve_dtype)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.total_steps < 1 or self.tokens_per_batch < 8:
            raise ValueError("lr must be > 0, total_steps >= 1, tokens_per_batch >= 8")
        if not 1 <= self.unroll_steps <= 8:
            raise ValueError(f"unroll_steps must be in [1, 8], got {self.unroll_steps}")
        if self.precision not in TRAINING_PRECISIONS:
            raise ValueError(f"precision must be auto, float32 or bfloat16, got {self.precision!r}")


# ---- data ----------------------------------------------------------------------------------------------------
@torch.inference_mode()
def target_features(model: Transformer, sequences: list[tuple[list[int], int]], max_tokens_per_batch: int = 8192,
                    progress: Callable[[int], None] | None = None) -> list[Sample]:
    """Run the target once over each (tokens, prompt_len) and keep its final hidden states (float32, CPU)."""
    out: list[Sample | None] = [None] * len(sequences)
    for idx in length_buckets([len(t) for t, _ in sequences], max_tokens_per_batch):
        T = max(len(sequences[k][0]) for k in idx)
        toks = torch.zeros(len(idx), T, dtype=torch.long)
        for r, k in enumerate(idx):
            toks[r, :len(sequences[k][0])] = torch.tensor(sequences[k][0])
        hidden = model(toks.to(model.device)).float().cpu()  # right padding never affects earlier positions
        for r, k in enumerate(idx):
            n = len(sequences[k][0])
            out[k] = Sample(tokens=toks[r, :n].clone(), features=hidden[r, :n].clone(), prompt_len=sequences[k][1])
        if progress:
            progress(len(idx))
    return [s for s in out if s is not None]


def select_draft_vocab(samples: list[Sample], size: int, vocab_size: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The `size` most frequent tokens of the samples (responses weighted double), plus `always` (e.g. EOS)."""
    size = min(size, vocab_size)
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for s in samples:
        counts.index_add_(0, s.tokens, torch.ones(len(s), dtype=torch.float64))
        counts.index_add_(0, s.tokens[s.prompt_len:], torch.ones(len(s) - s.prompt_len, dtype=torch.float64))
    counts[list(always)] = float("inf")
    counts += torch.linspace(1e-6, 0, vocab_size, dtype=torch.float64)  # ties: lower ids first, deterministic
    return counts.topk(size).indices.sort().values


def length_buckets(lengths: list[int], tokens_per_batch: int) -> list[list[int]]:
    """Indices grouped by similar length (shortest first) so that each padded group, rows x longest length,
    holds at most `tokens_per_batch` tokens (a longer single item gets a group of its own)."""
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if cur and (len(cur) + 1) * lengths[i] > tokens_per_batch:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


def batches(samples: list[Sample], tokens_per_batch: int, generator: torch.Generator) -> Iterator[list[Sample]]:
    """Length-bucketed batches in random order (one pass)."""
    groups = length_buckets([len(s) for s in samples], tokens_per_batch)
    for g in torch.randperm(len(groups), generator=generator).tolist():
        yield [samples[i] for i in groups[g]]


def collate(group: list[Sample]) -> dict[str, torch.Tensor]:
    B, T = len(group), max(len(s) for s in group)
    H = group[0].features.shape[1]
    tokens = torch.zeros(B, T, dtype=torch.long)
    feats = torch.zeros(B, T, H)
    lengths = torch.tensor([len(s) for s in group])
    prompt = torch.tensor([s.prompt_len for s in group])
    for r, s in enumerate(group):
        tokens[r, :len(s)] = s.tokens
        feats[r, :len(s)] = s.features
    return {"tokens": tokens, "features": feats, "lengths": lengths, "prompt_lens": prompt}


# ---- the unrolled drafter forward (training-time test) --------------------------------------------------
def unrolled_forward(drafter: Drafter, tokens: torch.Tensor, feats: torch.Tensor, steps: int,
                     noise: float = 0.0, generator: torch.Generator | None = None,
                     anchors: torch.Tensor | None = None, live: torch.Tensor | None = None,
                     lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Draft `steps` tokens ahead from many anchors at once. Returns outputs o_s [B, M, H], s = 1..steps, where
    o_s[r, j] belongs to anchor anchors[r, j] (default: every anchor 0..T-2 of every row, M = N = T-1).

    Step s at anchor a sits at position a+s-1, is fed (x_{a+s}, o_{s-1}[a]) (o_0 = the true h_a) and must predict
    h_{a+s}. It attends to the true-feature keys of positions 0..a and to its own anchor's keys of steps 2..s:
    exactly the drafter's KV cache at inference, where catch-up writes true features and drafting appends.

    A caller that scores only some anchors (the loss never scores one deep in the prompt) passes them: anchors
    [B, M] (int64, in 0..N-1) with live [B, M] marking the real entries of each padded row, and the rows' lengths.
    The per-token work (fc, projections, MLP) then runs on the live anchors only, packed, and every position
    before a row's last anchor gives just its true-feature key and value, which are all that anchors before a
    scored one contribute; attention stays batched, padded entries masked. Outputs at padded entries are zero.
    Anchors whose x_{a+s} lies past the end get a zero token embedding (the caller masks those too).
    """
    layer, attn = drafter.layer, drafter.layer.attn
    cfg = drafter.config.target
    B, T = tokens.shape
    N = T - 1
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    H = feats.shape[-1]
    dev = tokens.device
    if anchors is None:
        anchors = torch.arange(N, device=dev).unsqueeze(0).expand(B, N)
    M = anchors.shape[1]
    if live is None:
        live = torch.ones(B, M, dtype=torch.bool, device=dev)
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=dev)
    max_pos = drafter.rotary.cos.shape[0] - 1
    emb_all = F.embedding(tokens, drafter.embed_weight).to(feats.dtype)  # [B, T, H]
    feat = feats[:, :N]
    if noise > 0:
        feat = feat + noise * torch.randn(feat.shape, generator=generator, device=feat.device)
    w_q, w_kv = attn.wqkv.weight.split([Hq * D, 2 * Hkv * D], dim=0)
    b_q, b_kv = attn.wqkv.bias.split([Hq * D, 2 * Hkv * D]) if attn.wqkv.bias is not None else (None, None)
    # step 1 at every position before the row's end: its key and value are the true-feature context of every
    # later anchor (packed: the padding past a row's end is never attended to)
    ctx = torch.arange(N, device=dev).unsqueeze(0) < (lengths - 1).unsqueeze(1)  # [B, N]
    x_ctx = drafter.fc(torch.cat([emb_all[:, 1:][ctx], feat[ctx]], dim=-1))  # [n, H]
    kv = feats.new_zeros(B, N, 2 * Hkv * D)
    kv[ctx] = F.linear(x_ctx, w_kv, b_kv).to(kv.dtype)  # .to: bf16 under autocast (precision), else a no-op
    x_all = feats.new_zeros(B, N, H)
    x_all[ctx] = x_ctx.to(x_all.dtype)
    cos, sin = drafter.rotary(torch.arange(N, device=dev).clamp(max=max_pos).unsqueeze(0).expand(B, N), feats.dtype)
    k_all, v_all = kv.split([Hkv * D, Hkv * D], dim=-1)
    keys = [apply_rope(k_all.view(B, N, Hkv, D), cos, sin).transpose(1, 2)]  # [B, Hkv, N, D]
    values = [v_all.view(B, N, Hkv, D).transpose(1, 2)]
    causal = torch.arange(N, device=dev).view(1, 1, N) <= anchors.unsqueeze(2)  # [B, M(query), N(key)]
    diag = torch.eye(M, dtype=torch.bool, device=dev).expand(B, M, M)
    rows, cols = live.nonzero(as_tuple=True)
    a_live = anchors[rows, cols]  # [Q]: the live anchors, packed
    outs: list[torch.Tensor] = []
    prev: torch.Tensor | None = None
    for s in range(1, steps + 1):
        pos = (anchors + s - 1).clamp(max=max_pos)
        cos, sin = drafter.rotary(pos, feats.dtype)
        if s == 1:
            x = x_all[rows, a_live]  # [Q, H]
            q = F.linear(x, w_q, b_q)
        else:
            nxt = a_live + s  # x_{a+s}
            tok_emb = emb_all[rows, nxt.clamp(max=T - 1)] * (nxt < T).unsqueeze(1).to(emb_all.dtype)
            assert prev is not None
            x = drafter.fc(torch.cat([tok_emb, prev], dim=-1))
            q, k, v = attn.wqkv(x).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
            k_pad = feats.new_zeros(B, M, Hkv * D)
            k_pad[rows, cols] = k.to(k_pad.dtype)
            v_pad = feats.new_zeros(B, M, Hkv * D)
            v_pad[rows, cols] = v.to(v_pad.dtype)
            keys.append(apply_rope(k_pad.view(B, M, Hkv, D), cos, sin).transpose(1, 2))  # [B, Hkv, M, D]
            values.append(v_pad.view(B, M, Hkv, D).transpose(1, 2))
        q_pad = feats.new_zeros(B, M, Hq * D)
        q_pad[rows, cols] = q.to(q_pad.dtype)
        q_pad = apply_rope(q_pad.view(B, M, Hq, D), cos, sin).transpose(1, 2)  # [B, Hq, M, D]
        kk = torch.cat(keys, dim=2).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, N+(s-1)M, D]
        vv = torch.cat(values, dim=2).repeat_interleave(Hq // Hkv, dim=1)
        mask = torch.cat([causal] + [diag] * (s - 1), dim=2).unsqueeze(1)  # [B, 1, M, N+(s-1)M]
        a = F.scaled_dot_product_attention(q_pad, kk, vv, attn_mask=mask)  # [B, Hq, M, D]
        h = x + attn.wo(a.transpose(1, 2)[rows, cols].reshape(-1, Hq * D))
        o = h + layer.mlp(layer.post_attention_layernorm(h))  # [Q, H]
        out = feats.new_zeros(B, M, H)
        out[rows, cols] = o.to(out.dtype)
        outs.append(out)
        prev = o
    return outs


def scored_anchors(lengths: torch.Tensor, prompt_lens: torch.Tensor, first_offset: int,
                   last_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's anchors a with prompt_len - first_offset <= a <= length - last_offset (clamped to the row),
    as a padded [B, M] index and its [B, M] mask of real entries. The padding repeats a row's last anchor."""
    N = int(lengths.max()) - 1
    start = (prompt_lens - first_offset).clamp(min=0, max=max(N - 1, 0))
    stop = (lengths - last_offset).clamp(max=N - 1)  # inclusive
    count = (stop - start + 1).clamp(min=0)
    M = max(int(count.max()), 1)
    j = torch.arange(M).unsqueeze(0)
    live = j < count.unsqueeze(1)
    idx = torch.minimum(start.unsqueeze(1) + j, (start + (count - 1).clamp(min=0)).unsqueeze(1))
    return idx, live


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


def eagle_loss(drafter: Drafter, batch: dict[str, torch.Tensor], cfg: DrafterTrainConfig,
               generator: torch.Generator | None = None) -> LossOutput:
    """The drafter loss (see module docstring). batch: collate() output."""
    tokens, feats = batch["tokens"], batch["features"].to(drafter.fc.weight.dtype)
    lengths, prompt = batch["lengths"], batch["prompt_lens"]
    B, T = tokens.shape
    # Only anchors that some step scores are drafted from: step s at anchor a is scored when a+s+1 is a response
    # token, so anchors before prompt_len - unroll_steps - 1 only lend their true-feature keys (a quarter to a
    # third of the positions of the shipped data are prompt; same loss and gradients, fewer FLOPs).
    if cfg.draft_all_anchors:
        anchors = torch.arange(T - 1).unsqueeze(0).expand(B, T - 1)
        live = torch.ones_like(anchors, dtype=torch.bool)
        outs = unrolled_forward(drafter, tokens, feats, cfg.unroll_steps, cfg.feature_noise, generator)
    else:
        anchors, live = scored_anchors(lengths, prompt, cfg.unroll_steps + 1, 2)  # [B, M]
        outs = unrolled_forward(drafter, tokens, feats, cfg.unroll_steps, cfg.feature_noise, generator, anchors,
                                live, lengths)
    head = drafter.head_weight  # [Vd, H], frozen
    rows = torch.arange(B).unsqueeze(1).expand_as(anchors)
    # The target's distribution over the draft vocabulary at every position that some step predicts (positions
    # 1..T-1, each a response position), computed once per batch: step s reads position a+s, so the unrolled
    # steps share these rows instead of each recomputing the head over them.
    need = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)) & \
           (torch.arange(T).unsqueeze(0) + 1 >= prompt.unsqueeze(1))
    need[:, 0] = False
    row_of = torch.full((B, T), -1, dtype=torch.long)
    row_of[need] = torch.arange(int(need.sum()))
    with torch.no_grad():
        logits = F.linear(feats[need], head).float()
        p_rows = F.one_hot(logits.argmax(-1), logits.shape[-1]).float() if cfg.hard_labels else logits.softmax(-1)
    total, weight_sum = feats.new_zeros(()), 0.0
    metrics: dict[str, float] = {}
    for s, o in enumerate(outs, start=1):
        tgt_pos = anchors + s  # h_{a+s}
        # a+s must exist, and the token it predicts (index a+s+1) must be a response token
        valid = live & (tgt_pos < lengths.unsqueeze(1)) & (tgt_pos + 1 >= prompt.unsqueeze(1))
        if not bool(valid.any()):
            continue
        pos_v = tgt_pos[valid]
        rows_v = rows[valid]
        o_v, t_v = o[valid], feats[rows_v, pos_v]  # [n, H]
        hid = F.smooth_l1_loss(o_v, t_v, reduction="none").mean(-1).mean()
        p = p_rows[row_of[rows_v, pos_v]]  # target distribution over the draft vocab
        logq = F.log_softmax(F.linear(o_v, head).float(), dim=-1)
        ce = -(p * logq).sum(-1).mean()
        w = cfg.unroll_decay ** (s - 1)
        total = total + w * (cfg.hidden_loss_weight * hid + cfg.ce_loss_weight * ce)
        weight_sum += w
        metrics[f"hidden_loss_{s}"] = float(hid.detach())
        metrics[f"ce_{s}"] = float(ce.detach())
        metrics[f"top1_{s}"] = float((logq.argmax(-1) == p.argmax(-1)).float().mean())
    return LossOutput(loss=total / max(weight_sum, 1e-9), metrics=metrics)


DRAFTER_LOSSES: dict[str, Callable[..., LossOutput]] = {"eagle": eagle_loss}


# ---- the trainer -------------------------------------------------------------------------------------------
class DrafterTrainer:
    """Owns the drafter's optimizer and schedule; `train(samples, seconds=..)` can be called repeatedly
    (the spot trainer calls it in whatever idle window it gets). State is checkpointable."""

    def __init__(self, drafter: Drafter, cfg: DrafterTrainConfig | None = None, loss: str = "eagle") -> None:
        self.drafter = drafter
        self.cfg = cfg or DrafterTrainConfig()
        if loss not in DRAFTER_LOSSES:
            raise ValueError(f"unknown drafter loss {loss!r}; registered: {', '.join(DRAFTER_LOSSES)}")
        self.loss_fn = DRAFTER_LOSSES[loss]
        self.precision = resolve_dtype(self.cfg.precision, str(drafter.fc.weight.device))
        params = [p for p in drafter.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lr, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)
        self.step = 0
        self.tokens_seen = 0
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.last_metrics: dict[str, float] = {}
        self.horizon_s: float | None = None  # a time-boxed run's schedule length (seconds of train_step)
        self.train_seconds = 0.0  # seconds spent in train_step so far, on `clock`
        # The clock of time budgets and of the time schedule: wall time by default; a benchmark that compares
        # recipes per CPU-minute on a shared machine sets time.process_time.
        self.clock: Callable[[], float] = time.monotonic

    def set_horizon(self, seconds: float) -> None:
        """Schedule by time: the cosine runs over `seconds` of training (on `clock`) instead of `total_steps`.
        A time-boxed run does not know its step count, and a step-count schedule that outlasts the budget never
        decays (the old warm-up default: 2000 steps planned, about 20 taken in 15 minutes)."""
        if seconds <= 0:
            raise ValueError(f"the schedule horizon must be > 0 seconds, got {seconds}")
        self.horizon_s = float(seconds)

    def lr_at(self, step: int) -> float:
        c = self.cfg
        warmup = c.warmup_steps
        if step < warmup:
            return c.lr * (step + 1) / warmup
        if self.horizon_s:
            t = min(1.0, self.train_seconds / self.horizon_s)
        else:
            t = min(1.0, (step - warmup) / max(1, c.total_steps - warmup))
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    def train_step(self, group: list[Sample]) -> dict[str, float]:
        t0 = self.clock()
        self.drafter.train()
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        with torch.enable_grad():
            dev = self.drafter.fc.weight.device.type
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
                out = self.loss_fn(self.drafter, collate(group), self.cfg, self.generator)
            self.opt.zero_grad(set_to_none=True)
            out.loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.cfg.grad_clip)
            self.opt.step()
        self.step += 1
        self.tokens_seen += sum(len(s) for s in group)
        self.last_metrics = {"loss": float(out.loss.detach()), "grad_norm": float(gnorm), "lr": self.lr_at(self.step - 1),
                             **out.metrics}
        self.drafter.eval()
        self.train_seconds += self.clock() - t0
        return self.last_metrics

    def train(self, samples: list[Sample], seconds: float | None = None, max_steps: int | None = None,
              should_stop: Callable[[], bool] | None = None,
              on_step: Callable[[dict[str, float]], None] | None = None) -> int:
        """Train until the time/step budget is spent or should_stop() is true. Returns steps taken."""
        if not samples:
            return 0
        deadline = self.clock() + seconds if seconds is not None else math.inf
        taken = 0
        while True:
            for group in batches(samples, self.cfg.tokens_per_batch, self.generator):
                if self.clock() >= deadline or (max_steps is not None and taken >= max_steps) or \
                        (should_stop is not None and should_stop()):
                    return taken
                m = self.train_step(group)
                taken += 1
                if on_step:
                    on_step(m)

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "step": self.step, "tokens_seen": self.tokens_seen,
                "generator": self.generator.get_state(), "cfg": asdict(self.cfg), "train_seconds": self.train_seconds,
                "horizon_s": self.horizon_s}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.opt.load_state_dict(sd["opt"])
        self.step, self.tokens_seen = int(sd["step"]), int(sd["tokens_seen"])
        self.generator.set_state(sd["generator"])
        self.train_seconds = float(sd.get("train_seconds", 0.0))
        self.horizon_s = sd.get("horizon_s")


# ---- evaluation -----------------------------------------------------------------------------------------
def _greedy_tokens(feats: torch.Tensor, head: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """argmax of the full-vocabulary logits, computed in row chunks (a [8192, 49152] logit tensor is 1.6 GB)."""
    flat = feats.reshape(-1, feats.shape[-1]).float()
    out = torch.cat([F.linear(flat[i:i + rows], head).argmax(-1) for i in range(0, flat.shape[0], rows)])
    return out.view(feats.shape[:-1])

def _acceptance_summary(tally: torch.Tensor, k: int, walk: torch.Tensor | None = None) -> dict[str, Any]:
    """tally = [accepted at positions 1..k, anchors, step-1 hits, step-1 positions], walk = [k, 2] tokens and
    steps of decoding with K = 1..k (_walk) -> the reported figures."""
    n_anchor, top1_hits, top1_n = (int(x) for x in tally[k:].tolist())
    alpha = (tally[:k] / max(n_anchor, 1)).tolist()
    decoded = {} if walk is None else {
        # tokens per step when decoding greedily with K drafts: what the engine realises (L over its own steps)
        "decoded_acceptance_length_at_k": {str(j): round(float(walk[j - 1, 0] / max(float(walk[j - 1, 1]), 1.0)), 4)
                                           for j in range(1, k + 1)}}
    return {**decoded,
        "top1_agreement": top1_hits / max(top1_n, 1),
        "per_position_acceptance": [round(a, 4) for a in alpha],
        "expected_acceptance_length": 1.0 + sum(alpha),
        "acceptance_length_at_k": {str(j): round(1.0 + sum(alpha[:j]), 4) for j in range(1, k + 1)},
        "num_anchors": n_anchor,
        "k": k,
    }


@torch.inference_mode()
def evaluate(drafter: Drafter, target: Transformer, samples: list[Sample], k: int = 5,
             tokens_per_batch: int = 8192, cache_greedy: bool = False, by_source: bool = False) -> dict[str, Any]:
    """Held-out greedy acceptance, simulated exactly as the engine drafts (true features up to the anchor, then
    the drafter's own): per-position acceptance alpha_j = P(drafts 1..j all equal the target's argmax), expected
    acceptance length = 1 + sum_j alpha_j (chain of k), and step-1 top-1 agreement.

    cache_greedy: keep the target's argmax per position on each Sample (`greedy`), for a fixed target evaluated
    repeatedly (the full-vocabulary head over every position costs more than the drafter's whole unroll); the RL
    trainer's target changes between evaluations and leaves it off.
    by_source: also report the same figures per `Sample.source` (under "by_source"), from the same pass."""
    was_training = drafter.training
    drafter.eval()
    tallies: dict[str, torch.Tensor] = {}  # source -> [accepted 1..k, anchors, step-1 hits, step-1 positions]
    walks: dict[str, torch.Tensor] = {}  # source -> [k, 2]: tokens and steps of decoding with each K (_walk)
    gen = torch.Generator().manual_seed(0)
    full_vocab_head = target.lm_head.weight.detach().float()
    for group in batches(samples, tokens_per_batch, gen):
        b = collate(group)
        tokens, feats = b["tokens"], b["features"].to(drafter.fc.weight.dtype)
        B, T = tokens.shape
        lengths, prompt = b["lengths"], b["prompt_lens"]
        # only anchors that draft a response token are counted (a+2 >= prompt_len), so only those are drafted from
        anchors, live = scored_anchors(lengths, prompt, 2, 2)  # [B, M]
        outs = unrolled_forward(drafter, tokens, feats, k, anchors=anchors, live=live, lengths=lengths)
        if cache_greedy:  # the target's greedy token at every position: fixed per sample, computed once
            for smp in group:
                if smp.greedy is None:
                    smp.greedy = _greedy_tokens(smp.features, full_vocab_head)
            target_all = torch.zeros(B, T, dtype=torch.long)
            for r, smp in enumerate(group):
                assert smp.greedy is not None
                target_all[r, :len(smp)] = smp.greedy
        else:
            target_all = _greedy_tokens(feats, full_vocab_head)  # [B, T]
        chain = torch.ones_like(live)
        walk_chain, run = torch.ones_like(live), torch.zeros(live.shape, dtype=torch.long)  # drafts accepted per anchor
        rows = torch.zeros(B, k + 3, dtype=torch.float64)  # this batch's tallies, per sequence
        # anchors whose k-chain stays inside the sequence and drafts response tokens
        ok = live & (anchors + k < lengths.unsqueeze(1)) & (anchors + 2 >= prompt.unsqueeze(1))
        for s, o in enumerate(outs, start=1):
            target_tok = target_all.gather(1, (anchors + s).clamp(max=T - 1))  # the target's greedy choice
            draft_tok = drafter.draft_logits(o).argmax(-1)
            if not drafter.full_vocab:
                draft_tok = drafter.draft_vocab[draft_tok]
            hit = draft_tok == target_tok
            if s == 1:
                valid1 = live & (anchors + 1 < lengths.unsqueeze(1)) & (anchors + 2 >= prompt.unsqueeze(1))
                rows[:, k + 1] = (hit & valid1).sum(1)
                rows[:, k + 2] = valid1.sum(1)
            chain &= hit
            rows[:, s - 1] = (chain & ok).sum(1)
            walk_chain &= hit & (anchors + s < lengths.unsqueeze(1) - 1)  # a target token exists at a + s + 1
            run += walk_chain.long()
        rows[:, k] = ok.sum(1)
        for r, smp in enumerate(group):
            src = smp.source if by_source else ""
            tallies[src] = tallies.get(src, torch.zeros(k + 3, dtype=torch.float64)) + rows[r]
            walks[src] = walks.get(src, torch.zeros(k, 2, dtype=torch.float64)) + _walk(
                run[r], int(anchors[r, 0]), int(prompt[r]), int(lengths[r]), k)
    drafter.train(was_training)
    result = _acceptance_summary(sum(tallies.values(), torch.zeros(k + 3, dtype=torch.float64)), k,
                                 sum(walks.values(), torch.zeros(k, 2, dtype=torch.float64)))
    if by_source:
        result["by_source"] = {src: _acceptance_summary(t, k, walks[src]) for src, t in sorted(tallies.items())}
    return result


def _walk(run: torch.Tensor, first_anchor: int, prompt_len: int, length: int, k: int) -> torch.Tensor:
    """Decode one sequence as the engine does, for each K = 1..k: the first draft follows the prefill's token
    (anchor prompt_len - 1); a step accepts min(run[a], K) drafts plus the target's own token and moves the anchor
    past them. -> [k, 2]: tokens committed and steps taken, per K.

    Why: L(K) from the per-position acceptance averages over every anchor, but decoding drafts only from the
    anchors its steps land on, and hard stretches get more of those than easy ones (an easy stretch is crossed in
    a few long steps). On 8 grid-risk prompts the engine realised L(4) 2.84 where the average over anchors said
    3.08; this walk gives 2.84 and the engine's per-position figures (0.66 / 0.51 / 0.41 / 0.26) too."""
    runs = run.tolist()
    out = torch.zeros(k, 2, dtype=torch.float64)
    for K in range(1, k + 1):
        a, tokens, steps = prompt_len - 1, 0, 0
        while a <= length - 3:  # a target token exists at a + 2
            j = a - first_anchor
            accepted = min(runs[j], K) if 0 <= j < len(runs) else 0
            tokens, steps, a = tokens + accepted + 1, steps + 1, a + accepted + 1
        out[K - 1] = torch.tensor([tokens, steps], dtype=torch.float64)
    return out
