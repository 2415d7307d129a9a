"""The paper's rule's staged variants in the app (components/rules.py via acm.merging.rule_merge): handler in-process,
and the old /merge_sigmoid endpoint (now MI against a plain merge · λ on its delta) in the built app."""

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


def test_staged_merge_against_a_plain_merge_sets_the_session_model_and_a_failure_keeps_it(
        pair, monkeypatch, one_torch_thread):  # noqa: F811
    import acm.merging.rule_merge
    from components import calibration, merge, rules

    st = SessionState()
    try:
        cal = calibration.resolve_calibration("bundled")
        merged = merge.run_merge(st, pair[0], pair[1], method="ties", alpha=0.7, density=0.7, t=0.7,
                                 against="merged", applies="merged-delta", estimator="binned", calibration=cal,
                                 cal_settings={"samples": 4, "max_tokens": 32})
        assert st.merged is merged and merged.model is not None
        assert merged.out_dir.parent == st.workspace / "merges"
        assert merged.out_dir.name.endswith("-acm-merged-merged-delta")
        assert merged.label == "#1 ACM-TIES t=0.7 vs merged · merged delta α=0.7"
        rec = json.loads((merged.out_dir / "acm_recipe.json").read_text())
        entry = rec["acm_analysis"]
        assert entry["rule"] == "acm" and entry["against"] == "merged" and entry["applies"] == "merged-delta"
        assert entry["estimator"] == "binned" and rec["method"] == "ties"
        headers, rows = merge.lambda_rows(merged)
        assert headers == ["layer group", "λ (all models)"]
        assert [r[0] for r in rows] == ["embed", "block.0", "block.1", "head.norm", "head"]
        assert all(0.5 <= r[1] < 1 for r in rows)                     # t > 0: λ ∈ [½, 1)
        line = rules.stage_line(merged)
        assert "plain merge" in line and "MI base vs merged" in line and "apply λ" in line
        assert st.merge_history[-1]["against"] == "merged"

        def broken(*a, **k):
            raise OSError("disk full")

        monkeypatch.setattr(acm.merging.rule_merge, "merge_with_rule", broken)
        with pytest.raises(OSError):
            merge.run_merge(st, pair[0], pair[1], against="merged", applies="merged-delta", calibration=cal)
        assert st.merged is merged and merged.model is not None
        assert not (st.workspace / "merges" / "merge-02-ties-acm-merged-merged-delta").exists()
    finally:
        st.close()


def test_switch_and_t_validation_messages(pair):
    from components import merge, rules

    st = SessionState()
    try:
        with pytest.raises(InputError, match="MI against must be one of fine-tuned, merged"):
            merge.run_merge(st, pair[0], pair[1], against="both")
        with pytest.raises(InputError, match="λ applies to must be one of task-vectors, merged-delta"):
            merge.run_merge(st, pair[0], pair[1], applies="everything")
        with pytest.raises(InputError, match=r"t must be in \[-3, 3\].*rule='softmax'"):
            merge.run_merge(st, pair[0], pair[1], t=8)
        with pytest.raises(InputError, match="needs calibration text"):
            merge.run_merge(st, pair[0], pair[1], against="merged")
        with pytest.raises(InputError, match="run “Analyse”"):                 # the paper's setting reads the analysis
            merge.run_merge(st, pair[0], pair[1])
        with pytest.raises(InputError, match="run “Analyse”"):                 # so does its merged-delta variant
            merge.run_merge(st, pair[0], pair[1], applies="merged-delta")
    finally:
        st.close()
    assert rules.switches("sigmoid", "fine-tuned", "task-vectors") == ("merged", "merged-delta")
    assert rules.switches(None, None, None) == ("fine-tuned", "task-vectors")
    assert not rules.uses_alpha("acm", "fine-tuned", "task-vectors")
    assert rules.uses_alpha("acm", "merged", "task-vectors") and rules.uses_alpha("softmax", "fine-tuned",
                                                                                  "task-vectors")
    assert "no α" in rules.note("acm", "fine-tuned", "task-vectors")


def test_coefficient_controls_show_the_switches_for_the_paper_rule_only():
    from components import merge

    rule, panel, estimator, t, alpha, note = merge.coefficient_controls("ties", "acm", "acm", "fine-tuned",
                                                                        "task-vectors")
    assert rule["visible"] and panel["visible"] and t["visible"] and not alpha["visible"]
    assert not estimator["visible"] and "no α" in note["value"]
    _, panel, estimator, _, alpha, note = merge.coefficient_controls("ties", "acm", "acm", "merged", "merged-delta")
    assert panel["visible"] and estimator["visible"] and alpha["visible"] and "Staged" in note["value"]
    _, panel, _, t, alpha, note = merge.coefficient_controls("ties", "acm", "softmax", "fine-tuned", "task-vectors")
    assert not panel["visible"] and t["visible"] and alpha["visible"] and alpha["label"] == "α (mean λ)"
    rule, panel, _, t, alpha, _ = merge.coefficient_controls("ties", "plain", "acm", "fine-tuned", "task-vectors")
    assert not rule["visible"] and not panel["visible"] and not t["visible"] and alpha["visible"]


def test_the_old_sigmoid_endpoint_is_wired_into_the_heavy_queue_and_runs_the_rule(pair, one_torch_thread):  # noqa: F811
    import app

    demo = app.build_app(prewarm=False)
    deps = {d.api_name: d for d in demo.fns.values() if d.api_name}
    dep = deps["merge_sigmoid"]
    assert dep.concurrency_id == "heavy" and dep.concurrency_limit == 1
    ui = demo.ui
    assert ui.merge.rule.button.visible is False              # one sigmoid rule in the UI: the Merge button's
    outputs = {id(o) for o in dep.outputs}
    assert {id(ui.merge.summary), id(ui.merge.table), id(ui.merge.report)} <= outputs and len(dep.outputs) == 5
    st = SessionState()
    try:
        summary, table, report, line, scores = dep.fn(
            st, pair[0], pair[1], "ties", 0.7, 0.7, 0.3, "tensor", 0, 0.7, "labels", "bundled", None, None, None,
            None, 4, 20, 0.1, 32, "auto", "auto", "base", progress=lambda *a, **k: None)
        assert "vs merged · merged delta" in summary and "stages:" in line
        assert report["settings"]["against"] == "merged" and report["settings"]["applies"] == "merged-delta"
        assert len(table) == 5 and len(scores) == 5 and st.merged is not None
    finally:
        st.close()
