"""Answer checking, table-driven: each (reply, gold) pair is marked with what a careful human grader says.

The checker is ``acm.evaluation.answers.check`` (math-verify, with the plain-number fast path); every case runs
with the fast path on and off, so the two never disagree on these replies.
"""

from __future__ import annotations

import pytest

from acm.evaluation.answers import check, extract_answer, gold_answer, is_correct, split_thinking

# (reply, gold, human verdict, why) — finished replies that did not open a thinking block in the prompt.
CASES = [
    # the four cases of issue 14
    (r"\boxed{0.5}", r"\frac{1}{2}", True, "0.5 is one half"),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", True, "\\dfrac is \\frac"),
    (r"<think>… 7? no</think> The answer is \boxed{3\sqrt{2}}", r"3\sqrt 2", True, "answer after the thinking"),
    (r"\boxed{(1,2]}", "(1, 2]", True, "same interval, spacing differs"),
    # boxed answers
    (r"The sum is \boxed{936}.", "936", True, "plain boxed number"),
    (r"The sum is \boxed{935}.", "936", False, "wrong number"),
    (r"\boxed{1,234}", "1234", True, "thousands separator"),
    (r"First \boxed{5}; no, corrected: \boxed{7}", "7", True, "the last boxed answer counts"),
    (r"\boxed{\frac{3}{4}}", "0.75", True, "fraction vs decimal"),
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", True, "unreduced fraction, same value"),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", True, "same surd"),
    (r"\boxed{x = 3}", "3", True, "x = 3 states the value 3"),
    (r"\boxed{(1,2)}", "(1, 2]", False, "open interval is not half-open"),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", True, "sets are unordered"),
    (r"\boxed{3, 2}", "2, 3", True, "list of solutions in another order"),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", True, "multiple-choice letter"),
    (r"\boxed{50\%}", "50", True, "percent sign around the right number"),
    (r"\boxed{12 \text{ cm}}", "12", True, "unit around the right number"),
    (r"\boxed{\$18}", "18", True, "dollar sign"),
    (r"\boxed{18.00}", "18", True, "trailing zeros"),
    (r"\boxed{\pi}", r"\pi", True, "symbolic constant"),
    (r"\boxed{2\pi}", r"\pi", False, "twice the answer"),
    (r"\boxed{[0, \infty)}", r"[0,\infty)", True, "unbounded interval"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True, "expanded form of the same polynomial"),
    (r"\boxed{10^{3}}", "1000", True, "power of ten"),
    (r"\boxed{-4}", "-4.0", True, "negative number, gold with .0"),
    (r"\boxed{4}", "-4", False, "sign is wrong"),
    (r"\boxed{\frac{1}{2}}", "0.5", True, "fraction vs decimal gold"),
    (r"\boxed{p - q}", "p-q", True, "same expression"),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True, "a name as the answer"),
    (r"\boxed{033}", "33", True, "AIME-style leading zero"),
    # "the answer is" and plain text
    ("Wait, 5 then 7. So the answer is 42.", "42", True, "answer-is sentence"),
    ("The answer is 41.", "42", False, "answer-is sentence, wrong"),
    (r"The final answer is $\frac{3}{4}$.", "0.75", True, "LaTeX in an answer sentence"),
    ("The answer is 1/2.", r"\frac{1}{2}", True, "slash fraction"),
    (r"The answer is $3\sqrt{2}$", r"\sqrt{18}", True, "equivalent surd"),
    ("Final answer: 1,000,000", "1000000", True, "thousands separators"),
    ("I think it is 12, no, 15.", "15", True, "the last number stated"),
    ("I don't know.", "5", False, "no answer"),
    ("", "5", False, "empty reply"),
    # the bundled world's styles
    ("A: 13", "13", True, "terse demo answer"),
    ("A: 12", "13", False, "terse demo answer, wrong"),
    ((" (a) 5 + 8 = 13\nWait, let me verify each step again.\n (a) 5 + 8 = 13\nYes, the result is 13.\n"
     "So the answer is 13."), "13", True, "long demo answer"),
    (" (a) 3 + 5 = 8\nWait, let me verify each step again.\n (a) 5 + 5 = 10\nYes, the result is 10.", "8", False,
     "re-check went wrong: the last result stated is 10"),
    ("A: 3\nSo the answer is 7.", "7", True, "the answer sentence beats an earlier A:"),
    # GSM8K gold format
    (r"Natalia sold 72 clips. \boxed{72}", gold_answer("Natalia sold 48+24 = 72 clips.\n#### 72"), True,
     "GSM8K '#### 72' gold"),
    (r"\boxed{18}", gold_answer("#### 1,234"), False, "GSM8K gold with separator, wrong reply"),
    # R1-style replies (finished)
    ((r"<think>Let me compute: 2+2=4.</think>" "\n\nThe answer is \\boxed{4}."), "4", True, "R1 reply"),
    (r"<think>I get \boxed{5}. Wait, no.</think> So \boxed{6}", "5", False,
     "the thinking's 5 was retracted; the answer is 6"),
    (r"<think>I get \boxed{5}. Wait.</think> So \boxed{6}", "6", True, "answer after the thinking"),
    ("<think>Long thought with 7 in it.</think>", "7", False, "nothing after the thinking: no answer"),
    ("<think>So the answer is 7.", "7", True, "stopped (EOS) inside thinking: graded on what it said"),
]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "math-verify-only"])
@pytest.mark.parametrize("reply, gold, human, why", CASES, ids=[c[3] for c in CASES])
def test_checker_agrees_with_a_careful_grader(reply, gold, human, why, fast_path):
    assert check(reply, gold, fast_path=fast_path).correct is human, why


