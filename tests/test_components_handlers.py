"""Event handlers of the app: plain values + a SessionState in, plain values out (no server needed)."""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from acm.errors import CompatibilityError, InputError
from components import calibration, chat, common, evaluate, export, models
from components.state import MergedModel, ModelCache, SessionState
from tests.fixtures import (
    make_pair,
    make_tiny_model,
    uploads_from_pytest_tmp,  # noqa: F401 - module autouse fixture (Gradio upload area)
    write_calibration,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base, fts = make_pair(root, "llama", n_ft=2)
    return str(base), [str(f) for f in fts]


@pytest.fixture()
def state():
    st = SessionState()
    yield st
    st.close()


# ----------------------------------------------------------------------------- state


def test_state_deepcopy_gives_each_session_a_fresh_state():
    st = SessionState()
    st.fts = ["x"]
    st.eval_points.append({"label": "a"})
    fresh = copy.deepcopy(st)
    assert fresh is not st and fresh.fts == [] and fresh.eval_points == []


def test_state_workspace_lifecycle_and_merge_swap(tmp_path):
    st = SessionState()
    ws = st.workspace
    assert ws.is_dir() and st.subdir("merges").is_dir()
    (ws / "merges" / "m1").mkdir()
    (ws / "merges" / "m2").mkdir()
    a = MergedModel(1, "#1", ws / "merges" / "m1", {}, {}, None, 0.1, model=object(), tokenizer=object())
    b = MergedModel(2, "#2", ws / "merges" / "m2", {}, {}, None, 0.1, model=object(), tokenizer=object())
    c = MergedModel(3, "#3", tmp_path, {}, {}, None, 0.1, model=object(), tokenizer=object())
    st.set_merged(a)
    st.set_merged(b)
    assert st.merged is b and a.model is None and b.model is not None
    assert not a.out_dir.exists() and b.out_dir.exists()          # one merged model on disk per session
    st.set_merged(c)
    assert tmp_path.exists()                                       # never deletes outside the workspace
    st.close()
    assert not ws.exists() and st.merged is None


def test_model_cache_loads_once_and_evicts_lru():
    cache = ModelCache(max_items=2)
    calls = []

    def loader(name):
        return lambda: calls.append(name) or (name, name)

    assert cache.get(("a",), loader("a")) == ("a", "a")
    cache.get(("a",), loader("a"))
    cache.get(("b",), loader("b"))
    cache.get(("c",), loader("c"))
    assert calls == ["a", "b", "c"]
    assert ("a",) not in cache and ("c",) in cache


# ----------------------------------------------------------------------------- errors


def test_ui_errors_turns_library_errors_into_one_line_messages():
    def bad():
        raise CompatibilityError("layer count differs: base has 2, fine-tuned has 3")

    with pytest.raises(gr.Error) as info:
        common.ui_errors(bad)()
    assert info.value.message == "layer count differs: base has 2, fine-tuned has 3"

    def boom():
        raise ValueError("shape mismatch\nlong traceback text")

    with pytest.raises(gr.Error) as info:
        common.ui_errors(boom)()
    assert info.value.message == "unexpected ValueError: shape mismatch"

    def gen():
        yield 1
        raise InputError("stream failed")

    wrapped = common.ui_errors(gen)
    it = wrapped()
    assert next(it) == 1
    with pytest.raises(gr.Error, match="stream failed"):
        next(it)


def test_ui_errors_keeps_signature_for_progress_injection():
    import inspect

    def handler(a, b, progress=gr.Progress()):
        return a

    assert list(inspect.signature(common.ui_errors(handler)).parameters) == ["a", "b", "progress"]


def test_progress_callback_maps_into_span():
    seen = []
    cb = common.progress_callback(lambda f, desc="": seen.append((round(f, 3), desc)), (0.5, 1.0))
    cb(0.0, "start")
    cb(1.0, "end")
    cb(2.0, "clamped")
    assert seen == [(0.5, "start"), (1.0, "end"), (1.0, "clamped")]


def test_gpu_decorator_is_a_noop_without_spaces():
    f = common.gpu(60)(lambda x: x + 1)
    assert f(1) == 2


def test_short_and_unique_labels(tmp_path):
    (tmp_path / "a" / "m").mkdir(parents=True)
    (tmp_path / "b" / "m").mkdir(parents=True)
    assert common.short_name("org/model") == "org/model"
    assert common.unique_labels([str(tmp_path / "a" / "m"), str(tmp_path / "b" / "m")]) == ["m (1)", "m (2)"]


# ----------------------------------------------------------------------------- models


def test_scan_and_default_models(tmp_path):
    make_tiny_model(tmp_path / "tiny-math-base")
    make_tiny_model(tmp_path / "tiny-math-long", seed=1)
    (tmp_path / "not-a-model").mkdir()
    choices = models.scan_demo_models(tmp_path)
    assert [c[0] for c in choices] == ["tiny-math-base", "tiny-math-long"]
    base, fts = models.default_models(choices)
    assert base.endswith("tiny-math-base") and fts == [str(tmp_path / "tiny-math-long")]
    assert models.default_models([]) == (None, [])
    assert models.scan_demo_models(tmp_path / "missing") == []


@pytest.mark.parametrize("base,fts,msg", [
    ("", ["x"], "choose a base model"),
    ("b", [], "at least one fine-tuned"),
    ("b", ["1", "2", "3", "4"], "at most 3"),
    ("b", ["b"], "also listed as fine-tuned"),
    ("b", ["x", "x"], "listed twice"),
])
def test_validate_selection_errors(base, fts, msg):
    with pytest.raises(InputError, match=msg):
        models.validate_selection(base, fts)


def test_check_models_reports_layers_and_parameters(state, pair):
    base, fts = pair
    md = models.check_models(state, base, fts[:1])
    assert "Compatible" in md and "2 layers" in md and "4 layer groups" in md
    assert md.count("| fine-tuned") == 1 and "K |" in md
    assert state.base == base and state.fts == fts[:1] and state.compat["num_layers"] == 2


def test_check_models_incompatible_is_a_readable_error(state, pair, tmp_path):
    other = make_tiny_model(tmp_path / "three-layers", num_hidden_layers=3)
    with pytest.raises(CompatibilityError, match="layer count"):
        models.check_models(state, pair[0], [str(other)])
    with pytest.raises(gr.Error, match="layer count"):
        common.ui_errors(models.check_models)(state, pair[0], [str(other)])


# ----------------------------------------------------------------------------- calibration


def test_resolve_calibration_modes(tmp_path):
    f = write_calibration(tmp_path / "cal.jsonl", n=6)
    bundled = calibration.resolve_calibration(calibration.BUNDLED)
    assert bundled["field"] is None and bundled["label"] == "bundled demo set"
    up = calibration.resolve_calibration(calibration.UPLOAD, str(f), field="text")
    assert up["source"] == str(f) and up["field"] == "text" and up["identity"][0] == str(f)
    hub = calibration.resolve_calibration(calibration.HUB, hub_id="simplescaling/s1K", split="train", field="")
    assert hub["source"] == "hub:simplescaling/s1K" and hub["field"] is None
    with pytest.raises(InputError, match="upload a calibration file"):
        calibration.resolve_calibration(calibration.UPLOAD, None)
    with pytest.raises(InputError, match="unsupported"):
        calibration.resolve_calibration(calibration.UPLOAD, str(tmp_path / "x.parquet"))
    with pytest.raises(InputError, match="Hub dataset id"):
        calibration.resolve_calibration(calibration.HUB, hub_id=" ")


def test_calibration_preview_of_an_uploaded_file(tmp_path):
    f = write_calibration(tmp_path / "cal.jsonl", n=9)
    rows, summary = calibration.preview(calibration.UPLOAD, str(f))
    assert len(rows) == calibration.PREVIEW_ROWS and rows[0][0] == 1 and "plus" in rows[0][2]
    assert "**9 texts**" in summary


# ----------------------------------------------------------------------------- chat


def test_chat_streams_every_source_model_and_counts_tokens(state, pair):
    base, fts = pair
    frames = list(chat.chat_stream(state, "what is 2 plus 2?", base, fts, max_new_tokens=6))
    assert len(frames) >= 2
    last = frames[-1]
    histories, lines, fig = last[:5], last[5:10], last[10]
    assert histories[0] == [] and "Merge in step 4" in lines[0]           # no merge yet
    for h in histories[1:4]:                                              # base + 2 fine-tuned
        assert h[0] == {"role": "user", "content": "what is 2 plus 2?"} and h[1]["role"] == "assistant"
    assert histories[4] == []
    for h, slot in zip(histories[1:4], ("base", "ft0", "ft1")):
        col = state.chat[slot]
        assert len(col.lengths) == 1 and 0 <= col.lengths[0] <= 12
        assert h[1]["content"].endswith(f"*— {col.lengths[0]} tokens*")          # length under the reply
        assert "tokens*" not in col.history[1]["content"]                          # the model's history stays clean
    assert "last reply" in lines[1]
    assert len(fig.data) == 1 and len(fig.data[0]["x"]) == 3

    assert chat.retry_last(state) == "what is 2 plus 2?"
    assert all(c.history == [] and c.lengths == [] for c in state.chat.values())
    with pytest.raises(InputError, match="nothing to retry"):
        chat.retry_last(state)
    with pytest.raises(InputError, match="type a message"):
        next(chat.chat_stream(state, "  ", base, fts))


def test_chat_includes_the_merged_model_and_resets_its_column_on_a_new_merge(state, pair, tmp_path):
    from components.state import load_source_model

    base, fts = pair
    model, tok = load_source_model(fts[0])
    state.set_merged(MergedModel(1, "#1 TA α=1", Path(fts[0]), {}, {"fts": fts[:1]}, None, 0.1, model, tok))
    active = chat.targets(state, base, fts[:1])
    assert [a[0] for a in active] == ["merged", "base", "ft0"]
    *_, last = chat.chat_stream(state, "hi", base, fts[:1], max_new_tokens=3)
    assert last[0][1]["role"] == "assistant" and len(state.chat["merged"].lengths) == 1
    state.set_merged(MergedModel(2, "#2 TA α=0.5", Path(fts[0]), {}, {"fts": fts[:1]}, None, 0.1, model, tok))
    *_, last = chat.chat_stream(state, "again", base, fts[:1], max_new_tokens=3)
    assert len(last[0]) == 2 and len(last[1]) == 4      # merged restarted, base kept its history
    chat.clear(state)
    assert state.chat == {}


# ----------------------------------------------------------------------------- evaluate


@pytest.fixture()
def eval_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [{"question": f"what is {i} plus {i}?", "answer": str(2 * i), "level": 1 + i % 2} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_evaluate_sources_are_cached_and_points_accumulate(state, pair, eval_file, monkeypatch):
    import acm.evaluation.evaluate as ev

    base, fts = pair
    calls = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda models, *a, **k: calls.append([m[0] for m in models]) or
                        real(models, *a, **k))
    res = evaluate.run_eval(state, base, fts[:1], data_mode=evaluate.UPLOAD, upload=str(eval_file), limit=3,
                            max_new_tokens=4, batch_size=4)
    assert res["n"] == 3 and [m["kind"] for m in res["models"]] == ["base", "fine-tuned"]
    for m in res["models"]:
        assert {"accuracy", "mean_length", "n", "per_level"} <= set(m)
    assert len(state.eval_points) == 2
    evaluate.run_eval(state, base, fts[:1], data_mode=evaluate.UPLOAD, upload=str(eval_file), limit=3,
                      max_new_tokens=4, batch_size=4)
    assert len(calls) == 1 and len(state.eval_points) == 2               # cached, not duplicated
    overall, per_level, headers = evaluate.tables(res)
    assert len(overall) == 2 and len(overall[0]) == len(evaluate.OVERALL_HEADERS)
    assert [r[0] for r in per_level] == ["1", "2"] and len(headers) == 4 and len(per_level[0]) == 4
    assert "% · " in per_level[0][2]
    fig = evaluate.scatter(state)
    assert sum(len(t["x"]) for t in fig.data) == 2
    with pytest.raises(InputError, match="upload a .jsonl"):
        evaluate.run_eval(state, base, fts[:1], data_mode=evaluate.UPLOAD, upload=None)


# ----------------------------------------------------------------------------- export


def _fake_merge(state: SessionState, folder: Path) -> MergedModel:
    merged = MergedModel(1, "#1 TA α=1", folder, {"bytes_written": 10, "out_dir": str(folder)},
                         {"base": "b", "fts": ["f"], "method": "task_arithmetic", "acm": False, "t": None,
                          "alpha": 1.0, "density": 0.2, "clip": None}, [{"embed": 1.0}], 0.1)
    state.set_merged(merged)
    return merged


def test_export_zip_recipe_and_charts(state, tmp_path):
    from components import plots

    with pytest.raises(InputError, match="nothing to export yet: run “Merge” in step 4 first"):
        export.export_model_zip(state)
    folder = make_tiny_model(tmp_path / "merge-01-task_arithmetic")
    (folder / "README.md").write_text("# model card\n")
    _fake_merge(state, folder)
    zpath = export.export_model_zip(state)
    names = zipfile.ZipFile(zpath).namelist()
    assert "merge-01-task_arithmetic/README.md" in names
    assert any(n.endswith(".safetensors") for n in names)
    rec = export.recipe_dict(state)
    assert json.dumps(rec) and (rec.get("app") or rec)["label" if "label" in rec else "app"]
    state.figures["nmi"] = plots.empty_figure("x")
    charts = export.export_plots(state)
    assert charts[0].endswith("merge-01-task_arithmetic.charts.html")
    page = Path(charts[0]).read_text()
    assert "<html" in page[:500].lower() and 'id="chart-nmi"' in page


def test_export_charts_on_one_page_with_plotly_once(state):
    """Five charts → one self-contained page: plotly.js inlined exactly once, every chart's div, and the
    size of about one plotly bundle plus the data (it was five standalone files of ~4.6 MB each)."""
    from plotly.offline import get_plotlyjs

    from components import plots

    groups = ["embed", "block.0", "block.1", "head"]
    nmi = [("ft", [0.2, 0.4, 0.5, 0.3])]
    state.figures.update({
        "nmi": plots.nmi_figure(groups, nmi),
        "coefficients": plots.coefficient_figure(groups, [{"label": "ft", "nmi": nmi[0][1],
                                                           "lambdas": [0.9, 0.8, 0.7, 0.85]}], t=4, alpha=1.0),
        "chat_lengths": plots.length_bar_figure(["merged", "base"], [40.0, 90.0], [3, 3], ["#7048e8", "#868e96"]),
        "eval_scatter": plots.eval_scatter([{"label": "base", "kind": "base", "accuracy": 0.5, "mean_length": 90,
                                             "n": 8}]),
        "empty": plots.empty_figure("nothing yet"),
    })
    files = export.export_plots(state)
    pages = [f for f in files if f.endswith(".html")]
    assert len(pages) == 1 and Path(pages[0]).name == "session.charts.html"      # no merge yet
    page = Path(pages[0]).read_text(encoding="utf-8")
    bundle = get_plotlyjs()
    assert page.count(bundle) == 1
    assert page.count("plotly.js v") == 1                       # the bundle's banner: no second (CDN) copy either
    for key in state.figures:                                   # each chart: its div and the call that draws it
        assert f'<div id="chart-{key}"' in page and page.count(f'"chart-{key}"') >= 2, key
    size = Path(pages[0]).stat().st_size
    assert len(bundle) < size < len(bundle) + 200_000, size
    assert not list(Path(pages[0]).parent.glob("*.part"))


def test_push_to_hub_uses_the_token_once_and_never_keeps_it(state, tmp_path, monkeypatch):
    import huggingface_hub

    folder = make_tiny_model(tmp_path / "merged")
    _fake_merge(state, folder)
    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            seen["token"] = token

        def create_repo(self, repo_id, **kw):
            seen["repo"] = (repo_id, kw.get("private"))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, repo_id, folder_path, **kw):
            seen["folder"] = folder_path

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    md = export.push_to_hub(state, "hf_secret", "me/merged", True)
    assert "me/merged" in md and seen == {"token": "hf_secret", "repo": ("me/merged", True), "folder": str(folder)}
    assert "hf_secret" not in json.dumps(vars(state), default=str)
    with pytest.raises(InputError, match="token"):
        export.push_to_hub(state, " ", "me/merged")
    with pytest.raises(InputError, match="user/model-name"):
        export.push_to_hub(state, "hf_x", "no-namespace")


