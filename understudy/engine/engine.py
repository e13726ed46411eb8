"""The engine: owns the target, the drafter, the KV caches, the RNGs and the step loop.

    step = [apply pending drafter swap] -> admit + prefill -> propose -> verify -> accept -> emit -> free slots

A request with a grammar (SamplingParams.grammar: the server's response_format, engine/structured.py) has its
logits masked before greedy choice or sampling, at prefill and at every verification position (each with the
grammar state after the drafts before it), so speculation stays lossless under the grammar.

Continuous batching: requests join (prefill) and leave between steps. Live sequences occupy KV slots
0..B-1 contiguously (a finished sequence's slot is refilled by moving the last one), so every forward works
on plain views of the caches. `add_request`, `abort` and `set_drafter` are safe to call from another thread:
they are queued and applied at the start of the next step, never in the middle of one.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from understudy.engine import qkernels
from understudy.engine.config import EngineConfig
from understudy.engine.controller import FixedController, SpeculationController
from understudy.engine.drafter_proposer import DrafterProposer
from understudy.engine.model import RotaryTable, Transformer, enable_cpu_packing, set_native_linears
from understudy.engine.ngram import NgramProposer
from understudy.engine.proposer import BatchState, DraftModel, DraftProposal, Proposer
from understudy.engine.quant import FUSED_MAX_TOKENS, FusedDecoder
from understudy.engine.rejection_sampler import SampleResult, rejection_sample
from understudy.engine.sampling import (
    MAX_LOGPROBS,
    SamplingParams,
    apply_logit_bias,
    make_generator,
    probs_from_logits,
)
from understudy.engine.spec_metrics import SpecDecodeStats
from understudy.engine.structured import GrammarMatcher, apply_bitmask, new_bitmask
from understudy.engine.verify import VerifyOutput, verify
from understudy.errors import InputError

log = logging.getLogger(__name__)

# Linear calls of up to this many rows run the native float32 kernel on one thread: the LM head of a decode step
# or a verification (batch x width rows), the drafter's matmuls. Wider calls (prefill) take oneDNN's GEMM, which
# is as fast from about 24 rows on (SmolLM2's shapes on this 2-core AVX2 CPU: 5 rows of the LM head 9.9 ms native
# against 10.3 oneDNN, 8 rows 9.3 against 12.4, 24 rows 22.7 against 23.1, 32 rows 30.4 against 28.5).
NATIVE_LINEAR_ROWS = 24


class RequestError(InputError, ValueError):
    """A request the engine cannot take (names the field): 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param, code="context_length_exceeded" if "context length" in message else None)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position (raw model distribution)


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "error" | None
    stop_token_id: int | None = None  # the token that ended the request (when finish_reason == "stop")
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for them
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative
    hidden: torch.Tensor | None = None  # [n-1, H] target features of the whole sequence, on finish, when
    #                                     the engine was built with capture_hidden=True (drafter training data)
    error: str | None = None  # finish_reason "error": why this request failed (its batch-mates went on)


@dataclass
class StepStats:
    """What one step did (the controller's reward and the metrics exporters read this)."""

    batch_size: int = 0
    k: int = 0
    num_prefill_tokens: int = 0
    num_emitted_tokens: int = 0
    seconds: float = 0.0
    propose_s: float = 0.0
    verify_s: float = 0.0
    sample_s: float = 0.0
    spec: SpecDecodeStats = field(default_factory=SpecDecodeStats)
    drafter_fault: str | None = None  # the proposer failed and the same step succeeded without it
    num_failed: int = 0  # requests that failed alone in this step


