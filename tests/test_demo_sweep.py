"""The Long-to-Short sweep: grid, table, and a seconds-long run on a quick-built world."""

from __future__ import annotations

import json

from acm.demo.build import BuildConfig, build
from acm.demo.sweep import DEMO_ACM_TS, DEMO_SOFTMAX_TS, label, main, markdown, run_sweep, settings


def test_grid_pairs_every_plain_setting_with_both_rules():
    grid = settings([0.5, 1.0], [0.7], [0.2], softmax_ts=[2.0])
    # per α: TA and TIES plain + softmax; the paper's setting has no α, so it comes once per method
    assert len(grid) == 2 * (2 + 2) + 2
    assert [label(s) for s in grid[:6]] == ["TA (α=0.5)", "ACM-TA (t=0.7)", "ACM-TA (α=0.5, t=2, softmax)",
                                            "TIES (α=0.5, d=0.2)", "ACM-TIES (d=0.2, t=0.7)",
                                            "ACM-TIES (α=0.5, d=0.2, t=2, softmax)"]
    default = settings([0.7], None, [0.2], methods=["ties"])
    assert [s["t"] for s in default if s["rule"] == "acm"] == list(DEMO_ACM_TS)
    assert [s["t"] for s in default if s["t"] is not None and s["rule"] is None] == list(DEMO_SOFTMAX_TS)
    # the switches are grid dimensions; an old softmax-only command keeps --ts as softmax's t
    both = settings([0.7], [0.7], [0.2], methods=["ta"], rules=["acm"], against=["fine-tuned", "merged"],
                    applies=["task-vectors", "merged-delta"])
    assert len(both) == 1 + 4 and {(s["against"], s["applies"]) for s in both[1:]} == {
        (a, p) for a in ("fine-tuned", "merged") for p in ("task-vectors", "merged-delta")}
    assert [s["t"] for s in settings([0.7], [3.0, 8.0], [0.2], methods=["ta"], rules=["softmax"])] == [None, 3, 8]


def test_bad_grid_is_one_line_exit_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--ts", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t (acm rule) must be in [-3, 3]" in err


def test_markdown_table_has_a_row_per_model():
    rows = [{"model": "base", "accuracy": 0.5, "mean_length": 4.0, "median_length": 4.0, "acc_per_1k_tokens": 125.0,
             "length_cut_vs_long": 0.9, "per_level": {"1": {"accuracy": 1.0, "mean_length": 4.0}}}]
    table = markdown(rows)
    assert table.splitlines()[2] == "| base | 0.500 | 4.0 | 90% | 125.00 | 1.00 |"
    lam = markdown([*rows, {**rows[0], "model": "acm", "lambda": {"embed": 0.5, "head": 0.7}}])
    assert "λ (acm rule): mean (range)" in lam and "| acm | 0.60 (0.50–0.70) | 0.500" in lam
    assert "| base | — | 0.500" in lam


def test_sweep_runs_end_to_end_on_a_quick_world(tmp_path):
    world = build(tmp_path / "w", BuildConfig.quick(seed=0), show_progress=False)
    res = run_sweep(tmp_path / "sweep", base=world.base, long=world.long, calibration=world.calibration,
                    eval_path=world.eval, alphas=[1.0], ts=[0.7], softmax_ts=[5.0], densities=[0.5], limit=3,
                    max_new_tokens=6, batch_size=3, samples=4, threads=1)
    assert [r["model"] for r in res["rows"]][:4] == ["base (System 1)", "long (System 2)", "TA (α=1)",
                                                     "ACM-TA (t=0.7)"]
    assert len(res["rows"]) == 2 + 6 and set(res["nmi"]) >= {"embed", "block.0", "head"}
    assert set(res["sample_mi_mean"]) >= {"embed", "block.0", "head.norm", "head"}
    acm_row = res["rows"][3]
    assert acm_row["setting"]["rule"] == "acm" and all(0.5 <= v < 1 for v in acm_row["lambda"].values())
    assert "rule" not in res["rows"][2]["setting"]          # plain and softmax rows as before
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["rows"] == res["rows"]
    assert (tmp_path / "sweep" / "table.md").read_text().count("\n") == 2 + 8