# ----------------------------------------------------------------------------- analysis + merge


@pytest.fixture(scope="module")
def analysed(pair, tmp_path_factory):
    """One real (tiny) analysis shared by the analysis/merge handler tests."""
    from components import analysis

    cal = write_calibration(tmp_path_factory.mktemp("cal") / "cal.jsonl", n=12)
    st = SessionState()
    out = analysis.run_analysis(st, pair[0], pair[1][:1], cal_mode=calibration.UPLOAD, cal_upload=str(cal),
                                samples=6, clusters=2, max_tokens=32)
    yield st, out, str(cal)
    st.close()


def test_analysis_is_cached_per_models_calibration_and_settings(analysed, pair, monkeypatch):
    import acm.activations.analysis
    from components import analysis

    st, out, cal = analysed
    assert not out["cached"] and st.analysis is out["analysis"]
    assert st.analysis.groups == ["embed", "block.0", "block.1", "head"]
    class Reanalysed(Exception):
        pass

    def refuse(*a, **k):
        raise Reanalysed("re-analysed")

    monkeypatch.setattr(acm.activations.analysis, "analyze", refuse)
    again = analysis.run_analysis(st, pair[0], pair[1][:1], cal_mode=calibration.UPLOAD, cal_upload=cal, samples=6,
                                  clusters=2, max_tokens=32)
    assert again["cached"] and again["analysis"] is out["analysis"]
    md = analysis.summary_markdown(again["analysis"], cached=True)
    assert "session cache" in md and "mean NMI" in md
    with pytest.raises(Reanalysed):    # another setting does run the analysis
        analysis.run_analysis(st, pair[0], pair[1][:1], cal_mode=calibration.UPLOAD, cal_upload=cal, samples=5,
                              clusters=2, max_tokens=32)


