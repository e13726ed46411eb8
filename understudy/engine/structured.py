"""Grammar-constrained decoding (the server's `response_format`): JSON mode and JSON Schema, with llguidance.

Three objects, by lifetime:

- `StructuredOutputs`: one per tokenizer. Builds llguidance's tokenizer once (lazily: ~1 s for a 49k vocabulary)
  and compiles grammars from JSON Schemas, keeping the last few compiled (a client sends the same schema again and
  again). Compiling runs on the caller's thread (the server's worker thread, before admission): a schema that
  does not compile fails that request with a GrammarError naming the field, and never reaches the engine.
- `Grammar`: one compiled grammar, immutable and shared by every request that uses it.
- `GrammarMatcher`: one per sequence (`Grammar.matcher()`), owned by the engine thread. It computes the token
  masks of a step and follows the committed tokens.

Speculation stays lossless: for a row with drafts d_1..d_k the verification logits at position i are masked with
the grammar state after d_1..d_i (`fill_masks` advances the matcher over the drafts tentatively, computing the
mask before each). A draft the grammar forbids has probability 0 under the masked target, so it is rejected,
and nothing after it can be accepted. `advance` then commits the emitted tokens: drafts it already consumed are
kept, the rest are rolled back, and the bonus token is consumed.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import threading
from typing import Any

import llguidance
import torch

from understudy.errors import InputError

log = logging.getLogger(__name__)

SCHEMA_PARAM = "response_format.json_schema.schema"
_CACHE_SIZE = 64  # compiled grammars kept per tokenizer (a grammar is a few hundred kB at most)
# JSON Schema compile defaults (a schema's own "x-guidance" object overrides them): whitespace between tokens is
# allowed but bounded, so a model cannot pad an answer with newlines until its token budget runs out.
_JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": True, "whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,24}"}
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)  # errors say what is wrong, not the parser's state


class GrammarError(InputError, ValueError):
    """A response_format that cannot be compiled into a grammar: 400 naming the field and what to do."""


class StructuredOutputUnavailable(InputError, ValueError):
    """This model's tokenizer cannot drive constrained decoding (400: the request asked for it)."""


def _token_table(tokenizer: Any, n_vocab: int) -> list[bytes]:
    """Each token id's bytes, for tokenizers llguidance cannot read from their tokenizer.json (a WordLevel or
    character vocabulary with a Fuse decoder, say): decoded one token at a time. Special tokens are marked
    with a leading 0xFF, as llguidance expects, so no grammar can produce them as text."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    table: list[bytes] = []
    broken = 0
    for i in range(len(tokenizer)):
        if i in special:
            table.append(b"\xff" + str(tokenizer.convert_ids_to_tokens(i)).encode())
            continue
        text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        broken += "\ufffd" in text
        table.append(text.encode())
    if broken:
        raise StructuredOutputUnavailable(
            f"response_format needs each token's bytes; llguidance cannot read this tokenizer and {broken} of its "
            "tokens do not decode alone (byte-level pieces). Use a model with a byte-level BPE or SentencePiece "
            "tokenizer, or send the request without response_format", "response_format")
    return table + [b""] * max(0, n_vocab - len(table))


class _Encoder:
    """The encode callable llguidance's TokenizerWrapper calls (with bytes when the callable accepts them)."""

    def __init__(self, tokenizer: Any, table: list[bytes], eos: int, bos: int | None) -> None:
        self._tok = tokenizer
        self.tokens, self.eos_token_id, self.bos_token_id = table, eos, bos
        self.special_token_ids = [i for i, t in enumerate(table) if t.startswith(b"\xff")]

    def __call__(self, text: bytes | str) -> list[int]:
        s = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        return [int(t) for t in self._tok.encode(s, add_special_tokens=False)]


class Grammar:
    """A compiled grammar (immutable, shared). `matcher()` gives a sequence its own state."""

    __slots__ = ("_proto", "description", "vocab_size")

    def __init__(self, proto: llguidance.LLMatcher, vocab_size: int, description: str) -> None:
        self._proto, self.vocab_size, self.description = proto, vocab_size, description

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._proto.deep_copy())

    def __repr__(self) -> str:
        return f"Grammar({self.description})"


