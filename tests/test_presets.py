"""Presets (acm/presets.py, `acm presets`, `--preset`): the paper's pairs as data, their facts consistent with
each other, flags given on the command line always winning, and one-line errors for unknown names."""

from __future__ import annotations

import json

import pytest

from acm import presets as P
from acm.cli import build_parser, main

# The paper's Long-to-Short pairs, as issue 21 lists them (base, fine-tuned).
PAPER_PAIRS = {
    ("Qwen/Qwen2.5-Math-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
    ("Qwen/Qwen2.5-Math-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
    ("Qwen/Qwen2.5-14B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"),
    ("Qwen/Qwen2.5-32B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"),
    ("meta-llama/Llama-3.1-8B", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
}


def qwen_llama_params(m: P.HubModel, heads: int, kv_heads: int, bias: bool) -> int:
    """Parameters of a Qwen2 / Llama decoder from its config: the check that the stored count and shape agree."""
    head_dim = m.hidden // heads
    attn = 2 * m.hidden * m.hidden + 2 * m.hidden * kv_heads * head_dim
    attn += (m.hidden + 2 * kv_heads * head_dim) if bias else 0
    per_layer = attn + 3 * m.hidden * m.intermediate + 2 * m.hidden
    embeddings = m.vocab * m.hidden * (1 if m.tied else 2)
    return m.layers * per_layer + embeddings + m.hidden


HEADS = {1536: (12, 2), 3584: (28, 4), 5120: (40, 8), 4096: (32, 8)}


@pytest.fixture(autouse=True)
def no_extra_presets(monkeypatch):
    monkeypatch.delenv(P.PRESETS_FILE_ENV, raising=False)


def test_the_paper_pairs_fill_every_field_with_the_papers_settings():
    pairs = P.pair_presets()
    assert {(p.base.repo, p.ft.repo) for p in pairs.values()} == PAPER_PAIRS
    for p in pairs.values():
        assert (p.tokenizer_from, p.rule, p.t, p.calibration) == ("ft", "acm", 0.7, "s1k")
        assert p.base.vocab == p.ft.vocab and p.base.layers == p.ft.layers and p.base.hidden == p.ft.hidden
        assert p.download_bytes == 2 * (p.base.params + p.ft.params)
        for m in (p.base, p.ft):
            assert m.sources, f"{m.repo}: every model names where its facts come from"
    assert [p.key for p in pairs.values() if p.gated] == ["llama-3.1-8b"]
    assert "gated" in pairs["llama-3.1-8b"].note


def test_stored_parameter_counts_follow_from_the_stored_shapes():
    """A typo in a size or a shape fails here: each count is recomputed from layers, widths, vocabulary and tie."""
    for p in P.pair_presets().values():
        for m in (p.base, p.ft):
            heads, kv = HEADS[m.hidden]
            llama = "llama" in m.repo.lower()
            assert qwen_llama_params(m, heads, kv, bias=not llama) == m.params, m.repo


def test_known_sizes_from_the_hub_indexes():
    """Byte counts that public index files quote (sources in acm/presets.py)."""
    pairs = P.pair_presets()
    assert pairs["qwen2.5-math-7b"].ft.weight_bytes == 15_231_233_024
    assert pairs["qwen2.5-14b"].base.weight_bytes == 29_540_067_328
    assert pairs["qwen2.5-32b"].base.weight_bytes == 65_527_752_704
    assert pairs["llama-3.1-8b"].base.weight_bytes == 16_060_522_496
    assert pairs["qwen2.5-math-1.5b"].base.weight_bytes == 3_087_428_608      # tied: no lm_head
    assert pairs["qwen2.5-math-1.5b"].ft.weight_bytes == 3_554_176_000


def test_hardware_grows_with_the_pair_and_matches_the_7b_calculation():
    hw = {k: P.estimate(p) for k, p in P.pair_presets().items()}
    # BENCHMARKS "A 7B pair on a 24 GB GPU": ≈ 17.3 GB + ~0.5 GB CUDA context
    assert 17.3e9 < hw["qwen2.5-math-7b"].gpu_analysis_bytes < 18.3e9
    assert "24 GB" in hw["qwen2.5-math-7b"].gpu and "80 GB" in hw["qwen2.5-32b"].gpu
    order = ["qwen2.5-math-1.5b", "qwen2.5-math-7b", "qwen2.5-14b", "qwen2.5-32b"]
    assert [hw[k].download_bytes for k in order] == sorted(hw[k].download_bytes for k in order)
    # merged model: untied whenever one side is untied (the 1.5B pair's merge is the fine-tune's size)
    assert hw["qwen2.5-math-1.5b"].merged_bytes == 3_554_176_000
    for h in hw.values():
        assert set(h.basis) >= {"gpu", "cpu_ram", "cpu_time", "merge_ram", "download"}
        assert any("estimate" in line for line in h.lines())


def test_calibration_presets_are_the_papers_s1k_and_limo():
    s1k, limo = P.get_calibration("s1k"), P.get_calibration("LIMO")
    assert (s1k.dataset, s1k.split, s1k.field, s1k.clusters, s1k.fraction) == ("simplescaling/s1K", "train",
                                                                               "question", 20, 0.1)
    assert s1k.samples == 100
    assert (limo.dataset, limo.field, limo.rows) == ("GAIR/LIMO", "question", 817)


def test_unknown_names_are_one_line_errors(capsys):
    assert main(["presets", "qwen-9000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown preset 'qwen-9000'" in err and "qwen2.5-math-1.5b" in err
    assert main(["analyze", "--preset", "nope", "--out", "a.json"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["analyze", "--base", "b", "--ft", "f", "--calibration-preset", "c4", "--out", "a.json"]) == 2
    assert "unknown calibration preset 'c4'" in capsys.readouterr().err


def test_acm_presets_prints_the_table_and_json(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for p in P.pair_presets().values():
        assert p.key in out and p.base.repo in out
    assert "[gated]" in out and "s1k = simplescaling/s1K" in out
    assert main(["presets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["pairs"]) == 5 and {"s1k", "limo"} <= set(data["calibrations"])
    assert main(["presets", "qwen2.5-math-7b"]) == 0
    detail = capsys.readouterr().out
    assert "UNVERIFIED" in detail and "basis (gpu)" in detail and "source:" in detail


def _parsed(argv):
    return build_parser().parse_args(argv)


def test_analyze_preset_fills_what_was_not_given():
    from acm.commands.analyze import apply_preset

    args = _parsed(["analyze", "--preset", "qwen2.5-math-1.5b", "--out", "a.json"])
    apply_preset(args)
    assert (args.base, args.ft) == ("Qwen/Qwen2.5-Math-1.5B", ["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"])
    assert (args.calibration, args.split, args.field, args.clusters, args.fraction, args.max_tokens) == (
        "simplescaling/s1K", "train", "question", 20, 0.1, 1024)
    # flags given win over the preset; a calibration preset replaces the pair's
    args = _parsed(["analyze", "--preset", "qwen2.5-math-1.5b", "--base", "my/base", "--calibration", "bundled",
                    "--max-tokens", "64", "--clusters", "4", "--out", "a.json"])
    apply_preset(args)
    assert (args.base, args.calibration, args.max_tokens, args.clusters, args.fraction) == (
        "my/base", "bundled", 64, 4, 0.1)
    args = _parsed(["analyze", "--base", "b", "--ft", "f", "--calibration-preset", "limo", "--out", "a.json"])
    apply_preset(args)
    assert (args.base, args.ft, args.calibration, args.field) == ("b", ["f"], "GAIR/LIMO", "question")
    # without a preset the old defaults hold
    args = _parsed(["analyze", "--base", "b", "--ft", "f", "--calibration", "bundled", "--out", "a.json"])
    apply_preset(args)
    assert (args.split, args.clusters, args.fraction, args.max_tokens, args.field) == ("train", 20, 0.1, 512, None)


def test_merge_preset_never_turns_a_plain_merge_into_an_acm_one():
    from acm.commands.merge import _rule_settings, apply_preset

    args = _parsed(["merge", "--preset", "qwen2.5-math-7b", "--method", "ties", "--out", "o"])
    apply_preset(args)
    assert (args.base, args.ft, args.tokenizer_from) == ("Qwen/Qwen2.5-Math-7B",
                                                          ["deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"], "ft")
    assert args.rule is None and args.t is None and _rule_settings(args) is None       # plain TIES
    args = _parsed(["merge", "--preset", "qwen2.5-math-7b", "--acm", "a.json", "--out", "o"])
    apply_preset(args)
    assert (args.rule, args.t) == ("acm", 0.7)
    args = _parsed(["merge", "--preset", "qwen2.5-math-7b", "--acm", "a.json", "--rule", "softmax",
                    "--tokenizer-from", "base", "--out", "o"])
    apply_preset(args)
    assert (args.rule, args.t, args.tokenizer_from) == ("softmax", None, "base")    # softmax keeps its own t
    args = _parsed(["merge", "--preset", "qwen2.5-math-7b", "--against", "merged", "--out", "o"])
    apply_preset(args)
    assert (args.calibration, args.field, args.max_tokens) == ("simplescaling/s1K", "question", 1024)
    args = _parsed(["merge", "--base", "b", "--ft", "f", "--out", "o"])
    apply_preset(args)
    assert args.tokenizer_from == "base"


def test_tune_preset_fills_models_and_calibration():
    from acm.commands.tune import apply_preset

    args = _parsed(["tune", "--preset", "llama-3.1-8b", "--out", "run"])
    apply_preset(args)
    assert (args.base, args.ft, args.calibration) == ("meta-llama/Llama-3.1-8B",
                                                      ["deepseek-ai/DeepSeek-R1-Distill-Llama-8B"], "simplescaling/s1K")


def _demo_preset_file(tmp_path, demo_dir) -> str:
    base, ft = P.get_pair("qwen2.5-math-1.5b").base, P.get_pair("qwen2.5-math-1.5b").ft
    entry = {"key": "demo-local", "label": "the demo pair from a folder",
             "base": {**base.__dict__, "repo": str(demo_dir / "tiny-math-base")},
             "ft": {**ft.__dict__, "repo": str(demo_dir / "tiny-math-long")}, "calibration": "mini"}
    path = tmp_path / "presets.json"
    path.write_text(json.dumps({"pairs": [entry], "calibrations": [
        {"key": "mini", "label": "bundled", "dataset": "bundled", "split": "train", "field": "text", "rows": 200,
         "clusters": 2, "fraction": 0.05, "max_tokens": 32}]}, default=list))
    return str(path)


def test_extra_presets_from_a_file_run_an_analysis(tmp_path, monkeypatch, capsys):
    """ACM_PRESETS_FILE adds a pair and a calibration preset; `acm analyze --preset` then runs on them."""
    from components.common import demo_models_dir

    demo = demo_models_dir()
    if not (demo / "tiny-math-base" / "config.json").is_file():
        pytest.skip("bundled demo models are missing")
    monkeypatch.setenv(P.PRESETS_FILE_ENV, _demo_preset_file(tmp_path, demo))
    assert "demo-local" in P.pair_presets() and "mini" in P.calibration_presets()
    out = tmp_path / "analysis.json"
    assert main(["analyze", "--preset", "demo-local", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    text = json.dumps(result)
    assert "tiny-math-long" in text and "tiny-math-base" in text
    assert result["provenance"]["calibration"]["samples"] == 10          # 2 clusters × 5 % of 200 texts
    # merge with the preset and that analysis: the paper's rule at t = 0.7, the fine-tuned model's tokenizer
    merged = tmp_path / "merged"
    assert main(["merge", "--preset", "demo-local", "--method", "ties", "--acm", str(out), "--out", str(merged)]) == 0
    recipe = json.loads((merged / "acm_recipe.json").read_text())
    assert recipe["acm"] is True and recipe["acm_analysis"]["t"] == 0.7 and recipe["acm_analysis"]["rule"] == "acm"
    assert recipe["output"]["tokenizer"]["from"].startswith("ft")


def test_a_bad_presets_file_is_one_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "p.json"
    bad.write_text('{"pairs": [{"key": "x"}]}')
    monkeypatch.setenv(P.PRESETS_FILE_ENV, str(bad))
    assert main(["presets"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ACM_PRESETS_FILE" in err and "cannot read presets" in err


def test_app_pickers_fill_the_tabs_without_fetching():
    """The Models tab's picker (and the Calibration tab's): values for every tab, the size shown first."""
    from components import calibration, models

    base, fts, summary, check, tok, rule, t, cal = models.apply_preset("qwen2.5-14b")
    assert (base["value"], fts["value"], tok["value"], rule["value"], t["value"], cal["value"]) == (
        "Qwen/Qwen2.5-14B", ["deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"], "ft:1", "acm", 0.7, "s1k")
    assert "download: 55.0 GiB" in summary and "48 GB" in summary and "Compatible" not in check
    assert "🔒" in models.preset_summary("llama-3.1-8b") and "unverified" in models.preset_summary("qwen2.5-32b")
    demo = models.apply_preset(models.DEMO_PRESET)
    assert demo[4]["value"] == "base" and demo[7]["value"] == "bundled"
    assert [k for _, k in models.preset_choices()][0] == models.DEMO_PRESET
    mode, hub_id, split, field, samples, clusters, fraction, max_tokens, note = calibration.apply_preset("s1k")
    assert (mode["value"], hub_id["value"], split["value"], field["value"]) == (
        calibration.HUB, "simplescaling/s1K", "train", "question")
    assert (samples["value"], clusters["value"], fraction["value"], max_tokens["value"]) == (0, 20, 0.1, 1024)
    assert calibration.apply_preset("bundled")[0]["value"] == calibration.BUNDLED