def test_coefficient_view_and_analysis_json_round_trip(analysed, tmp_path):
    from components import analysis

    st, out, _ = analysed
    empty = SessionState()
    fig, multi, table = analysis.coefficient_view(empty, 4.0, 1.0, rule="softmax")
    assert table == {} and fig.data == [] and "Analyse" in fig.layout["annotations"][0]["text"]

    fig0, _, t0 = analysis.coefficient_view(st, 0.0, 0.7, rule="softmax")       # this project's rule
    fig8, multi8, t8 = analysis.coefficient_view(st, 8.0, 0.7, rule="softmax")
    lam0 = [g["lambda"] for g in t0["models"][0]["groups"]]
    lam8 = [g["lambda"] for g in t8["models"][0]["groups"]]
    assert lam0 == pytest.approx([0.7] * 4) and lam8 != pytest.approx(lam0)
    assert sum(lam8) / 4 == pytest.approx(0.7)
    assert fig8.data[1]["y"] == pytest.approx(lam8) and len(multi8.data) == len(analysis.T_GRID)
    _, _, clipped = analysis.coefficient_view(st, 8.0, 0.7, "0.6", "0.8")
    assert all(0.6 - 1e-9 <= g["lambda"] <= 0.8 + 1e-9 for g in clipped["models"][0]["groups"])
    with pytest.raises(InputError, match="larger than"):
        analysis.coefficient_view(st, 8.0, 0.7, "2", "1")
    with pytest.raises(InputError, match="not a number"):
        analysis.coefficient_view(st, 8.0, 0.7, "abc", "")

    path = tmp_path / "uploaded_analysis.json"            # as if downloaded, then uploaded again
    path.write_text(Path(analysis.save_analysis(st)).read_text())
    fresh = SessionState()
    loaded = analysis.load_analysis_file(fresh, str(path))
    assert loaded.groups == st.analysis.groups and fresh.analysis is loaded
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(InputError, match="not an ACM analysis"):
        analysis.load_analysis_file(fresh, str(bad))


