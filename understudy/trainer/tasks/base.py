"""What every task shares: the `Task` protocol, `Problem`, `TaskError`, the answer-line parser, the `BaseTask`
guard, and the registry (`register_task`, `get_task`). A task is one module next to this one
(docs/trainer-tasks.md, "Adding a task").

Rewards are pure and safe: nothing is ever `eval`-ed, the response is only pattern-matched, and malformed or
hostile output scores 0.0 instead of raising. Every task's final answer is on a line `answer: ...`; the last such
line counts.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from understudy.errors import UnderstudyError

log = logging.getLogger(__name__)

MAX_RESPONSE_CHARS = 16384  # only the tail of a response is scanned for the answer line
MAX_ANSWER_CHARS = 256  # a longer `answer:` line is malformed


class TaskError(UnderstudyError, ValueError):
    """A task name, option or data file is wrong (names the field or file:line and what to do)."""


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user message (the chat template is applied by the caller)
    answer: Any  # the verifiable ground truth (task-specific, JSON-friendly)
    meta: dict[str, Any] = field(default_factory=dict)  # task-specific details (kind, difficulty, ...)


@runtime_checkable
class Task(Protocol):
    name: str

    def sample(self, rng: random.Random) -> Problem: ...

    def reward(self, problem: Problem, response: str) -> float: ...

    def extract_answer(self, response: str) -> Any | None: ...


@runtime_checkable
class SolvableTask(Task, Protocol):
    """A task that can write the canonical worked solution (used to pretrain tiny policies)."""

    def solution(self, problem: Problem) -> str: ...


def answer_line(response: Any) -> str | None:
    """The content of the last line starting with `answer:` (case-insensitive), stripped; None if absent."""
    if not isinstance(response, str):
        return None
    for line in reversed(response[-MAX_RESPONSE_CHARS:].splitlines()):
        s = line.strip()
        if s[:7].lower() == "answer:":
            content = s[7:].strip()
            return content if len(content) <= MAX_ANSWER_CHARS else None
    return None


class BaseTask:
    """Shared guard: `reward` never raises and always returns a float in [0, 1]; subclasses write `_score`."""

    name = "base"
    _SAFE_ERRORS = (ValueError, TypeError, ArithmeticError, RecursionError, MemoryError, SyntaxError, re.error)

    def reward(self, problem: Problem, response: str) -> float:
        if not isinstance(response, str):
            return 0.0
        try:
            score = float(self._score(problem, response))
        except self._SAFE_ERRORS as e:  # malformed or hostile output is wrong, not a crash
            log.debug("task %s: response scored 0 (%s: %s)", self.name, type(e).__name__, e)
            return 0.0
        return min(max(score, 0.0), 1.0) if math.isfinite(score) else 0.0

    def extract_answer(self, response: str) -> Any | None:
        raise NotImplementedError

    def _score(self, problem: Problem, response: str) -> float:
        """Default: 1 when the extracted answer equals the problem's answer."""
        return 1.0 if self.extract_answer(response) == problem.answer else 0.0


# ---- registry ----------------------------------------------------------------------------------------------
TaskFactory = Callable[..., Task]
TASKS: dict[str, TaskFactory] = {}


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    def deco(factory: TaskFactory) -> TaskFactory:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = factory
        return factory

    return deco


def get_task(name: str, **kwargs: Any) -> Task:
    """Build a registered task; unknown names and options raise TaskError listing what exists."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    factory = TASKS[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(factory).parameters if p != "self"]
        raise TaskError(f"task {name!r} does not take options {sorted(kwargs)} ({e}); "
                        f"its options are: {', '.join(params) or 'none'}") from e
    return factory(**kwargs)
