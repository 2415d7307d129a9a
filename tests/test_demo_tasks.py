"""The demo task family: deterministic per seed, correct worked solutions, held-out sets."""

from __future__ import annotations

import random
import re

from acm.demo import tasks
from acm.evaluation.evaluate import extract_answer


def _replay(text: str) -> int:
    """Every worked line must be a true sum chained on the previous result; returns the answer."""
    results = []
    for line in text.splitlines():
        m = re.fullmatch(r" \(([a-h])\) (\d+) ([+-]) (\d) = (\d+)", line)
        if m:
            label, a, op, b, value = m.groups()
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(value), line
            assert 0 <= int(value) <= tasks.MAX_TOTAL, line
            if label != "a":
                assert int(a) == results[-1], (line, results)
            results.append(int(value))
    assert results, text
    return int(extract_answer(text))


def test_deterministic_per_seed():
    a = [p.to_record() for p in tasks.make_problems(50, seed=7)]
    b = [p.to_record() for p in tasks.make_problems(50, seed=7)]
    c = [p.to_record() for p in tasks.make_problems(50, seed=8)]
    assert a == b and a != c


def test_levels_and_answers():
    problems = tasks.make_problems(200, seed=1)
    assert {p.level for p in problems} == set(tasks.LEVELS)
    for p in problems:
        value = p.steps[0].value
        for s in p.steps[1:]:
            assert s.a == value
            value = s.value
        assert value == p.answer >= 0
        assert extract_answer(p.short()) == str(p.answer)
        assert _replay(p.cot()) == p.answer
        assert _replay(p.long()) == p.answer


def test_long_style_is_longer_and_rechecks():
    p = tasks.make_problems(5, seed=2, levels=(4,))[0]
    assert "Wait, let me verify" in p.long() and "Wait" not in p.cot()
    assert len(p.short()) < len(p.cot()) < len(p.long())


def test_word_problem_and_expression_match_the_steps():
    rng = random.Random(0)
    p = tasks.make_problem(5, rng)
    assert len(p.steps) == tasks.OPS_PER_LEVEL[5] and p.question.endswith("have now?")
    assert p.question.split(" ")[2] == str(p.steps[0].a)
    q = tasks.make_problem(4, rng)
    assert q.question.startswith(f"Start with {q.steps[0].a}. ")
    for i, s in enumerate(q.steps):
        assert f"({tasks.LABELS[i]}) " in q.question and f" {s.b}." in q.question
    # the worked solution reads each step under the label it has in the question
    assert all(f"({tasks.LABELS[i]}) {s.a} {s.op} {s.b} = {s.value}" in q.cot() for i, s in enumerate(q.steps))


def test_held_out_sets_are_disjoint():
    ev = tasks.eval_problems(300, seed=0)
    cal = tasks.calibration_problems(200, seed=0, exclude={p.key for p in ev})
    train = tasks.make_problems(2000, seed=123, exclude={p.key for p in ev} | {p.key for p in cal}, unique=False)
    assert not {p.key for p in ev} & {p.key for p in cal}
    assert not {p.key for p in train} & ({p.key for p in ev} | {p.key for p in cal})
    assert len(ev) == 300 and sum(p.level == 5 for p in ev) == 60
