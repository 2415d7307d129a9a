"""acm.tune with the paper's rule (``acm``, the default): grid, keys, old files, real runs on the demo pair.

The runs use the bundled 0.7M demo pair, a real analysis with per-sample MI on 4 calibration samples
(the acm rule needs it; a few seconds), 4 problems and 8 new tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acm.errors import InputError
from acm.tune import DEFAULT_ACM_TS, Setting, expand_grid, read_results, run_tune
from tests.test_tune import BASE, LONG, needs_demo


@pytest.fixture(scope="module")
def real_analysis(tmp_path_factory):
    """base vs long on 4 bundled calibration samples: NMI and per-sample MI (acm.activations.analysis.analyze's default)."""
    if not (BASE / "config.json").is_file():
        pytest.skip("bundled demo models missing")
    from acm.activations.analysis import analyze

    an = analyze(str(BASE), [str(LONG)], None, samples=4, seed=0, show_progress=False)
    assert an.has_sample_mi() and "nmi" in an.metrics()
    path = tmp_path_factory.mktemp("an") / "analysis.json"
    an.save(path)
    return an, path


# ----------------------------------------------------------------------------- grid and keys


def test_grid_defaults_to_the_papers_rule_and_its_ts():
    grid = expand_grid(["ta"], [0.5, 0.7], None, [])
    paper = [s for s in grid if s.paper]
    assert tuple(s.t for s in paper) == DEFAULT_ACM_TS and 0.7 in DEFAULT_ACM_TS
    # the paper's setting (against fine-tuned, on task vectors) has no α: once, not once per α
    assert all(s.alpha is None and s.against == "fine-tuned" and s.applies == "task-vectors" for s in paper)
    assert [s.alpha for s in grid if not s.paper] == [0.5, 0.7]
    assert paper[2].label() == "ACM-TA (t=0.7)" and paper[0].key() == \
        "task_arithmetic|a=-|t=-1|d=-|p=-|r=acm|vs=fine-tuned|on=task-vectors"
    assert all(s.needs_analysis for s in paper) and not grid[0].needs_analysis


def test_switches_are_grid_dimensions_and_every_key_names_t_and_both_switches():
    grid = expand_grid(["ties"], [0.6, 0.8], [0.7], [0.5], against=["fine-tuned", "merged"],
                       applies=["task-vectors", "merged-delta"], estimators=["labels", "binned"])
    paper = [s for s in grid if s.paper]
    # fine-tuned/task-vectors once; the three others start from a plain merge at each α (merged: × estimator)
    assert len(paper) == 1 + 2 * (1 + 2 + 2) and len({s.key() for s in grid}) == len(grid)
    for s in paper:
        assert "|t=0.7|" in s.key() and f"|vs={s.against}|on={s.applies}" in s.key()
        assert Setting.from_dict(json.loads(json.dumps(s.to_dict()))) == s
        assert (s.estimator is not None) == (s.against == "merged") and (s.alpha is None) == (
            s.against == "fine-tuned" and s.applies == "task-vectors")
        assert s.needs_analysis == (s.against == "fine-tuned")
    s = next(x for x in paper if x.against == "merged" and x.applies == "merged-delta" and x.estimator == "binned"
             and x.alpha == 0.8)
    assert s.key() == "ties|a=0.8|t=0.7|d=0.5|p=-|r=acm|vs=merged|on=merged-delta|e=binned"
    assert s.label() == "ACM-TIES (α=0.8, d=0.5, t=0.7, vs merged, binned, on merged delta)"


def test_plain_and_softmax_keys_are_byte_identical_to_older_runs():
    grid = expand_grid(["ties"], [0.7], [1.0], [0.7], rules=["acm", "softmax"], metrics=["nmi", "cka"])
    keys = [s.key() for s in grid]
    assert keys == ["ties|a=0.7|t=-|d=0.7|p=-", "ties|a=-|t=1|d=0.7|p=-|r=acm|vs=fine-tuned|on=task-vectors",
                    "ties|a=0.7|t=1|d=0.7|p=-", "ties|a=0.7|t=1|d=0.7|p=-|m=cka"]
    # a setting dict as older runs wrote it (no rule fields at all) is the same softmax point
    old = Setting.from_dict({"method": "ties", "alpha": 0.7, "t": 1.0, "density": 0.7, "drop_rate": None,
                             "rule": None, "theta": None, "estimator": None, "metric": "nmi"})
    assert old == grid[2] and old.key() == keys[2]
    assert Setting.from_dict({**old.to_dict(), "rule": "softmax"}) == old


def test_the_old_sigmoid_rule_is_the_acm_rule_against_a_merge_on_its_delta():
    old = {"method": "ties", "alpha": 0.7, "t": None, "density": 0.7, "drop_rate": None, "rule": "sigmoid",
           "theta": 0.7, "estimator": "binned", "metric": "nmi"}
    s = Setting.from_dict(old)
    assert (s.rule, s.t, s.against, s.applies, s.estimator, s.alpha) == ("acm", 0.7, "merged", "merged-delta",
                                                                         "binned", 0.7)
    alias = expand_grid(["ties"], [0.7], None, [0.7], rules=["sigmoid"], thetas=[0.7], estimators=["binned"])
    assert alias[1] == s and [x.t for x in alias] == [None, 0.7]       # --thetas: the acm rule's t values


def test_read_results_gives_old_sigmoid_records_their_new_key(tmp_path):
    old_setting = {"method": "task_arithmetic", "alpha": 0.7, "t": None, "density": None, "drop_rate": None,
                   "rule": "sigmoid", "theta": 0.7, "estimator": "labels", "metric": "nmi"}
    rec = {"kind": "setting", "key": "task_arithmetic|a=0.7|t=-|d=-|p=-|r=sigmoid|th=0.7|e=labels",
           "label": "TA (α=0.7) + sigmoid (θ=0.7, labels)", "setting": old_setting, "split": "tune",
           "accuracy": 0.5, "mean_length": 3.0, "rule_kept": {"embed": 0.6}}
    plain = {"kind": "setting", "key": "task_arithmetic|a=0.7|t=-|d=-|p=-", "label": "TA (α=0.7)",
             "setting": {**old_setting, "rule": None, "theta": None, "estimator": None}, "split": "tune"}
    (tmp_path / "tune.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(plain) + "\n", encoding="utf-8")
    got = read_results(tmp_path / "tune.jsonl")
    assert got[0]["key"] == "task_arithmetic|a=0.7|t=0.7|d=-|p=-|r=acm|vs=merged|on=merged-delta|e=labels"
    assert got[0]["old_key"] == rec["key"] and got[0]["rule_kept"] == {"embed": 0.6}
    assert got[1] == plain                                                 # everything else untouched


# ----------------------------------------------------------------------------- runs on the demo pair


@needs_demo
def test_acm_grid_runs_on_the_demo_pair_with_the_librarys_lambda(tmp_path, real_analysis):
    from acm.rules.coefficients import compute

    an, path = real_analysis
    grid = expand_grid(["ta"], [0.7], [0.7, -1], [])
    report = run_tune(str(BASE), [str(LONG)], tmp_path, grid, limit=4, holdout=0.0, analysis=path,
                      max_new_tokens=8, batch_size=4, keep=True, show_progress=False)
    assert report["complete"] and report["done"] == 3 and report["recommended"]["key"] in {s.key() for s in grid}
    recs = {r["key"]: r for r in read_results(tmp_path / "tune.jsonl") if r.get("kind") == "setting"}
    for s in grid[1:]:
        want = compute(an, "acm", s.t).mean_over_models()
        assert recs[s.key()]["rule_lambda"] == pytest.approx(want, abs=1e-6)
        recipe = json.loads((Path(recs[s.key()]["folder"]) / "acm_recipe.json").read_text())
        entry = recipe["acm_analysis"]
        assert entry["rule"] == "acm" and entry["t"] == s.t and entry["against"] == "fine-tuned"
        assert entry["lambda"][str(LONG)] == pytest.approx(list(want.values()), abs=1e-6)
    assert "rule_lambda" not in recs[grid[0].key()]
    # t > 0 keeps every λ in [½, 1), t < 0 in (0, ½]
    assert all(0.5 <= v < 1 for v in recs[grid[1].key()]["rule_lambda"].values())
    assert all(0 < v <= 0.5 for v in recs[grid[2].key()]["rule_lambda"].values())
    md = (tmp_path / "frontier.md").read_text()
    assert "ACM-TA (t=0.7)" in md and "ACM-TA (t=-1)" in md


@needs_demo
def test_old_sigmoid_run_resumes_and_the_merged_variant_runs(tmp_path):
    """A run with the acm rule against a plain merge, rewritten as an older sigmoid-rule run wrote it,
    resumes without evaluating anything again; the tuner computed its own analysis of the merge."""
    grid = expand_grid(["ta"], [0.7], None, [], rules=["sigmoid"], thetas=[0.7])
    assert [s.paper for s in grid] == [False, True] and not any(s.needs_analysis for s in grid)
    run_tune(str(BASE), [str(LONG)], tmp_path, grid, limit=4, holdout=0.0, samples=4, max_new_tokens=8,
             show_progress=False)
    assert not (tmp_path / "analysis.json").exists()      # nothing needed the base-vs-fine-tuned analysis
    path = tmp_path / "tune.jsonl"
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    new = next(r for r in lines if r.get("key") == grid[1].key())
    assert all(0.5 <= v < 1 for v in new["rule_lambda"].values())
    new.update(key="task_arithmetic|a=0.7|t=-|d=-|p=-|r=sigmoid|th=0.7|e=labels",
               setting={"method": "task_arithmetic", "alpha": 0.7, "t": None, "density": None, "drop_rate": None,
                        "rule": "sigmoid", "theta": 0.7, "estimator": "labels", "metric": "nmi"})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    seen = []
    report = run_tune(str(BASE), [str(LONG)], tmp_path, grid, limit=4, holdout=0.0, samples=4, max_new_tokens=8,
                      show_progress=False, on_record=lambda r: seen.append(r["kind"]))
    assert seen == ["resumed", "report"] and report["complete"] and report["done"] == 2


@needs_demo
def test_an_analysis_without_per_sample_mi_is_refused_in_one_line(tmp_path):
    from acm.activations.result import AnalysisResult, ModelNMI

    groups = ["embed"] + [f"block.{i}" for i in range(6)] + ["head"]
    old = AnalysisResult(groups=groups, models=[ModelNMI(model=str(LONG), nmi=[0.3] * 8, mi=[0.3] * 8)])
    path = tmp_path / "old.json"
    old.save(path)
    with pytest.raises(InputError) as exc:
        run_tune(str(BASE), [str(LONG)], tmp_path / "run", expand_grid(["ta"], [0.7], [0.7], []), limit=4,
                 holdout=0.0, analysis=path, max_new_tokens=8, show_progress=False)
    msg = str(exc.value)
    assert "no per-sample MI" in msg and "acm analyze" in msg and "--rules softmax" in msg and "\n" not in msg
    # the same file still drives a softmax grid
    rep = run_tune(str(BASE), [str(LONG)], tmp_path / "run", expand_grid(["ta"], [0.7], [1], [], rules=["softmax"]),
                   limit=4, holdout=0.0, analysis=path, max_new_tokens=8, show_progress=False)
    assert rep["complete"]


@needs_demo
def test_cli_tunes_the_acm_rule_by_default_and_its_analysis_keeps_per_sample_mi(tmp_path, capsys):
    from acm.activations.result import AnalysisResult
    from acm.cli import main

    code = main(["tune", "--base", str(BASE), "--ft", str(LONG), "--samples", "4", "--methods", "ta",
                 "--ts", "0.7", "--limit", "4", "--holdout", "0", "--max-new-tokens", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "tune: 2 settings" in out and "ACM-TA (t=0.7)" in out
    cached = AnalysisResult.load(tmp_path / "analysis.json")          # computed by the tuner, for later runs too
    assert cached.has_sample_mi() and "nmi" in cached.metrics() and cached.sample_mi_matrix().shape[-1] == 4
    keys = [r["key"] for r in read_results(tmp_path / "tune.jsonl") if r.get("kind") == "setting"]
    assert keys == ["task_arithmetic|a=0.7|t=-|d=-|p=-",
                    "task_arithmetic|a=-|t=0.7|d=-|p=-|r=acm|vs=fine-tuned|on=task-vectors"]
