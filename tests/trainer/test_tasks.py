"""The task package: registry, protocols, one module per task, and what every solvable task must do (canonical
solutions score 1, wrong answers 0, hostile output 0 fast, never raises). Per-task tests: test_task_<name>.py."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pytest

import understudy.trainer.tasks as tasks_pkg
from tests.trainer.hostile import HOSTILE
from understudy.trainer.tasks import SolvableTask, Task, TaskError, answer_line, get_task
from understudy.trainer.tasks.base import TASKS

SOLVABLE = ["arith", "countdown", "grid-risk"]


def test_registry_and_protocols():
    assert {"arith", "countdown", "grid-risk", "jsonl"} <= set(TASKS)
    for name in SOLVABLE:
        task = get_task(name)
        assert isinstance(task, Task) and isinstance(task, SolvableTask) and task.name == name
    with pytest.raises(TaskError, match="known tasks: arith, countdown, grid-risk, jsonl"):
        get_task("chess")
    with pytest.raises(TaskError, match="its options are: max_digits"):
        get_task("arith", digits=3)
    with pytest.raises(TaskError, match="digit_weights"):
        get_task("arith", max_digits=2, digit_weights=(1.0,))


@pytest.mark.parametrize("name", SOLVABLE)
def test_canonical_solutions_score_one_and_wrong_answers_zero(name):
    task, rng = get_task(name), random.Random(0)
    for _ in range(300):
        p = task.sample(rng)
        sol = task.solution(p)
        assert sol.isascii() and all(len(line) <= 80 for line in sol.splitlines())
        assert sol.splitlines()[-1].startswith("answer: ")
        assert task.reward(p, sol) == 1.0, (p, sol)
        assert task.reward(p, sol + "\n") == 1.0  # trailing whitespace is fine
        wrong = sol.rsplit("answer:", 1)[0] + "answer: 123456789"
        assert task.reward(p, wrong) == 0.0
        assert task.reward(p, sol.rsplit("\n", 1)[0]) == 0.0  # the answer line is required


@pytest.mark.parametrize("name", SOLVABLE)
def test_hostile_and_malformed_outputs_score_zero_quickly(name):
    task, rng = get_task(name), random.Random(1)
    p = task.sample(rng)
    for response in [*HOSTILE, None, 12, b"answer: 1"]:
        t0 = time.thread_time()  # this thread's CPU time: other processes on a busy machine do not count
        score = task.reward(p, response)  # type: ignore[arg-type]
        took = time.thread_time() - t0
        assert score == 0.0, (name, str(response)[:60])
        assert took < 1.0, (name, str(response)[:60], took)  # catastrophic backtracking would take far longer


def test_each_task_lives_in_its_own_module_and_every_module_is_imported():
    folder = Path(tasks_pkg.__file__).parent
    modules = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    assert modules == ["arith", "base", "countdown", "grid_risk", "jsonl"]
    assert all(f"understudy.trainer.tasks.{m}" in sys.modules for m in modules)  # a new file registers itself
    homes = {name: factory.__module__ for name, factory in TASKS.items()}
    assert homes == {"arith": "understudy.trainer.tasks.arith", "countdown": "understudy.trainer.tasks.countdown",
                     "grid-risk": "understudy.trainer.tasks.grid_risk", "jsonl": "understudy.trainer.tasks.jsonl"}
    with pytest.raises(ValueError, match="already registered"):
        tasks_pkg.register_task("arith")(lambda: None)


def test_answer_line():
    assert answer_line("a\nAnswer:  42  \nb") == "42"
    assert answer_line("answer: " + "1" * 300) is None
    assert answer_line(None) is None and answer_line("nothing") is None
