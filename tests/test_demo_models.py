"""The bundled demo world: both models load offline, answer, and the long one really is longer."""

from __future__ import annotations

import json
from pathlib import Path

from acm.evaluation.evaluate import evaluate

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BASE = ASSETS / "demo-models" / "tiny-math-base"
LONG = ASSETS / "demo-models" / "tiny-math-long"


def test_bundled_files_are_small_safetensors():
    for path in (BASE, LONG):
        weights = path / "model.safetensors"
        assert weights.is_file() and not list(path.glob("*.bin"))
        assert sum(f.stat().st_size for f in path.iterdir()) < 10 * 2**20
        assert (path / "tokenizer.json").is_file() and (path / "generation_config.json").is_file()


def test_bundled_sets_have_documented_fields():
    ev = [json.loads(x) for x in (ASSETS / "eval" / "demo_eval.jsonl").open()]
    cal = [json.loads(x) for x in (ASSETS / "calibration" / "demo_calibration.jsonl").open()]
    assert len(ev) >= 300 and {"question", "answer", "level"} <= set(ev[0])
    assert len(cal) >= 100 and "text" in cal[0]
    assert not {r["question"] for r in ev} & {r["text"] for r in cal}


def test_long_model_answers_longer_than_base():
    rows = [json.loads(x) for x in (ASSETS / "eval" / "demo_eval.jsonl").open()]
    picked = [r for r in rows if str(r["level"]) in ("1", "4")][:6]
    res = evaluate([str(BASE), str(LONG)], picked, max_new_tokens=256, batch_size=6, show_progress=False)
    base, long = res["models"]
    assert base["mean_length"] < 20, base["samples"]
    assert long["mean_length"] > 3 * base["mean_length"]
    assert any("Wait" in s["response"] for s in long["samples"])
