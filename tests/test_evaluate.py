"""Answer extraction, gold parsing, and ``acm eval`` end to end on the bundled demo models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acm.cli import main
from acm.evaluate import evaluate, extract_answer, gold_answer, is_correct, load_data
from acm.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "assets" / "demo-models" / "tiny-math-base"
LONG = ROOT / "assets" / "demo-models" / "tiny-math-long"
EVAL = ROOT / "assets" / "eval" / "demo_eval.jsonl"


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
    ("no digits here", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answer_is_beats_a_colon_and_last_number():
    assert extract_answer("A: 3\nSo the answer is 7. Checked 9 times.") == "7"
    assert extract_answer("A: 3 and then 9") == "3"


def test_gold_formats_and_correctness():
    assert gold_answer("Natalia sold 48+24 = 72 clips.\n#### 72") == "72"
    assert gold_answer("#### 1,234") == "1234"
    assert gold_answer(936) == "936"
    assert gold_answer("-4.0") == "-4"
    assert is_correct("72", "72") and is_correct("72.0", "72")
    assert not is_correct("71", "72") and not is_correct(None, "72")
    assert is_correct("\\frac{1}{2}", "\\frac{1}{2}")


def test_load_data_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_data(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "1+1", "a": "2"}\n')
    with pytest.raises(InputError, match="lacks field 'question'"):
        load_data(bad)
    rows = load_data(bad, field_question="q", field_answer="a")
    assert rows == [{"question": "1+1", "answer": "2"}]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(InputError, match="not valid JSON"):
        load_data(broken)


def test_evaluate_in_memory_model_with_gsm8k_answers():
    from acm.evaluate import load_model

    model, tok = load_model(BASE)
    data = [{"question": "What is 12 + 5?", "answer": "12 + 5 = 17\n#### 17", "level": 1},
            {"question": "What is 40 - 8?", "answer": "#### 32", "level": 2}]
    res = evaluate([("base", model, tok)], data, max_new_tokens=16, batch_size=2, show_progress=False)
    m = res["models"][0]
    assert res["n"] == 2 and m["model"] == "base"
    assert set(m["per_level"]) == {"1", "2"}
    assert all(s["gold"] in ("17", "32") for s in m["samples"])
    assert all(1 <= s["length"] <= 16 for s in m["samples"])


def test_cli_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = main(["eval", "--model", str(BASE), "--model", str(LONG), "--data", str(EVAL), "--limit", "4",
               "--max-new-tokens", "48", "--batch-size", "4", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n"] == 4 and len(res["models"]) == 2
    for m in res["models"]:
        for key in ("model", "accuracy", "mean_length", "median_length", "per_level", "samples"):
            assert key in m
        assert 0.0 <= m["accuracy"] <= 1.0 and 0 < m["mean_length"] <= 48
        for s in m["samples"]:
            assert set(s) == {"question", "gold", "prediction", "correct", "length", "response"}


@pytest.mark.parametrize("extra, needle", [
    (["--data", "nope.jsonl"], "not found"),
    (["--data", str(EVAL), "--field-question", "prompt"], "lacks field 'prompt'"),
])
def test_cli_eval_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, needle):
    rc = main(["eval", "--model", str(BASE), *extra, "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and needle in err


def test_cli_eval_missing_model_exits_2(tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path / "nomodel"), "--data", str(EVAL), "--out", str(tmp_path / "r.json")])
    assert rc == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
