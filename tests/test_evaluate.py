"""``acm eval`` end to end: data loading, the bundled demo models, R1-style replies (a scripted model),
sampled decoding, saved replies scored again with ``--predictions``. Answer checking itself is in
test_evaluate_answers.py, presets in test_evaluate_presets.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acm.cli import main
from acm.errors import InputError
from acm.evaluation.evaluate import evaluate, load_data, score_predictions

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "assets" / "demo-models" / "tiny-math-base"
LONG = ROOT / "assets" / "demo-models" / "tiny-math-long"
EVAL = ROOT / "assets" / "eval" / "demo_eval.jsonl"


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
    from acm.checkpoints.models import load_model

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
        for key in ("thinks", "mean_thinking_length", "mean_answer_length", "truncated", "truncated_in_thinking"):
            assert key in m
        assert m["thinks"] is False and m["mean_thinking_length"] is None and m["decoding"] == {"mode": "greedy"}
        for s in m["samples"]:
            assert set(s) == {"question", "gold", "prediction", "correct", "length", "thinking_tokens", "finished",
                              "response"}


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


# ----------------------------------------------------------------------------- saved replies


KEYS = ("accuracy", "mean_length", "median_length", "n", "replies", "truncated", "truncated_in_thinking", "thinks",
        "mean_thinking_length", "mean_answer_length")


def _same_scores(a: dict, b: dict) -> None:
    assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}
    assert a.get("per_level") == b.get("per_level")
    assert a.get("accuracy_per_sample") == b.get("accuracy_per_sample")


def test_predictions_reproduce_a_normal_run(tmp_path, capsys):
    run, replies, scored = tmp_path / "run.json", tmp_path / "replies.jsonl", tmp_path / "scored.json"
    assert main(["eval", "--model", str(BASE), "--model", str(LONG), "--data", str(EVAL), "--limit", "6",
                 "--max-new-tokens", "64", "--save-replies", str(replies), "--out", str(run)]) == 0
    lines = [json.loads(x) for x in replies.read_text().splitlines()]
    assert len(lines) == 12 and {"model", "question", "gold", "reply", "num_tokens", "finished"} <= set(lines[0])
    assert main(["eval", "--predictions", str(replies), "--out", str(scored)]) == 0
    a, b = json.loads(run.read_text()), json.loads(scored.read_text())
    assert [m["model"] for m in a["models"]] == [m["model"] for m in b["models"]]
    for ma, mb in zip(a["models"], b["models"]):
        _same_scores(ma, mb)
    assert a["models"][1]["truncated"] > 0       # long replies cut at 64 tokens: reported, and scored alike


def test_predictions_from_elsewhere_need_token_counts_or_a_tokenizer(tmp_path, capsys):
    path = tmp_path / "vllm.jsonl"
    rows = [{"question": "q1", "gold": "\\frac{1}{2}", "reply": "<think>hmm</think> \\boxed{0.5}"},
            {"question": "q2", "answer": "#### 7", "response": "<think>so 7? wait"},
            {"question": "q3", "gold": "3", "reply": "A: 4"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc = main(["eval", "--predictions", str(path), "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "pass --tokenizer" in capsys.readouterr().err
    res = score_predictions(path, tokenizer=str(BASE))
    m = res["models"][0]
    assert m["model"] == "vllm" and m["n"] == 3
    assert m["accuracy"] == round(1 / 3, 4)                      # q1 right, q2 cut while thinking, q3 wrong
    assert m["truncated_in_thinking"] == 1 and m["thinks"] is True
    assert m["mean_thinking_length"] + m["mean_answer_length"] == pytest.approx(m["mean_length"], abs=0.02)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "text": "A: 1"}) + "\n")
    with pytest.raises(InputError, match="lacks a reply or gold"):
        score_predictions(bad)


# ----------------------------------------------------------------------------- R1-style replies


class ScriptedModel:
    """Stands in for an R1-distilled model: replies come from a script keyed by the question, through
    the real tokenizer and the real ``generate_batch`` (padding, EOS, max_new_tokens, token counting)."""

    def __init__(self, tokenizer, script: dict[str, str]):
        import torch
        from transformers import GenerationConfig

        self.tok, self.script = tokenizer, script
        self.eos = tokenizer.eos_token_id
        self.generation_config = GenerationConfig(eos_token_id=self.eos, do_sample=True, temperature=0.6, top_p=0.95)
        self.config = type("Config", (), {"eos_token_id": self.eos})()
        self._p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self._p

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **_):
        import torch

        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=False)
            reply = next(r for q, r in self.script.items() if q in prompt)
            new = (self.tok(reply, add_special_tokens=False)["input_ids"] + [self.eos])[:max_new_tokens]
            rows.append(new)
        width = max(len(r) for r in rows)
        rows = [r + [pad_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(rows, dtype=input_ids.dtype)], dim=1)


R1_SCRIPT = {
    "What is 2 + 2?": "Let me see, 2 + 2 = 4.</think>\n\nThe answer is \\boxed{4}.",
    "What is half of 1?": "Half of one is 0.5.</think> \\boxed{\\frac{1}{2}}",
    "What is 6 + 7?": "Hmm, 6 + 7 is 12? wait " * 30,          # never closes: cut off by max_new_tokens
}
R1_DATA = [{"question": "What is 2 + 2?", "answer": "4", "level": 1},
           {"question": "What is half of 1?", "answer": "0.5", "level": 1},
           {"question": "What is 6 + 7?", "answer": "13", "level": 2}]


def _r1_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BASE))
    # DeepSeek-R1-Distill templates open the thinking block in the generation prompt.
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
    return tok


def test_r1_replies_thinking_split_truncation_and_predictions(tmp_path):
    tok = _r1_tokenizer()
    model = ScriptedModel(tok, R1_SCRIPT)
    replies = tmp_path / "r1.jsonl"
    res = evaluate([("r1", model, tok)], R1_DATA, max_new_tokens=80, batch_size=3, show_progress=False,
                   save_replies=replies, keep_records=True)
    m = res["models"][0]
    assert m["accuracy"] == round(2 / 3, 4)
    assert m["thinks"] is True and m["truncated"] == 1 and m["truncated_in_thinking"] == 1
    recs = m["records"]
    first = tok("Let me see, 2 + 2 = 4.</think>", add_special_tokens=False)["input_ids"]
    assert recs[0]["thinking_tokens"] == len(first)
    assert recs[0]["answer_tokens"] == recs[0]["length"] - len(first) > 0
    assert recs[2]["thinking_tokens"] == recs[2]["length"] == 80 and recs[2]["prediction"] is None
    assert m["mean_thinking_length"] + m["mean_answer_length"] == pytest.approx(m["mean_length"], abs=0.02)
    assert m["per_level"]["2"]["truncated_in_thinking"] == 1 and m["per_level"]["1"]["accuracy"] == 1.0
    saved = [json.loads(x) for x in replies.read_text().splitlines()]
    assert all(r["thinking_opened"] for r in saved)
    again = score_predictions(replies)["models"][0]
    _same_scores(m, again)


def test_generation_config_sampling_is_used_when_asked():
    tok = _r1_tokenizer()
    model = ScriptedModel(tok, R1_SCRIPT)
    res = evaluate([("r1", model, tok)], R1_DATA[:1], max_new_tokens=40, use_generation_config=True, samples=2,
                   show_progress=False)
    m = res["models"][0]
    assert m["decoding"] == {"mode": "sampled", "temperature": 0.6, "top_p": 0.95, "top_k": 0}
    assert m["replies"] == 2 and m["accuracy_per_sample"] == [1.0, 1.0]


# ----------------------------------------------------------------------------- sampling


def test_sampled_evaluation_is_reproducible_with_a_seed():
    from acm.checkpoints.models import load_model

    model, tok = load_model(LONG)
    data = load_data(EVAL, limit=8)
    kw = {"max_new_tokens": 24, "batch_size": 4, "temperature": 1.5, "top_p": 1.0, "samples": 2, "show_progress": False,
              "keep_records": True}
    a = evaluate([("long", model, tok)], data, seed=3, **kw)["models"][0]
    b = evaluate([("long", model, tok)], data, seed=3, **kw)["models"][0]
    c = evaluate([("long", model, tok)], data, seed=4, **kw)["models"][0]
    assert a["records"] == b["records"] and a["accuracy_per_sample"] == b["accuracy_per_sample"]
    assert a["replies"] == 16 and a["n"] == 8
    assert a["accuracy"] == pytest.approx(sum(a["accuracy_per_sample"]) / 2, abs=1e-4)
    assert [r["length"] for r in a["records"]] != [r["length"] for r in c["records"]] \
        or [r["prediction"] for r in a["records"]] != [r["prediction"] for r in c["records"]]


def test_sampling_settings_are_checked(tmp_path, capsys):
    with pytest.raises(InputError, match="--samples 3 needs --temperature"):
        evaluate([str(BASE)], EVAL, samples=3, show_progress=False)
    with pytest.raises(InputError, match="top-p"):
        evaluate([str(BASE)], EVAL, temperature=0.6, top_p=0.0, show_progress=False)
    with pytest.raises(InputError, match="1..32768"):
        evaluate([str(BASE)], EVAL, max_new_tokens=40000, show_progress=False)
    rc = main(["eval", "--model", str(BASE), "--data", str(EVAL), "--limit", "1", "--max-new-tokens", "5000",
               "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 0 and "acm eval: warning: up to 5,000 new tokens per reply on CPU" in err
    assert json.loads((tmp_path / "r.json").read_text())["warnings"]
