"""`arith`: step-by-step column addition and multiplication, with a long tail of response lengths."""

from __future__ import annotations

import random
import re

from understudy.trainer.tasks.base import (
    MAX_RESPONSE_CHARS,
    BaseTask,
    Problem,
    TaskError,
    answer_line,
    register_task,
)

_INT_RE = re.compile(r"-?[0-9]{1,30}")
# the last integer of a response (1,126 allowed): instruct mode's answer without an `answer:` line
_LAST_INT_RE = re.compile(r"(?<![\d,])-?\d{1,3}(?:,\d{3})+(?![\d,])|(?<!\d)-?\d{1,30}(?!\d)")


@register_task("arith")
class ArithTask(BaseTask):
    """Step-by-step column addition (operands of 1..max_digits digits) and 3-digit x 1-digit multiplication.

    Prompt `478+95=`; canonical solution (one line per column, right to left, then the carry, then the answer):
        8+5=13 >3
        7+9+1=17 >73
        4+0+1=5 >573
        answer: 573
    Each column line is `x+y[+carry]=sum >partial` (`x*y[+carry]=product >partial` for multiplication), where
    `partial` is the result's digits written so far; a final carry adds `carry c >partial`.
    `instruct=True` asks in words instead (`What is 478 + 95? ... answer: <number>`), for instruction-tuned
    policies such as SmolLM2-Instruct that would not complete the bare `478+95=` format; without an `answer:`
    line the response's last integer (commas as thousands separators allowed) is its answer.
    """

    name = "arith"

    def __init__(self, max_digits: int = 4, mul_digits: int = 3, mul_fraction: float = 1 / 3,
                 digit_weights: tuple[float, ...] | None = None, instruct: bool = False) -> None:
        if not isinstance(instruct, bool):
            raise TaskError(f"arith: instruct must be true or false, got {instruct!r}")
        self.instruct = instruct
        if not 1 <= max_digits <= 12 or not 1 <= mul_digits <= 12:
            raise TaskError(f"arith: max_digits and mul_digits must be in [1, 12], got {max_digits}, {mul_digits}")
        if not 0.0 <= mul_fraction <= 1.0:
            raise TaskError(f"arith: mul_fraction must be in [0, 1], got {mul_fraction}")
        if digit_weights is not None and (len(digit_weights) != max_digits or min(digit_weights) < 0
                                          or sum(digit_weights) <= 0):
            raise TaskError(f"arith: digit_weights needs {max_digits} non-negative weights (one per digit count)")
        self.max_digits, self.mul_digits, self.mul_fraction = max_digits, mul_digits, mul_fraction
        # default: short problems are common, long ones rare (a long tail of response lengths)
        self.digit_weights = tuple(digit_weights) if digit_weights else tuple(range(max_digits, 0, -1))

    @staticmethod
    def _number(rng: random.Random, digits: int) -> int:
        return rng.randrange(10) if digits == 1 else rng.randrange(10 ** (digits - 1), 10 ** digits)

    def sample(self, rng: random.Random) -> Problem:
        if rng.random() < self.mul_fraction:
            a, b, op = self._number(rng, self.mul_digits), rng.randrange(2, 10), "*"
        else:
            da, db = rng.choices(range(1, self.max_digits + 1), weights=self.digit_weights, k=2)
            a, b, op = self._number(rng, da), self._number(rng, db), "+"
        answer = a * b if op == "*" else a + b
        prompt = (f"What is {a} {'times' if op == '*' else 'plus'} {b}? Think step by step, then write the result "
                  "on a last line of the form 'answer: <number>'.") if self.instruct else f"{a}{op}{b}="
        return Problem(prompt=prompt, answer=answer,
                       meta={"kind": "mul" if op == "*" else "add", "a": a, "b": b,
                             "digits": max(len(str(a)), len(str(b)))})

    def solution(self, problem: Problem) -> str:
        a, b, kind = problem.meta["a"], problem.meta["b"], problem.meta["kind"]
        xs = str(a)[::-1]
        ys = str(b)[::-1] if kind == "add" else ""
        lines, partial, carry = [], "", 0
        for i in range(max(len(xs), len(ys))):
            x = int(xs[i]) if i < len(xs) else 0
            if kind == "add":
                y = int(ys[i]) if i < len(ys) else 0
                s, term = x + y + carry, f"{x}+{y}"
            else:
                s, term = x * b + carry, f"{x}*{b}"
            term += f"+{carry}" if carry else ""
            partial = str(s % 10) + partial
            lines.append(f"{term}={s} >{partial}")
            carry = s // 10
        if carry:
            partial = str(carry) + partial
            lines.append(f"carry {carry} >{partial}")
        assert int(partial) == problem.answer, (problem, partial)
        lines.append(f"answer: {problem.answer}")
        return "\n".join(lines)

    def extract_answer(self, response: str) -> int | None:
        content = answer_line(response)
        if content is None and self.instruct and isinstance(response, str):
            # instruction models rarely keep the format: in words mode the last integer of the response counts
            nums = _LAST_INT_RE.findall(response[-MAX_RESPONSE_CHARS:])
            content = nums[-1].replace(",", "") if nums else None
        return int(content) if content is not None and _INT_RE.fullmatch(content) else None

