"""Tasks with verifiable rewards: canonical solutions score 1, wrong answers 0, hostile output 0 fast, never raises."""

from __future__ import annotations

import json
import random
import statistics
import time

import pytest

from understudy.trainer.tasks import (
    ANSWER_CHECKS,
    TASKS,
    ArithTask,
    CountdownTask,
    GridRiskTask,
    JsonlTask,
    Problem,
    SolvableTask,
    Task,
    TaskError,
    answer_line,
    eval_arithmetic,
    get_task,
)

SOLVABLE = ["arith", "countdown", "grid-risk"]

HOSTILE = [
    "", "answer:", "answer: ", "no answer here", "answer: None", "answer: nan", "answer: inf",
    "__import__('os').system('echo pwned')", "answer: __import__('os').system('echo pwned')",
    "answer: 9**9**9", "answer: 10**10**10", "answer: 2**2**2**2**2", "answer: " + "9" * 5000,
    "answer: " + "(" * 150 + "1" + ")" * 150, "answer: " + "(" * 99 + "1" + ")" * 99, "answer: 1/0",
    "answer: (1-1)/(2-2)", "answer: lambda: 1", "answer: [1]*10**9", "answer: 1e308*1e308", "answer: -1",
    "answer: " + "2*" * 100_000 + "2", "x" * 5_000_000, ("answer: 1\n" * 10_000) + "answer: nope",
    "answer: \uff17\uff15", "answer: \u0665\u0667", "answer: \ud800", "\x00answer: 12\x00", "answer: 12\u202e",
    "answer: overload " + "L1 " * 1000, "answer: overload Lx", "answer: overload", "answer: secure secure",
    "answer: 3 7 12", "answer: 1e999", "answer: -", "answer: ()", "answer: 1+", "answer: 0x10", "answer: 1_000",
    "answer: open('/etc/passwd').read()", "answer: ().__class__.__bases__[0].__subclasses__()",
]


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
        t0 = time.perf_counter()
        score = task.reward(p, response)  # type: ignore[arg-type]
        took = time.perf_counter() - t0
        assert score == 0.0, (name, str(response)[:60])
        assert took < 0.2, (name, str(response)[:60], took)


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


def test_grid_risk_answers_sets_of_lines():
    t, rng = GridRiskTask(num_lines=5), random.Random(4)
    kinds = {t.sample(rng).answer.split()[0] for _ in range(50)}
    assert kinds == {"secure", "overload"}
    # L2 trips carrying -80: L1 120 + 0.4 * -80 = 88 (<= 150 ok); L3 60 + -0.5 * -80 = 100 (> 90 overload)
    p = Problem("...", "overload L3", {"flows": [120, -80, 60], "ratings": [150, 100, 90], "trip": 1,
                                       "lodf": ["0.4", "-1.0", "-0.5"], "overloaded": ["L3"]})
    sol = t.solution(p)
    assert sol == "L1: 120+0.4*-80=88, limit 150, ok\nL3: 60+-0.5*-80=100, limit 90, over\nanswer: overload L3"
    assert t.reward(p, "answer: Overload l3") == 1.0
    assert t.reward(p, "answer: secure") == 0.0 and t.reward(p, "answer: overload L1 L3") == 0.0
    two = Problem("...", "overload L1 L3", {})
    assert t.reward(two, "answer: overload L3, L1") == 1.0 and t.reward(two, "answer: overload L3 and L1") == 1.0
    assert t.reward(two, "answer: overload L3") == 0.0


def test_grid_risk_prompt_states_the_data():
    t = GridRiskTask(num_lines=3)
    p = t.sample(random.Random(5))
    k = p.meta["trip"]
    assert p.prompt.startswith(f"N-1 check: L{k + 1} trips (flow {p.meta['flows'][k]}).")
    assert p.prompt.count(" rating ") == 2 and p.prompt.isascii()


