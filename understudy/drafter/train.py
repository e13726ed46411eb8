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
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.total_steps < 1 or self.tokens_per_batch < 8:
            raise ValueError("lr must be > 0, total_steps >= 1, tokens_per_batch >= 8")
        if not 1 <= self.unroll_steps <= 8:
            raise ValueError(f"unroll_steps must be in [1, 8], got {self.unroll_steps}")


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
                     noise: float = 0.0, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Draft `steps` tokens ahead from every anchor a at once. Returns outputs o_s [B, N, H], s = 1..steps, N = T-1.

    Step s at anchor a sits at position a+s-1, is fed (x_{a+s}, o_{s-1}[a]) (o_0 = the true h_a) and must predict
    h_{a+s}. It attends to the true-feature keys of positions 0..a and to its own anchor's keys of steps 2..s:
    exactly the drafter's KV cache at inference, where catch-up writes true features and drafting appends.
    """
    layer, attn = drafter.layer, drafter.layer.attn
    cfg = drafter.config.target
    B, T = tokens.shape
    N = T - 1
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    anchors = torch.arange(N, device=tokens.device)
    emb_all = F.embedding(tokens, drafter.embed_weight).to(feats.dtype)  # [B, T, H]
    feat = feats[:, :N]
    if noise > 0:
        feat = feat + noise * torch.randn(feat.shape, generator=generator, device=feat.device)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    causal = anchors.unsqueeze(0) <= anchors.unsqueeze(1)  # [N(query a), N(key m)]: m <= a
    diag = torch.eye(N, dtype=torch.bool, device=tokens.device)
    for s in range(1, steps + 1):
        tok_emb = emb_all[:, s:s + N]  # x_{a+s}
        if tok_emb.shape[1] < N:  # past the end: pad (those anchors are masked out of the loss)
            tok_emb = F.pad(tok_emb, (0, 0, 0, N - tok_emb.shape[1]))
        x = drafter.fc(torch.cat([tok_emb, feat], dim=-1))  # [B, N, H]
        pos = (anchors + s - 1).clamp(max=drafter.rotary.cos.shape[0] - 1).unsqueeze(0).expand(B, N)
        cos, sin = drafter.rotary(pos, x.dtype)
        q, k, v = attn.wqkv(x).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q = apply_rope(q.view(B, N, Hq, D), cos, sin).transpose(1, 2)  # [B, Hq, N, D]
        k = apply_rope(k.view(B, N, Hkv, D), cos, sin).transpose(1, 2)  # [B, Hkv, N, D]
        keys.append(k)
        values.append(v.view(B, N, Hkv, D).transpose(1, 2))
        kk = torch.cat(keys, dim=2).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, s*N, D]
        vv = torch.cat(values, dim=2).repeat_interleave(Hq // Hkv, dim=1)
        mask = torch.cat([causal] + [diag] * (s - 1), dim=1)  # [N, s*N]
        a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)  # [B, Hq, N, D]
        h = x + attn.wo(a.transpose(1, 2).reshape(B, N, Hq * D))
        o = h + layer.mlp(layer.post_attention_layernorm(h))
        outs.append(o)
        feat = o
    return outs


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
    N = T - 1
    outs = unrolled_forward(drafter, tokens, feats, cfg.unroll_steps, cfg.feature_noise, generator)
    head = drafter.head_weight  # [Vd, H], frozen
    anchors = torch.arange(N)
    rows = torch.arange(B).unsqueeze(1).expand(B, N)
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
        valid = (tgt_pos.unsqueeze(0) < lengths.unsqueeze(1)) & (tgt_pos.unsqueeze(0) + 1 >= prompt.unsqueeze(1))
        if not bool(valid.any()):
            continue
        pos_v = tgt_pos.unsqueeze(0).expand(B, N)[valid]
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

def _acceptance_summary(tally: torch.Tensor, k: int) -> dict[str, Any]:
    """tally = [accepted at positions 1..k, anchors, step-1 hits, step-1 positions] -> the reported figures."""
    n_anchor, top1_hits, top1_n = (int(x) for x in tally[k:].tolist())
    alpha = (tally[:k] / max(n_anchor, 1)).tolist()
    return {
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
    gen = torch.Generator().manual_seed(0)
    full_vocab_head = target.lm_head.weight.detach().float()
    for group in batches(samples, tokens_per_batch, gen):
        b = collate(group)
        tokens, feats = b["tokens"], b["features"].to(drafter.fc.weight.dtype)
        B, T = tokens.shape
        N = T - 1
        outs = unrolled_forward(drafter, tokens, feats, k)
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
        anchors = torch.arange(N)
        chain = torch.ones(B, N, dtype=torch.bool)
        rows = torch.zeros(B, k + 3, dtype=torch.float64)  # this batch's tallies, per sequence
        # anchors whose k-chain stays inside the sequence and drafts response tokens
        ok = (anchors.unsqueeze(0) + k < b["lengths"].unsqueeze(1)) & \
             (anchors.unsqueeze(0) + 2 >= b["prompt_lens"].unsqueeze(1))
        for s, o in enumerate(outs, start=1):
            tgt_pos = (anchors + s).clamp(max=T - 1)
            target_tok = target_all.gather(1, tgt_pos.unsqueeze(0).expand(B, N))  # the target's greedy choice
            draft_tok = drafter.draft_logits(o).argmax(-1)
            if not drafter.full_vocab:
                draft_tok = drafter.draft_vocab[draft_tok]
            hit = draft_tok == target_tok
            if s == 1:
                valid1 = (anchors.unsqueeze(0) + 1 < b["lengths"].unsqueeze(1)) & \
                         (anchors.unsqueeze(0) + 2 >= b["prompt_lens"].unsqueeze(1))
                rows[:, k + 1] = (hit & valid1).sum(1)
                rows[:, k + 2] = valid1.sum(1)
            chain &= hit
            rows[:, s - 1] = (chain & ok).sum(1)
        rows[:, k] = ok.sum(1)
        for r, smp in enumerate(group):
            src = smp.source if by_source else ""
            tallies[src] = tallies.get(src, torch.zeros(k + 3, dtype=torch.float64)) + rows[r]
    drafter.train(was_training)
    result = _acceptance_summary(sum(tallies.values(), torch.zeros(k + 3, dtype=torch.float64)), k)
    if by_source:
        result["by_source"] = {src: _acceptance_summary(t, k) for src, t in sorted(tallies.items())}
    return result
