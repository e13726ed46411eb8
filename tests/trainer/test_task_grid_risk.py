"""`grid-risk`: N-1 screening answers are exact sets of overloaded lines."""

from __future__ import annotations

import random

from understudy.trainer.tasks import GridRiskTask, Problem


def test_grid_risk_answers_sets_of_lines():
    t, rng = GridRiskTask(num_lines=5), random.Random(4)
    kinds = {t.sample(rng).answer.split()[0] for _ in range(50)}
    assert kinds == {"secure", "overload"}
    # L2 trips carrying -80: L1 120 + 0.4 * -80 = 88 (<= 150 ok); L3 60 + -0.5 * -80 = 100 (> 90 overload)
    p = Problem("...", "overload L3", {"flows": [120, -80, 60], "ratings": [150, 100, 90], "trip": 1,
                                       "lodf": ["0.4", "-1.0", "-0.5"], "overloaded": ["L3"]})
    sol = t.solution(p)
    assert sol == "L1: 0.4*-80=-32, 120-32=88, 88<=150 ok\nL3: -0.5*-80=40, 60+40=100, 100>90 over\nanswer: overload L3"
    neg = Problem("...", "overload L1", {"flows": [-70, 50], "ratings": [100, 60], "trip": 1, "lodf": ["-0.8", "-1.0"]})
    assert t.solution(neg) == "L1: -0.8*50=-40, -70-40=-110, 110>100 over\nanswer: overload L1"
    assert t.reward(p, sol) == 1.0
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
