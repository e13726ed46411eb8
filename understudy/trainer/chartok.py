"""A character-level tokenizer for the tiny models the project trains from scratch (no hub, no download).

Every printable ASCII character (letters, digits, punctuation, space, newline) is one token; seven special
tokens carry BOS/EOS/padding and a minimal chat template, so the same prompt encoding (`encode_prompt`, chat
template applied) works for these models and for real chat models. Unknown characters map to `<pad>`.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_char_tokenizer(folder: Path | None = None, alphabet: str = ALPHABET) -> Any:
    """A character-level `PreTrainedTokenizerFast` (ids: specials 0..6, then `alphabet` in order).

    eos = "</s>" (id 2), bos = "<s>", pad = "<pad>". Decoding concatenates characters (no spaces inserted).
    Saved into `folder` when given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))  # keep order, drop duplicates
    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=list(SPECIAL_TOKENS[3:]))
    fast.chat_template = CHAT_TEMPLATE
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(folder))
    return fast
