"""Smoke test: every benchmark runs in quick mode and returns the expected fields.

No timing assertions (the numbers depend on the machine and on what else runs); this only
guards against the benchmarks rotting as the library's API moves. Smallest size, few tokens.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from benchmarks import analysis as analysis_bench
from benchmarks import fullsize_merge as fullsize_merge_bench
from benchmarks import kernels as kernels_bench
from benchmarks import latency as latency_bench
from benchmarks import merge as merge_bench
from benchmarks import tune as tune_bench
from benchmarks.common import lstsq_slope, md_table


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def test_helpers():
    slope, icpt, r2 = lstsq_slope([1, 2, 3], [2, 4, 6])
    assert slope == pytest.approx(2) and icpt == pytest.approx(0) and r2 == pytest.approx(1)
    table = md_table([{"a": 1.23456, "b": None}], [("a", "A"), ("b", "B")])
    assert table.splitlines()[0] == "| A | B |" and "1.23" in table


def test_merge_quick(tmp_path):
    data = merge_bench.run(["10m"], repeats=1, out=str(tmp_path / "merge.json"), log=lambda *_: None)
    assert (tmp_path / "merge.json").is_file()
    rows = {r["method"]: r for r in data["rows"]}
    assert {"floor", "naive", *merge_bench.METHODS} <= set(rows)
    for name in ("floor", "naive"):
        r = rows[name]
        assert r["status"] == "ok"
        for key in ("seconds", "x_floor", "peak_rss_mib", "peak_anon_mib", "rss_over_model", "rss_minus_baseline_mib",
                    "anon_minus_baseline_mib", "gb_per_s"):
            assert r[key] is not None, (name, key)
    assert data["sizes"][0]["baseline"]["ru_maxrss"] > 0
    if _has("acm.merging.engine"):
        for m in merge_bench.METHODS:
            assert rows[m]["status"] == "ok", rows[m]
            assert rows[m]["seconds"] > 0 and rows[m]["x_ta"] is not None and rows[m]["x_floor"] > 0
    assert "| size |" in merge_bench.report(data)


def test_fullsize_merge_quick(tmp_path):
    """The full-size merge benchmark's --quick mode (tiny model): every row measured, no timing asserted."""
    data = fullsize_merge_bench.run(quick=True, out=str(tmp_path / "fullsize_merge.json"), log=lambda *_: None)
    assert (tmp_path / "fullsize_merge.json").is_file()
    rows = {r["method"]: r for r in data["rows"]}
    assert set(fullsize_merge_bench.METHODS) <= set(rows)
    for name in fullsize_merge_bench.METHODS:
        r = rows[name]
        assert r["status"] == "ok", r
        for key in ("wall_s", "cpu_s", "x_floor", "cpu_x_floor", "peak_rss_mib", "peak_anon_mib", "minor_faults_k"):
            assert r[key] is not None, (name, key)
    assert rows["task_arithmetic"]["first_tensor_s"] is not None and rows["ties"]["first_tensor_s"] is not None
    assert "| method |" in fullsize_merge_bench.report(data)


def test_analysis_quick(tmp_path):
    data = analysis_bench.run(["10m"], samples=4, scaling=[2, 4], max_tokens=32, batch_size=2,
                              out=str(tmp_path / "analysis.json"), log=lambda *_: None)
    (row,) = data["overhead"]
    assert row["tokens"] > 0 and row["forward_s"] > 0 and row["forward_tok_s"] > 0
    if _has("acm.activations.analysis"):
        assert data["status"] == "ok", data["status"]
        for key in ("analyze_core_s", "analyze_tok_s", "overhead", "load_s", "select_s", "estimator_bytes"):
            assert row[key] is not None, key
        assert [r["samples"] for r in data["scaling"]] == [2, 4]
        for r in data["scaling"]:
            assert r["peak_rss_mib"] > 0 and r["estimator_bytes"] >= 0
    assert "| model |" in analysis_bench.report(data)


def test_latency_quick(tmp_path):
    data = latency_bench.run(True, out=str(tmp_path / "latency.json"), log=lambda *_: None)
    assert data["coefficients"] and all(r["median_ms"] >= 0 for r in data["coefficients"])
    assert any(r["what"].startswith("t-slider") and r["status"] == "ok" for r in data["slider"])
    gen = [r for r in data["generation"] if r["what"].startswith("generate (alone)")]
    assert gen and all(r["new_tokens"] > 0 and r["first_token_ms"] > 0 for r in gen)
    assert "| what |" in latency_bench.report(data)