@dataclass
class Sequence:
    request_id: str
    prompt_len: int
    sampling: SamplingParams
    generator: torch.Generator
    token_ids: list[int]  # prompt + output; the last one is not yet in the target KV cache
    stop_ids: frozenset[int]
    slot: int = -1
    epoch: int = 0  # the policy (target weights) this request runs on: the engine's epoch when it was added
    matcher: GrammarMatcher | None = None  # the request's grammar state (sampling.grammar), None = unconstrained

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig | None = None, eos_token_ids: tuple[int, ...] = (),
                 drafter: DraftModel | None = None, controller: SpeculationController | None = None,
                 capture_hidden: bool = False) -> None:
        self.config = config = config or EngineConfig()
        self._native_threads = 1  # the native kernels' threads inside this engine's steps (_apply_threads)
        self._prefill_threads: int | None = None  # threads for long prompt prefills, or None: no switching
        self._cpu = model.device.type == "cpu"
        self._apply_threads(config.num_threads, config.prefill_threads)
        self.eos_token_ids = tuple(eos_token_ids)
        self.capture_hidden = capture_hidden
        self.k_max = config.num_speculative_tokens
        self.capacity = config.max_model_len + self.k_max + 1  # room for k drafts past the last allowed position
        self._bind_model(model)
        S = config.max_batch_size
        self.cache = model.allocate_cache(S, self.capacity)
        self.hidden_buf = torch.zeros(S, self.capacity, model.config.hidden_size, dtype=model.dtype,
                                      device=model.device)  # [S, C, H] target features, for the drafter
        self.controller: SpeculationController = controller or FixedController(self.k_max)
        self.drafter: DraftModel | None = None
        self.proposer: Proposer | None = None
        self._install_proposer(drafter)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # index == KV slot
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._ids: set[str] = set()
        self._ids_lock = threading.Lock()
        self._done: dict[str, str] = {}  # request id -> finish reason, until its slot is freed
        self.drafter_generation = 0  # bumps when a swap takes effect
        # Policy swaps (new target weights + their drafter): a request runs on the weights of the epoch it was added
        # in. A swap requested in epoch e waits until every request of epoch e has finished (those queued after it
        # wait, unadmitted), then installs the new weights and starts epoch e + 1 (see set_policy).
        self.epoch = 0  # applied
        self._epoch_next = 0  # requested (the epoch a request added now will run in); guarded by _ids_lock
        self.policy_labels: dict[int, Any] = {0: None}  # epoch -> the label set_policy was given (kept: one per swap)
        self._pending_policies: collections.deque[tuple[Transformer, DraftModel | None]] = collections.deque()
        self.stats = SpecDecodeStats()  # cumulative
        self.last_step = StepStats()

    # ---- proposer / drafter ------------------------------------------------------------------------------
    def _install_proposer(self, drafter: DraftModel | None) -> None:
        c = self.config
        kind = c.proposer
        if kind == "auto":
            kind = "drafter" if drafter is not None else c.fallback_proposer
        if kind == "drafter" and drafter is None:
            raise ValueError("proposer='drafter' needs a drafter (pass --drafter DIR, or use --ngram)")
        self.drafter = drafter
        if self.k_max == 0 or kind == "none":
            self.proposer = None
        elif kind == "ngram":
            self.proposer = NgramProposer(c.ngram_min, c.ngram_max)
        else:
            assert drafter is not None
            self.proposer = DrafterProposer(drafter.attach(self.model, self.capacity), self.hidden_buf,
                                            c.max_batch_size, self.capacity)

    @property
    def threads(self) -> int | None:
        """The threads decode steps run on now (the native kernels'), None off the CPU."""
        return self._native_threads if self._cpu else None

    def set_threads(self, n: int | None, prefill_threads: int | None = None) -> None:
        """Decode on `n` threads from the start of the next step (None: as many as torch's intra-op setting), and
        prefill long prompts on `prefill_threads` (as EngineConfig.prefill_threads: None every core, 0 as `n`). The
        server decodes on one while its background drafter job trains on the other core, and on every core after it
        ends. Outputs do not change: each output of a native kernel is computed by one thread in a fixed order."""
        if n is not None and n < 1:
            raise ValueError(f"threads must be >= 1 or None, got {n}")
        if prefill_threads is not None and prefill_threads < 0:
            raise ValueError(f"prefill_threads must be >= 0 or None, got {prefill_threads}")
        self._inbox.append(("threads", (n, prefill_threads)))

    def _apply_threads(self, n: int | None, prefill: int | None) -> None:
        """torch's intra-op threads and the native kernels' (decode steps, verification, the LM head): `n`, or
        torch's setting as it stands; prefills longer than the fused path takes: `prefill` (see set_threads)."""
        if not self._cpu:
            return
        if n is not None:
            torch.set_num_threads(n)
        self._native_threads = n or torch.get_num_threads()  # the kernels' count inside this engine's steps
        self._prefill_threads = None
        if n is not None and prefill != 0:
            want = prefill or len(os.sched_getaffinity(0))
            self._prefill_threads = want if want != n else None

    def set_drafter(self, drafter: DraftModel | None) -> None:
        """Swap the drafter (None = stop speculating with one). Takes effect at the start of the next step."""
        self._inbox.append(("drafter", drafter))

    def set_policy(self, model: Transformer, drafter: DraftModel | None, label: Any = None) -> int:
        """Serve new target weights (same family, shapes and dtype) with their drafter from the next epoch on.

        Requests added before this call finish on the weights they started with; requests added after it wait
        until those are done, then run on the new weights (a drain, not a mix: a response comes from one policy,
        and its KV cache from the weights that continue it). Returns the epoch the new weights start."""
        old = self.model.config
        if model.config.family_shape() != old.family_shape() or model.dtype != self.model.dtype or \
                model.device != self.model.device:
            raise ValueError(f"a policy swap needs the served model's shapes, dtype and device ({old.family_shape()}, "
                             f"{self.model.dtype}, {self.model.device}); got {model.config.family_shape()}, "
                             f"{model.dtype}, {model.device}")
        with self._ids_lock:  # one lock orders epochs with add_request: the inbox sees them in this order
            self._epoch_next += 1
            self.policy_labels[self._epoch_next] = label
            self._inbox.append(("policy", (model, drafter)))
            return self._epoch_next

    @property
    def policy_label(self) -> Any:
        """The label of the weights serving now."""
        return self.policy_labels.get(self.epoch)

    def _bind_model(self, model: Transformer) -> None:
        """Serve `model`: inference mode, packed CPU weights, a rotary table covering the capacity."""
        self.model = model.eval()
        enable_cpu_packing(self.model)
        fused = getattr(model, "fused", None)
        native = self.config.native_decoder and model.device.type == "cpu"
        if fused is None or getattr(fused, "float_weights", False):  # a quantised model's own decoder stays
            model.fused = FusedDecoder.for_float_model(model) if native else None
        # the LM head (and any float Linear run op by op) too; a drafter attached to this model follows it
        set_native_linears(model, NATIVE_LINEAR_ROWS if native else 0)
        if self.model.rotary.cos.shape[0] < self.capacity:
            self.model.rotary = RotaryTable(model.config, self.capacity).to(model.device)

    def _apply_policies(self) -> None:
        """Install pending policies once no request of the current epoch is left (running or waiting)."""
        while self._pending_policies and not self.running and not any(s.epoch == self.epoch for s in self.waiting):
            model, drafter = self._pending_policies.popleft()
            self._bind_model(model)
            self._install_proposer(drafter)  # the KV cache and feature buffer are reused: same shapes, no slot live
            self.epoch += 1
            self.drafter_generation += 1

    def refresh_weights(self) -> None:
        """The target's weights changed in place (a policy update): re-bind the drafter's shared head."""
        if self.drafter is not None:
            self.drafter.attach(self.model, self.capacity)

    def _apply_swap(self, drafter: DraftModel | None) -> None:
        if drafter is not None and self.proposer is not None and self.proposer.swap_drafter(
                drafter.attach(self.model, self.capacity)):
            self.drafter = drafter
        else:
            self._install_proposer(drafter)
            if self.proposer is not None:
                for seq in self.running:  # a fresh proposer: all live slots start from zero
                    self.proposer.on_slot_reset(seq.slot)
        self.drafter_generation += 1

    def captured_running(self) -> list[tuple[str, list[int], torch.Tensor, int]]:
        """The running sequences as they stand, for an engine built with capture_hidden: (request id, tokens so
        far, features of positions 0..n-2 [n-1, H] float32 on CPU, prompt length). A data maker whose time is up
        keeps these partial answers instead of decoding them to the end."""
        if not self.capture_hidden:
            raise RuntimeError("captured_running() needs an engine built with capture_hidden=True")
        return [(seq.request_id, list(seq.token_ids),
                 self.hidden_buf[seq.slot, :len(seq.token_ids) - 1].float().cpu().clone(), seq.prompt_len)
                for seq in self.running if seq.slot >= 0 and len(seq.token_ids) > seq.prompt_len]

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams) -> int:
        """Validate now (raising RequestError naming the field), then queue for the next step. Returns the epoch
        (policy weights) the request will run on (see set_policy)."""
        V = self.model.config.vocab_size
        if not prompt_ids:
            raise RequestError("the prompt is empty: give at least one token", param="prompt")
        if any((not isinstance(t, int)) or t < 0 or t >= V for t in prompt_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {V})", param="prompt")
        if any(t >= V for t, _ in sampling.logit_bias):
            raise RequestError(f"logit_bias keys must be token ids in [0, {V})", param="logit_bias")
        if sampling.grammar is not None and sampling.grammar.vocab_size != V:
            raise RequestError(f"the response_format grammar was compiled for a vocabulary of "
                               f"{sampling.grammar.vocab_size} tokens, this model has {V}; compile it for this "
                               "model's tokenizer", param="response_format")
        total = len(prompt_ids) + sampling.max_tokens
        if total > self.config.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.config.max_model_len} tokens; the request has "
                f"{len(prompt_ids)} prompt tokens + max_tokens {sampling.max_tokens} = {total}. "
                "Shorten the prompt or lower max_tokens", param="max_tokens")
        stop = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop.update(self.eos_token_ids)
        seq = Sequence(request_id=request_id, prompt_len=len(prompt_ids), sampling=sampling,
                       generator=make_generator(sampling.seed, self.model.device), token_ids=list(prompt_ids),
                       stop_ids=frozenset(stop),
                       matcher=sampling.grammar.matcher() if sampling.grammar is not None else None)
        with self._ids_lock:
            if request_id in self._ids:
                raise RequestError(f"request id {request_id!r} is already in use", param="request_id")
            self._ids.add(request_id)
            seq.epoch = self._epoch_next
            self._inbox.append(("add", seq))
        return seq.epoch

    def abort(self, request_id: str) -> None:
        """Drop a request (queued or running) at the next step boundary; its slot is freed, no output follows."""
        self._inbox.append(("abort", request_id))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._inbox or self._pending_policies)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(1 for kind, _ in list(self._inbox) if kind == "add")

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, arg = self._inbox.popleft()
            if kind == "add":
                self.waiting.append(arg)
            elif kind == "abort":
                self._abort_now(arg)
            elif kind == "drafter":
                self._apply_swap(arg)
            elif kind == "policy":
                self._pending_policies.append(arg)
            elif kind == "threads":
                self._apply_threads(*arg)

    def _abort_now(self, request_id: str) -> None:
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._forget(request_id)
                return
        for seq in self.running:
            if seq.request_id == request_id:
                self._free([seq])
                return

    def _forget(self, request_id: str) -> None:
        with self._ids_lock:
            self._ids.discard(request_id)

    # ---- the step ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        self._drain_inbox()
        self._apply_policies()
        stats = StepStats()
        with qkernels.threads_scope(self._native_threads):  # this engine's count, whichever thread steps it
            outputs = self._admit_and_prefill(stats)
            if self.running:
                outputs.extend(self._decode(stats))
        stats.seconds = time.perf_counter() - t0
        self.last_step = stats
        return outputs

    def _admit_and_prefill(self, stats: StepStats) -> list[StepOutput]:
        outputs = []
        while self.waiting and self.waiting[0].epoch == self.epoch and len(self.running) < self.config.max_batch_size:
            seq = self.waiting.popleft()
            seq.slot = len(self.running)
            self.running.append(seq)
            if self.proposer is not None:
                self.proposer.on_slot_reset(seq.slot)
            try:
                outputs.append(self._prefill(seq))
            except Exception as e:  # this request's prompt or parameters: it fails alone
                log.exception("prefill of %s failed; failing that request only", seq.request_id)
                outputs.append(self._fail(seq, f"{type(e).__name__}: {e}"))
                stats.num_failed += 1
            stats.num_prefill_tokens += seq.prompt_len
        self._free([s for s in self.running if self._is_done(s)])
        return outputs

    def _prefill(self, seq: Sequence) -> StepOutput:
        p = seq.prompt_len
        toks = torch.tensor(seq.token_ids, dtype=torch.long, device=self.model.device).unsqueeze(0)
        positions = torch.arange(p, device=self.model.device).unsqueeze(0)
        # longer than the fused path takes: a GEMM, compute-bound, so more cores help (decode threads restored after)
        threads = self._prefill_threads if p > FUSED_MAX_TOKENS else None
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            hidden = self.model(toks, positions, self.cache, kv_len=p, slot_start=seq.slot)  # [1, p, H]
        finally:
            if threads is not None:  # only set when the engine set torch's threads: to its decode count
                torch.set_num_threads(self._native_threads)
        self.hidden_buf[seq.slot, :p] = hidden[0]
        logits = self.model.logits(hidden[:, -1])  # [1, V]
        s = seq.sampling
        raw = logits.clone() if (s.logprobs is not None and (s.logit_bias or seq.matcher)) else logits
        apply_logit_bias(logits, s.logit_bias)
        if seq.matcher is not None:  # a broken grammar raises here: this request fails alone
            mask = new_bitmask(1, vocab_size=logits.shape[-1])
            seq.matcher.fill_masks([], mask)
            apply_bitmask(logits, mask)
        if s.greedy:
            token = int(logits[0].argmax())
        else:
            probs = probs_from_logits(logits.clone(), torch.tensor([s.temperature]), torch.tensor([s.top_k]),
                                      torch.tensor([s.top_p]))
            token = int(torch.multinomial(probs[0], 1, generator=seq.generator))
        return self._emit(seq, [token], raw if s.logprobs is not None else None)

    def _batch_state(self) -> BatchState:
        seqs = self.running
        return BatchState(
            token_ids=[s.token_ids for s in seqs],
            num_tokens=[len(s.token_ids) for s in seqs],
            temperature=torch.tensor([s.sampling.temperature for s in seqs], dtype=torch.float32),
            top_k=torch.tensor([s.sampling.top_k for s in seqs], dtype=torch.long),
            top_p=torch.tensor([s.sampling.top_p for s in seqs], dtype=torch.float32),
            generators=[s.generator for s in seqs],
        )

    def _decode(self, stats: StepStats) -> list[StepOutput]:
        B = len(self.running)
        k = min(self.controller.choose(B), self.k_max) if self.proposer is not None else 0
        batch = self._batch_state()
        t0 = time.perf_counter()
        proposal = DraftProposal.empty(B)
        if k > 0 and self.proposer is not None:
            try:
                proposal = self.proposer.propose(batch, k)
            except Exception as e:  # the step goes on without drafts; the drafter alone is at fault
                log.exception("the %s proposer failed; this step runs without drafts", self.proposer.name)
                stats.drafter_fault = f"propose raised {type(e).__name__}: {e}"
        # never draft past a request's token budget: the surplus could not be emitted anyway
        room = torch.tensor([s.sampling.max_tokens - s.num_output - 1 for s in self.running], dtype=torch.long)
        proposal.num_drafts = torch.minimum(proposal.num_drafts, room.clamp_min(0).to(proposal.num_drafts.device))
        t1 = time.perf_counter()
        try:
            out, result = self._verify_and_sample(batch, proposal)
        except Exception as e:
            if proposal.k == 0:
                raise  # not the drafter's doing: the scheduler fails this step's requests
            # Blame the drafter only if the same step succeeds without it (the KV writes are idempotent: the
            # retry rewrites position n-1 with the same token; draft positions are never attended).
            proposal = DraftProposal.empty(B)
            out, result = self._verify_and_sample(batch, proposal)
            log.exception("verification with drafts failed and succeeded without them: the drafter is at fault")
            stats.drafter_fault = f"verify with drafts raised {type(e).__name__}: {e}"
        if result.draft_fault is not None:
            stats.drafter_fault = result.draft_fault
        t2 = time.perf_counter()
        outputs = []
        for b, seq in enumerate(self.running):
            if b in result.failed:
                outputs.append(self._fail(seq, result.failed[b]))
                stats.num_failed += 1
                continue
            a = result.num_accepted[b]
            n = batch.num_tokens[b]
            self.hidden_buf[b, n - 1:n + a] = out.hidden[b, :a + 1]
            want_lp = seq.sampling.logprobs is not None
            outputs.append(self._emit(seq, result.tokens[b], out.logits[b, :a + 1] if want_lp else None))
        if self.proposer is not None:
            self.proposer.on_verified(batch, result.num_accepted)
        t3 = time.perf_counter()
        drafted = proposal.num_drafts.tolist()
        stats.spec.record(drafted, result.num_accepted)
        self.stats.merge(stats.spec)
        emitted = sum(len(o.new_token_ids) for o in outputs)
        k = proposal.k
        stats.batch_size, stats.k, stats.num_emitted_tokens = B, k, emitted
        stats.propose_s, stats.verify_s, stats.sample_s = t1 - t0, t2 - t1, t3 - t2
        # The controller compares arms at steady state: a long catch-up (the drafter re-reading what it missed
        # during a K=0 stretch, or a new prompt) is the price of switching, not of the arm, and charging it to
        # the K>0 pull that pays it kept the bandit on "off" wherever off was the current arm (measured:
        # in-domain batch 1 chose off for 516 of 646 steps although K=2 decodes 1.43x faster there).
        self.controller.observe(B, k, emitted, t3 - t0 - proposal.catch_up_s)
        self._free([s for s in self.running if self._is_done(s)])
        return outputs

    def _verify_and_sample(self, batch: BatchState, proposal: DraftProposal) -> tuple[VerifyOutput, SampleResult]:
        """The target's verdict on the proposal; nothing is committed yet (tokens, features, slots)."""
        out = verify(self.model, self.cache, batch, proposal)
        raw = out.logits
        biased = [b for b, s in enumerate(self.running) if s.sampling.logit_bias]
        constrained = [b for b, s in enumerate(self.running) if s.matcher is not None]
        if biased or constrained:
            logits = raw.clone()  # logprobs stay the model's own distribution, as OpenAI reports them
            for b in biased:
                apply_logit_bias(logits[b], self.running[b].sampling.logit_bias)
        else:
            logits = raw
        failed = self._apply_grammars(logits, proposal, constrained) if constrained else {}
        result = rejection_sample(logits, proposal, batch)
        result.failed.update(failed)
        return out, result

    def _apply_grammars(self, logits: torch.Tensor, proposal: DraftProposal, rows: list[int]) -> dict[int, str]:
        """Mask the constrained rows' verification logits [B, k+1, V] in place: position i of row b gets the
        grammar state after its drafts 1..i (lossless: a forbidden draft has target probability 0 and is
        rejected; positions past a forbidden draft or the row's last draft are never read, and stay unmasked).
        Returns the rows whose grammar failed (each fails alone; its logits are left unmasked)."""
        B, k1, V = logits.shape
        masks = new_bitmask(len(rows), k1, vocab_size=V)
        drafts = proposal.token_ids.tolist()
        n_drafts = proposal.num_drafts.tolist()
        failed: dict[int, str] = {}
        used: list[int] = []  # flat positions b * k1 + i whose mask was written, and their rows in `masks`
        for j, b in enumerate(rows):
            matcher = self.running[b].matcher
            assert matcher is not None
            try:
                n = matcher.fill_masks(drafts[b][:n_drafts[b]], masks[j])
            except Exception as e:
                log.exception("the grammar of %s failed; failing that request only", self.running[b].request_id)
                failed[b] = f"constrained decoding failed: {e}"
                continue
            used.extend(j * k1 + i for i in range(n))  # positions past a rejected draft are never read
        if used:
            src = torch.tensor(used, dtype=torch.long)
            flat = torch.tensor([rows[u // k1] * k1 + u % k1 for u in used], dtype=torch.long, device=logits.device)
            view = logits.view(B * k1, V)
            sub = view.index_select(0, flat)
            apply_bitmask(sub, masks.view(-1, masks.shape[-1]).index_select(0, src))
            view.index_copy_(0, flat, sub)
        return failed

    def _fail(self, seq: Sequence, why: str) -> StepOutput:
        """Finish one request with an error; it is freed at the end of the step like any finished one."""
        self._done[seq.request_id] = "error"
        return StepOutput(request_id=seq.request_id, new_token_ids=[], finished=True, finish_reason="error",
                          num_prompt_tokens=seq.prompt_len, num_output_tokens=seq.num_output, error=why)

    # ---- emitting and freeing ---------------------------------------------------------------------------
    def _emit(self, seq: Sequence, tokens: list[int], logits: torch.Tensor | None) -> StepOutput:
        """Append tokens one by one, stopping at a stop token or the budget. logits: [len(tokens), V] or None."""
        new: list[int] = []
        reason, stop_id = None, None
        for t in tokens:
            seq.token_ids.append(t)
            new.append(t)
            if seq.matcher is not None and not seq.matcher.advance(t):
                return self._fail(seq, f"token {t} left the response_format grammar ({seq.matcher.error})")
            if t in seq.stop_ids:
                reason, stop_id = "stop", t
                break
            if seq.matcher is not None and seq.matcher.stopped:  # the grammar is complete: only EOS could follow
                reason = "stop"
                break
            if seq.num_output >= seq.sampling.max_tokens:
                reason = "length"
                break
        if seq.matcher is not None:
            seq.matcher.settle()  # drafts consumed for the masks but not emitted
        lps = self._logprobs(seq, new, logits) if logits is not None else None
        seq_done = reason is not None
        hidden = None
        if seq_done:
            self._done[seq.request_id] = reason  # its slot is freed at the end of this step
            if self.capture_hidden:  # every position fed to the target so far: 0 .. n-2
                hidden = self.hidden_buf[seq.slot, :len(seq.token_ids) - 1].float().cpu().clone()
        return StepOutput(request_id=seq.request_id, new_token_ids=new, finished=seq_done, finish_reason=reason,
                          stop_token_id=stop_id, logprobs=lps, num_prompt_tokens=seq.prompt_len,
                          num_output_tokens=seq.num_output, hidden=hidden)

    def _is_done(self, seq: Sequence) -> bool:
        return seq.request_id in self._done

    def _logprobs(self, seq: Sequence, new: list[int], logits: torch.Tensor) -> list[TokenLogprob]:
        n_top = min(seq.sampling.logprobs or 0, MAX_LOGPROBS)
        lp = torch.log_softmax(logits[:len(new)].float(), dim=-1)  # [n, V]
        out = []
        for i, t in enumerate(new):
            top: list[tuple[int, float]] = []
            if n_top:
                vals, idx = lp[i].topk(n_top)
                top = [(int(j), float(v)) for j, v in zip(idx, vals, strict=True)]
            v = float(lp[i, t])
            out.append(TokenLogprob(token_id=t, logprob=v if math.isfinite(v) else -9999.0, top=top))
        return out

    def _free(self, seqs: list[Sequence]) -> None:
        """Release finished/aborted sequences, keeping live slots contiguous by moving the last one down."""
        for seq in sorted(seqs, key=lambda s: s.slot, reverse=True):
            slot, last = seq.slot, len(self.running) - 1
            if slot != last:
                mover = self.running[last]
                length = len(mover.token_ids)  # positions 0..n-2 are in the cache; n-1 is harmless extra
                self.cache.move_slot(last, slot, min(length, self.capacity))
                self.hidden_buf[slot, :length].copy_(self.hidden_buf[last, :length])
                if self.proposer is not None:
                    self.proposer.on_slot_moved(last, slot, min(length, self.capacity))
                self.running[slot] = mover
                mover.slot = slot
            self.running.pop()
            seq.slot = -1
            self._done.pop(seq.request_id, None)
            self._forget(seq.request_id)

    # ---- convenience ---------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion (continuous batching); returns the generated ids of each, in order."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        base = f"gen-{id(prompts)}-{time.monotonic_ns()}"
        outs: dict[str, list[int]] = {}
        for i, (p, s) in enumerate(zip(prompts, params, strict=True)):
            rid = f"{base}-{i}"
            outs[rid] = []
            self.add_request(rid, p, s)
        while self.has_unfinished():
            for o in self.step():
                if o.request_id in outs:
                    outs[o.request_id].extend(o.new_token_ids)
        return [outs[f"{base}-{i}"] for i in range(len(prompts))]
