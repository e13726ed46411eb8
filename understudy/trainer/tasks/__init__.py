"""Tasks with verifiable rewards (docs/trainer-tasks.md): `base.py` holds the protocol and the registry, and each
task is one module here that registers itself with `@register_task("name")`:

    arith      step-by-step addition / multiplication; response length grows with digits and carries
    countdown  reach a target with + - * / using each given number at most once
    grid-risk  N-1 contingency screening of a power grid with line outage distribution factors (LODF)
    jsonl      the user's JSONL file of {"prompt", "answer"} rows, scored by a named answer check

Importing this package imports every module in it (sorted by name), so adding a task is adding one file; the
built-in tasks' classes are re-exported below for `from understudy.trainer.tasks import ArithTask`.
"""

from __future__ import annotations

import importlib
import pkgutil

from understudy.trainer.tasks.arith import ArithTask
from understudy.trainer.tasks.base import (
    MAX_ANSWER_CHARS,
    MAX_RESPONSE_CHARS,
    TASKS,
    BaseTask,
    Problem,
    SolvableTask,
    Task,
    TaskError,
    TaskFactory,
    answer_line,
    get_task,
    register_task,
)
from understudy.trainer.tasks.countdown import CountdownTask, eval_arithmetic
from understudy.trainer.tasks.grid_risk import GridRiskTask
from understudy.trainer.tasks.jsonl import ANSWER_CHECKS, AnswerCheck, JsonlTask, register_answer_check

__all__ = [
    "ANSWER_CHECKS", "MAX_ANSWER_CHARS", "MAX_RESPONSE_CHARS", "TASKS", "AnswerCheck", "ArithTask", "BaseTask",
    "CountdownTask", "GridRiskTask", "JsonlTask", "Problem", "SolvableTask", "Task", "TaskError", "TaskFactory",
    "answer_line", "eval_arithmetic", "get_task", "register_answer_check", "register_task",
]


def _import_task_modules() -> None:
    """Import every module of this package (each registers its task); an import error propagates."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_task_modules()
