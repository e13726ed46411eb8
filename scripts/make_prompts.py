"""Regenerate the drafter's prompt sets (deterministic, seed 0): `python scripts/make_prompts.py`.

understudy/data/prompts.jsonl, the general warm-up set: four in-domain categories (instructions, arithmetic, short
reasoning, power-grid operations) split into `train` and `heldout` (unseen prompts of the same kinds), plus an
`ood` split of other kinds (code, stories, trivia, translation) that the drafter never trains on.

understudy/data/prompts-grid-risk.jsonl, the grid-risk domain set (`drafter train --prompts` for an in-domain
drafter; `drafter eval` reports it beside the general set): N-1 screening problems in the `grid-risk` RL task's
own format, loading and headroom arithmetic, what-if trips with distribution factors, and operator questions,
split `train` / `heldout`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "understudy" / "data"
OUT = DATA / "prompts.jsonl"
OUT_GRID = DATA / "prompts-grid-risk.jsonl"

TOPICS = ["photosynthesis", "the water cycle", "inflation", "compound interest", "vaccines", "black holes",
          "machine learning", "the French Revolution", "plate tectonics", "supply and demand", "sleep",
          "recycling", "electric cars", "the immune system", "cloud computing", "solar panels", "volcanoes",
          "time management", "climate change", "the stock market", "bees", "the Roman Empire", "DNA",
          "renewable energy", "budgeting", "the moon", "coffee", "public speaking", "rain forests", "gravity",
          "interest rates", "the internet", "exercise", "bread making", "earthquakes", "healthy eating"]
INSTRUCTION_TEMPLATES = [
    "Explain {t} in simple terms.", "Give three interesting facts about {t}.", "What is {t}?",
    "Write a short paragraph about {t}.", "List five tips related to {t}.",
    "Why is {t} important?", "Summarize the main ideas of {t} in a few sentences.",
    "Describe {t} to a ten-year-old.", "What are the pros and cons of {t}?",
    "Write a short email to a friend about {t}.",
]
REASONING_TEMPLATES = [
    "{a} has {x} apples and gives {y} to {b}. How many apples does {a} have left? Explain your reasoning.",
    "If a train travels {x} kilometers in {y} hours, what is its average speed? Show your steps.",
    "{a} is older than {b}, and {b} is older than {c}. Who is the youngest? Explain.",
    "A shop sells pens for {x} dollars each. How much do {y} pens cost? Think step by step.",
    "There are {x} students and each bus holds {y} students. How many buses are needed? Explain.",
    "If today is Monday, what day will it be in {x} days? Explain your reasoning.",
    "{a} reads {y} pages a day. How many days to finish a {x}-page book? Show the steps.",
    "A rectangle is {x} meters long and {y} meters wide. What are its area and perimeter?",
]
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Hassan", "Ines", "Jun", "Kofi", "Lena"]
GRID_TEMPLATES = [
    "What is an N-1 contingency in power system operations?",
    "Explain how frequency regulation works in an electric grid.",
    "What causes voltage collapse in a transmission network?",
    "Line {l1} carries {f1} MW and is rated {r1} MW. What is its loading in percent?",
    "Line {l1} carries {f1} MW (rating {r1} MW) and line {l2} carries {f2} MW (rating {r2} MW). If line {l2} trips "
    "and {p}% of its flow shifts to line {l1}, is line {l1} overloaded? Explain.",
    "Explain the difference between spinning reserve and non-spinning reserve.",
    "What is a power transfer distribution factor (PTDF)?",
    "Why do grid operators run contingency analysis every few minutes?",
    "A transformer rated {r1} MVA is loaded at {f1} MVA. How much headroom is left?",
    "What is the role of a transmission system operator?",
    "Describe what happens during a blackout and how the grid is restored.",
    "What is the difference between real power and reactive power?",
    "How does a high share of solar generation affect grid inertia?",
    "Line {l1} has a thermal limit of {r1} MW. Forecast flow is {f1} MW at noon and {f2} MW in the evening. "
    "When is the risk of overload higher?",
    "What is demand response and how does it help the grid?",
    "Explain what a line outage distribution factor (LODF) is used for.",
]
ARITH_TEMPLATES = [
    "What is {x} + {y}?", "What is {x} - {y}?", "What is {x} times {y}?", "Compute {x} * {y} step by step.",
    "What is {x} divided by {y}? Give the answer with one decimal.", "Add {x}, {y} and {z}.",
    "What is {p} percent of {x}?", "Is {x} a prime number? Explain.", "What is the square of {y}?",
]
OOD = [
    "Write a Python function that reverses a string.", "Write a haiku about autumn leaves.",
    "Translate 'good morning, how are you?' into French and Spanish.", "Who painted the Mona Lisa?",
    "Write a limerick about a cat who loves pizza.", "Write a JavaScript function that checks for palindromes.",
    "Tell a short story about a robot learning to paint.", "What is the capital of Australia?",
    "Write a SQL query that selects all users older than 30.", "Compose a short poem about the ocean at night.",
    "Who wrote Pride and Prejudice?", "Write a bash command that counts lines in all .txt files.",
    "Describe a dragon guarding a mountain treasure.", "What year did the first moon landing happen?",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "Invent a name and slogan for a new brand of tea.", "Write a dialogue between a pirate and a librarian.",
    "Translate 'the weather is nice today' into German.", "Write a regular expression that matches email addresses.",
    "Tell a bedtime story about a brave little turtle.", "Write a C function that computes a factorial.",
    "What is the tallest mountain in Africa?", "Write a motivational quote about persistence.",
    "Describe the taste of a lemon to someone who has never had one.",
]


def build() -> list[dict]:
    rng = random.Random(0)
    rows: list[dict] = []
    for t in TOPICS:
        for tpl in rng.sample(INSTRUCTION_TEMPLATES, 5):
            rows.append({"category": "instructions", "prompt": tpl.format(t=t)})
    for _ in range(110):
        tpl = rng.choice(ARITH_TEMPLATES)
        rows.append({"category": "arithmetic", "prompt": tpl.format(
            x=rng.randint(2, 999), y=rng.randint(2, 99), z=rng.randint(2, 99), p=rng.choice([5, 10, 15, 20, 25, 50]))})
    for _ in range(110):
        tpl = rng.choice(REASONING_TEMPLATES)
        a, b, c = rng.sample(NAMES, 3)
        x, y = rng.randint(10, 300), rng.randint(2, 9)
        rows.append({"category": "reasoning", "prompt": tpl.format(a=a, b=b, c=c, x=x, y=y)})
    for _ in range(4):
        for tpl in GRID_TEMPLATES:
            r1, r2 = rng.choice([100, 150, 200, 250, 300]), rng.choice([100, 150, 200, 250])
            rows.append({"category": "grid", "prompt": tpl.format(
                l1=f"L{rng.randint(1, 40)}", l2=f"L{rng.randint(41, 80)}", r1=r1, r2=r2,
                f1=rng.randint(r1 // 3, r1), f2=rng.randint(r2 // 3, r2), p=rng.choice([30, 40, 50, 60]))})
    seen: set[str] = set()
    unique = []
    for r in rows:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            unique.append(r)
    rng.shuffle(unique)
    for i, r in enumerate(unique):
        r["split"] = "heldout" if i % 8 == 0 else "train"
    unique.extend({"category": "ood", "prompt": p, "split": "ood"} for p in OOD)
    return unique


GRID_QUESTIONS = [
    "What is an N-1 contingency, and why must a transmission grid survive every one?",
    "Explain what a line outage distribution factor (LODF) tells an operator.",
    "What is the difference between a PTDF and an LODF?",
    "Why does a line's thermal rating drop on a hot, windless afternoon?",
    "What is dynamic line rating and how does it change contingency analysis?",
    "Explain the difference between a normal rating and an emergency rating of a line.",
    "What corrective actions can an operator take when a contingency would overload a line?",
    "Why can tripping one line overload a line far away from it?",
    "What is a cascading outage, and how does N-1 screening help prevent one?",
    "How do operators rank contingencies by severity?",
    "What is the role of a state estimator before contingency analysis runs?",
    "Explain how redispatching generation relieves an overloaded line.",
    "Why do loop flows make congestion management harder?",
    "What is a special protection scheme and when is it used?",
    "How does a phase-shifting transformer change power flows?",
    "What information does a security-constrained economic dispatch need?",
]
GRID_TEMPLATES_DOMAIN = [
    "Line {l1} carries {f1} MW and is rated {r1} MW. What is its loading in percent, and is it above the 90% alarm "
    "level?",
    "Line {l2} trips while carrying {f2} MW. Its LODF on line {l1} is {d}. Line {l1} carries {f1} MW with a rating "
    "of {r1} MW. What is the post-contingency flow on {l1}, and is it overloaded? Show the calculation.",
    "A transformer rated {r1} MVA is loaded at {f1} MVA. How much headroom is left, in MVA and in percent?",
    "Lines {l1}, {l2} and {l3} are loaded at {p1}%, {p2}% and {p3}% of their ratings. Which line is the most at "
    "risk if demand rises by 10%? Explain.",
    "Line {l1} is rated {r1} MW in summer and {r2} MW in winter. It carries {f1} MW. Is it within its rating in "
    "both seasons?",
    "If {p}% of the flow of tripped line {l2} ({f2} MW) moves onto line {l1} ({f1} MW, rating {r1} MW), what is "
    "the new loading of {l1} in percent?",
    "Forecast flow on line {l1} (limit {r1} MW) is {f1} MW at noon and {f2} MW at 18:00. When is the overload "
    "risk highest, and by how much is the margin reduced?",
]


def build_grid_risk() -> list[dict]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from understudy.trainer.tasks.grid_risk import GridRiskTask

    rng = random.Random(1)
    rows: list[dict] = [{"category": "grid-question", "prompt": q} for q in GRID_QUESTIONS]
    for n in (3, 4, 5, 6):
        task = GridRiskTask(num_lines=n)
        rows += [{"category": "grid-n1", "prompt": task.sample(rng).prompt} for _ in range(30)]
    for _ in range(16):
        for tpl in GRID_TEMPLATES_DOMAIN:
            r1, r2 = rng.choice([100, 150, 200, 250, 300, 400]), rng.choice([100, 150, 200, 250, 300])
            rows.append({"category": "grid-calc", "prompt": tpl.format(
                l1=f"L{rng.randint(1, 30)}", l2=f"L{rng.randint(31, 60)}", l3=f"L{rng.randint(61, 90)}",
                r1=r1, r2=r2, f1=rng.randint(r1 // 3, r1), f2=rng.randint(r2 // 3, r2),
                d=rng.choice(["0.2", "0.3", "0.4", "0.5", "-0.3", "0.6"]), p=rng.choice([20, 30, 40, 50, 60]),
                p1=rng.randint(50, 99), p2=rng.randint(50, 99), p3=rng.randint(50, 99))})
    seen: set[str] = set()
    unique = [r for r in rows if not (r["prompt"] in seen or seen.add(r["prompt"]))]  # type: ignore[func-returns-value]
    rng.shuffle(unique)
    for i, r in enumerate(unique):
        r["split"] = "heldout" if i % 5 == 0 else "train"
    return unique


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["split"]] = counts.get(r["split"], 0) + 1
    print(f"wrote {len(rows)} prompts to {path}: {counts}")


if __name__ == "__main__":
    write(OUT, build())
    write(OUT_GRID, build_grid_risk())
