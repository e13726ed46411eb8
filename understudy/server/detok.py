"""Incremental detokenization with stop strings (OpenAI `stop`: the stop string itself is trimmed).

The output is re-decoded in full at each step (SmolLM2's fast tokenizer: ~2 ms for 2,048 tokens, measured, next to a
~60 ms decode step on CPU). Text that could still become a stop string, or that ends in an incomplete UTF-8 sequence, is
held back until it is safe; `finish()` releases it.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any, stops: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded output so far (before trimming at a stop)
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; returns the newly safe text. After a stop string is seen, `stopped` is True."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        text = self._decode()
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        self.text = text
        for s in self.stops:
            idx = text.find(s, max(0, self.emitted - len(s)))
            if idx != -1:
                self.text = text[:idx]
                self.stopped = True
        if self.stopped:
            return self._release(len(self.text))
        return self._release(len(self.text) - self.hold)

    def finish(self) -> str:
        """Everything not yet returned (call once the request is done)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