def test_merge_acm_then_failed_merge_keeps_the_previous_model(analysed, pair, monkeypatch):
    import acm.merging.engine
    from components import merge

    st, _, _ = analysed
    merged = merge.run_merge(st, pair[0], pair[1][:1], method="ties", mode=merge.ACM, t=8.0, alpha=1.0, density=0.5,
                             rule="softmax")
    assert st.merged is merged and merged.out_dir.is_dir() and merged.model is not None
    assert merged.out_dir.parent == st.workspace / "merges"
    assert merged.label == "#1 TIES softmax t=8 α=1" and set(merged.lambdas[0]) == set(st.analysis.groups)
    headers, rows = merge.lambda_rows(merged, st.analysis.groups)
    assert [r[0] for r in rows] == st.analysis.groups and len(headers) == 2
    assert "merged in" in merge.summary_markdown(merged)

    monkeypatch.setattr(acm.merging.engine, "merge_models", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        merge.run_merge(st, pair[0], pair[1][:1], method="task_arithmetic", mode=merge.PLAIN, alpha=0.5)
    assert st.merged is merged and merged.model is not None            # still usable for chat / eval
    assert not (st.workspace / "merges" / "merge-02-task_arithmetic").exists()


def test_merge_input_errors(pair):
    from components import merge

    st = SessionState()
    with pytest.raises(InputError, match="run “Analyse”"):
        merge.run_merge(st, pair[0], pair[1][:1], mode=merge.ACM)
    with pytest.raises(InputError, match="linear averaging"):
        merge.run_merge(st, pair[0], pair[1][:1], method="linear", mode=merge.ACM)
    with pytest.raises(InputError, match="unknown merge method"):
        merge.run_merge(st, pair[0], pair[1][:1], method="magic", mode=merge.PLAIN)
    st.close()


def test_plain_linear_merge_and_export_recipe(pair, tmp_path):
    from components import merge

    st = SessionState()
    merged = merge.run_merge(st, pair[0], pair[1], method="linear", mode=merge.PLAIN)
    assert merged.label == "#1 Linear" and (merged.out_dir / "README.md").is_file()
    rec = export.recipe_dict(st)
    assert json.dumps(rec) and rec.get("app", {}).get("label") == "#1 Linear"
    files, summary = export.export_all(st, include_model=True)
    assert any(f.endswith(".zip") for f in files) and any(f.endswith(".recipe.json") for f in files)
    assert "no mergekit YAML" in summary
    st.close()


def test_api_friendly_aliases():
    from components import merge

    assert merge.normalize_mode("acm") == merge.ACM and merge.normalize_mode("Plain") == merge.PLAIN
    assert merge.normalize_mode(None) == merge.ACM
    with pytest.raises(InputError, match="unknown coefficient mode"):
        merge.normalize_mode("fancy")
    assert merge.METHOD_ALIASES["ta"] == "task_arithmetic" and merge.METHOD_ALIASES["dare-ties"] == "dare_ties"
    assert calibration.resolve_calibration("hub", hub_id="a/b")["source"] == "hub:a/b"   # never a local path
    assert calibration.resolve_calibration("bundled")["label"] == "bundled demo set"


def test_dare_exports_write_the_drop_rate_as_mergekits_density(analysed, pair):
    """The exported YAML reproduces the merge: DARE-TA keeps 1 − p; DARE-TIES with a magnitude trim says
    plainly that mergekit cannot express it (it used to write the TIES density as the keep fraction)."""
    import yaml

    from components import merge

    st, _, _ = analysed
    merge.run_merge(st, pair[0], pair[1][:1], method="dare_ta", mode=merge.ACM, t=2.0, alpha=1.0, drop_rate=0.4)
    cfg = yaml.safe_load(export.mergekit_yaml(st))
    assert cfg["merge_method"] == "dare_linear"
    assert [m["parameters"]["density"] for m in cfg["models"]] == pytest.approx([0.6])
    merge.run_merge(st, pair[0], pair[1][:1], method="dare_ties", mode=merge.ACM, t=2.0, alpha=1.0, drop_rate=0.4,
                    density=0.7)
    assert export.mergekit_yaml(st).startswith("# ACM (Activation-Guided Consensus Merging): NO mergekit config")
