"""`jsonl`: the user's rows, the named answer checks, and errors that name file:line."""

from __future__ import annotations

import json
import random
import time

import pytest

from tests.trainer.hostile import HOSTILE
from understudy.trainer.tasks import ANSWER_CHECKS, JsonlTask, TaskError, get_task


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
            t0 = time.thread_time()  # CPU time of this thread: robust to a loaded machine
            assert task.reward(task.problems[0], response) in (0.0, 1.0)  # type: ignore[arg-type]
            assert time.thread_time() - t0 < 1.0


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
