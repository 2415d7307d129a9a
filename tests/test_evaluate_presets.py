"""Benchmark presets load for real (``datasets.load_dataset``) from local copies laid out like the Hub repos.

Each fixture folder has the dataset card's ``configs:`` block and parquet files with exactly the
card's columns and types (openai/gsm8k ``main``; HuggingFaceH4/MATH-500; HuggingFaceH4/aime_2024;
math-ai/minervamath). The problems are made up (short), the schemas are not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acm.cli import main
from acm.errors import InputError, OfflineError
from acm.evaluation.presets import PRESETS, get_preset, load_preset

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "assets" / "demo-models" / "tiny-math-base"
LONG = ROOT / "assets" / "demo-models" / "tiny-math-long"
PROMPT_TAIL = "Please reason step by step, and put your final answer within \\boxed{}."

S, I64 = "string", "int64"
# Hub id -> (card "configs" YAML, {parquet path: rows}, column types)
GSM8K_ROWS = [
    {"question": "Tom has 3 bags of 4 apples and eats 2. How many apples are left?",
     "answer": "He had 3*4=<<3*4=12>>12 apples.\n12-2=<<12-2=10>>10 are left.\n#### 10"},
    {"question": "A book costs $1,200 and a pen $34. What do both cost?",
     "answer": "1200+34=<<1200+34=1234>>1234\n#### 1,234"},
]
MATH500_ROWS = [
    {"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "solution": "Add: $\\boxed{\\frac{3}{4}}$.",
     "answer": "\\frac{3}{4}", "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "Solve $x^2 = 18$ for $x > 0$.", "solution": "$x = \\boxed{3\\sqrt{2}}$.",
     "answer": "3\\sqrt{2}", "subject": "Algebra", "level": 3, "unique_id": "test/algebra/2.json"},
    {"problem": "For which $x$ is $1 < x \\le 2$?", "solution": "$\\boxed{(1, 2]}$",
     "answer": "(1, 2]", "subject": "Intermediate Algebra", "level": 5, "unique_id": "test/intermediate_algebra/3.json"},
]
AIME_ROWS = [
    {"id": 60, "problem": "Find the remainder when $7^{10}$ is divided by $1000$.", "solution": "…",
     "answer": "249", "url": "https://example.invalid/aime/1", "year": "2024"},
    {"id": 61, "problem": "How many positive divisors does $2024$ have?", "solution": "…",
     "answer": "12", "url": "https://example.invalid/aime/2", "year": "2024"},
]
MINERVA_ROWS = [
    {"question": "A ball falls for $2$ s from rest ($g = 10$ m/s$^2$). How far, in m?", "answer": "20"},
]
FIXTURES = {
    "gsm8k": (("configs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
              "  - split: test\n    path: main/test-*\n- config_name: socratic\n  data_files:\n"
              "  - split: test\n    path: socratic/test-*\n"),
              {"main/train-00000-of-00001.parquet": GSM8K_ROWS[:1], "main/test-00000-of-00001.parquet": GSM8K_ROWS,
               "socratic/test-00000-of-00001.parquet": GSM8K_ROWS[:1]},
              {"question": S, "answer": S}),
    "math500": ("configs:\n- config_name: default\n  data_files:\n  - split: test\n    path: data/test-*\n",
                {"data/test-00000-of-00001.parquet": MATH500_ROWS},
                {"problem": S, "solution": S, "answer": S, "subject": S, "level": I64, "unique_id": S}),
    "aime24": ("configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n",
               {"data/train-00000-of-00001.parquet": AIME_ROWS},
               {"id": I64, "problem": S, "solution": S, "answer": S, "url": S, "year": S}),
    "minerva": ("configs:\n- config_name: default\n  data_files:\n  - split: test\n    path: test*\n",
                {"test-00000-of-00001.parquet": MINERVA_ROWS},
                {"question": S, "answer": S}),
}


def make_hub_copy(root: Path, key: str) -> Path:
    """A folder laid out like the preset's Hub repository (card configs + parquet shards)."""
    import datasets

    card, files, types = FIXTURES[key]
    folder = root / key
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(f"---\n{card}---\n# local copy of {PRESETS[key].hub_id}\n")
    features = datasets.Features({k: datasets.Value(t) for k, t in types.items()})
    for rel, rows in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / rel))
    return folder


@pytest.fixture(scope="module")
def hub_copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {key: make_hub_copy(root, key) for key in FIXTURES}


@pytest.fixture()
def cache(tmp_path):
    return tmp_path / "datasets-cache"


def test_every_preset_has_a_fixture_with_its_fields():
    assert set(PRESETS) == set(FIXTURES)
    for key, p in PRESETS.items():
        columns = FIXTURES[key][2]
        assert p.question in columns and p.answer in columns and (p.level is None or p.level in columns)
        assert PROMPT_TAIL in p.prompt.format(question="Q")


def test_gsm8k_preset(hub_copies, cache):
    rows = load_preset("gsm8k", source=hub_copies["gsm8k"], cache_dir=cache)
    assert [r["answer"] for r in rows] == ["10", "1234"]           # "#### 1,234" -> 1234
    assert rows[0]["question"] == GSM8K_ROWS[0]["question"]
    assert rows[0]["prompt"] == GSM8K_ROWS[0]["question"] + "\n" + PROMPT_TAIL
    assert "level" not in rows[0]


