"""The Long-to-Short sweep: grid, table, and a seconds-long run on a quick-built world."""

from __future__ import annotations

import json

from acm.demo.build import BuildConfig, build
from acm.demo.sweep import label, markdown, run_sweep, settings


def test_grid_pairs_every_plain_setting_with_acm():
    grid = settings([0.5, 1.0], [2.0], [0.2])
    assert len(grid) == 2 * (2 + 2)
    assert label(grid[0]) == "TA (α=0.5)" and label(grid[1]) == "ACM-TA (α=0.5, t=2)"
    assert label(grid[3]) == "ACM-TIES (α=0.5, d=0.2, t=2)"


def test_markdown_table_has_a_row_per_model():
    rows = [{"model": "base", "accuracy": 0.5, "mean_length": 4.0, "median_length": 4.0, "acc_per_1k_tokens": 125.0,
             "length_cut_vs_long": 0.9, "per_level": {"1": {"accuracy": 1.0, "mean_length": 4.0}}}]
    table = markdown(rows)
    assert table.splitlines()[2] == "| base | 0.500 | 4.0 | 90% | 125.00 | 1.00 |"


def test_sweep_runs_end_to_end_on_a_quick_world(tmp_path):
    world = build(tmp_path / "w", BuildConfig.quick(seed=0), show_progress=False)
    res = run_sweep(tmp_path / "sweep", base=world.base, long=world.long, calibration=world.calibration,
                    eval_path=world.eval, alphas=[1.0], ts=[5.0], densities=[0.5], limit=3, max_new_tokens=6,
                    batch_size=3, samples=4, threads=1)
    assert [r["model"] for r in res["rows"]][:3] == ["base (System 1)", "long (System 2)", "TA (α=1)"]
    assert len(res["rows"]) == 2 + 4 and set(res["nmi"]) >= {"embed", "block.0", "head"}
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["rows"] == res["rows"]
    assert (tmp_path / "sweep" / "table.md").read_text().count("\n") == 2 + 6
