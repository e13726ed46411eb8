"""`grid-risk`: N-1 contingency screening of a power grid with line outage distribution factors (LODF)."""

from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Any

from understudy.trainer.tasks.base import BaseTask, Problem, TaskError, answer_line, register_task

_LINE_ID = re.compile(r"l([0-9]{1,3})")


@register_task("grid-risk")
class GridRiskTask(BaseTask):
    """N-1 screening: line Lk trips and its flow moves onto the others by their LODF; is any line overloaded?

    Post-contingency flow of line l: F_l + LODF_l * F_k; it is overloaded when |flow| > rating. Flows are
    multiples of 10 MW and LODFs multiples of 0.1, so every flow is an integer. Answer: `answer: secure` or
    `answer: overload L2 L4` (every overloaded line, any order). Prompt and solution, e.g.:
        N-1 check: L2 trips (flow -80).        L1: 0.4*-80=-32, 120-32=88, 88<=150 ok
        L1 flow 120 rating 150 lodf 0.4        L3: -0.3*-80=24, -60+24=-36, 36<=90 ok
        L3 flow -60 rating 90 lodf -0.3        answer: secure
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
        """One operation per number written: the shift LODF * F_k, the post-contingency flow F_l + shift, its
        magnitude against the rating, the verdict (about 120 SmolLM2 tokens for 4 lines). Written as one
        `F_l+LODF*F_k=post` expression per line, SmolLM2-135M after 115 SFT steps copied every operand right but
        got 10% of the flows right (docs/trainer-tasks.md)."""
        m = problem.meta
        fk, lines = m["flows"][m["trip"]], []
        for i, f in enumerate(m["flows"]):
            if i == m["trip"]:
                continue
            shift = int(Fraction(m["lodf"][i]) * fk)
            post, rating = f + shift, m["ratings"][i]
            over = abs(post) > rating
            lines.append(f"L{i + 1}: {m['lodf'][i]}*{fk}={shift}, {f}{shift:+d}={post}, "
                         f"{abs(post)}{'>' if over else '<='}{rating} {'over' if over else 'ok'}")
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


def answer_schema(num_lines: int = 4) -> dict[str, Any]:
    """The grid-risk verdict as JSON a tool parses (the server's `response_format`, docs/structured-output.md):
    the verdict, the overloaded lines, and whether the N-1 check passed."""
    lines = [f"L{i + 1}" for i in range(num_lines)]
    return {
        "type": "object",
        "properties": {
            "verdict": {"enum": ["secure", "overload"]},
            "overloaded": {"type": "array", "items": {"enum": lines}, "maxItems": num_lines},
            "n_minus_1_ok": {"type": "boolean"},
        },
        "required": ["verdict", "overloaded", "n_minus_1_ok"],
        "additionalProperties": False,
    }


def _tenths(x: Fraction) -> str:
    return f"{float(x):.1f}"  # 0.4, -0.3, -1.0 (LODFs are multiples of 0.1)
