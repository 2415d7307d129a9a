"""The app's sigmoid-rule button (components/rules.py): handler in-process, and its wiring in the built app."""

from __future__ import annotations

import json

import pytest

from acm.errors import InputError
from components.state import SessionState
from tests.fixtures import make_pair, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base, fts = make_pair(tmp_path_factory.mktemp("rules-app"), "llama")
    return str(base), [str(f) for f in fts]


def test_rule_button_merges_sets_the_session_model_and_a_failure_keeps_it(pair, monkeypatch,
                                                                       one_torch_thread):  # noqa: F811
    import acm.sigmoid_rule
    from components import merge, rules

    st = SessionState()
    try:
        merged = rules.run_rule_merge(st, pair[0], pair[1], method="ties", alpha=0.7, density=0.7, theta=0.7,
                                      estimator="binned", cal_mode="bundled", samples=4, max_tokens=32)
        assert st.merged is merged and merged.model is not None
        assert merged.out_dir.parent == st.workspace / "merges" and merged.out_dir.name.endswith("-sigmoid")
        assert merged.label == "#1 TIES α=0.7 + sigmoid θ=0.7 (binned)"
        rec = json.loads((merged.out_dir / "acm_recipe.json").read_text())
        assert rec["rule"]["estimator"] == "binned" and rec["method"] == "ties"
        headers, rows = rules.score_rows(merged)
        assert [r[0] for r in rows] == ["embed", "block.0", "block.1", "head"]
        assert all(0.5 <= r[2] < 1 and r[1] + r[2] == pytest.approx(1, abs=1e-3) for r in rows)
        assert merged.lambdas == [pytest.approx({r[0]: r[2] for r in rows}, abs=1e-4)]
        assert "merged in" in merge.summary_markdown(merged) and st.merge_history[-1]["rule"] == "sigmoid"

        def broken(*a, **k):
            raise OSError("disk full")

        monkeypatch.setattr(acm.sigmoid_rule, "merge_with_sigmoid_rule", broken)
        with pytest.raises(OSError):
            rules.run_rule_merge(st, pair[0], pair[1], cal_mode="bundled", samples=4)
        assert st.merged is merged and merged.model is not None
        assert not (st.workspace / "merges" / "merge-02-ties-sigmoid").exists()
        with pytest.raises(InputError, match="θ must be in"):
            rules.run_rule_merge(st, pair[0], pair[1], theta=0, cal_mode="bundled")
    finally:
        st.close()


def test_the_button_is_wired_into_the_merge_tab_and_the_heavy_queue(pair, one_torch_thread):  # noqa: F811
    import app

    demo = app.build_app(prewarm=False)
    deps = {d.api_name: d for d in demo.fns.values() if d.api_name}
    dep = deps["merge_sigmoid"]
    assert dep.concurrency_id == "heavy" and dep.concurrency_limit == 1
    ui = demo.ui
    assert ui.merge.rule.button.value == "Merge with sigmoid rule"
    outputs = {id(o) for o in dep.outputs}
    assert {id(ui.merge.summary), id(ui.merge.report), id(ui.merge.rule.table)} <= outputs
    # The handler itself: the Merge tab's summary / table / report and the rule's own sℓ table.
    st = SessionState()
    try:
        summary, table, report, line, scores = dep.fn(
            st, pair[0], pair[1], "ties", 0.7, 0.7, 0.3, "tensor", 0, 0.7, "labels", "bundled", None, None, None,
            None, 4, 20, 0.1, 32, "auto", "auto", "base", progress=lambda *a, **k: None)
        assert "sigmoid" in summary and "of its delta" in line and report["rule"]["key"] == "sigmoid"
        assert list(scores.columns) == ["layer group", "s", "delta kept (1 − s)"] and len(scores) == 4
        assert len(table) == 4 and st.merged is not None
    finally:
        st.close()