class GrammarMatcher:
    """One sequence's grammar state. Not thread-safe: the engine thread alone uses it once it is admitted."""

    __slots__ = ("_m", "_pos", "_stopped_after", "_tentative", "stopped")

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._m = matcher
        self._tentative: list[int] = []  # drafts consumed by fill_masks, not yet committed
        self._stopped_after: list[bool] = []  # is_stopped() after each of them
        self._pos = 0  # how many of them advance() has committed
        self.stopped = False  # the committed tokens complete the grammar: only EOS may follow

    def fill_masks(self, drafts: list[int], out: torch.Tensor) -> int:
        """Write the allowed-token bitmask of each verification position: out[i] ([W] int32, bit t of word
        t // 32 = token t) allows what may follow the committed tokens + drafts[:i], for i = 0..len(drafts).
        Stops at the first draft the grammar forbids (that draft is rejected, so later rows are never used);
        rows not written keep what the caller put there. out: [>= len(drafts) + 1, W] int32, CPU, contiguous.
        Returns how many rows were written (1..len(drafts) + 1). Raises RuntimeError if the grammar state is
        broken (the engine fails this request alone)."""
        self.settle()
        m, nbytes = self._m, out.shape[1] * 4
        consumed: list[int] = []
        stopped: list[bool] = []
        written = 0
        for i in range(len(drafts) + 1):
            row = out[i]
            m.unsafe_compute_mask_ptr(row.data_ptr(), nbytes)
            written = i + 1
            if m.is_error():
                self._undo(len(consumed))
                raise RuntimeError(f"the grammar matcher failed: {m.get_error()}")
            if not bool(row.any()):  # nothing allowed: only after the grammar ended on a draft (EOS consumed)
                if i == 0:
                    raise RuntimeError("the grammar allows no token here (it has already ended)")
                row.fill_(-1)
                break
            if i == len(drafts):
                break
            d = drafts[i]
            if not (int(row[d >> 5]) >> (d & 31)) & 1:
                break  # a forbidden draft: rejected by the masked target
            if not m.consume_token(d):
                raise RuntimeError(f"the grammar matcher refused token {d} its own mask allowed: {m.get_error()}")
            consumed.append(d)
            stopped.append(m.is_stopped())
        self._tentative, self._stopped_after, self._pos = consumed, stopped, 0
        return written

    def advance(self, token: int) -> bool:
        """Commit one emitted token (False: the grammar forbids it; the matcher is then broken). Drafts that
        fill_masks consumed are kept while the committed tokens follow them; at the first difference the rest
        are rolled back. Sets `stopped`."""
        if self._pos < len(self._tentative):
            if self._tentative[self._pos] == token:
                self.stopped = self._stopped_after[self._pos]
                self._pos += 1
                return True
            self.settle()
        ok = self._m.consume_token(token)
        self.stopped = self._m.is_stopped()
        return ok

    def settle(self) -> None:
        """Roll back the tentatively consumed drafts that were not committed."""
        self._undo(len(self._tentative) - self._pos)
        self._tentative, self._stopped_after, self._pos = [], [], 0

    def _undo(self, n: int) -> None:
        if n > 0 and not self._m.rollback(n):
            raise RuntimeError(f"the grammar matcher could not roll back {n} draft token(s): {self._m.get_error()}")

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


def mask_words(vocab_size: int) -> int:
    """int32 words of one bitmask row."""
    return (vocab_size + 31) // 32


def new_bitmask(*shape: int, vocab_size: int) -> torch.Tensor:
    """A bitmask [*shape, W] that allows every token (all bits set)."""
    return torch.full((*shape, mask_words(vocab_size)), -1, dtype=torch.int32)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def allowed_from_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., W] int32 bitmask -> [..., V] bool (True = allowed)."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1  # arithmetic shift: bit 31 of a negative word reads as 1
    return bits.flatten(-2)[..., :vocab_size].bool()


