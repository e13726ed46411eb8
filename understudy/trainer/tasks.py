"""Tasks with verifiable rewards: a small plugin interface and four tasks (docs/trainer-tasks.md).

A task samples problems (`sample(rng)`) and scores a response (`reward(problem, response)` in [0, 1]).
Rewards are pure and safe: nothing is ever `eval`-ed, the response is only pattern-matched (and, for
countdown, walked as an AST of + - * / over integer literals), and malformed or hostile output scores 0.0
instead of raising. Every task's final answer is on a line `answer: ...`; the last such line counts.

    arith      step-by-step addition / multiplication; response length grows with digits and carries
    countdown  reach a target with + - * / using each given number at most once
    grid-risk  N-1 contingency screening of a power grid with line outage distribution factors (LODF)
    jsonl      the user's JSONL file of {"prompt", "answer"} rows, scored by a named answer check
"""

from __future__ import annotations

import ast
import collections
import inspect
import json
import logging
import math
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
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


_INT_RE = re.compile(r"-?[0-9]{1,30}")


# ---- arith -----------------------------------------------------------------------------------------------------
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


_LAST_INT_RE = re.compile(r"(?<![\d,])-?\d{1,3}(?:,\d{3})+(?![\d,])|(?<!\d)-?\d{1,30}(?!\d)")


# ---- countdown -------------------------------------------------------------------------------------------------
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


# ---- grid-risk -------------------------------------------------------------------------------------------------
_LINE_ID = re.compile(r"l([0-9]{1,3})")


@register_task("grid-risk")
class GridRiskTask(BaseTask):
    """N-1 screening: line Lk trips and its flow moves onto the others by their LODF; is any line overloaded?

    Post-contingency flow of line l: F_l + LODF_l * F_k; it is overloaded when |flow| > rating. Flows are
    multiples of 10 MW and LODFs multiples of 0.1, so every flow is an integer. Answer: `answer: secure` or
    `answer: overload L2 L4` (every overloaded line, any order). Prompt and solution, e.g.:
        N-1 check: L2 trips (flow -80).        L1: 120+0.4*-80=88, limit 150, ok
        L1 flow 120 rating 150 lodf 0.4        L3: 60+-0.3*-80=84, limit 90, ok
        L3 flow 60 rating 90 lodf -0.3         answer: secure
        Reply answer: secure or answer: overload L<n>...
    """

    name = "grid-risk"

    def __init__(self, num_lines: int = 4, max_flow: int = 200, p_overload: float = 0.5) -> None:
        if not 2 <= num_lines <= 50 or max_flow < 20 or not 0.0 <= p_overload <= 1.0:
            raise TaskError("grid-risk: need 2 <= num_lines <= 50, max_flow >= 20, 0 <= p_overload <= 1")
        self.num_lines, self.max_flow, self.p_overload = num_lines, max_flow, p_overload

    def _draw(self, rng: random.Random) -> dict[str, Any]:
        top = self.max_flow // 10
        flows = [10 * rng.choice([-1, 1]) * rng.randint(1, top) for _ in range(self.num_lines)]
        ratings = [abs(f) + 10 * rng.randint(1, max(2, top // 2)) for f in flows]  # secure before the trip
        trip = rng.randrange(self.num_lines)
        lodf = [Fraction(rng.choice([-1, 1]) * rng.randint(1, 9), 10) for _ in range(self.num_lines)]
        lodf[trip] = Fraction(-1)
        return {"flows": flows, "ratings": ratings, "trip": trip, "lodf": lodf}

    @staticmethod
    def _post_flows(g: dict[str, Any]) -> dict[int, int]:
        fk = g["flows"][g["trip"]]
        return {i: int(f + g["lodf"][i] * fk) for i, f in enumerate(g["flows"]) if i != g["trip"]}

    def sample(self, rng: random.Random) -> Problem:
        want_overload = rng.random() < self.p_overload
        for _ in range(1000):
            g = self._draw(rng)
            over = [i for i, f in self._post_flows(g).items() if abs(f) > g["ratings"][i]]
            if bool(over) == want_overload:
                break
        answer = "overload " + " ".join(f"L{i + 1}" for i in over) if over else "secure"
        k = g["trip"]
        rows = [f"N-1 check: L{k + 1} trips (flow {g['flows'][k]})."]
        rows += [f"L{i + 1} flow {g['flows'][i]} rating {g['ratings'][i]} lodf {_tenths(g['lodf'][i])}"
                 for i in range(self.num_lines) if i != k]
        rows.append("Reply answer: secure or answer: overload L<n>...")
        meta = {"flows": g["flows"], "ratings": g["ratings"], "trip": k,
                "lodf": [_tenths(x) for x in g["lodf"]], "overloaded": [f"L{i + 1}" for i in over]}
        return Problem(prompt="\n".join(rows), answer=answer, meta=meta)

    def solution(self, problem: Problem) -> str:
        m = problem.meta
        fk, lines = m["flows"][m["trip"]], []
        for i, f in enumerate(m["flows"]):
            if i == m["trip"]:
                continue
            post = int(f + Fraction(m["lodf"][i]) * fk)
            verdict = "over" if abs(post) > m["ratings"][i] else "ok"
            lines.append(f"L{i + 1}: {f}+{m['lodf'][i]}*{fk}={post}, limit {m['ratings'][i]}, {verdict}")
        lines.append(f"answer: {problem.answer}")
        return "\n".join(lines)

    def extract_answer(self, response: str) -> str | None:
        content = answer_line(response)
        if content is None:
            return None
        words = content.lower().replace(",", " ").replace(" and ", " ").split()
        if words == ["secure"]:
            return "secure"
        if len(words) < 2 or words[0] != "overload":
            return None
        ids = [_LINE_ID.fullmatch(w) for w in words[1:]]
        if not all(ids):
            return None
        nums = sorted({int(m.group(1)) for m in ids if m})
        return "overload " + " ".join(f"L{n}" for n in nums)


def _tenths(x: Fraction) -> str:
    return f"{float(x):.1f}"  # 0.4, -0.3, -1.0 (LODFs are multiples of 0.1)


# ---- jsonl: the user's prompts with a named answer check --------------------------------------------------------
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