# ---- jsonl -------------------------------------------------------------------------------------------------------
def write_rows(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_rewards(tmp_path):
    assert set(ANSWER_CHECKS) == {"exact", "numeric", "regex", "contains"}
    f = write_rows(tmp_path / "t.jsonl", [{"prompt": "2+2?", "answer": 4, "id": "a"}, "",
                                          {"prompt": "pi?", "answer": "3.14159"}])
    num = get_task("jsonl", path=f, reward="numeric", tolerance=1e-3)
    p4, ppi = num.problems
    assert p4.meta == {"line": 1, "row": {"id": "a"}} and ppi.meta["line"] == 3
    assert num.reward(p4, "I think 2+2 is 4.") == 1.0  # last number in the response
    assert num.reward(p4, "answer: 4.0") == 1.0 and num.reward(p4, "answer: 5") == 0.0
    assert num.reward(ppi, "answer: 3.1416") == 1.0 and num.reward(ppi, "answer: 3.15") == 0.0
    assert num.reward(p4, "answer: 1e999") == 0.0 and num.reward(p4, "answer: 4 or 5") == 0.0
    exact = get_task("jsonl", path=f, reward="exact")
    assert exact.reward(exact.problems[0], "answer: 4") == 1.0 and exact.reward(exact.problems[0], " 4 ") == 1.0
    assert exact.reward(exact.problems[0], "answer: 4.0") == 0.0
    rx = write_rows(tmp_path / "rx.jsonl", [{"prompt": "a date?", "answer": r"\d{4}-\d{2}-\d{2}"}])
    task = get_task("jsonl", path=rx, reward="regex")
    assert task.reward(task.problems[0], "answer: 2024-01-31") == 1.0
    assert task.reward(task.problems[0], "answer: 2024-1-31") == 0.0
    ct = write_rows(tmp_path / "ct.jsonl", [{"prompt": "capital of France?", "answer": "Paris"}])
    task = get_task("jsonl", path=ct, reward="contains")
    assert task.reward(task.problems[0], "It is paris, of course.") == 1.0
    assert task.reward(task.problems[0], "Lyon") == 0.0
    for t in (num, exact):
        assert t.sample(random.Random(0)) in t.problems
        for response in HOSTILE:
            assert t.reward(t.problems[0], response) in (0.0, 1.0)


def test_jsonl_hostile_outputs_never_raise(tmp_path):
    f = write_rows(tmp_path / "t.jsonl", [{"prompt": "x", "answer": "1"}])
    for reward in ANSWER_CHECKS:
        answer = "1" if reward != "regex" else "[0-9]+"
        write_rows(f, [{"prompt": "x", "answer": answer}])
        task = JsonlTask(f, reward=reward)
        for response in [*HOSTILE, "a" * 5000, None]:
            t0 = time.perf_counter()
            assert task.reward(task.problems[0], response) in (0.0, 1.0)  # type: ignore[arg-type]
            assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("rows, reward, message", [
    (["{not json"], "exact", r"t.jsonl:1: not valid JSON"),
    ([{"prompt": "ok", "answer": 1}, {"answer": 1}], "exact", r"t.jsonl:2: .*'prompt'"),
    ([{"prompt": "ok"}], "exact", r"t.jsonl:1: the field 'answer' is missing"),
    ([{"prompt": "ok", "answer": "seven"}], "numeric", r"t.jsonl:1: bad answer for reward 'numeric'"),
    ([{"prompt": "ok", "answer": "("}], "regex", r"t.jsonl:1: bad answer for reward 'regex'.*does not compile"),
    ([{"prompt": "ok", "answer": None}], "exact", r"t.jsonl:1: bad answer"),
    (["", "  "], "exact", r"t.jsonl has no rows"),
])
def test_jsonl_bad_files_name_file_and_line(tmp_path, rows, reward, message):
    f = write_rows(tmp_path / "t.jsonl", rows)
    with pytest.raises(TaskError, match=message):
        get_task("jsonl", path=f, reward=reward)


def test_jsonl_missing_file_and_unknown_reward(tmp_path):
    with pytest.raises(TaskError, match=r"nope\.jsonl cannot be read"):
        get_task("jsonl", path=tmp_path / "nope.jsonl")
    f = write_rows(tmp_path / "t.jsonl", [{"prompt": "x", "answer": "1"}])
    with pytest.raises(TaskError, match="known: contains, exact, numeric, regex"):
        get_task("jsonl", path=f, reward="fuzzy")


def test_answer_line():
    assert answer_line("a\nAnswer:  42  \nb") == "42"
    assert answer_line("answer: " + "1" * 300) is None
    assert answer_line(None) is None and answer_line("nothing") is None
