"""Prompt encoding shared by the CLI, drafter training and the server (chat template when the tokenizer has one)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from understudy.errors import UnderstudyError


class PromptFileError(UnderstudyError, ValueError):
    """A prompt file is missing or malformed (names the file and line)."""


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat, ending with the assistant turn's opening (the tokenizer's chat template)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return encode_text(tokenizer, text)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]


def encode_prompt(tokenizer: Any, text: str, chat: bool = True) -> list[int]:
    return encode_chat(tokenizer, [{"role": "user", "content": text}]) if chat else encode_text(tokenizer, text)


def default_prompts_path() -> Path:
    return Path(str(resources.files("understudy") / "data" / "prompts.jsonl"))


def default_prompt_files() -> list[Path]:
    """The shipped prompt sets a drafter trains and is evaluated on: the general one and the grid-risk domain."""
    general = default_prompts_path()
    return [general, general.with_name("prompts-grid-risk.jsonl")]


def load_prompts(path: Path | None = None, splits: tuple[str, ...] | None = None) -> list[dict[str, str]]:
    """Rows {"prompt", "category", "split"} from a JSONL (or plain text: one prompt per line, split "train")."""
    path = Path(path) if path is not None else default_prompts_path()
    if not path.exists():
        raise PromptFileError(f"prompt file {path} does not exist; pass --prompts FILE (JSONL with a "
                                "'prompt' field per line, or plain text with one prompt per line)")
    rows: list[dict[str, str]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl" or line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an object "
                                 "with a 'prompt' field") from e
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise PromptFileError(f"{path}:{lineno}: each line needs a non-empty string field 'prompt'")
            rows.append({"prompt": row["prompt"], "category": str(row.get("category", "user")),
                         "split": str(row.get("split", "train"))})
        else:
            rows.append({"prompt": line, "category": "user", "split": "train"})
    if splits is not None:
        rows = [r for r in rows if r["split"] in splits]
    if not rows:
        raise PromptFileError(f"{path} has no prompts" + (f" in splits {splits}" if splits else ""))
    return rows