_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # [256, 8]: bit j of byte b
_ADDEND: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _addend(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: 0 where bit j of byte value b is set, -inf where not (a lookup table per device and dtype)."""
    key = (device, dtype)
    if key not in _ADDEND:
        _ADDEND[key] = torch.where(_BYTE_BITS, 0.0, float("-inf")).to(device=device, dtype=dtype)
    return _ADDEND[key]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set disallowed tokens' logits to -inf in place. logits: [..., V] (any device); bitmask: [..., W] (CPU).

    One table lookup per mask byte and one add: 3x faster on CPU than unpacking bits and masked_fill (measured,
    docs/structured-output.md). The byte view is little-endian's order of the words' bits."""
    V = logits.shape[-1]
    if sys.byteorder != "little":
        logits.masked_fill_(~allowed_from_bitmask(bitmask, V).to(logits.device), float("-inf"))
        return
    nbytes = bitmask.shape[-1] * 4
    idx = bitmask.contiguous().view(torch.uint8).reshape(*bitmask.shape[:-1], nbytes)
    add = _addend(logits.device, logits.dtype)[idx.to(logits.device, non_blocking=True).long()]  # [..., bytes, 8]
    logits.add_(add.flatten(-2)[..., :V])


class StructuredOutputs:
    """Compiles response formats into grammars for one tokenizer and model vocabulary. Thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        eos = [int(t) for t in eos_token_ids] or (
            [int(tokenizer.eos_token_id)] if getattr(tokenizer, "eos_token_id", None) is not None else [])
        self.eos_token_ids = eos
        self._lltok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, Grammar] = collections.OrderedDict()

    # ---- the tokenizer (once) -----------------------------------------------------------------------------
    def lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                self._lltok = self._build_tokenizer()
            return self._lltok

    def _build_tokenizer(self) -> llguidance.LLTokenizer:
        if not self.eos_token_ids:
            raise StructuredOutputUnavailable(
                "response_format needs an end-of-sequence token to finish a constrained answer, and this model "
                "has none (no eos_token_id in its config or tokenizer); send the request without response_format",
                "response_format")
        n_vocab = max(self.vocab_size, len(self.tokenizer))
        try:
            import llguidance.hf

            return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n_vocab, eos_token=self.eos_token_ids)
        except (ValueError, TypeError) as e:  # a tokenizer.json llguidance cannot read: build the table here
            log.info("llguidance cannot read this tokenizer (%s); building its token table by decoding", e)
        table = _token_table(self.tokenizer, n_vocab)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        wrapper = llguidance.TokenizerWrapper(_Encoder(self.tokenizer, table, self.eos_token_ids[0], bos))
        return llguidance.LLTokenizer(wrapper, n_vocab=n_vocab, eos_token=self.eos_token_ids)

    # ---- grammars -----------------------------------------------------------------------------------------
    def json_object(self) -> Grammar:
        """JSON mode: any JSON object."""
        return self.json_schema({"type": "object"}, param="response_format", description="json_object")

    def json_schema(self, schema: dict[str, Any], param: str = SCHEMA_PARAM, description: str = "json_schema") -> Grammar:
        """A grammar for the JSON documents that validate against `schema` (raises GrammarError naming param)."""
        if not isinstance(schema, dict):
            raise GrammarError(f"{param}: the JSON Schema must be a JSON object, got {type(schema).__name__}", param)
        key = json.dumps(schema, separators=(",", ":"))  # key order matters: properties are emitted in order
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(key, defaults=_JSON_DEFAULTS)  # type: ignore[arg-type]
        except ValueError as e:
            raise GrammarError(f"{param}: not a usable JSON Schema ({e}); send a JSON Schema object", param) from e
        grammar = self._compile(text, param, description)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, text: str, param: str, description: str) -> Grammar:
        tok = self.lltokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tok, limits=_LIMITS)
        if is_error:
            why = messages[0] if messages else "unknown error"
            raise GrammarError(f"{param}: this JSON Schema cannot be enforced ({why}). Fix or simplify the schema "
                               "(supported: type, properties, required, items, enum, const, anyOf/oneOf, $ref, "
                               "string/number bounds and patterns)", param)
        for w in messages:
            log.info("grammar warning (%s): %s", description, w)
        proto = llguidance.LLMatcher(tok, text, log_level=0, limits=_LIMITS)
        if proto.is_error():
            raise GrammarError(f"{param}: this JSON Schema cannot be enforced ({proto.get_error()}); fix or "
                               "simplify the schema", param)
        return Grammar(proto, self.vocab_size, description)
