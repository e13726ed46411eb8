"""`jsonl`: the user's JSONL file of {"prompt", "answer"} rows, scored by a named answer check
(`ANSWER_CHECKS`: exact | numeric | regex | contains; add one with `@register_answer_check`)."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from understudy.trainer.tasks.base import (
    MAX_ANSWER_CHARS,
    MAX_RESPONSE_CHARS,
    BaseTask,
    Problem,
    TaskError,
    answer_line,
    register_task,
)


@dataclass(frozen=True)
class AnswerCheck:
    """How a jsonl row's answer is checked. `prepare` validates the file's answer once (ValueError = bad row)."""

    prepare: Callable[[Any], Any]
    score: Callable[[str, Any, float], float]  # (response, prepared answer, tolerance) -> [0, 1]


ANSWER_CHECKS: dict[str, AnswerCheck] = {}


def register_answer_check(name: str, prepare: Callable[[Any], Any]) -> Callable[[Callable], Callable]:
    def deco(score: Callable[[str, Any, float], float]) -> Callable[[str, Any, float], float]:
        ANSWER_CHECKS[name] = AnswerCheck(prepare=prepare, score=score)
        return score

    return deco


def _as_text(answer: Any) -> str:
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
        raise ValueError("the answer must be a non-empty string or a number")
    return str(answer).strip()


def _as_number(answer: Any) -> float:
    value = _parse_number(_as_text(answer))
    if value is None:
        raise ValueError(f"the answer {answer!r} is not a finite number")
    return value


def _as_regex(answer: Any) -> re.Pattern[str]:
    if not isinstance(answer, str) or not answer:
        raise ValueError("a regex answer must be a non-empty string (the pattern)")
    try:
        return re.compile(answer)
    except re.error as e:
        raise ValueError(f"the pattern {answer!r} does not compile: {e}") from e


_NUMBER_RE = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?(?:[eE][-+]?[0-9]{1,3})?")


def _parse_number(text: str) -> float | None:
    if not _NUMBER_RE.fullmatch(text) or len(text) > 64:
        return None
    value = float(text.replace(",", ""))
    return value if math.isfinite(value) else None


def _candidate(response: str) -> str:
    """The `answer:` line when there is one, else the whole (stripped, length-capped) response."""
    content = answer_line(response)
    return content if content is not None else response[-MAX_RESPONSE_CHARS:].strip()


@register_answer_check("exact", prepare=_as_text)
def _exact(response: str, answer: str, tolerance: float) -> float:
    return 1.0 if _candidate(response) == answer else 0.0


@register_answer_check("numeric", prepare=_as_number)
def _numeric(response: str, answer: float, tolerance: float) -> float:
    """|x - answer| <= tolerance * max(1, |answer|), x = the answer line, else the response's last number."""
    content = answer_line(response)
    if content is None:
        found = _NUMBER_RE.findall(response[-MAX_RESPONSE_CHARS:])
        content = found[-1] if found else ""
    x = _parse_number(content.strip().rstrip("."))
    return 1.0 if x is not None and abs(x - answer) <= tolerance * max(1.0, abs(answer)) else 0.0


@register_answer_check("regex", prepare=_as_regex)
def _regex(response: str, answer: re.Pattern[str], tolerance: float) -> float:
    candidate = _candidate(response)
    return 1.0 if len(candidate) <= 4 * MAX_ANSWER_CHARS and answer.fullmatch(candidate) else 0.0


@register_answer_check("contains", prepare=_as_text)
def _contains(response: str, answer: str, tolerance: float) -> float:
    return 1.0 if answer.casefold() in response[-MAX_RESPONSE_CHARS:].casefold() else 0.0


@register_task("jsonl")
class JsonlTask(BaseTask):
    """Rows {"prompt": str, "answer": ...} from the user's JSONL file, scored by `reward` (exact | numeric |
    regex | contains). Extra fields are kept in `Problem.meta["row"]`."""

    name = "jsonl"

    def __init__(self, path: str | Path, reward: str = "exact", tolerance: float = 1e-6) -> None:
        if reward not in ANSWER_CHECKS:
            raise TaskError(f"jsonl: unknown reward {reward!r}; known: {', '.join(sorted(ANSWER_CHECKS))}")
        if not tolerance >= 0:
            raise TaskError(f"jsonl: tolerance must be >= 0, got {tolerance}")
        self.path, self.reward_name, self.tolerance = Path(path), reward, float(tolerance)
        self.check = ANSWER_CHECKS[reward]
        self._prepared: dict[int, Any] = {}  # file line -> the answer as the check wants it
        self.problems = self._load()

    def _load(self) -> list[Problem]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TaskError(f"jsonl task file {self.path} cannot be read ({e}); pass an existing UTF-8 "
                            'JSONL file with one {"prompt": ..., "answer": ...} object per line') from e
        problems = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                problems.append(self._row(line, lineno))
        if not problems:
            raise TaskError(f"{self.path} has no rows; each line must be an object with 'prompt' and 'answer'")
        return problems

    def _row(self, line: str, lineno: int) -> Problem:
        where = f"{self.path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise TaskError(f"{where}: each line needs a non-empty string field 'prompt'")
        if "answer" not in row:
            raise TaskError(f"{where}: the field 'answer' is missing")
        try:
            prepared = self.check.prepare(row["answer"])
        except ValueError as e:
            raise TaskError(f"{where}: bad answer for reward {self.reward_name!r}: {e}") from e
        self._prepared[lineno] = prepared
        extra = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
        return Problem(prompt=row["prompt"], answer=row["answer"], meta={"line": lineno, "row": extra})

    def sample(self, rng: random.Random) -> Problem:
        return rng.choice(self.problems)

    def extract_answer(self, response: str) -> str | None:
        return _candidate(response) if isinstance(response, str) else None

    def _score(self, problem: Problem, response: str) -> float:
        prepared = self._prepared.get(problem.meta.get("line", -1))
        if prepared is None:  # a problem from elsewhere: prepare its answer now
            prepared = self.check.prepare(problem.answer)
        return self.check.score(response, prepared, self.tolerance)
