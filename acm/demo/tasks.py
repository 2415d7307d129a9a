"""The miniature Long-to-Short task family: small arithmetic problems with checkable answers.

Pure Python and seeded, so the bundled models, the calibration set and the evaluation set can be
rebuilt byte for byte. Every problem can be written in three styles:

* ``short`` - the terse "System 1" answer the base model is trained on (``A: 7694``);
* ``cot`` - a concise worked solution (column-by-column with carries / borrows);
* ``long`` - the "System 2" answer of the fine-tuned model: the worked solution, then a redundant
  re-check of every column ("Wait, let me verify ...") and a closing "So the answer is X.".

A tiny transformer cannot add 4-digit numbers in one shot, but it can follow the columns, so the
long style really helps on the harder levels - which is why a long model exists at all.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

LEVELS = (1, 2, 3, 4, 5)
LEVEL_NAMES = {
    1: "2-digit ± 1-digit",
    2: "2-digit ± 2-digit",
    3: "3-digit ± 3-digit",
    4: "4-digit ± 4-digit",
    5: "two-step word problem (3-digit)",
}
PLACE_NAMES = ("ones", "tens", "hundreds", "thousands", "ten-thousands")

_ASK = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.",
        "Find {a} {op} {b}.", "How much is {a} {op} {b}?")
_NAMES = ("Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ivan", "Rosa")
_ITEMS = ("apples", "stamps", "marbles", "coins", "books", "shells", "cards", "beads")
_WORD = (
    "{n} has {a} {item}. {n} gets {b} more and then gives away {c}. How many {item} does {n} have now?",
    "A box holds {a} {item}. {b} are added and {c} are taken out. How many {item} are in the box?",
    "{n} had {a} {item}, found {b} more, then lost {c}. How many {item} are left?",
)
_WORD_SUB_FIRST = (
    "{n} has {a} {item}. {n} gives away {b} and then gets {c} more. How many {item} does {n} have now?",
    "A shop had {a} {item}. It sold {b} and then bought {c} more. How many {item} does it have now?",
)


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


def _digits(n_digits: int, rng: random.Random) -> int:
    lo = 10 ** (n_digits - 1) if n_digits > 1 else 0
    return rng.randint(lo, 10 ** n_digits - 1)


def _binary(rng: random.Random, da: int, db: int, level: int) -> Problem:
    op = rng.choice("+-")
    a, b = _digits(da, rng), _digits(db, rng)
    if op == "-" and a < b:
        a, b = b, a
    q = rng.choice(_ASK).format(a=a, op=op, b=b)
    step = Step(a, op, b)
    return Problem(q, step.value, level, (step,))


def _word(rng: random.Random) -> Problem:
    """Two steps on 3-digit numbers; intermediate and final results stay non-negative."""
    n, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a = rng.randint(100, 899)
    if rng.random() < 0.5:  # a + b - c
        b = rng.randint(100, 999 - a) if a < 899 else 100
        c = rng.randint(100, a + b)
        s1, s2 = Step(a, "+", b), Step(a + b, "-", c)
        q = rng.choice(_WORD).format(n=n, a=a, b=b, c=c, item=item)
    else:  # a - b + c
        a = rng.randint(200, 999)
        b = rng.randint(100, a)
        c = rng.randint(100, 999)
        s1, s2 = Step(a, "-", b), Step(a - b, "+", c)
        q = rng.choice(_WORD_SUB_FIRST).format(n=n, a=a, b=b, c=c, item=item)
    return Problem(q, s2.value, 5, (s1, s2))


def make_problem(level: int, rng: random.Random) -> Problem:
    """Draw one problem of ``level`` (1..5) from ``rng``."""
    if level == 1:
        return _binary(rng, 2, 1, 1)
    if level == 2:
        return _binary(rng, 2, 2, 2)
    if level == 3:
        return _binary(rng, 3, 3, 3)
    if level == 4:
        return _binary(rng, 4, 4, 4)
    if level == 5:
        return _word(rng)
    raise ValueError(f"unknown level {level}; use one of {LEVELS}")


def make_problems(n: int, seed: int, *, levels: tuple[int, ...] = LEVELS,
                  exclude: set | None = None, weights: tuple[float, ...] | None = None) -> list[Problem]:
    """``n`` distinct problems (by operands), levels cycled or drawn by ``weights``.

    ``exclude`` holds problem keys that must not appear (held-out evaluation/calibration items).
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
        seen.add(p.key)
        out.append(p)
        i += 1
    return out


# ----------------------------------------------------------------------------- answer styles


def short_answer(p: Problem) -> str:
    """System 1: the bare answer."""
    return f"A: {p.answer}"


def _add_columns(a: int, b: int) -> list[str]:
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry, width = [], 0, max(len(da), len(db))
    for i in range(width):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{PLACE_NAMES[i]}: {x}+{y}+{carry}={s}, write {s % 10} carry {s // 10}.")
        carry = s // 10
    if carry:
        lines.append(f"last carry: write {carry}.")
    return lines


def _sub_columns(a: int, b: int) -> list[str]:
    da, db = str(a)[::-1], str(b)[::-1]
    lines, borrow = [], 0
    for i in range(len(da)):
        x = int(da[i])
        y = int(db[i]) if i < len(db) else 0
        if x - y - borrow < 0:
            r = 10 + x - y - borrow
            lines.append(f"{PLACE_NAMES[i]}: {x}-{y}-{borrow} is negative, 1{x}-{y}-{borrow}={r}, borrow 1.")
            borrow = 1
        else:
            r = x - y - borrow
            lines.append(f"{PLACE_NAMES[i]}: {x}-{y}-{borrow}={r}, borrow 0.")
            borrow = 0
    return lines


def columns(step: Step) -> list[str]:
    """The digit-by-digit work for one step, least significant column first."""
    return _add_columns(step.a, step.b) if step.op == "+" else _sub_columns(step.a, step.b)


def _step_text(step: Step, verify: bool) -> list[str]:
    verb = "Add" if step.op == "+" else "Subtract"
    out = [f"{verb} {step.a} {step.op} {step.b} column by column."]
    out += columns(step)
    out.append(f"So {step.a} {step.op} {step.b} = {step.value}.")
    if verify:
        out.append(f"Wait, let me verify {step.a} {step.op} {step.b} again.")
        out += columns(step)
        out.append(f"Yes, {step.a} {step.op} {step.b} = {step.value} is correct.")
    return out


def solution(p: Problem, *, verify: bool) -> str:
    """The worked solution; with ``verify`` every step is redundantly re-checked (System 2)."""
    lines: list[str] = []
    for i, step in enumerate(p.steps):
        if len(p.steps) > 1:
            lines.append(f"Step {i + 1}:")
        lines += _step_text(step, verify)
    if verify:
        lines.append(f"Wait, let me make sure I answered the question. The result is {p.answer}.")
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