def test_table_is_large_enough():
    assert len(CASES) >= 40
    assert sum(c[2] for c in CASES) >= 15 and sum(not c[2] for c in CASES) >= 10


# (reply, gold, finished, thinking_opened, correct, truncated_in_thinking, why)
TRUNCATION = [
    (r"<think>Let me try \boxed{7}... hmm, maybe", "7", False, False, False, True,
     "hit the limit while thinking: no answer yet"),
    ("so maybe 7, wait", "7", False, True, False, True, "template opened <think>; cut off inside it"),
    (r"<think>x</think> The answer is \boxed{9}", "9", False, False, True, False,
     "answered after thinking, then hit the limit"),
    ("Hmm, 3 + 4 = 7.</think>\n\\boxed{7}", "7", True, True, True, False, "template opened <think>; closed"),
    ("So the answer is 7.\nNow let me also", "7", False, False, True, False,
     "non-thinking reply cut off after giving its answer: graded as usual"),
]


@pytest.mark.parametrize("reply, gold, finished, opened, correct, cut, why", TRUNCATION, ids=[c[-1] for c in TRUNCATION])
def test_truncation_and_thinking(reply, gold, finished, opened, correct, cut, why):
    v = check(reply, gold, finished=finished, thinking_opened=opened)
    assert (v.correct, v.truncated_in_thinking) == (correct, cut), why


def test_fast_path_is_used_for_plain_numbers_only():
    assert check("A: 13", "13").checker == "number"
    assert check("So the answer is 13.", "13").checker == "number"
    assert check(r"\boxed{13}", "13").checker == "number"
    assert check("The answer is 3/4.", "0.75").checker == "math-verify"   # not "3"
    assert check("The answer is 50%", "50").checker == "math-verify"
    assert check(r"\boxed{0.5}", r"\frac{1}{2}").checker == "math-verify"
    assert check("nothing", "13").checker in ("none", "math-verify")


def test_split_thinking():
    s = split_thinking("<think>a b</think> answer")
    assert (s.thinking, s.answer, s.closed, s.thinks) == ("a b", " answer", True, True)
    s = split_thinking("still thinking", opened=True)
    assert (s.thinking, s.answer, s.closed) == ("still thinking", "", False)
    s = split_thinking("plain reply")
    assert (s.thinking, s.answer, s.closed, s.thinks) == (None, "plain reply", True, False)
    s = split_thinking("opened by template</think>42")
    assert (s.thinking, s.answer) == ("opened by template", "42")


@pytest.mark.parametrize("text, expected", [
    ("The sum is \\boxed{936}.", "936"),
    ("answer is 12 but \\boxed{1,234}", "1234"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("Wait, 5 then 7. So the answer is 42.", "42"),
    ("So the answer is -17.", "-17"),
    ("The answer is 3.50", "3.5"),
    ("Final answer: 1,000,000", "1000000"),
    ("A: 936", "936"),
    ("thinking 5 + 3\nA: -8", "-8"),
    ("I think it is 12, no, 15.", "15"),
    ("0.25 of them", "0.25"),
    ("<think>maybe 3</think> The answer is 4.", "4"),
    ("no digits here", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_gold_formats_and_is_correct():
    assert gold_answer("Natalia sold 48+24 = 72 clips.\n#### 72") == "72"
    assert gold_answer("#### 1,234") == "1234"
    assert gold_answer(936) == "936"
    assert gold_answer("-4.0") == "-4"
    assert gold_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert gold_answer("1,2") == "1,2"                     # a list of answers, not one thousand and two
    assert is_correct("72", "72") and is_correct("72.0", "72")
    assert not is_correct("71", "72") and not is_correct(None, "72")
    assert is_correct("\\frac{1}{2}", "0.5")


def test_checker_works_off_the_main_thread():
    """Gradio runs handlers in worker threads, where math-verify's signal-based timeout cannot run."""
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(check(r"\boxed{0.5}", r"\frac{1}{2}").correct))
    t.start()
    t.join()
    assert out == [True]
