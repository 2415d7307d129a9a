"""The demo builder: a seconds-long quick build produces loadable models and the data sets."""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from acm.cli import main
from acm.demo.build import BASE_NAME, LONG_NAME, BuildConfig, build, build_tokenizer


def test_quick_build_loads_and_generates(tmp_path):
    seen = []
    report = build(tmp_path / "world", BuildConfig.quick(seed=0), progress=lambda f, d: seen.append(f))
    assert seen and seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    for name in (BASE_NAME, LONG_NAME):
        path = tmp_path / "world" / "demo-models" / name
        assert (path / "model.safetensors").is_file() and (path / "generation_config.json").is_file()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        assert model.config.model_type == "llama" and model.config.num_hidden_layers >= 4
        # the saved tokenizer is the trained one (not replaced by an architecture default)
        text = "Question: What is 23 + 5?\n 23 + 5 = 28."
        raw = Tokenizer.from_file(str(path / "tokenizer.json"))
        assert tok.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1]
    base = AutoModelForCausalLM.from_pretrained(report.base, use_safetensors=True)
    long = AutoModelForCausalLM.from_pretrained(report.long, use_safetensors=True)
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), long.parameters()))
    rows = [json.loads(x) for x in open(report.eval)]
    assert len(rows) == 20 and {"question", "answer", "level"} <= set(rows[0])
    cal = [json.loads(x) for x in open(report.calibration)]
    assert len(cal) == 10 and "text" in cal[0]
    assert not {r["question"] for r in rows} & {r["question"] for r in cal}


def test_build_is_deterministic_per_seed(tmp_path):
    a = build(tmp_path / "a", BuildConfig.quick(seed=3), show_progress=False)
    b = build(tmp_path / "b", BuildConfig.quick(seed=3), show_progress=False)
    assert open(a.eval).read() == open(b.eval).read()
    ma = AutoModelForCausalLM.from_pretrained(a.long, use_safetensors=True)
    mb = AutoModelForCausalLM.from_pretrained(b.long, use_safetensors=True)
    assert all(torch.equal(x, y) for x, y in zip(ma.parameters(), mb.parameters()))


def test_tokenizer_round_trips_and_numbers_are_single_tokens():
    tok = build_tokenizer(["What is 27 + 5?", " 27 + 5 = 32.", "So the answer is 32."] * 20, 300)
    text = "Add 4736 + 2958.\n 27 + 5 = 32.\nSo the answer is -7,694.5 \\boxed{1} héllo"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok.encode(" 27 + 5", add_special_tokens=False)) == ["Ġ27", "Ġ+", "Ġ5"]
    # digits are never merged across a group of two, so long numbers stay readable to the model
    assert all(len(t.lstrip("Ġ")) <= 2 for t in tok.convert_ids_to_tokens(tok.encode(" 4736")))


def test_cli_build_demo_quick(tmp_path, capsys):
    assert main(["build-demo", "--quick", "--out", str(tmp_path / "w"), "--seed", "1"]) == 0
    assert (tmp_path / "w" / "demo-models" / LONG_NAME / "config.json").is_file()
    assert main(["build-demo", "--quick", "--out", str(tmp_path / "w"), "--base-steps", "0"]) == 2