def test_math500_preset_keeps_latex_gold_and_levels(hub_copies, cache):
    rows = load_preset("MATH-500", source=hub_copies["math500"], cache_dir=cache, limit=2)
    assert [r["answer"] for r in rows] == ["\\frac{3}{4}", "3\\sqrt{2}"]
    assert [r["level"] for r in rows] == ["1", "3"]
    assert rows[1]["prompt"].endswith(PROMPT_TAIL)


def test_aime_and_minerva_presets(hub_copies, cache):
    aime = load_preset("aime24", source=hub_copies["aime24"], cache_dir=cache)
    assert [r["answer"] for r in aime] == ["249", "12"] and aime[0]["question"].startswith("Find the remainder")
    minerva = load_preset("minerva", source=hub_copies["minerva"], cache_dir=cache)
    assert minerva == [{"question": MINERVA_ROWS[0]["question"], "answer": "20",
                        "prompt": MINERVA_ROWS[0]["question"] + "\n" + PROMPT_TAIL}]


def test_preset_errors(tmp_path, hub_copies, cache):
    with pytest.raises(InputError, match="unknown benchmark preset"):
        get_preset("mmlu")
    with pytest.raises(InputError, match="not a folder"):
        load_preset("gsm8k", source=tmp_path / "missing")
    with pytest.raises(OfflineError, match="offline"):                 # conftest sets HF_HUB_OFFLINE=1
        load_preset("aime24", cache_dir=cache)
    with pytest.raises(InputError, match="has no field"):              # a copy of a different dataset
        load_preset("math500", source=hub_copies["minerva"], cache_dir=cache)


def test_cli_eval_with_a_preset(tmp_path, hub_copies, capsys):
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(BASE), "--preset", "math500", "--preset-source", str(hub_copies["math500"]),
               "--max-new-tokens", "8", "--batch-size", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["n"] == 3 and res["data"] == "HuggingFaceH4/MATH-500 (test)"
    m = res["models"][0]
    assert set(m["per_level"]) == {"1", "3", "5"}
    assert [s["gold"] for s in m["samples"]] == ["\\frac{3}{4}", "3\\sqrt{2}", "(1, 2]"]


def test_cli_preset_bad_usage_is_one_line(tmp_path, capsys):
    rc = main(["eval", "--model", str(BASE), "--preset", "nope", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "unknown benchmark preset" in err
    rc = main(["eval", "--model", str(BASE), "--preset", "gsm8k", "--data", "x.jsonl", "--out", str(tmp_path / "r")])
    assert rc == 2 and "either --data or --preset" in capsys.readouterr().err


def test_app_evaluate_tab_offers_presets(monkeypatch, hub_copies, tmp_path):
    """The Evaluate tab's preset mode: dropdown choices come from PRESETS; the rows from the loader."""
    from components import evaluate as tab
    from components.state import SessionState

    assert [k for _, k in tab.preset_choices()] == list(PRESETS)
    monkeypatch.setattr(tab, "preset_rows", lambda key, limit: load_preset(
        key, source=hub_copies[key], limit=limit, cache_dir=tmp_path / "c"))
    state = SessionState()
    res = tab.run_eval(state, str(BASE), [str(LONG)], data_mode=tab.PRESET, preset="aime24", limit=2,
                       max_new_tokens=4, batch_size=2, include_sources=True)
    assert res["n"] == 2 and res["data"] == PRESETS["aime24"].title
    overall, _, _ = tab.tables(res)
    assert len(overall[0]) == len(tab.OVERALL_HEADERS)
    with pytest.raises(InputError, match="unknown benchmark preset"):
        tab.run_eval(state, str(BASE), [str(LONG)], data_mode=tab.PRESET, preset="../../etc/passwd")


def test_app_sampled_decoding_has_its_own_setting_and_hover():
    """Sampled runs are separate scatter settings (never mixed with greedy points), report per-sample
    accuracy, and the scatter's hover carries the thinking / answer split and truncation when present."""
    from components import evaluate as tab
    from components import plots
    from components.state import SessionState

    state = SessionState()
    greedy = tab.run_eval(state, str(BASE), [str(LONG)], data_mode=tab.BUNDLED, limit=3,
                          max_new_tokens=6, batch_size=3)
    sampled = tab.run_eval(state, str(BASE), [str(LONG)], data_mode=tab.BUNDLED, limit=3,
                           max_new_tokens=6, batch_size=3, decoding=tab.SAMPLED, temperature=0.9, top_p=0.9,
                           samples=2, seed=1)
    assert greedy["decoding"] == "greedy" and sampled["decoding"].startswith("sampled (temperature 0.9")
    assert all(m["replies"] == 6 and len(m["accuracy_per_sample"]) == 2 for m in sampled["models"])
    assert len({p["setting"] for p in state.eval_points}) == 2 and len(state.eval_points) == 4
    assert tab.decoding_options(tab.GREEDY, 0.6, 0.95, 4, 3)["samples"] == 1     # hidden controls are ignored
    fig = plots.eval_scatter([{"label": "r1", "kind": "fine-tuned", "accuracy": 0.5, "mean_length": 900, "n": 4,
                               "thinking_length": 800.0, "answer_length": 100.0, "truncated": 2,
                               "truncated_in_thinking": 1}])
    trace = fig.data[0]
    assert "%{customdata[2]}" in trace["hovertemplate"]
    assert "thinking 800.0 + answer 100.0 tokens" in trace["customdata"][0][2]
    assert "1 while thinking" in trace["customdata"][0][2]
