"""acm.tune / ``acm tune``: grids, bad grids, frontier + objectives, holdout split, streamed and resumable runs.

Runs use the bundled 0.7M demo pair with a handful of problems and few new tokens, and a
hand-made analysis (the analysis is an input of the tune; its own tests live in test_analysis).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from acm.errors import InputError
from acm.tune import (
    MAX_SETTINGS,
    Setting,
    TuneOptions,
    build_report,
    expand_grid,
    iter_tune,
    pareto_front,
    read_results,
    recommend,
    run_tune,
    split_rows,
)

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "assets" / "demo-models" / "tiny-math-base"
LONG = REPO / "assets" / "demo-models" / "tiny-math-long"
needs_demo = pytest.mark.skipif(not (BASE / "config.json").is_file() or not (LONG / "config.json").is_file(),
                                reason="bundled demo models missing")


@pytest.fixture(scope="module")
def analysis_file(tmp_path_factory) -> Path:
    """An analysis of the demo pair with NMI falling with depth (as the real one does)."""
    from acm.activations.result import AnalysisResult, ModelNMI

    groups = ["embed"] + [f"block.{i}" for i in range(6)] + ["head"]
    nmi = [0.48, 0.25, 0.25, 0.23, 0.22, 0.20, 0.15, 0.24]
    res = AnalysisResult(groups=groups, models=[ModelNMI(model=str(LONG), nmi=nmi, mi=nmi)],
                         provenance={"note": "hand-made for tests"})
    path = tmp_path_factory.mktemp("an") / "analysis.json"
    res.save(path)
    return path


# ----------------------------------------------------------------------------- grid


def test_default_grid_is_plain_plus_the_papers_rule():
    grid = expand_grid(["ties"], [0.7], None, [0.7])
    assert [s.t for s in grid] == [None, -1.0, 0.5, 0.7, 0.9] and all(s.paper for s in grid[1:])
    assert grid[0].label() == "TIES (α=0.7, d=0.7)" and grid[3].label() == "ACM-TIES (d=0.7, t=0.7)"
    assert grid[3].key() == "ties|a=-|t=0.7|d=0.7|p=-|r=acm|vs=fine-tuned|on=task-vectors"


def test_softmax_grid_is_plain_plus_softmax_and_t0_is_not_run_twice():
    grid = expand_grid(["ties"], [0.7], [0, 0.5, 1, 2, 4], [0.7], rules=["softmax"])
    assert [s.t for s in grid] == [None, 0.5, 1.0, 2.0, 4.0] and not any(s.paper for s in grid)
    assert grid[0].label() == "TIES (α=0.7, d=0.7)" and grid[2].label() == "ACM-TIES (α=0.7, d=0.7, t=1, softmax)"
    # without the plain method, t = 0 stays (it is the plain merge under another name)
    assert [s.t for s in expand_grid(["ties"], [0.7], [0, 1], [0.7], plain=False, rules=["softmax"])] == [0.0, 1.0]


def test_grid_covers_methods_and_their_own_knobs():
    grid = expand_grid(["ta", "ties", "dare_ties"], [0.5, 1], [2], [0.2, 0.5], [0.1], rules=["softmax"])
    by = {m: [s for s in grid if s.method == m] for m in ("task_arithmetic", "ties", "dare_ties")}
    assert len(by["task_arithmetic"]) == 2 * 2 and all(s.density is None for s in by["task_arithmetic"])
    assert len(by["ties"]) == 2 * 2 * 2 and all(s.drop_rate is None for s in by["ties"])
    assert len(by["dare_ties"]) == 2 * 2 * 1 * 2
    assert len({s.key() for s in grid}) == len(grid)
    s = by["dare_ties"][1]
    assert Setting.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.merge_options().drop_rate == 0.1 and s.merge_options().density == 0.2


@pytest.mark.parametrize("kwargs, fragment", [
    ({"methods": []}, "at least one method"),
    ({"alphas": []}, "at least one α"),
    ({"ts": [], "plain": False}, "at least one t"),
    ({"ts": [4]}, "t (acm rule) must be in [-3, 3]"),
    ({"ts": [-1], "rules": ["softmax"]}, "t (softmax rule) must be in [0, 100]"),
    ({"ts": [0.7], "rules": ["acm", "softmax"], "softmax_ts": [-2]}, "t (softmax rule) must be in [0, 100]"),
    ({"ts": ["x"]}, "not a number"),
    ({"against": ["sideways"]}, "MI against must be one of fine-tuned, merged"),
    ({"applies": ["everything"]}, "λ applies to must be one of task-vectors, merged-delta"),
    ({"against": []}, "at least one MI-against value"),
    ({"against": ["merged"], "estimators": ["guess"]}, "estimator must be one of labels, binned"),
    ({"metrics": ["cka"]}, "--metrics picks the softmax rule's similarity"),
    ({"rules": ["magic"]}, "unknown coefficient rule"),
    ({"alphas": [0]}, "α must be in (0, 4]"),
    ({"densities": [1.5]}, "density must be in (0, 1]"),
    ({"densities": []}, "need at least one density"),
    ({"methods": ["dare_ta"], "drop_rates": [1.0]}, "drop rate must be in [0, 1)"),
    ({"methods": ["linear"]}, "linear averaging has no task-vector coefficient"),
    ({"methods": ["magic"]}, "unknown method"),
    ({"alphas": [0.1 * i for i in range(1, 40)], "ts": list(range(10)), "rules": ["softmax"]},
     f"maximum of {MAX_SETTINGS}"),
])
def test_bad_grids_give_one_line(kwargs, fragment):
    args = {"methods": ["ties"], "alphas": [0.7], "ts": [1], "densities": [0.7], "drop_rates": [0.3], **kwargs}
    with pytest.raises(InputError) as exc:
        expand_grid(args.pop("methods"), args.pop("alphas"), args.pop("ts"), args.pop("densities"),
                    args.pop("drop_rates"), **args)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("argv, fragment", [
    (["--ts", "4"], "t (acm rule) must be in [-3, 3]"),
    (["--rules", "softmax", "--ts", "-1"], "t (softmax rule) must be in [0, 100]"),
    (["--rules", "acm", "softmax", "--softmax-ts", "-1"], "t (softmax rule) must be in [0, 100]"),
    (["--against", "sideways"], "MI against must be one of fine-tuned, merged"),
    (["--applies", "all"], "λ applies to must be one of task-vectors, merged-delta"),
    (["--metrics", "cka"], "add softmax to the rules"),
    (["--rules", "cosine"], "unknown coefficient rule 'cosine'"),
    (["--thetas", "7"], "t (acm rule) must be in [-3, 3]"),
    (["--alphas", "0.5", "0.6", "0.7", "--ts", "1", "2", "--max-settings", "4"], "5 settings, more than the maximum of 4"),
    (["--rules", "softmax", "--alphas", "0.5", "0.6", "0.7", "--ts", "1", "2", "--max-settings", "4"],
     "9 settings, more than the maximum of 4"),
    (["--methods", "linear"], "linear averaging"),
    (["--holdout", "1.5"], "--holdout must be in [0, 1)"),
    (["--data", "missing.jsonl"], "not found"),
    (["--ray-address", "127.0.0.1:6379"], "--ray-address only apply to --executor ray"),
    (["--executor", "ray", "--keep"], "only the local executor writes to"),
    (["--executor", "ray", "--ray-address", "127.0.0.1:6379", "--ray-cpus", "2"], "--ray-cpus sizes the local cluster"),
])
def test_cli_bad_grid_is_one_line_exit_2(argv, fragment, tmp_path, capsys):
    from acm.cli import main

    code = main(["tune", "--base", str(BASE), "--ft", str(LONG), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("acm tune: error: ") and fragment in err and "\n" not in err


def test_executor_ray_without_ray_installed_is_one_line(tmp_path, capsys, monkeypatch):
    from acm.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)          # `import ray` raises ImportError, as without the extra
    code = main(["tune", "--base", str(BASE), "--ft", str(LONG), "--out", str(tmp_path / "o"), "--executor", "ray"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "needs Ray, which is not installed" in err and "requirements-ray.txt" in err
    assert "\n" not in err and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- frontier, objectives, split


def _pt(key, acc, length):
    return {"key": key, "label": key, "accuracy": acc, "mean_length": length, "setting": {"t": 1.0}}


def test_pareto_front_keeps_only_undominated_points():
    pts = [_pt("a", 0.5, 10), _pt("b", 0.6, 20), _pt("c", 0.55, 25), _pt("d", 0.9, 80), _pt("e", 0.5, 12)]
    assert [p["key"] for p in pareto_front(pts)] == ["a", "b", "d"]


def test_objectives():
    refs = {"base": {"accuracy": 0.5}, "ft": {"accuracy": 0.9}}
    pts = [_pt("short", 0.52, 10), _pt("ok", 0.87, 40), _pt("okshorter", 0.86, 35), _pt("best", 0.95, 90)]
    r = recommend(pts, refs, objective="shortest", tolerance=0.05)
    assert r["key"] == "okshorter" and not r["fallback"] and "≥ 0.850" in r["why"]
    assert recommend(pts, refs, objective="max-accuracy")["key"] == "best"
    assert recommend(pts, refs, objective="acc-per-1k")["key"] == "short"
    fb = recommend(pts, refs, objective="shortest", tolerance=0.0)   # nothing reaches 0.9 but "best"
    assert fb["key"] == "best" and not fb["fallback"]
    fb = recommend(pts[:3], refs, objective="shortest", tolerance=0.0)
    assert fb["fallback"] and fb["key"] == "ok" and "no setting reached" in fb["why"]
    with pytest.raises(InputError, match="unknown objective"):
        recommend(pts, refs, objective="vibes")


def test_holdout_split_is_disjoint_seeded_and_keeps_the_level_mix():
    rows = [{"question": f"q{i}", "answer": str(i), "level": str(1 + i % 5)} for i in range(100)]
    tune, hold = split_rows(rows, holdout=0.5, limit=40, seed=3)
    assert len(tune) == 20 and len(hold) == 20
    assert not {r["question"] for r in tune} & {r["question"] for r in hold}
    for part in (tune, hold):
        assert sorted({r["level"] for r in part}) == ["1", "2", "3", "4", "5"]
    assert split_rows(rows, holdout=0.5, limit=40, seed=3) == (tune, hold)
    assert split_rows(rows, holdout=0.5, limit=40, seed=4) != (tune, hold)
    assert split_rows(rows, holdout=0.0, limit=7)[1] == []
    with pytest.raises(InputError, match="cannot be split"):
        split_rows(rows[:1], holdout=0.5)


# ----------------------------------------------------------------------------- runs


@needs_demo
def test_run_streams_records_writes_frontier_and_holdout_report(tmp_path, analysis_file):
    grid = expand_grid(["ties"], [0.7], [1, 4], [0.7], rules=["softmax"])
    seen = []
    run_tune(str(BASE), [str(LONG)], tmp_path, grid, limit=8, holdout=0.5, analysis=analysis_file,
             max_new_tokens=24, batch_size=8, show_progress=False, on_record=lambda r: seen.append(r["kind"]))
    # records stream in order: references on both splits, every setting, then the held-out check
    assert seen == ["reference"] * 4 + ["setting"] * 3 + ["holdout", "report"]
    lines = read_results(tmp_path / "tune.jsonl")
    assert lines[0]["kind"] == "run" and [r["kind"] for r in lines[1:]] == seen[:-1]
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert saved["complete"] and saved["done"] == 3 and saved["n_tune"] == 4 and saved["n_holdout"] == 4
    rec = saved["recommended"]
    assert rec["key"] in {s.key() for s in grid} and rec["holdout"]["n"] == 4
    assert set(saved["frontier"]) <= {s.key() for s in grid} and saved["frontier"]
    assert set(saved["references"]) == {"base", "ft"} and "holdout" in saved["references"]["base"]
    md = (tmp_path / "frontier.md").read_text()
    assert "**Recommended:" in md and "held-out" in md.lower()
    assert not list(tmp_path.glob(".tmp-merges-*")) and not list(tmp_path.glob("merge-*"))   # nothing left
    # a second run with the same settings finds everything done and evaluates nothing
    again = []
    run_tune(str(BASE), [str(LONG)], tmp_path, grid, limit=8, holdout=0.5, analysis=analysis_file,
             max_new_tokens=24, batch_size=8, show_progress=False, on_record=lambda r: again.append(r["kind"]))
    assert again == ["resumed", "report"]
    # other data / settings in the same folder: one clear line, unless --restart
    with pytest.raises(InputError, match="holds a tune run with other models"):
        run_tune(str(BASE), [str(LONG)], tmp_path, grid, limit=6, analysis=analysis_file, max_new_tokens=24,
                 show_progress=False)


@needs_demo
def test_budget_and_should_stop_end_cleanly(tmp_path, analysis_file):
    grid = expand_grid(["ta"], [0.7], [1, 2], [], rules=["softmax"])
    calls = []

    def stop_after_one():
        calls.append(1)
        return len(calls) > 1
    report = run_tune(str(BASE), [str(LONG)], tmp_path / "a", grid, limit=4, holdout=0.0, analysis=analysis_file,
                      max_new_tokens=8, show_progress=False, should_stop=stop_after_one)
    assert report["stopped"] == "cancelled" and report["done"] == 1 and not report["complete"]
    report = run_tune(str(BASE), [str(LONG)], tmp_path / "b", grid, limit=4, holdout=0.0, analysis=analysis_file,
                      max_new_tokens=8, show_progress=False, budget_minutes=1e-6)
    assert report["stopped"] == "budget" and report["done"] == 0
    assert "0 of 3 settings done (stopped: budget)" in (tmp_path / "b" / "frontier.md").read_text()


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("kwargs, fragment", [
    ({"objective": "longest"}, "unknown objective 'longest'"),
    ({"tolerance": 1.5}, "--tolerance must be in [0, 1]"),
    ({"tolerance": float("nan")}, "--tolerance must be in [0, 1]"),
    ({"budget_minutes": 0}, "--budget-minutes must be > 0"),
    ({"max_new_tokens": 0}, "max new tokens and batch size must be >= 1"),
    ({"batch_size": 0}, "max new tokens and batch size must be >= 1"),
    ({"engine": "magic"}, "unknown engine 'magic'"),
])
def test_tune_options_give_the_same_one_line_errors_as_keywords(kwargs, fragment, tmp_path):
    with pytest.raises(InputError) as by_options:
        TuneOptions(**kwargs).validate()
    with pytest.raises(InputError) as by_keywords:
        next(iter_tune(str(BASE), [str(LONG)], tmp_path, [Setting("ties", 0.7, density=0.7)], **kwargs))
    assert fragment in str(by_options.value) and "\n" not in str(by_options.value)
    assert str(by_keywords.value) == str(by_options.value)
    assert not (tmp_path / "tune.jsonl").exists()      # refused before anything is written


def test_keywords_override_the_options_object(tmp_path):
    grid = [Setting("ties", 0.7, density=0.7)]
    with pytest.raises(InputError, match="--tolerance"):   # objective fixed by the keyword, tolerance overridden
        next(iter_tune(str(BASE), [str(LONG)], tmp_path, grid, TuneOptions(objective="nope"),
                       objective="max-accuracy", tolerance=2.0))
    with pytest.raises(TypeError):
        next(iter_tune(str(BASE), [str(LONG)], tmp_path, grid, no_such_option=1))
    assert TuneOptions().validate() == "transformers"


def test_cli_defaults_are_the_library_defaults():
    from acm.cli import build_parser
    from acm.commands.tune import options_from_args

    args = build_parser().parse_args(["tune", "--base", "b", "--ft", "f", "--out", "o"])
    assert options_from_args(args) == TuneOptions()


@needs_demo
def test_options_object_and_keywords_make_the_same_run(tmp_path, analysis_file):
    grid = expand_grid(["ta"], [0.7], [1], [], rules=["softmax"])
    kw = {"limit": 4, "holdout": 0.5, "analysis": analysis_file, "max_new_tokens": 8, "objective": "max-accuracy"}
    by_kw = run_tune(str(BASE), [str(LONG)], tmp_path / "kw", grid, show_progress=False, **kw)
    by_opts = run_tune(str(BASE), [str(LONG)], tmp_path / "opts", grid, TuneOptions(**kw), show_progress=False)

    def same(report):
        return {k: v for k, v in report.items() if k not in ("seconds", "settings")}, \
            [{k: v for k, v in s.items() if k != "seconds"} for s in report["settings"]]
    assert same(by_kw) == same(by_opts) and by_kw["recommended"].get("holdout")
    strip = [[{k: v for k, v in r.items() if k not in ("seconds", "started")} for r in
              read_results(tmp_path / d / "tune.jsonl")] for d in ("kw", "opts")]
    assert strip[0] == strip[1]


@needs_demo
def test_cli_resumes_after_sigkill(tmp_path, analysis_file):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "acm", "tune", "--base", str(BASE), "--ft", str(LONG), "--analysis",
           str(analysis_file), "--limit", "8", "--max-new-tokens", "24", "--rules", "softmax", "--ts", "0.5", "1", "2", "4", "8",
           "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [r for r in read_results(out / "tune.jsonl") if r.get("kind") == "setting"]
        if len(done) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len([r for r in read_results(out / "tune.jsonl") if r.get("kind") == "setting"])
    assert 2 <= killed_at < 6, "the run should have been killed mid-grid"
    assert not (out / "frontier.json").exists()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming: {killed_at} of 6 settings already done" in res.stdout
    records = read_results(out / "tune.jsonl")
    keys = [r["key"] for r in records if r.get("kind") == "setting"]
    assert len(keys) == len(set(keys)) == 6                      # every setting exactly once
    assert sum(r.get("kind") == "reference" for r in records) == 4   # base + fine-tuned, evaluated once per split
    report = json.loads((out / "frontier.json").read_text())
    assert report["complete"] and report["resumed"] == killed_at and "holdout" in report["recommended"]
    assert not list(out.glob(".tmp-merges-*"))
    assert "recommended:" in res.stdout and "held-out accuracy" in res.stdout


def test_report_of_nothing_yet():
    grid = expand_grid(["ties"], [0.7], [1], [0.7])
    rep = build_report([], grid)
    assert rep["done"] == 0 and rep["recommended"]["key"] is None and not rep["complete"]


def test_eval_set_sources_bundled_file_and_hub_id(tmp_path):
    from acm.errors import OfflineError
    from acm.tune import load_eval_set

    rows, label = load_eval_set("bundled")
    assert label == "bundled demo set" and len(rows) == 300 and {"question", "answer", "level"} <= set(rows[0])
    f = tmp_path / "qa.jsonl"
    f.write_text('{"q": "1+1?", "a": "#### 2"}\n', encoding="utf-8")
    rows, _ = load_eval_set(str(f), field_question="q", field_answer="a")
    assert rows == [{"question": "1+1?", "answer": "2"}]
    with pytest.raises(OfflineError) as exc:          # tests run with HF_HUB_OFFLINE=1
        load_eval_set("someone/some-math-set")
    assert "offline" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(InputError, match="not a Hub dataset id"):
        load_eval_set("../no/such/folder")
