"""Responses every task must score 0.0 (or, for jsonl, 0.0 or 1.0) quickly and without raising."""

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
