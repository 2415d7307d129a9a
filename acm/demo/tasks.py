"""The miniature Long-to-Short task family: small arithmetic problems with checkable answers.

Pure Python and seeded, so the bundled models, the calibration set and the evaluation set can be
rebuilt byte for byte. Every problem can be written in three styles:

* ``short`` - the terse "System 1" answer the base model is trained on (``A: 13``);
* ``cot`` - a concise worked solution, one line per operation (``(b) 19 - 6 = 13``);
* ``long`` - the "System 2" answer of the fine-tuned model: the worked solution, then a redundant
  re-check of every step ("Wait, let me verify ...") and a closing "So the answer is X.".

A problem is a start value and a chain of labelled single-digit steps, ``Start with 10. (a) Add 9.
(b) Take away 6. What is the result?``, with a running total that stays in 0..MAX_TOTAL. A tiny
transformer cannot compose four or five additions in one forward pass, so the terse answer fails
on the longer chains; each line of the worked solution is one small sum whose inputs are easy to
find (the previous line's result and the step with the same label in the question), so the long
style really helps on the harder levels - which is why a long model exists at all.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

LEVELS = (1, 2, 3, 4, 5)
OPS_PER_LEVEL = {1: 1, 2: 2, 3: 3, 4: 5, 5: 4}
LEVEL_NAMES = {
    1: "one operation",
    2: "two operations",
    3: "three operations",
    4: "five operations",
    5: "word problem, four operations",
}
MAX_TOTAL = 20

_ASK = ("What is the result?", "What number do you get?", "Where do you end up?", "What is the total?")
LABELS = "abcdefgh"
_ADD = ("Add {k}.", "Plus {k}.")
_SUB = ("Take away {k}.", "Minus {k}.", "Subtract {k}.")
_NAMES = ("Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ivan", "Rosa")
_ITEMS = ("apples", "stamps", "marbles", "coins", "books", "shells", "cards", "beads")
_GAIN = ("buys {k}", "finds {k}", "gets {k} more", "wins {k}")
_LOSS = ("gives away {k}", "loses {k}", "sells {k}", "uses {k}")


@dataclass(frozen=True)
class Step:
    """One binary operation ``a op b`` inside a problem."""

    a: int
    op: str  # "+" or "-"
    b: int

    @property
    def value(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b


@dataclass(frozen=True)
class Problem:
    """A question, its integer answer, its difficulty level and the steps that solve it."""

    question: str
    answer: int
    level: int
    steps: tuple[Step, ...] = field(default=())

    @property
    def key(self) -> tuple:
        """Identity used to hold evaluation/calibration problems out of training."""
        return tuple((s.a, s.op, s.b) for s in self.steps)

    def short(self) -> str:
        return short_answer(self)

    def cot(self) -> str:
        return solution(self, verify=False)

    def long(self) -> str:
        return solution(self, verify=True)

    def to_record(self) -> dict:
        return {"question": self.question, "answer": str(self.answer), "level": self.level}


# ----------------------------------------------------------------------------- generation


def _chain(rng: random.Random, start: int, n_ops: int) -> tuple[Step, ...]:
    """``n_ops`` single-digit steps whose running total stays within 0..MAX_TOTAL."""
    steps, total = [], start
    for _ in range(n_ops):
        k = rng.randint(1, 9)
        ops = [op for op, v in (("+", total + k), ("-", total - k)) if 0 <= v <= MAX_TOTAL]
        op = rng.choice(ops)
        steps.append(Step(total, op, k))
        total = steps[-1].value
    return tuple(steps)


def _expression(rng: random.Random, steps: Sequence[Step]) -> str:
    """``Start with 10. (a) Add 9. (b) Take away 6. What is the result?``

    One sentence per step: with bare ``(a) + 9 (b) - 6`` the small model confused neighbouring
    steps when reading them back (10-30 % worked-solution accuracy on three steps, against 100 %
    for the word problems written one sentence per step)."""
    parts = [f"({LABELS[i]}) " + rng.choice(_ADD if s.op == "+" else _SUB).format(k=s.b)
             for i, s in enumerate(steps)]
    return f"Start with {steps[0].a}. " + " ".join(parts) + " " + rng.choice(_ASK)


def _word(rng: random.Random, steps: Sequence[Step]) -> str:
    n, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    parts = [f"({LABELS[i]}) {n} " + rng.choice(_GAIN if s.op == "+" else _LOSS).format(k=s.b) + "."
             for i, s in enumerate(steps)]
    return f"{n} has {steps[0].a} {item}. " + " ".join(parts) + f" How many {item} does {n} have now?"


def make_problem(level: int, rng: random.Random) -> Problem:
    """Draw one problem of ``level`` (1..5) from ``rng``."""
    if level not in OPS_PER_LEVEL:
        raise ValueError(f"unknown level {level}; use one of {LEVELS}")
    steps = _chain(rng, rng.randint(2, 18), OPS_PER_LEVEL[level])
    q = _word(rng, steps) if level == 5 else _expression(rng, steps)
    return Problem(q, steps[-1].value, level, steps)


def make_problems(n: int, seed: int, *, levels: tuple[int, ...] = LEVELS,
                  exclude: set | None = None, weights: tuple[float, ...] | None = None,
                  unique: bool = True) -> list[Problem]:
    """``n`` problems, levels cycled or drawn by ``weights``; distinct by operands if ``unique``.

    ``exclude`` holds problem keys that must never appear (held-out evaluation/calibration items);
    training pools pass ``unique=False`` because the one-operation level has only ~470 problems.
    """
    rng = random.Random(seed)
    seen: set = set(exclude or ())
    out: list[Problem] = []
    i = 0
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct problems for levels {levels}")
        level = rng.choices(levels, weights)[0] if weights else levels[i % len(levels)]
        p = make_problem(level, rng)
        if p.key in seen:
            continue
        if unique:
            seen.add(p.key)
        out.append(p)
        i += 1
    return out


# ----------------------------------------------------------------------------- answer styles


def short_answer(p: Problem) -> str:
    """System 1: the bare answer."""
    return f"A: {p.answer}"


def work(p: Problem) -> list[str]:
    """One line per step: ``(b) 19 - 6 = 13``.

    Every line has the same shape, so the previous result sits at a fixed distance above, and
    the step's label points at the operation to read from the question: a small model only ever
    copies two things it can find reliably and looks up one small sum.
    """
    return [f" ({LABELS[i]}) {s.a} {s.op} {s.b} = {s.value}" for i, s in enumerate(p.steps)]


def solution(p: Problem, *, verify: bool) -> str:
    """The worked solution; with ``verify`` every step is redundantly re-checked (System 2)."""
    lines = work(p)
    if verify:
        lines += ["Wait, let me verify each step again."] + work(p)
        lines.append(f"Yes, the result is {p.answer}.")
    lines.append(f"So the answer is {p.answer}.")
    return "\n".join(lines)


def style(p: Problem, name: str) -> str:
    """The answer of ``p`` in style ``name`` (``short``, ``cot`` or ``long``)."""
    if name == "short":
        return short_answer(p)
    if name == "cot":
        return solution(p, verify=False)
    if name == "long":
        return solution(p, verify=True)
    raise ValueError(f"unknown style {name!r}; use short, cot or long")


# ----------------------------------------------------------------------------- held-out sets


def eval_problems(n: int = 300, seed: int = 0) -> list[Problem]:
    """The evaluation set: ``n`` problems, equal counts per level, seed-derived."""
    return make_problems(n, seed=10_000 + seed)


def calibration_problems(n: int = 200, seed: int = 0, exclude: set | None = None) -> list[Problem]:
    """Calibration prompts, disjoint from the evaluation set."""
    return make_problems(n, seed=20_000 + seed, exclude=exclude)
