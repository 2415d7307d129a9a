"""One way to build a recipe: the same merge made by the CLI, the app and the tuner records the same
coefficients (``acm.rules.coefficients.compute`` → ``Coefficients.weights()`` / ``.entry()``).

What must match: the recipe's ``acm_analysis`` entry (rule, t, switches, λ, the analysis' provenance),
the λ the merge applied, the groups and the method. Options that are each front end's own (the app's
shard size, threads, device choice) may differ and are not compared; neither are names and timestamps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acm.cli import main
from tests.fixtures import make_pair, write_calibration

COMPARED = ("method", "acm", "groups", "lambdas", "acm_analysis", "formula")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_recipe")
    base, fts = make_pair(root, "llama", n_ft=2)
    cal = write_calibration(root / "cal.jsonl", n=10)
    out = root / "a.json"
    args = ["analyze", "--base", str(base), *sum((["--ft", str(f)] for f in fts), []), "--calibration", str(cal),
            "--samples", "6", "--max-tokens", "24", "--metric", "nmi,cka", "--out", str(out)]
    assert main(args) == 0
    return {"root": root, "base": str(base), "fts": [str(f) for f in fts], "analysis": out}


def _recipe(folder: Path) -> dict:
    rec = json.loads((Path(folder) / "acm_recipe.json").read_text(encoding="utf-8"))
    rec["models"] = [m["model"] for m in rec["models"]]
    for entry in rec["lambdas"]:
        entry["model"] = Path(entry["model"]).name
    return {k: rec.get(k) for k in COMPARED}


def _by_cli(setup, out: Path, rule: str, t: float, metric: str | None) -> dict:
    extra = ["--metric", metric] if metric else []
    assert main(["merge", "--base", setup["base"], *sum((["--ft", f] for f in setup["fts"]), []),
                 "--method", "ties", "--alpha", "0.7", "--density", "0.7", "--acm", str(setup["analysis"]),
                 "--rule", rule, "--t", str(t), *extra, "--device", "cpu", "--out", str(out)]) == 0
    return _recipe(out)


def _by_app(setup, rule: str, t: float, metric: str | None) -> dict:
    from acm.activations.result import AnalysisResult
    from components import merge
    from components.state import SessionState

    st = SessionState()
    try:
        st.analysis = AnalysisResult.load(setup["analysis"])
        merged = merge.run_merge(st, setup["base"], setup["fts"], method="ties", mode=merge.ACM, t=t, alpha=0.7,
                                 density=0.7, device="cpu", rule=rule, metric=metric)
        return _recipe(merged.out_dir)
    finally:
        st.close()


def _by_tuner(setup, out: Path, rule: str, t: float, metric: str | None) -> dict:
    from acm.activations.result import AnalysisResult
    from acm.tune import Setting, _merge

    analysis = AnalysisResult.load(setup["analysis"])
    paper = rule == "acm"
    s = Setting("ties", None if paper else 0.7, t, density=0.7, rule=rule if paper else None,
                against="fine-tuned" if paper else None, applies="task-vectors" if paper else None,
                metric=metric or "nmi")
    folder, _ = _merge(setup["base"], setup["fts"], s, analysis, out, threads=None, device="cpu")
    return _recipe(folder)


@pytest.mark.parametrize("rule, t, metric", [("acm", 0.7, None), ("softmax", 2.0, None), ("softmax", 2.0, "cka")])
def test_cli_app_and_tuner_record_the_same_coefficients(setup, tmp_path, rule, t, metric, one_torch_thread):
    cli = _by_cli(setup, tmp_path / "cli", rule, t, metric)
    app = _by_app(setup, rule, t, metric)
    tuner = _by_tuner(setup, tmp_path / "tune", rule, t, metric)
    assert cli["acm"] is True and cli["acm_analysis"] is not None
    assert (cli["acm_analysis"].get("rule") == "acm") == (rule == "acm")
    assert app == cli
    assert tuner == cli