def test_kernels_quick(tmp_path):
    data = kernels_bench.run(1 << 16, reps=1, out=str(tmp_path / "kernels.json"), log=lambda *_: None)
    kinds = {r["kernel"] for r in data["rows"]}
    assert {"task-arithmetic update", "TIES threshold", "DARE drop mask"} <= kinds
    exact = [r for r in data["rows"] if r["variant"].startswith("radix")]
    assert exact and "True" in exact[0]["note"]   # the radix select agrees with kthvalue


@pytest.mark.skipif(not (tune_bench.DEMO / "tiny-math-base" / "config.json").is_file(), reason="needs the demo models")
def test_tune_quick(tmp_path):
    data = tune_bench.run(True, out=str(tmp_path / "tune.json"), log=lambda *_: None)
    row = data["row"]
    assert row["settings"] == 2 and row["tune_problems"] == 8 and row["holdout_problems"] == 8
    assert row["tune_s"] > 0 and row["analysis_s"] > 0 and row["load_before"] >= 0
    assert data["report"]["complete"] and data["report"]["recommended"]["holdout"]["n"] == 8
    assert "| settings |" in tune_bench.report(data) and (tmp_path / "tune.json").is_file()


@pytest.mark.skipif(not _has("ray") or not (tune_bench.DEMO / "tiny-math-base" / "config.json").is_file(),
                    reason="needs Ray (requirements-ray.txt) and the demo models")
def test_tune_ray_quick(tmp_path):
    from benchmarks import tune_ray as tune_ray_bench

    data = tune_ray_bench.run(True, out=str(tmp_path / "tune_ray.json"), log=lambda *_: None)
    assert [r["executor"] for r in data["rows"]] == ["local", "ray"] and all(r["complete"] for r in data["rows"])
    assert data["same_frontier_and_recommendation"] and data["rows"][1]["cluster_start_s"] > 0
    assert "speed-up of the grid" in tune_ray_bench.report(data) and (tmp_path / "tune_ray.json").is_file()


def _git_ok() -> bool:
    import subprocess

    from benchmarks.common import ROOT

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not _git_ok() or not _has("acm.merging.engine"), reason="needs a git checkout and the engine")
def test_ab_quick(tmp_path):
    from benchmarks import ab

    data = ab.run("HEAD", ab.WORKTREE, ["10m"], ["task_arithmetic"], 1, out=str(tmp_path / "ab.json"),
                  log=lambda *_: None)
    rows = {r["method"]: r for r in data["rows"]}
    assert {"floor", "task_arithmetic"} <= set(rows)
    assert rows["task_arithmetic"]["cpu_a"] > 0 and rows["task_arithmetic"]["cpu_b"] > 0
    kern = ab.run("HEAD", ab.WORKTREE, ["10m"], ["task_arithmetic", "ties"], 1, out=str(tmp_path / "abk.json"),
                  log=lambda *_: None, kernel=True)
    assert [r["method"] for r in kern["rows"]] == ["task_arithmetic", "ties"]
    assert all(r["cpu_a"] > 0 and r["identical"] is not None for r in kern["rows"])
    assert "| size |" in ab.report(data) and "| size |" in ab.report(kern)


def test_load_quick(tmp_path):
    """The bounded load test in quick mode: starts the app on loopback, 2 sessions, stops it (no timings asserted)."""
    from benchmarks import load as load_bench

    data = load_bench.run(2, time_limit=120.0, chat_tokens=8, out=str(tmp_path / "load.json"), log=lambda *_: None)
    assert (tmp_path / "load.json").is_file()
    rows = {r["endpoint"]: r for r in data["rows"]}
    assert set(rows) == set(load_bench.ENDPOINTS)
    assert rows["open"]["calls"] == rows["analyse"]["calls"] == 2             # each page opened, then Analyse
    assert rows["coefficients"]["calls"] == 2 * len(load_bench.REDRAW_TS)
    assert all(r["errors"] == 0 and r["timeouts"] == 0 for r in rows.values()), data.get("messages")
    assert data["completed"] == 2 and data["analyse_cache_hits"] == 1        # the second visitor reused it
    assert data["rss_peak_mib"] > 0 and data["rss_idle_mib"] > 0
    assert "| endpoint |" in load_bench.report(data)
    assert data["analysis_compute_s"] > 0                    # the defaults' one computation, from its cache entry


def test_load_quick_warm(tmp_path):
    """--warm: the warm-up stores the defaults' analysis, so every session's Analyse is a cache hit
    (here with --threads)."""
    from benchmarks import load as load_bench

    data = load_bench.run(2, time_limit=120.0, chat=False, warm=True, out=str(tmp_path / "load.json"),
                          processes=False, log=lambda *_: None)          # the sessions as threads of this process
    assert data["clients"] == "threads" and data["warm"], data
    assert data["completed"] == 2 and data["analyse_cache_hits"] == 2, data.get("messages")
    assert data["analysis_compute_s"] > 0 and "pre-warmed with the defaults" in load_bench.report(data)


_DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo-models"


@pytest.mark.skipif(not (_DEMO / "tiny-math-base" / "config.json").is_file(), reason="needs the demo models")
def test_fullsize_analyze_task_times_sample_mi():
    """The full-size rows' analyze task, on the demo pair: per-sample MI's hook and MI time measured apart."""
    args = {"base": str(_DEMO / "tiny-math-base"), "fts": [str(_DEMO / "tiny-math-long")], "samples": 3,
            "max_tokens": 24, "batch_size": 2, "dtype": "float32", "sample_mi": "labels", "sample_max_values": 2**18,
            "metrics": []}
    out = analysis_bench.task_fs_analyze(args)
    assert out["mi_calls"] == 3 * 9                    # 3 samples × 9 points (6 blocks) × 1 fine-tuned model
    assert 0 < out["mi_compute_cpu_s"] <= out["mi_hooks_cpu_s"] <= out["core_cpu_s"]
    assert out["sample_info"]["estimator"] == "labels" and len(out["sample_info"]["tokens"]) == 3
    off = analysis_bench.task_fs_analyze({**args, "sample_mi": None, "metrics": None})
    assert off["mi_calls"] == 0 and off["mi_hooks_s"] is None


@pytest.mark.skipif(not (_DEMO / "tiny-math-base" / "config.json").is_file(), reason="needs the demo models")
def test_mi_vs_length_summary():
    """mi_vs_length's statistics on a small real analysis (6 bundled prompts): one row per point, r in [-1, 1]."""
    from acm.activations.analysis import analyze
    from acm.activations.calibration import load_texts
    from benchmarks import mi_vs_length

    texts = load_texts("bundled")[:6]
    res = analyze(str(_DEMO / "tiny-math-base"), [str(_DEMO / "tiny-math-long")], texts, samples=6, metrics=[],
                  sample_mi="labels", device="cpu", show_progress=False)
    summary = mi_vs_length.summarize(res, mi_vs_length._config(_DEMO / "tiny-math-base"))
    assert [r["point"] for r in summary["points"]] == res.sample_info["points"]
    assert all(-1 <= r["r"] <= 1 and 0 < r["mi_over_log_n"] <= 1 + 1e-9 for r in summary["points"])
    assert -1 <= summary["overall_r"] <= 1 and summary["samples"] == 6
    table = mi_vs_length.table({"labels": summary}, ["labels"])
    assert "| point |" in table and "**overall**" in table
    assert mi_vs_length.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


def test_paper_rule_demo_commands_parse():
    """Every merge the paper-rule demo runs is a valid `acm merge` command with the intended rule settings."""
    from acm.cli import build_parser
    from benchmarks import paper_rule_demo as prd

    groups = prd.settings(["task_arithmetic", "ties"], list(prd.PAPER_TS), list(prd.COMBOS), 0.7, 0.7, 1.0)
    models = [m for g in groups for m in g["models"]]
    assert len(models) == 2 * (2 + len(prd.PAPER_TS) * len(prd.COMBOS))
    parser = build_parser()
    for m in models:
        flags = [f.replace("{analysis}", "a.json") for f in m["flags"]]
        ns = parser.parse_args(["merge", "--base", "b", "--ft", "f", *flags, "--out", "o"])
        if m["rule"] == "acm":
            against, applies = prd.COMBOS[m["combo"]]
            assert (ns.rule, ns.t, ns.against, ns.applies) == ("acm", m["t"], against, applies)
            assert (ns.acm is not None) == (against == "fine-tuned")
            assert (ns.calibration is not None) == (against == "merged")
    stats = prd._stats({"accuracy": 0.5, "mean_length": 2.0, "n": 4, "per_level": {"1": {"accuracy": 0.5}}},
                       [1, 1, 3, 3])
    assert stats["accuracy_se"] == pytest.approx(0.25) and stats["length_se"] == pytest.approx(((4 / 3) ** 0.5) / 2)
    assert "0.500 ± 0.250 | 2.0 ± 0.6 |" in prd.markdown([{"label": "x", "lambda": None, **stats}])
    no_replies = prd._stats({"accuracy": 0.5, "mean_length": 2.0, "n": 300})
    assert no_replies["length_se"] is None and "| 2.0 |" in prd.markdown([{"label": "x", **no_replies}])
