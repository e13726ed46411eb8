"""`countdown`: reach a target with + - * / using each given number at most once (checked by walking an AST
of + - * / over integer literals, never by eval)."""

from __future__ import annotations

import ast
import collections
import operator
import random
import re
from collections.abc import Callable
from fractions import Fraction

from understudy.trainer.tasks.base import BaseTask, Problem, TaskError, answer_line, register_task

_BINOPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}
_EXPR_CHARS = re.compile(r"[0-9+\-*/() ]{1,200}")


def eval_arithmetic(expr: str) -> tuple[Fraction, list[int]]:
    """Value and integer literals of `expr`, allowing only + - * / and parentheses over integer literals.

    Exact rational arithmetic (Fraction). Raises ValueError for anything else (names, calls, power, unary
    minus, floats, too long) and ZeroDivisionError on x/0. Never calls eval.
    """
    if not _EXPR_CHARS.fullmatch(expr):
        raise ValueError("only digits, + - * / ( ) and spaces are allowed, at most 200 characters")
    tree = ast.parse(expr, mode="eval")  # SyntaxError for malformed input (nesting is bounded by the length)
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"{type(node).__name__} is not allowed")

    return walk(tree.body), literals


@register_task("countdown")
class CountdownTask(BaseTask):
    """Reach the target with + - * / and parentheses, using each given number at most once.

    Prompt `Use 3 7 12 20 to make 41 with + - * / (each number at most once).`; the canonical solution shows
    one combination per line, then the expression: `20-12=8` / `8*3=24` / ... / `answer: (20-12)*3+7`.
    An answer may end with `= 41`; everything from `=` on is ignored.
    """

    name = "countdown"

    def __init__(self, num_numbers: int = 4, max_number: int = 20, max_target: int = 999) -> None:
        if not 2 <= num_numbers <= 6 or max_number < 2 or max_target < 1:
            raise TaskError("countdown: need 2 <= num_numbers <= 6, max_number >= 2, max_target >= 1")
        self.num_numbers, self.max_number, self.max_target = num_numbers, max_number, max_target

    def _combine(self, rng: random.Random, pool: list[tuple[str, int]], steps: list[str]) -> None:
        """Replace two pool entries by one combination with a positive integer value (or leave the pool)."""
        (ea, a), (eb, b) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
        a, b, ea, eb = (a, b, ea, eb) if a >= b else (b, a, eb, ea)
        options = [("+", a + b), ("*", a * b)] + ([("-", a - b)] if a > b else [])
        options += [("/", a // b)] if b > 1 and a % b == 0 else []
        op, value = rng.choice(options)
        steps.append(f"{a}{op}{b}={value}")
        pool.append((f"({ea}{op}{eb})" if len(pool) else f"{ea}{op}{eb}", value))

    def sample(self, rng: random.Random) -> Problem:
        for _ in range(1000):
            numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
            used = rng.sample(numbers, rng.randint(2, self.num_numbers))
            pool, steps = [(str(n), n) for n in used], []
            while len(pool) > 1:
                self._combine(rng, pool, steps)
            expr, target = pool[0]
            if 1 <= target <= self.max_target and target not in numbers:
                nums = " ".join(map(str, numbers))
                return Problem(prompt=f"Use {nums} to make {target} with + - * / (each number at most once).",
                               answer=target, meta={"numbers": numbers, "expression": expr, "steps": steps})
        raise TaskError("countdown: could not sample a problem; raise max_target or max_number")

    def solution(self, problem: Problem) -> str:
        return "\n".join([*problem.meta["steps"], f"answer: {problem.meta['expression']}"])

    def extract_answer(self, response: str) -> str | None:
        content = answer_line(response)
        return content.split("=", 1)[0].strip() if content else None

    def _score(self, problem: Problem, response: str) -> float:
        expr = self.extract_answer(response)
        if not expr:
            return 0.0
        try:
            value, literals = eval_arithmetic(expr)
        except ZeroDivisionError:
            return 0.0
        available = collections.Counter(problem.meta["numbers"])
        if collections.Counter(literals) - available:  # a number not given, or used too often
            return 0.0
        return 1.0 if value == problem.answer else 0.0
