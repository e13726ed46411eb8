"""`countdown`: the numbers used and the exact value of the expression; never eval."""

from __future__ import annotations

import pytest

from understudy.trainer.tasks import CountdownTask, Problem, eval_arithmetic


def test_countdown_checks_numbers_and_value():
    t = CountdownTask()
    p = Problem("Use 3 7 12 20 to make 31 ...", 31, {"numbers": [3, 7, 12, 20]})
    assert t.reward(p, "answer: (20-12)*3+7") == 1.0
    assert t.reward(p, "answer: 7+3*(20-12) = 31") == 1.0  # a trailing "= value" is ignored
    assert t.reward(p, "answer: 20 + 12 - 7 / 7 * 0") == 0.0  # 7 used twice, 0 not given
    assert t.reward(p, "answer: 20+12-1") == 0.0  # 1 is not given
    assert t.reward(p, "answer: 20+12-3") == 0.0  # valid numbers, wrong value (29)
    assert t.reward(p, "answer: 20+12-3/3") == 0.0  # 3 used twice
    assert t.reward(p, "answer: -3+20+7+7") == 0.0  # unary minus and a repeat
    halves = Problem("...", 24, {"numbers": [1, 3, 4, 6]})
    assert t.reward(halves, "answer: 6/(1-3/4)") == 1.0  # exact rationals: 6 / (1/4) = 24
    assert t.reward(halves, "answer: 6/(3-3)") == 0.0  # division by zero -> 0, no exception
    assert eval_arithmetic("6/(1-3/4)") == (24, [6, 1, 3, 4])
    for bad in ("2**3", "2//3", "-2", "1.5", "a", "f(1)", "(1", "2%3"):
        with pytest.raises((ValueError, SyntaxError)):
            eval_arithmetic(bad)
