"""The tabs' declared dependencies (components/steps.py): order check, wiring built from them, notices."""

from __future__ import annotations

import dataclasses

import pytest

from components import steps as plan
from components.state import MergedModel, SessionState


def test_every_step_needs_only_what_an_earlier_step_provides():
    plan.validate(plan.STEPS)


def test_a_step_needing_something_no_earlier_step_provides_is_refused():
    order = list(plan.STEPS)
    export = order.pop(-1)
    order.insert(2, export)                               # Export before Merge
    with pytest.raises(plan.StepOrderError, match=r"step 3 \(Export\) needs a merged model, but only the later "
                                                  r"step Merge provides it"):
        plan.validate(order)
    orphan = plan.Artifact("gold", "a pot of gold")
    broken = [*plan.STEPS[:-1], dataclasses.replace(plan.STEPS[-1], uses=(orphan,))]
    with pytest.raises(plan.StepOrderError, match="needs a pot of gold, but no step provides it"):
        plan.validate(broken)
    with pytest.raises(plan.StepOrderError, match="twice"):
        plan.validate([*plan.STEPS, plan.STEPS[0]])


def test_the_app_builds_its_tabs_and_wiring_from_the_declarations():
    import app

    assert [t for t, _ in app.STEPS] == [f"{n} · {s.title}" for n, s in enumerate(plan.STEPS, 1)]
    assert [m.__name__ for _, m in app.STEPS] == [f"components.{s.key}" for s in plan.STEPS]
    demo = app.build_app(prewarm=False)
    ui = demo.ui
    assert list(ui.tabs) == [s.key for s in plan.STEPS]
    for s in plan.STEPS:                                      # each provider left the events consumers chain on
        for art in s.provides:
            if art.event_attr and plan.provider(art) is s:
                assert plan.events(ui, art), (s.key, art.key)
    # A step wired before its provider fails loudly instead of never updating.
    with pytest.raises(plan.StepOrderError, match="used before Merge was wired"):
        plan.events(object(), plan.MERGED)


def test_opening_a_tab_without_its_prerequisite_says_where_to_get_it(tmp_path):
    state = SessionState()
    try:
        assert plan.notice(state, "export") == "⚠ Export needs a merged model: run **Merge** in step 4 first."
        assert plan.notice(state, "chat") == ""               # chat works with the source models alone
        state.merged = MergedModel(1, "#1", tmp_path, {}, {}, None, 0.1)
        assert plan.notice(state, "export") == ""
    finally:
        state.close()


def test_step_references_in_messages_follow_the_declared_order():
    from components import chat, merge

    assert plan.how_to_get(plan.ANALYSIS) == "run **Analyse** in step 3 first"
    assert f"step {plan.number('merge')}" in chat.NO_MERGE_YET
    assert plan.how_to_get(plan.ANALYSIS) in merge.acm_status_line(SessionState())
    reordered = [plan.STEPS[i] for i in (1, 0, 2, 3, 4, 5, 6, 7)]
    assert plan.how_to_get(plan.ANALYSIS, reordered) == "run **Analyse** in step 3 first"
    assert plan.links(["chat", "evaluate"]) == "**5 · Chat** and **6 · Evaluate**"
