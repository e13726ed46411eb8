"""`arith`: the worked-solution format, answer extraction, instruct mode and the long tail of lengths."""

from __future__ import annotations

import random
import statistics

import pytest

from understudy.trainer.tasks import ArithTask, Problem, TaskError


def test_arith_format_and_extract():
    t = ArithTask()
    add = Problem("478+95=", 573, {"kind": "add", "a": 478, "b": 95, "digits": 3})
    assert t.solution(add) == "8+5=13 >3\n7+9+1=17 >73\n4+0+1=5 >573\nanswer: 573"
    carry = Problem("95+7=", 102, {"kind": "add", "a": 95, "b": 7, "digits": 2})
    assert t.solution(carry) == "5+7=12 >2\n9+0+1=10 >02\ncarry 1 >102\nanswer: 102"
    mul = Problem("999*9=", 8991, {"kind": "mul", "a": 999, "b": 9, "digits": 3})
    assert t.solution(mul) == "9*9=81 >1\n9*9+8=89 >91\n9*9+8=89 >991\ncarry 8 >8991\nanswer: 8991"
    assert t.extract_answer("junk\nANSWER:  573 \n") == 573
    assert t.extract_answer("answer: 1\nanswer: 2") == 2  # the last answer line counts
    assert t.extract_answer("answer: \uff15\uff17\uff13") is None  # ASCII digits only
    assert t.extract_answer("the answer: 573") is None  # must start the line
    p = t.sample(random.Random(3))
    assert p.prompt == f"{p.meta['a']}{'+' if p.meta['kind'] == 'add' else '*'}{p.meta['b']}="


def test_arith_instruct_mode_asks_in_words_and_reads_the_last_integer():
    t = ArithTask(max_digits=2, instruct=True)
    p = t.sample(random.Random(3))
    assert "answer: <number>" in p.prompt and str(p.meta["a"]) in p.prompt and "=" not in p.prompt
    q = Problem("What is 71 plus 55?", 126, {"kind": "add", "a": 71, "b": 55, "digits": 2})
    assert t.reward(q, "71 + 55 = 126.") == 1.0
    assert t.reward(q, "5 + 70 = 70 + 5 = 85") == 0.0  # the last integer counts
    assert t.reward(q, "answer: 126\nso maybe 3") == 1.0  # an answer line still wins
    assert t.extract_answer("it is 1,126 in total") == 1126
    assert t.extract_answer("no digits here") is None
    assert t.extract_answer("9" * 60) is None  # absurdly long: malformed, not a crash
    assert ArithTask().extract_answer("71 + 55 = 126") is None  # the strict format stays strict
    with pytest.raises(TaskError, match="instruct"):
        ArithTask(instruct="yes")  # type: ignore[arg-type]


def test_arith_solution_lengths_have_a_long_tail():
    task, rng = ArithTask(), random.Random(0)
    lengths = sorted(len(task.solution(task.sample(rng))) for _ in range(4000))
    q = {f: lengths[int(f * (len(lengths) - 1))] for f in (0.1, 0.5, 0.9)}
    # measured: min 18, p10 29, median 44, p90 63, max 80 characters
    assert lengths[-1] >= 4 * lengths[0]
    assert q[0.9] >= 1.4 * q[0.5] >= 2 * q[0.1]
    assert statistics.pstdev(lengths) > 10
    # a 4-digit sum with carries takes 4 column lines + a carry line; 2+3 takes one
    long = Problem("9999+1=", 10000, {"kind": "add", "a": 9999, "b": 1, "digits": 4})
    short = Problem("2+3=", 5, {"kind": "add", "a": 2, "b": 3, "digits": 1})
    assert task.solution(long).count("\n") == 5 and task.solution(short).count("\n") == 1
